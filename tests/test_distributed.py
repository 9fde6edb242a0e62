"""fastopt inside PyTorch's distributed engines: DDP, FSDP2, ZeroRedundancyOptimizer and
distributed checkpoints, on 2 CPU processes with the gloo backend (127.0.0.1).

The two ranks run every scenario of tests/distributed/worker.py once (one start, bounded in
time); each scenario compares fastopt with the same setup on torch.optim. With two or more
GPUs the same scenarios also run with NCCL (one GPU per rank); a single GPU cannot host two
NCCL ranks, so that part is skipped elsewhere.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "distributed"))

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed + gloo"
)

WORLD_SIZE = 2
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(out, backend: str) -> list:
    """Start WORLD_SIZE ranks of tests/distributed/worker.py; their per-scenario results."""
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get(
        "PYTHONPATH", "")]), OMP_NUM_THREADS="1", FASTOPT_DIST_BACKEND=backend)
    env.pop("FASTOPT_BACKEND", None)
    env.pop("FASTOPT_DIST_ONLY", None)
    worker = os.path.join(HERE, "distributed", "worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(rank), str(WORLD_SIZE), port, str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD_SIZE)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the distributed workers took over {TIMEOUT_S} s")
    per_rank = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        path = out / f"rank{rank}.json"
        assert proc.returncode == 0 and path.exists(), f"rank {rank} failed:\n{log[-3000:]}"
        per_rank.append(json.loads(path.read_text()))
    return per_rank


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_workers(tmp_path_factory.mktemp("gloo"), "gloo")


@pytest.fixture(scope="module")
def nccl_results(tmp_path_factory):
    if not (dist.is_nccl_available() and torch.cuda.device_count() >= WORLD_SIZE):
        pytest.skip(f"NCCL needs {WORLD_SIZE} GPUs")
    return run_workers(tmp_path_factory.mktemp("nccl"), "nccl")


def scenario_names(triton: bool):
    import worker

    return [n for n in worker.SCENARIOS if triton or n not in worker.NEEDS_INTERPRETER]


def check(per_rank_results, scenario) -> None:
    for rank, per_rank in enumerate(per_rank_results):
        assert per_rank.get(scenario) == "ok", f"rank {rank}, {scenario}:\n{per_rank.get(scenario)}"


@pytest.mark.parametrize("scenario", scenario_names(os.environ.get("TRITON_INTERPRET") == "1"))
def test_scenario_matches_torch_optim_on_every_rank(results, scenario):
    check(results, scenario)


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", scenario_names(True))
def test_scenario_with_nccl_on_gpus(nccl_results, scenario):
    check(nccl_results, scenario)
