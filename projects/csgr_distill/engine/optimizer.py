"""The trainer's optimizer: detectron2's, plus ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"``.

detectron2 clips gradients per parameter (``"value"``: each element to ``[-CLIP_VALUE,
CLIP_VALUE]``; ``"norm"``: each parameter tensor's own norm to ``CLIP_VALUE``). A broken loss
weight then still moves every parameter by up to ``lr * CLIP_VALUE`` per step and the run trains to
the end. ``"full_model"`` is the clipping of FGD / mmdetection's ``grad_clip=dict(max_norm=35,
norm_type=2)``: the gradients of *all* parameters form one vector ``g`` with
``total = ||g||_NORM_TYPE``; when ``total > CLIP_VALUE`` every gradient is multiplied by
``CLIP_VALUE / total`` (``torch.nn.utils.clip_grad_norm_``), so the update keeps its direction and
its total size is bounded.

Non-finite gradients stop the run before they reach the weights: :func:`check_gradient_norm`
raises :class:`NonFiniteGradientError` when the global gradient norm is NaN or infinite. With
``"full_model"`` clipping the norm the clipping computes is checked (one host sync, no second
norm); otherwise :class:`GradientCheckHook` computes it after the backward pass (one host sync).
``DistillTrainer`` turns the error into a message naming the largest losses and their weight keys.
"""
import itertools
from typing import Iterable, Type, Union

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.solver import build_optimizer as build_detectron2_optimizer

__all__ = ["CLIP_TYPES", "OPTIMIZERS", "build_optimizer", "build_base_optimizer",
           "add_full_model_gradient_clipping", "GradientCheckHook", "NonFiniteGradientError",
           "check_gradient_norm", "checks_gradients"]

#: the accepted ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` values (the first two are detectron2's)
CLIP_TYPES = ("value", "norm", "full_model")


class NonFiniteGradientError(FloatingPointError):
    """The gradients' global norm (``norm``) is NaN or infinite; raised before the optimizer
    changes any weight."""

    def __init__(self, norm: float):
        super().__init__(f"the gradients' global norm is {norm}")
        self.norm = norm


def check_gradient_norm(total_norm: torch.Tensor) -> None:
    """:class:`NonFiniteGradientError` when ``total_norm`` (a 0-dim tensor) is NaN or infinite.
    One host sync."""
    if not bool(torch.isfinite(total_norm)):
        raise NonFiniteGradientError(float(total_norm))


def gradient_norm(params: Iterable[torch.nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type``-norm of all gradients of ``params`` together (0 when none has one), as
    ``clip_grad_norm_`` computes it; no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, norm_type) if grads else torch.zeros(())


def checks_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` itself checks the gradients (full-model clipping)."""
    return bool(getattr(type(optimizer), "checks_gradients", False))


class GradientCheckHook(HookBase):
    """After each backward pass: :func:`check_gradient_norm` of the model's gradients, for an
    optimizer that does not check them itself (:func:`checks_gradients`). Not used with AMP:
    there the gradients are scaled and detectron2's GradScaler skips the steps whose gradients
    are not finite."""

    def after_backward(self):
        check_gradient_norm(gradient_norm(self.trainer.model.parameters()))


def add_full_model_gradient_clipping(
    optimizer: Union[torch.optim.Optimizer, Type[torch.optim.Optimizer]],
    max_norm: float,
    norm_type: float = 2.0,
):
    """Make ``optimizer.step()`` first clip the norm of all its parameters' gradients together.

    Mirrors detectron2's ``maybe_add_gradient_clipping``: given an optimizer *class*, returns a
    subclass; given an *instance*, switches its class to that subclass and returns it (its state
    and param groups are untouched, so checkpoints load either way).

    Before each step the gradients of every parameter in every param group (those with
    ``grad is None`` are skipped) are treated as one vector; if its ``norm_type``-norm exceeds
    ``max_norm`` they are all scaled by ``max_norm / total_norm``. A NaN or infinite total norm
    raises :class:`NonFiniteGradientError` before any weight changes (the one host sync).
    """
    if max_norm <= 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0 for CLIP_TYPE "
                         f"'full_model' (the largest total gradient norm), got {max_norm}")
    base = type(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
        raise TypeError(f"expected a torch.optim.Optimizer (class or instance), got {optimizer!r}")
    max_norm, norm_type = float(max_norm), float(norm_type)

    def step(self, closure=None):
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        check_gradient_norm(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type))
        return base.step(self, closure)

    clipped = type(base.__name__ + "WithFullModelGradientClip", (base,),
                   {"step": step, "checks_gradients": True})
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.__class__ = clipped
        return optimizer
    return clipped


#: the accepted ``SOLVER.OPTIMIZER`` values
OPTIMIZERS = ("SGD", "ADAMW")


#: parameter-name parts of Deformable DETR's sampling-offset and reference-point projections,
#: whose lr the official recipe scales by ``lr_linear_proj_mult`` (SOLVER.LINEAR_PROJ_MULTIPLIER)
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def lr_factor(name: str, backbone_multiplier: float, linear_proj_multiplier: float) -> float:
    """The lr factor of parameter ``name``: ``backbone_multiplier`` for ``backbone.*``,
    ``linear_proj_multiplier`` for a name containing one of :data:`LINEAR_PROJ_NAMES` (outside
    the backbone), else 1."""
    if name.startswith("backbone."):
        return backbone_multiplier
    if any(part in name for part in LINEAR_PROJ_NAMES):
        return linear_proj_multiplier
    return 1.0


def _custom_groups(cfg: CfgNode) -> bool:
    """Whether the config asks for more than detectron2's own SGD param groups."""
    return (str(cfg.SOLVER.get("OPTIMIZER", "SGD")).upper() != "SGD"
            or float(cfg.SOLVER.get("BACKBONE_MULTIPLIER", 1.0)) != 1.0
            or float(cfg.SOLVER.get("LINEAR_PROJ_MULTIPLIER", 1.0)) != 1.0)


def build_base_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer before any clipping: detectron2's SGD (``SOLVER.OPTIMIZER "SGD"``, both
    multipliers 1) or, otherwise, torch's SGD / AdamW over detectron2's default param groups
    (weight decay, norm weight decay, bias lr factor) with the lr of every ``backbone.*``
    parameter times ``SOLVER.BACKBONE_MULTIPLIER`` (DETR's recipe: AdamW, 0.1) and of Deformable
    DETR's sampling offsets and reference points times ``SOLVER.LINEAR_PROJ_MULTIPLIER`` (its
    recipe: 0.1; :func:`lr_factor`)."""
    name = str(cfg.SOLVER.get("OPTIMIZER", "SGD")).upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got "
                         f"{cfg.SOLVER.OPTIMIZER!r}")
    if not _custom_groups(cfg):
        return build_detectron2_optimizer(cfg, model)
    from detectron2.solver.build import get_default_optimizer_params

    backbone = float(cfg.SOLVER.get("BACKBONE_MULTIPLIER", 1.0))
    linear_proj = float(cfg.SOLVER.get("LINEAR_PROJ_MULTIPLIER", 1.0))
    params = get_default_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=lambda n: lr_factor(n, backbone, linear_proj))
    if name == "ADAMW":
        return torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR,
                                 weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return torch.optim.SGD(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                           nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """:func:`build_base_optimizer` (detectron2's SGD by default), with
    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` one of :data:`CLIP_TYPES`.

    ``"value"`` and ``"norm"`` are left to detectron2 unchanged. For ``"full_model"`` the
    optimizer is built with detectron2's clipping off and :func:`add_full_model_gradient_clipping`
    adds the global clipping (``CLIP_VALUE`` = max norm, ``NORM_TYPE`` = p).
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    custom = _custom_groups(cfg)
    if not clip.ENABLED:
        return build_base_optimizer(cfg, model)
    if clip.CLIP_TYPE not in CLIP_TYPES:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be one of {CLIP_TYPES}, got "
                         f"{clip.CLIP_TYPE!r} ('full_model' clips the norm of all gradients "
                         "together, 'norm' each parameter's own)")
    if clip.CLIP_TYPE != "full_model":
        if custom:
            from detectron2.solver.build import maybe_add_gradient_clipping
            return maybe_add_gradient_clipping(cfg, build_base_optimizer(cfg, model))
        return build_detectron2_optimizer(cfg, model)
    plain = cfg.clone()
    plain.defrost()
    plain.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = build_base_optimizer(plain, model)
    return add_full_model_gradient_clipping(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)
