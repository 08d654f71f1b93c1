"""Loopback ports for the servers a test starts."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """``count`` different loopback ports nothing listened on a moment ago (all held at once while chosen, so
    they differ); a server started on one may still lose it to another process, as with any free port."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A loopback port nothing listens on now (and, for a test of a refused connection, nothing will)."""
    return free_ports(1)[0]
