"""Params fastopt must not move (views into someone else's buffer) and state changed from
outside the optimizer (as ZeroRedundancyOptimizer.load_state_dict does)."""

import pickle

import pytest
import torch
from helpers import (BACKENDS, PAIRS, TOLERANCES, assert_state_close, lives_in, make_params,
                     reference_step, steppable)
from optim_db import BY_NAME, NAMES

import fastopt

# every optimizer of tests/optim_db.py, in its richest configuration
OPTIONS = {name: {**BY_NAME[name].typical, **BY_NAME[name].configs[-1][0]} for name in NAMES}
SHAPES = [(129,), (), (0,), (4, 5), (1,)]


def views_of_one_buffer(shapes, seed=0, transpose=False):
    """Params that are views into one user-owned buffer (as Apex or ZeRO's bucket views)."""
    init = make_params(shapes, seed=seed)
    buffer = torch.cat([t.reshape(-1) for t in init])
    params, offset = [], 0
    for t in init:
        view = buffer[offset : offset + t.numel()].view(t.shape)
        if transpose and view.dim() == 2:
            view = buffer[offset : offset + t.numel()].view(t.shape[::-1]).t()
            view.copy_(t)
        params.append(torch.nn.Parameter(view))
        offset += t.numel()
    return buffer, params


def step_against_torch(ours, ref, ours_params, ref_params, steps: int, backend: str,
                       before=None) -> None:
    """``steps`` steps of both on the same fresh grads (param 3 has none in step 2): params and
    state compared after each (the reference's square roots as the backend's, reference_step)."""
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if before is not None:
            before(step)  # what the test does to both before this step
        for i, (p, q) in enumerate(zip(ours_params, ref_params)):
            if step == 2 and i == 3:  # a param without a grad this step
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        reference_step(ref, backend)
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
        assert_state_close(ours, ref, ours_params, ref_params, TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transpose", [False, True], ids=["contiguous", "transposed"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_views_of_a_foreign_buffer_stay_in_place_and_match_torch(name, transpose, backend):
    buffer, ours_params = views_of_one_buffer(steppable(name, SHAPES), transpose=transpose)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    pointers = [p.data_ptr() for p in ours_params]
    ours_cls, ref_cls = PAIRS[name]
    ours = ours_cls(ours_params, backend=backend, **OPTIONS[name])
    ref = ref_cls(ref_params, **OPTIONS[name])
    step_against_torch(ours, ref, ours_params, ref_params, steps=6, backend=backend)
    # The owner's buffer holds the updated values: nothing was moved out of it.
    assert [p.data_ptr() for p in ours_params] == pointers
    assert all(b.external and b.flat is None for b in ours._buckets[0])
    flat = torch.cat([p.detach().reshape(-1) for p in ref_params])
    if not transpose:
        torch.testing.assert_close(buffer, flat, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("how", ["add_param_group", "second optimizer"])
@pytest.mark.parametrize("name", ["SGD", "AdamW", "Adagrad", "Rprop"])
def test_a_param_made_as_part_of_a_laid_out_one_stays_a_view_of_it(name, how):
    """``b = Parameter(a.detach()[2:6])`` made after ``a`` was laid out, then stepped (added
    to the optimizer, or by a second one): b stays a view of a's elements, as with torch, and
    both step as torch's do."""
    ours_cls, ref_cls = PAIRS[name]
    results = []
    for cls in (ref_cls, ours_cls):
        a = torch.nn.Parameter(make_params([(10,)])[0])
        if cls is ref_cls and how == "add_param_group":
            # torch moves nothing, so its b may come first (torch 2.11's Adagrad makes no
            # state for a group added later)
            b = torch.nn.Parameter(a.detach()[2:6])
            opts = [cls([{"params": [a]}, {"params": [b]}], **BY_NAME[name].typical)]
        else:
            opt = cls([a], **BY_NAME[name].typical)
            b = torch.nn.Parameter(a.detach()[2:6])
            if how == "add_param_group":
                opt.add_param_group({"params": [b]})
                opts = [opt]
            else:
                opts = [opt, cls([b], **BY_NAME[name].typical)]
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            a.grad, b.grad = torch.randn(10, generator=gen), torch.randn(4, generator=gen)
            for o in opts:
                o.step()
        assert b.data_ptr() == a.data_ptr() + 2 * a.element_size()
        results.append((a.detach().clone(), b.detach().clone()))
    torch.testing.assert_close(results[1], results[0], **TOLERANCES[torch.float32])


def test_owned_params_still_move_and_a_second_optimizer_takes_them_over():
    params = [torch.nn.Parameter(t) for t in make_params([(3, 4), (5,)])]
    first = fastopt.AdamW(params)
    assert not first._buckets[0][0].external
    second = fastopt.AdamW(params)  # e.g. a new training phase: params are views of first's
    bucket = second._buckets[0][0]
    assert not bucket.external
    assert lives_in(params[0], bucket.flat)
    # An unpickled optimizer's params are views of one restored buffer: laid out again too.
    clone = pickle.loads(pickle.dumps(second))
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    clone.step()
    assert not clone._buckets[0][0].external


def test_params_re_pointed_into_a_foreign_buffer_become_external_keeping_state():
    """As ZeroRedundancyOptimizer(parameters_as_bucket_view=True) does after its local
    optimizer exists: fastopt must then update the params inside that buffer."""
    init = make_params([(7,), (2, 3)])
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    ours = fastopt.Adam(ours_params, lr=0.1)
    ref = torch.optim.Adam(ref_params, lr=0.1, foreach=False)
    for step in range(4):
        if step == 2:
            bucket = torch.cat([p.detach().reshape(-1) for p in ours_params])
            ours_params[0].data = bucket[:7]
            ours_params[1].data = bucket[7:].view(2, 3)
        for p, q in zip(ours_params, ref_params):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
    assert ours._buckets[0][0].external
    torch.testing.assert_close(bucket[:7], ref_params[0].detach())


@pytest.mark.parametrize("how", ["replace entry", "replace tensor", "delete entry", "clear",
                                 "pop", "update"])
def test_state_changed_from_outside_is_used_by_the_next_step(how):
    init = make_params([(9,), (4, 4)])
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    ours = fastopt.AdamW(ours_params, lr=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.1, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        if step == 2:
            for opt, p in ((ours, ours_params[1]), (ref, ref_params[1])):
                if how == "replace entry":
                    opt.state[p] = {k: v.clone() * 2 for k, v in opt.state[p].items()}
                elif how == "replace tensor":
                    opt.state[p]["exp_avg"] = torch.full((4, 4), 0.5)
                elif how == "delete entry":
                    del opt.state[p]
                elif how == "clear":
                    opt.state.clear()
                elif how == "pop":
                    opt.state.pop(p)
                else:
                    opt.state.update({p: {}})
        for p, q in zip(ours_params, ref_params):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
        assert_state_close(ours, ref, ours_params, ref_params, TOLERANCES[torch.float32])
    # After the step the state is fastopt's flat views again.
    flat = ours._buckets[0][0].state.tensors["exp_avg"]
    for p in ours_params:
        assert lives_in(ours.state[p]["exp_avg"], flat)


SCALAR_KEEPERS = [name for name in OPTIONS
                  if fastopt.registry.get(name).declaration.scalars and name != "Adafactor"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edited", [0, 1])
@pytest.mark.parametrize("name", SCALAR_KEEPERS)
def test_a_kept_scalar_edited_in_place_is_used_by_the_next_step(name, edited, backend):
    """``opt.state[p]["step"].zero_()`` (and NAdam's ``mu_product``, ASGD's ``eta``...
    written in place): the edited param steps from its new values, the others from theirs,
    as torch's steps do."""
    ours_cls, ref_cls = PAIRS[name]
    shapes = [(5,), (3, 4), (6,)]
    if not steppable(name, shapes):
        pytest.skip("takes matrices only")
    init = make_params(shapes)
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    ours = ours_cls(ours_params, backend=backend, **OPTIONS[name])
    ref = ref_cls(ref_params, **OPTIONS[name])

    def edit(step):
        if step != 3:
            return
        for opt, p in ((ours, ours_params[edited]), (ref, ref_params[edited])):
            for key in fastopt.registry.get(name).declaration.scalar_names:
                if key in opt.state[p]:
                    opt.state[p][key].mul_(0.5) if key != "step" else opt.state[p][key].zero_()

    step_against_torch(ours, ref, ours_params, ref_params, 5, backend, before=edit)


@pytest.mark.parametrize("name", SCALAR_KEEPERS)
def test_no_step_of_its_own_reads_the_scalar_table_back(name, monkeypatch):
    """fastopt's own writes of the table (steps, GradScaler's skipped steps, a load, a copy)
    never look like an edit from outside: reading the run keys back from a GPU table would
    sync."""
    import copy

    import fastopt.step

    refreshed = []
    monkeypatch.setattr(fastopt.step, "refresh_ids", lambda *args: refreshed.append(args))
    ours_cls, _ = PAIRS[name]
    shapes = [(5,), (3, 4), (6,)]
    if not steppable(name, shapes):
        pytest.skip("takes matrices only")
    params = [torch.nn.Parameter(t) for t in make_params(shapes)]
    opt = ours_cls(params, **OPTIONS[name])
    for step in range(6):
        for i, p in enumerate(params):
            p.grad = None if (step == 1 and i == 1) else torch.randn_like(p)
        if step == 2:
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
        opt.step()
        opt.grad_scale = opt.found_inf = None
        if step == 3:
            opt.load_state_dict(opt.state_dict())
        if step == 4:
            opt = copy.deepcopy(opt)
            params = opt.param_groups[0]["params"]
    assert not refreshed


def test_the_state_copies_merges_and_prints_as_torchs_defaultdict():
    """``opt.state.copy()``, ``copy.copy``, ``|`` give what torch's give (a defaultdict of the
    same entries); ``|=`` is a change the next step sees; the repr is torch's."""
    import copy

    results = []
    for cls in (torch.optim.Adam, fastopt.Adam):
        p = torch.nn.Parameter(torch.ones(3))
        opt = cls([p], lr=0.1)
        p.grad = torch.ones(3)
        opt.step()
        for copied in (opt.state.copy(), copy.copy(opt.state), opt.state | {}, {} | opt.state):
            assert type(copied) is type(torch.optim.Adam([p]).state)
            assert copied[p] is opt.state[p] and copied.default_factory is dict
        assert opt.state.default_factory is dict
        assert repr(opt.state).startswith("defaultdict(<class 'dict'>, {Parameter containing")
        opt.state |= {p: {k: v.clone() * 2 for k, v in opt.state[p].items()}}
        p.grad = torch.ones(3)
        opt.step()
        results.append((p.detach().clone(), opt.state[p]["exp_avg"].clone()))
    torch.testing.assert_close(results[1], results[0], rtol=2e-6, atol=2e-7)


def test_state_dict_entries_are_plain_dicts():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = fastopt.Adam(params)
    params[0].grad = torch.ones(3)
    opt.step()
    entry = opt.state_dict()["state"][0]
    assert type(entry) is dict and set(entry) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_param_whose_whole_storage_someone_else_holds_is_not_moved():
    """ZeroRedundancyOptimizer(parameters_as_bucket_view=True) on a rank that owns one param:
    its bucket is exactly that param, but the bucket is what ZeRO broadcasts."""
    param = torch.nn.Parameter(torch.randn(6))
    owner_bucket = torch.empty(6)
    owner_bucket.copy_(param.detach())
    param.data = owner_bucket.view(6)
    opt = fastopt.SGD([param], lr=0.5)
    param.grad = torch.ones(6)
    expected = owner_bucket - 0.5
    opt.step()
    assert opt._buckets[0][0].external
    torch.testing.assert_close(owner_bucket, expected)


def test_extra_state_written_by_other_code_is_kept_as_torch_keeps_it():
    """Wrappers (Lookahead-style) put their own entries in optimizer.state: counters, other
    shapes, non-tensors stay as they are; param-shaped floats keep their values."""
    init = make_params([(5,), (2, 3)])
    ours_params = [torch.nn.Parameter(t.clone()) for t in init]
    ours = fastopt.AdamW(ours_params, lr=0.1)
    for p in ours_params:
        p.grad = torch.ones_like(p)
    ours.step()
    slow = ours_params[0].detach().clone() * 3
    ours.state[ours_params[0]].update(counter=torch.tensor(7), stats=torch.ones(2), note="hi",
                                      slow=slow)
    ours.step()
    entry = ours.state[ours_params[0]]
    assert entry["counter"].dtype == torch.int64 and entry["counter"].shape == ()
    assert entry["stats"].shape == (2,) and entry["note"] == "hi"
    assert torch.equal(entry["slow"], slow)
    assert set(ours.state_dict()["state"][0]) >= {"counter", "stats", "note", "slow"}


@pytest.mark.parametrize("note", [0.5, "tensor"])
@pytest.mark.parametrize("name", ["SGD", "Adagrad"])  # the others (torch's) refuse a note there
def test_a_note_written_before_the_first_step_is_kept_beside_the_state_it_makes(name, note):
    """An entry (a per-param note, a number or a tensor) written into a param's state before
    its first step stays beside the state the step makes, as torch's SGD keeps it, and is not
    taken for state (SGD's first step with dampening starts its buffer at the grad)."""
    ours_cls, ref_cls = PAIRS[name]
    kwargs = dict(BY_NAME[name].typical, **({"dampening": 0.3} if name == "SGD" else {}))
    results = []
    for cls in (ours_cls, ref_cls):
        p = torch.nn.Parameter(torch.ones(3))
        opt = cls([p], **kwargs)
        opt.state[p]["lr_scale"] = torch.tensor(3) if note == "tensor" else note
        for _ in range(2):
            p.grad = torch.full((3,), 2.0)
            opt.step()
        results.append((sorted(opt.state[p]), sorted(opt.state_dict()["state"][0]),
                        p.detach().clone()))
    assert results[0][:2] == results[1][:2]
    torch.testing.assert_close(results[0][2], results[1][2], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_an_entry_one_param_keeps_stays_its_own_when_the_state_is_laid_out_again(name):
    """``opt.state[p0]["ema"] = t`` (param-shaped), then the state laid out again (a load):
    p0 keeps it, the bucket's other params get none, as with torch."""
    ours_cls, ref_cls = PAIRS[name]
    keys = []
    for cls in (ours_cls, ref_cls):
        params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
        opt = cls(params, **BY_NAME[name].typical)
        for p in params:
            p.grad = torch.ones(4)
        opt.step()
        opt.state[params[0]]["ema"] = torch.full((4,), 7.0)
        opt.load_state_dict(opt.state_dict())
        for p in params:
            p.grad = torch.ones(4)
        opt.step()
        assert torch.equal(opt.state[params[0]]["ema"], torch.full((4,), 7.0))
        keys.append([sorted(opt.state[p]) for p in params])
    assert keys[0] == keys[1]


def test_state_of_the_wrong_shape_fails_every_step_as_torch_does():
    """An entry set from outside with a shape that does not fit: each step raises, the
    optimizer still usable (state_dict, zero_grad) rather than broken."""
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = fastopt.Adam(params, lr=0.1)
    params[0].grad = torch.ones(3)
    opt.step()
    opt.state[params[0]]["exp_avg"] = torch.zeros(5)
    for _ in range(2):
        params[0].grad = torch.ones(3)
        with pytest.raises(RuntimeError, match="must match the size"):
            opt.step()
    opt.state_dict()
    opt.state[params[0]]["exp_avg"] = torch.zeros(3)
    opt.step()
    assert opt.state[params[0]]["step"].item() == 2


def test_a_group_pointed_at_other_params_of_the_same_count_updates_them():
    old = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    new = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    opt = fastopt.SGD(old, lr=1.0)
    opt.param_groups[0]["params"] = new
    for p in new:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(torch.equal(p.detach(), -torch.ones_like(p)) for p in new)
    assert all(torch.equal(p.detach(), torch.zeros_like(p)) for p in old)


def test_two_optimizers_sharing_a_param_settle_instead_of_taking_it_from_each_other():
    shared_init, a_init, b_init = torch.randn(3), torch.randn(50), torch.randn(40)
    ours = [torch.nn.Parameter(t.clone()) for t in (shared_init, a_init, b_init)]
    ref = [torch.nn.Parameter(t.clone()) for t in (shared_init, a_init, b_init)]
    first, second = fastopt.AdamW([ours[1], ours[0]]), fastopt.AdamW([ours[2], ours[0]])
    ref_first = torch.optim.AdamW([ref[1], ref[0]], foreach=False)
    ref_second = torch.optim.AdamW([ref[2], ref[0]], foreach=False)
    layouts = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        first.step()
        second.step()
        ref_first.step()
        ref_second.step()
        layouts.append((id(first._buckets[0]), id(second._buckets[0])))
    assert len(set(layouts[2:])) == 1  # no more re-layouts once settled
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton's interpreter")
@pytest.mark.parametrize("name", list(OPTIONS))
def test_aligned_views_of_a_foreign_buffer_are_updated_by_address_in_one_launch(name):
    """Params that stay in their owner's buffer at 16-byte aligned offsets (as ZeRO's bucket
    views or FSDP2's shards can be): the kernels read and write them by address, one launch per
    step for the whole bucket ("table" route), state flat, numbers equal torch.optim's; the
    owner's buffer holds the results. A step where one param has no grad updates the others
    one run at a time, as before."""
    shapes = steppable(name, [(129,), (), (0,), (4, 5), (1,), (1030,)])
    init = make_params(shapes, seed=2)
    sizes = [t.numel() for t in init]
    slots = [-(-n // 4) * 4 for n in sizes]  # 4 fp32 = 16 bytes
    buffer = torch.zeros(sum(slots))
    ours_params, offset = [], 0
    for t, slot in zip(init, slots):
        view = buffer[offset : offset + t.numel()].view(t.shape)
        view.copy_(t)
        ours_params.append(torch.nn.Parameter(view))
        offset += slot
    ref_params = [torch.nn.Parameter(t.clone()) for t in init]
    pointers = [p.data_ptr() for p in ours_params]
    ours_cls, ref_cls = PAIRS[name]
    ours = ours_cls(ours_params, backend="triton", **OPTIONS[name])
    ref = ref_cls(ref_params, **OPTIONS[name])
    routes = []
    update = ours.update
    ours.update = lambda g, b, plan, *a: (routes.append(plan.route), update(g, b, plan, *a))
    step_against_torch(ours, ref, ours_params, ref_params, steps=5, backend="triton")
    assert [p.data_ptr() for p in ours_params] == pointers
    bucket = ours._buckets[0][0]
    assert bucket.external and bucket.backend == "triton"
    # SGD's momentum and Adam's step counts split the run after the step without a grad; an
    # update that does not read external params by address (Adafactor's torch ops) takes
    # each param apart
    first = "table" if ours.reads_by_address(ours.param_groups[0], external=True) else "chunks"
    assert routes[:2] == [first, first] and routes[2] == "chunks"
