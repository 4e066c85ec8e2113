"""Object storage with conditional writes: the four primitives archive and state rest on.

``S3ObjectStore`` is the real one (boto3); ``MemoryObjectStore`` is the in-memory fake the
contract tests hold to the same behaviour. botocore errors are classified in exactly one
place, ``classify_s3_error``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import botocore.exceptions

from poller.errors import (
    ArchiveAccessError,
    ArchiveUnavailable,
    ConditionalWritesUnsupported,
    FatalError,
    PollerError,
)
from poller.timeutil import Clock, utc_now

log = logging.getLogger(__name__)

_FRAMING = re.compile(rb"^[0-9a-fA-F]{1,8}(;chunk-signature=[0-9a-f]+)?\r\n")


def looks_like_chunk_framing(body: bytes) -> bool:
    """Whether ``body`` starts as an aws-chunked upload does ("<hex size>\\r\\n...", what a
    store that does not understand that encoding keeps as the object's body)."""
    return bool(_FRAMING.match(body))


class PreconditionFailed(Exception):
    """A conditional write or delete lost: the object is not in the state we required."""


@dataclass(frozen=True)
class StoredObject:
    body: bytes
    etag: str
    last_modified: datetime
    # The server's clock when it answered (the ``Date`` header): with ``last_modified``
    # it tells an object's age without trusting the local clock.
    server_time: datetime
    content_type: str = ""


@dataclass(frozen=True)
class ListedObject:
    """One entry of a listing: enough to tell whether a local copy is current (``etag``)
    and when the object was written (``last_modified``, the server's clock)."""

    key: str
    etag: str
    last_modified: datetime


class ObjectStore(Protocol):
    def get(self, key: str) -> StoredObject | None:
        """The object, or None when there is none."""

    def put(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        retain: bool = False,
        content_type: str = "application/json",
    ) -> str:
        """Write; return the new ETag. Raise PreconditionFailed when a condition does not hold.
        ``retain``: an archived record, to which Object Lock retention applies if configured."""

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete (missing is fine). Raise PreconditionFailed when ``if_match`` does not hold."""

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``."""

    def list_objects(self, prefix: str) -> list[ListedObject]:
        """Every object under ``prefix``, with its ETag and Last-Modified (same requests as
        ``list_keys``: one LIST per 1,000 keys)."""

    def iter_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ListedObject]:
        """``list_objects`` a page (1,000 keys, one LIST) at a time, so memory holds a page;
        with ``start_after``, only the keys after it in S3's order (S3's ``StartAfter``)."""

    def first_key(self, prefix: str) -> str | None:
        """The lowest key under ``prefix`` in S3's (UTF-8 byte) order, in one request."""

    def protection(self) -> BucketProtection:
        """Versioning, Object Lock and default encryption of the bucket."""

    def stored_checksum(self, key: str) -> tuple[bytes, str | None] | None:
        """The body and the SHA-256 checksum S3 stored with it (base64; None when the
        object was written without one), or None when there is no such object."""


# The credentials themselves failed: a rebuilt client (a fresh session re-reads rotated key
# files, a new web identity token) may succeed where this one cannot.
CREDENTIAL_CODES = {
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
}
_ACCESS_CODES = CREDENTIAL_CODES | {
    "AccessDenied",
    "AllAccessDisabled",
    "NoSuchBucket",
    "InvalidBucketName",
    "AuthorizationHeaderMalformed",
    "PermanentRedirect",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",
    "OperationAborted",
}


def classify_s3_error(exc: Exception, what: str) -> PollerError:
    """The one place a botocore error becomes a poller error."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _ACCESS_CODES or status in (301, 403):
            hint = " (the bucket does not exist)" if code == "NoSuchBucket" else ""
            return ArchiveAccessError(f"S3 refused {what}: {code or status}{hint}")
        if code == "NotImplemented" or status == 501:
            # The store lacks a feature the request uses: retrying will not add it.
            return FatalError(f"S3 does not implement {what}: {code or status}")
        if code in _TRANSIENT_CODES or status >= 500 or status == 409:
            return ArchiveUnavailable(f"S3 failed {what}: {code or status}")
        return FatalError(f"S3 rejected {what}: {code or status}")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return ArchiveAccessError(f"no AWS credentials found for {what}")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        # Connection errors, timeouts, bodies cut short: botocore already retried them.
        return ArchiveUnavailable(f"S3 unreachable for {what}: {type(exc).__name__}")
    raise exc


def credentials_failed(exc: BaseException) -> bool:
    """Whether S3 refused the credentials (expired, unknown, wrong secret), or none were found."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) in CREDENTIAL_CODES
    return isinstance(exc, botocore.exceptions.NoCredentialsError)


def _lacks_feature(exc: botocore.exceptions.ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code == "NotImplemented" or status == 501


def _unsupported(header: str, key: str) -> ConditionalWritesUnsupported:
    return ConditionalWritesUnsupported(
        f"this S3 store does not implement {header} (501 NotImplemented writing {key}): it"
        " lacks conditional writes; use a store that has them, or set"
        " s3.require_conditional_writes=false (single writer through the lease alone)"
    )


def _is_precondition_failure(exc: botocore.exceptions.ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412


def _read(response: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    return response, response["Body"].read()


def _server_time(response: dict[str, Any]) -> datetime:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        try:
            return parsedate_to_datetime(date).astimezone(UTC)
        except (TypeError, ValueError):
            pass
    return utc_now()


@dataclass(frozen=True)
class WriteOptions:
    """What every PUT carries: a SHA-256 checksum S3 verifies (a body corrupted on the way
    is rejected, not stored), server-side encryption, storage class; and, on archived
    records only, Object Lock retention."""

    checksums: bool = True
    sse: str = ""
    kms_key_id: str = ""
    storage_class: str = ""
    object_lock_mode: str = ""
    object_lock_days: int = 0

    def arguments(self, retain: bool, now: datetime) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.checksums:
            extra["ChecksumAlgorithm"] = "SHA256"
        if self.sse:
            extra["ServerSideEncryption"] = self.sse
        if self.kms_key_id:
            extra["SSEKMSKeyId"] = self.kms_key_id
        if self.storage_class:
            extra["StorageClass"] = self.storage_class
        if retain and self.object_lock_mode:
            extra["ObjectLockMode"] = self.object_lock_mode
            extra["ObjectLockRetainUntilDate"] = now + timedelta(days=self.object_lock_days)
        return extra


@dataclass(frozen=True)
class BucketProtection:
    """What ``poller check`` says about the bucket as a place for evidence. ``None``: the
    answer was refused (no permission to ask), which is reported, not fatal."""

    versioning: str | None  # "Enabled", "Suspended", "off"
    object_lock: str | None  # "off", "on", or "on, default GOVERNANCE 365 days"
    encryption: str | None  # "off", "AES256", "aws:kms"

    @property
    def evidence_grade(self) -> bool:
        return self.versioning == "Enabled" and bool(self.object_lock) and self.object_lock != "off"


class S3ObjectStore:
    def __init__(
        self,
        client: Any,
        bucket: str,
        options: WriteOptions | None = None,
        clock: Clock = utc_now,
        *,
        conditional_writes: bool = True,
        renew_client: Callable[[], Any] | None = None,
    ) -> None:
        self._client = client
        # Builds a client from a fresh session: called once when S3 refuses the credentials,
        # and the call is retried once with it (rotated keys, expired session tokens).
        self._renew_client = renew_client
        self._renew_lock = threading.Lock()
        self.renewals = 0
        self.bucket = bucket
        self._options = options or WriteOptions()
        self._clock = clock
        # False (s3.require_conditional_writes=false on a store that lacks them): no
        # If-None-Match/If-Match header is ever sent; the conditions are checked by a HEAD
        # just before the write instead, which is not atomic (see README).
        self.conditional_writes = conditional_writes

    def natively(self) -> S3ObjectStore:
        """This store sending the conditional headers whatever the setting (the probe's)."""
        if self.conditional_writes:
            return self
        return S3ObjectStore(
            self._client, self.bucket, self._options, self._clock, renew_client=self._renew_client
        )

    def _call(self, call: Callable[[Any], Any]) -> Any:
        """``call(client)``; when S3 refuses the credentials, once more with a new client."""
        client = self._client
        try:
            return call(client)
        except (botocore.exceptions.ClientError, botocore.exceptions.NoCredentialsError) as exc:
            if self._renew_client is None or not credentials_failed(exc):
                raise
        with self._renew_lock:
            if self._client is client:  # one rebuild for all the calls that failed with it
                self._client = self._renew_client()
                self.renewals += 1
                log.warning("s3.credentials_renewed", extra={"fields": {"renewals": self.renewals}})
        return call(self._client)

    def _current_etag(self, key: str) -> str | None:
        try:
            return str(self._call(lambda c: c.head_object(Bucket=self.bucket, Key=key))["ETag"])
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise classify_s3_error(exc, f"reading {key}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise classify_s3_error(exc, f"reading {key}") from exc

    def _emulate(self, key: str, if_none_match: bool, if_match: str | None) -> None:
        """The conditions, checked by a HEAD (a race can slip between it and the write)."""
        if not if_none_match and if_match is None:
            return
        current = self._current_etag(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(key)
        if if_match is not None and current != if_match:
            raise PreconditionFailed(key)

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r})"

    @property
    def endpoint(self) -> str:
        """The URL requests go to (scheme included: it decides whether boto3 streams
        aws-chunked uploads); part of the store proof's fingerprint."""
        return str(getattr(self._client.meta, "endpoint_url", "") or "")

    def get(self, key: str) -> StoredObject | None:
        try:
            response, body = self._call(lambda c: _read(c.get_object(Bucket=self.bucket, Key=key)))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise classify_s3_error(exc, f"reading {key}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise classify_s3_error(exc, f"reading {key}") from exc
        return StoredObject(
            body=body,
            etag=response["ETag"],
            last_modified=response["LastModified"].astimezone(UTC),
            server_time=_server_time(response),
            content_type=str(response.get("ContentType") or ""),
        )

    def put(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        retain: bool = False,
        content_type: str = "application/json",
    ) -> str:
        conditions: dict[str, Any] = self._options.arguments(retain, self._clock())
        if not self.conditional_writes:
            self._emulate(key, if_none_match, if_match)
        else:
            if if_none_match:
                conditions["IfNoneMatch"] = "*"
            if if_match is not None:
                conditions["IfMatch"] = if_match
        try:
            response = self._call(
                lambda c: c.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType=content_type,
                    **conditions,
                )
            )
        except botocore.exceptions.ClientError as exc:
            if _is_precondition_failure(exc):
                raise PreconditionFailed(key) from exc
            if "IfMatch" in conditions and exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                raise PreconditionFailed(key) from exc
            if _lacks_feature(exc) and ("IfMatch" in conditions or "IfNoneMatch" in conditions):
                header = "If-Match" if "IfMatch" in conditions else "If-None-Match"
                raise _unsupported(header, key) from exc
            raise classify_s3_error(exc, f"writing {key}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise classify_s3_error(exc, f"writing {key}") from exc
        return str(response["ETag"])

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        extra = {"IfMatch": if_match} if if_match is not None else {}
        if not self.conditional_writes and extra:
            current = self._current_etag(key)
            if current is None:
                return
            if current != if_match:
                raise PreconditionFailed(key)
            extra = {}
        try:
            self._call(lambda c: c.delete_object(Bucket=self.bucket, Key=key, **extra))
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                return
            if _is_precondition_failure(exc):
                raise PreconditionFailed(key) from exc
            if _lacks_feature(exc) and extra:
                raise _unsupported("If-Match", key) from exc
            raise classify_s3_error(exc, f"deleting {key}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise classify_s3_error(exc, f"deleting {key}") from exc

    def list_keys(self, prefix: str) -> list[str]:
        def listing(client: Any) -> list[str]:
            keys: list[str] = []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []))
            return keys

        try:
            return list(self._call(listing))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise classify_s3_error(exc, f"listing {prefix}") from exc

    def list_objects(self, prefix: str) -> list[ListedObject]:
        def listing(client: Any) -> list[ListedObject]:
            found: list[ListedObject] = []
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                found.extend(
                    ListedObject(item["Key"], item["ETag"], item["LastModified"].astimezone(UTC))
                    for item in page.get("Contents", [])
                )
            return found

        try:  # through _call, as every request: a rotated key is picked up here too
            return list(self._call(listing))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise classify_s3_error(exc, f"listing {prefix}") from exc

    def iter_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ListedObject]:
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            arguments["StartAfter"] = start_after
        while True:
            try:
                asked = dict(arguments)
                page = self._call(lambda c: c.list_objects_v2(**asked))  # noqa: B023
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                raise classify_s3_error(exc, f"listing {prefix}") from exc
            for item in page.get("Contents", []):
                yield ListedObject(item["Key"], item["ETag"], item["LastModified"].astimezone(UTC))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            arguments["ContinuationToken"] = token

    def first_key(self, prefix: str) -> str | None:
        try:
            page = self._call(
                lambda c: c.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise classify_s3_error(exc, f"listing {prefix}") from exc
        contents = page.get("Contents") or []
        return str(contents[0]["Key"]) if contents else None

    def stored_checksum(self, key: str) -> tuple[bytes, str | None] | None:
        try:
            response, body = self._call(
                lambda c: _read(c.get_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"))
            )
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise classify_s3_error(exc, f"reading {key}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise classify_s3_error(exc, f"reading {key}") from exc
        return body, response.get("ChecksumSHA256")

    def protection(self) -> BucketProtection:
        """Versioning, Object Lock and default encryption of the bucket, as far as we may ask."""

        def ask(call: Callable[[], Any], absent: tuple[str, ...]) -> Any:
            try:
                return call()
            except botocore.exceptions.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in absent:
                    return {}
                return None
            except botocore.exceptions.BotoCoreError:
                return None

        versioning = ask(
            lambda: self._call(lambda c: c.get_bucket_versioning(Bucket=self.bucket)), ()
        )
        lock = ask(
            lambda: self._call(lambda c: c.get_object_lock_configuration(Bucket=self.bucket)),
            ("ObjectLockConfigurationNotFoundError",),
        )
        encryption = ask(
            lambda: self._call(lambda c: c.get_bucket_encryption(Bucket=self.bucket)),
            ("ServerSideEncryptionConfigurationNotFoundError",),
        )
        return BucketProtection(
            None if versioning is None else versioning.get("Status") or "off",
            None if lock is None else _lock_text(lock),
            None if encryption is None else _encryption_text(encryption),
        )


def _lock_text(response: dict[str, Any]) -> str:
    config = response.get("ObjectLockConfiguration") or {}
    if config.get("ObjectLockEnabled") != "Enabled":
        return "off"
    retention = (config.get("Rule") or {}).get("DefaultRetention") or {}
    if retention:
        amount = retention.get("Days") or retention.get("Years")
        unit = "days" if retention.get("Days") else "years"
        return f"on, default {retention.get('Mode')} {amount} {unit}"
    return "on"


def _encryption_text(response: dict[str, Any]) -> str:
    rules = (response.get("ServerSideEncryptionConfiguration") or {}).get("Rules") or []
    for rule in rules:
        default = rule.get("ApplyServerSideEncryptionByDefault") or {}
        if default.get("SSEAlgorithm"):
            return str(default["SSEAlgorithm"])
    return "off"


class MemoryObjectStore:
    """An in-memory store with S3's conditional-write semantics (for tests and fakes)."""

    def __init__(self, clock: Clock = utc_now) -> None:
        self._clock = clock
        self._objects: dict[str, StoredObject] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self._version = 0
        self.ignore_conditions = False  # behave like a store that drops the headers
        self.lacks_if_match = False  # behave like a store that answers If-Match with 501
        self.list_page = 1000  # keys per counted request of iter_objects, as S3's LIST

    def get(self, key: str) -> StoredObject | None:
        with self._lock:
            self.requests += 1
            found = self._objects.get(key)
            if found is None:
                return None
            return StoredObject(
                found.body, found.etag, found.last_modified, self._clock(), "application/json"
            )

    def put(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        retain: bool = False,
        content_type: str = "application/json",
    ) -> str:
        with self._lock:
            self.requests += 1
            current = self._objects.get(key)
            if self.lacks_if_match and if_match is not None:
                raise _unsupported("If-Match", key)
            if not self.ignore_conditions:
                if if_none_match and current is not None:
                    raise PreconditionFailed(key)
                if if_match is not None and (current is None or current.etag != if_match):
                    raise PreconditionFailed(key)
            now = self._clock()
            self._version += 1
            digest = hashlib.md5(body + str(self._version).encode(), usedforsecurity=False)
            etag = f'"{digest.hexdigest()}"'
            self._objects[key] = StoredObject(body, etag, now.replace(microsecond=0), now)
            return etag

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        with self._lock:
            self.requests += 1
            current = self._objects.get(key)
            if current is None:
                return
            if if_match is not None and current.etag != if_match and not self.ignore_conditions:
                raise PreconditionFailed(key)
            del self._objects[key]

    def list_keys(self, prefix: str) -> list[str]:
        with self._lock:
            self.requests += 1
            return sorted(k for k in self._objects if k.startswith(prefix))

    def list_objects(self, prefix: str) -> list[ListedObject]:
        with self._lock:
            self.requests += 1
            return [
                ListedObject(key, found.etag, found.last_modified)
                for key, found in sorted(self._objects.items())
                if key.startswith(prefix)
            ]

    def iter_objects(self, prefix: str, start_after: str | None = None) -> Iterator[ListedObject]:
        found = [
            item for item in self.list_objects(prefix) if not start_after or item.key > start_after
        ]  # list_objects counted the first page
        with self._lock:
            self.requests += max(0, -(-len(found) // self.list_page) - 1)
        yield from found

    def first_key(self, prefix: str) -> str | None:
        with self._lock:
            self.requests += 1
            keys = sorted(k for k in self._objects if k.startswith(prefix))
            return keys[0] if keys else None

    def protection(self) -> BucketProtection:
        return BucketProtection("off", "off", "off")

    def stored_checksum(self, key: str) -> tuple[bytes, str | None] | None:
        found = self.get(key)
        return None if found is None else (found.body, None)

    def snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return {key: obj.body for key, obj in self._objects.items()}


class RequestCounter:
    """Counts every HTTP request the boto3 clients it is attached to send (retries included);
    calling it reads the count. A renewed client is attached too, so the count goes on."""

    def __init__(self) -> None:
        self._sent = 0
        self._lock = threading.Lock()

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.s3", self._on_send)
        return client

    def _on_send(self, **_: Any) -> None:
        with self._lock:
            self._sent += 1

    def __call__(self) -> int:
        return self._sent


def count_requests(client: Any) -> RequestCounter:
    """A counter attached to ``client``: calling it reads the count."""
    counter = RequestCounter()
    counter.attach(client)
    return counter
