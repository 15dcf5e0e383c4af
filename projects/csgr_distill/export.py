"""The one exporter: a plain detectron2 student (checkpoint + config) from a distillation run.

``<name>.pth`` holds ``{"model": student weights}``: the distillation checkpoint's model without
the distillation-only tensors (:data:`DISTILL_ONLY_PREFIXES`), no optimizer, scheduler or
iteration. ``<name>.yaml`` beside it is the student's config as plain detectron2 reads it
(``get_cfg(); cfg.merge_from_file(yaml)`` in a process that never imported ``csgr_distill``):
``MODEL.META_ARCHITECTURE`` is the detectron2 base class of the ``Distill*`` one, every key
detectron2's ``get_cfg()`` lacks (``MODEL.DISTILL``, ...) is left out, and ``MODEL.WEIGHTS`` is the
absolute path of ``<name>.pth``.

Used by the trainer (``model_final_student.{pth,yaml}`` at the end of a distillation run) and by
``tools/export_student.py``. :class:`StudentCheckpointer` loads distillation checkpoints into a
model built without distillers.
"""
import logging
import os
from typing import Dict, List, Mapping, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = [
    "DISTILL_ONLY_PREFIXES",
    "student_state_dict",
    "plain_meta_architecture",
    "plain_student_cfg",
    "write_student",
    "export_student",
    "StudentCheckpointer",
]

#: state_dict prefixes that exist only for distillation (distiller adapters, classifiers, ...).
DISTILL_ONLY_PREFIXES = ("distillers.",)


def student_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The keys a plain detectron2 model of the student's base class has."""
    return {k: v for k, v in state_dict.items() if not k.startswith(DISTILL_ONLY_PREFIXES)}


def plain_meta_architecture(name: str) -> str:
    """The detectron2 meta-architecture a registered ``name`` is built on.

    The first class in the MRO of ``META_ARCH_REGISTRY.get(name)`` that is itself registered
    (under its class name) and is not a :class:`~csgr_distill.meta_arch.base.DistillMixin`:
    ``DistillRetinaNet -> RetinaNet``, ``DistillGeneralizedRCNN -> GeneralizedRCNN``; a name that
    is not a ``DistillMixin`` is returned unchanged.
    """
    from .meta_arch.base import DistillMixin

    cls = META_ARCH_REGISTRY.get(name)
    registered = set(META_ARCH_REGISTRY)  # (name, class) pairs
    for base in cls.__mro__:
        if issubclass(base, DistillMixin):
            continue
        if (base.__name__, base) in registered:
            return base.__name__
    raise ValueError(f"MODEL.META_ARCHITECTURE {name!r} has no base class registered in "
                     "META_ARCH_REGISTRY that is not a DistillMixin; a plain detectron2 config "
                     "cannot name it")


def _prune(cfg: CfgNode, reference: CfgNode, prefix: str, removed: List[str]) -> None:
    """Delete (in place) every key of ``cfg`` that ``reference`` lacks; record their full names."""
    for key in list(cfg.keys()):
        if key not in reference:
            removed.append(prefix + key)
            del cfg[key]
        elif isinstance(cfg[key], CfgNode) and isinstance(reference[key], CfgNode):
            _prune(cfg[key], reference[key], prefix + key + ".", removed)


def plain_student_cfg(cfg: CfgNode, weights: str) -> CfgNode:
    """The student's config as plain detectron2 has it: detectron2's ``get_cfg()`` merged with
    ``cfg`` minus the keys ``get_cfg()`` lacks, the base meta-architecture, ``MODEL.WEIGHTS =
    weights``. Merging into ``get_cfg()`` here is the check that the file will load."""
    student = cfg.clone()
    student.defrost()
    removed: List[str] = []
    _prune(student, get_cfg(), "", removed)
    student.MODEL.META_ARCHITECTURE = plain_meta_architecture(cfg.MODEL.META_ARCHITECTURE)
    student.MODEL.WEIGHTS = weights
    plain = get_cfg()
    plain.merge_from_other_cfg(student)
    if removed:
        logger.info("Plain student config: left out %d key(s) detectron2 does not have: %s",
                    len(removed), ", ".join(removed))
    return plain


def write_student(state_dict: Mapping[str, torch.Tensor], output: str,
                  cfg: Optional[CfgNode] = None) -> Dict[str, object]:
    """Write ``output`` (``{"model": student weights}``) and, given the student's ``cfg``, the
    plain config beside it (``output`` with ``.yaml``; ``MODEL.WEIGHTS`` = absolute ``output``).

    Returns ``{"kept": n, "dropped": n, "checkpoint": output, "config": yaml path or None}``.
    """
    kept = student_state_dict(state_dict)
    output = os.path.abspath(output)
    yaml_path = os.path.splitext(output)[0] + ".yaml" if cfg is not None else None
    plain = plain_student_cfg(cfg, output) if cfg is not None else None  # fails before writing
    PathManager.mkdirs(os.path.dirname(output))
    with PathManager.open(output, "wb") as f:
        torch.save({"model": kept, "__author__": "csgr_distill.export"}, f)
    if plain is not None:
        with PathManager.open(yaml_path, "w") as f:
            f.write(plain.dump())
    counts = {"kept": len(kept), "dropped": len(state_dict) - len(kept), "checkpoint": output,
              "config": yaml_path}
    logger.info("Wrote the plain student %s (%d tensors, %d distillation-only dropped)%s",
                output, counts["kept"], counts["dropped"],
                f" and its config {yaml_path}" if yaml_path else "")
    return counts


def export_student(checkpoint: str, output: str, cfg: Optional[CfgNode] = None
                   ) -> Dict[str, object]:
    """:func:`write_student` of a training checkpoint (``model_final.pth``, ``model_0004999.pth``,
    ...): its ``"model"`` only, without optimizer, scheduler or iteration."""
    if not PathManager.exists(checkpoint):
        raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist (expected e.g. "
                                "output/<run>/model_final.pth)")
    with PathManager.open(checkpoint, "rb") as f:
        loaded = torch.load(f, map_location="cpu", weights_only=False)
    return write_student(loaded.get("model", loaded), output, cfg)


class StudentCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` that loads a distillation checkpoint into a model built
    without distillers (``MODEL.DISTILL.ENABLED False``, or the plain base class): when the model
    has no key with a :data:`DISTILL_ONLY_PREFIXES` prefix, the checkpoint's keys with one are
    dropped with one info line (their count) instead of detectron2's "unexpected keys" warning.
    Every other key is loaded (and reported) exactly as detectron2 does."""

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        if not any(k.startswith(DISTILL_ONLY_PREFIXES) for k in self.model.state_dict()):
            dropped = [k for k in state if k.startswith(DISTILL_ONLY_PREFIXES)]
            for k in dropped:
                del state[k]
            if dropped:
                logger.info("Dropped %d distillation-only tensors (%s) of the checkpoint: the "
                            "model is built without distillers", len(dropped),
                            ", ".join(p + "*" for p in DISTILL_ONLY_PREFIXES))
        return super()._load_model(checkpoint)
