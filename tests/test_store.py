"""botocore errors are classified in one place; S3ObjectStore maps them (moto's mock_aws)."""

from __future__ import annotations

from typing import Any

import boto3
import botocore.exceptions
import pytest
from moto import mock_aws

from poller.archive.store import S3ObjectStore, classify_s3_error, count_requests
from poller.errors import ArchiveAccessError, ArchiveUnavailable, FatalError


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error("AccessDenied", 403), ArchiveAccessError),
        (client_error("NoSuchBucket", 404), ArchiveAccessError),
        (client_error("InvalidAccessKeyId", 403), ArchiveAccessError),
        (client_error("SignatureDoesNotMatch", 403), ArchiveAccessError),
        (client_error("SlowDown", 503), ArchiveUnavailable),
        (client_error("InternalError", 500), ArchiveUnavailable),
        (client_error("RequestTimeout", 400), ArchiveUnavailable),
        (client_error("ConditionalRequestConflict", 409), ArchiveUnavailable),
        (client_error("InvalidArgument", 400), FatalError),
        (client_error("NotImplemented", 501), FatalError),  # a missing feature, not transient
        (botocore.exceptions.NoCredentialsError(), ArchiveAccessError),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), ArchiveUnavailable),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), ArchiveUnavailable),
    ],
)
def test_botocore_errors_are_classified(error: Exception, expected: type):
    classified = classify_s3_error(error, "writing k")
    assert type(classified) is expected
    assert "writing k" in str(classified)


def test_anything_else_is_not_swallowed():
    with pytest.raises(KeyError):
        classify_s3_error(KeyError("bug"), "writing k")


@mock_aws
def test_missing_bucket_is_an_access_error_with_its_code():
    store = S3ObjectStore(boto3.client("s3", region_name="us-east-1"), "nope")
    with pytest.raises(ArchiveAccessError, match="NoSuchBucket"):
        store.put("k", b"{}", if_none_match=True)
    with pytest.raises(ArchiveAccessError, match="NoSuchBucket"):
        store.get("k")


@mock_aws
def test_requests_are_counted_and_objects_are_json():
    client: Any = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket="bkt")
    sent = count_requests(client)
    store = S3ObjectStore(client, "bkt")
    store.put("k", b"{}", if_none_match=True)
    assert store.get("k") is not None
    assert store.get("missing") is None
    assert sent() == 3
    assert client.head_object(Bucket="bkt", Key="k")["ContentType"] == "application/json"


class RefusingClient:
    """A client whose credentials S3 refuses (ExpiredToken) on every call."""

    def __init__(self) -> None:
        self.calls = 0

    def put_object(self, **_: Any) -> Any:
        self.calls += 1
        raise client_error("ExpiredToken", 400)


@mock_aws
def test_refused_credentials_rebuild_the_client_once_and_retry_the_call():
    fresh: Any = boto3.client("s3", region_name="us-east-1")
    fresh.create_bucket(Bucket="bkt")
    stale = RefusingClient()
    built: list[Any] = []

    def renew() -> Any:
        built.append(fresh)
        return fresh

    store = S3ObjectStore(stale, "bkt", renew_client=renew)
    store.put("k", b"{}", if_none_match=True)
    assert (stale.calls, len(built), store.renewals) == (1, 1, 1)
    assert store.get("k") is not None  # the new client is kept


def test_credentials_that_keep_failing_are_an_access_error_after_one_renewal():
    clients = [RefusingClient(), RefusingClient()]
    store = S3ObjectStore(clients[0], "bkt", renew_client=lambda: clients[1])
    with pytest.raises(ArchiveAccessError, match="ExpiredToken"):
        store.put("k", b"{}")
    assert [c.calls for c in clients] == [1, 1] and store.renewals == 1


def test_without_a_way_to_renew_the_error_is_classified_at_once():
    client = RefusingClient()
    with pytest.raises(ArchiveAccessError, match="ExpiredToken"):
        S3ObjectStore(client, "bkt").put("k", b"{}")
    assert client.calls == 1


@mock_aws
def test_iter_objects_starts_after_a_key_and_matches_the_memory_store():
    from poller.archive.store import MemoryObjectStore

    client: Any = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket="bkt")
    real, memory = S3ObjectStore(client, "bkt"), MemoryObjectStore()
    keys = ["i/2026/11/01/23/a1b2", "i/2026/11/02/00/c3d4", "i/2026/11/02/01/e5f6", "j/x"]
    for store in (real, memory):
        for key in keys:
            store.put(key, b"{}")
    for store in (real, memory):
        assert [o.key for o in store.iter_objects("i/")] == keys[:3]
        assert [o.key for o in store.iter_objects("i/", "i/2026/11/02/00")] == keys[1:3]


class PagingClient:
    """list_objects_v2 in pages of two keys, as S3 pages a listing."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.asked = keys, []

    def list_objects_v2(self, **arguments: Any) -> Any:
        from datetime import UTC, datetime

        self.asked.append(arguments)
        start = int(arguments.get("ContinuationToken", "0"))
        page = self.keys[start : start + 2]
        more = start + 2 < len(self.keys)
        stamp = datetime(2026, 11, 1, tzinfo=UTC)
        return {
            "Contents": [{"Key": k, "ETag": '"e"', "LastModified": stamp} for k in page],
            "IsTruncated": more,
            **({"NextContinuationToken": str(start + 2)} if more else {}),
        }


def test_iter_objects_asks_for_the_next_page_only_when_the_caller_gets_there():
    client = PagingClient([f"k{n}" for n in range(5)])
    listing = S3ObjectStore(client, "bkt").iter_objects("k", "k")
    assert [next(listing).key for _ in range(3)] == ["k0", "k1", "k2"]
    assert len(client.asked) == 2  # a page at a time: memory holds one page
    assert [o.key for o in listing] == ["k3", "k4"]
    assert [a.get("ContinuationToken") for a in client.asked] == [None, "2", "4"]
    assert all(a["StartAfter"] == "k" and a["Prefix"] == "k" for a in client.asked)
