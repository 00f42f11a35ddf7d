"""Administering a central home: init, enrollment, revocation, operator accounts and
tokens, the broker's and TLS files. Plain functions, called by the CLI, the HTTP admin routes and tests."""
