"""Content-Encoding of an answer: gzip and deflate decoded chunk by chunk, within a bound.

A gateway in front of the API compresses when asked (``requests`` asks by default), so the
raw stream the client reads may be gzip or deflate. The client's byte limit is a limit on
what it has to hold, so it applies to the *decoded* size: a small compressed body that
inflates past it (a decompression bomb) is refused while inflating, never held whole.
"""

from __future__ import annotations

import zlib

from poller.errors import ApiUnavailable, MalformedResponse

# What the client advertises: nothing it cannot decode (requests would add br/zstd when
# those libraries happen to be installed).
ACCEPT_ENCODING = "gzip, deflate"

# zlib's wbits: 32 + 15 reads gzip or zlib framing (some servers say "gzip" for either);
# 15 is zlib-framed deflate (RFC 9110), -15 the raw deflate some servers send instead.
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_RAW = -zlib.MAX_WBITS


class _Stage:
    """One coding, inflated under a bound on what it may produce."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._inflater: zlib._Decompress | None = None
        self._head = b""
        if coding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(_GZIP_OR_ZLIB)

    def _start_deflate(self, data: bytes) -> None:
        # A zlib header is two bytes whose big-endian value is a multiple of 31, with
        # compression method 8 (RFC 1950); anything else is raw deflate.
        zlib_framed = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        self._inflater = zlib.decompressobj(_ZLIB if zlib_framed else _RAW)

    def feed(self, data: bytes, room: int) -> bytes:
        if self._inflater is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            self._start_deflate(data)
        assert self._inflater is not None
        out = b""
        try:
            while data and len(out) <= room:
                if self._inflater.eof:
                    # RFC 1952: a gzip body is a series of members (a gateway compressing
                    # as it streams sends several); after a deflate stream nothing may follow.
                    if self.coding == "deflate":
                        raise MalformedResponse(
                            f"Threat Stack's {self.coding}-encoded answer goes on past its end"
                        )
                    self._inflater = zlib.decompressobj(_GZIP_OR_ZLIB)
                # At most room + 1 bytes: one more than allowed is enough to know it is too
                # big (max_length is never 0 here, which would mean no limit).
                out += self._inflater.decompress(data, room + 1 - len(out))
                data = self._inflater.unused_data if self._inflater.eof else b""
        except zlib.error as exc:
            raise MalformedResponse(
                f"Threat Stack's {self.coding}-encoded answer does not decode ({exc})"
            ) from exc
        return out

    def finish(self) -> None:
        if self._inflater is None or not self._inflater.eof:
            raise ApiUnavailable(f"Threat Stack's {self.coding}-encoded answer was cut short")


class BodyDecoder:
    """Undo a ``Content-Encoding`` header's codings, last applied first.

    ``feed(chunk)`` returns the decoded bytes so far; past ``limit`` decoded bytes it raises
    MalformedResponse ("over N bytes once decoded"). ``finish()`` raises ApiUnavailable when
    the compressed stream stopped before its end. Codings other than gzip, deflate and
    identity raise MalformedResponse at once (we never ask for them)."""

    def __init__(self, header: str, limit: int) -> None:
        codings = [c.strip().lower() for c in header.split(",")]
        codings = [c for c in codings if c and c != "identity"]
        unknown = [c for c in codings if c not in ("gzip", "x-gzip", "deflate")]
        if unknown:
            raise MalformedResponse(
                f"Threat Stack answered with Content-Encoding {', '.join(unknown)}, which was"
                f" not asked for (Accept-Encoding: {ACCEPT_ENCODING})"
            )
        self._stages = [_Stage(c) for c in reversed(codings)]
        self._limit = limit
        self.size = 0  # decoded bytes so far

    def feed(self, chunk: bytes) -> bytes:
        room = self._limit - self.size
        for stage in self._stages:
            chunk = stage.feed(chunk, room)
            if len(chunk) > room:
                break
        self.size += len(chunk)
        if self.size > self._limit:
            raise MalformedResponse(
                f"Threat Stack sent a body over {self._limit} bytes once decoded"
                f" ({', '.join(s.coding for s in reversed(self._stages))}); refused"
                " without decoding the rest"
            )
        return chunk

    def finish(self) -> None:
        for stage in self._stages:
            stage.finish()
