"""The HTTP server under poller's WSGI applications: waitress, plus TLS and a request deadline.

Worker model (waitress's): one event-loop thread per listener accepts connections and reads
each one into its own buffer; only a whole request (headers and body, within the limits) is
handed to one of ``threads`` worker threads, which runs the application and never waits on a
socket. So a sender that trickles bytes costs a buffer and one of ``connection_limit``
connection slots, never a worker. The limits, each one named setting (see ``Limits``):

- ``connection_limit`` open connections per listener; beyond it the listener stops accepting
  until some close (the daemon's health listener is a separate listener with its own slots);
- ``max_header_bytes`` of request line and headers (431/400 beyond), ``max_body_bytes`` of
  body, chunked or not (413, with a body the sender can read);
- ``request_timeout_seconds``: a request must arrive whole within this from its first byte,
  however steadily it trickles (waitress itself only has an idle timeout);
- ``idle_timeout_seconds``: a connection with no bytes in either direction for this long is
  closed (waitress's ``channel_timeout``).

TLS: waitress does not speak TLS. ``tls_context`` wraps each accepted socket server-side
without a handshake, and ``_TlsChannel`` lets the event loop drive the handshake and every
read and write without blocking (OpenSSL's WANT_READ/WANT_WRITE are "try again when the
socket is ready", exactly waitress's own non-blocking contract), so a slow TLS client costs
what a slow plain one does (a handshake that stalls is closed by the idle timeout).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one listener allows; every figure is a setting (``receiver.*``)."""

    threads: int = 8
    connection_limit: int = 100
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1024 * 1024
    request_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    tls_cert_file: str = ""
    tls_key_file: str = ""


LINGER_SECONDS = 2.0  # how long a closing connection keeps reading what the sender still sends
LINGER_BYTES = 8 * 1024 * 1024


class _DeadlineChannel(HTTPChannel):
    """waitress's channel, plus: when a request's first byte arrived (for the server's
    deadline), and a lingering close.

    A response that ends the connection (a 413 while the sender is still sending its body)
    is followed by a close; closing a socket with unread bytes makes the kernel send a reset,
    which can destroy the response before the sender reads it. So, as Apache and nginx do,
    the channel half-closes, then reads and discards for up to ``LINGER_SECONDS``."""

    request_started = 0.0
    draining_since: float | None = None
    drained = 0
    _in_write = False

    def _socket(self) -> socket.socket:
        assert self.socket is not None
        return self.socket

    def received(self, data: bytes) -> bool:
        if self.request is None:
            self.request_started = time.monotonic()
        return bool(super().received(data))

    def handle_write(self) -> None:
        self._in_write = True  # waitress closes from here once a closing response is out
        try:
            super().handle_write()
        finally:
            self._in_write = False

    def readable(self) -> bool:
        return True if self.draining_since is not None else bool(super().readable())

    def writable(self) -> bool:
        if self.draining_since is not None:
            return self.will_close  # set by the server once the linger is over
        return bool(super().writable())

    def handle_read(self) -> None:
        if self.draining_since is None:
            super().handle_read()
            return
        try:
            data = self._socket().recv(self.adj.recv_bytes)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        except OSError:
            data = b""
        self.drained += len(data)
        if not data or self.drained > LINGER_BYTES:
            self.handle_close()

    def handle_close(self) -> None:
        if self._in_write and self.draining_since is None and self.connected:
            self.will_close = False
            self.draining_since = time.monotonic()
            with contextlib.suppress(OSError):
                self._socket().shutdown(socket.SHUT_WR)
            return
        self.draining_since = None
        super().handle_close()


class _TlsChannel(_DeadlineChannel):
    """A channel over a non-blocking ``SSLSocket``: OpenSSL's want-read/want-write mean
    "nothing yet", never an error; the handshake happens inside the first reads."""

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: Any) -> None:  # noqa: A002
        self.handshaken = False
        super().__init__(server, sock, addr, adj, map=map)

    def handle_read(self) -> None:
        try:
            data = self._socket().recv(self.adj.recv_bytes)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:  # a failed handshake, a reset: this connection only
            self.handle_close()
            return
        if not data:
            self.handle_close()
            return
        self.last_activity = time.time()
        self.received(data)

    def send(self, data: bytes, do_close: bool = True) -> int:
        try:
            return int(self._socket().send(data))
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return 0  # retried with the same bytes when the socket is writable
        except OSError:
            if do_close:
                self.handle_close()
            return 0


class _Server(TcpWSGIServer):
    """waitress's TCP server with the request deadline and optional TLS."""

    request_timeout = 10.0
    tls: ssl.SSLContext | None = None

    def handle_accept(self) -> None:
        if self.tls is None:
            super().handle_accept()
            return
        try:
            accepted = self.accept()
            if accepted is None:
                return
            conn, addr = accepted
            conn.setblocking(False)
            wrapped = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError:
            return
        _TlsChannel(self, wrapped, addr, self.adj, map=getattr(self, "_map"))  # noqa: B009 - untyped in the stubs

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # type: ignore[arg-type] # waitress passes time.time()
        started_before = time.monotonic() - self.request_timeout
        channels: dict[int, Any] = self.active_channels  # type: ignore[assignment]
        for channel in list(channels.values()):
            # A handshake that never ends reads no bytes: the idle timeout closes it.
            if channel.request is not None and channel.request_started < started_before:
                channel.will_close = True  # too slow to send one whole request
            lingering = channel.draining_since
            if lingering is not None and lingering < time.monotonic() - LINGER_SECONDS:
                channel.will_close = True


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class Listener:
    """One waitress server for ``app`` on (host, port), on its own thread and socket map."""

    def __init__(self, app: Any, host: str, port: int, limits: Limits, name: str = "http") -> None:
        timeouts = (limits.request_timeout_seconds, limits.idle_timeout_seconds)
        adjustments = Adjustments(
            host=host,
            port=port,
            threads=limits.threads,
            connection_limit=limits.connection_limit,
            max_request_header_size=limits.max_header_bytes,
            max_request_body_size=limits.max_body_bytes,
            channel_timeout=max(1, math.ceil(limits.idle_timeout_seconds)),
            # maintenance (both timeouts) runs this often: a fraction of the shorter one
            cleanup_interval=max(1, math.floor(min(timeouts) / 2)),
            url_scheme="https" if limits.tls_cert_file else "http",
            ident="poller",
            expose_tracebacks=False,
        )
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(limits.threads)
        self.server = _Server(app, map={}, dispatcher=dispatcher, adj=adjustments)
        self.server.request_timeout = limits.request_timeout_seconds
        self.server.channel_class = _DeadlineChannel
        if limits.tls_cert_file:
            self.server.tls = tls_context(limits.tls_cert_file, limits.tls_key_file)
        self.name = name
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(getattr(self.server, "effective_port"))  # noqa: B009 - untyped in the stubs

    def start(self) -> Listener:
        self._thread.start()
        return self

    def _run(self) -> None:
        self.server.run()

    def stop(self) -> None:
        self.server.close()
        self.server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
