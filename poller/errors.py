"""The whole exception tree of poller, classified once at each boundary.

    PollerError                      base; ``exit_code`` says how the CLI ends
    ├── ConfigError                  bad configuration or usage (exit 2)
    ├── QueryError                   SQL that DuckDB refused, with its message (exit 2)
    ├── LeaseHeld                    another run holds the lease (exit 75)
    ├── FatalError                   will not get better by retrying (exit 1)
    │   ├── ApiAuthError             Threat Stack 401/403 (credentials, clock, permission)
    │   ├── ApiRequestError          Threat Stack 400/404/other 4xx: our request is wrong
    │   ├── PagingLoop               paging makes no progress (a repeated token, stale pages)
    │   ├── CycleTimeout             a cycle ran past the deadline derived from its work
    │   ├── ArchiveAccessError       S3 AccessDenied, NoSuchBucket, bad credentials
    │   ├── CheckpointConflict       someone else moved the checkpoint under us
    │   ├── LeaseLost                our lease was taken over; we must not commit
    │   ├── UnguardedStore           the store ignores or lacks conditional writes
    │   │   └── ConditionalWritesUnsupported   a conditional header answered 501
    │   ├── StoreUnfit               the store does not keep bodies byte for byte
    │   └── UnreadableState          a lease, checkpoint or revisit state not what poller wrote
    └── RetriableError               transient; retried at the I/O edge, then fatal for the run
        ├── ApiUnavailable           Threat Stack 5xx, timeout, dropped connection
        ├── RateLimited              Threat Stack 429 (carries ``retry_after`` seconds)
        ├── MalformedResponse        200 whose body is not the expected JSON (or fails Hawk)
        └── ArchiveUnavailable       S3 5xx, throttling or network after botocore's retries

    Stopped (a BaseException)        SIGTERM/SIGINT: unwinds a run so ``finally`` releases the lease

Every error raised from a library exception keeps it as ``__cause__``. Messages never
contain secrets: they are built from status codes, keys and our own words only.
"""

from __future__ import annotations


class PollerError(Exception):
    """Base of every error poller raises on purpose."""

    exit_code = 1


class ConfigError(PollerError):
    """Configuration or usage is wrong; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


class QueryError(PollerError):
    """``poller query``: the SQL is wrong; the message is DuckDB's."""

    exit_code = 2


class LeaseHeld(PollerError):
    """Another run holds the single-writer lease; this run did nothing."""

    exit_code = 75


class FatalError(PollerError):
    """An error that retrying will not fix."""


class ApiAuthError(FatalError):
    """401 or 403 from Threat Stack."""


class ApiRequestError(FatalError):
    """Another 4xx from Threat Stack: the request itself is wrong."""


class NotFound(ApiRequestError):
    """404 from Threat Stack: there is no such object (for an alert by id, an answer)."""


class PagingLoop(FatalError):
    """Paging makes no progress (a repeated token, pages with nothing new): refusing to loop."""


class CycleTimeout(FatalError):
    """A cycle ran past its deadline; it stopped, kept its committed chunks, freed the lease."""


class ArchiveAccessError(FatalError):
    """The bucket cannot be used: access denied, no such bucket, bad credentials."""


class CheckpointConflict(FatalError):
    """The checkpoint changed since this run read it: another writer is active."""


class LeaseLost(FatalError):
    """This run's lease was taken over by another run: it must stop writing state."""


class UnguardedStore(FatalError):
    """The S3 store ignores or lacks conditional writes, and the configuration refuses that."""


class ConditionalWritesUnsupported(UnguardedStore):
    """A write with ``If-None-Match``/``If-Match`` was answered 501 NotImplemented (or the
    like): this store lacks conditional writes. Never transient: retrying cannot help."""


class StoreUnfit(FatalError):
    """The store does not keep what poller writes: a body or its content type came back
    changed, or boto3's upload was rejected. Nothing may be archived on it as configured."""


class UnreadableState(FatalError):
    """A lease, checkpoint or revisit state object that is not what poller wrote (not JSON, another
    version, framing): named with its key and what to do, never guessed around."""


class RetriableError(PollerError):
    """A transient failure; retried at the I/O edge."""


class ApiUnavailable(RetriableError):
    """Threat Stack answered 5xx, timed out, or the connection dropped."""


class RateLimited(RetriableError):
    """Threat Stack answered 429."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MalformedResponse(RetriableError):
    """A 200 whose body is not the JSON we expect, or whose Hawk signature does not match."""


class ArchiveUnavailable(RetriableError):
    """S3 failed transiently (5xx, throttling, network) beyond botocore's own retries."""


class Stopped(BaseException):
    """The process was asked to stop (SIGTERM/SIGINT). A BaseException, so that no
    ``except Exception`` swallows it and every ``finally`` (lease release) runs."""
