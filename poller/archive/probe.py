"""Prove the store before the first write: it keeps bodies byte for byte, and it honours
both conditional writes the archive, the checkpoint and the lease rest on.

Four findings, each reported by ``poller check`` as its own line with its fix:

- ``write``: a probe object is accepted as boto3 sends it (over TLS: ``aws-chunked`` with a
  checksum trailer since boto3 1.36; some stores reject that).
- ``read_back``: it reads back with the same bytes and ``Content-Type`` (some stores keep the
  aws-chunked framing as the body; create-only would then keep every corrupted record).
- ``create_only``: a second ``If-None-Match: *`` write of it is refused (412).
- ``compare_and_swap``: an ``If-Match`` with a wrong ETag is refused (412), one with the
  right ETag succeeds.

The probe object is ``P/_poller/probe/<run id>``, written without retention and deleted at
the end. A proof is recorded at ``P/_poller/probe/proof.json`` with a fingerprint of what
decides the transport (botocore's version, the write options): a process that finds a
matching proof under a day old (by S3's clock) trusts it for one GET instead of six
requests, so a CronJob every five minutes proves the store about once a day.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import botocore

from poller import __version__
from poller.archive.records import Layout
from poller.archive.store import (
    ObjectStore,
    PreconditionFailed,
    WriteOptions,
    looks_like_chunk_framing,
)
from poller.errors import (
    ArchiveAccessError,
    ArchiveUnavailable,
    ConditionalWritesUnsupported,
    PollerError,
    StoreUnfit,
    UnguardedStore,
)
from poller.timeutil import iso_z

PROOF_VERSION = 1
PROOF_MAX_AGE = timedelta(days=1)
CONTENT_TYPE = "application/json"

FIX_CHECKSUMS = (
    "set s3.checksums=false (POLLER_S3__CHECKSUMS=false): boto3 then sends plain uploads"
    " with no checksum, which this store understands; or use a store that supports"
    " aws-chunked uploads with checksum trailers"
)
FIX_CONDITIONS = (
    "use a store that honours conditional writes (AWS S3, or a recent MinIO, Ceph RGW,"
    " Cloudflare R2), or set s3.require_conditional_writes=false: single-writer safety then"
    " rests on the lease alone (see README, S3-compatible stores)"
)
FINDINGS = ("write", "read_back", "create_only", "compare_and_swap")


@dataclass(frozen=True)
class Finding:
    name: str  # one of FINDINGS
    ok: bool
    detail: str  # "ok", or what the store did
    fix: str = ""


@dataclass(frozen=True)
class StoreProof:
    findings: tuple[Finding, ...]
    recorded_at: str | None = None  # when a recorded proof was made; None: made now

    def finding(self, name: str) -> Finding | None:
        return next((f for f in self.findings if f.name == name), None)

    @property
    def keeps_bodies(self) -> bool:
        return all(f.ok for f in self.findings if f.name in ("write", "read_back"))

    @property
    def conditional_writes(self) -> bool:
        return all(f.ok for f in self.findings if f.name in ("create_only", "compare_and_swap"))

    def refusal(self, require_conditional_writes: bool) -> PollerError | None:
        """Why nothing may be archived on this store as configured, or None."""
        for finding in self.findings:
            if finding.ok:
                continue
            if finding.name in ("write", "read_back"):
                return StoreUnfit(f"this S3 store {finding.detail}; fix: {finding.fix}")
            if require_conditional_writes:
                return UnguardedStore(f"this S3 store {finding.detail}; fix: {finding.fix}")
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "recorded_at": self.recorded_at,
            "findings": [asdict(f) for f in self.findings],
        }


def fingerprint(options: WriteOptions, require_conditional_writes: bool, endpoint: str = "") -> str:
    """What decides how bytes travel and which headers go: a proof holds only for it. The
    endpoint too: over plain HTTP boto3 never streams aws-chunked, over HTTPS it does, and a
    bucket reached through another endpoint (a TLS gateway) is another transport."""
    facts = {
        "botocore": botocore.__version__,
        "endpoint": endpoint,
        "poller": __version__,
        "options": asdict(options),
        "require_conditional_writes": require_conditional_writes,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def prove_store(store: ObjectStore, layout: Layout, run_id: str, checksums: bool) -> StoreProof:
    """Run the four findings on a probe object (``store`` must send the conditional headers
    natively). Raises only access and transient errors (the bucket cannot be reached);
    what the store does wrong is a failed finding."""
    key = f"{layout.probe_key}/{run_id}"
    body = json.dumps({"probe": run_id, "note": "written by poller; deleted at once"}).encode()
    findings: list[Finding] = []
    try:
        try:
            etag = store.put(key, body)
        except (ArchiveAccessError, ArchiveUnavailable):
            raise
        except PollerError as exc:
            what = "rejected boto3's upload" + (
                " (aws-chunked with a checksum trailer, boto3's default over HTTPS)"
                if checksums
                else ""
            )
            fix = FIX_CHECKSUMS if checksums else "use a store that accepts plain PutObject"
            findings.append(Finding("write", False, f"{what}: {exc}", fix))
            return StoreProof(tuple(findings))
        findings.append(Finding("write", True, "ok"))
        findings.append(_read_back(store, key, body, checksums))
        create_only, etag = _create_only(store, key, body, etag)
        findings.append(create_only)
        findings.append(_compare_and_swap(store, key, body, etag))
    finally:
        with contextlib.suppress(PollerError):
            store.delete(key)
    return StoreProof(tuple(findings))


def _read_back(store: ObjectStore, key: str, body: bytes, checksums: bool) -> Finding:
    stored = store.get(key)
    if stored is None:
        return Finding("read_back", False, "lost the probe object just written", FIX_CONDITIONS)
    if stored.body != body:
        framing = (
            " (it kept boto3's aws-chunked framing as the body)"
            if looks_like_chunk_framing(stored.body)
            else ""
        )
        detail = (
            f"changed the body on the way in: {len(body)} bytes written,"
            f" {len(stored.body)} read back{framing}"
        )
        fix = FIX_CHECKSUMS if checksums else "use a store that keeps bodies byte for byte"
        return Finding("read_back", False, detail, fix)
    if stored.content_type and stored.content_type != CONTENT_TYPE:
        detail = f"changed the content type: {CONTENT_TYPE} written, {stored.content_type} read"
        return Finding("read_back", False, detail, "use a store that keeps Content-Type")
    return Finding("read_back", True, "ok")


def _create_only(store: ObjectStore, key: str, body: bytes, etag: str) -> tuple[Finding, str]:
    """The finding, and the probe object's ETag after it (a store that ignored the
    condition wrote a new version)."""
    try:
        etag = store.put(key, body, if_none_match=True)
    except PreconditionFailed:
        return Finding("create_only", True, "ok"), etag
    except ConditionalWritesUnsupported:
        detail = "does not implement If-None-Match (501 NotImplemented)"
        return Finding("create_only", False, detail, FIX_CONDITIONS), etag
    except (ArchiveAccessError, ArchiveUnavailable):
        raise
    except PollerError as exc:
        detail = f"rejects If-None-Match: {exc}"
        return Finding("create_only", False, detail, FIX_CONDITIONS), etag
    detail = "ignores If-None-Match: a create-only write overwrote an existing object"
    return Finding("create_only", False, detail, FIX_CONDITIONS), etag


def _compare_and_swap(store: ObjectStore, key: str, body: bytes, etag: str) -> Finding:
    try:
        try:
            store.put(key, body, if_match='"0123456789abcdef0123456789abcdef"')
        except PreconditionFailed:
            pass
        else:
            detail = "ignores If-Match: a write with a wrong ETag replaced the object"
            return Finding("compare_and_swap", False, detail, FIX_CONDITIONS)
        try:
            store.put(key, body, if_match=etag)
        except PreconditionFailed:
            detail = "refuses If-Match with the object's own ETag"
            return Finding("compare_and_swap", False, detail, FIX_CONDITIONS)
    except ConditionalWritesUnsupported:
        detail = "does not implement If-Match (501 NotImplemented)"
        return Finding("compare_and_swap", False, detail, FIX_CONDITIONS)
    except (ArchiveAccessError, ArchiveUnavailable):
        raise
    except PollerError as exc:
        return Finding("compare_and_swap", False, f"rejects If-Match: {exc}", FIX_CONDITIONS)
    return Finding("compare_and_swap", True, "ok")


def proof_key(layout: Layout) -> str:
    return f"{layout.probe_key}/proof.json"


def recorded_proof(store: ObjectStore, layout: Layout, print_: str) -> StoreProof | None:
    """A proof recorded under a day ago (S3's clock) for this fingerprint, or None."""
    stored = store.get(proof_key(layout))
    if stored is None or stored.server_time - stored.last_modified > PROOF_MAX_AGE:
        return None
    try:
        document = json.loads(stored.body)
        if document.get("version") != PROOF_VERSION or document.get("fingerprint") != print_:
            return None
        findings = tuple(Finding(**item) for item in document["findings"])
        proven_at = str(document["proven_at"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # ours to overwrite: a proof that does not read is no proof
    # Each of the four findings, once, as written: a proof missing one (or with an "ok" that
    # is not a boolean) would pass for a store that nothing proved.
    if tuple(f.name for f in findings) != FINDINGS or not all(
        isinstance(f.ok, bool) and isinstance(f.detail, str) and isinstance(f.fix, str)
        for f in findings
    ):
        return None
    return StoreProof(findings, proven_at)


def record_proof(
    store: ObjectStore, layout: Layout, print_: str, proof: StoreProof, run_id: str, now: Any
) -> None:
    document = {
        "version": PROOF_VERSION,
        "fingerprint": print_,
        "proven_at": iso_z(now),
        "proven_by": run_id,
        "findings": [asdict(f) for f in proof.findings],
    }
    store.put(proof_key(layout), json.dumps(document, sort_keys=True).encode())
