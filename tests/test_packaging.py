"""The dependency floors pyproject.toml declares are the versions `make test-min` tests,
and every runtime dependency is pinned in requirements.txt."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT


def requirement_names(text: str) -> dict[str, str]:
    """name (normalised) -> version of each ``name==version`` line."""
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s#]+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for spec in project["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.\-]+)>=([0-9][^,]*)", spec)
        assert match, f"{spec}: every dependency needs a floor"
        out[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return out


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


def test_requirements_min_pins_exactly_the_floors():
    pinned = requirement_names((ROOT / "requirements-min.txt").read_text())
    assert set(pinned) == set(floors())
    for name, floor in floors().items():
        # "tenacity>=9" is tested as 9.0.0: the same version, written out.
        assert version_tuple(pinned[name])[: len(version_tuple(floor))] == version_tuple(floor)
        assert all(p == 0 for p in version_tuple(pinned[name])[len(version_tuple(floor)) :])


def test_every_runtime_dependency_is_pinned_at_or_above_its_floor():
    pinned = requirement_names((ROOT / "requirements.txt").read_text())
    assert set(pinned) == set(floors())
    for name, floor in floors().items():
        assert version_tuple(pinned[name]) >= version_tuple(floor), name
