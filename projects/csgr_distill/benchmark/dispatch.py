"""Operators dispatched: a device-independent measure of what a loss costs in launches.

On a GPU a distillation loss made of many small operations is bound by the host (Python, the
dispatcher, one kernel launch per operation), not by its arithmetic. The number of ATen operators
one forward + backward dispatches measures that on any machine, the CPU included:

* ``torch.profiler`` (CPU activity) records one call after ``warmup`` untimed calls;
* counted: every event whose name starts with ``aten::`` and which has no ``aten::`` event below
  it (a *leaf* operator: the one that does the work, or a view/allocation the work needs;
  composite operators such as ``aten::matmul`` are counted through the leaves they dispatch, so
  nothing is counted twice). Events that are not ``aten::`` (the profiler's own
  ``ProfilerStep``/``record_function`` ranges, the autograd engine's
  ``autograd::engine::evaluate_function`` nodes) are not counted, but the leaves below them are.

The counted call is what a training step does with a distiller's losses: its forward, the sum
of its returned losses, and the backward of that sum to the student tensors and the distiller's
parameters (gradients set to None before the call, as after ``optimizer.zero_grad``).

The count is exact and repeatable (no timing). It counts every dispatcher round trip, the
host's share of a step: views and allocations (``aten::view``, ``aten::empty``...) too, though
they launch no kernel, and, on the CPU, the copy that turns a Python number into a tensor of the
operand's type (``x * 0.5``: two leaves on the CPU, a kernel argument on a GPU).
:func:`aten_ops` also counts the operators that do work (views and allocations left out): about
the kernels a GPU launches.

``python -m csgr_distill.benchmark.kernels ops --height 512 --width 640`` prints the count of
every method on the inputs of ``tools/benchmark.py kernels``; ``kernels`` has it as a column.
"""
import collections
import functools
from typing import Callable, Counter, Dict, List, NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["aten_ops", "leaf_aten_ops", "count_aten_ops", "loss_step", "DEFINITION",
           "METADATA_OPS", "OpCounts", "is_metadata"]

#: how :func:`count_aten_ops` counts, for table headers
DEFINITION = ("leaf aten:: operators dispatched by one forward + sum of the losses + backward "
              "(torch.profiler on the CPU after a warm-up call; events named aten:: with no aten:: "
              "event below them)")

#: operators that launch no kernel on a GPU: views, conjugate/negative-bit resolution,
#: detaching, allocation and dtype queries (their cost is the host's dispatch alone)
METADATA_OPS = frozenset(f"aten::{name}" for name in (
    "as_strided", "view", "_unsafe_view", "_reshape_alias", "alias", "resolve_conj",
    "resolve_neg", "detach", "detach_", "lift_fresh", "empty", "empty_strided", "resize_",
    "result_type", "_nnpack_available", "to", "set_"))


@functools.lru_cache(maxsize=None)
def is_metadata(name: str) -> bool:
    """Whether the operator ``aten::<name>`` launches no kernel: one of :data:`METADATA_OPS`, or
    a view (its schema returns an alias of an input that it does not write: ``transpose``,
    ``slice``, ``expand``, ``reshape`` / ``contiguous`` when they copy nothing...)."""
    if name in METADATA_OPS:
        return True
    packet = getattr(torch.ops.aten, name.split("::", 1)[-1], None)
    if packet is None:
        return False
    for overload in packet.overloads():
        returns = getattr(packet, overload)._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            return True
    return False


class OpCounts(NamedTuple):
    """``leaves``: operator name -> leaf ``aten::`` events (module docstring); ``compute``: the
    same for the operators that do work, about the kernels a GPU launches: every ``aten::``
    event that is not :func:`is_metadata` and has no such event below it (``aten::bmm``, whose
    only children are ``aten::resolve_conj``, counts once; ``aten::contiguous`` counts through
    its ``aten::copy_`` when it copies)."""

    leaves: Counter
    compute: Counter


def _has_aten_below(event, compute_only: bool = False) -> bool:
    return any((c.name.startswith("aten::") and not (compute_only and is_metadata(c.name)))
               or _has_aten_below(c, compute_only) for c in event.cpu_children)


def aten_ops(call: Callable[[], object], warmup: int = 1) -> OpCounts:
    """What one ``call()`` dispatches (:class:`OpCounts`), after ``warmup`` unprofiled calls."""
    for _ in range(warmup):
        call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    leaves: Counter = collections.Counter()
    compute: Counter = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        if not _has_aten_below(event):
            leaves[event.name] += 1
        if not is_metadata(event.name) and not _has_aten_below(event, compute_only=True):
            compute[event.name] += 1
    return OpCounts(leaves, compute)


def leaf_aten_ops(call: Callable[[], object], warmup: int = 1) -> Counter:
    """Operator name -> how many times one ``call()`` dispatched it (leaf ``aten::`` events of a
    ``torch.profiler`` trace, module docstring), after ``warmup`` unprofiled calls."""
    return aten_ops(call, warmup).leaves


def count_aten_ops(call: Callable[[], object], warmup: int = 1) -> int:
    """The number of leaf ``aten::`` operators one ``call()`` dispatches (:func:`leaf_aten_ops`)."""
    return sum(leaf_aten_ops(call, warmup).values())


def loss_step(distiller, losses_fn: Callable[[], Dict[str, torch.Tensor]],
              leaves: List[torch.Tensor]) -> Callable[[], Dict[str, torch.Tensor]]:
    """The call that is counted (and timed by ``kernels``): gradients of ``distiller`` and
    ``leaves`` set to None, the losses, their sum's backward (``retain_graph``: a record's
    callables reach into the recorded forward's graph, which the next call needs again)."""
    def call():
        distiller.zero_grad(set_to_none=True)
        for v in leaves:
            v.grad = None
        torch.manual_seed(0)  # the same dropout in every call (DETRDistill's extra decoder pass)
        losses = losses_fn()
        sum(losses.values()).backward(retain_graph=True)
        return losses
    return call
