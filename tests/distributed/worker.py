"""One rank of the distributed checks (tests/test_distributed.py starts two of these).

Every scenario runs the same setup twice, once with a fastopt optimizer and once with the
torch.optim one (foreach=False), and records per scenario "ok" or what went wrong: params must
match torch.optim within fp32 tolerance on every rank, and agree across ranks where the engine
keeps replicas. Usage: python worker.py RANK WORLD_SIZE PORT OUT_DIR

FASTOPT_DIST_BACKEND=nccl runs the same scenarios with NCCL, one GPU per rank (default: gloo on
CPU tensors).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import fastopt

TOL = dict(rtol=2e-6, atol=2e-7)
BACKEND = os.environ.get("FASTOPT_DIST_BACKEND", "gloo")
DEVICE = torch.device("cpu")  # cuda:RANK with NCCL (set in main)
STEPS = 5
OPTIMIZERS = {
    "AdamW": (fastopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "Adam-amsgrad": (fastopt.Adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "SGD": (fastopt.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    # the declared elementwise optimizers: scalars beside the step (NAdam's mu_product, ASGD's
    # eta and mu), optional buffers (RMSprop), state made at construction (Adagrad)
    "NAdam": (fastopt.NAdam, torch.optim.NAdam, dict(lr=1e-2, weight_decay=0.1,
                                                     decoupled_weight_decay=True)),
    "ASGD": (fastopt.ASGD, torch.optim.ASGD, dict(lr=1e-2, t0=2)),
    "RMSprop": (fastopt.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9,
                                                           centered=True)),
    "Adagrad": (fastopt.Adagrad, torch.optim.Adagrad, dict(lr=1e-2, initial_accumulator_value=0.1)),
}


def make_model() -> torch.nn.Module:
    """The same init on every rank. The last layer has one output: its weight has 1 row, so
    under FSDP2 on 2 ranks one rank holds an empty shard of it (and of its bias)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1))
    return model.to(DEVICE)


def batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(8, 13, generator=gen), torch.randn(8, 1, generator=gen)
    return x.to(DEVICE), y.to(DEVICE)


def train(model, opt, rank: int, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def compare(model_a, model_b) -> None:
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(full(a), full(b), **TOL, msg=lambda m: f"{name}: {m}")


def check_ranks_agree(model) -> None:
    """Replicated params are bitwise equal on every rank."""
    for name, p in model.named_parameters():
        value = full(p)
        gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, value)
        for other in gathered:
            assert torch.equal(other, value), f"{name} differs across ranks"


def ddp(rank, opt_name, bucket_view, backend="torch"):
    ours_cls, ref_cls, kw = OPTIMIZERS[opt_name]
    models = []
    for cls, extra in ((ours_cls, dict(backend=backend)), (ref_cls, dict(foreach=False))):
        model = DistributedDataParallel(make_model(), gradient_as_bucket_view=bucket_view)
        opt = cls(model.parameters(), **kw, **extra)
        train(model, opt, rank, STEPS)
        models.append((model, opt))
    (model, opt), (twin, _) = models
    assert not any(b.external for b in opt._buckets[0]), "DDP's params should be laid out flat"
    compare(model, twin)
    check_ranks_agree(model)


def fsdp2(rank, opt_name, backend="auto"):
    ours_cls, ref_cls, kw = OPTIMIZERS[opt_name]
    models = []
    for cls, extra in ((ours_cls, dict(backend=backend)), (ref_cls, dict(foreach=False))):
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = cls(model.parameters(), **kw, **extra)
        train(model, opt, rank, STEPS)
        models.append((model, opt))
    (model, opt), (twin, ref) = models
    compare(model, twin)
    last = model[2].weight
    assert isinstance(last, DTensor)
    assert last.to_local().numel() == (9 if rank == 0 else 0), "expected an empty shard on rank 1"
    assert all(b.external for b in opt._buckets[0]), "FSDP2's shards must stay where FSDP keeps them"
    # State: DTensors laid out like their params, equal to torch's, local pieces in one buffer.
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in ref.state[q].items():
            ours = opt.state[p][key]
            assert type(ours) is type(value), (key, type(ours), type(value))
            torch.testing.assert_close(full(ours), full(value), **TOL, check_dtype=key != "step")
    first = opt.declaration.buffers[0].name  # exp_avg, momentum_buffer, ax...
    flat = opt._buckets[0][0].state.tensors[first]
    for p in model.parameters():
        state = opt.state[p][first]
        local = state.to_local()
        if local.numel():  # a slot of the flat state buffer
            start = flat.data_ptr()
            end = start + flat.untyped_storage().nbytes()
            assert start <= local.data_ptr() < end


def fsdp2_clipped(rank):
    """max_grad_norm on FSDP2 shards: the norm is global (all ranks' shards), as
    clip_grad_norm_ computes it on DTensors; params match clip_grad_norm_ + torch's step."""
    models = []
    for clip in (True, False):
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        if clip:
            opt = fastopt.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.05)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        for step in range(STEPS):
            x, y = batch(rank, step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if not clip:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
                torch.testing.assert_close(models[0][1][step], norm, **TOL)
                opt.step()
            else:
                norms = getattr(opt, "norms", [])
                norms.append(opt.step())
                opt.norms = norms
        models.append((model, getattr(opt, "norms", None)))
    compare(models[0][0], models[1][0])


def zero(rank, opt_name, bucket_view):
    ours_cls, ref_cls, kw = OPTIMIZERS[opt_name]
    models = []
    for cls, extra in ((ours_cls, {}), (ref_cls, dict(foreach=False))):
        model = DistributedDataParallel(make_model())
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls,
                                      parameters_as_bucket_view=bucket_view, **kw, **extra)
        train(model, opt, rank, STEPS)
        models.append((model, opt))
    (model, opt), (twin, ref) = models
    compare(model, twin)
    check_ranks_agree(model)
    # Consolidated state_dict, loaded back into a fresh ZeRO: training continues identically.
    opt.consolidate_state_dict(to=0)
    saved = [opt.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    resumed_model = DistributedDataParallel(make_model())
    resumed_model.module.load_state_dict(model.module.state_dict())
    resumed = ZeroRedundancyOptimizer(resumed_model.parameters(), optimizer_class=ours_cls,
                                      parameters_as_bucket_view=bucket_view, **kw)
    resumed.load_state_dict(copy.deepcopy(saved[0]))  # rank 0's dict holds its live state
    train(model, opt, rank, 3, first=STEPS)
    train(resumed_model, resumed, rank, 3, first=STEPS)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), "a resumed ZeRO run must continue bit-identically"


def quantized_model() -> torch.nn.Module:
    """A layer large enough for quantized state (5200 elements, a short last block of both
    formats) beside small ones that keep fp32 moments."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 400), torch.nn.Tanh(),
                                torch.nn.Linear(400, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1))
    return model.to(DEVICE)


def quantized(rank, state_dtype: str, wrap: str):
    """AdamW with quantized moments under DDP (against the same optimizer in one process on
    the mean of the ranks' grads: bit for bit) or ZeRO (state sharded by param; ranks agree,
    and a consolidated state_dict resumes bit for bit)."""
    def build(model):
        kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=state_dtype)
        if wrap == "zero":
            return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fastopt.AdamW,
                                           **kw)
        return fastopt.AdamW(model.parameters(), **kw)

    model = DistributedDataParallel(quantized_model())
    opt = build(model)
    train(model, opt, rank, STEPS)
    check_ranks_agree(model)
    if wrap == "ddp":  # the single-process run on the ranks' mean grads
        single = quantized_model()
        single_opt = fastopt.AdamW(single.parameters(), lr=1e-2, weight_decay=0.1,
                                   state_dtype=state_dtype)
        for step in range(STEPS):
            single_opt.zero_grad()
            for other in range(dist.get_world_size()):
                x, y = batch(other, step)
                loss = torch.nn.functional.mse_loss(single(x), y) / dist.get_world_size()
                loss.backward()
            single_opt.step()
        for a, b in zip(model.module.parameters(), single.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL)
        quantized_state = [v for state in opt.state.values() for k, v in state.items()
                           if k == "exp_avg_absmax"]
        assert quantized_state, "the large layer should keep quantized moments"
        return
    opt.consolidate_state_dict(to=0)
    saved = [opt.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    resumed_model = DistributedDataParallel(quantized_model())
    resumed_model.module.load_state_dict(model.module.state_dict())
    resumed = build(resumed_model)
    resumed.load_state_dict(copy.deepcopy(saved[0]))
    train(model, opt, rank, 3, first=STEPS)
    train(resumed_model, resumed, rank, 3, first=STEPS)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), "a resumed ZeRO run must continue bit-identically"


def resumes_bit_for_bit(model, build, workdir, more_steps, perturb: bool = False) -> None:
    """A fresh ``build()`` loaded from the DCP checkpoint in ``workdir`` and run for
    ``more_steps(model, opt)`` ends where ``model`` (already run as far) did, bit for bit;
    ``perturb``: the fresh params start elsewhere, so a load that does nothing is caught."""
    fresh, fresh_opt = build()
    if perturb:
        for p in fresh.parameters():
            p.data.add_(1.0)
    loaded = {"model": get_model_state_dict(fresh),
              "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(loaded, checkpoint_id=workdir)
    set_model_state_dict(fresh, loaded["model"])
    set_optimizer_state_dict(fresh, fresh_opt, loaded["optim"])
    more_steps(fresh, fresh_opt)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(full(a), full(b)), f"{name}: DCP resume differs"


def checkpoint(rank, opt_name, workdir):
    """FSDP2 + DCP: save after some steps, load into a fresh model and optimizer, continue:
    identical to the uninterrupted run. Also: get/set_optimizer_state_dict round trip."""
    ours_cls, _, kw = OPTIMIZERS[opt_name]

    def build():
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, ours_cls(model.parameters(), **kw)

    model, opt = build()
    train(model, opt, rank, STEPS)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=workdir)
    # A full (unsharded) optimizer state dict, compared with the sharded one.
    full_osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    def more_steps(m, o):
        train(m, o, rank, 3, first=STEPS)

    more_steps(model, opt)
    resumes_bit_for_bit(model, build, workdir, more_steps, perturb=True)

    # Full state dict into yet another fresh optimizer: same state as the saved one.
    other, other_opt = build()
    set_model_state_dict(other, state["model"])
    set_optimizer_state_dict(other, other_opt, full_osd,
                             options=StateDictOptions(full_state_dict=True))
    sharded = get_optimizer_state_dict(other, other_opt)
    assert set(sharded["state"]) == set(full_osd["state"])
    for key, entry in full_osd["state"].items():
        for name, value in entry.items():
            torch.testing.assert_close(full(sharded["state"][key][name]), full(value),
                                       rtol=0, atol=0, check_dtype=False)


def fsdp2_remainder(rank, workdir):
    """bf16 FSDP2 shards with masters as remainders: the same masters as master_weights=True
    (get_optimizer_state_dict gives both as fp32 ``master_param`` DTensors), and a DCP save and
    load into a fresh remainder run that continues bit for bit."""
    def build(form):
        model = make_model().to(torch.bfloat16)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, fastopt.AdamW(model.parameters(), lr=1e-2, master_weights=form)

    def bf16_train(model, opt, steps, first=0):
        for step in range(first, first + steps):
            x, y = batch(rank, step)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y)
            loss.backward()
            opt.step()

    runs = {}
    for form in (True, "remainder"):
        runs[form] = build(form)
        bf16_train(*runs[form], STEPS)
    saved = {form: get_optimizer_state_dict(*runs[form]) for form in runs}
    for key, entry in saved[True]["state"].items():
        ours = saved["remainder"]["state"][key]
        assert "master_remainder" not in ours
        assert torch.equal(full(entry["master_param"]), full(ours["master_param"])), key
    model, opt = runs["remainder"]
    dcp.save({"model": get_model_state_dict(model), "optim": saved["remainder"]},
             checkpoint_id=workdir)
    def more_steps(m, o):
        bf16_train(m, o, 3, first=STEPS)

    more_steps(model, opt)
    resumes_bit_for_bit(model, lambda: build("remainder"), workdir, more_steps)


def muon_model() -> torch.nn.Module:
    """Matrices of several shapes for Muon: two of one shape, tall and wide ones, 5 rows (3 + 2
    on two ranks) and 1 row (rank 1 holds an empty shard); biases for its AdamW group."""
    torch.manual_seed(0)
    sizes = [13, 5, 5, 5, 16, 1]
    layers = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(DEVICE)


def muon_groups(model) -> list:
    return [{"params": [p for p in model.parameters() if p.ndim == 2]},
            {"params": [p for p in model.parameters() if p.ndim != 2], "use_muon": False,
             "lr": 1e-2}]


def muon_reference(model) -> list:
    hidden, other = (g["params"] for g in muon_groups(model))
    return [torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(other, lr=1e-2, foreach=False)]


def close_to_step(ours, ref, before) -> None:
    """Muon's tolerance (tests/test_muon.py): fp32 rounding plus 2 % of the step's largest
    element, for its bf16 Newton–Schulz output."""
    for (name, a), b, c in zip(ours.named_parameters(), ref.parameters(), before):
        delta = (b.detach() - c).abs().max().item()
        torch.testing.assert_close(full(a), full(b), rtol=2e-6, atol=2e-7 + 0.02 * delta,
                                   msg=lambda m: f"{name}: {m}")


def reference_step(ref, ref_opts, step: int) -> list:
    """One step of the single-process reference on every rank's batch (the mean of the ranks'
    losses: the grads FSDP2 and DDP average); the params before it."""
    before = [p.detach().clone() for p in ref.parameters()]
    for o in ref_opts:
        o.zero_grad()
    world = dist.get_world_size()
    loss = sum(torch.nn.functional.mse_loss(ref(batch(r, step)[0]), batch(r, step)[1])
               for r in range(world)) / world
    loss.backward()
    for o in ref_opts:
        o.step()
    return before


def muon_distributed(rank, workdir, wrap: str, backend: str = "auto"):
    """Muon with its AdamW group under DDP or FSDP2 (each matrix gathered whole to one rank,
    orthogonalized there, its rows sent back): equal, step by step, to a single-process run of
    torch.optim.Muon and AdamW on the same global batch; under FSDP2 a DCP save and load into
    a fresh model and optimizer continues bit for bit."""
    def build():
        model = muon_model()
        if wrap == "ddp":
            model = DistributedDataParallel(model)
        else:
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
        return model, fastopt.Muon(muon_groups(model), lr=0.02, backend=backend)

    model, opt = build()
    ref = muon_model()
    ref_opts = muon_reference(ref)
    for step in range(STEPS):
        train(model, opt, rank, 1, first=step)
        close_to_step(model, ref, reference_step(ref, ref_opts, step))
    if wrap == "ddp":
        check_ranks_agree(model)
        return
    last = model[-1].weight  # 1 x 16: rank 1 holds no row of it
    assert isinstance(last, DTensor) and last.to_local().numel() == (16 if rank == 0 else 0)
    saved = get_optimizer_state_dict(model, opt)
    kinds = sorted(tuple(sorted(entry)) for entry in saved["state"].values())
    assert kinds == sorted([("momentum_buffer",)] * 5 + [("exp_avg", "exp_avg_sq", "step")] * 5)
    dcp.save({"model": get_model_state_dict(model), "optim": saved}, checkpoint_id=workdir)
    def more_steps(m, o):
        train(m, o, rank, 3, first=STEPS)

    more_steps(model, opt)
    resumes_bit_for_bit(model, build, workdir, more_steps, perturb=True)


SCENARIOS = {
    "ddp-AdamW": lambda rank, workdir: ddp(rank, "AdamW", bucket_view=False),
    "ddp-bucket-view-AdamW": lambda rank, workdir: ddp(rank, "AdamW", bucket_view=True),
    "ddp-bucket-view-SGD": lambda rank, workdir: ddp(rank, "SGD", bucket_view=True),
    "ddp-bucket-view-AdamW-triton": lambda rank, workdir: ddp(rank, "AdamW", True, "triton"),
    "fsdp2-AdamW": lambda rank, workdir: fsdp2(rank, "AdamW"),
    "fsdp2-Adam-amsgrad": lambda rank, workdir: fsdp2(rank, "Adam-amsgrad"),
    "fsdp2-SGD": lambda rank, workdir: fsdp2(rank, "SGD"),
    "fsdp2-AdamW-triton": lambda rank, workdir: fsdp2(rank, "AdamW", "triton"),
    "fsdp2-AdamW-max-grad-norm": lambda rank, workdir: fsdp2_clipped(rank),
    "zero-AdamW": lambda rank, workdir: zero(rank, "AdamW", bucket_view=False),
    "zero-bucket-view-AdamW": lambda rank, workdir: zero(rank, "AdamW", bucket_view=True),
    "zero-bucket-view-SGD": lambda rank, workdir: zero(rank, "SGD", bucket_view=True),
    "dcp-fsdp2-AdamW": lambda rank, workdir: checkpoint(rank, "AdamW", workdir),
    "dcp-fsdp2-SGD": lambda rank, workdir: checkpoint(rank, "SGD", workdir),
    "ddp-bucket-view-NAdam": lambda rank, workdir: ddp(rank, "NAdam", bucket_view=True),
    "ddp-RMSprop-triton": lambda rank, workdir: ddp(rank, "RMSprop", False, "triton"),
    "fsdp2-NAdam": lambda rank, workdir: fsdp2(rank, "NAdam"),
    "fsdp2-ASGD": lambda rank, workdir: fsdp2(rank, "ASGD"),
    "fsdp2-Adagrad": lambda rank, workdir: fsdp2(rank, "Adagrad"),
    "fsdp2-NAdam-triton": lambda rank, workdir: fsdp2(rank, "NAdam", "triton"),
    "zero-bucket-view-RMSprop": lambda rank, workdir: zero(rank, "RMSprop", bucket_view=True),
    "dcp-fsdp2-NAdam": lambda rank, workdir: checkpoint(rank, "NAdam", workdir),
    "dcp-fsdp2-ASGD": lambda rank, workdir: checkpoint(rank, "ASGD", workdir),
    "dcp-fsdp2-bf16-remainder": fsdp2_remainder,
    "ddp-Muon": lambda rank, workdir: muon_distributed(rank, workdir, "ddp"),
    "dcp-fsdp2-Muon": lambda rank, workdir: muon_distributed(rank, workdir, "fsdp2"),
    # the AdamW group's shards updated by the kernels (Triton's interpreter)
    "dcp-fsdp2-Muon-triton": lambda rank, workdir: muon_distributed(rank, workdir, "fsdp2",
                                                                    "triton"),
    "ddp-AdamW-int8": lambda rank, workdir: quantized(rank, "int8", "ddp"),
    "zero-AdamW-int4": lambda rank, workdir: quantized(rank, "int4", "zero"),
    "ddp-AdamW-int4": lambda rank, workdir: quantized(rank, "int4", "ddp"),
}
# The Triton kernels run on CPU tensors only through Triton's interpreter.
NEEDS_INTERPRETER = {name for name in SCENARIOS if name.endswith("-triton")}


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    global DEVICE
    if BACKEND == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    results = {}
    workdir = os.path.join(out_dir, "checkpoints")
    only = os.environ.get("FASTOPT_DIST_ONLY")
    for name, run in SCENARIOS.items():
        triton_ok = os.environ.get("TRITON_INTERPRET") == "1" or DEVICE.type == "cuda"
        if (only and only not in name) or (name in NEEDS_INTERPRETER and not triton_ok):
            continue
        try:
            run(rank, os.path.join(workdir, name))
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc(limit=6)
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()
    # Leave without interpreter finalization: gloo's worker threads can still hold tensors
    # there and abort the process (SIGABRT, "terminate called without an active exception";
    # pytorch/pytorch#179291) after every result above is written.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
