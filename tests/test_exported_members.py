"""The hand-kept ``__all__`` lists exactly what the package exports."""

from __future__ import annotations

import inspect

import freshcache


def test_all_names_are_exported_and_documented() -> None:
    public = {
        name
        for name, member in vars(freshcache).items()
        if not name.startswith("_") and not inspect.ismodule(member)
    }
    assert set(freshcache.__all__) == public
    for name in freshcache.__all__:
        member = getattr(freshcache, name)
        if callable(member):
            assert member.__doc__, f"{name} has no docstring"
