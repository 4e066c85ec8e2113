"""The API and the clock at their edges: the prefix's shared budget with slow ledger writes,
odd ledger content and wall clocks stepped either way; compressed answers, error bodies within
their bounds, owed ids the API refuses, a red record left by a predecessor. Each test
reproduced a defect a break-it review of issue 17 found, and states what should happen."""

from __future__ import annotations

import gzip
import json
import zlib
from datetime import timedelta
from typing import Any

import pytest
from test_shared_budget import LEDGER, T0, World, most_in_any_minute

from poller.archive.allowance import HORIZON_SECONDS, PrefixAllowance
from poller.archive.records import Layout
from poller.archive.store import MemoryObjectStore
from poller.errors import MalformedResponse
from poller.threatstack.budget import RequestBudget
from poller.threatstack.decoding import BodyDecoder


def test_a_ledger_grant_dated_far_in_the_future_does_not_stall_the_prefix():
    """A host whose wall clock was an hour ahead (then stepped back by NTP), or a hand edit,
    leaves grants dated an hour from now. Clocks sharing a prefix are in step (Hawk refuses
    more than a minute of skew), so such a grant cannot be believed as dated: it counts as
    if written now (its requests may have just gone out), so it holds every process back
    for a grant's horizon at most, never an hour (or for ever, with ``1e12``)."""
    wall = [T0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        wall[0] += seconds
        # Counted as if dated now: held back for a grant's horizon at most, never an hour.
        assert sum(slept) <= HORIZON_SECONDS, f"waited {sum(slept)} s for a future grant"

    store = MemoryObjectStore()
    for at in (T0 + 3600.0, 1e12):
        slept.clear()
        ledger = {"version": 1, "per_minute": 20, "grants": [[at, 20, "ahead", at + 10.0]]}
        store.put(LEDGER, json.dumps(ledger).encode())
        run = PrefixAllowance(store, Layout("p"), 20, "run", lambda: wall[0], sleep)
        run.take()
        found = store.get(LEDGER)
        assert found is not None
        assert all(g[0] <= wall[0] for g in json.loads(found.body)["grants"])


def test_a_busy_process_whose_wall_clock_steps_back_an_hour_goes_on():
    """README, *Failure behaviour*: when the wall clock steps, the request budget does not
    change. A process that used the whole budget, then had its clock stepped back an hour,
    finds its own grants dated an hour ahead: it must not wait an hour for them."""
    wall = [T0]
    mono = [0.0]

    def sleep(seconds: float) -> None:
        assert seconds <= HORIZON_SECONDS, f"asked to wait {seconds} s"
        wall[0] += seconds
        mono[0] += seconds

    store = MemoryObjectStore()
    run = PrefixAllowance(
        store, Layout("p"), 20, "run", lambda: wall[0], sleep, clock=lambda: mono[0]
    )
    for _ in range(20):
        run.take()
        wall[0] += 0.5
        mono[0] += 0.5
    wall[0] -= 3600.0
    for _ in range(5):
        run.take()


def test_a_gzip_answer_of_several_members_is_read_whole():
    """RFC 1952: a gzip file is a series of members, and gateways that compress as they stream
    send several (Python's gzip and urllib3 read them all). Reading only the first cut every
    page short ("not JSON", every cycle); data after the end of a deflate stream, or after a
    gzip member that is not a member, is a malformed answer, not silently dropped."""
    body = json.dumps({"alerts": [{"id": "a" * 24}], "token": None}).encode()
    members = gzip.compress(body[:10]) + gzip.compress(body[10:])
    for chunking in (len(members), 7, 1):
        decoder = BodyDecoder("gzip", 1000)
        out = b"".join(
            decoder.feed(members[i : i + chunking]) for i in range(0, len(members), chunking)
        )
        decoder.finish()
        assert out == body
    for coding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        decoder = BodyDecoder(coding, 1000)
        with pytest.raises(MalformedResponse):
            decoder.feed(packed + b"GARBAGE")
            decoder.finish()
    bomb = gzip.compress(b"x" * 600) * 4  # each member under the limit, together over it
    decoder = BodyDecoder("gzip", 1000)
    with pytest.raises(MalformedResponse, match="once decoded"):
        decoder.feed(bomb)


def test_an_owed_id_the_api_refuses_with_403_does_not_fail_every_cycle():
    """A pushed id of another organisation may as well be answered 403 as 404 (the vendor
    does not say which). The listings of the cycle just worked with the same credentials, so
    the 403 is about that one id: it must be given up on like any other failed fetch, not
    fail the cycle (exit 1) every time, for ever, while a real owed alert waits behind it."""
    from test_sync import LAYOUT, World, ago, run_with_pending

    from poller.archive.state import PendingRecords
    from poller.errors import ApiAuthError
    from poller.walks.sync import OWED_MAX_ATTEMPTS

    world = World()
    get_alert = world.source.get_alert

    def refusing(alert_id: str) -> Any:
        if alert_id == "theirs403":
            raise ApiAuthError("Threat Stack refused access (403)")
        return get_alert(alert_id)

    world.source.get_alert = refusing  # type: ignore[method-assign]
    world.cycle()
    pending = PendingRecords(world.store, LAYOUT)
    pending.add("theirs403", "")
    pending.add("pushed00old", "")
    world.source.add("pushed00old", ago(180))
    for _ in range(OWED_MAX_ATTEMPTS + 1):
        run_with_pending(world, pending)
        world.now += timedelta(minutes=5)
    assert "pushed00old" in world.archived_ids()
    assert pending.ids() == []
    assert pending.unfetchable() == ["theirs403"]


def test_a_restarted_daemon_clears_the_red_record_its_predecessor_left(
    monkeypatch: pytest.MonkeyPatch,
):
    """/healthz red makes the orchestrator restart the pod: that is its purpose. The new
    process starts at 0 failures, so its first good cycle changed no count and wrote nothing,
    and ``poller status`` went on saying "5 cycles in a row failed ... /healthz is red" about
    a daemon that has been healthy since."""
    from test_scheduler import make_daemon

    from poller.archive.failures import FailureRecord
    from poller.errors import ApiAuthError
    from poller.serving.daemon import FAILURES_BEFORE_RED

    failing, _ = make_daemon(monkeypatch, ApiAuthError("Threat Stack rejected (401)"))
    for _ in range(FAILURES_BEFORE_RED):
        failing.cycle()
    assert failing.alive()[0] is False
    # the orchestrator's restart, on the same bucket
    restarted, _ = make_daemon(monkeypatch, None, failing.runtime.store)
    restarted.cycle()
    record = FailureRecord(restarted.runtime.store, Layout()).read()
    assert record is not None
    assert record["failed_cycles_in_a_row"] == 0 and record["last_outcome"] == "ok"
    restarted.cycle()  # and a healthy daemon still writes nothing after that


class SlowPut:
    """The shared bucket, seen by one process whose PUTs take ``seconds`` (S3 retries)."""

    def __init__(self, world: World, seconds: float) -> None:
        self._world, self._seconds = world, seconds

    def get(self, key: str) -> Any:
        return self._world.store.get(key)

    def put(self, key: str, body: bytes, **kwargs: Any) -> Any:
        self._world.now += self._seconds  # the write lands this much later
        return self._world.store.put(key, body, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._world.store, name)


def test_a_slow_ledger_write_lets_two_processes_send_over_the_budget_in_a_minute():
    """README/allowance: no 60 s window holds more than the budget of all processes. A
    grant is dated by the wall time read before its GET and PUT, but its 10 s are counted on
    the monotonic clock from after the PUT: with a PUT that takes 3 s, its slots go out up
    to 3 s after the moment the ledger records, beyond the 1.5 s of margin and skew."""
    world = World()
    slow = PrefixAllowance(
        SlowPut(world, 3.0), Layout("p"), 100, "slow", lambda: world.now, world.sleep
    )
    fast = world.process("fast", 100)
    for _ in range(100):
        world.send(slow)
    slow.give_back()
    for _ in range(100):
        world.send(fast)
    assert most_in_any_minute(world.sent) <= 100


def test_a_larger_process_held_to_a_smaller_budget_is_not_starved_by_its_own_grant_size():
    """README: a process with a larger budget 'is held to' the smaller one while it is
    active. A busy process at 100 (grants grown to 10) waits for room for half its next
    grant (5); beside a process at 8 that sends 4 a minute (4 or 5 slots counted), the room is
    never more than 4: it sends nothing at all for ten minutes, though the minute has room."""
    world = World()
    big = world.process("big", 100)
    for _ in range(40):
        world.send(big)  # grants of 2, 8, 10, 10, 10: its next one is of 10
    world.now += 70.0  # its grants have aged out
    small = world.process("small", 8)
    for _ in range(4):  # 4 a minute: 4 or 5 slots counted, at most 4 of its 8 free
        world.send(small)
        world.now += 15.0
    world.now -= 14.5
    next_small = [world.now + 14.5]

    def sleep(seconds: float) -> None:  # the small process keeps sending meanwhile
        assert world.now - start < 600.0, "no request in ten minutes"
        end = world.now + seconds
        while next_small[0] <= end:
            world.now = max(world.now, next_small[0])
            world.send(small)
            next_small[0] += 15.0
        world.now = max(world.now, end)

    start = world.now
    big._sleep = sleep
    world.send(big)  # one request
    assert world.now - start < 115.0, f"waited {world.now - start:.0f} s"


def test_a_store_proof_before_the_first_grant_dates_that_grant_too_early():
    """The same clock read serves the store proof (``before_first_write``, S3 requests of its
    own) and the first grant: a proof that takes 20 s dates the grant 20 s before its slots
    go out, and another process finds the budget free 20 s too early."""
    world = World()

    def proof() -> None:
        world.now += 20.0

    first = PrefixAllowance(
        world.store, Layout("p"), 4, "first", lambda: world.now, world.sleep, proof
    )
    other = world.process("other", 4)
    world.send(first)  # its first grant: 1 slot (a tenth of 4)
    for _ in range(3):
        world.send(first)
    for _ in range(4):
        world.send(other)
    assert most_in_any_minute(world.sent) <= 4


def test_a_ledger_with_an_integer_too_large_for_a_float_does_not_crash_every_request():
    """``_grants`` says it never raises (malformed entries are dropped), and SPEC *Bad input*:
    nothing odd crashes a run. A hand-edited (or corrupted) ledger whose grant is dated with a
    400-digit integer (valid JSON; ``isinstance(x, int)`` passes) raises OverflowError in
    ``float(entry[0])``: every Threat Stack request of every process on the prefix fails
    until someone deletes the ledger."""
    store = MemoryObjectStore()
    store.put(LEDGER, b'{"version": 1, "grants": [[' + b"1" * 400 + b', 1, "x"]]}')
    run = PrefixAllowance(store, Layout("p"), 20, "run", lambda: T0, lambda _: None)
    run.take()  # OverflowError: int too large to convert to float


def test_a_deeply_nested_ledger_does_not_crash_every_request():
    """Same promise: a ledger of nested arrays (valid JSON) makes ``json.loads`` raise
    RecursionError, which ``_grants`` does not catch (it catches ValueError only)."""
    store = MemoryObjectStore()
    store.put(LEDGER, b'{"version": 1, "grants": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    run = PrefixAllowance(store, Layout("p"), 20, "run", lambda: T0, lambda _: None)
    run.take()  # RecursionError


def _two_processes_on_one_host_across_a_step(behind: float, step: float) -> list[float]:
    """Process A sends its whole budget (20) and exits cleanly; the host's wall clock (``behind``
    seconds off the real time) then steps by ``step``; process B on the same host sends 20.
    Returns the real (monotonic) send times of both."""
    real = [0.0]
    offset = [behind]

    def wall() -> float:
        return T0 + real[0] + offset[0]

    def mono() -> float:
        return real[0]

    def sleep(seconds: float) -> None:
        real[0] += seconds

    store = MemoryObjectStore()
    sent: list[float] = []

    def process(name: str) -> tuple[RequestBudget, PrefixAllowance]:
        shared = PrefixAllowance(store, Layout("p"), 20, name, wall, sleep, clock=mono)
        return RequestBudget(20, clock=mono, sleep=sleep, wall=wall, shared=shared), shared

    a_budget, a_shared = process("A")
    for _ in range(20):
        a_budget.acquire()
        sent.append(real[0])
        real[0] += 0.1
    a_shared.give_back()
    offset[0] += step
    b_budget, _ = process("B")
    for _ in range(20):
        b_budget.acquire()
        sent.append(real[0])
        real[0] += 0.1
    return sent


def test_a_wall_clock_stepped_back_past_70_s_does_not_let_two_processes_send_two_budgets():
    """Same promise, the other way: the host's clock steps back 90 s (a manual fix, a VM
    resumed with a stale clock). The first process's grants are now dated more than
    FUTURE_SECONDS ahead and the second process *drops* them from the ledger
    (``budget.grant_from_the_future``) instead of counting them for at most their horizon:
    40 requests within 4 s at a budget of 20. Counting such a grant as if dated now (at most
    HORIZON_SECONDS) would keep both the budget and the no-hour-stall promise of
    test_a_ledger_grant_dated_far_in_the_future_does_not_stall_the_prefix."""
    sent = _two_processes_on_one_host_across_a_step(behind=0.0, step=-90.0)
    assert most_in_any_minute(sent) <= 20


def test_a_last_moment_no_float_holds_does_not_fail_every_request():
    # _grants drops an entry whose date no float holds, but not one whose last moment (the
    # fourth field) is an integer below -1.8e308: `last <= at + 10` is true and
    # float(last) raises OverflowError, out of take() for every process of the prefix.
    world = World()
    body = {"version": 1, "per_minute": 100, "grants": [[T0 - 5, 1, "x", -(10**400), 100]]}
    world.store.put(LEDGER, json.dumps(body).encode())
    a = world.process("a")
    world.send(a)  # raises OverflowError
    assert world.sent == [T0]


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
