"""Distillation-decay schedules (``MODEL.DISTILL.DECAY``) and the hook that applies them."""
import math

from detectron2.engine import HookBase

from .utils import unwrap_model

DECAY_TYPES = ("none", "linear", "cosine", "step", "exp")

__all__ = ["DECAY_TYPES", "DistillDecay", "DistillDecayHook"]


class DistillDecay:
    """``factor(iter)``: 1 until ``start``, then decays to ``final`` at ``end``, times warm-up.

    With progress ``p = clamp((iter - start) / (end - start), 0, 1)``:

    * ``none``: 1
    * ``linear``: ``1 + (final - 1) p``   (TAR: start 0, end = max_iter, final 0 -> ``1 - iter/max_iter``)
    * ``cosine``: ``final + (1 - final) (1 + cos(pi p)) / 2``
    * ``step``: 1 before ``end``, ``final`` from ``end`` on
    * ``exp``: ``final ** p`` (geometric; needs ``final > 0``)

    and, when ``warmup > 0``, multiplied by ``min(1, iter / warmup)``.
    """

    def __init__(self, type: str, start: int, end: int, final: float, warmup: int = 0):
        if type not in DECAY_TYPES:
            raise ValueError(f"MODEL.DISTILL.DECAY.TYPE must be one of {DECAY_TYPES}, got {type!r}")
        if type != "none" and type != "step" and end <= start:
            raise ValueError(f"MODEL.DISTILL.DECAY.END_ITER ({end}) must be after START_ITER "
                             f"({start}) for a {type!r} decay")
        if type == "exp" and final <= 0:
            raise ValueError("MODEL.DISTILL.DECAY.FINAL_FACTOR must be > 0 for TYPE 'exp'")
        if warmup < 0:
            raise ValueError("MODEL.DISTILL.DECAY.WARMUP_ITERS must be >= 0")
        self.type, self.start, self.end, self.final, self.warmup = type, start, end, final, warmup

    @classmethod
    def from_config(cls, cfg) -> "DistillDecay":
        d = cfg.MODEL.DISTILL.DECAY
        end = d.END_ITER if d.END_ITER >= 0 else cfg.SOLVER.MAX_ITER
        return cls(d.TYPE, d.START_ITER, end, d.FINAL_FACTOR, d.WARMUP_ITERS)

    def __call__(self, it: int) -> float:
        if self.type == "none":
            f = 1.0
        elif self.type == "step":
            f = 1.0 if it < self.end else self.final
        else:
            p = min(max((it - self.start) / (self.end - self.start), 0.0), 1.0)
            if self.type == "linear":
                f = 1.0 + (self.final - 1.0) * p
            elif self.type == "cosine":
                f = self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * p))
            else:  # exp
                f = self.final ** p
        if self.warmup > 0:
            f *= min(1.0, it / self.warmup)
        return float(f)


class DistillDecayHook(HookBase):
    """Before each step: set the student's ``distill_factor`` and log ``distill/factor``.

    The factor is a function of the iteration and the config only (no state of its own), so a run
    resumed at iteration ``i`` applies ``schedule(i)``, ``schedule(i + 1)``, ... as the
    uninterrupted run would with the same config (``END_ITER -1`` follows ``SOLVER.MAX_ITER``, so
    resuming with another ``MAX_ITER`` stretches the schedule).
    """

    def __init__(self, schedule: DistillDecay):
        self.schedule = schedule

    def before_step(self):
        model = unwrap_model(self.trainer.model)
        factor = self.schedule(self.trainer.iter)
        model.distill_factor = factor
        self.trainer.storage.put_scalar("distill/factor", factor, smoothing_hint=False)
