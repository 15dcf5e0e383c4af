"""A method is one plug-in: a small method defined here, registered with ``register_distiller``
and nothing else, is in the config (with its documented keys), in the benchmarks' variants and
pairs, in the kernels comparison, trains in the method matrix's way, and gets its pictures drawn
-- without an edit of any table of the package (docs/extending.md)."""
import json
import os
import sys
import types

import pytest
import torch
from detectron2.config import configurable, get_cfg
from torch import nn

from csgr_distill import config as schema
from csgr_distill.benchmark import gain, kernels
from csgr_distill.benchmark.common import method_variants
from csgr_distill.config import add_distill_config
from csgr_distill.distillers import (DISTILLER_REGISTRY, Distiller, Variant, pair_problem,
                                     register_distiller)
from csgr_distill.engine import DistillTrainer
from tiny import REPO, base_cfg, write_model

sys.path.insert(0, os.path.join(REPO, "tools"))
import config_docs  # noqa: E402


class ToyDistiller(Distiller):
    """The squared difference of the channel means of two maps, per level (channel-agnostic, so
    a 16-channel student distils from a 32-channel teacher)."""

    loss_weight_keys = {"loss_toy": "MODEL.DISTILL.TOY.WEIGHT"}
    benchmark_variants = {"TOY x2": Variant(("MODEL.DISTILL.TOY.WEIGHT", 2.0))}

    @classmethod
    def add_config(cls, node) -> None:
        # Weight of the toy's term (a test method's: ours, 1).
        node.WEIGHT = 1.0
        # Levels the toy distils.
        node.IN_FEATURES = ["p3", "p4"]

    @configurable
    def __init__(self, *, weight: float, in_features):
        super().__init__()
        self.weight, self.in_features = float(weight), list(in_features)
        self.gain = nn.Parameter(torch.ones(()))  # something to train and to checkpoint

    @classmethod
    def from_config(cls, cfg, student, teacher):
        missing = [f for f in cfg.MODEL.DISTILL.TOY.IN_FEATURES if f not in student.shapes]
        if missing:
            raise ValueError(f"MODEL.DISTILL.METHODS 'TOY': the student lacks {missing}")
        return {"weight": cfg.MODEL.DISTILL.TOY.WEIGHT,
                "in_features": cfg.MODEL.DISTILL.TOY.IN_FEATURES}

    def forward(self, student, teacher, gt_instances=None):
        return {f"loss_toy_{level}": self.weight * (
            self.gain * student.features[level].mean(1)
            - teacher.features[level].detach().mean(1)).pow(2).mean()
            for level in self.in_features}

    def reference_losses(self, student, teacher, gt_instances=None):
        out = {}
        for level in self.in_features:
            s, t = student.features[level], teacher.features[level].detach()
            total = 0.0
            for n in range(s.shape[0]):
                diff = self.gain * s[n].sum(0) / s.shape[1] - t[n].sum(0) / t.shape[1]
                total = total + (diff * diff).sum()
            out[f"loss_toy_{level}"] = self.weight * total / (s.shape[0] * s[0, 0].numel())
        return out


@pytest.fixture
def toy():
    """TOY registered for one test, and unregistered after it."""
    register_distiller("TOY")(ToyDistiller)
    yield ToyDistiller
    DISTILLER_REGISTRY._obj_map.pop("TOY", None)
    schema._METHOD_CONFIGS.pop("TOY", None)


def test_config_and_its_documentation(toy):
    cfg = add_distill_config(get_cfg())
    assert cfg.MODEL.DISTILL.TOY.WEIGHT == 1.0 and cfg.MODEL.DISTILL.TOY.IN_FEATURES == ["p3", "p4"]
    assert cfg.MODEL.DISTILL.TOY.DECAY.TYPE == "default"  # its own schedule node, added for it
    rows = {key: text for _, _, keys in config_docs.sections() for key, text in keys}
    assert rows["MODEL.DISTILL.TOY.WEIGHT"] == "Weight of the toy's term (a test method's: ours, 1)."
    assert "MODEL.DISTILL.TOY.IN_FEATURES" in rows


def test_benchmark_variants_and_pairs(toy, tiny_shapes):
    assert method_variants("gain")["TOY x2"] == [
        "MODEL.DISTILL.METHODS", ["TOY"], "MODEL.DISTILL.TOY.WEIGHT", 2.0]
    plan = gain.method_runs(detector="retinanet")
    assert plan["TOY"] == ["MODEL.DISTILL.METHODS", ["TOY"]] and "TOY x2" in plan
    assert "TOY" not in gain.method_runs(detector="detr")  # its check refuses: no p3 on a DETR


def test_kernels_compare_it_with_its_reference(toy, tmp_path):
    payload = kernels.run(str(tmp_path), height=64, width=64, batch=2, channels=8, repeats=1,
                          warmup=0, methods=["TOY", "TOY x2"])
    rows = {r["method"]: r for r in payload["rows"]}
    for label in ("TOY", "TOY x2"):
        assert rows[label]["inputs"] == "p3-p7 maps"
        assert rows[label]["losses"] == ["loss_toy_p3", "loss_toy_p4"]
        assert rows[label]["max_rel_diff_loss"] < 1e-5 and rows[label]["max_rel_diff_grad"] < 1e-5


def test_it_trains_and_its_pictures_are_found_by_name(toy, tmp_path, tiny_shapes, monkeypatch):
    teacher_yaml, teacher_weights, _ = write_model(tmp_path, base_cfg(tmp_path / "t", 32), "t")
    cfg = base_cfg(tmp_path / "student")
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = ["TOY"]
    cfg.MODEL.DISTILL.TEACHER.CONFIG = teacher_yaml
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher_weights
    cfg.DATASETS.TEST = ()
    assert pair_problem(cfg) is None
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        logged = {k for line in f if line.strip() for k in json.loads(line)}
    assert {"loss_toy_p3", "loss_toy_p4"} <= logged

    # its pictures: a module csgr_distill.vis.toy with pictures(inputs, distiller), nothing else
    drawn = []

    def pictures(inputs, distiller):
        path = inputs.stem_path + "_toy.txt"
        with open(path, "w") as f:
            f.write(f"{type(distiller).__name__} {distiller.in_features}")
        drawn.append(path)
        return [path]

    module = types.ModuleType("csgr_distill.vis.toy")
    module.pictures = pictures
    monkeypatch.setitem(sys.modules, "csgr_distill.vis.toy", module)
    import visualize

    yaml_path = tmp_path / "toy.yaml"
    yaml_path.write_text(cfg.dump())
    written = visualize.main(["--config-file", str(yaml_path), "--weights",
                              os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), "--dataset",
                              cfg.DATASETS.TRAIN[0], "--num-images", "1", "--output",
                              str(tmp_path / "vis")])
    assert drawn and drawn[0] in written
    assert open(drawn[0]).read() == "ToyDistiller ['p3', 'p4']"
