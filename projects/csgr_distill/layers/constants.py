"""Python numbers as 0-dim tensors of a map's dtype, made once, for the hand-written losses.

``x * 0.5`` on a float32 CPU tensor dispatches, besides the multiplication, the conversion of
the wrapped Python number (a float64) to float32: ``aten::to`` -> ``_to_copy`` ->
``empty_strided`` + ``copy_``, four calls of the dispatcher more for every arithmetic operation
with a constant (one leaf operator more in ``python -m csgr_distill.benchmark.kernels ops``,
issue 30's measure of host-bound losses). ``x * constant(0.5, x)`` computes the same values bit
for bit (the number rounded to the type the operation computes in, as that conversion rounds
it) with the multiplication alone.

The tensors stay on the CPU whatever ``x``'s device: a 0-dim CPU tensor in an operation on CUDA
tensors is passed to the kernel as an argument (no copy, no launch), as a Python number is. On
a GPU, where a Python number is such an argument too, this is expected to save nothing (not
measured: no GPU was lent to the session that wrote it); it is a CPU saving.
:func:`constant_vector` is the same for a few numbers used together (FGD's four loss weights of a
level), as a 1-D tensor on ``like``'s device, made once per device: ``torch.tensor(values,
device=...)`` on every step would be a host-to-device copy on a GPU each time.
Under ``torch.compile`` (``MODEL.DISTILL.COMPILE``) the number itself is returned: the compiler
folds it into its kernels, and a cached tensor would only be one more graph input.
"""
import functools

import torch
from torch import Tensor

__all__ = ["constant", "constant_vector"]


@functools.lru_cache(maxsize=4096)  # keyed by value: image sizes vary, so do some normalisers
def _constant(value: float, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, dtype=dtype)


def constant(value: float, like: Tensor):
    """``value`` as a 0-dim CPU tensor of ``like``'s dtype (float32 for a half-precision
    ``like``; cached: do not write into it), for
    ``like * constant(v, like)`` instead of ``like * v`` (module docstring); the float itself
    while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return float(value)
    # float16 / bfloat16 arithmetic runs in float32 with the number in float32, as theirs does
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    return _constant(float(value), dtype)


@functools.lru_cache(maxsize=1024)  # keyed by values: weights divided by the batch size vary
def _constant_vector(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def constant_vector(values, like: Tensor) -> Tensor:
    """``values`` (a sequence of numbers) as a 1-D tensor ``[len(values)]`` of ``like``'s dtype
    on ``like``'s device, made once per (values, dtype, device) (cached: do not write into it);
    a fresh tensor while ``torch.compile`` traces (the compiler makes it a constant)."""
    values = tuple(float(v) for v in values)
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    return _constant_vector(values, like.dtype, like.device)
