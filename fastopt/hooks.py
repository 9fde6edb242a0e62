"""torch.optim's step and state_dict hooks and profiler ranges, run by fastopt itself.

torch.optim wraps every optimizer class's ``step`` (``Optimizer.profile_hook_step``) to run the
step pre- and post-hooks inside a profiler range named ``Optimizer.step#<class>.step``, and opens
``Optimizer.zero_grad#<class>.zero_grad`` around ``zero_grad``. Opening a range costs about 10 us
per call on a CPU and makes every op inside it slower, whether or not a profiler records.
fastopt's ``step`` (marked ``hooked``, so torch does not wrap it) runs the same hooks in the same
order, and opens the same ranges only while a profiler (torch.profiler, emit_nvtx, emit_itt)
records.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from itertools import chain

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


# torch.optim's ``step(self, closure=None)``, as ``inspect.signature`` shows fastopt's step
# (which takes ``*args, **kwargs`` so that its hooks see the closure where the caller put it).
STEP_SIGNATURE = inspect.Signature([
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("closure", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])


def profiled(name: str, body, *args):
    """``body(*args)`` inside a profiler range named as torch.optim names it, when a profiler
    (torch.profiler, emit_nvtx, emit_itt) is recording; plain otherwise. torch.optim opens the
    range on every call, which costs about 10 us and makes every op inside it slower."""
    if not torch._C._autograd._profiler_enabled():
        return body(*args)
    with torch.autograd.profiler.record_function(name):
        return body(*args)


def run_hooked(opt, args: tuple, kwargs: dict):
    """torch.optim's step wrapper (``Optimizer.profile_hook_step``) around ``step(*args,
    **kwargs)`` (the closure as the caller passed it, positionally or by keyword: hooks see it
    where torch's show it): the global and the optimizer's step pre-hooks (which may replace
    the arguments), the step, torch's ``_optimizer_step_code`` marker, then the post-hooks;
    inside a profiler range only while a profiler records (see ``profiled``)."""
    if not (torch._C._autograd._profiler_enabled() or _global_optimizer_pre_hooks
            or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
            or _global_optimizer_post_hooks):  # most loops: a few us less a step
        out = type(opt)._step_body(opt, *args, **kwargs)
        opt._optimizer_step_code()
        return out
    return profiled(f"Optimizer.step#{type(opt).__name__}.step", _hooked_body, opt, args,
                    kwargs)


def _hooked_body(opt, args: tuple, kwargs: dict):
    args = (opt, *args)
    for pre_hook in chain(_global_optimizer_pre_hooks.values(),
                          opt._optimizer_step_pre_hooks.values()):
        result = pre_hook(opt, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                step = type(opt).step
                raise RuntimeError(f"<function {type(opt).__name__}.step at {hex(id(step))}> "
                                   "must return None or a tuple of (new_args, new_kwargs), "
                                   f"but got {result}.")
    out = type(opt)._step_body(*args, **kwargs)
    opt._optimizer_step_code()
    for post_hook in chain(opt._optimizer_step_post_hooks.values(),
                           _global_optimizer_post_hooks.values()):
        post_hook(opt, args, kwargs)
    return out


@contextlib.contextmanager
def held_back(opt, kind: str):
    """Inside the block, the optimizer's hooks of ``kind`` (``"state_dict_post"``,
    ``"load_state_dict_pre"``, ``"load_state_dict_post"``) do not run when torch.optim's method
    would run them; the block gets them, to run where fastopt's version of the method runs
    them (after its own work on the state_dict: a hook sees, and may replace, what the
    caller gets). Handles that remove a hook keep working (the same dict comes back)."""
    name = f"_optimizer_{kind}_hooks"
    hooks = getattr(opt, name)
    setattr(opt, name, OrderedDict())
    try:
        yield hooks
    finally:
        setattr(opt, name, hooks)


def run_load_pre_hooks(opt, state_dict: dict) -> dict:
    """torch.optim's ``load_state_dict`` start: a shallow copy of ``state_dict``, then each
    load pre-hook, which may replace it."""
    state_dict = state_dict.copy()
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict
