"""Every registered method x every detector pair: a 2-iteration DistillTrainer run on the tiny
RetinaNet and Faster R-CNN configs (same family, and the heterogeneous pairs RetinaNet student <-
Faster R-CNN teacher and the reverse on p3-p6 for the feature methods), with finite losses, every
loss the method returned in the logged metrics, the levels and terms each method should give; a
pair a method cannot distil is refused when the model is built, with a message naming the method
and what is missing. Methods not registered yet are skipped."""
import json
import math
import os
from collections import defaultdict

import pytest
import torch
from detectron2.modeling import build_model

from csgr_distill.distillers import DISTILLER_REGISTRY
from csgr_distill.engine import DistillTrainer
from tiny import base_cfg, rcnn_base_cfg, write_model

METHODS = ("CSGR", "FGD", "MIMIC", "PKD", "KD", "TAR")
#: methods that distil FPN maps, hence any pair of families on the levels both have
FEATURE_METHODS = ("CSGR", "FGD", "MIMIC", "PKD", "TAR")
BASE = {"retinanet": base_cfg, "rcnn": rcnn_base_cfg}
PAIRS = [("retinanet", "retinanet"), ("rcnn", "rcnn"), ("retinanet", "rcnn"),
         ("rcnn", "retinanet")]  # (student, teacher)
#: the FPN levels a feature method distils for a pair (its IN_FEATURES)
FEATURE_LEVELS = {("retinanet", "retinanet"): ["p3", "p4", "p5", "p6", "p7"],
                  ("rcnn", "rcnn"): ["p2", "p3", "p4", "p5"],
                  ("retinanet", "rcnn"): ["p3", "p4", "p5", "p6"],
                  ("rcnn", "retinanet"): ["p3", "p4", "p5", "p6"]}
#: KD's levels: the dense head's levels, the RPN's levels
KD_LEVELS = {"retinanet": ["p3", "p4", "p5", "p6", "p7"], "rcnn": ["p2", "p3", "p4", "p5", "p6"]}
#: losses per level: CSGR cs + gr; FGD fg, bg, attention, global (shared/methods/FGD.md)
TERMS = {"CSGR": 2, "FGD": 4, "MIMIC": 1, "PKD": 1, "KD": 1, "TAR": 1}
#: losses not per level, for (method, student, teacher): TAR's RoI terms need two R-CNNs (a
#: RetinaNet student's configs turn them off: its TAR is Gaussian-mask feature imitation)
HEAD_LOSSES = {("TAR", "rcnn", "rcnn"): {"loss_tar_cls", "loss_tar_reg"}}
#: pairs a method refuses at build time: regex of the message
REFUSED = {
    ("KD", "retinanet", "rcnn"):
        r"MODEL\.DISTILL\.METHODS 'KD' needs \['cls_logits'\] from the teacher, a rcnn detector",
    ("KD", "rcnn", "retinanet"):
        r"MODEL\.DISTILL\.METHODS 'KD' needs \['rpn_objectness_logits'\] from the teacher, a "
        r"dense detector",
    ("TAR", "rcnn", "retinanet"):
        r"MODEL\.DISTILL\.METHODS 'TAR' needs \['roi_head'\] from the teacher, a dense detector",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny models gain nothing from two, and when another process holds
    a core, two OpenMP threads wait on each other (a tiny R-CNN step: 0.1 s -> 2-5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """family -> (yaml, weights) of a tiny teacher with a 32-channel FPN (the students': 16, so
    every adapter is exercised)."""
    tmp = tmp_path_factory.mktemp("matrix_teachers")
    return {f: write_model(tmp, BASE[f](tmp / f, fpn_channels=32), f)[:2] for f in BASE}


def _cfg(tmp_path, method, student, teacher, teacher_yaml, teacher_weights):
    cfg = BASE[student](tmp_path / "student")
    cfg.MODEL.META_ARCHITECTURE = "Distill" + cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = [method]
    cfg.MODEL.DISTILL.TEACHER.CONFIG = teacher_yaml
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher_weights
    node = cfg.MODEL.DISTILL.get(method)
    if node is not None and "IN_FEATURES" in node:
        node.IN_FEATURES = FEATURE_LEVELS[(student, teacher)]
    cfg.DATASETS.TEST = ()
    return cfg


def _levels(method, student, teacher):
    return KD_LEVELS[student] if method == "KD" else FEATURE_LEVELS[(student, teacher)]


def _params():
    for method in METHODS:
        for student, teacher in PAIRS:
            if student == teacher or method in FEATURE_METHODS or (method, student,
                                                                     teacher) in REFUSED:
                yield pytest.param(method, student, teacher,
                                   id=f"{method}-{student}-from-{teacher}")


@pytest.mark.parametrize("method,student,teacher", list(_params()))
def test_method_on_pair(tmp_path, tiny_shapes, teachers, method, student, teacher):
    if method not in DISTILLER_REGISTRY:
        pytest.skip(f"{method} is not registered (yet): its distiller is being added")
    refusal = REFUSED.get((method, student, teacher))
    if refusal is not None:
        # at build time: the teacher's weights (absent here) are never read
        cfg = _cfg(tmp_path, method, student, teacher, teachers[teacher][0],
                   str(tmp_path / "never_read.pth"))
        with pytest.raises(ValueError, match=refusal):
            build_model(cfg)
        return
    cfg = _cfg(tmp_path, method, student, teacher, *teachers[teacher])
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    distiller = trainer.model.distillers[method]
    returned = []
    forward = distiller.forward

    def recording(*args, **kwargs):
        losses = forward(*args, **kwargs)
        returned.append({k: float(v) for k, v in losses.items()})
        return losses

    distiller.forward = recording
    trainer.train()
    assert len(returned) == 2  # one call per iteration

    # every loss the method returned is logged, finite, with the total
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    logged = {k: v for r in rows for k, v in r.items()}
    keys = set(returned[0])
    assert keys and set(returned[1]) == keys
    for k in keys:
        assert k in logged, f"{k} returned by {method} but not in metrics.json"
        assert math.isfinite(logged[k]) and all(math.isfinite(r[k]) for r in returned), k
    assert math.isfinite(logged["total_loss"])
    assert not [k for k in logged if k.startswith(f"loss_{method.lower()}_") and k not in keys]

    # named loss_<method>_..._<level>, TERMS[method] per level, on exactly the expected levels
    head = HEAD_LOSSES.get((method, student, teacher), set())
    assert head <= keys, f"{method} on {student} <- {teacher} lacks {head - keys}"
    per_level = defaultdict(list)
    for k in keys - head:
        assert k.startswith(f"loss_{method.lower()}_"), k
        per_level[k.rsplit("_", 1)[1]].append(k)
    assert sorted(per_level) == sorted(_levels(method, student, teacher))
    assert all(len(v) == TERMS[method] for v in per_level.values()), dict(per_level)
    assert any(v > 0 for r in returned for v in r.values())
