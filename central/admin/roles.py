"""Operator roles, in order: each can do everything the ones before it can (central.admin.operators)."""

ROLES = ("viewer", "operator", "admin")
