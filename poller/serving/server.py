"""The HTTP server under poller's WSGI applications: waitress, plus TLS and a request deadline.

Worker model (waitress's): one event-loop thread per listener accepts connections and reads
each one into its own buffer; only a whole request (headers and body, within the limits) is
handed to one of ``threads`` worker threads, which runs the application and never waits on a
socket. So a sender that trickles bytes costs a buffer and one of ``connection_limit``
connection slots, never a worker. The limits, each one named setting (see ``Limits``):

- ``request_timeout_seconds``: a connection owes a whole request within this from being
  accepted, and again from its last response (keep-alive); a silent or trickling socket
  (or a stalled TLS handshake) is cut off then, checked once a second (waitress itself only
  has an idle timeout, and a socket that sends nothing would hold its slot for all of it);
- ``connection_limit`` open connections per listener and ``connections_per_source`` per
  peer address (the socket's, never a forwarded header): a new connection over either limit
  displaces the oldest connection (of that source, or of all) that still owes its request,
  so the newest arrival, a kubelet's probe say, gets in; only when every connection in the
  way has a request in the workers does the listener refuse (per source) or stop accepting
  (all) until one finishes. waitress polls with ``poll()``, not ``select()``, so the limit
  is not bound by ``FD_SETSIZE`` (1,024);
- ``max_header_bytes`` of request line and headers (431/400 beyond), ``max_body_bytes`` of
  body, chunked or not (413, with a body the sender can read);
- ``idle_timeout_seconds``: a connection with no bytes in either direction for this long is
  closed (waitress's ``channel_timeout``): what is left for it is a sender that stops
  reading its response.

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
from waitress.parser import HTTPRequestParser
from waitress.receiver import ChunkedReceiver
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher
from waitress.utilities import RequestEntityTooLarge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one listener allows; every figure is a setting (``receiver.*``)."""

    threads: int = 8
    connection_limit: int = 1000
    connections_per_source: int = 50  # 0: no cap
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1024 * 1024
    request_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 60.0
    tls_cert_file: str = ""
    tls_key_file: str = ""


LINGER_SECONDS = 2.0  # how long a closing connection keeps reading what the sender still sends
LINGER_BYTES = 8 * 1024 * 1024


class _Parser(HTTPRequestParser):
    """waitress's request parser, plus: a chunk whose declared size already takes the body
    past ``max_body_bytes`` is a 413 at once. waitress counts only the chunk bytes that
    arrive, so a sender that declares a huge chunk and stalls got no answer, just the close
    at its deadline."""

    def received(self, data: bytes) -> int:
        consumed = int(super().received(data))
        receiver = self.body_rcv
        if self.completed or not isinstance(receiver, ChunkedReceiver):
            return consumed
        limit = self.adj.max_request_body_size
        if self.body_bytes_received + receiver.chunk_remainder >= limit:  # waitress's >=
            self.error = RequestEntityTooLarge(f"exceeds max_body of {limit}")
            self.completed = True
            return len(data)  # the rest of this read is that chunk's, not a next request
        return consumed


class _DeadlineChannel(HTTPChannel):
    """waitress's channel, plus: since when it owes a request (for the server's deadline and
    for choosing whom to displace), its peer address, and a lingering close.

    A response that ends the connection (a 413 while the sender is still sending its body)
    is followed by a close; closing a socket with unread bytes makes the kernel send a reset,
    which can destroy the response before the sender reads it. So, as Apache and nginx do,
    the channel half-closes, then reads and discards for up to ``LINGER_SECONDS``."""

    parser_class = _Parser
    owing_since = 0.0  # accepted, or its last response finished (monotonic)
    source = ""
    cut = False  # closed by the server (deadline, displaced): no linger, nothing to answer
    draining_since: float | None = None
    drained = 0
    _in_write = False

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: Any) -> None:  # noqa: A002
        self.owing_since = time.monotonic()
        self.source = str(addr[0]) if isinstance(addr, tuple) and addr else ""
        super().__init__(server, sock, addr, adj, map=map)

    def _socket(self) -> socket.socket:
        assert self.socket is not None
        return self.socket

    @property
    def owing(self) -> bool:
        """Waiting for (the rest of) a request: nothing in the workers, nothing to send."""
        busy = self.requests or self.total_outbufs_len or self.close_when_flushed
        return not busy and not self.will_close and self.draining_since is None

    def cut_off(self) -> None:
        self.cut = True
        self.will_close = True  # the event loop closes it at its next turn

    def service(self) -> None:
        super().service()
        self.owing_since = time.monotonic()  # the next request's clock starts now

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
        if self._in_write and self.draining_since is None and self.connected and not self.cut:
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
    """waitress's TCP server with the request deadline, the connection limits that displace
    the oldest owing connection, and optional TLS."""

    request_timeout = 10.0
    per_source = 0
    tls: ssl.SSLContext | None = None

    def _channels(self) -> list[Any]:
        channels: dict[int, Any] = self.active_channels  # type: ignore[assignment]
        return [c for c in channels.values() if not c.will_close]

    def readable(self) -> bool:
        # waitress's readable() runs the maintenance, then stops accepting at the limit;
        # here the listener stops only when no connection could be displaced.
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval  # type: ignore[assignment]
            self.maintenance(now)
        if not self.accepting:
            return False
        channels: dict[int, Any] = self.active_channels  # type: ignore[assignment]
        if len(channels) < self.adj.connection_limit:
            return True
        live = self._channels()
        return len(live) < self.adj.connection_limit or any(c.owing for c in live)

    @staticmethod
    def _displace(channels: list[Any]) -> bool:
        owing = [c for c in channels if c.owing]
        if not owing:
            return False
        min(owing, key=lambda c: c.owing_since).cut_off()
        return True

    def _room_for(self, source: str) -> bool:
        live = self._channels()
        if self.per_source:
            mine = [c for c in live if c.source == source]
            if len(mine) >= self.per_source:
                return self._displace(mine)  # its own connections only, never another's
        return len(live) < self.adj.connection_limit or self._displace(live)

    def handle_accept(self) -> None:
        try:
            accepted = self.accept()
            if accepted is None:
                return
            conn, addr = accepted
            if self.tls is None:
                self.set_socket_options(conn)
        except OSError:
            return
        addr = self.fix_addr(addr)
        if not self._room_for(str(addr[0]) if isinstance(addr, tuple) and addr else ""):
            conn.close()  # every connection of this source has a request in the workers
            return
        if self.tls is None:
            self.channel_class(self, conn, addr, self.adj, map=getattr(self, "_map"))  # noqa: B009
            return
        try:
            conn.setblocking(False)
            wrapped = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except OSError:
            conn.close()
            return
        _TlsChannel(self, wrapped, addr, self.adj, map=getattr(self, "_map"))  # noqa: B009 - untyped in the stubs

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # type: ignore[arg-type] # waitress passes time.time()
        clock = time.monotonic()
        for channel in self._channels():
            if not channel.owing:
                if channel.draining_since is None:
                    channel.owing_since = clock  # busy: the deadline counts from its end
                elif channel.draining_since < clock - LINGER_SECONDS:
                    channel.will_close = True
            elif channel.owing_since < clock - self.request_timeout:
                channel.cut_off()  # no whole request within the deadline


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class Listener:
    """One waitress server for ``app`` on (host, port), on its own thread and socket map."""

    def __init__(self, app: Any, host: str, port: int, limits: Limits, name: str = "http") -> None:
        adjustments = Adjustments(
            host=host,
            port=port,
            threads=limits.threads,
            connection_limit=limits.connection_limit,
            max_request_header_size=limits.max_header_bytes,
            max_request_body_size=limits.max_body_bytes,
            channel_timeout=max(1, math.ceil(limits.idle_timeout_seconds)),
            # maintenance (both timeouts) runs once a second: O(connections), cheap
            cleanup_interval=1,
            asyncore_use_poll=True,  # select() stops at fd 1,024
            url_scheme="https" if limits.tls_cert_file else "http",
            ident="poller",
            expose_tracebacks=False,
        )
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(limits.threads)
        self.server = _Server(app, map={}, dispatcher=dispatcher, adj=adjustments)
        self.server.request_timeout = limits.request_timeout_seconds
        self.server.per_source = limits.connections_per_source
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
