"""A bucket's grads: where the step reads them.

Either in the bucket's flat grad buffer (``buffer``: one slot per param, as the params' flat
buffer; loops that keep their grads, ``zero_grad(set_to_none=False)``, and grads gathered
there), or where autograd left them, read on the Triton path through a device table of their
addresses (``tables``, see ``fastopt.grad_table``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Grads:
    """The flat grad buffer of one bucket (made when first needed) and its address tables."""

    def __init__(self, bucket) -> None:
        self.bucket = bucket
        self.buffer: Tensor | None = None  # the flat grad buffer
        self.ptrs: list = []  # where each param's grad slot starts (0 for an empty slot)
        self.ptr_set: frozenset = frozenset()  # the same, as a set
        self.gathers = False  # fresh grads are gathered into ``buffer`` (fastopt.plan): keep it
        self.tables = None  # Triton: tables to read fresh grads in place (grad_table.py)

    def ensure(self) -> Tensor:
        if self.buffer is None:
            b = self.bucket
            self.buffer = torch.zeros(b.numel, dtype=b.dtype, device=b.device)
            base, size = self.buffer.data_ptr(), self.buffer.element_size()
            # An empty slot's view has no address (data_ptr 0), as an empty grad has.
            self.ptrs = [base + s * size if e > s else 0 for s, e in zip(b.starts, b.ends)]
            self.ptr_set = frozenset(self.ptrs) - {0}
        return self.buffer

    def release(self) -> None:
        """Drop the flat grad buffer (grads were set to None: the next ones come from autograd).
        The torch path reads such grads where they lie, so the buffer would only hold memory;
        the Triton path keeps it, as it gathers grads into it."""
        self.buffer = None
        self.ptrs = []
        self.ptr_set = frozenset()

    def holds(self, i: int, grad: Tensor) -> bool:
        """Is ``grad`` param i's slot of the flat grad buffer?"""
        return bool(self.ptrs) and grad.layout == torch.strided \
            and grad.data_ptr() == self.ptrs[i] and grad.shape == self.bucket.params[i].shape

    def adopt(self, i: int, grad: Tensor) -> bool:
        """Make param i's grad tensor a zeroed view of the flat grad buffer, in place: the same
        tensor object (``p.grad is grad`` still holds, and so do references others keep) is
        re-pointed with ``Tensor.set_``, so loops that keep their grads
        (``zero_grad(set_to_none=False)``) run flat from then on.

        Views of someone else's buffer (DDP's ``gradient_as_bucket_view``) and grads of
        external buckets are left alone. Returns whether the grad now lives in the flat buffer.
        """
        if self.bucket.external or grad._base is not None or grad.layout != torch.strided:
            return False
        view = self.bucket.view(self.ensure(), i, own=True)
        view.zero_()
        if grad.grad_fn is not None:
            grad.detach_()
        else:
            grad.requires_grad_(False)
        grad.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
        return True
