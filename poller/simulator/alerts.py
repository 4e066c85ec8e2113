"""Realistic v2 alert objects, deterministic from a seed (shapes: threatstack-api.md §3)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

TITLES = (
    "Suspicious Process Activity: nc run by root",
    "User Activity: sudo to root",
    "Network Activity: outbound connection to rare port",
    "CloudTrail: IAM policy changed",
    "File Integrity: /etc/passwd modified",
    "Kernel Module Loaded",
    "CloudTrail: console login without MFA",
    "Reverse shell detected",
)
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "ap-southeast-2")
DISMISS_REASONS = ("BUSINESS_OP", "COMPANY_POLICY", "MAINTENANCE", "OTHER")


def iso_ms(moment: datetime) -> str:
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


@dataclass
class SimAlert:
    doc: Any  # what the API serves; normally a dict, anything for malformed ones
    created: datetime
    status: str
    visible_at: datetime

    @property
    def id(self) -> Any:
        return self.doc.get("id") if isinstance(self.doc, dict) else None


class AlertFactory:
    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._ids: set[str] = set()
        self.agents = [
            f"{self._rng.getrandbits(32):08x}-{self._rng.getrandbits(16):04x}-"
            f"{self._rng.getrandbits(16):04x}-{self._rng.getrandbits(16):04x}-"
            f"{self._rng.getrandbits(48):012x}"
            for _ in range(12)
        ]
        self.hostnames = {
            agent: f"ip-10-0-{i}-{i * 7 % 250}.ec2.internal" for i, agent in enumerate(self.agents)
        }
        self.rules = [f"{self._rng.getrandbits(96):024x}" for _ in range(20)]
        self.rulesets = [f"{self._rng.getrandbits(96):024x}" for _ in range(4)]

    def new_id(self, created: datetime) -> str:
        """A 24-hex ObjectId whose first 8 hex digits are the creation second (§6.1)."""
        while True:
            candidate = f"{int(created.timestamp()):08x}{self._rng.getrandbits(64):016x}"
            if candidate not in self._ids:
                self._ids.add(candidate)
                return candidate

    def alert(self, created: datetime, status: str = "active") -> dict[str, Any]:
        rng = self._rng
        cloudtrail = rng.random() < 0.2
        dismissed = status == "dismissed"
        doc: dict[str, Any] = {
            "id": self.new_id(created),
            "title": rng.choice(TITLES),
            "dataSource": "cloudtrail" if cloudtrail else "host",
            "createdAt": iso_ms(created),
            "isDismissed": dismissed,
            "dismissedAt": iso_ms(created + timedelta(minutes=rng.randint(1, 600)))
            if dismissed
            else None,
            "dismissReason": rng.choice(DISMISS_REASONS) if dismissed else None,
            "dismissReasonText": "handled in ticket" if dismissed else None,
            "dismissedBy": "analyst@example.com" if dismissed else None,
            "severity": rng.choice((1, 2, 2, 3, 3, 3)),
            "agentId": None if cloudtrail else rng.choice(self.agents),
            "ruleId": rng.choice(self.rules),
            "rulesetId": rng.choice(self.rulesets),
            "aggregates": [{"fieldName": "user", "fieldValue": rng.choice(("root", "ubuntu"))}],
        }
        if cloudtrail:
            doc["region"] = rng.choice(REGIONS)
        return doc

    def spread(
        self, count: int, start: datetime, end: datetime, dismissed_fraction: float = 0.3
    ) -> list[tuple[dict[str, Any], datetime, str]]:
        """``count`` alerts with creation times spread uniformly over [start, end)."""
        span_ms = int((end - start).total_seconds() * 1000)
        out = []
        for _ in range(count):
            created = start + timedelta(milliseconds=self._rng.randrange(max(span_ms, 1)))
            status = "dismissed" if self._rng.random() < dismissed_fraction else "active"
            out.append((self.alert(created, status), created, status))
        return out

    def malformed(self, kind: str, created: datetime) -> dict[str, Any]:
        """One malformed or odd alert of a named kind (issue 3's list)."""
        doc = self.alert(created)
        if kind == "missing_id":
            del doc["id"]
        elif kind == "slash_id":
            doc["id"] = f"{doc['id'][:12]}/{doc['id'][12:]}"
        elif kind == "dotdot_id":
            doc["id"] = f"../{doc['id']}"
        elif kind == "bad_created_at":
            doc["createdAt"] = "yesterday-ish"
        elif kind == "string_severity":
            doc["severity"] = str(doc["severity"])
        elif kind == "empty_strings":
            for name in (
                "dismissedAt",
                "dismissReason",
                "dismissReasonText",
                "dismissedBy",
                "agentId",
            ):
                doc[name] = ""
        else:
            raise ValueError(f"unknown malformed kind {kind!r}")
        return doc
