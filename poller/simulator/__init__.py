"""A local Threat Stack v2 API for tests, the benchmark and the demo.

Behaves as far as ``threatstack-api.md`` knows the real API: Hawk verification (a wrong MAC,
a wrong organisation, a stale timestamp or a replayed nonce get 401) and signed responses;
``/v2/alerts`` with ``status`` (required), ``from``/``until`` (UTC, ``from`` inclusive,
``until`` exclusive), token paging at 100 per page; ``/v2/alerts/{id}``,
``/v2/alerts/{id}/events``, ``/v2/agents/{id}``, ``/help/hawk/self-test``, and
``POST /v2/alerts/dismiss`` (by ids or by query; ``Simulator.dismiss`` does the same from
Python), which moves an alert to the dismissed list with its dismissal fields set. Alerts may become
visible some time after their ``createdAt``. Faults can be switched on at start or while it
runs (``Faults``). Every request is counted. Deterministic from a seed.
"""

from poller.simulator.alerts import AlertFactory, SimAlert
from poller.simulator.server import Credentials, Faults, RequestRecord, Simulator

__all__ = ["AlertFactory", "Credentials", "Faults", "RequestRecord", "SimAlert", "Simulator"]
