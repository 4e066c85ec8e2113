"""Where the tables and their bookkeeping live in the bucket (SPEC "The archive"):

- ``P/tables/<table>/date=YYYY-MM-DD/part-NNNN.parquet``: the parts, create-only;
- ``P/_poller/tables/due/YYYY-MM-DD``: a closed day to build again (a backfill or a repair
  archived into it, its alerts are owed full records, or a dismissal found in it belongs to
  a day not closed yet); deleted, under its ETag, once the day is complete;
- ``P/_poller/tables/state.json``: how far the dismissal records have been read (their
  Last-Modified), and whether their index may be read instead of their listing (version 2),
  compare-and-swap on its ETag;
- ``P/_poller/index/dismissals/YYYY/MM/DD/HH/ID``: the dismissal records' time-keyed index,
  written beside each record by ``Archive.store_dismissal`` (``Layout.dismissal_index_key``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from poller.archive.records import Layout

# What a sync cycle re-reads before its watermark at the least (poller.walks.sync.OVERLAP).
REREAD = timedelta(seconds=1)
_PART = re.compile(r"date=(\d{4}-\d{2}-\d{2})/part-(\d{4,})\.parquet")


@dataclass(frozen=True)
class Part:
    table: str
    day: date
    number: int
    key: str
    etag: str


@dataclass(frozen=True)
class TableKeys:
    layout: Layout

    def table_prefix(self, table: str) -> str:
        return self.layout.key("tables", table) + "/"

    def day_prefix(self, table: str, day: date) -> str:
        return self.table_prefix(table) + f"date={day.isoformat()}/"

    def part_key(self, table: str, day: date, number: int) -> str:
        return self.day_prefix(table, day) + f"part-{number:04d}.parquet"

    def parse_part(self, table: str, key: str, etag: str) -> Part | None:
        match = _PART.fullmatch(key[len(self.table_prefix(table)) :])
        if match is None or not key.startswith(self.table_prefix(table)):
            return None
        try:
            day = date.fromisoformat(match[1])
        except ValueError:  # date=2026-02-30: a stray copy, passed over like other strays
            return None
        return Part(table, day, int(match[2]), key, etag)

    @property
    def due_prefix(self) -> str:
        return self.layout.key("_poller", "tables", "due") + "/"

    def due_key(self, day: date) -> str:
        return self.due_prefix + day.isoformat()

    @property
    def state_key(self) -> str:
        return self.layout.key("_poller", "tables", "state.json")

    @property
    def webhooks_prefix(self) -> str:
        return self.layout.key("webhooks") + "/"

    def webhooks_day_prefix(self, day: date) -> str:
        return self.layout.key("webhooks", day.strftime("%Y/%m/%d")) + "/"

    @property
    def dismissals_prefix(self) -> str:
        return self.layout.key("dismissals") + "/"


def last_closed_day(watermark: datetime | None, lookback: timedelta) -> date | None:
    """The last UTC day whose end the live watermark has passed by ``lookback``, or None.
    Day D is closed when ``watermark - lookback >= D+1 00:00``, the look-back never under
    the one second every cycle re-reads (SPEC "Windows overlap": with lookback_seconds 0
    the next cycle still reads from a second before the watermark)."""
    if watermark is None:
        return None
    reread = max(lookback, REREAD)
    return (watermark.astimezone(UTC) - reread).date() - timedelta(days=1)


# How far the watermark (the sync host's clock and the API's) may be ahead of the clock of
# the host that asks (a `poller serve` pod beside a CronJob): an hour, so a push in the
# last (hour - look-back) of a day, when clocks agree, marks the day due for nothing (one
# PUT a batch; the day's first pass clears it).
CLOCK_MARGIN = timedelta(hours=1)


def may_be_closed(day: date, now: datetime, lookback: timedelta) -> bool:
    """Whether ``day`` may be closed (its parts built) at ``now`` on this host's clock: the
    watermark is at most ``now`` on the API's clock, which may be ``CLOCK_MARGIN`` ahead."""
    last = last_closed_day(now + CLOCK_MARGIN, lookback)
    return last is not None and day <= last


def day_of_webhook_key(keys: TableKeys, key: str) -> date | None:
    """The creation day a ``webhooks/YYYY/MM/DD/...`` key is filed under."""
    rest = key[len(keys.webhooks_prefix) :].split("/")
    if len(rest) < 3:
        return None
    try:
        return date(int(rest[0]), int(rest[1]), int(rest[2]))
    except ValueError:
        return None


def days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def rebuild_remedy(table: str, day_folder: str) -> str:
    """What to delete so that a damaged part's day is built again (README, *Query the
    archive*). A day's dismissals also come from dismissal records read long ago (found
    again only by a scan: the state goes too) and from full records of earlier days."""
    if table == "dismissals":
        return (
            f"delete the parts under {day_folder}/ and _poller/tables/state.json under the"
            " prefix; the next poller tables reads every dismissal record again (no row"
            " twice) and builds that day's dismissals again"
        )
    return f"delete the parts under {day_folder}/ and poller tables builds that day again"
