"""``MODEL.BACKBONE_WEIGHTS``: start a detector's ResNet from a trained detectron2 checkpoint of
another meta-architecture.

A DETR trained from a random backbone learns nothing on a small budget; in practice DETRs start
from a pretrained one. With this key any detector (student or teacher, any family) starts its
bottom-up ResNet from the ResNet of a checkpoint this project trained, e.g. a RetinaNet's:

* the checkpoint's ResNet is ``backbone.bottom_up.*`` (FPN detectors: RetinaNet, Faster R-CNN)
  or ``backbone.*`` (this project's DETR port, whose backbone is the ResNet itself);
* the model's ResNet is likewise ``model.backbone.bottom_up`` or ``model.backbone``;
* the load is strict on the model's side: every ResNet parameter and buffer must be in the
  checkpoint with the same shape (else one error listing what is missing or mis-shaped); the
  checkpoint's other tensors (its FPN, heads, transformer; a ResNet stage the model does not
  build) are left out and counted in the log line.

The ResNets must be configured alike where shapes cannot tell (``MODEL.RESNETS.NORM``,
``STRIDE_IN_1X1`` of bottleneck ResNets). Applied by ``DistillTrainer.resume_or_load`` to a run
that starts at iteration 0, after ``MODEL.WEIGHTS``; a run resumed from its own checkpoint does
not apply it again.
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from torch import Tensor, nn

from .checkpoint import CheckpointFileError, read_checkpoint, shown

logger = logging.getLogger(__name__)

__all__ = ["BACKBONE_WEIGHTS_KEY", "BackboneLoadReport", "load_backbone_weights", "resnet_of"]

BACKBONE_WEIGHTS_KEY = "MODEL.BACKBONE_WEIGHTS"
#: where a detectron2 checkpoint keeps its ResNet, tried in this order
_CHECKPOINT_PREFIXES = ("backbone.bottom_up.", "backbone.")


@dataclass
class BackboneLoadReport:
    """What :func:`load_backbone_weights` did: ``loaded`` tensor names (the model's ResNet),
    ``source_prefix`` of the checkpoint's ResNet, ``left_out`` checkpoint tensors not loaded."""

    path: str
    source_prefix: str
    loaded: List[str] = field(default_factory=list)
    left_out: List[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{BACKBONE_WEIGHTS_KEY}: the ResNet ({len(self.loaded)} tensors) loaded from "
                f"{self.path!r} ({self.source_prefix}*); {len(self.left_out)} other tensors of "
                "that checkpoint left out")


def resnet_of(model: nn.Module) -> Tuple[nn.Module, str]:
    """``(module, name)``: the model's bottom-up ResNet, ``backbone.bottom_up`` under an FPN, else
    ``backbone``."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"{BACKBONE_WEIGHTS_KEY}: {type(model).__name__} has no `backbone`")
    bottom_up = getattr(backbone, "bottom_up", None)
    if isinstance(bottom_up, nn.Module):
        return bottom_up, "backbone.bottom_up"
    return backbone, "backbone"


def _source_resnet(state: Dict[str, Tensor], path: str) -> Tuple[str, Dict[str, Tensor]]:
    for prefix in _CHECKPOINT_PREFIXES:
        # a ResNet has a stem; "backbone." alone would also match an FPN's own tensors
        if any(k.startswith(prefix + "stem.") for k in state):
            return prefix, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    raise CheckpointFileError(
        f"{BACKBONE_WEIGHTS_KEY} {path!r} holds no detectron2 ResNet (no backbone.bottom_up.stem.* "
        f"or backbone.stem.* tensors; it has {shown(sorted(state))}): give a checkpoint this "
        "project (or detectron2) trained, e.g. output/demo/teacher/model_final.pth")


def load_backbone_weights(model: nn.Module, path: str) -> BackboneLoadReport:
    """Load the ResNet of checkpoint ``path`` into ``model``'s ResNet (module docstring).

    Raises:
        FileNotFoundError / CheckpointFileError: ``path`` is missing or not a checkpoint.
        ValueError: the model's ResNet has tensors the checkpoint lacks or shapes it disagrees
            with (naming them: another depth, width or norm).
    """
    checkpoint = read_checkpoint(path, BACKBONE_WEIGHTS_KEY)
    state = checkpoint.get("model", checkpoint)
    prefix, source = _source_resnet(state, path)
    target, name = resnet_of(model)
    own = target.state_dict()
    missing = [k for k in own if k not in source]
    wrong = [f"{k} {tuple(source[k].shape)} -> {tuple(own[k].shape)}" for k in own
             if k in source and tuple(source[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the model's {len(own)} tensors are not in it "
                            f"({shown(missing)})")
        if wrong:
            problems.append(f"{len(wrong)} have other shapes ({shown(wrong, quote=False)})")
        raise ValueError(
            f"{BACKBONE_WEIGHTS_KEY} {path!r}: its ResNet ({prefix}*) does not fit the model's "
            f"{name}: {'; '.join(problems)}. Use a checkpoint of a detector with the same "
            "MODEL.RESNETS (DEPTH, RES2_OUT_CHANNELS, NORM)")
    target.load_state_dict({k: source[k] for k in own}, strict=True)
    report = BackboneLoadReport(
        path=path, source_prefix=prefix, loaded=sorted(own),
        left_out=sorted(k for k in state if not (k.startswith(prefix) and k[len(prefix):] in own)))
    logger.info(report.summary())
    return report
