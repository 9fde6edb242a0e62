"""Triton kernels for fastopt, installed as ``fastopt.kernels``.

Each module holds a private ``@triton.jit`` kernel and a plain launcher with the same signature
as its pure-torch twin in ``fastopt.torch_path``. Kernels know pointers, sizes and scalars only.
"""

from .adam import adam_update, count_adam_steps
from .adam_int8 import adam_int8_update
from .elementwise import elementwise_update
from .saga import saga_update
from .sgd import sgd_update

__all__ = ["adam_int8_update", "adam_update", "count_adam_steps", "elementwise_update",
           "saga_update", "sgd_update"]

