"""Every registered method x every detector pair: a 2-iteration DistillTrainer run on the tiny
RetinaNet and Faster R-CNN configs (same family, and the heterogeneous pairs RetinaNet student <-
Faster R-CNN teacher and the reverse on p3-p6), with finite losses, every loss the method
returned in the logged metrics, named ``loss_<method>_...``, the same terms on every level it
distils; a pair a method cannot distil is refused when the model is built (its own build-time
check, :func:`csgr_distill.distillers.pair_problem`), with one message naming the method. The
lists come from the registry: a new method is in this matrix without an edit here."""
import json
import math
import os
from collections import defaultdict

import pytest
import torch
from detectron2.modeling import build_model

from csgr_distill.distillers import fields_by_role, pair_problem, registered_distillers
from csgr_distill.engine import DistillTrainer
from tiny import base_cfg, rcnn_base_cfg, write_model

BASE = {"retinanet": base_cfg, "rcnn": rcnn_base_cfg}
PAIRS = [("retinanet", "retinanet"), ("rcnn", "rcnn"), ("retinanet", "rcnn"),
         ("rcnn", "retinanet")]  # (student, teacher)
#: the FPN levels both detectors of a pair have (a per-level method's IN_FEATURES here)
FEATURE_LEVELS = {("retinanet", "retinanet"): ["p3", "p4", "p5", "p6", "p7"],
                  ("rcnn", "rcnn"): ["p2", "p3", "p4", "p5"],
                  ("retinanet", "rcnn"): ["p3", "p4", "p5", "p6"],
                  ("rcnn", "retinanet"): ["p3", "p4", "p5", "p6"]}


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


def _params():
    for method in registered_distillers():
        for student, teacher in PAIRS:
            yield pytest.param(method, student, teacher, id=f"{method}-{student}-from-{teacher}")


@pytest.mark.parametrize("method,student,teacher", list(_params()))
def test_method_on_pair(tmp_path, tiny_shapes, teachers, method, student, teacher):
    # the build-time checks read configs only: the teacher's weights are not needed for them
    problem = pair_problem(_cfg(tmp_path, method, student, teacher, teachers[teacher][0],
                                str(tmp_path / "never_read.pth")))
    if problem is not None:
        # refused when the model is built, in one message naming the method, not at step N
        assert method in problem, problem
        cfg = _cfg(tmp_path, method, student, teacher, teachers[teacher][0],
                   str(tmp_path / "never_read.pth"))
        with pytest.raises((ValueError, KeyError)) as refused:
            build_model(cfg)
        assert problem in str(refused.value)
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
        assert k.startswith(f"loss_{method.lower()}"), k
        assert k in logged, f"{k} returned by {method} but not in metrics.json"
        assert math.isfinite(logged[k]) and all(math.isfinite(r[k]) for r in returned), k
    assert math.isfinite(logged["total_loss"])
    assert not [k for k in logged if k.startswith(f"loss_{method.lower()}_") and k not in keys]

    # the losses named after a level: every level the method pairs, each with the same terms
    levels = list(getattr(distiller, "in_features", ()))
    per_level = defaultdict(set)
    for k in keys:
        term, _, level = k.rpartition("_")
        if level in FEATURE_LEVELS[("retinanet", "retinanet")] + ["p2"]:
            per_level[level].add(term)
    if levels:
        assert sorted(per_level) == sorted(levels), (sorted(per_level), levels)
    assert len({frozenset(t) for t in per_level.values()}) <= 1, dict(per_level)
    assert any(v > 0 for r in returned for v in r.values())


def test_feature_methods_run_on_every_pair(tmp_path, tiny_shapes, teachers):
    """A method that reads only feature maps (with the student's config) distils any two
    detectors on the levels both have: the matrix above would otherwise accept a refusal of a
    heterogeneous pair."""
    feature_only = set()
    for method in registered_distillers():
        for student, teacher in PAIRS:
            own = _cfg(tmp_path, method, student, student, teachers[student][0],
                       str(tmp_path / "never_read.pth"))
            if pair_problem(own) is not None:
                continue
            distiller = build_model(own).distillers[method]
            if all(set(f) == {"features"} for f in fields_by_role(distiller).values()):
                feature_only.add(method)
                cfg = _cfg(tmp_path, method, student, teacher, teachers[teacher][0],
                           str(tmp_path / "never_read.pth"))
                assert pair_problem(cfg) is None, (method, student, teacher)
    assert {"CSGR", "MIMIC", "PKD", "FGD", "TAR"} <= feature_only
