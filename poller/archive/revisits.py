"""The revisit's own state, beside the checkpoint: ``P/_poller/revisit.json`` (version 1).

::

    {"version": 1,
     "handled": {"<alert id>": 1764072000, ...},   # dismissed alerts whose dismissal the
                                                   # archive shows (or that it does not hold
                                                   # at all), with their creation second
     "current": {"from": "...", "until": "...",    # a revisit under way: its range, how far
                 "cursor": "...", "started_at": "...",  # it got (days end there), its
                 "run_id": "...", "listed": 3, "archived": 1,  # counts so far, and the
                 "pieces": [["...", "..."], ...]},  # pieces of the day after the cursor still
                                                    # to read (absent: none; see walks.revisit)
     "last": {"from": "...", "until": "...", "started_at": "...", "finished_at": "...",
              "run_id": "...", "listed": 60, "archived": 60, "already_archived": 0,
              "first_dismissed": 0, "not_archived": 0},      # the last finished revisit
     "updated_at": "...", "updated_by": "<run id>"}

``handled`` is what makes a revisit cheap: an id in it costs no S3 request when the
dismissed list shows it again. Ids created before the revisit's reach are pruned, so it holds
at most ``sync.revisit_days`` of dismissed alerts (about 40 bytes each).

Written with compare-and-swap on its ETag, by the lease holder only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from poller.archive.records import Layout
from poller.archive.state import our_write_landed
from poller.archive.store import ObjectStore, PreconditionFailed
from poller.errors import CheckpointConflict, UnreadableState
from poller.timeutil import iso_z

REVISIT_VERSION = 1


@dataclass
class RevisitState:
    handled: dict[str, int] = field(default_factory=dict)
    current: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    etag: str | None = None  # of the stored object; None: there is none yet


# The instants a revisit under way, and the last finished one, must carry (ISO 8601): the
# revisit resumes from them and ``status`` shows them, so a corrupt one is named here, as the
# file being unreadable, rather than failing every later cycle with a KeyError.
CURRENT_INSTANTS = ("from", "until", "cursor", "started_at")
LAST_INSTANTS = ("from", "until", "started_at")
RUN_TEXT = ("run_id", "finished_at")  # the other text fields; every other one is a count


def _instant(text: Any, name: str) -> datetime:
    if not isinstance(text, str):
        raise TypeError(f"{name} is not text")
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{name} has no time zone")
    return moment


def _pieces(value: Any) -> None:
    """``pieces``: a list of [from, until] pairs of instants, each from before until."""
    if not isinstance(value, list):
        raise TypeError("pieces is not a list")
    for piece in value:
        if not isinstance(piece, list) or len(piece) != 2:
            raise TypeError("a piece is not a [from, until] pair")
        if _instant(piece[0], "a piece's from") >= _instant(piece[1], "a piece's until"):
            raise ValueError("a piece ends before it starts")


def _run_record(
    value: Any, instants: tuple[str, ...], texts: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """``current`` or ``last`` as stored, checked: ``instants`` and ``texts`` are required,
    the other fields are counts. Raises ValueError, KeyError or TypeError."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError("a revisit record is not an object")
    for name in texts:
        if not isinstance(value[name], str):
            raise TypeError(f"{name} is not text")
    for name in instants:
        _instant(value[name], name)
    for name, item in value.items():
        if name == "pieces":
            _pieces(item)
        elif name in instants or name in RUN_TEXT:
            if not isinstance(item, str):
                raise TypeError(f"{name} is not text")
        elif type(item) is not int or item < 0:
            raise TypeError(f"{name} is not a count")
    return value


def _why(exc: Exception) -> str:
    """What did not read, for an operator: the error's kind and its text, cut short (the
    file holds alert ids and instants, nothing secret)."""
    if isinstance(exc, KeyError):
        return f"KeyError: {exc.args[0]!r} is missing"
    return f"{type(exc).__name__}: {str(exc)[:160]}"


class RevisitStore:
    def __init__(self, store: ObjectStore, layout: Layout) -> None:
        self._store = store
        self._key = layout.revisit_key

    def load(self) -> RevisitState:
        """The stored state (empty when there is none). Raises UnreadableState (a
        FatalError) naming the key when it is not what this poller writes."""
        stored = self._store.get(self._key)
        if stored is None:
            return RevisitState()
        part = ""  # which part of the document is being read, for the message
        try:
            document = json.loads(stored.body)
            version = document["version"]
            if type(version) is not int or version != REVISIT_VERSION:
                # Not only a newer one: 0, -1 or true were never written by any poller.
                raise UnreadableState(
                    f"{self._key} has version {version!r}; this poller reads version"
                    f" {REVISIT_VERSION} (was it written by a newer poller?)"
                )
            part = "handled: "
            handled = {str(k): int(v) for k, v in (document.get("handled") or {}).items()}
            part = "current: "
            current = _run_record(document.get("current"), CURRENT_INSTANTS, ("run_id",))
            part = "last: "
            last = _run_record(document.get("last"), LAST_INSTANTS)
        except UnreadableState:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Deleting it is safe: the next revisit re-reads its range and writes nothing twice.
            raise UnreadableState(
                f"{self._key} is unreadable ({part}{_why(exc)}); inspect it, then delete it"
                " (the next revisit rebuilds it, writing nothing twice)"
            ) from exc
        return RevisitState(handled, current, last, stored.etag)

    def save(self, state: RevisitState, run_id: str, now: datetime) -> RevisitState:
        """Replace the stored state if and only if it is still the one ``state`` was read
        from; raises CheckpointConflict when another writer changed it."""
        document = {
            "version": REVISIT_VERSION,
            "handled": dict(sorted(state.handled.items())),
            "current": state.current,
            "last": state.last,
            "updated_at": iso_z(now),
            "updated_by": run_id,
        }
        body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
        try:
            if state.etag is None:
                etag = self._store.put(self._key, body, if_none_match=True)
            else:
                etag = self._store.put(self._key, body, if_match=state.etag)
        except PreconditionFailed as exc:
            landed = our_write_landed(self._store, self._key, body)
            if landed is None:
                raise CheckpointConflict(
                    f"{self._key} changed while this run worked: another writer moved it"
                ) from exc
            etag = landed
        return RevisitState(dict(state.handled), state.current, state.last, etag)
