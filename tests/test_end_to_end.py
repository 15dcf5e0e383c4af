"""A 2-iteration distillation run through the CLI, --eval-only, export, reload, and resume."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model

from csgr_distill.data.errors import DatasetNotFoundError
from csgr_distill.engine import DistillDecay, DistillTrainer
from tiny import REPO, TINY_VAL, make_teacher, student_cfg

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_student  # noqa: E402
import train_net  # noqa: E402

#: in plain detectron2 (a fresh process that never imports csgr_distill): build the model of the
#: exported yaml, load the exported weights strictly, predict on the given images
PLAIN_PREDICT = """
import json, sys
import torch
from detectron2.config import get_cfg
from detectron2.data import detection_utils
from detectron2.modeling import build_model

yaml_path, images, out, threads = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(int(threads))
cfg = get_cfg()
cfg.merge_from_file(yaml_path)
cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
model = build_model(cfg).eval()
model.load_state_dict(torch.load(cfg.MODEL.WEIGHTS, weights_only=False)["model"], strict=True)
assert not [m for m in sys.modules if m.startswith("csgr_distill")]
preds = []
with torch.no_grad():
    for d in images:
        image = detection_utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        x = {"image": torch.as_tensor(image.transpose(2, 0, 1).copy()).float(),
             "height": d["height"], "width": d["width"]}
        inst = model([x])[0]["instances"]
        preds.append((inst.pred_boxes.tensor, inst.scores, inst.pred_classes))
torch.save({"meta_architecture": cfg.MODEL.META_ARCHITECTURE, "predictions": preds}, out)
"""


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
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final_student.yaml"))


def test_eval_only_reads_nothing_of_the_teacher(distill_run, tmp_path):
    tmp, cfg, yaml_path = distill_run
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    # the teacher's yaml does not exist: --eval-only must not read it (nor its weights)
    eval_dir = str(tmp_path / "eval")
    train_net.cli(["--config-file", yaml_path, "--eval-only", "MODEL.WEIGHTS", final,
                   "MODEL.DISTILL.TEACHER.CONFIG", str(tmp_path / "absent.yaml"),
                   "MODEL.DISTILL.TEACHER.WEIGHTS", str(tmp_path / "absent.pth"),
                   "OUTPUT_DIR", eval_dir])
    with open(os.path.join(eval_dir, "eval_results.json")) as f:
        res = json.load(f)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(res["bbox"])
    # the checkpoint's distiller tensors are dropped with one info line, no unexpected-keys warning
    n = sum(k.startswith("distillers.")
            for k in torch.load(final, weights_only=False)["model"])
    with open(os.path.join(eval_dir, "log.txt")) as f:
        log = f.read()
    assert f"Dropped {n} distillation-only tensors (distillers.*)" in log
    assert "not used by the model" not in log


def test_plain_detectron2_student_predicts_exactly_like_the_distilled_model(distill_run, tmp_path):
    tmp, cfg, yaml_path = distill_run
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    plain_yaml = os.path.join(cfg.OUTPUT_DIR, "model_final_student.yaml")
    plain_pth = os.path.join(cfg.OUTPUT_DIR, "model_final_student.pth")
    written = yaml.safe_load(open(plain_yaml))
    assert written["MODEL"]["META_ARCHITECTURE"] == "RetinaNet"
    assert written["MODEL"]["WEIGHTS"] == os.path.abspath(plain_pth)
    assert "DISTILL" not in written["MODEL"]

    # the plain model: written yaml + exported weights, in a process without csgr_distill
    images = [{k: d[k] for k in ("file_name", "height", "width")}
              for d in DatasetCatalog.get(TINY_VAL)]
    assert len(images) >= 3
    out = str(tmp_path / "plain_predictions.pth")
    proc = subprocess.run([sys.executable, "-c", PLAIN_PREDICT, plain_yaml, json.dumps(images),
                           out, str(torch.get_num_threads())], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(out, weights_only=False)
    assert plain["meta_architecture"] == "RetinaNet"

    # the distilled model: the training config and checkpoint, distillers and all
    dcfg = cfg.clone()
    dcfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # after 2 iterations every score is tiny
    distilled = build_model(dcfg).eval()
    DetectionCheckpointer(distilled).load(final)
    assert distilled.distill_enabled
    with torch.no_grad():
        for d, (boxes, scores, classes) in zip(images, plain["predictions"]):
            image = detection_utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
            x = {"image": torch.as_tensor(image.transpose(2, 0, 1).copy()).float(),
                 "height": d["height"], "width": d["width"]}
            inst = distilled([x])[0]["instances"]
            assert len(inst) > 0 and len(inst) == len(scores), d["file_name"]
            assert torch.equal(inst.pred_boxes.tensor, boxes)
            assert torch.equal(inst.scores, scores) and torch.equal(inst.pred_classes, classes)


def test_export_tool_writes_the_same_student_as_the_run(distill_run, tmp_path):
    tmp, cfg, yaml_path = distill_run
    exported = str(tmp_path / "student.pth")
    counts = export_student.main(["--checkpoint", os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
                                  "--output", exported, "--config-file", yaml_path])
    assert counts["dropped"] > 0 and counts["config"] == str(tmp_path / "student.yaml")
    ours = torch.load(exported, weights_only=False)["model"]
    run = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final_student.pth"),
                     weights_only=False)["model"]
    assert ours.keys() == run.keys() and all(torch.equal(ours[k], run[k]) for k in ours)
    tool_yaml = yaml.safe_load(open(counts["config"]))
    run_yaml = yaml.safe_load(open(os.path.join(cfg.OUTPUT_DIR, "model_final_student.yaml")))
    assert tool_yaml["MODEL"].pop("WEIGHTS") == exported
    run_yaml["MODEL"].pop("WEIGHTS")
    assert tool_yaml == run_yaml


def test_student_is_exported_even_when_the_final_evaluation_fails(distill_run, tmp_path,
                                                                  monkeypatch):
    tmp, cfg, _ = distill_run
    run_cfg = cfg.clone()
    run_cfg.OUTPUT_DIR = str(tmp_path / "run")
    yaml_path = _write_cfg(run_cfg, tmp_path / "student.yaml")

    def failing_test(cls, *args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(DistillTrainer, "test", classmethod(failing_test))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_net.cli(["--config-file", yaml_path])
    for name in ("model_final.pth", "model_final_student.pth", "model_final_student.yaml"):
        assert os.path.isfile(os.path.join(run_cfg.OUTPUT_DIR, name)), name


def test_missing_test_set_fails_before_training(distill_run, tmp_path):
    tmp, cfg, _ = distill_run
    name = "csgr_e2e_missing_val"
    register_coco_instances(name, {}, str(tmp_path / "absent.json"), str(tmp_path / "images"))
    try:
        run_cfg = cfg.clone()
        run_cfg.DATASETS.TEST = (TINY_VAL, name)
        run_cfg.OUTPUT_DIR = str(tmp_path / "run")
        yaml_path = _write_cfg(run_cfg, tmp_path / "student.yaml")
        with pytest.raises(DatasetNotFoundError, match=f"'{name}' \\(named in DATASETS.TEST\\)"):
            train_net.cli(["--config-file", yaml_path])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    written = os.listdir(run_cfg.OUTPUT_DIR)
    assert not [f for f in written if f.endswith(".pth") or f == "metrics.json"], written


def test_resume_restores_distiller_parameters(distill_run, tmp_path):
    tmp, cfg, _ = distill_run
    # an interrupted run of our own (the module's run folder stays as it is): last_checkpoint
    # points at the iteration-0 checkpoint
    out = str(tmp_path / "run")
    shutil.copytree(cfg.OUTPUT_DIR, out)
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000000.pth")
    saved = torch.load(os.path.join(out, "model_0000000.pth"), weights_only=False)
    resumed_cfg = cfg.clone()
    resumed_cfg.OUTPUT_DIR = out
    resumed_cfg.SOLVER.MAX_ITER = 4
    resumed_cfg.DATASETS.TEST = ()
    trainer = DistillTrainer(resumed_cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 1

    distiller_keys = [k for k in saved["model"] if k.startswith("distillers.")]
    assert distiller_keys
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    fresh = DistillTrainer.build_model(resumed_cfg).state_dict()
    for k in distiller_keys:
        assert torch.equal(state[k], saved["model"][k]), k
    assert any(not torch.equal(fresh[k], saved["model"][k]) for k in distiller_keys), \
        "a freshly built model must differ, or this test proves nothing"

    trainer.train()
    # iterations 1..3 ran with the schedule's factors (linear to 0 at MAX_ITER 4), not restarted
    logged = trainer.storage.history("distill/factor").values()
    schedule = DistillDecay.from_config(resumed_cfg)
    assert [it for _, it in logged] == [1, 2, 3]
    assert [v for v, _ in logged] == pytest.approx([schedule(1), schedule(2), schedule(3)])
    assert [v for v, _ in logged] == pytest.approx([0.75, 0.5, 0.25])
    after = trainer.model.state_dict()
    changed = [k for k in distiller_keys if not torch.equal(after[k], state[k])]
    assert changed, "the resumed training did not train the distillers"
    assert os.path.isfile(os.path.join(out, "model_final_student.pth"))


def test_visualize_writes_detections_and_attention_pictures(distill_run, tmp_path):
    tmp, cfg, yaml_path = distill_run
    import cv2
    import visualize

    out = str(tmp_path / "vis")
    written = visualize.main(["--config-file", yaml_path, "--weights",
                              os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
                              "--dataset", TINY_VAL, "--num-images", "1", "--output", out])
    names = sorted(os.path.basename(p) for p in written)
    stem = os.path.splitext(os.path.basename(DatasetCatalog.get(TINY_VAL)[0]["file_name"]))[0]
    assert names == [f"{stem}_csgr_category_attention.png", f"{stem}_csgr_criss_cross.png",
                     f"{stem}_detections.png"]  # named after the image
    detections = cv2.imread([p for p in written if p.endswith("detections.png")][0])
    assert detections.shape[1] >= 3 * 64  # ground truth | teacher | student
    attention = cv2.imread([p for p in written if p.endswith("category_attention.png")][0])
    assert attention.shape[0] >= 2 * 64 and attention.shape[1] >= 6 * 64  # 2 roles x 6 classes
    assert attention.std() > 10  # heat maps, not blank tiles
