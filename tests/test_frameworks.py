"""fastopt inside the tools people train with: transformers' Trainer, accelerate, safetensors,
torch.compile, and torch.save of part of a model.

Each test runs the same model, data and seeds through fastopt and through torch.optim
(foreach=False) and compares the params: per step within fp32 rounding (the project standard),
after several steps through a model within ``LONG`` (a last-bit difference in one step changes
the next step's grads through the forward and backward, so differences compound).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastopt

FP32 = dict(rtol=2e-6, atol=2e-7)  # one step (tests/helpers.py TOLERANCES[torch.float32])
LONG = dict(rtol=1e-5, atol=1e-6)  # several steps through a model (see the module docstring)

VOCAB, WIDTH, SEQ = 100, 32, 16
LR = 1e-3
TRAINER_STEPS = 6

# The layouts the saving tests run with: the default flat buffers (each param a slot with a
# storage of its own) and ``flatten_params=False`` (params stay where they are).
FLATTEN_OPTIONS = [pytest.param({}, id="default"),
                   pytest.param({"flatten_params": False}, id="flatten_params=False")]


# ---------------------------------------------------------------------------------- helpers
def token_batches(steps: int, batch: int = 4, seed: int = 0) -> list:
    """``steps`` batches of random token ids, ``[batch, SEQ]`` each."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, SEQ), generator=gen) for _ in range(steps)]


def token_rows(n: int = 24, seed: int = 0) -> list:
    """A dataset of ``n`` rows ``{"input_ids", "labels"}`` (causal LM: labels are the ids)."""
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def gpt2(seed: int = 0, tied: bool = True):
    """A tiny randomly initialised GPT2LMHeadModel (lm_head tied to wte unless ``tied=False``).
    Dropout is off so that runs differ only by their optimizer (and resumed runs do not depend
    on the framework restoring the RNG)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=WIDTH, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


class TiedLM(torch.nn.Module):
    """A tiny language model whose output projection is its embedding (tied, as GPT-2's)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.block = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(),
                                         torch.nn.LayerNorm(WIDTH))
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.block(self.embed(ids)))

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def mlp(seed: int = 0) -> torch.nn.Module:
    """A small MLP (8 -> 16 -> 4) for the torch.compile tests (quick to compile)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def torch_adamw(params, **kwargs):
    """The reference: torch.optim.AdamW, for-loop implementation."""
    return torch.optim.AdamW(params, foreach=False, **kwargs)


def train_tied(model: TiedLM, optimizer, batches: list) -> None:
    """A plain loop: zero_grad (set_to_none), forward, backward, step."""
    for ids in batches:
        optimizer.zero_grad()
        model.loss(ids).backward()
        optimizer.step()


def assert_params_close(model, reference, **tol) -> None:
    """Every named param of ``model`` equals ``reference``'s (same architecture)."""
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[name].detach(), **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def key_bias_atol(steps: int, normalized: bool = False) -> float:
    """How far apart two correct AdamW runs (lr=LR) may put GPT-2's key biases after ``steps``.

    The key bias (middle third of each ``attn.c_attn.bias``) gets no gradient in exact
    arithmetic: softmax(q . (k + b)) over the keys does not depend on b. Its grads are rounding
    noise (~1e-11 here), which Adam divides by sqrt(v) + eps (eps=1e-8), so each step moves it by
    up to ~1.5e-3 * lr in a direction rounding decides. Implementations that round differently
    drift apart there by about that much per step (measured: fastopt, and torch.optim.AdamW's
    own fused=True, vs foreach=False: 2.7e-6 after 6 steps at lr=1e-3, 4.2e-6 after 12), beyond
    LONG. A wrong update would move it by ~lr per step.

    Adagrad (``normalized``) divides by the root of the summed squared grads, with eps=1e-10
    below the noise: it moves the key bias by a noise-decided fraction of lr each step, up to
    lr (|g| <= sqrt(sum of g**2)), and two correct runs differ there by up to lr per step; only
    that bound is checked for it (every other param at LONG)."""
    return LR * steps if normalized else 4e-3 * LR * steps


def assert_gpt2_close(model, reference, steps: int, normalized: bool = False) -> None:
    """GPT-2 params within LONG, except the key biases (within ``key_bias_atol``)."""
    key = slice(WIDTH, 2 * WIDTH)  # c_attn.bias is [query | key | value]
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        actual, expected = p.detach(), ref[name].detach()
        if name.endswith("attn.c_attn.bias"):
            torch.testing.assert_close(actual[key], expected[key], rtol=0,
                                       atol=key_bias_atol(steps, normalized),
                                       msg=lambda m, name=name: f"{name} (key part): {m}")
            actual, expected = actual.clone(), expected.clone()
            actual[key] = expected[key] = 0
        torch.testing.assert_close(actual, expected, **LONG,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------- transformers
def trainer_args(output_dir):
    """6 steps (one epoch of ``token_rows()``), a checkpoint every 3; weight_decay > 0 so
    Trainer's decay / no-decay param groups differ. The checkpoints are safetensors (the only
    format transformers 5 writes: it has no ``save_safetensors`` argument any more)."""
    transformers = pytest.importorskip("transformers")
    return transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=TRAINER_STEPS, save_steps=3,
        per_device_train_batch_size=4, weight_decay=0.1, seed=0, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=1000, dataloader_num_workers=0)


def run_trainer(model, output_dir, *, resume=None, **trainer_kwargs):
    """Train ``model`` with a Trainer (``trainer_kwargs``: how the optimizer is given)."""
    transformers = pytest.importorskip("transformers")
    trainer = transformers.Trainer(model=model, args=trainer_args(output_dir),
                                   train_dataset=token_rows(), **trainer_kwargs)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


def inner_optimizer(trainer):
    """The optimizer Trainer built or was given (it wraps it in accelerate's
    AcceleratedOptimizer)."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def same_groups(optimizer, model, twin) -> list:
    """``optimizer``'s param groups (over ``model``) with ``twin``'s params of the same names
    and the same weight_decay: Trainer's decay / no-decay split, for a torch.optim reference."""
    names = {id(p): n for n, p in model.named_parameters()}
    twin_params = dict(twin.named_parameters())
    return [{"params": [twin_params[names[id(p)]] for p in g["params"]],
             "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]


def muon_groups(model) -> list:
    """Muon for GPT-2's hidden matrices, AdamW (a ``use_muon=False`` group) for embeddings,
    biases and norms."""
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and ".h." in f".{n}"]
    other = [p for n, p in model.named_parameters() if not (p.ndim == 2 and ".h." in f".{n}")]
    assert hidden and other
    return [{"params": hidden}, {"params": other, "use_muon": False, "lr": LR}]


def fastopt_trainer_kwargs(how: str, model) -> dict:
    if how == "optimizer_cls_and_kwargs":
        return dict(optimizer_cls_and_kwargs=(fastopt.AdamW, {"lr": LR}))
    if how == "muon":  # one optimizer for the whole model: Muon and its AdamW group
        return dict(optimizers=(fastopt.Muon(muon_groups(model), lr=0.02), None))
    return dict(optimizers=(fastopt.AdamW(model.parameters(), lr=LR), None))


def test_trainer_optimizer_cls_and_kwargs_matches_torch_adamw(tmp_path):
    """Trainer(optimizer_cls_and_kwargs=(fastopt.AdamW, {"lr": 1e-3})) builds fastopt.AdamW over
    its decay / no-decay groups; after 6 steps (linear lr decay, a checkpoint at step 3) the
    params equal a Trainer given torch.optim.AdamW(foreach=False) over the same groups through
    ``optimizers=(optimizer, None)``."""
    model, twin = gpt2(), gpt2()
    trainer = run_trainer(model, tmp_path / "fastopt",
                          optimizer_cls_and_kwargs=(fastopt.AdamW, {"lr": LR}))
    ours = inner_optimizer(trainer)
    assert isinstance(ours, fastopt.AdamW)
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    reference = torch_adamw(same_groups(ours, model, twin), lr=LR)
    run_trainer(twin, tmp_path / "torch", optimizers=(reference, None))
    assert_gpt2_close(model, twin, TRAINER_STEPS)


@pytest.mark.parametrize("name,kwargs", [("NAdam", dict(lr=LR)), ("Adagrad", dict(lr=LR))])
def test_trainer_builds_other_fastopt_optimizers_and_matches_torch(tmp_path, name, kwargs):
    """Trainer(optimizer_cls_and_kwargs=(fastopt.<name>, ...)) for 6 steps over Trainer's decay
    / no-decay groups equals torch.optim.<name> (foreach=False) over the same groups."""
    model, twin = gpt2(), gpt2()
    trainer = run_trainer(model, tmp_path / "fastopt",
                          optimizer_cls_and_kwargs=(getattr(fastopt, name), kwargs))
    ours = inner_optimizer(trainer)
    assert type(ours) is getattr(fastopt, name)
    reference = getattr(torch.optim, name)(same_groups(ours, model, twin), foreach=False,
                                           **kwargs)
    run_trainer(twin, tmp_path / "torch", optimizers=(reference, None))
    assert_gpt2_close(model, twin, TRAINER_STEPS, normalized=name == "Adagrad")


def test_trainer_given_a_fastopt_optimizer_matches_torch_adamw(tmp_path):
    """Trainer(optimizers=(fastopt.AdamW(model.parameters(), lr=1e-3), None)) for 6 steps equals
    Trainer(optimizers=(torch.optim.AdamW(..., foreach=False), None))."""
    model, twin = gpt2(), gpt2()
    run_trainer(model, tmp_path / "fastopt", **fastopt_trainer_kwargs("optimizers", model))
    run_trainer(twin, tmp_path / "torch", optimizers=(torch_adamw(twin.parameters(), lr=LR), None))
    assert_gpt2_close(model, twin, TRAINER_STEPS)


@pytest.mark.parametrize("how", ["optimizer_cls_and_kwargs", "optimizers", "muon"])
def test_trainer_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path, how):
    """A Trainer run with fastopt.AdamW (or fastopt.Muon with an AdamW group) saves checkpoint-3 (model.safetensors, optimizer.pt,
    scheduler.pt) and goes on to step 6; a second Trainer (fresh model, differently initialised,
    fresh fastopt.AdamW) resumes from checkpoint-3 to step 6: its params equal the
    uninterrupted run's, bit for bit."""
    model = gpt2()
    run_trainer(model, tmp_path / "run", **fastopt_trainer_kwargs(how, model))
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file()
    resumed = gpt2(seed=1)  # the checkpoint's weights must replace these
    run_trainer(resumed, tmp_path / "resumed", resume=checkpoint,
                **fastopt_trainer_kwargs(how, resumed))
    assert_params_close(resumed, model, rtol=0, atol=0)  # README: resume is bit-identical


# ---------------------------------------------------------------------------------- accelerate
ACCELERATE_STEPS = (3, 3)  # before save_state, after load_state


def accelerate_setup(model_fn, optimizer_fn, seed: int):
    """A fresh ``Accelerator(cpu=True)`` and its ``prepare(model, optimizer, dataloader)``
    (``model_fn(seed)``, ``optimizer_fn(params)``, in-order batches of 4 ``token_rows``)."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = model_fn(seed)
    optimizer = optimizer_fn(model.parameters())
    rows = token_rows(n=4 * sum(ACCELERATE_STEPS))
    loader = torch.utils.data.DataLoader(rows, batch_size=4, shuffle=False)
    return (accelerator, *accelerator.prepare(model, optimizer, loader))


def accelerate_train(accelerator, model, optimizer, loader, steps: int) -> None:
    """``steps`` steps of accelerate's loop: backward through the accelerator, step, zero_grad."""
    for i, batch in enumerate(loader):
        if i == steps:
            break
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()


def accelerate_round_trip(model_fn, optimizer_fn, state_dir):
    """Prepare, train, ``save_state`` (default safe_serialization=True); then a fresh
    Accelerator, model (differently initialised) and optimizer, prepared the same way,
    ``load_state``, and train on the following batches. Returns the final model."""
    first, after = ACCELERATE_STEPS
    accelerator, model, optimizer, loader = accelerate_setup(model_fn, optimizer_fn, seed=0)
    accelerate_train(accelerator, model, optimizer, loader, first)
    accelerator.save_state(str(state_dir))

    accelerator, model, optimizer, loader = accelerate_setup(model_fn, optimizer_fn, seed=1)
    accelerator.load_state(str(state_dir))
    accelerate_train(accelerator, model, optimizer,
                     accelerator.skip_first_batches(loader, first), after)
    return accelerator.unwrap_model(model)


def test_accelerate_save_state_writes_every_param(tmp_path):
    """After prepare and 3 steps, the model.safetensors that ``save_state`` writes holds the same
    tensors as with torch.optim.AdamW (every param but the tied lm_head.weight), with the
    trained values."""
    st = pytest.importorskip("safetensors.torch")

    def save_state(optimizer_fn, state_dir):
        accelerator, model, optimizer, loader = accelerate_setup(gpt2, optimizer_fn, seed=0)
        accelerate_train(accelerator, model, optimizer, loader, ACCELERATE_STEPS[0])
        accelerator.save_state(str(state_dir))
        return st.load_file(str(state_dir / "model.safetensors")), model.state_dict()

    saved, trained = save_state(lambda params: fastopt.AdamW(params, lr=LR), tmp_path / "fastopt")
    ref_saved, _ = save_state(lambda params: torch_adamw(params, lr=LR), tmp_path / "torch")
    assert sorted(saved) == sorted(ref_saved)
    for key, value in saved.items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize("options", FLATTEN_OPTIONS)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_accelerate_save_state_load_state_matches_torch(tmp_path, tied, options):
    """accelerate's save_state / load_state round trip into a fresh model and optimizer, then
    3 more steps: fastopt.AdamW's params equal torch.optim.AdamW(foreach=False)'s through the
    same procedure. GPT2LMHeadModel with lm_head tied to wte (the default), and untied."""
    ours = accelerate_round_trip(lambda seed: gpt2(seed, tied),
                                 lambda params: fastopt.AdamW(params, lr=LR, **options),
                                 tmp_path / "fastopt")
    ref = accelerate_round_trip(lambda seed: gpt2(seed, tied),
                                lambda params: torch_adamw(params, lr=LR), tmp_path / "torch")
    if tied:
        assert ours.lm_head.weight is ours.transformer.wte.weight
    assert_gpt2_close(ours, ref, steps=sum(ACCELERATE_STEPS))


# ---------------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("options", FLATTEN_OPTIONS)
def test_safetensors_save_model_of_a_tied_model_trained_with_fastopt(tmp_path, options):
    """safetensors.torch.save_model on a tied-weight model after 3 fastopt.AdamW steps, then
    load_model into a fresh model: every param equals the trained one, the tie is kept, and the
    file is the size of one saved after torch.optim.AdamW's steps."""
    st = pytest.importorskip("safetensors.torch")
    batches = token_batches(3)
    model, twin = TiedLM(), TiedLM()
    train_tied(model, fastopt.AdamW(model.parameters(), lr=LR, **options), batches)
    train_tied(twin, torch_adamw(twin.parameters(), lr=LR), batches)
    ours, ref = tmp_path / "fastopt.safetensors", tmp_path / "torch.safetensors"
    st.save_model(model, str(ours))
    st.save_model(twin, str(ref))

    loaded = TiedLM(seed=1)
    st.load_model(loaded, str(ours))
    assert loaded.head.weight is loaded.embed.weight
    assert_params_close(loaded, model, rtol=0, atol=0)
    assert_params_close(loaded, twin, **LONG)
    assert os.path.getsize(ours) == os.path.getsize(ref)


@pytest.mark.parametrize("options", FLATTEN_OPTIONS)
def test_safetensors_load_model_into_a_tied_model_with_a_fastopt_optimizer(tmp_path, options):
    """Resuming: safetensors.torch.load_model of a checkpoint into a fresh tied-weight model that
    already has its fastopt.AdamW (params laid out); then 3 steps of fastopt and of
    torch.optim.AdamW (foreach=False) from the loaded weights agree."""
    st = pytest.importorskip("safetensors.torch")
    saved = TiedLM()
    train_tied(saved, torch_adamw(saved.parameters(), lr=LR), token_batches(2))
    st.save_model(saved, str(tmp_path / "checkpoint.safetensors"))

    model, twin = TiedLM(seed=1), TiedLM(seed=1)
    optimizer = fastopt.AdamW(model.parameters(), lr=LR, **options)
    reference = torch_adamw(twin.parameters(), lr=LR)
    st.load_model(model, str(tmp_path / "checkpoint.safetensors"))
    st.load_model(twin, str(tmp_path / "checkpoint.safetensors"))
    assert_params_close(model, saved, rtol=0, atol=0)
    batches = token_batches(3, seed=1)
    train_tied(model, optimizer, batches)
    train_tied(twin, reference, batches)
    assert_params_close(model, twin, **LONG)


# ---------------------------------------------------------------------------------- torch.compile
@pytest.fixture
def fresh_dynamo():
    """Each compile test starts from (and leaves) an empty dynamo cache."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TorchMuonWithAdamW:
    """torch.optim.Muon on ``groups[0]`` and torch.optim.AdamW (for-loop) on ``groups[1]``."""

    def __init__(self, groups, lr, **_):
        self.parts = [torch.optim.Muon(groups[0]["params"], lr=lr),
                      torch.optim.AdamW(groups[1]["params"], lr=lr, foreach=False)]

    def step(self):
        for part in self.parts:
            part.step()


def _muon(params, lr, foreach=None):
    params = list(params)
    return [{"params": [p for p in params if p.ndim == 2]},
            {"params": [p for p in params if p.ndim != 2], "use_muon": False, "lr": lr}]


COMPILE_PAIRS = {
    "SGD": (fastopt.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    "Adam": (fastopt.Adam, torch.optim.Adam, dict(lr=1e-2)),
    "AdamW": (fastopt.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    "NAdam": (fastopt.NAdam, torch.optim.NAdam, dict(lr=1e-2)),
    "RMSprop": (fastopt.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),
    "Muon": (lambda params, **kw: fastopt.Muon(_muon(params, kw["lr"]), **kw),
             lambda params, foreach, **kw: TorchMuonWithAdamW(_muon(params, kw["lr"]), **kw),
             dict(lr=1e-2)),
}


@pytest.mark.parametrize("name", list(COMPILE_PAIRS))
def test_compiled_optimizer_step_matches_torch(fresh_dynamo, name):
    """torch's recipe for compiling the step (``@torch.compile(fullgraph=False) def fn():
    opt.step()``) with a fastopt optimizer: 5 steps equal the torch.optim one (foreach=False)
    stepped eagerly, step by step (fp32 rounding)."""
    ours_cls, ref_cls, options = COMPILE_PAIRS[name]
    model, twin = mlp(), mlp()
    opt = ours_cls(model.parameters(), **options)
    ref = ref_cls(twin.parameters(), foreach=False, **options)

    @torch.compile(fullgraph=False)
    def compiled_step():
        opt.step()

    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(32, 8, generator=gen)
        for net in (model, twin):
            net.zero_grad()
            net(x).pow(2).mean().backward()
        compiled_step()
        ref.step()
        assert_params_close(model, twin, **FP32)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_compiled_training_function_zeroes_grads_as_torch_eagerly(fresh_dynamo, set_to_none):
    """``zero_grad`` inside a compiled function runs eagerly, as torch.optim's: dynamo does not
    trace its flat-buffer work (no warnings about what it cannot trace), and the steps
    equal torch's."""
    import warnings

    model, twin = mlp(), mlp()
    opt = fastopt.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    ref = torch.optim.SGD(twin.parameters(), lr=1e-2, momentum=0.9, foreach=False)

    def train(net, optimizer, x):
        optimizer.zero_grad(set_to_none=set_to_none)
        net(x).pow(2).mean().backward()

    compiled = torch.compile(train)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            x = torch.randn(32, 8, generator=gen)
            compiled(model, opt, x)
            opt.step()
            train(twin, ref, x)
            ref.step()
            assert_params_close(model, twin, **FP32)
    assert not [w for w in caught if "dynamo" in str(w.message).lower()
                or "trace" in str(w.message).lower()]


def test_compiled_model_trained_with_fastopt_matches_torch(fresh_dynamo):
    """``torch.compile(model)`` (inductor) trained for 5 steps with fastopt.AdamW equals the same
    compiled model trained with torch.optim.AdamW(foreach=False), step by step."""
    model, twin = mlp(), mlp()
    opt = fastopt.AdamW(model.parameters(), lr=1e-2)
    ref = torch_adamw(twin.parameters(), lr=1e-2)
    compiled, compiled_twin = torch.compile(model), torch.compile(twin)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(32, 8, generator=gen)
        for net, optimizer in ((compiled, opt), (compiled_twin, ref)):
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
            optimizer.step()
        assert_params_close(model, twin, **FP32)


# ---------------------------------------------------------------------------------- partial saves
@pytest.mark.parametrize("options", FLATTEN_OPTIONS)
def test_torch_save_of_one_layer_writes_only_that_layer(tmp_path, options):
    """``torch.save(model.block.state_dict())`` after 3 fastopt.AdamW steps writes a file the
    size of the one written after torch.optim.AdamW's steps (torch.save writes a view's whole
    storage), and it loads back to that layer's values."""
    batches = token_batches(3)
    model, twin = TiedLM(), TiedLM()
    train_tied(model, fastopt.AdamW(model.parameters(), lr=LR, **options), batches)
    train_tied(twin, torch_adamw(twin.parameters(), lr=LR), batches)
    # Same file name: torch.save names the archive's entries after it.
    ours, ref = tmp_path / "fastopt" / "layer.pt", tmp_path / "torch" / "layer.pt"
    for path, net in ((ours, model), (ref, twin)):
        path.parent.mkdir()
        torch.save(net.block.state_dict(), path)

    size, ref_size = os.path.getsize(ours), os.path.getsize(ref)
    assert size == ref_size, f"{size} bytes, torch.optim's: {ref_size}"
    loaded = torch.load(ours, weights_only=True)
    for name, value in model.block.state_dict().items():
        assert torch.equal(loaded[name], value), name
