"""Issue 17, tried to break: each test states what a user may expect where the review found
the product fell short."""

from __future__ import annotations

import gzip
import json
import zlib
from datetime import timedelta
from typing import Any

import pytest

from poller.archive.allowance import HORIZON_SECONDS, PrefixAllowance
from poller.archive.records import Layout
from poller.archive.store import MemoryObjectStore
from poller.errors import MalformedResponse
from poller.threatstack.decoding import BodyDecoder

T0 = 1_764_000_000.0
LEDGER = "p/_poller/budget.json"


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
