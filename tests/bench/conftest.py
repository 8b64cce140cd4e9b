"""The bench scripts are the package `bench` of the repository root, which they import from there (`python -m
bench.NAME`); pytest puts only the test folders on the import path, so these tests reach it through `bench_common`."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_common(monkeypatch) -> ModuleType:
    """`bench.common`, imported from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.common")
