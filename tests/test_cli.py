"""The ``freshcache`` command line: ``rules check``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from freshcache.cli import app
from freshcache.core.rules import MARKETPLACE_RULES as SHIPPED_RULES

MARKETPLACE_RULES = Path(str(SHIPPED_RULES))

# Whatever the surrounding terminal says, the command sees a plain pipe.
PLAIN_OUTPUT: dict[str, str | None] = {
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
    "COLUMNS": None,
    "NO_COLOR": "1",
}


def run(*arguments: str) -> Result:
    return CliRunner().invoke(app, list(arguments), env=PLAIN_OUTPUT)


def test_rules_check_prints_what_each_pattern_compiles_to() -> None:
    result = run("rules", "check", str(MARKETPLACE_RULES))

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(
        "product_update_triggers" in line
        and "product:{tenantId}:{productId}" in line
        and "delete key product:{tenantId}:{productId}" in line
        for line in lines
    )
    assert any(
        "products:{tenantId}:category:{categoryId}:*" in line
        and "purge tag category:{tenantId}:{categoryId}" in line
        for line in lines
    )
    assert any("bump namespace products:{tenantId}" in line for line in lines)
    assert any("category.updated" in line and "category_tree_triggers" in line for line in lines)
    assert "ok: 17 patterns in 7 triggers" in result.output


def test_rules_check_names_the_pattern_that_fails(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "product_update_triggers:\n"
        "  - cache_keys:\n"
        "    - 'product:{tenantId}:{productId}'\n"
        "    - 'products:*:category:{categoryId}:*'\n"
    )

    result = run("rules", "check", str(rules))

    assert result.exit_code == 1
    assert "pattern 'products:*:category:{categoryId}:*' matches key template" in result.output
    assert "ok:" not in result.output


def test_rules_check_refuses_a_file_that_is_not_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("a: [\n")

    result = run("rules", "check", str(rules))

    assert result.exit_code == 1
    assert "not valid YAML" in result.output


def test_rules_check_notes_triggers_no_event_fires(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("orphan_triggers:\n  - cache_keys: ['marketplace:*']\n")

    result = run("rules", "check", str(rules))

    assert result.exit_code == 0, result.output
    assert "note: no event type fires orphan_triggers" in result.output


def test_rules_check_compiles_against_another_keyspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shop_keys_for_cli_test.py").write_text(
        "from freshcache.core.keys import KeySpace\n"
        "\n"
        "def build():\n"
        "    keyspace = KeySpace()\n"
        "    keyspace.declare('basket:{tenantId}:{basketId}', namespace='basket:{tenantId}')\n"
        "    return keyspace\n"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text("basket_triggers:\n  - cache_keys: ['basket:{tenantId}:*']\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))

    result = run("rules", "check", str(rules), "--keyspace", "shop_keys_for_cli_test:build")
    assert result.exit_code == 0, result.output
    assert "bump namespace basket:{tenantId}" in result.output

    # The shipped rules name keys this keyspace does not declare.
    result = run(
        "rules", "check", str(MARKETPLACE_RULES), "--keyspace", "shop_keys_for_cli_test:build"
    )
    assert result.exit_code == 1
    assert "pattern 'product:{tenantId}:{productId}' matches no declared" in result.output


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_here:build", "No module named 'no_such_module_here'"),
        ("freshcache.core.keys", "expected MODULE:FUNCTION"),
        ("freshcache.core.keys:nothing", "has no function 'nothing'"),
        ("os:getcwd", "os:getcwd returned str, not a KeySpace"),
        ("freshcache.core.policy:TIERS", "has no function 'TIERS'"),
    ],
)
def test_a_bad_keyspace_option_is_a_usage_error(spec: str, message: str) -> None:
    result = run("rules", "check", str(MARKETPLACE_RULES), "--keyspace", spec)

    assert result.exit_code == 2
    assert message in result.output


def test_a_missing_rules_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run("rules", "check", str(tmp_path / "absent.yaml"))

    assert result.exit_code == 2
    assert "does not exist" in result.output
