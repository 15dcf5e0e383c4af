"""Distillation-decay schedules (``MODEL.DISTILL.DECAY``) and the hook that applies them."""
import math
from typing import Dict, Optional

from detectron2.engine import HookBase

from .utils import unwrap_model

DECAY_TYPES = ("none", "linear", "cosine", "step", "exp")

__all__ = ["DECAY_TYPES", "DistillDecay", "DistillDecayHook", "method_schedules"]


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

    def __init__(self, type: str, start: int, end: int, final: float, warmup: int = 0,
                 key: str = "MODEL.DISTILL.DECAY"):
        """``key`` names the config node in error messages."""
        if type not in DECAY_TYPES:
            raise ValueError(f"{key}.TYPE must be one of {DECAY_TYPES}, got {type!r}")
        if type != "none" and type != "step" and end <= start:
            raise ValueError(f"{key}.END_ITER ({end}) must be after START_ITER "
                             f"({start}) for a {type!r} decay")
        if type == "exp" and final <= 0:
            raise ValueError(f"{key}.FINAL_FACTOR must be > 0 for TYPE 'exp'")
        if warmup < 0:
            raise ValueError(f"{key}.WARMUP_ITERS must be >= 0")
        self.type, self.start, self.end, self.final, self.warmup = type, start, end, final, warmup

    @classmethod
    def from_config(cls, cfg, node=None, key: str = "MODEL.DISTILL.DECAY") -> "DistillDecay":
        """The schedule of ``node`` (default ``MODEL.DISTILL.DECAY``); ``END_ITER < 0`` means
        ``SOLVER.MAX_ITER``."""
        d = cfg.MODEL.DISTILL.DECAY if node is None else node
        end = d.END_ITER if d.END_ITER >= 0 else cfg.SOLVER.MAX_ITER
        return cls(d.TYPE, d.START_ITER, end, d.FINAL_FACTOR, d.WARMUP_ITERS, key=key)


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


def method_schedules(cfg) -> Dict[str, DistillDecay]:
    """method name -> its own schedule, for every method of ``MODEL.DISTILL.METHODS`` whose
    ``MODEL.DISTILL.<METHOD>.DECAY.TYPE`` is not ``"default"`` (the others follow
    ``MODEL.DISTILL.DECAY``). So a decaying method (TAR) and a constant one (CSGR) combine."""
    out = {}
    for name in cfg.MODEL.DISTILL.METHODS:
        node = cfg.MODEL.DISTILL.get(name, None)
        decay = node.get("DECAY", None) if node is not None and hasattr(node, "get") else None
        if decay is not None and decay.TYPE != "default":
            out[name] = DistillDecay.from_config(cfg, decay, key=f"MODEL.DISTILL.{name}.DECAY")
    return out


class DistillDecayHook(HookBase):
    """Before each step: set the student's ``distill_factor`` (``MODEL.DISTILL.DECAY``) and
    ``distill_factors`` (methods with their own schedule), and log ``distill/factor`` and
    ``distill/factor_<METHOD>`` for each of the latter.

    The factors are functions of the iteration and the config only (no state of their own), so a
    run resumed at iteration ``i`` applies ``schedule(i)``, ``schedule(i + 1)``, ... as the
    uninterrupted run would with the same config (``END_ITER -1`` follows ``SOLVER.MAX_ITER``, so
    resuming with another ``MAX_ITER`` stretches the schedule).
    """

    def __init__(self, schedule: DistillDecay, per_method: Optional[Dict[str, DistillDecay]] = None):
        self.schedule = schedule
        self.per_method = dict(per_method or {})

    @classmethod
    def from_config(cls, cfg) -> "DistillDecayHook":
        return cls(DistillDecay.from_config(cfg), method_schedules(cfg))

    def before_step(self):
        model = unwrap_model(self.trainer.model)
        it = self.trainer.iter
        factor = self.schedule(it)
        model.distill_factor = factor
        model.distill_factors = {name: s(it) for name, s in self.per_method.items()}
        storage = self.trainer.storage
        storage.put_scalar("distill/factor", factor, smoothing_hint=False)
        for name, f in model.distill_factors.items():
            storage.put_scalar(f"distill/factor_{name}", f, smoothing_hint=False)
