"""MODEL.BACKBONE_WEIGHTS: a detector's ResNet started from the ResNet of a trained checkpoint of
another meta-architecture (a RetinaNet's backbone.bottom_up.* into a Deformable DETR's
backbone.*, and back), strictly on the model's side, the rest reported; applied by the trainer
to a run that starts at iteration 0 and not to a resumed one."""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from csgr_distill.backbone_weights import load_backbone_weights, resnet_of
from csgr_distill.checkpoint import CheckpointFileError
from csgr_distill.cli import load_config
from csgr_distill.engine import DistillTrainer
from tiny import REPO, base_cfg


def _retinanet_checkpoint(tmp_path, depth=18):
    cfg = base_cfg(tmp_path / "retinanet")
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RESNETS.DEPTH = depth
    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():  # BN statistics too: they are buffers of the ResNet
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    DetectionCheckpointer(model, cfg.OUTPUT_DIR).save("model_final")
    return model, os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def _deformable_cfg(tmp_path, *opts):
    return load_config(os.path.join(REPO, "configs/demo/DeformableDETR-R18.yaml"),
                       ["INPUT.FIXED_SIZE", "64", "MODEL.DETR.HIDDEN_DIM", "32",
                        "MODEL.DETR.NHEADS", "4", "MODEL.DETR.DIM_FEEDFORWARD", "32",
                        "MODEL.DETR.NUM_QUERIES", "10", "DATASETS.TRAIN", "('shapes_tiny_train',)",
                        "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2",
                        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path / "detr"),
                        *opts], check_steps=False)


def test_retinanet_resnet_goes_into_a_deformable_detr(tmp_path, tiny_shapes):
    source, path = _retinanet_checkpoint(tmp_path)
    detr = build_model(_deformable_cfg(tmp_path))
    before = {k: v.clone() for k, v in detr.state_dict().items() if not k.startswith("backbone.")}
    report = load_backbone_weights(detr, path)
    target, name = resnet_of(detr)
    assert name == "backbone"
    expected = source.backbone.bottom_up.state_dict()
    got = target.state_dict()
    assert set(got) == set(expected) and report.loaded == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    # nothing outside the ResNet changed; the RetinaNet's FPN and head are left out, reported
    after = detr.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert report.source_prefix == "backbone.bottom_up."
    assert any(k.startswith("backbone.fpn_") for k in report.left_out)
    assert any(k.startswith("head.") for k in report.left_out)
    assert "ResNet" in report.summary() and path in report.summary()


def test_a_detr_resnet_goes_back_into_an_fpn_detector(tmp_path, tiny_shapes):
    _, path = _retinanet_checkpoint(tmp_path)
    detr = build_model(_deformable_cfg(tmp_path))
    load_backbone_weights(detr, path)
    DetectionCheckpointer(detr, str(tmp_path)).save("detr")
    retina = build_model(base_cfg(tmp_path / "again"))
    report = load_backbone_weights(retina, str(tmp_path / "detr.pth"))
    assert report.source_prefix == "backbone."
    got = retina.backbone.bottom_up.state_dict()
    assert all(torch.equal(got[k], detr.backbone.state_dict()[k]) for k in got)


def test_another_depth_is_one_error_naming_the_missing_tensors(tmp_path, tiny_shapes):
    _, path = _retinanet_checkpoint(tmp_path, depth=18)
    cfg = base_cfg(tmp_path / "r34")
    cfg.MODEL.RESNETS.DEPTH = 34
    with pytest.raises(ValueError, match=r"MODEL.BACKBONE_WEIGHTS .*does not fit the model's "
                                         r"backbone.bottom_up: \d+ of the model's \d+ tensors are "
                                         r"not in it .*res2.2"):
        load_backbone_weights(build_model(cfg), path)


def test_a_checkpoint_without_a_resnet_is_refused(tmp_path):
    path = str(tmp_path / "head_only.pth")
    torch.save({"model": {"head.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointFileError, match="holds no detectron2 ResNet"):
        load_backbone_weights(build_model(base_cfg(tmp_path / "m")), path)
    with pytest.raises(FileNotFoundError, match="MODEL.BACKBONE_WEIGHTS"):
        load_backbone_weights(build_model(base_cfg(tmp_path / "m")), str(tmp_path / "nope.pth"))


def test_trainer_applies_it_at_iteration_0_and_not_when_resuming(tmp_path, tiny_shapes):
    source, path = _retinanet_checkpoint(tmp_path)
    cfg = _deformable_cfg(tmp_path, "MODEL.BACKBONE_WEIGHTS", path, "SOLVER.MAX_ITER", "1")
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    got = trainer.model.backbone.state_dict()
    expected = source.backbone.bottom_up.state_dict()
    assert trainer.backbone_loaded is not None
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    trainer.train()  # writes model_final.pth and last_checkpoint
    resumed = DistillTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.backbone_loaded is None
    trained = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
                         weights_only=True)["model"]
    got = resumed.model.backbone.state_dict()
    assert all(torch.equal(got[k], trained["backbone." + k]) for k in got)
