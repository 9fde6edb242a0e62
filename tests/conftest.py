import os
import sys

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter. The variable
# must be set before triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(__file__)))  # benchmarks.kernel_report

from helpers import PAIRS, TOLERANCES, compare_runs  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests pick their backend explicitly; a FASTOPT_BACKEND in the shell must not leak in."""
    monkeypatch.delenv("FASTOPT_BACKEND", raising=False)



def pytest_configure(config):
    """Under the interpreter, record the GPU specialization of every kernel launch the suite
    makes (benchmarks/kernel_report.py); tests/test_kernels_compile.py compiles them all."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from benchmarks import kernel_report
        except ImportError:  # triton missing: the kernels are not tested either
            return
        config._kernel_recording = kernel_report.recording()
        config._kernel_recording.__enter__()


def pytest_unconfigure(config):
    recording = getattr(config, "_kernel_recording", None)
    if recording is not None:
        recording.__exit__(None, None, None)


def pytest_collection_modifyitems(config, items):
    """The compile check runs last, when every other test has launched its kernels."""
    last = [item for item in items if item.nodeid.startswith("tests/test_kernels_compile.py")]
    items[:] = [item for item in items if item not in last] + last
