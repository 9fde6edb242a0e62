import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import PAIRS, TOLERANCES, compare_runs  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests pick their backend explicitly; a FASTOPT_BACKEND in the shell must not leak in."""
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)
