"""Configuration: precedence, SPEC's environment names, _FILE secrets, all problems at once."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import traceback
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from poller import cli, logs
from poller.config import DECLARED, REQUIRED_API, REQUIRED_S3, Declared, Settings, load_settings
from poller.errors import ConfigError

KEY = "very-secret-api-key-value"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_spec_defaults():
    settings = load_settings(None, environ={})
    assert settings == Settings()
    assert settings.sync.interval_seconds == 300
    assert settings.sync.lookback_seconds == 900
    assert settings.sync.settle_seconds == 60
    assert settings.sync.first_run_since == "24h"
    assert settings.threatstack.statuses == ("active", "dismissed")
    assert settings.threatstack.requests_per_minute == 100
    assert settings.s3.max_concurrency == 16
    assert settings.sync.lease_ttl_seconds == 120
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 8080)
    assert settings.threatstack.base_url == "https://api.threatstack.com"


def test_precedence_defaults_file_environment_flags(tmp_path: Path):
    path = write(
        tmp_path,
        "sync:\n  interval_seconds: 120\n  lookback_seconds: 600\n  settle_seconds: 30\n",
    )
    environ = {"POLLER_SYNC__LOOKBACK_SECONDS": "1200", "POLLER_SYNC__SETTLE_SECONDS": "45"}
    overrides = {("sync", "settle_seconds"): (5, "flag --settle")}
    settings = load_settings(path, environ=environ, overrides=overrides)
    assert settings.sync.interval_seconds == 120  # file over default
    assert settings.sync.lookback_seconds == 1200  # environment over file
    assert settings.sync.settle_seconds == 5  # flag over environment
    assert settings.sync.lease_ttl_seconds == 120  # default


def test_spec_environment_names(tmp_path: Path):
    environ = {
        "THREATSTACK_BASE_URL": "http://127.0.0.1:8900/",
        "THREATSTACK_USER_ID": "user",
        "THREATSTACK_ORG_ID": "org",
        "THREATSTACK_API_KEY": KEY,
        "TS_AWS_S3_BUCKET": "archive",
        "TS_AWS_S3_PREFIX": "/team/threatstack/",
        "POLLER_THREATSTACK__STATUSES": "dismissed",
        "POLLER_S3__MAX_CONCURRENCY": "4",
    }
    settings = load_settings(None, environ=environ, required=REQUIRED_API + REQUIRED_S3)
    assert settings.threatstack.base_url == "http://127.0.0.1:8900"
    assert (settings.threatstack.user_id, settings.threatstack.org_id) == ("user", "org")
    assert settings.threatstack.api_key.get_secret_value() == KEY
    assert settings.s3.bucket == "archive"
    assert settings.s3.prefix == "team/threatstack"
    assert settings.threatstack.statuses == ("dismissed",)
    assert settings.s3.max_concurrency == 4


def test_credentials_from_files(tmp_path: Path):
    for name, value in (("user", "u1"), ("org", "o1"), ("key", KEY)):
        (tmp_path / name).write_text(value + "\n")
    environ = {
        "THREATSTACK_USER_ID_FILE": str(tmp_path / "user"),
        "THREATSTACK_ORG_ID_FILE": str(tmp_path / "org"),
        "THREATSTACK_API_KEY_FILE": str(tmp_path / "key"),
        "TS_AWS_S3_BUCKET": "b",
    }
    settings = load_settings(None, environ=environ, required=REQUIRED_API + REQUIRED_S3)
    assert settings.threatstack.user_id == "u1"
    assert settings.threatstack.org_id == "o1"
    assert settings.threatstack.api_key.get_secret_value() == KEY


def test_every_problem_is_reported_at_once_with_key_and_source(tmp_path: Path):
    path = write(
        tmp_path,
        "sync:\n  interval_seconds: soon\n  first_run_since: last tuesday\n"
        "threatstack:\n  statuses: [active, archived]\n  typo_key: 1\n"
        "nonsense: {}\n",
    )
    environ = {
        "POLLER_S3__MAX_CONCURRENCY": "0",
        "POLLER_SYNC__NO_SUCH": "1",
        "THREATSTACK_API_KEY_FILE": str(tmp_path / "missing"),
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ, required=REQUIRED_API + REQUIRED_S3)
    text = str(caught.value)
    problems = caught.value.problems
    assert f"sync.interval_seconds: expected an integer, got 'soon' (from config file {path})" in (
        problems
    )
    assert any(p.startswith("sync.first_run_since:") for p in problems)
    assert any(p.startswith("threatstack.statuses:") and "archived" in p for p in problems)
    assert f"threatstack.typo_key: unknown key (from {path})" in problems
    assert f"nonsense: unknown section (from {path})" in problems
    assert any(
        p.startswith("s3.max_concurrency:") and "POLLER_S3__MAX_CONCURRENCY" in p for p in problems
    )
    assert any("POLLER_SYNC__NO_SUCH" in p for p in problems)
    assert any("THREATSTACK_API_KEY_FILE: cannot read file" in p for p in problems)
    assert any(p.startswith("threatstack.user_id: required") for p in problems)
    assert any(p.startswith("s3.bucket: required") and "TS_AWS_S3_BUCKET" in p for p in problems)
    assert caught.value.exit_code == 2
    assert len(problems) >= 10, text


def test_value_and_file_both_set_is_an_error(tmp_path: Path):
    (tmp_path / "key").write_text(KEY)
    environ = {"THREATSTACK_API_KEY": KEY, "THREATSTACK_API_KEY_FILE": str(tmp_path / "key")}
    with pytest.raises(ConfigError, match="both set"):
        load_settings(None, environ=environ)


@pytest.mark.parametrize(
    "text", ["just a string\n", "sync: [1, 2]\n", "sync:\n  interval_seconds: [1\n"]
)
def test_malformed_files_are_reported(tmp_path: Path, text: str):
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert str(tmp_path) in str(caught.value)


def test_missing_config_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_poller_config_variable_names_the_file(tmp_path: Path):
    path = write(tmp_path, "sync:\n  interval_seconds: 42\n")
    assert load_settings(None, environ={"POLLER_CONFIG": str(path)}).sync.interval_seconds == 42


def test_the_example_config_file_is_valid():
    example = Path(__file__).resolve().parent.parent / "config.yaml"
    settings = load_settings(example, environ={})
    assert settings.sync == Settings().sync


def test_secrets_never_show(tmp_path: Path):
    settings = load_settings(None, environ={"THREATSTACK_API_KEY": KEY})
    for text in (repr(settings), str(settings), repr(settings.threatstack), f"{SecretStr(KEY)}"):
        assert KEY not in text
    path = write(tmp_path, "threatstack:\n  api_key: [" + KEY + "]\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert KEY not in str(caught.value)
    assert "threatstack.api_key: invalid value" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TS_AWS_S3_PREFIX", "a/../b"),
        ("TS_AWS_S3_PREFIX", "a//b"),
        ("TS_AWS_S3_PREFIX", "a b"),
        ("THREATSTACK_BASE_URL", "api.threatstack.com"),
        ("POLLER_THREATSTACK__REQUESTS_PER_MINUTE", "0"),
        ("POLLER_THREATSTACK__VERIFY_RESPONSES", "maybe"),
        ("POLLER_SYNC__LEASE_TTL_SECONDS", "1"),
        ("POLLER_SYNC__MAX_WINDOW_SECONDS", "10"),
        ("POLLER_LOG__FORMAT", "xml"),
    ],
)
def test_bad_values_are_refused(name: str, value: str):
    with pytest.raises(ConfigError, match=name):
        load_settings(None, environ={name: value})


def test_set_flags_win_over_everything_and_are_checked(tmp_path: Path):
    path = write(tmp_path, "sync:\n  first_run_since: 2d\n")
    environ = {"POLLER_SYNC__FIRST_RUN_SINCE": "3d"}
    settings = load_settings(path, environ=environ, flags=["sync.first_run_since=7d"])
    assert settings.sync.first_run_since == "7d"
    with pytest.raises(ConfigError) as caught:
        load_settings(
            None,
            environ={},
            flags=["sync.interval_seconds=x", "nokey", "s3.nope=1", f"threatstack.api_key={KEY}"],
        )
    problems = caught.value.problems
    assert any("flag --set sync.interval_seconds" in p for p in problems)
    assert any("'nokey'" in p and "SECTION.KEY=VALUE" in p for p in problems)
    assert any("--set s3.nope: no such setting" in p for p in problems)
    assert any("--set threatstack.api_key: not allowed" in p for p in problems)
    assert KEY not in str(caught.value)


SECRET = "sk-live-0123456789abcdefSECRET"


@pytest.mark.parametrize(
    "text",
    [
        f'threatstack:\n  api_key: "{SECRET}\n  user_id: u\n',  # a missing closing quote
        f"threatstack:\n  api_key: {SECRET}\n   user_id: [u\n",
        f"threatstack:\n\tapi_key: {SECRET}\n",  # a tab
        f"threatstack: {{api_key: {SECRET}\n",
    ],
)
def test_a_yaml_error_never_echoes_the_line_it_failed_on(tmp_path: Path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert "not valid YAML" in message and "line " in message
    assert SECRET not in message and SECRET[:8] not in message


def test_files_that_are_not_utf8_are_configuration_errors(tmp_path: Path):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"sync:\n  interval_seconds: 60 # caf\xe9\n")
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xff\xfek\x00e\x00y\x00")  # UTF-16, as some editors save
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={"THREATSTACK_API_KEY_FILE": str(key_file)})
    assert caught.value.exit_code == 2
    assert [p.split(":")[0] for p in caught.value.problems] == [
        f"config file {config}",
        "THREATSTACK_API_KEY_FILE",
    ]
    assert all("not UTF-8 text" in p for p in caught.value.problems)


# ---------------------------------------------------------------- one declaration per setting

SECRETS = [declared for declared in DECLARED.values() if declared.secret]


def test_every_setting_is_declared_once_with_a_one_line_doc():
    assert len(DECLARED) >= 40  # the table is read off the models, not empty by mistake
    for declared in DECLARED.values():
        doc = declared.field.description
        assert doc and doc.strip() == doc and "\n" not in doc, declared.name
        assert not declared.field.is_required(), f"{declared.name}: needs a default"
        # Secrecy is the type; a name that says secret with a plain type is a bug.
        if re.search(r"token|api_key|password|secret", declared.key):
            assert declared.secret, f"{declared.name}: declare it SecretStr"
    assert {d.name for d in SECRETS} >= {"threatstack.api_key", "receiver.token"}


def leaked(text: str) -> bool:
    return SECRET in text or SECRET[-12:] in text


def logged(record_settings: Settings, error: BaseException) -> str:
    """What poller's own log lines (JSON and text) make of the settings and of an error."""
    lines = io.StringIO()
    log, root = logging.getLogger("poller.test_config"), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        for fmt in ("json", "text"):
            logs.configure("DEBUG", fmt, "run-1", stream=lines)
            log.info("settings", extra={"fields": {"settings": record_settings}})
            log.error("failed", extra={"fields": {"error": str(error)}})
            try:
                raise error
            except BaseException:
                log.exception("crashed")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return lines.getvalue()


@pytest.mark.parametrize("declared", SECRETS, ids=lambda d: d.name)
def test_a_secret_setting_never_shows_its_value(
    tmp_path: Path, declared: Declared, capsys: pytest.CaptureFixture[str]
):
    """Feed one recognisable secret through the setting's every way in and every error path:
    the value must be in the settings and nowhere else."""
    section, key = declared.section, declared.key
    good = {}
    for name in declared.environment_names:
        (tmp_path / "secret").write_text(SECRET + "\n")
        for environ in ({name: SECRET}, {f"{name}_FILE": str(tmp_path / "secret")}):
            settings = load_settings(None, environ=environ)
            assert getattr(settings, section).__dict__[key].get_secret_value() == SECRET
            good[name] = settings
    for shown in good.values():
        section_shown = getattr(shown, section)
        dumped = json.dumps(shown.model_dump(), default=str) + shown.model_dump_json()
        assert not leaked(repr(shown) + str(shown) + repr(section_shown) + dumped)

    bad_file = write(
        tmp_path,
        f"{section}:\n  {key}: [{SECRET}]\n  {key}_typo: {SECRET}\n"
        f"other_{section}: {{{key}: {SECRET}}}\n",
    )
    utf16 = tmp_path / "utf16"
    utf16.write_bytes(SECRET.encode("utf-16"))
    environ = {
        declared.env: SECRET,
        f"{declared.env}_FILE": str(tmp_path / "secret"),  # both set
        f"{declared.environment_names[0]}_FILE": str(utf16),
        f"{declared.env}X": SECRET,  # no such setting
    }
    flags = [
        f"{declared.name}={SECRET}",  # refused: a secret
        f"{key}={SECRET}",  # malformed: no section
        f"x{declared.name}={SECRET}",  # no such setting
        f"{declared.name}",  # malformed: no value
    ]
    errors = []
    for attempt in (
        lambda: load_settings(bad_file, environ={}, flags=flags),
        lambda: load_settings(None, environ=environ, required=((section, key),)),
        lambda: load_settings(None, environ={}, overrides={(section, key): ({SECRET: 1}, "x")}),
        lambda: load_settings(None, environ={}, required=((section, key),)),
    ):
        with pytest.raises(ConfigError) as caught:
            attempt()
        errors.append(caught.value)
    problems = [p for error in errors for p in error.problems]
    assert f"{declared.name}: invalid value (from config file {bad_file})" in problems
    assert f"--set {declared.name}: not allowed" in " ".join(problems)
    assert any(p.startswith(f"{declared.name}: required but not set") for p in problems)
    assert len(problems) >= 8, problems
    # A constructor bypasses the loader: pydantic's own error must hide the input too.
    with pytest.raises(ValidationError) as direct:
        type(getattr(Settings(), section))(**{key: [SECRET]})
    errors.append(direct.value)
    for error in errors:
        text = "".join(traceback.format_exception(error))  # causes and contexts included
        assert not leaked(text), text
        assert not leaked(logged(good[declared.env], error))

    # The command line: the refusal goes to stderr, and nothing else is printed.
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        assert cli.main(["--set", f"{declared.name}={SECRET}", "status"]) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    assert "not allowed" in err and not leaked(out + err)


# ---------------------------------------------------------------- found by review (issue 15)


def problems_of(tmp_path: Path, text: str = "", environ=None, flags=()) -> list[str]:
    path = write(tmp_path, text) if text else None
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ or {}, flags=flags)
    return caught.value.problems


@pytest.mark.parametrize(
    "text",
    [
        f"threatstack:\n  api_key: !{SECRET}\n",  # an unknown tag: PyYAML quotes it
        f"threatstack:\n  api_key: !!{SECRET}\n",
        f"receiver:\n  token: *{SECRET}\n",  # an undefined alias: quoted too
        f"threatstack:\n  <<: *{SECRET}\n",
        f"threatstack:\n  api_key {SECRET}: 1\n",  # no colon: the secret is in the key
        f"threatstack: {{api_key {SECRET}}}\n",
    ],
)
def test_a_secret_in_a_bad_yaml_document_is_not_quoted_back(tmp_path: Path, text: str):
    message = "\n".join(problems_of(tmp_path, text))
    assert not leaked(message), message


@pytest.mark.parametrize(
    "environ",
    [
        {"THREATSTACK_API_KEY_FILE": SECRET},  # the key where its path goes
        {"POLLER_RECEIVER__TOKEN_FILE": SECRET},
        {"POLLER_RECEIVER__READ_TOKEN_FILE": "/no/such/" + SECRET},
    ],
)
def test_a_secret_given_as_its_file_path_is_not_shown(tmp_path: Path, environ: dict[str, str]):
    problems = problems_of(tmp_path, environ=environ)
    assert not leaked("\n".join(problems)), problems
    assert "cannot read file" in problems[0] and "must be a path" in problems[0]


@pytest.mark.parametrize(
    "flag", [f"threatstack.api_key:{SECRET}", f"receiver.token {SECRET}", f"a.b c={SECRET}"]
)
def test_a_malformed_flag_shows_only_its_name(tmp_path: Path, flag: str):
    problems = problems_of(tmp_path, flags=[flag])
    assert not leaked("\n".join(problems)), problems


def test_a_secret_typed_in_any_shape_is_secret():
    from pydantic import SecretStr as S

    from poller.config import _holds_secret

    assert _holds_secret(S) and _holds_secret(S | None) and _holds_secret(tuple[S, ...])
    assert not _holds_secret(str) and not _holds_secret(tuple[str, ...])


@pytest.mark.parametrize("value", [" AES256", "AES256\n", "aws:kms "])
def test_aws_spellings_are_stripped_as_before(tmp_path: Path, value: str):
    settings = load_settings(None, environ={"POLLER_S3__SSE": value})
    assert settings.s3.sse == value.strip()
    assert load_settings(write(tmp_path, "s3:\n  sse:\n  storage_class: ~\n"), environ={})


def test_a_bad_status_is_one_problem(tmp_path: Path):
    assert problems_of(tmp_path, "threatstack:\n  statuses: ACTIVE\n") == [
        "threatstack.statuses: expected one of 'active' or 'dismissed', got 'ACTIVE'"
        f" (from config file {tmp_path / 'config.yaml'})"
    ]


def test_poller_names_are_read_in_any_case_as_before():
    environ = {"POLLER_sync__Interval_Seconds": "60"}
    assert load_settings(None, environ=environ).sync.interval_seconds == 60
    with pytest.raises(ConfigError, match="both set"):
        load_settings(None, environ={**environ, "POLLER_SYNC__INTERVAL_SECONDS": "61"})


@pytest.mark.parametrize(
    "text",
    [
        "sync:\n  first_run_since: 99999999999d\n",  # OverflowError in parse_instant
        "sync:\n  interval_seconds: " + "9" * 5000 + "\n",  # ValueError from PyYAML's int()
    ],
)
def test_absurd_values_are_problems_not_crashes(tmp_path: Path, text: str):
    assert len(problems_of(tmp_path, text)) == 1


def test_a_url_with_credentials_in_it_is_refused_without_showing_them():
    """A URL is printed in logs and reprs; a password inside it would be too."""
    environ = {
        "THREATSTACK_USER_ID": "user",
        "THREATSTACK_ORG_ID": "org",
        "THREATSTACK_API_KEY": KEY,
        "TS_AWS_S3_BUCKET": "archive",
        "THREATSTACK_BASE_URL": "https://admin:hunter2hunter2@api.example.com/",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ=environ, required=REQUIRED_API + REQUIRED_S3)
    assert "credentials in it" in str(caught.value)
    assert "hunter2" not in str(caught.value) + repr(caught.value)
