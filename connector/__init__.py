"""lmcd.connector: the client side (client library, chunk keys, SHM worker memory, bench)."""
