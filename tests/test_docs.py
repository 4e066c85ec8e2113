"""The operator guide's configuration table is the loader's: same keys, same defaults, the
SPEC's environment names where they exist."""

from __future__ import annotations

import re

from conftest import ROOT

from poller.config import FILE_ENV, LEGACY_ENV, PARSERS, SECTIONS, Secret


def table_rows() -> dict[str, tuple[str, str]]:
    text = (ROOT / "docs/operations.md").read_text()
    rows = {}
    for match in re.finditer(r"^\| `([a-z0-9_]+\.[a-z0-9_]+)` \| (.*?) \| `(.*?)` \|", text, re.M):
        rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def shown(section: str, key: str) -> str:
    value = getattr(SECTIONS[section](), key)
    if isinstance(value, Secret):
        return "unset"
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if key == "level":
        return str(value).lower()
    return '""' if value == "" else str(value)


def test_every_setting_is_in_the_table_with_its_default_and_environment_name():
    rows = table_rows()
    keys = {f"{section}.{key}" for section in PARSERS for key in PARSERS[section]}
    assert set(rows) == keys
    legacy = {f"{s}.{k}": name for name, (s, k) in LEGACY_ENV.items()}
    for name, (environment, default) in rows.items():
        section, key = name.split(".")
        assert default == shown(section, key), name
        assert f"`POLLER_{section.upper()}__{key.upper()}`" in environment or (
            f"`{legacy[name]}`" in environment
        ), name
        if legacy.get(name) in FILE_ENV:
            assert f"`{legacy[name]}_FILE`" in environment, name
