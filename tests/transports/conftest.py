"""Fixtures for the transport tests: leak checking, short socket paths, connected pairs."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest

# tests/leakcheck.py is the suite-wide helper; make it importable from here.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leakcheck import leak_check
from transport_pairs import TRANSPORTS, Setup, make_setup


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every transport test must leave no fd and no child process behind."""
    with leak_check():
        yield


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temporary directory with a short path (unix socket paths hold 107 bytes)."""
    path = tempfile.mkdtemp(prefix="tmt", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=TRANSPORTS)
def setup(request: pytest.FixtureRequest, short_tmp: str) -> Setup:
    return make_setup(request.param, short_tmp)
