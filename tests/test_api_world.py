"""The client against the API as it may really be (issue 17), each way switched on in the
simulator: a gateway that compresses, listings with runs of empty pages or no end, 429s
whose reset is tiny; and whole runs against it: owed ids that answer 404 and 500, a cycle
whose listing never ends."""

from __future__ import annotations

import gzip
import json
import zlib
from datetime import timedelta
from typing import Any

import pytest
import requests
from conftest import MotoServer, assert_exact_archive, poller_env, run_poller, summary_of
from pydantic import SecretStr

from poller.archive.records import Layout
from poller.config import ThreatStackSettings
from poller.errors import MalformedResponse, PagingLoop, RateLimited
from poller.simulator import Faults, Simulator
from poller.threatstack import client as client_module
from poller.threatstack.budget import RequestBudget
from poller.threatstack.client import ThreatStackClient
from poller.threatstack.decoding import BodyDecoder
from poller.threatstack.retrying import RATE_LIMIT_FLOOR, RetryPolicy
from poller.timeutil import iso_z, utc_now

pytestmark = pytest.mark.integration


class FakeTime:
    """A monotonic clock that only moves when slept on: waits are recorded, not waited."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def client_for(
    sim: Simulator,
    attempts: int = 1,
    fake: FakeTime | None = None,
    policy: RetryPolicy | None = None,
    **settings: Any,
) -> ThreatStackClient:
    creds = sim.credentials
    fake = fake or FakeTime()
    return ThreatStackClient(
        ThreatStackSettings(
            base_url=sim.base_url,
            user_id=creds.user_id,
            org_id=creds.org_id,
            api_key=SecretStr(creds.api_key),
            timeout_seconds=5.0,
            **settings,
        ),
        requests.Session(),
        RequestBudget(10_000, clock=fake.clock, sleep=fake.sleep),
        policy or RetryPolicy(max_attempts=attempts, initial_backoff=0.01),
        fake.sleep,
    )


# ---------------------------------------------------------------- a compressing gateway
@pytest.mark.parametrize("mode", ["gzip", "deflate", "raw-deflate"])
def test_a_compressing_gateway_is_read_and_its_signature_verified(mode: str):
    """Every page comes compressed; the client decodes it and verifies Hawk's payload hash
    over the decoded body (verify_responses is on by default)."""
    with Simulator(seed=5, faults=Faults(compress=mode)) as sim:
        now = utc_now()
        sim.generate(150, now - timedelta(hours=3), now - timedelta(hours=1), 0.0)
        client = client_for(sim)
        pages = list(client.list_alerts("active", now - timedelta(days=1), now))
        assert [len(p) for p in pages] == [100, 50]
        assert {a["id"] for p in pages for a in p} == {a.id for a in sim.alerts}
        assert client.get_alert(sim.alerts[0].id)["id"] == sim.alerts[0].id
        assert sim.request_count() == 3


def test_the_gateway_compresses_only_when_asked():
    with Simulator(seed=5, faults=Faults(compress="gzip")) as sim:
        url = sim.base_url + "/v2/alerts?status=active"
        answer = requests.get(url, headers={"Accept-Encoding": "identity"}, timeout=5)
        assert "Content-Encoding" not in answer.headers  # a 401, but not compressed


def test_a_compressed_body_over_the_size_cap_is_refused_with_a_clear_error():
    """A page of ~100 KB that gzips far below the 4 KB cap: the wire size passes, the
    decoded size does not, and the client stops decoding at the cap."""
    with Simulator(seed=5, faults=Faults(compress="gzip")) as sim:
        now = utc_now()
        created = now - timedelta(hours=2)
        doc = {**sim.factory.alert(created), "title": "nc run by root " * 7000}
        sim.add(doc, created)
        client = client_for(sim, attempts=2, max_response_bytes=4096)
        with pytest.raises(MalformedResponse, match="over 4096 bytes once decoded"):
            list(client.list_alerts("active", now - timedelta(days=1), now))
        assert sim.request_count("/v2/alerts") == 2  # retried once, then given up


def test_a_decompression_bomb_stops_at_the_cap():
    bomb = gzip.compress(b"\0" * 50_000_000)  # 50 MB of zeros in ~50 KB
    decoder = BodyDecoder("gzip", 1024 * 1024)
    produced = 0
    with pytest.raises(MalformedResponse, match="once decoded"):
        for start in range(0, len(bomb), 65536):
            produced += len(decoder.feed(bomb[start : start + 65536]))
    assert produced <= 1024 * 1024


def test_unknown_or_broken_codings_are_clear_errors():
    with pytest.raises(MalformedResponse, match="br, which was not asked for"):
        BodyDecoder("br", 1024)
    with pytest.raises(MalformedResponse, match="does not decode"):
        BodyDecoder("gzip", 1024).feed(b"not gzip at all")
    cut = BodyDecoder("deflate", 1024)
    cut.feed(zlib.compress(b"x" * 100)[:10])
    with pytest.raises(Exception, match="cut short"):
        cut.finish()


# ---------------------------------------------------------------- empty pages, endless lists
def test_a_listing_with_runs_of_empty_pages_completes():
    """Five empty pages with a next token before every page of alerts: read through."""
    with Simulator(seed=5, faults=Faults(empty_pages=5)) as sim:
        now = utc_now()
        sim.generate(250, now - timedelta(hours=3), now - timedelta(hours=1), 0.0)
        pages = list(client_for(sim).list_alerts("active", now - timedelta(days=1), now))
        assert {a["id"] for p in pages for a in p} == {a.id for a in sim.alerts}
        assert [len(p) for p in pages if p] == [100, 100, 50]
        assert sim.request_count("/v2/alerts") == 3 * 6


def test_an_endless_listing_ends_with_a_clear_error_after_a_bounded_number_of_pages(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(client_module, "EMPTY_PAGE_LIMIT", 12)  # 100 in production
    with Simulator(seed=5, faults=Faults(endless=True)) as sim:
        now = utc_now()
        sim.generate(150, now - timedelta(hours=3), now - timedelta(hours=1), 0.0)
        listing = client_for(sim).list_alerts("active", now - timedelta(days=1), now)
        with pytest.raises(PagingLoop, match=r"12 empty pages in a row .* looks endless"):
            for _ in listing:
                pass
        assert sim.request_count("/v2/alerts") == 2 + 12


# ---------------------------------------------------------------- 429 storms
@pytest.mark.parametrize("reset", ["1", "30", "0", "junk"])
def test_a_429_storm_with_tiny_resets_waits_with_a_floor_and_goes_on(reset: str):
    """Six 429s in a row whose reset is 1 ms, 30 (seconds meant as ms), 0 or unreadable:
    none of them counts as a failed attempt (only 2 are allowed), every wait is at least the
    floor, the floor doubles, and the request then succeeds."""
    with Simulator(seed=5, faults=Faults(rate_limit_storm=6, rate_limit_reset=reset)) as sim:
        fake = FakeTime()
        client = client_for(sim, attempts=2, fake=fake)
        assert client.self_test() == {"authenticated": True}
        assert sim.faults_served["storm"] == 6
        assert sim.request_count() == 7
        assert len(fake.sleeps) == 6
        for in_a_row, wait in enumerate(fake.sleeps):
            assert wait >= RATE_LIMIT_FLOOR * 2**in_a_row


def test_a_429_storm_ends_at_the_requests_deadline():
    with Simulator(seed=5, faults=Faults(rate_limit_storm=10_000, rate_limit_reset="1")) as sim:
        fake = FakeTime()
        policy = RetryPolicy(max_attempts=2, max_delay_seconds=30, max_backoff=8)
        client = client_for(sim, fake=fake, policy=policy)
        with pytest.raises(RateLimited):
            client.self_test()
        assert 30 <= sum(fake.sleeps) < 30 + 8 + 1
        assert sim.request_count() == len(fake.sleeps) + 1 < 10


# ---------------------------------------------------------------- whole runs, real processes
def world_env(sim: Simulator, moto: MotoServer, bucket: str, **extra: str) -> dict[str, str]:
    """A ``poller`` process against ``sim``: one attempt per request (a 500 costs one), and
    no revisit of the dismissed list (its listings would blur the counts)."""
    return poller_env(
        sim,
        moto,
        bucket,
        POLLER_SYNC__FIRST_RUN_SINCE="2h",
        POLLER_SYNC__REVISIT_DAYS="0",
        POLLER_THREATSTACK__MAX_ATTEMPTS="1",
        **extra,
    )


def test_owed_ids_answering_404_and_500_beside_real_ones(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """Pushed ids owed a full record, fetched from the real simulator: twelve another
    organisation's (404 for an hour: answers, past the grace period), one whose detail
    answers 500 and has failed nine times before, and three real alerts five hours old (in
    no window). Sync runs until nothing is owed: each cycle asks at most 2 listings + 10
    owed ids; the real ones get their full record; each 404 id is asked once, recorded under
    unfetchable/ with the reason, and never asked again; the 500 one is given up on its
    tenth failure. An idle sync afterwards costs its usual two listings."""
    with Simulator(seed=23) as sim:
        now = utc_now()
        sim.generate(20, now - timedelta(minutes=90), now - timedelta(minutes=5))
        real = sim.generate(3, now - timedelta(hours=5), now - timedelta(hours=4, minutes=50))
        others = [f"692c3b89{n:016x}" for n in range(12)]
        broken = "692c3b8a00000000000000ff"
        sim.faults.broken_ids.add(broken)
        env = world_env(sim, moto_server, bucket)
        assert run_poller(["sync"], env).returncode == 0
        hour_ago = iso_z(now - timedelta(hours=1))
        for alert_id in [*others, *(a.id for a in real)]:
            marker = {"owed_since": hour_ago, "attempts": 0, "last_error": ""}
            s3.put_object(Bucket=bucket, Key=f"_poller/pending/{alert_id}", Body=json.dumps(marker))
        marker = {"owed_since": hour_ago, "attempts": 9, "last_error": "500"}
        s3.put_object(Bucket=bucket, Key=f"_poller/pending/{broken}", Body=json.dumps(marker))

        def owed() -> list[str]:
            found = s3.list_objects_v2(Bucket=bucket, Prefix="_poller/pending/")
            return [item["Key"] for item in found.get("Contents", [])]

        cycles = 0
        while owed():
            assert cycles < 12, f"still owed after {cycles} cycles: {owed()}"
            before = sim.request_count()
            result = run_poller(["sync"], env)
            assert result.returncode == 0, result.stderr[-2000:]
            assert sim.request_count() - before <= 2 + 10
            cycles += 1
        for alert in real:
            body = s3.get_object(Bucket=bucket, Key=Layout().alert_key(alert.id))["Body"].read()
            assert json.loads(body) == alert.doc
        for alert_id in others:
            assert sim.request_count(f"/v2/alerts/{alert_id}") == 1
            gone = json.loads(
                s3.get_object(Bucket=bucket, Key=f"_poller/unfetchable/{alert_id}")["Body"].read()
            )
            assert "404" in gone["reason"] and gone["attempts"] == 1
        gone = json.loads(
            s3.get_object(Bucket=bucket, Key=f"_poller/unfetchable/{broken}")["Body"].read()
        )
        assert gone["attempts"] == 10 and "500" in gone["reason"]
        assert sim.request_count(f"/v2/alerts/{broken}") == 1
        status = json.loads(run_poller(["status", "--json"], env).stdout)
        assert status["unfetchable"]["count"] == 13
        before = sim.request_count()
        assert run_poller(["sync"], env).returncode == 0
        assert sim.request_count() - before == 2  # idle: one listing per status


def test_a_cycle_on_an_endless_listing_ends_at_its_deadline_and_keeps_its_checkpoint(
    moto_server: MotoServer, s3: Any, bucket: str
):
    """After a good cycle, new alerts arrive and the listing turns endless (empty pages
    with a next token, for ever), each request taking 0.5 s. With a cycle deadline of 4 s
    the run ends with the deadline's error and exit 1 (SPEC) after at most 4 / 0.5 + 1
    pages, far short of the client's own empty-page limit (100): the deadline ended it.
    The checkpoint is the good cycle's, untouched. Once the listing ends again, the next
    cycle archives everything."""
    with Simulator(seed=29, page_size=10) as sim:
        now = utc_now()
        sim.generate(15, now - timedelta(minutes=90), now - timedelta(minutes=30), 0.0)
        env = world_env(sim, moto_server, bucket)
        assert run_poller(["sync"], env).returncode == 0
        good = s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")
        # Inside the look-back (15 min) of the next cycle's window.
        sim.generate(25, now - timedelta(minutes=12), now - timedelta(minutes=2), 0.0)
        sim.faults.endless = True
        sim.faults.rate = {"slow": 1.0}
        sim.faults.slow_seconds = 0.5
        before = sim.request_count("/v2/alerts")
        result = run_poller(["sync"], {**env, "POLLER_SYNC__MAX_CYCLE_SECONDS": "4"})
        summary = summary_of(result)
        assert result.returncode == 1, summary
        assert "ran past its deadline of 4s" in summary["error"]
        assert 3 <= sim.request_count("/v2/alerts") - before <= 4 / 0.5 + 1
        after = s3.get_object(Bucket=bucket, Key="_poller/checkpoint.json")
        assert after["ETag"] == good["ETag"]  # not advanced past the alerts it never read
        sim.faults.endless, sim.faults.rate = False, {}
        assert run_poller(["sync"], env).returncode == 0
        assert_exact_archive(s3, bucket, sim)
