"""tools/export_student.py --format torchscript: the traced student (RetinaNet, Faster R-CNN)
returns exactly the eager plain student's boxes, scores and classes, also on an image it was not
traced with and of another size, loads with torch + torchvision alone, and unsupported models
get one clear message."""
import os
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, detection_utils
from detectron2.modeling import build_model

from csgr_distill.cli import run_cli
from tiny import REPO, TINY_VAL, make_teacher, rcnn_base_cfg, student_cfg, write_model

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_student  # noqa: E402

#: a process that never imports detectron2 or csgr_distill runs the .ts file
LOAD_TS = """
import sys, torch, torchvision
model = torch.jit.load(sys.argv[1])
images = torch.load(sys.argv[2])
out = [tuple(model(x)) for x in images]
assert not [m for m in sys.modules if m.startswith(("detectron2", "csgr_distill"))]
torch.save(out, sys.argv[3])
"""


def _images():
    """Two tiny_val images (the first is the tracing sample) and a 64x96 random one, as the
    model takes them (BGR float, already at the test size)."""
    images = []
    for d in DatasetCatalog.get(TINY_VAL)[:2]:
        image = detection_utils.read_image(d["file_name"], format="BGR")
        images.append(torch.as_tensor(image.transpose(2, 0, 1).copy()).float())
    images.append((torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(3)) * 255))
    return images


def _export(tmp_path, cfg, name, extra=()):
    """Write ``cfg`` and a random checkpoint of it, run the tool with --format torchscript;
    returns (.ts path, exported yaml path)."""
    yaml_path, weights, _ = write_model(tmp_path, cfg, name)
    out = str(tmp_path / "export" / f"{name}_plain.pth")
    counts = export_student.main(["--checkpoint", weights, "--config-file", yaml_path,
                                  "--output", out, "--format", "torchscript", *extra])
    assert counts["torchscript"] == os.path.splitext(out)[0] + ".ts"
    assert os.path.isfile(counts["torchscript"]) and os.path.isfile(counts["config"])
    return counts["torchscript"], counts["config"]


def _eager(plain_yaml, images):
    """The plain detectron2 student of the exported yaml, eager, on ``images``."""
    cfg = get_cfg()
    cfg.merge_from_file(plain_yaml)
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(cfg.MODEL.WEIGHTS, weights_only=False)["model"])
    out = []
    with torch.no_grad():
        for x in images:
            if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
                inst = model.inference([{"image": x}], do_postprocess=False)[0]
            else:
                inst = model([{"image": x}])[0]["instances"]
            out.append((inst.pred_boxes.tensor, inst.scores, inst.pred_classes))
    return out


def _assert_same(traced, eager):
    for (tb, ts, tc), (eb, es, ec) in zip(traced, eager):
        assert len(eb) > 0, "the eager model must detect something, or this test proves nothing"
        assert torch.equal(tb, eb) and torch.equal(ts, es) and torch.equal(tc, ec)


def test_traced_retinanet_student_equals_eager_and_runs_without_detectron2(tmp_path, tiny_shapes):
    teacher_yaml, teacher_weights, _ = make_teacher(tmp_path)
    cfg = student_cfg(tmp_path, teacher_yaml, teacher_weights)  # a distillation checkpoint
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # random weights: every score is small
    ts_path, plain_yaml = _export(tmp_path, cfg, "retinanet")
    images = _images()
    model = torch.jit.load(ts_path)
    with torch.no_grad():
        traced = [tuple(model(x)) for x in images]
    _assert_same(traced, _eager(plain_yaml, images))
    assert traced[2][0].shape[1] == 4 and traced[2][0][:, 2].max() > 64  # the wide image's boxes

    torch.save(images, str(tmp_path / "images.pt"))
    proc = subprocess.run([sys.executable, "-c", LOAD_TS, ts_path, str(tmp_path / "images.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = torch.load(str(tmp_path / "out.pt"))
    for a, b in zip(fresh, traced):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    extra = {"interface.txt": ""}
    torch.jit.load(ts_path, _extra_files=extra)
    interface = extra["interface.txt"].decode()
    assert "XYXY" in interface and "circle" in interface


def test_traced_faster_rcnn_student_equals_eager(tmp_path, tiny_shapes):
    cfg = rcnn_base_cfg(tmp_path / "out")
    cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"  # exported as GeneralizedRCNN
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    ts_path, plain_yaml = _export(tmp_path, cfg, "rcnn")
    images = _images()
    model = torch.jit.load(ts_path)
    with torch.no_grad():
        traced = [tuple(model(x)) for x in images]
    _assert_same(traced, _eager(plain_yaml, images))


def test_unsupported_model_is_one_message(tmp_path, tiny_shapes, capsys):
    cfg = rcnn_base_cfg(tmp_path / "out")
    cfg.MODEL.MASK_ON = True
    yaml_path, weights, _ = write_model(tmp_path, cfg, "mask")
    code = run_cli(export_student.main, ["--checkpoint", weights, "--config-file", yaml_path,
                                         "--output", str(tmp_path / "m.pth"),
                                         "--format", "torchscript"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "error: --format torchscript exports box detectors only; MODEL.MASK_ON is True" in err
    assert not os.path.exists(tmp_path / "m.ts")

    with pytest.raises(SystemExit) as e:  # argparse's own error, exit code 2
        export_student.main(["--checkpoint", weights, "--output", str(tmp_path / "n.pth"),
                             "--format", "torchscript"])
    assert e.value.code == 2
    assert "--format torchscript needs --config-file" in capsys.readouterr().err
