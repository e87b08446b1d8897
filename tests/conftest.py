"""Fixtures shared by several test files."""
import importlib.util

import pytest


@pytest.fixture
def missing_modules(monkeypatch) -> set:
    """A set of module names that importlib.util.find_spec reports as not installed while the test runs (add to it
    at any point), as on a machine without those packages."""
    missing = set()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in missing else real(name, *a, **k))
    return missing
