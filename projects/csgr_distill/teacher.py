"""Build, load and freeze the teacher, and keep it out of the student's module tree.

The teacher is held by :class:`FrozenTeacher`, a plain object (not an ``nn.Module``), so it never
appears in the student's ``state_dict``, parameters (hence the optimizer), DDP buckets or
checkpoints. Its parameters have ``requires_grad=False`` and it stays in eval mode.
"""
import copy
import logging
import os
from typing import List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

from .config import add_distill_config

logger = logging.getLogger(__name__)


def num_classes_of(cfg) -> int:
    """Number of foreground classes a detectron2 config trains for."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if "RetinaNet" in arch:
        return int(cfg.MODEL.RETINANET.NUM_CLASSES)
    if "Detr" in arch and "DETR" in cfg.MODEL:
        return int(cfg.MODEL.DETR.NUM_CLASSES)
    return int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)


#: The repository root (``projects/csgr_distill/../..``): relative config paths also resolve here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_config_path(path: str, key: str) -> str:
    """``path`` as given if it exists, else relative to the repository root; else a clear error."""
    if os.path.isfile(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    if not os.path.isabs(path) and os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(
        f"{key} points to {path!r}, which does not exist (looked in {os.getcwd()!r} and "
        f"{REPO_ROOT!r}); fix the path in the config or with '{key} <yaml>' on the command line"
    )


def build_teacher_cfg(student_cfg):
    """The teacher's config: ``TEACHER.CONFIG`` yaml, then ``TEACHER.OPTS``, then ``TEACHER.WEIGHTS``.

    The teacher inherits nothing from the student except the device. Distillation is switched off
    in the teacher config (a teacher has no teacher).

    Raises:
        ValueError: empty ``TEACHER.CONFIG`` or a teacher/student class-count mismatch.
        FileNotFoundError: the teacher yaml does not exist.
    """
    tcfg_path = student_cfg.MODEL.DISTILL.TEACHER.CONFIG
    if not tcfg_path:
        raise ValueError(
            "MODEL.DISTILL.ENABLED is True but MODEL.DISTILL.TEACHER.CONFIG is empty: set it to the "
            "teacher's yaml, e.g. MODEL.DISTILL.TEACHER.CONFIG configs/teachers/RetinaNet-R101.yaml"
        )
    tcfg_path = resolve_config_path(tcfg_path, "MODEL.DISTILL.TEACHER.CONFIG")
    tcfg = get_cfg()
    _add_project_configs(tcfg, student_cfg)
    tcfg.merge_from_file(tcfg_path)
    tcfg.merge_from_list(list(student_cfg.MODEL.DISTILL.TEACHER.OPTS))
    if student_cfg.MODEL.DISTILL.TEACHER.WEIGHTS:
        tcfg.MODEL.WEIGHTS = student_cfg.MODEL.DISTILL.TEACHER.WEIGHTS
    tcfg.MODEL.DISTILL.ENABLED = False
    tcfg.MODEL.DEVICE = student_cfg.MODEL.DEVICE
    tcfg.freeze()
    ks, kt = num_classes_of(student_cfg), num_classes_of(tcfg)
    if ks != kt:
        raise ValueError(
            f"Teacher and student disagree on the class set: the student trains {ks} classes, "
            f"the teacher ({tcfg_path}) {kt}. Distill only between detectors of the same "
            "dataset, or fix the teacher's NUM_CLASSES in MODEL.DISTILL.TEACHER.OPTS."
        )
    check_class_names(student_cfg, tcfg, tcfg_path)
    return tcfg


def class_names_of(cfg) -> Optional[List[str]]:
    """The class names of the config's first training set, where its metadata already has them
    (no dataset is loaded for this), else None."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if not cfg.DATASETS.TRAIN or cfg.DATASETS.TRAIN[0] not in DatasetCatalog.list():
        return None
    names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
    return list(names) if names else None


def check_class_names(student_cfg, teacher_cfg, teacher_path: str) -> None:
    """Teacher and student must predict the same classes in the same order: compare the class
    names of their training sets where both metadata have them."""
    s_names, t_names = class_names_of(student_cfg), class_names_of(teacher_cfg)
    if s_names is None or t_names is None or s_names == t_names:
        return
    raise ValueError(
        "Teacher and student disagree on the class names: the student trains on "
        f"{student_cfg.DATASETS.TRAIN[0]} {s_names}, the teacher ({teacher_path}) on "
        f"{teacher_cfg.DATASETS.TRAIN[0]} {t_names}. Their class logits would be compared class "
        "by class in that order: train (or fine-tune) the teacher on the student's classes, or "
        "set the teacher's DATASETS.TRAIN in MODEL.DISTILL.TEACHER.OPTS if it was trained on "
        "the student's data.")


def _add_project_configs(tcfg, student_cfg):
    """Apply to the teacher config the same ``add_*_config`` functions the student has seen."""
    add_distill_config(tcfg)
    for key, node in student_cfg.MODEL.items():
        if key not in tcfg.MODEL and hasattr(node, "clone"):
            tcfg.MODEL[key] = copy.deepcopy(node)


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer (all its formats and key heuristics) that keeps the incompatibilities."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_weights_strictly(model: nn.Module, weights: str, what: str = "teacher") -> None:
    """Load a checkpoint and raise, listing the keys, on any missing/unexpected/mis-shaped key."""
    if not weights:
        raise ValueError(
            f"The {what} has no weights: set MODEL.DISTILL.TEACHER.WEIGHTS (or MODEL.WEIGHTS in the "
            "teacher yaml) to a trained checkpoint; a random teacher teaches nothing."
        )
    checkpointer = _RecordingCheckpointer(model)
    if not checkpointer.path_manager.exists(weights):
        raise FileNotFoundError(
            f"The {what} checkpoint {weights!r} does not exist: train the teacher first "
            "(tools/train_net.py --config-file <teacher yaml>) and point "
            "MODEL.DISTILL.TEACHER.WEIGHTS at its model_final.pth"
        )
    checkpointer.load(weights, checkpointables=[])
    incompatible = checkpointer.incompatible
    problems: List[str] = []
    if incompatible.missing_keys:
        problems.append(f"missing keys: {sorted(incompatible.missing_keys)}")
    if incompatible.unexpected_keys:
        problems.append(f"unexpected keys: {sorted(incompatible.unexpected_keys)}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})"
                  for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"mis-shaped keys: {shapes}")
    if problems:
        raise RuntimeError(
            f"The {what} checkpoint {weights!r} does not match the {what} config: "
            + "; ".join(problems)
            + ". Check MODEL.DISTILL.TEACHER.CONFIG / OPTS against the config it was trained with."
        )


class FrozenTeacher:
    """Holds the teacher model outside any ``nn.Module`` tree.

    Attributes:
        model: the teacher detector, eval mode, ``requires_grad=False`` everywhere.
        cfg: its frozen config.
    """

    def __init__(self, model: nn.Module, cfg):
        self.model = model
        self.cfg = cfg
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    @classmethod
    def from_student_cfg(cls, student_cfg) -> "FrozenTeacher":
        tcfg = build_teacher_cfg(student_cfg)
        model = build_model(tcfg)
        load_weights_strictly(model, tcfg.MODEL.WEIGHTS, "teacher")
        logger.info("Teacher %s loaded from %s", tcfg.MODEL.META_ARCHITECTURE, tcfg.MODEL.WEIGHTS)
        return cls(model, tcfg)

    def apply(self, fn) -> None:
        """Mirror a student ``nn.Module._apply`` (``.to()``, ``.cuda()``, ...) onto the teacher."""
        self.model._apply(fn)
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
