"""The hand-kept ``__all__`` lists exactly what the package exports."""

from __future__ import annotations

import freshcache


def test_all_names_are_exported_and_documented() -> None:
    public = {name for name in dir(freshcache) if not name.startswith("_")}
    modules = {
        "cache",
        "core",
        "serialization",
        "stores",
        "testing",
        "pipeline",
        "write_behind",
        "cli",
    }
    assert set(freshcache.__all__) == public - modules
    for name in freshcache.__all__:
        member = getattr(freshcache, name)
        if callable(member):
            assert member.__doc__, f"{name} has no docstring"
