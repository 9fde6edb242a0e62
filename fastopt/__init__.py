"""fastopt: drop-in fused optimizers for PyTorch.

``fastopt.AdamW`` is ``torch.optim.AdamW`` with the params and state of each group laid out in
flat buffers and updated in one fused pass per buffer: Triton kernels for CUDA tensors, torch's
fused ops on a flat buffer for CPU tensors.
"""

from fastopt.adam import Adam, AdamW
from fastopt.optimizer import FlatOptimizer
from fastopt.sgd import SGD

__all__ = ["Adam", "AdamW", "SGD", "FlatOptimizer"]
__version__ = "0.1.0"
