"""sohoa wire format and envelope: pure, sans-I/O, shared by edge and central.

Nothing here opens a socket, a file or a database. Bytes in, typed values out; typed values in,
bytes out. Both ends of the protocol can therefore be driven together in memory by tests.
"""

PROTOCOL_VERSION = 1
