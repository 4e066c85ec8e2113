"""An S3 endpoint over TLS, in front of a moto server, with the quirks of real stores.

Production talks HTTPS to S3, and over HTTPS boto3 (>= 1.36) streams every PutObject as
``aws-chunked`` with a checksum trailer; over moto's plain HTTP it never does. This proxy
terminates TLS with a self-signed certificate (trusted by clients through ``AWS_CA_BUNDLE``)
and forwards each request to moto, so boto3's production defaults are exercised end to end.

``S3Proxy.quirks`` switches on what S3-compatible stores were found to do
(tests/../shared/field-cases, bucket side):

- ``keep_framing``: an aws-chunked upload is stored with its chunk framing as the body (the
  streaming markers are stripped before moto sees it, so moto stores the bytes as sent).
- ``reject_streaming``: an aws-chunked upload is answered ``400 XAmzContentSHA256Mismatch``.
- ``ignore_if_none_match``: ``If-None-Match`` is dropped: a create-only write overwrites.
- ``if_match_501``: a request carrying ``If-Match`` is answered ``501 NotImplemented``.
- ``expired_keys``: requests signed with one of these access key ids are answered
  ``400 ExpiredToken``.
- ``unanswered``: a PUT whose path contains this text reaches moto (the write lands) and
  then the connection is closed without an answer, as when a response is lost on the way
  back; ``answered_first`` such PUTs are answered normally before that starts. botocore
  retries, each retry lands or meets 412 and goes unanswered too, so the caller sees an
  error for a write that landed. ``unanswered_count`` counts them.
- ``refuse_writes``: a PUT whose path contains this text is answered ``503 SlowDown`` and
  never reaches moto (a store that cannot take writes for a while).

``requests`` records ``(method, path)`` of every request that reached the proxy, so a test
counts what a command wrote.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length"}
_STREAMING_MARKERS = ("x-amz-trailer", "x-amz-decoded-content-length")
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "s3-cert.pem", directory / "s3-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@dataclass
class Quirks:
    keep_framing: bool = False
    reject_streaming: bool = False
    ignore_if_none_match: bool = False
    if_match_501: bool = False
    expired_keys: set[str] = field(default_factory=set)
    unanswered: str | None = None
    answered_first: int = 0
    refuse_writes: str | None = None


def _error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error>"
    ).encode()


class S3Proxy:
    """TLS in front of ``upstream`` (a moto server URL), on a free port of 127.0.0.1."""

    def __init__(self, upstream: str, cert_file: Path, key_file: Path) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.quirks = Quirks()
        self.requests: list[tuple[str, str]] = []
        self.ca_bundle = cert_file  # what clients trust (AWS_CA_BUNDLE)
        self.streamed = 0  # uploads that came aws-chunked (boto3's default over TLS)
        self.unanswered_count = 0  # writes that landed and were never answered
        self._lock = threading.Lock()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> S3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.quirks = Quirks()
            self.requests.clear()
            self.streamed = 0
            self.unanswered_count = 0

    def leave_unanswered(self, method: str, path: str) -> bool:
        """Whether this request lands without an answer (see ``Quirks.unanswered``)."""
        with self._lock:
            mark = self.quirks.unanswered
            if method != "PUT" or mark is None or mark not in path:
                return False
            if self.quirks.answered_first > 0:
                self.quirks.answered_first -= 1
                return False
            self.unanswered_count += 1
            return True

    def record(self, method: str, path: str, streamed: bool) -> None:
        with self._lock:
            self.requests.append((method, path))
            self.streamed += streamed

    def writes(self, exclude: str = "/_poller/probe") -> list[str]:
        """Paths of every PUT, POST and DELETE, except the bucket probe's (a substring)."""
        with self._lock:
            return [
                path
                for method, path in self.requests
                if method in ("PUT", "POST", "DELETE") and exclude not in path
            ]


class _Handler(BaseHTTPRequestHandler):
    owner: S3Proxy
    protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" answered for boto3

    def setup(self) -> None:
        super().setup()
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError):
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # quiet: the tests read what they need from ``requests``

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = _error(code, message)
        self._answer(
            status,
            body,
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )

    def _handle(self) -> None:
        owner, quirks = self.owner, self.owner.quirks
        body = self._body()
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        streaming = "aws-chunked" in headers.get("content-encoding", "")
        owner.record(self.command, self.path, streaming)
        key_id = _CREDENTIAL.search(headers.get("authorization", ""))
        if key_id and key_id.group(1) in quirks.expired_keys:
            self._error(400, "ExpiredToken", "The provided token has expired.")
            return
        if streaming and quirks.reject_streaming:
            self._error(400, "XAmzContentSHA256Mismatch", "streaming uploads are not supported")
            return
        if "if-match" in headers and quirks.if_match_501:
            self._error(
                501,
                "NotImplemented",
                "A header you provided implies functionality that is not implemented",
            )
            return
        refused = quirks.refuse_writes
        if self.command == "PUT" and refused is not None and refused in self.path:
            self._error(503, "SlowDown", "Please reduce your request rate.")
            return
        if quirks.ignore_if_none_match:
            headers.pop("if-none-match", None)
        if streaming and quirks.keep_framing:
            # What a store that does not know aws-chunked does: the framing is the body.
            for name in _STREAMING_MARKERS:
                headers.pop(name, None)
            headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
            encodings = [
                e for e in headers.pop("content-encoding").split(",") if e != "aws-chunked"
            ]
            if encodings:
                headers["content-encoding"] = ",".join(encodings)
            headers.pop("x-amz-sdk-checksum-algorithm", None)
        if self.command in ("PUT", "POST") or body:
            headers["content-length"] = str(len(body))
        connection = http.client.HTTPConnection(*owner.upstream, timeout=60)
        try:
            connection.request(self.command, self.path, body=body or None, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            if owner.leave_unanswered(self.command, self.path):
                # The write landed (or met 412); its answer is lost on the way back.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            out = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP]
            length = answer.getheader("Content-Length") if self.command == "HEAD" else None
            out.append(("Content-Length", length or str(len(data))))
            self._answer(answer.status, data, out)
        finally:
            connection.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 - stdlib names
