"""Settings: a frozen, typed object, loaded from defaults < config file < environment < flags.

Each setting is declared once, as a field of one of the section models below: its type, its
default, its bounds, its one-line doc (the field's description, which is also its row in
docs/operations.md) and, where the SPEC names one, its environment name. A secret is a
``SecretStr``: its ``repr`` and ``str`` never show the value, and every error path of the
loader (validation, ``--set`` flags, ``_FILE`` reading, required checks) treats a field of that
type as secret, whatever it is called.

pydantic validates; the loader is our own small layer over it because the SPEC's message needs
the source of each bad value (the config file, the environment variable, the flag), which
pydantic-settings loses when it merges its sources (see README, *Configuration*). Every value
remembers where it came from, all problems are collected and reported at once
(``ConfigError``, exit 2), and a secret's value is never part of a message.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlparse

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
)
from pydantic.fields import FieldInfo

from poller.errors import ConfigError
from poller.timeutil import parse_instant, utc_now

# ---------------------------------------------------------------- value types
# Raw values are YAML scalars/lists or environment strings; these turn them into the typed
# value or raise ValueError with a short reason (shown only for settings that are not secret).


def _text(raw: Any) -> Any:
    if isinstance(raw, SecretStr):  # an already-built secret, passed to a constructor
        return raw
    if isinstance(raw, (dict, list)):
        raise ValueError("expected a string")
    return "" if raw is None else str(raw).strip()


def _integer(raw: Any) -> Any:
    if isinstance(raw, bool):  # YAML's true is not 1
        raise ValueError("expected an integer")
    return raw


def _number(raw: Any) -> Any:
    if isinstance(raw, bool):
        raise ValueError("expected a number")
    return raw


def _flag(raw: Any) -> Any:
    return raw.strip() if isinstance(raw, str) else raw


def _lower(raw: Any) -> Any:
    return _text(raw).lower()


def _upper(raw: Any) -> Any:
    return _text(raw).upper()


def _items(raw: Any) -> Any:
    """A YAML list, or a comma-separated environment string; blanks and repeats dropped."""
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    return tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def _url(text: str) -> str:
    text = text.rstrip("/")
    parts = urlparse(text)
    if "@" in parts.netloc:  # never echoed: the part before @ would be a secret
        raise ValueError(
            "a URL with credentials in it (user:password@host) is refused; credentials have"
            " settings of their own"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {text!r}")
    return text


def _prefix(text: str) -> str:
    text = text.strip("/")
    if text and not re.fullmatch(r"[A-Za-z0-9!_.*'()\-/]+", text):
        raise ValueError(f"prefix has characters unsafe in an S3 key: {text!r}")
    if "//" in text or any(part in (".", "..") for part in text.split("/")):
        raise ValueError(f"prefix has an empty, '.' or '..' segment: {text!r}")
    return text


def _since(text: str) -> str:
    try:
        parse_instant(text, utc_now())  # raises ValueError with a clear reason
    except OverflowError:  # 99999999d: past the year 1 (pydantic would let it crash)
        raise ValueError(f"too far in the past: {text!r}") from None
    return text


def _path(text: str) -> str:
    text = text.rstrip("/")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", text):
        raise ValueError(f"expected a URL path like /api/v1/s3/alert, got {text!r}")
    return text


def _cidrs(raw: Any) -> tuple[str, ...]:
    networks = []
    for item in _items(raw):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"not an IP network: {item!r}") from None
    return tuple(networks)


def _topic_arns(raw: Any) -> tuple[str, ...]:
    topics = _items(raw)
    for topic in topics:
        if not re.fullmatch(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_.-]+", topic):
            raise ValueError(f"not an SNS topic ARN: {topic!r}")
    return tuple(topics)


Text = Annotated[str, BeforeValidator(_text)]
SecretText = Annotated[SecretStr, BeforeValidator(_text)]
Whole = Annotated[int, BeforeValidator(_integer)]
Number = Annotated[float, BeforeValidator(_number)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Url = Annotated[str, BeforeValidator(_text), AfterValidator(_url)]
Prefix = Annotated[str, BeforeValidator(_text), AfterValidator(_prefix)]
Since = Annotated[str, BeforeValidator(_text), AfterValidator(_since)]
UrlPath = Annotated[str, BeforeValidator(_text), AfterValidator(_path)]
Statuses = Annotated[tuple[Literal["active", "dismissed"], ...], BeforeValidator(_items)]
Networks = Annotated[tuple[str, ...], BeforeValidator(_cidrs)]
TopicArns = Annotated[tuple[str, ...], BeforeValidator(_topic_arns)]
StorageClass = Literal[
    "",
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "GLACIER",
    "DEEP_ARCHIVE",
    "REDUCED_REDUNDANCY",
]
# AWS's spellings, exactly; surrounding blanks dropped and null meaning off, as for any text.
Sse = Annotated[Literal["", "AES256", "aws:kms"], BeforeValidator(_text)]
ObjectLockMode = Annotated[Literal["", "GOVERNANCE", "COMPLIANCE"], BeforeValidator(_text)]


def setting(
    default: Any,
    doc: str,
    *,
    env: str | None = None,
    files: bool = False,
    ge: float | None = None,
    le: float | None = None,
    min_length: int | None = None,
) -> Any:
    """One setting's declaration: its default, its one-line doc, its bounds, and the SPEC's
    environment name ``env`` if it has one. ``files``: the value may instead be given as a
    file named by ``NAME_FILE`` (every secret may be, whatever ``files`` says)."""
    extra: dict[str, Any] = {}
    if env:
        extra["env"] = env
    if files:
        extra["files"] = True
    return Field(
        default,
        description=doc,
        ge=ge,
        le=le,
        min_length=min_length,
        json_schema_extra=extra or None,
    )


class _Section(BaseModel):
    # hide_input_in_errors: a ValidationError raised outside the loader (a constructor call)
    # must not print a secret either.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


# ---------------------------------------------------------------- the declarations


class ThreatStackSettings(_Section):
    base_url: Url = setting(
        "https://api.threatstack.com",
        "API root; `/v2/...` and `/help/hawk/self-test` hang under it",
        env="THREATSTACK_BASE_URL",
    )
    user_id: Text = setting(
        "",
        "Hawk id (Settings → Application Keys → User ID)",
        env="THREATSTACK_USER_ID",
        files=True,
    )
    org_id: Text = setting(
        "",
        "organisation, sent in Hawk's `ext` (Organization ID)",
        env="THREATSTACK_ORG_ID",
        files=True,
    )
    api_key: SecretText = setting(
        SecretStr(""),
        "Hawk key (API key); never logged, never in a flag",
        env="THREATSTACK_API_KEY",
    )
    statuses: Statuses = setting(
        ("active", "dismissed"),
        "alert lists to poll; all runs against a prefix must poll the same",
        min_length=1,
    )
    requests_per_minute: Whole = setting(
        100,
        "client-side budget, across processes taking turns (the org allows ~200/min)",
        ge=1,
        le=100_000,
    )
    timeout_seconds: Number = setting(30.0, "connecting, and each socket read", ge=0.1, le=600)
    request_deadline_seconds: Number = setting(
        120.0, "a whole request, however slowly its body trickles in", ge=1, le=3600
    )
    max_response_bytes: Whole = setting(
        16 * 1024 * 1024, "a larger body is refused", ge=1024, le=1024**3
    )
    max_attempts: Whole = setting(
        8, "attempts per request (429, 5xx, timeouts, drops)", ge=1, le=100
    )
    max_retry_seconds: Number = setting(
        600.0, "give a request up after this long in retries", ge=0, le=86_400
    )
    verify_responses: Flag = setting(True, "check the Hawk `Server-Authorization` of every 2xx")


class S3Settings(_Section):
    bucket: Text = setting("", "the archive bucket (required)", env="TS_AWS_S3_BUCKET")
    prefix: Prefix = setting(
        "", "key prefix, no leading or trailing `/` needed", env="TS_AWS_S3_PREFIX"
    )
    max_concurrency: Whole = setting(16, "parallel S3 writes", ge=1, le=256)
    max_attempts: Whole = setting(8, "botocore standard-mode attempts per S3 call", ge=1, le=50)
    require_conditional_writes: Flag = setting(
        True,
        "refuse a store that ignores or lacks If-None-Match/If-Match; `false`: on such a store"
        " send neither header, single writer through the lease alone (README, *S3-compatible"
        " stores*)",
    )
    # The archive as evidence: these apply to every object poller writes (retention: to
    # archived records only).
    checksums: Flag = setting(
        True,
        "a SHA-256 checksum on every PUT, verified by S3; `false`: no checksum at all (no"
        " aws-chunked uploads over HTTPS), for stores that reject or mangle them",
    )
    sse: Sse = setting("", "`AES256` (SSE-S3) or `aws:kms` (SSE-KMS) on every object")
    kms_key_id: Text = setting("", "the KMS key, with `sse: aws:kms`")
    storage_class: Annotated[StorageClass, BeforeValidator(_text)] = setting(
        "", 'storage class of every object (`""`: the bucket\'s default)'
    )
    object_lock_mode: ObjectLockMode = setting(
        "", "`GOVERNANCE` or `COMPLIANCE` retention on archived records"
    )
    object_lock_days: Whole = setting(0, "retention days, with `object_lock_mode`", ge=0, le=36_500)


class SyncSettings(_Section):
    interval_seconds: Whole = setting(300, "daemon cadence", ge=1, le=86_400)
    lookback_seconds: Whole = setting(
        900,
        "each cycle re-reads this much before the watermark (at least 1 s is always re-read)",
        ge=0,
        le=30 * 86_400,
    )
    settle_seconds: Whole = setting(60, "windows end this far before now", ge=0, le=86_400)
    first_run_since: Since = setting(
        "24h", "where the first cycle starts (ISO 8601, or `24h`, `7d`)"
    )
    lease_ttl_seconds: Whole = setting(
        120, "a lease not renewed this long may be taken over", ge=3, le=86_400
    )
    max_window_seconds: Whole = setting(
        86_400, "chunk length of long windows and backfills", ge=60, le=366 * 86_400
    )
    max_cycle_seconds: Whole = setting(
        0, "a cycle's deadline; 0 derives it from the work", ge=0, le=30 * 86_400
    )
    revisit_days: Whole = setting(
        14,
        "how far back, by creation time, the revisit re-reads the dismissed list to archive"
        " later dismissals (`P/dismissals/...`); 0: no revisit (`verify --repair` still"
        " writes them)",
        ge=0,
        le=366,  # the API keeps alerts a year
    )
    revisit_interval_seconds: Whole = setting(
        3600,
        "how often a cycle (of the daemon or of a CronJob run) also does the revisit;"
        " 0: every cycle",
        ge=0,
        le=30 * 86_400,
    )


class HttpSettings(_Section):
    host: Text = setting(
        "0.0.0.0",  # noqa: S104 - SPEC default; the daemon serves health checks
        "where the daemon serves `/healthz` `/readyz` `/metrics`",
    )
    port: Whole = setting(8080, "its port (0: off)", ge=0, le=65_535)


class LogSettings(_Section):
    format: Annotated[Literal["auto", "json", "text"], BeforeValidator(_lower)] = setting(
        "auto", "`auto` (text on a terminal, else JSON), `json`, `text`"
    )
    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = (
        setting("INFO", "`debug`, `info`, `warning`, `error` (any case)")
    )
    progress_seconds: Number = setting(
        30.0, "cadence of `walk.progress` events in long walks", ge=0, le=86_400
    )


class ReceiverSettings(_Section):
    """The push path (see poller.serving.receiver): off while ``token`` is unset."""

    token: SecretText = setting(
        SecretStr(""), "the push path's shared secret; unset: the receiver is off"
    )
    previous_token: SecretText = setting(
        SecretStr(""),
        "also accepted for pushes during a token rotation (README, *Token rotation*)",
    )
    read_token: SecretText = setting(
        SecretStr(""),
        "the read-back routes' secret (`Authorization: Bearer`); unset: they are off",
    )
    path: UrlPath = setting(
        "/api/v1/s3/alert", "where webhooks are posted (also under `/threatstack-to-s3`)"
    )
    # A listener of its own, so a flood of the push port never reaches the health routes.
    port: Whole = setting(
        0,
        "the push routes' own listener; 0: they share `http.port` with the health routes",
        ge=0,
        le=65_535,
    )
    allow_cidrs: Networks = setting((), "source networks allowed to push (empty: any)")
    trusted_proxies: Networks = setting(
        (),
        "networks of proxies (the ingress) whose `X-Forwarded-For` names the sender",
    )
    sns_topics: TopicArns = setting(
        (),
        "SNS topic ARNs whose subscription confirmations poller confirms"
        " (others are logged with the URL)",
    )
    max_body_bytes: Whole = setting(
        1024 * 1024,
        "a larger push, chunked or once decompressed, is refused (413)",
        ge=1024,
        le=64 * 1024 * 1024,
    )
    max_header_bytes: Whole = setting(
        16 * 1024, "request line and headers", ge=1024, le=1024 * 1024
    )
    threads: Whole = setting(8, "workers; each runs one whole, already-read request", ge=1, le=256)
    connection_limit: Whole = setting(
        1000,
        "open connections per listener; a new one displaces the oldest still owing its request",
        ge=2,
        le=10_000,
    )
    connections_per_source: Whole = setting(
        50,
        "open connections per peer address (the socket's); a new one displaces that "
        "source's oldest still owing its request; 0: no cap",
        ge=0,
        le=10_000,
    )
    timeout_seconds: Number = setting(
        10.0,
        "a connection must deliver a whole request within this from being accepted "
        "(and from its last response)",
        ge=0.5,
        le=300,
    )
    idle_timeout_seconds: Number = setting(
        60.0, "a connection silent this long is closed", ge=1, le=3600
    )
    tls_cert_file: Text = setting("", "TLS certificate (PEM) for users without an ingress")
    tls_key_file: Text = setting("", "its key")


class TablesSettings(_Section):
    """The query tables (SPEC "Query tables", poller.tables)."""

    enabled: Flag = setting(
        True, "the daemon builds the query tables of closed days after its cycles"
    )
    cache_dir: Text = setting(
        "",
        'where `poller query` keeps fetched parts (`""`: `$XDG_CACHE_HOME/poller/tables/'
        "BUCKET/PREFIX`, else `~/.cache/...`)",
    )
    max_seconds_per_cycle: Whole = setting(
        120,
        "the daemon starts no new day of tables after this; the next cycle goes on",
        ge=1,
        le=86_400,
    )
    batch_size: Whole = setting(
        1000,
        "full records read and staged at a time (bounds `poller tables`' memory)",
        ge=1,
        le=100_000,
    )


class Settings(_Section):
    threatstack: ThreatStackSettings = Field(default_factory=ThreatStackSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    receiver: ReceiverSettings = Field(default_factory=ReceiverSettings)
    tables: TablesSettings = Field(default_factory=TablesSettings)


# ---------------------------------------------------------------- what the loader reads off them

Key = tuple[str, str]


@dataclass(frozen=True)
class Declared:
    """One setting as the loader and the docs see it, read off its declaration."""

    section: str
    key: str
    field: FieldInfo
    model: type[_Section]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def secret(self) -> bool:
        return _holds_secret(self.field.annotation)

    @property
    def env(self) -> str:
        return f"POLLER_{self.section.upper()}__{self.key.upper()}"

    @property
    def legacy_env(self) -> str | None:
        """The SPEC's name for it (the old receiver's or the vendor's), if it has one."""
        extra = self.field.json_schema_extra
        return str(extra["env"]) if isinstance(extra, dict) and "env" in extra else None

    @property
    def files(self) -> bool:
        """Whether ``NAME_FILE`` forms name a file holding the value."""
        extra = self.field.json_schema_extra
        return self.secret or (isinstance(extra, dict) and bool(extra.get("files")))

    @property
    def environment_names(self) -> tuple[str, ...]:
        """In the order they are read: the SPEC's name first, so ``POLLER_...`` wins."""
        return (self.legacy_env, self.env) if self.legacy_env else (self.env,)

    @property
    def default(self) -> Any:
        return getattr(self.model(), self.key)


def _holds_secret(annotation: Any) -> bool:
    """A secret type anywhere in the annotation: ``SecretStr``, ``SecretStr | None``,
    ``tuple[SecretStr, ...]`` all make the setting secret."""
    if isinstance(annotation, type) and issubclass(annotation, (SecretStr, SecretBytes)):
        return True
    return any(_holds_secret(arg) for arg in get_args(annotation))


def _declared() -> dict[Key, Declared]:
    table = {}
    for section, outer in Settings.model_fields.items():
        model = outer.annotation
        assert isinstance(model, type) and issubclass(model, _Section)
        for key, inner in model.model_fields.items():
            table[(section, key)] = Declared(section, key, inner, model)
    return table


DECLARED: dict[Key, Declared] = _declared()
SECTIONS = frozenset(section for section, _ in DECLARED)

# What each command needs before it may start.
REQUIRED_API = (("threatstack", "user_id"), ("threatstack", "org_id"), ("threatstack", "api_key"))
REQUIRED_S3 = (("s3", "bucket"),)


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


def _unquoted(match: re.Match[str]) -> str:
    inner = match.group(0)[1:-1]
    # A character ('\\t') or a token kind ('<scalar>') says what is wrong; longer text is
    # the document's own (an undefined alias, an unknown tag: a secret starting '*' or '!').
    return match.group(0) if len(inner) <= 3 or re.fullmatch(r"<[a-z ]+>", inner) else "'...'"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, never the text around it: the failing line may hold a secret."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = re.sub(r"'[^']*'|\"[^\"]*\"", _unquoted, exc.problem or "a syntax error")
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return type(exc).__name__


def _name(text: object) -> str:
    """A key or a name as given, when it looks like one; else only its leading name part
    (a value typed where a name goes, ``api_key SECRET`` or ``--set a.key:SECRET``, is not
    shown)."""
    text = str(text).strip()
    shown = re.match(r"[A-Za-z0-9_.-]*", text).group(0)  # type: ignore[union-attr]
    return text if shown == text else f"{shown}..."


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
    except ValueError:  # PyYAML's int() of a number of over 4300 digits
        problems.append(f"config file {path}: not valid YAML: a number too long to read")
        return
    if document is None:
        return
    if not isinstance(document, dict):
        problems.append(f"config file {path}: the top level must be a mapping of sections")
        return
    for section, keys in document.items():
        if section not in SECTIONS:
            problems.append(f"{_name(section)}: unknown section (from {path})")
            continue
        if keys is None:
            continue
        if not isinstance(keys, dict):
            problems.append(f"{_name(section)}: must be a mapping of keys (from {path})")
            continue
        for key, value in keys.items():
            if (section, key) not in DECLARED:
                problems.append(f"{section}.{_name(key)}: unknown key (from {path})")
                continue
            raw[(section, key)] = _Raw(value, f"config file {path}")


def _read_secret_file(name: str, path: str, problems: list[str], secret: bool) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        if secret:  # the secret itself, given where its path goes, is a common mistake
            problems.append(
                f"{name}: cannot read file ({why}); its value (not shown) must be a path"
            )
        else:
            problems.append(f"{name}: cannot read file {path} ({why})")
    except UnicodeDecodeError as exc:
        problems.append(f"{name}: file {path} is not UTF-8 text (byte {exc.start})")
    return None


def _from_environment(
    environ: Mapping[str, str], raw: dict[Key, _Raw], problems: list[str]
) -> None:
    # POLLER_<SECTION>__<KEY> is read in any case after the prefix, as before pydantic
    # (POLLER_sync__interval_seconds); the SPEC's own names are exact.
    spelled: dict[str, str] = {}  # the upper-case name -> the name as set
    for name in environ:
        if name.startswith("POLLER_") and "__" in name:
            upper = name.upper()
            if upper in spelled:
                problems.append(f"{spelled[upper]} and {name} are both set; set only one")
            spelled[upper] = name
    known = set()
    for target, declared in DECLARED.items():
        for canonical in declared.environment_names:
            name = spelled.get(canonical, canonical)
            file_name = spelled.get(f"{canonical}_FILE", f"{canonical}_FILE")
            known.add(canonical)
            if declared.files:
                known.add(f"{canonical}_FILE")
            if declared.files and environ.get(file_name):
                if environ.get(name):
                    problems.append(f"{name} and {file_name} are both set; set only one")
                    continue
                content = _read_secret_file(
                    file_name, environ[file_name], problems, declared.secret
                )
                if content is not None:
                    raw[target] = _Raw(content, f"environment {file_name}")
            elif name in environ:
                raw[target] = _Raw(environ[name], f"environment {name}")
    for upper, name in spelled.items():
        if upper not in known:
            section, _, option = upper[len("POLLER_") :].lower().partition("__")
            problems.append(f"{_name(name)}: no such setting {_name(section)}.{_name(option)}")


def _from_flags(flags: Sequence[str], raw: dict[Key, _Raw], problems: list[str]) -> None:
    """``--set SECTION.KEY=VALUE`` flags, the last layer of precedence."""
    for flag in flags:
        name, sep, value = flag.partition("=")
        section, _, option = name.strip().partition(".")
        declared = DECLARED.get((section, option))
        if not sep or not option:
            # Only what comes before '=': after it may be a secret given to a mistyped key.
            problems.append(f"--set {_name(name)!r}: expected SECTION.KEY=VALUE")
        elif declared is None:
            problems.append(f"--set {_name(name)}: no such setting")
        elif declared.secret:
            # A flag shows in the process list: secrets come from the environment or a file.
            problems.append(
                f"--set {declared.name}: not allowed (a flag shows in the process list);"
                " use the environment or its _FILE form"
            )
        else:
            raw[(section, option)] = _Raw(value, f"flag --set {name}")


def _bounds(declared: Declared) -> str:
    low = next((m.ge for m in declared.field.metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in declared.field.metadata if hasattr(m, "le")), None)
    if low is None or high is None:
        return f"at least {low}" if high is None else f"at most {high}"
    return f"between {low} and {high}"


def _reason(error: Any, declared: Declared) -> str:
    """Why a value was refused, in a few words; for a secret, nothing about the value."""
    if declared.secret:
        return "invalid value"
    kind, given = error["type"], error.get("input")
    context = error.get("ctx") or {}
    if kind == "value_error":
        return str(context.get("error", error["msg"]))
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {given!r}"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return f"expected a number, got {given!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {given!r}"
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"must be {_bounds(declared)}, got {given}"
    if kind == "literal_error":
        return f"expected one of {context.get('expected')}, got {given!r}"
    if kind == "too_short":
        return "at least one value is needed"
    if kind == "string_type":
        return "expected a string"
    return str(error["msg"])


def _validate(raw: dict[Key, _Raw], problems: list[str]) -> tuple[Settings, set[Key]]:
    """Settings from the raw values; a refused value becomes a problem and its default stands
    in for it, so the required and cross checks that follow still see every other value."""
    data: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for (section, key), item in raw.items():
        data[section][key] = item.value
    refused: set[Key] = set()
    try:
        return Settings.model_validate(data), refused
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    itemised = {(str(e["loc"][0]), str(e["loc"][1])) for e in errors if e["type"] != "too_short"}
    for error in errors:
        target = (str(error["loc"][0]), str(error["loc"][1]))
        declared = DECLARED[target]  # every raw value is a declared key (checked on the way in)
        if error["type"] == "too_short" and target in itemised:
            continue  # its items were refused: that is the news, not how few were left
        refused.add(target)
        problems.append(f"{declared.name}: {_reason(error, declared)} (from {raw[target].source})")
    for section, key in refused:
        del data[section][key]
    return Settings.model_validate(data), refused


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

    settings, refused = _validate(raw, problems)
    for target in required:
        if target not in refused and not getattr(getattr(settings, target[0]), target[1]):
            problems.append(f"{DECLARED[target].name}: required but not set ({_hint(target)})")
    problems.extend(_cross_checks(settings.s3))
    if problems:
        raise ConfigError(problems)
    return settings


def _cross_checks(s3: S3Settings) -> list[str]:
    """Settings that only make sense together."""
    problems = []
    if s3.kms_key_id and s3.sse != "aws:kms":
        problems.append("s3.kms_key_id: set only with s3.sse: aws:kms")
    if bool(s3.object_lock_mode) != bool(s3.object_lock_days):
        problems.append(
            "s3.object_lock_mode and s3.object_lock_days: set both (a mode and a number of"
            " days) or neither"
        )
    return problems


def _hint(target: Key) -> str:
    declared = DECLARED[target]
    name = declared.environment_names[0]
    extra = f" or {name}_FILE" if declared.files else ""
    return f"set {name}{extra}, or {declared.name} in the config file"
