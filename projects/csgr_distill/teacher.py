"""Build, load and freeze the teacher, and keep it out of the student's module tree.

The teacher is held by :class:`FrozenTeacher`, a plain object (not an ``nn.Module``), so it never
appears in the student's ``state_dict``, parameters (hence the optimizer), DDP buckets or
checkpoints. Its parameters have ``requires_grad=False`` and it stays in eval mode.

Any checkpoint detectron2's ``DetectionCheckpointer`` reads can be a teacher: this project's
``.pth``, a detectron2 model-zoo ``.pkl`` (``{"model": {name: numpy array}, "__author__":
"Detectron2 Model Zoo", "matching_heuristics": True}``, keys matched by detectron2's name
heuristics) or a ``detectron2://`` URL (downloaded once, needs internet). Loading is strict
(:func:`load_weights_strictly`: a file that is not a checkpoint, a truncated one, one with NaN
values, a student's checkpoint are each refused in one message) and logged in one line (tensors
loaded, keys renamed by the heuristics, class names, path). The teacher's ``INPUT.FORMAT`` must be
the student's or its RGB/BGR mirror (checked when the student is built).
:func:`csgr_distill.evaluation.teacher_check.teacher_check` warns when it does not beat the baseline
student.
"""
import copy
import logging
import os
from typing import List, Optional

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

from .checkpoint import LoadReport, load_weights_strictly
from .config import TEACHER_OPTS_KEY, add_distill_config, apply_derived_keys, check_teacher_opts
from .data.checks import check_num_classes, training_class_names
from .data.custom import register_from_cfg
from .detectors import num_classes_key, num_classes_of

logger = logging.getLogger(__name__)


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

    The teacher inherits from the student only the device and the dataset registrations: the
    student's ``DATASETS.REGISTER`` entries are applied to it (replacing the teacher yaml's
    entries of the same names) and registered, so a teacher yaml that names the student's own
    data resolves. Its class count then follows its training data: when ``TEACHER.OPTS`` does not
    set the count key and the teacher's first training set has a known class list of another
    length, the count is set to that length (logged; the strict load checks it against the
    checkpoint). Distillation is switched off in the teacher config (a teacher has no teacher).

    Raises:
        ValueError: empty ``TEACHER.CONFIG``; a ``TEACHER.OPTS`` that is not a list of KEY VALUE
            pairs or sets a count that its data contradict (both show the exact
            ``MODEL.DISTILL.TEACHER.OPTS "[...]"`` form); a teacher/student class mismatch.
        FileNotFoundError: the teacher yaml does not exist.
    """
    tcfg_path = student_cfg.MODEL.DISTILL.TEACHER.CONFIG
    if not tcfg_path:
        raise ValueError(
            "MODEL.DISTILL.ENABLED is True but MODEL.DISTILL.TEACHER.CONFIG is empty: set it to the "
            "teacher's yaml, e.g. MODEL.DISTILL.TEACHER.CONFIG configs/teachers/RetinaNet-R101.yaml"
        )
    tcfg_path = resolve_config_path(tcfg_path, "MODEL.DISTILL.TEACHER.CONFIG")
    opts = check_teacher_opts(student_cfg.MODEL.DISTILL.TEACHER.OPTS)
    tcfg = get_cfg()
    _add_project_configs(tcfg, student_cfg)
    tcfg.merge_from_file(tcfg_path)
    tcfg.merge_from_list(opts)
    _apply_student_registrations(tcfg, student_cfg)
    register_from_cfg(tcfg)
    apply_derived_keys(tcfg, check_steps=False)  # the teacher is not trained here
    if student_cfg.MODEL.DISTILL.TEACHER.WEIGHTS:
        tcfg.MODEL.WEIGHTS = student_cfg.MODEL.DISTILL.TEACHER.WEIGHTS
    tcfg.MODEL.DISTILL.ENABLED = False
    tcfg.MODEL.DEVICE = student_cfg.MODEL.DEVICE
    _follow_training_classes(tcfg, opts, tcfg_path)
    check_num_classes(tcfg, opts_key=TEACHER_OPTS_KEY, load=False)
    tcfg.freeze()
    ks, kt = num_classes_of(student_cfg), num_classes_of(tcfg)
    if ks != kt:
        raise ValueError(
            f"Teacher and student disagree on the class set: the student trains {ks} classes "
            f"({num_classes_key(student_cfg)}), the teacher ({tcfg_path}) {kt} "
            f"({num_classes_key(tcfg)}). Distill only between detectors of the same dataset; if "
            "the teacher was trained on the student's classes, set its count with "
            f'{TEACHER_OPTS_KEY} "{[num_classes_key(tcfg), ks]!r}"'
        )
    check_class_names(student_cfg, tcfg, tcfg_path)
    check_input_formats(student_cfg, tcfg, tcfg_path)
    return tcfg


def check_input_formats(student_cfg, teacher_cfg, teacher_path: str) -> None:
    """The teacher sees the student's images: its ``INPUT.FORMAT`` must be the student's, or RGB
    for a BGR student and the reverse (the channels are flipped for it). A ValueError naming both
    otherwise (e.g. a grey-scale ``L`` teacher of an RGB student), at build time."""
    have, want = student_cfg.INPUT.FORMAT, teacher_cfg.INPUT.FORMAT
    if want == have or {want, have} == {"RGB", "BGR"}:
        return
    raise ValueError(
        f"The teacher ({teacher_path}) reads INPUT.FORMAT {want!r} images, the student {have!r}: "
        "the teacher sees the student's images, so its format must be the student's (or RGB for "
        "a BGR student and the reverse). Use a teacher trained on the student's format, or set "
        f'the student\'s INPUT.FORMAT to {want!r}, or {TEACHER_OPTS_KEY} "[\'INPUT.FORMAT\', '
        f'\'{have}\']" if the teacher was in fact trained on {have!r} images')


def _apply_student_registrations(tcfg, student_cfg) -> None:
    """``tcfg.DATASETS.REGISTER`` = the student's entries + the teacher yaml's entries of other
    names (the student's data are the ones the distillation runs on)."""
    student = [list(e) for e in student_cfg.DATASETS.get("REGISTER", [])]
    names = {str(e[0]) for e in student if isinstance(e, (list, tuple)) and e}
    own = list(tcfg.DATASETS.REGISTER)
    replaced = [str(e[0]) for e in own if isinstance(e, (list, tuple)) and e and str(e[0]) in names]
    if replaced:
        logger.info("Teacher config: DATASETS.REGISTER entries %s replaced by the student's",
                    replaced)
    tcfg.DATASETS.REGISTER = student + [
        list(e) if isinstance(e, (list, tuple)) else e for e in own
        if not (isinstance(e, (list, tuple)) and e and str(e[0]) in names)]


def _follow_training_classes(tcfg, opts, tcfg_path: str) -> None:
    """The teacher's class count follows its training set's class list unless ``opts`` sets it."""
    key = num_classes_key(tcfg)
    if key in [str(k) for k in opts[::2]]:
        return
    found = training_class_names(tcfg, load=False)
    if found is None or len(found[1]) == num_classes_of(tcfg):
        return
    name, names = found
    logger.info("Teacher %s: %s %d -> %d, the classes of its training set %s %s", tcfg_path, key,
                num_classes_of(tcfg), len(names), name, names)
    node = tcfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = len(names)


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


def teacher_summary(tcfg, report: LoadReport) -> str:
    """The one sanity line logged when the teacher is built: tensors loaded, keys renamed by
    detectron2's heuristics, class names (its training set's metadata), weights path."""
    names = class_names_of(tcfg)
    train = tcfg.DATASETS.TRAIN[0] if tcfg.DATASETS.TRAIN else "<no DATASETS.TRAIN>"
    classes = (f"{len(names)} classes of {train}: {names}" if names is not None
               else f"{num_classes_of(tcfg)} classes (names unknown: {train} has no class names "
                    "in its metadata)")
    author = f" ({report.author})" if report.author else ""
    return (f"Teacher {tcfg.MODEL.META_ARCHITECTURE}: loaded {report.tensors} tensors "
            f"({report.values / 1e6:.2f}M values), {report.renamed} renamed by detectron2's name "
            f"heuristics; {classes}; weights {report.path}{author}")


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
        """Build the teacher of ``student_cfg`` (:func:`build_teacher_cfg`), load it strictly
        and log one sanity line (:func:`teacher_summary`)."""
        return cls.from_teacher_cfg(build_teacher_cfg(student_cfg))

    @classmethod
    def from_teacher_cfg(cls, tcfg) -> "FrozenTeacher":
        """Build the teacher of config ``tcfg`` (as :func:`build_teacher_cfg` made it), load it
        strictly and log one sanity line (:func:`teacher_summary`)."""
        model = build_model(tcfg)
        report = load_weights_strictly(model, tcfg.MODEL.WEIGHTS, "teacher")
        logger.info(teacher_summary(tcfg, report))
        teacher = cls(model, tcfg)
        teacher.load_report = report
        return teacher

    def apply(self, fn) -> None:
        """Mirror a student ``nn.Module._apply`` (``.to()``, ``.cuda()``, ...) onto the teacher."""
        self.model._apply(fn)
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
