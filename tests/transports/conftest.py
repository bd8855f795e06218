"""Fixtures for the transport tests: short socket paths, connected pairs.

(The leak check around every test is the suite's ``no_leaks``, in tests/conftest.py.)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest
from transport_pairs import TRANSPORTS, Setup, make_setup


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
