"""Settings: a frozen, typed object, loaded from defaults < config file < environment < flags.

Every value remembers where it came from, so a bad one is reported with its key and its
source; all problems are collected and reported at once (``ConfigError``, exit 2).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from poller.errors import ConfigError
from poller.timeutil import parse_instant, utc_now


class Secret:
    """A string that never shows itself in ``repr``, ``str``, logs or exceptions."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ThreatStackSettings:
    base_url: str = "https://api.threatstack.com"
    user_id: str = ""
    org_id: str = ""
    api_key: Secret = field(default_factory=lambda: Secret(""))
    statuses: tuple[str, ...] = ("active", "dismissed")
    requests_per_minute: int = 100
    timeout_seconds: float = 30.0
    # A whole request (connect, headers, body) ends within this, however slowly the body
    # trickles in; and no body may be larger than this.
    request_deadline_seconds: float = 120.0
    max_response_bytes: int = 16 * 1024 * 1024
    max_attempts: int = 8
    max_retry_seconds: float = 600.0
    verify_responses: bool = True


@dataclass(frozen=True)
class S3Settings:
    bucket: str = ""
    prefix: str = ""
    max_concurrency: int = 16
    max_attempts: int = 8
    require_conditional_writes: bool = True
    # The archive as evidence: every object carries an S3-verified SHA-256 checksum, and
    # these apply to every object poller writes (retention: to archived records only).
    checksums: bool = True
    sse: str = ""  # "", "AES256" (SSE-S3) or "aws:kms" (SSE-KMS)
    kms_key_id: str = ""
    storage_class: str = ""  # "": the bucket's default (STANDARD)
    object_lock_mode: str = ""  # "", "GOVERNANCE" or "COMPLIANCE"
    object_lock_days: int = 0


@dataclass(frozen=True)
class SyncSettings:
    interval_seconds: int = 300
    lookback_seconds: int = 900
    settle_seconds: int = 60
    first_run_since: str = "24h"
    lease_ttl_seconds: int = 120
    max_window_seconds: int = 86_400
    max_cycle_seconds: int = 0  # 0: derived from the cycle's work (see poller.walks.sync)


@dataclass(frozen=True)
class ReceiverSettings:
    """The push path (see poller.serving.receiver): off while ``token`` is unset."""

    token: Secret = field(default_factory=lambda: Secret(""))
    # A second push token accepted beside ``token`` during a rotation (see README).
    previous_token: Secret = field(default_factory=lambda: Secret(""))
    # The read-back routes' secret; unset: they are off (the push token never reads).
    read_token: Secret = field(default_factory=lambda: Secret(""))
    path: str = "/api/v1/s3/alert"
    # 0: the push routes share the daemon's http.port listener; else their own listener,
    # so a flood of the push port never reaches /healthz, /readyz and /metrics.
    port: int = 0
    allow_cidrs: tuple[str, ...] = ()  # empty: any source
    # Proxies (an ingress) whose X-Forwarded-For names the real sender; empty: none.
    trusted_proxies: tuple[str, ...] = ()
    # SNS topics whose subscription confirmations are confirmed; others are only logged.
    sns_topics: tuple[str, ...] = ()
    max_body_bytes: int = 1024 * 1024  # after decompression too
    max_header_bytes: int = 16 * 1024
    threads: int = 8  # workers: each runs one whole, already-read request at a time
    connection_limit: int = 100  # open connections per listener
    timeout_seconds: float = 10.0  # a request must arrive whole within this
    idle_timeout_seconds: float = 60.0  # a connection silent this long is closed
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass(frozen=True)
class HttpSettings:
    host: str = "0.0.0.0"  # noqa: S104 - SPEC default; the daemon serves health checks
    port: int = 8080


@dataclass(frozen=True)
class LogSettings:
    format: str = "auto"
    level: str = "INFO"
    progress_seconds: float = 30.0  # cadence of walk.progress events in long walks


@dataclass(frozen=True)
class Settings:
    threatstack: ThreatStackSettings = field(default_factory=ThreatStackSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)
    receiver: ReceiverSettings = field(default_factory=ReceiverSettings)


# ---------------------------------------------------------------- value parsers
# Each takes the raw value (a YAML scalar/list, or an environment string) and returns the
# typed value or raises ValueError with a short reason.


def _int(low: int, high: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError("expected an integer")
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _float(low: float, high: float) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _text(raw: Any) -> str:
    if isinstance(raw, (dict, list)):
        raise ValueError("expected a string")
    return "" if raw is None else str(raw).strip()


def _secret(raw: Any) -> Secret:
    if isinstance(raw, (dict, list)):
        raise ValueError("expected a string")
    return Secret("" if raw is None else str(raw).strip())


def _url(raw: Any) -> str:
    text = _text(raw).rstrip("/")
    parts = urlparse(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {text!r}")
    return text


def _statuses(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    values = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not values:
        raise ValueError("at least one status is needed")
    unknown = [v for v in values if v not in ("active", "dismissed")]
    if unknown:
        raise ValueError(f"statuses are active and dismissed, got {unknown}")
    return values


def _prefix(raw: Any) -> str:
    text = _text(raw).strip("/")
    if text and not re.fullmatch(r"[A-Za-z0-9!_.*'()\-/]+", text):
        raise ValueError(f"prefix has characters unsafe in an S3 key: {text!r}")
    if "//" in text or any(part in (".", "..") for part in text.split("/")):
        raise ValueError(f"prefix has an empty, '.' or '..' segment: {text!r}")
    return text


def _since(raw: Any) -> str:
    text = _text(raw)
    parse_instant(text, utc_now())  # raises ValueError with a clear reason
    return text


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = _text(raw).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return text

    return parse


def _exact(*choices: str) -> Callable[[Any], str]:
    """One of ``choices``, spelled as AWS spells it."""

    def parse(raw: Any) -> str:
        text = _text(raw)
        if text not in choices:
            shown = ", ".join(repr(c) if c else '"" (off)' for c in choices)
            raise ValueError(f"expected one of {shown}, got {raw!r}")
        return text

    return parse


def _path(raw: Any) -> str:
    text = _text(raw).rstrip("/")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", text):
        raise ValueError(f"expected a URL path like /api/v1/s3/alert, got {raw!r}")
    return text


def _topic_arns(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    topics = tuple(str(i).strip() for i in items if str(i).strip())
    for topic in topics:
        if not re.fullmatch(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_.-]+", topic):
            raise ValueError(f"not an SNS topic ARN: {topic!r}")
    return topics


def _cidrs(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    networks = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"not an IP network: {item!r}") from None
    return tuple(networks)


def _level(raw: Any) -> str:
    return _choice("debug", "info", "warning", "error")(raw).upper()


PARSERS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "threatstack": {
        "base_url": _url,
        "user_id": _text,
        "org_id": _text,
        "api_key": _secret,
        "statuses": _statuses,
        "requests_per_minute": _int(1, 100_000),
        "timeout_seconds": _float(0.1, 600),
        "request_deadline_seconds": _float(1, 3600),
        "max_response_bytes": _int(1024, 1024**3),
        "max_attempts": _int(1, 100),
        "max_retry_seconds": _float(0, 86_400),
        "verify_responses": _bool,
    },
    "s3": {
        "bucket": _text,
        "prefix": _prefix,
        "max_concurrency": _int(1, 256),
        "max_attempts": _int(1, 50),
        "require_conditional_writes": _bool,
        "checksums": _bool,
        "sse": _exact("", "AES256", "aws:kms"),
        "kms_key_id": _text,
        "storage_class": _exact(
            "",
            "STANDARD",
            "STANDARD_IA",
            "ONEZONE_IA",
            "INTELLIGENT_TIERING",
            "GLACIER_IR",
            "GLACIER",
            "DEEP_ARCHIVE",
            "REDUCED_REDUNDANCY",
        ),
        "object_lock_mode": _exact("", "GOVERNANCE", "COMPLIANCE"),
        "object_lock_days": _int(0, 36_500),
    },
    "sync": {
        "interval_seconds": _int(1, 86_400),
        "lookback_seconds": _int(0, 30 * 86_400),
        "settle_seconds": _int(0, 86_400),
        "first_run_since": _since,
        "lease_ttl_seconds": _int(3, 86_400),
        "max_window_seconds": _int(60, 366 * 86_400),
        "max_cycle_seconds": _int(0, 30 * 86_400),
    },
    "http": {"host": _text, "port": _int(0, 65_535)},
    "receiver": {
        "token": _secret,
        "previous_token": _secret,
        "read_token": _secret,
        "path": _path,
        "port": _int(0, 65_535),
        "allow_cidrs": _cidrs,
        "trusted_proxies": _cidrs,
        "sns_topics": _topic_arns,
        "max_body_bytes": _int(1024, 64 * 1024 * 1024),
        "max_header_bytes": _int(1024, 1024 * 1024),
        "threads": _int(1, 256),
        "connection_limit": _int(2, 10_000),
        "timeout_seconds": _float(0.5, 300),
        "idle_timeout_seconds": _float(1, 3600),
        "tls_cert_file": _text,
        "tls_key_file": _text,
    },
    "log": {
        "format": _choice("auto", "json", "text"),
        "level": _level,
        "progress_seconds": _float(0, 86_400),
    },
}

SECTIONS: dict[str, type] = {
    "threatstack": ThreatStackSettings,
    "s3": S3Settings,
    "sync": SyncSettings,
    "http": HttpSettings,
    "log": LogSettings,
    "receiver": ReceiverSettings,
}

# The names the old webhook receiver and the vendor's examples use (SPEC "Configuration").
LEGACY_ENV: dict[str, tuple[str, str]] = {
    "THREATSTACK_BASE_URL": ("threatstack", "base_url"),
    "THREATSTACK_USER_ID": ("threatstack", "user_id"),
    "THREATSTACK_ORG_ID": ("threatstack", "org_id"),
    "THREATSTACK_API_KEY": ("threatstack", "api_key"),
    "TS_AWS_S3_BUCKET": ("s3", "bucket"),
    "TS_AWS_S3_PREFIX": ("s3", "prefix"),
}
FILE_ENV = ("THREATSTACK_USER_ID", "THREATSTACK_ORG_ID", "THREATSTACK_API_KEY")
# Secrets whose POLLER_SECTION__KEY_FILE form names a file (Kubernetes secret mounts).
SECRET_KEYS = {"receiver": ("token", "previous_token", "read_token")}

# What each command needs before it may start.
REQUIRED_API = (("threatstack", "user_id"), ("threatstack", "org_id"), ("threatstack", "api_key"))
REQUIRED_S3 = (("s3", "bucket"),)

Key = tuple[str, str]


@dataclass
class _Raw:
    value: Any
    source: str


def default_config_path(environ: Mapping[str, str]) -> Path | None:
    """``$POLLER_CONFIG``, else ``./config.yaml`` if it exists, else none."""
    if environ.get("POLLER_CONFIG"):
        return Path(environ["POLLER_CONFIG"])
    local = Path("config.yaml")
    return local if local.is_file() else None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, never the text around it: the failing line may hold a secret."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return type(exc).__name__


def _from_file(path: Path, raw: dict[Key, _Raw], problems: list[str]) -> None:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"config file {path}: cannot read it ({exc.strerror or exc})")
        return
    except UnicodeDecodeError as exc:
        problems.append(f"config file {path}: not UTF-8 text (byte {exc.start})")
        return
    except yaml.YAMLError as exc:
        problems.append(f"config file {path}: not valid YAML: {_yaml_problem(exc)}")
        return
    if document is None:
        return
    if not isinstance(document, dict):
        problems.append(f"config file {path}: the top level must be a mapping of sections")
        return
    for section, keys in document.items():
        if section not in PARSERS:
            problems.append(f"{section}: unknown section (from {path})")
            continue
        if keys is None:
            continue
        if not isinstance(keys, dict):
            problems.append(f"{section}: must be a mapping of keys (from {path})")
            continue
        for key, value in keys.items():
            if key not in PARSERS[section]:
                problems.append(f"{section}.{key}: unknown key (from {path})")
                continue
            raw[(section, key)] = _Raw(value, f"config file {path}")


def _read_secret_file(name: str, path: str, problems: list[str]) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{name}: cannot read file {path} ({exc.strerror or exc})")
    except UnicodeDecodeError as exc:
        problems.append(f"{name}: file {path} is not UTF-8 text (byte {exc.start})")
    return None


def _from_environment(
    environ: Mapping[str, str], raw: dict[Key, _Raw], problems: list[str]
) -> None:
    for name, target in LEGACY_ENV.items():
        file_name = f"{name}_FILE"
        if name in FILE_ENV and environ.get(file_name):
            if environ.get(name):
                problems.append(f"{name} and {file_name} are both set; set only one")
                continue
            content = _read_secret_file(file_name, environ[file_name], problems)
            if content is not None:
                raw[target] = _Raw(content, f"environment {file_name}")
        elif name in environ:
            raw[target] = _Raw(environ[name], f"environment {name}")
    for name, value in environ.items():
        if not name.startswith("POLLER_") or "__" not in name:
            continue
        section, _, option = name[len("POLLER_") :].lower().partition("__")
        if option.endswith("_file") and option[: -len("_file")] in SECRET_KEYS.get(section, ()):
            content = _read_secret_file(name, value, problems)
            if content is not None:
                raw[(section, option[: -len("_file")])] = _Raw(content, f"environment {name}")
            continue
        if section not in PARSERS or option not in PARSERS[section]:
            problems.append(f"{name}: no such setting {section}.{option}")
            continue
        raw[(section, option)] = _Raw(value, f"environment {name}")


def _from_flags(flags: Sequence[str], raw: dict[Key, _Raw], problems: list[str]) -> None:
    """``--set SECTION.KEY=VALUE`` flags, the last layer of precedence."""
    for flag in flags:
        name, sep, value = flag.partition("=")
        section, _, option = name.strip().partition(".")
        if not sep or not option:
            problems.append(f"--set {flag!r}: expected SECTION.KEY=VALUE")
        elif section not in PARSERS or option not in PARSERS[section]:
            problems.append(f"--set {name}: no such setting")
        elif option in ("api_key", "token"):
            # A flag shows in the process list: secrets come from the environment or a file.
            problems.append(
                f"--set {section}.{option}: not allowed (a flag shows in the process list);"
                " use the environment or its _FILE form"
            )
        else:
            raw[(section, option)] = _Raw(value, f"flag --set {name}")


def load_settings(
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[Key, tuple[Any, str]] | None = None,
    required: tuple[Key, ...] = (),
    flags: Sequence[str] = (),
) -> Settings:
    """Build Settings from every source; raise ConfigError naming each problem found."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    raw: dict[Key, _Raw] = {}
    if config_path is None:
        config_path = default_config_path(environ)
    if config_path is not None:
        _from_file(config_path, raw, problems)
    _from_environment(environ, raw, problems)
    for target, (value, source) in (overrides or {}).items():
        raw[target] = _Raw(value, source)
    _from_flags(flags, raw, problems)

    values: dict[str, dict[str, Any]] = {section: {} for section in PARSERS}
    for (section, option), item in raw.items():
        try:
            values[section][option] = PARSERS[section][option](item.value)
        except ValueError as exc:
            # Secrets are never echoed back, even when they are what is wrong.
            reason = "invalid value" if option in ("api_key", "token") else str(exc)
            problems.append(f"{section}.{option}: {reason} (from {item.source})")

    for section, option in required:
        if not values[section].get(option) and not any(
            p.startswith(f"{section}.{option}:") for p in problems
        ):
            problems.append(f"{section}.{option}: required but not set ({_hint(section, option)})")

    problems.extend(_cross_checks(values["s3"]))
    if problems:
        raise ConfigError(problems)
    sections = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    return Settings(**sections)


def _cross_checks(s3: dict[str, Any]) -> list[str]:
    """Settings that only make sense together."""
    problems = []
    if s3.get("kms_key_id") and s3.get("sse") != "aws:kms":
        problems.append("s3.kms_key_id: set only with s3.sse: aws:kms")
    if bool(s3.get("object_lock_mode")) != bool(s3.get("object_lock_days")):
        problems.append(
            "s3.object_lock_mode and s3.object_lock_days: set both (a mode and a number of"
            " days) or neither"
        )
    return problems


def _hint(section: str, key: str) -> str:
    for name, target in LEGACY_ENV.items():
        if target == (section, key):
            extra = f" or {name}_FILE" if name in FILE_ENV else ""
            return f"set {name}{extra}, or {section}.{key} in the config file"
    return f"set POLLER_{section.upper()}__{key.upper()} or {section}.{key} in the config file"
