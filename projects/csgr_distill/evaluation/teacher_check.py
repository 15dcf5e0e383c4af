"""Does the teacher beat the baseline student? ``--teacher-check`` of ``tools/train_net.py``,
``tools/demo.py`` and ``tools/benchmark.py gain``: the teacher of a distillation config is
evaluated on the student's validation set at the student's test size and compared with the
baseline student's number; a teacher that does not beat it gets a loud warning with both
numbers (it would teach nothing or make the student worse).
"""
import json
import logging
import math
import os
from typing import Dict, Optional

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset

from ..teacher import FrozenTeacher
from . import build_evaluator

logger = logging.getLogger(__name__)

__all__ = ["read_metric", "evaluate_teacher", "teacher_check"]


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
                     teacher: Optional[FrozenTeacher] = None) -> Dict:
    """Evaluate the teacher of ``student_cfg`` on ``dataset_name`` (default the student's
    ``DATASETS.TEST[0]``) with the project's evaluator (:func:`csgr_distill.evaluation.
    build_evaluator`, chosen by the set's ``evaluator_type``), at the student's test input size
    (the images the student sees). Outputs go to ``OUTPUT_DIR/teacher_check/<dataset>``.

    Returns:
        detectron2's results dict, e.g. ``{"bbox": {"AP": .., "AP50": .., ...}}``.
    """
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
                  metric: str = "bbox/AP", teacher: Optional[FrozenTeacher] = None) -> Dict:
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
        "(docs/own_data.md, 'Model-zoo teachers'); check MODEL.DISTILL.TEACHER.WEIGHTS "
        "(now %r).\n%s", bar, metric, teacher_ap, name, float(baseline_ap),
        student_cfg.MODEL.DISTILL.TEACHER.WEIGHTS, bar)
    return out
