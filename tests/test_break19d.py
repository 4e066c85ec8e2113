"""Break-it review of issues 17 and 19, fourth round: a 4xx answer's body is read within the
same bounds as any body (a gzip bomb in a 404 is not held whole; one that does not decode is
still the 404 it is)."""

from __future__ import annotations

from typing import Any

import pytest


class _ErrorBodyServer:
    """An HTTP server answering every GET 404 with a gzip-encoded ``body``, as a gateway
    that compresses error pages too."""

    def __init__(self, body: bytes) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self, max_response_bytes: int = 1_000_000) -> Any:
        import requests
        from pydantic import SecretStr

        from poller.config import ThreatStackSettings
        from poller.threatstack.budget import RequestBudget
        from poller.threatstack.client import ThreatStackClient
        from poller.threatstack.retrying import RetryPolicy

        settings = ThreatStackSettings(
            base_url=f"http://127.0.0.1:{self.server.server_port}",
            user_id="u",
            org_id="o",
            api_key=SecretStr("k" * 40),
            max_response_bytes=max_response_bytes,
        )
        policy = RetryPolicy(max_attempts=2, max_delay_seconds=5)
        return ThreatStackClient(
            settings, requests.Session(), RequestBudget(1000), policy, lambda s: None
        )

    def close(self) -> None:
        self.server.shutdown()


def test_an_error_answer_that_inflates_past_max_response_bytes_is_not_held_whole():
    """README, Failure behaviour: "``max_response_bytes`` bounds the bytes on the wire *and*
    the decoded bytes, so a small body that inflates past it (a decompression bomb) is
    refused while inflating ..., never held whole". Only 2xx bodies go through the bounded
    decoder: a 4xx body is read by ``response.json()`` (``_server_errors``), which lets
    urllib3 inflate all of it. A 404 (an owed id's detail fetch, SPEC: answered 404 by
    design) whose 64 KB gzip body inflates to 64 MB is held whole: 128 MB at peak with
    ``max_response_bytes`` 1 MB (a container of 128 MiB is OOM-killed)."""
    import gzip
    import tracemalloc

    from poller.errors import PollerError

    server = _ErrorBodyServer(gzip.compress(b"\0" * 64_000_000))
    try:
        client = server.client(max_response_bytes=1_000_000)
        tracemalloc.start()
        try:
            with pytest.raises(PollerError):
                client.get_alert("6b0a3f3c7b8f2ab53451d013")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        server.close()
    assert peak < 16_000_000, f"{peak / 1e6:.0f} MB held for a 404 at a 1 MB bound"


def test_an_error_answer_whose_gzip_does_not_decode_is_a_poller_error_not_a_crash():
    """SPEC, Bad input: "non-JSON bodies never crash a run". A 404 (or 400/403) whose body
    says gzip but does not decode escapes the client as ``requests.ContentDecodingError``,
    which is no PollerError: the owed fetch's ``except (NotFound, ...)`` does not catch it,
    and the cycle crashes (the daemon's "crashed") instead of taking the 404 as the answer
    it is. Expected: the status decides (NotFound here), the unreadable body only loses
    the error text."""
    from poller.errors import NotFound

    server = _ErrorBodyServer(b"\x1f\x8b\x08\x00garbage-not-gzip" * 10)
    try:
        client = server.client()
        with pytest.raises(NotFound):
            client.get_alert("6b0a3f3c7b8f2ab53451d013")
    finally:
        server.close()
