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
:func:`teacher_check` warns when the teacher does not beat the baseline student.
"""
import copy
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional
from urllib.parse import urlparse

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch import nn

from .checkpoint import CheckedCheckpointer, shown
from .config import TEACHER_OPTS_KEY, add_distill_config, apply_derived_keys, check_teacher_opts

logger = logging.getLogger(__name__)


def num_classes_of(cfg) -> int:
    """Number of foreground classes a detectron2 config trains for."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if "RetinaNet" in arch:
        return int(cfg.MODEL.RETINANET.NUM_CLASSES)
    if "Detr" in arch and "DETR" in cfg.MODEL:
        return int(cfg.MODEL.DETR.NUM_CLASSES)
    return int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)


def num_classes_key(cfg) -> str:
    """The config key that :func:`num_classes_of` reads, e.g. ``MODEL.RETINANET.NUM_CLASSES``."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if "RetinaNet" in arch:
        return "MODEL.RETINANET.NUM_CLASSES"
    if "Detr" in arch and "DETR" in cfg.MODEL:
        return "MODEL.DETR.NUM_CLASSES"
    return "MODEL.ROI_HEADS.NUM_CLASSES"


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
    from .data.custom import register_from_cfg

    register_from_cfg(tcfg)
    apply_derived_keys(tcfg, check_steps=False)  # the teacher is not trained here
    if student_cfg.MODEL.DISTILL.TEACHER.WEIGHTS:
        tcfg.MODEL.WEIGHTS = student_cfg.MODEL.DISTILL.TEACHER.WEIGHTS
    tcfg.MODEL.DISTILL.ENABLED = False
    tcfg.MODEL.DEVICE = student_cfg.MODEL.DEVICE
    _follow_training_classes(tcfg, opts, tcfg_path)
    from .data.checks import check_num_classes

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
    from .data.checks import training_class_names

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


class _PopRecorder(dict):
    """A checkpoint dict that keeps the ``"model"`` state dict fvcore pops from it (after
    detectron2's heuristics renamed its keys, and fvcore removed mis-shaped ones)."""

    popped = None

    def pop(self, key, *default):
        value = super().pop(key, *default)
        if key == "model":
            self.popped = value
        return value


class _RecordingCheckpointer(CheckedCheckpointer):
    """DetectionCheckpointer (all its formats and key heuristics; a file that is not a checkpoint
    refused in one message) that keeps the incompatibilities and what was loaded: the checkpoint's
    own key names, the state dict as loaded, its author."""

    incompatible = None
    original_keys: frozenset = frozenset()
    loaded_state = None
    author = None

    def _load_model(self, checkpoint):
        self.original_keys = frozenset(checkpoint.get("model", {}))
        self.author = checkpoint.get("__author__", None)
        recorder = _PopRecorder(checkpoint)
        self.incompatible = super()._load_model(recorder)
        self.loaded_state = recorder.popped
        checkpoint.pop("model", None)
        return self.incompatible


@dataclass
class LoadReport:
    """What :func:`load_weights_strictly` loaded.

    Attributes:
        path: the weights as given (a path or URL).
        tensors: state-dict entries loaded (all of the model's).
        values: their number of elements.
        renamed: model keys whose checkpoint name differed (detectron2's name-matching heuristics
            of model-zoo ``.pkl`` files, or a ``module.`` prefix).
        author: the checkpoint's ``__author__`` (e.g. ``"Detectron2 Model Zoo"``), else None.
    """

    path: str
    tensors: int
    values: int
    renamed: int
    author: Optional[str] = None


def load_weights_strictly(model: nn.Module, weights: str, what: str = "teacher") -> LoadReport:
    """Load a checkpoint through detectron2's ``DetectionCheckpointer`` and raise, listing the
    keys, on any missing/unexpected/mis-shaped key.

    ``weights``: a ``.pth`` (this project's, detectron2's), a model-zoo ``.pkl`` (numpy arrays,
    ``__author__``, keys matched by detectron2's heuristics), or a URL (``detectron2://...``,
    ``https://...``, fetched and cached by detectron2's PathManager; ``?matching_heuristics=True``
    accepted as detectron2 does).

    Returns:
        :class:`LoadReport`.
    """
    if not weights:
        raise ValueError(
            f"The {what} has no weights: set MODEL.DISTILL.TEACHER.WEIGHTS (or MODEL.WEIGHTS in the "
            "teacher yaml) to a trained checkpoint; a random teacher teaches nothing."
        )
    key = " (MODEL.DISTILL.TEACHER.WEIGHTS)" if what == "teacher" else ""
    checkpointer = _RecordingCheckpointer(model, what=f"The {what} checkpoint{key}")
    plain = urlparse(weights)._replace(query="").geturl()  # as DetectionCheckpointer.load
    if "://" in plain:
        try:
            checkpointer.path_manager.get_local_path(plain)
        except Exception as e:  # no internet, unknown host, 404, unsupported scheme
            raise FileNotFoundError(
                f"The {what} checkpoint {weights!r} could not be fetched ({type(e).__name__}: "
                f"{e}). On a machine without internet, download it elsewhere (detectron2:// is "
                "https://dl.fbaipublicfiles.com/detectron2/...) and set "
                "MODEL.DISTILL.TEACHER.WEIGHTS to the local file."
            ) from e
    elif not checkpointer.path_manager.exists(plain):
        raise FileNotFoundError(
            f"The {what} checkpoint {weights!r} does not exist: train the teacher first "
            "(tools/train_net.py --config-file <teacher yaml>) and point "
            "MODEL.DISTILL.TEACHER.WEIGHTS at its model_final.pth"
        )
    checkpointer.load(weights, checkpointables=[])
    incompatible = checkpointer.incompatible
    problems: List[str] = []
    if incompatible.missing_keys:
        problems.append(f"missing keys: {shown(sorted(incompatible.missing_keys))}")
    if incompatible.unexpected_keys:
        problems.append(f"unexpected keys: {shown(sorted(incompatible.unexpected_keys))}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})"
                  for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"mis-shaped keys: {shown(shapes, quote=False)}")
    if problems:
        student = _student_checkpoint(checkpointer)
        if student:
            raise RuntimeError(
                f"The {what} checkpoint {weights!r} is {student}, not a {what}'s: point "
                "MODEL.DISTILL.TEACHER.WEIGHTS at the teacher's own checkpoint (the "
                "model_final.pth of the run of MODEL.DISTILL.TEACHER.CONFIG)")
        model_keys = set(model.state_dict())
        if checkpointer.original_keys and not (checkpointer.original_keys & model_keys) and not (
                set(checkpointer.loaded_state or {}) & model_keys):
            raise RuntimeError(
                f"The {what} checkpoint {weights!r} is not a checkpoint of this detector: none of "
                f"its {len(checkpointer.original_keys)} tensors "
                f"({shown(sorted(checkpointer.original_keys), 3)}) is one of the "
                f"{model.__class__.__name__} that MODEL.DISTILL.TEACHER.CONFIG builds")
        hint = ""
        if incompatible.incorrect_shapes:
            hint = (" A checkpoint trained on other classes (e.g. a COCO model-zoo detector, 80 "
                    "classes) cannot teach these classes as it is: fine-tune it on your data "
                    "first (datasets/README.md, 'Model-zoo teachers').")
        raise RuntimeError(
            f"The {what} checkpoint {weights!r} does not match the {what} config: "
            + "; ".join(problems)
            + ". Check MODEL.DISTILL.TEACHER.CONFIG / OPTS against the config it was trained with."
            + hint
        )
    model_state = model.state_dict()
    loaded = [k for k in (checkpointer.loaded_state or {}) if k in model_state]
    return LoadReport(
        path=weights, tensors=len(loaded),
        values=sum(int(model_state[k].numel()) for k in loaded),
        renamed=sum(1 for k in loaded if k not in checkpointer.original_keys),
        author=checkpointer.author,
    )


def _student_checkpoint(checkpointer: _RecordingCheckpointer) -> str:
    """``"a distillation run's checkpoint (...)"`` when the checkpoint just read is a student's:
    it holds distiller tensors, or :mod:`csgr_distill.export` wrote it; else ``""``."""
    distillers = [k for k in checkpointer.original_keys if k.startswith("distillers.")]
    if distillers:
        return (f"a distillation run's checkpoint (a student: it holds {len(distillers)} "
                "distillers.* tensors)")
    if checkpointer.author == "csgr_distill.export":
        return "an exported student (tools/export_student.py, model_final_student.pth)"
    return ""


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
        """Build the teacher of ``student_cfg``, load it strictly and log one sanity line
        (:func:`teacher_summary`)."""
        tcfg = build_teacher_cfg(student_cfg)
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


# ------------------------------------------------------------------------------------------------
# does the teacher beat the baseline student?
# ------------------------------------------------------------------------------------------------
def read_metric(path: str, metric: str = "bbox/AP") -> float:
    """One number of an ``eval_results.json`` (as ``tools/train_net.py --eval-only`` writes it):
    ``path`` is the file or the ``OUTPUT_DIR`` holding it; ``metric`` "task/name", e.g.
    ``bbox/AP`` = ``results["bbox"]["AP"]``."""
    if os.path.isdir(path):
        path = os.path.join(path, "eval_results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: evaluate the model first "
                                "(tools/train_net.py --config-file <yaml> --eval-only "
                                "MODEL.WEIGHTS <checkpoint> OUTPUT_DIR <dir>)")
    with open(path) as f:
        results = json.load(f)
    return _metric(results, metric, path)


def _metric(results: Dict, metric: str, where: str) -> float:
    node = results
    for part in metric.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{where} has no {metric!r}; it has {sorted(results)}")
        node = node[part]
    return float(node)


def evaluate_teacher(student_cfg, dataset_name: Optional[str] = None,
                     teacher: Optional["FrozenTeacher"] = None) -> Dict:
    """Evaluate the teacher of ``student_cfg`` on ``dataset_name`` (default the student's
    ``DATASETS.TEST[0]``) with the project's evaluator (:func:`csgr_distill.evaluation.
    build_evaluator`, chosen by the set's ``evaluator_type``), at the student's test input size
    (the images the student sees). Outputs go to ``OUTPUT_DIR/teacher_check/<dataset>``.

    Returns:
        detectron2's results dict, e.g. ``{"bbox": {"AP": .., "AP50": .., ...}}``.
    """
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset

    from .evaluation import build_evaluator

    if dataset_name is None:
        if not student_cfg.DATASETS.TEST:
            raise ValueError("teacher_check needs a validation set: DATASETS.TEST is empty; "
                             "name one there or pass dataset_name")
        dataset_name = student_cfg.DATASETS.TEST[0]
    teacher = teacher or FrozenTeacher.from_student_cfg(student_cfg)
    cfg = teacher.cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (dataset_name,)
    cfg.INPUT.MIN_SIZE_TEST = student_cfg.INPUT.MIN_SIZE_TEST
    cfg.INPUT.MAX_SIZE_TEST = student_cfg.INPUT.MAX_SIZE_TEST
    cfg.DATALOADER.NUM_WORKERS = student_cfg.DATALOADER.NUM_WORKERS
    cfg.freeze()
    out = os.path.join(student_cfg.OUTPUT_DIR, "teacher_check", dataset_name)
    evaluator = build_evaluator(cfg, dataset_name, out)
    loader = build_detection_test_loader(cfg, dataset_name)
    return inference_on_dataset(teacher.model, loader, evaluator)


def teacher_check(student_cfg, baseline_ap: Optional[float] = None,
                  teacher_ap: Optional[float] = None, dataset_name: Optional[str] = None,
                  metric: str = "bbox/AP", teacher: Optional["FrozenTeacher"] = None) -> Dict:
    """Warn loudly, with both numbers, when the teacher does not beat the baseline student.

    Args:
        student_cfg: the distilled student's config (its teacher: ``MODEL.DISTILL.TEACHER.*``).
        baseline_ap: the baseline student's ``metric`` on the same set (e.g.
            ``read_metric("output/baseline")``); None: only the teacher's number is logged.
        teacher_ap: the teacher's, if known; None: evaluated here (:func:`evaluate_teacher`).
        dataset_name: the validation set (default ``DATASETS.TEST[0]``).
        metric: ``"task/name"`` of the results dict, default ``"bbox/AP"``.
        teacher: an already built :class:`FrozenTeacher` (else built from ``student_cfg``).

    Returns:
        ``{"metric", "dataset", "teacher", "baseline", "teacher_beats_baseline"}`` (the last
        None without a baseline).
    """
    name = dataset_name or (student_cfg.DATASETS.TEST[0] if student_cfg.DATASETS.TEST else None)
    if teacher_ap is None:
        results = evaluate_teacher(student_cfg, name, teacher)
        teacher_ap = _metric(results, metric, f"the teacher's results on {name}")
    teacher_ap = float(teacher_ap)
    out = {"metric": metric, "dataset": name, "teacher": teacher_ap,
           "baseline": None if baseline_ap is None else float(baseline_ap),
           "teacher_beats_baseline": None}
    if baseline_ap is None:
        logger.info("Teacher check: the teacher has %s %.2f on %s", metric, teacher_ap, name)
        return out
    beats = not math.isnan(teacher_ap) and teacher_ap > float(baseline_ap)
    out["teacher_beats_baseline"] = beats
    if beats:
        logger.info("Teacher check: the teacher (%s %.2f on %s) beats the baseline student "
                    "(%.2f)", metric, teacher_ap, name, float(baseline_ap))
        return out
    bar = "!" * 78
    logger.warning(
        "\n%s\nTEACHER CHECK FAILED: the teacher has %s %.2f on %s, the baseline student %.2f.\n"
        "A teacher that does not beat the student teaches it nothing or makes it worse. Train the "
        "teacher longer or larger, or fine-tune a COCO-trained teacher on your classes first "
        "(datasets/README.md, 'Model-zoo teachers'); check MODEL.DISTILL.TEACHER.WEIGHTS "
        "(now %r).\n%s", bar, metric, teacher_ap, name, float(baseline_ap),
        student_cfg.MODEL.DISTILL.TEACHER.WEIGHTS, bar)
    return out
