"""A 2-iteration distillation run through the CLI, --eval-only, export, reload, and resume."""
import json
import os
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, detection_utils
from detectron2.modeling import build_model

from csgr_distill.engine import DistillTrainer
from tiny import REPO, TINY_VAL, make_teacher, student_cfg

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_student  # noqa: E402
import train_net  # noqa: E402



def _write_cfg(cfg, path):
    with open(path, "w") as f:
        f.write(cfg.dump())
    return str(path)


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, tiny_shapes):
    """Train the tiny CSGR student 2 iterations with tools/train_net.py."""
    tmp = tmp_path_factory.mktemp("e2e")
    teacher_yaml, teacher_weights, _ = make_teacher(tmp)
    cfg = student_cfg(tmp, teacher_yaml, teacher_weights)
    cfg.MODEL.DISTILL.DECAY.TYPE = "linear"
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    yaml_path = _write_cfg(cfg, tmp / "student.yaml")
    train_net.cli(["--config-file", yaml_path])
    return tmp, cfg, yaml_path


def test_training_logs_factor_and_every_distill_loss(distill_run):
    tmp, cfg, _ = distill_run
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = set().union(*rows)
    assert "distill/factor" in keys
    for level in ("p3", "p4", "p5", "p6", "p7"):
        assert f"loss_csgr_cs_{level}" in keys and f"loss_csgr_gr_{level}" in keys
    factors = [r["distill/factor"] for r in rows if "distill/factor" in r]
    assert factors[-1] == pytest.approx(0.5)  # linear decay over 2 iterations, logged at iter 1
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final_student.pth"))


def test_eval_only_export_and_plain_reload_give_identical_predictions(distill_run, tmp_path):
    tmp, cfg, yaml_path = distill_run
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    # --eval-only with the distillation config: the teacher checkpoint is not needed
    eval_dir = str(tmp_path / "eval")
    train_net.cli(["--config-file", yaml_path, "--eval-only", "MODEL.WEIGHTS", final,
                   "MODEL.DISTILL.TEACHER.WEIGHTS", str(tmp_path / "absent.pth"),
                   "OUTPUT_DIR", eval_dir])
    with open(os.path.join(eval_dir, "eval_results.json")) as f:
        res = json.load(f)
    # an untrained model may predict nothing (AP is then NaN): check the record, not the value
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(res["bbox"])

    exported = str(tmp_path / "student.pth")
    export_student.main(["--checkpoint", final, "--output", exported])

    plain_cfg = cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    plain_cfg.MODEL.DISTILL.ENABLED = False
    plain = build_model(plain_cfg)
    state = torch.load(exported, weights_only=False)["model"]
    incompatible = plain.load_state_dict(state, strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys

    distilled = build_model(cfg)
    DetectionCheckpointer(distilled).load(final)
    plain.eval(), distilled.eval()
    d = DatasetCatalog.get(TINY_VAL)[0]
    image = detection_utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
    inputs = [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()).float(),
               "height": d["height"], "width": d["width"]}]
    with torch.no_grad():
        a = plain(inputs)[0]["instances"]
        b = distilled(inputs)[0]["instances"]
    assert len(a) == len(b)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def test_resume_restores_distiller_parameters(distill_run):
    tmp, cfg, _ = distill_run
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_0000000.pth"), weights_only=False)
    # an interrupted run: last_checkpoint points at the iteration-0 checkpoint
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
        f.write("model_0000000.pth")
    resumed_cfg = cfg.clone()
    resumed_cfg.SOLVER.MAX_ITER = 4
    trainer = DistillTrainer(resumed_cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 1
    state = trainer.model.state_dict()
    distiller_keys = [k for k in saved["model"] if k.startswith("distillers.")]
    assert distiller_keys
    fresh = DistillTrainer.build_model(resumed_cfg).state_dict()
    differs = False
    for k in distiller_keys:
        assert torch.equal(state[k], saved["model"][k]), k
        differs |= not torch.equal(fresh[k], saved["model"][k])
    assert differs, "a freshly built model must differ, or this test proves nothing"


def test_visualize_writes_detections_and_attention_pictures(distill_run, tmp_path):
    tmp, cfg, yaml_path = distill_run
    import cv2
    import visualize

    out = str(tmp_path / "vis")
    written = visualize.main(["--config-file", yaml_path, "--weights",
                              os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
                              "--dataset", TINY_VAL, "--num-images", "1", "--output", out])
    names = sorted(os.path.basename(p).split("_", 1)[1] for p in written)
    assert names == ["csgr_category_attention.png", "csgr_criss_cross.png", "detections.png"]
    detections = cv2.imread([p for p in written if p.endswith("detections.png")][0])
    assert detections.shape[1] >= 3 * 64  # ground truth | teacher | student
    attention = cv2.imread([p for p in written if p.endswith("category_attention.png")][0])
    assert attention.shape[0] >= 2 * 64 and attention.shape[1] >= 6 * 64  # 2 roles x 6 classes
    assert attention.std() > 10  # heat maps, not blank tiles
