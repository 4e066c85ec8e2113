"""The operator guide's configuration table is the declarations': every setting, in
declaration order, with its environment names, its default and its doc line, and nothing else."""

from __future__ import annotations

import re

from conftest import ROOT
from pydantic import SecretStr

from poller.config import DECLARED, Declared

ROW = re.compile(r"^\| `([a-z0-9_]+\.[a-z0-9_]+)` \|.*$", re.M)


def shown(value: object) -> str:
    """A default as the table writes it."""
    if isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return '""' if value == "" else str(value)


def row(declared: Declared) -> str:
    name = declared.environment_names[0]  # the SPEC's name where it has one
    names = [name, f"{name}_FILE"] if declared.files else [name]
    environment = ", ".join(f"`{n}`" for n in names)
    default = shown(declared.default)
    doc = declared.field.description
    return f"| `{declared.name}` | {environment} | `{default}` | {doc} |"


def test_the_configuration_table_is_generated_from_the_declarations():
    text = (ROOT / "docs/operations.md").read_text()
    table = [match.group(0) for match in ROW.finditer(text)]
    expected = [row(declared) for declared in DECLARED.values()]
    # On a failure, paste the expected rows over the table in docs/operations.md.
    assert table == expected, "\n" + "\n".join(expected)


def test_the_example_config_file_lists_every_setting_at_its_default():
    """config.yaml says it holds every key with its default: a key added to the declarations
    and not to the file, or a default changed in one place only, fails here. Secrets (and
    keys without a useful default, like the bucket) appear commented out as ``# key: ...``."""
    import yaml

    from poller.config import load_settings

    path = ROOT / "config.yaml"
    text = path.read_text()
    document = yaml.safe_load(text)
    commented = set(re.findall(r"^\s*# ([a-z0-9_]+): ", text, re.M))
    missing = [
        declared.name
        for (section, key), declared in DECLARED.items()
        if key not in (document.get(section) or {}) and key not in commented
    ]
    assert not missing, f"config.yaml lacks {missing}"
    for declared in DECLARED.values():
        if declared.key in (document.get(declared.section) or {}):
            assert not declared.secret, f"{declared.name}: a secret belongs in the environment"
    loaded = load_settings(config_path=path, environ={})
    for (section, key), declared in DECLARED.items():
        if key in (document.get(section) or {}):
            value = getattr(getattr(loaded, section), key)
            assert value == declared.default, f"{declared.name}: {value!r} in config.yaml"
