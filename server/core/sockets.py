"""The listening socket: bound by whoever must report a port in use (the CLI, or the
training process before it starts its server process), then served by uvicorn.

Binding first means ``port=0`` picks a free port and the URL is known at once, and a
port in use is an error where the user called, naming the port.
"""

from __future__ import annotations

import errno
import logging
import socket

logger = logging.getLogger(__name__)


class PortInUse(OSError):
    """The port is taken; the message names it and what to do."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        logger.info("serving on %s: every route but health needs the access token", host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(exc.errno, f"cannot listen on {host}:{port}: the port is in use "
                            "(another dashboard or program has it); pass another port, or "
                            "port=0 for a free one") from None
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


