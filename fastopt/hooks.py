"""torch.optim's step hooks and profiler ranges, run by fastopt itself.

torch.optim wraps every optimizer class's ``step`` (``Optimizer.profile_hook_step``) to run the
step pre- and post-hooks inside a profiler range named ``Optimizer.step#<class>.step``, and opens
``Optimizer.zero_grad#<class>.zero_grad`` around ``zero_grad``. Opening a range costs about 10 us
per call on a CPU and makes every op inside it slower, whether or not a profiler records.
fastopt's ``step`` (marked ``hooked``, so torch does not wrap it) runs the same hooks in the same
order, and opens the same ranges only while a profiler (torch.profiler, emit_nvtx, emit_itt)
records.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


def profiled(name: str, body, *args):
    """``body(*args)`` inside a profiler range named as torch.optim names it, when a profiler
    (torch.profiler, emit_nvtx, emit_itt) is recording; plain otherwise. torch.optim opens the
    range on every call, which costs about 10 us and makes every op inside it slower."""
    if not torch._C._autograd._profiler_enabled():
        return body(*args)
    with torch.autograd.profiler.record_function(name):
        return body(*args)


def run_hooked(opt, closure):
    """torch.optim's step wrapper (``Optimizer.profile_hook_step``): the global and the
    optimizer's step pre-hooks (which may replace the arguments), the step, torch's
    ``_optimizer_step_code`` marker, then the post-hooks; inside a profiler range only while a
    profiler records (see ``profiled``)."""
    if not (torch._C._autograd._profiler_enabled() or _global_optimizer_pre_hooks
            or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
            or _global_optimizer_post_hooks):  # most loops: a few us less a step
        out = type(opt)._step_body(opt, closure)
        opt._optimizer_step_code()
        return out
    return profiled(f"Optimizer.step#{type(opt).__name__}.step", _hooked_body, opt, closure)


def _hooked_body(opt, closure):
    args, kwargs = ((opt,) if closure is None else (opt, closure)), {}
    for pre_hook in chain(_global_optimizer_pre_hooks.values(),
                          opt._optimizer_step_pre_hooks.values()):
        result = pre_hook(opt, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{type(opt).step} must return None or a tuple of "
                                   f"(new_args, new_kwargs), but got {result}.")
    out = type(opt)._step_body(*args, **kwargs)
    opt._optimizer_step_code()
    for post_hook in chain(opt._optimizer_step_post_hooks.values(),
                           _global_optimizer_post_hooks.values()):
        post_hook(opt, args, kwargs)
    return out
