import os
import sys

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. The variable
# must be set before triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

from helpers import PAIRS, TOLERANCES, compare_runs  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests pick their backend explicitly; a FASTOPT_BACKEND in the shell must not leak in."""
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)

