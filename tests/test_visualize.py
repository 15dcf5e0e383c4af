"""tools/visualize.py: each model's best detections are drawn even when every score is below the
model's own test threshold, with the rule on the panel; baseline configs; no teacher weights
needed for the student; images picked by name or index; files named after the images; a
method's pictures found by its name (csgr_distill.vis.<method in lower case>), no table."""
import importlib.abc
import importlib.util
import os
import sys
import types

import cv2
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances

from csgr_distill.meta_arch.base import in_channel_order
from csgr_distill.outputs import DetectorOutputs
from csgr_distill.vis import PictureInputs, pictures_for, rule_text, top_detections
from tiny import REPO, TINY_VAL, make_teacher, student_cfg, write_model

sys.path.insert(0, os.path.join(REPO, "tools"))
import visualize  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_shapes):
    """A CSGR student checkpoint (distillers included), the same config with distillation off
    (a baseline config with a teacher configured), and the teacher."""
    tmp = tmp_path_factory.mktemp("vis")
    teacher_yaml, teacher_weights, _ = make_teacher(tmp)
    cfg = student_cfg(tmp, teacher_yaml, teacher_weights)
    csgr_yaml, weights, _ = write_model(tmp, cfg, "csgr")
    base = cfg.clone()
    base.MODEL.DISTILL.ENABLED = False
    baseline_yaml = tmp / "baseline.yaml"
    baseline_yaml.write_text(base.dump())
    return {"tmp": tmp, "csgr": csgr_yaml, "baseline": str(baseline_yaml), "weights": weights,
            "teacher": (teacher_yaml, teacher_weights)}


class Spy:
    """Records what visualize.py draws: the detections of every model panel and every caption."""

    def __init__(self, monkeypatch):
        self.drawn, self.captions = [], []
        draw, caption = visualize.draw_detections, visualize.captioned

        def draw_detections(rgb, instances, metadata, scale):
            self.drawn.append(instances)
            return draw(rgb, instances, metadata, scale)

        def captioned(rgb, lines, **kw):
            self.captions.append(list(lines))
            return caption(rgb, lines, **kw)

        monkeypatch.setattr(visualize, "draw_detections", draw_detections)
        monkeypatch.setattr(visualize, "captioned", captioned)


def _names(written):
    return sorted(os.path.basename(p) for p in written)


def _stem(i):
    return os.path.splitext(os.path.basename(DatasetCatalog.get(TINY_VAL)[i]["file_name"]))[0]


def test_low_scores_are_drawn_by_rank_with_the_rule_on_the_panel(models, tmp_path, monkeypatch):
    """Random weights score every box far below 0.05 (RetinaNet's own SCORE_THRESH_TEST): the
    top-k rule still draws them, best first, and says so on each panel."""
    spy = Spy(monkeypatch)
    written = visualize.main(["--config-file", models["csgr"], "--weights", models["weights"],
                              "--output", str(tmp_path), "--images", "1", "--top-k", "4",
                              "--score-floor", "0.0001"])
    stem = _stem(1)
    assert _names(written) == sorted(f"{stem}_{n}.png" for n in (
        "detections", "csgr_category_attention", "csgr_criss_cross"))
    assert len(spy.drawn) == 2  # teacher, student
    for inst in spy.drawn:
        assert len(inst) == 4
        assert (inst.scores >= 0.0001).all() and (inst.scores < 0.05).all()
        assert torch.equal(inst.scores, inst.scores.sort(descending=True).values)
    assert spy.captions == [["ground truth", spy.captions[0][1]],
                            ["teacher", "top 4 ≥ 0.0001: 4 shown"],
                            ["student", "top 4 ≥ 0.0001: 4 shown"]]
    detections = cv2.imread([p for p in written if p.endswith("_detections.png")][0])
    assert detections.shape[1] >= 3 * 320  # three panels, enlarged to 320 px


def test_baseline_config_draws_teacher_when_configured_and_no_attention(models, tmp_path,
                                                                       monkeypatch):
    spy = Spy(monkeypatch)
    written = visualize.main(["--config-file", models["baseline"], "--weights", models["weights"],
                              "--output", str(tmp_path), "--images", f"{_stem(0)},2",
                              "--score-floor", "0"])
    assert _names(written) == sorted([f"{_stem(0)}_detections.png", f"{_stem(2)}_detections.png"])
    assert [c[0] for c in spy.captions] == ["ground truth", "teacher", "student (no distillation)"] * 2
    assert all(len(inst) == 10 for inst in spy.drawn)  # default --top-k 10


def test_student_is_drawn_without_teacher_weights(models, tmp_path, monkeypatch, capsys):
    import csgr_distill.teacher as teacher

    def no_teacher_load(*args, **kwargs):
        raise AssertionError("the teacher's weights must not be read")

    monkeypatch.setattr(teacher, "load_weights_strictly", no_teacher_load)
    spy = Spy(monkeypatch)
    written = visualize.main(["--config-file", models["csgr"], "--weights", models["weights"],
                              "--output", str(tmp_path), "--num-images", "1", "--score-floor",
                              "0", "MODEL.DISTILL.TEACHER.WEIGHTS",
                              str(tmp_path / "absent.pth")])
    assert _names(written) == [f"{_stem(0)}_detections.png"]
    assert [c[0] for c in spy.captions] == ["ground truth", "student"]
    assert "note: teacher not drawn: the teacher's weights" in capsys.readouterr().out

    spy.captions.clear()
    visualize.main(["--config-file", models["baseline"], "--weights", models["weights"],
                    "--output", str(tmp_path), "--num-images", "1", "--no-teacher"])
    assert [c[0] for c in spy.captions] == ["ground truth", "student (no distillation)"]


def test_exported_student_weights_draw_detections_without_attention(models, tmp_path, capsys):
    state = torch.load(models["weights"], weights_only=False)["model"]
    plain = str(tmp_path / "plain.pth")
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("distillers.")}},
               plain)
    written = visualize.main(["--config-file", models["csgr"], "--weights", plain,
                              "--output", str(tmp_path), "--num-images", "1"])
    assert _names(written) == [f"{_stem(0)}_detections.png"]
    assert "no CSGR pictures: " in capsys.readouterr().out


def test_top_detections_and_rule():
    inst = Instances((10, 10))
    inst.pred_boxes = Boxes(torch.zeros(5, 4))
    inst.scores = torch.tensor([0.01, 0.3, 0.02, 0.5, 0.04])
    inst.pred_classes = torch.arange(5)
    kept = top_detections(inst, 2, 0.0)
    assert kept.scores.tolist() == pytest.approx([0.5, 0.3])
    assert top_detections(inst, 0, 0.02).scores.tolist() == pytest.approx([0.5, 0.3, 0.04, 0.02])
    assert rule_text(10, 0.05) == "top 10 ≥ 0.05" and rule_text(0, 0.4) == "all ≥ 0.4"


def test_a_methods_pictures_are_found_by_its_name(models, tmp_path, monkeypatch, capsys):
    """MIMIC has no pictures; a module put at csgr_distill.vis.mimic is all it takes for
    visualize.py to draw them (nothing lists the methods with pictures)."""
    assert pictures_for("MIMIC") is None
    yaml_path, weights, _ = write_model(tmp_path, student_cfg(tmp_path, *models["teacher"],
                                                              methods=("MIMIC",)), "mimic")
    calls = []

    def pictures(pic, distiller):
        calls.append((pic, distiller))
        path = pic.stem_path + "_mimic_marker.txt"
        with open(path, "w") as f:
            f.write(distiller.name)
        return [path]

    module = types.ModuleType("csgr_distill.vis.mimic")
    module.pictures = pictures
    monkeypatch.setitem(sys.modules, "csgr_distill.vis.mimic", module)
    written = visualize.main(["--config-file", yaml_path, "--weights", weights, "--output",
                              str(tmp_path / "vis"), "--num-images", "1"])
    marker = str(tmp_path / "vis" / f"{_stem(0)}_mimic_marker.txt")
    assert _names(written) == [f"{_stem(0)}_detections.png", f"{_stem(0)}_mimic_marker.txt"]
    assert open(marker).read() == "MIMIC"
    (pic, distiller), = calls
    assert isinstance(pic, PictureInputs) and pic.level == "p3" and pic.stride == 8
    assert isinstance(pic.student, DetectorOutputs) and isinstance(pic.teacher, DetectorOutputs)
    assert pic.teacher.features["p3"].shape[1] == 32  # the teacher's own record (32 channels)
    assert "no method pictures" not in capsys.readouterr().out

    monkeypatch.delitem(sys.modules, "csgr_distill.vis.mimic")
    written = visualize.main(["--config-file", yaml_path, "--weights", weights, "--output",
                              str(tmp_path / "vis2"), "--num-images", "1"])
    assert _names(written) == [f"{_stem(0)}_detections.png"]
    assert "note: no method pictures for ['MIMIC']" in capsys.readouterr().out


class _BrokenPictures(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds csgr_distill.vis.broken, a module that imports a package that is not installed."""

    def find_spec(self, name, path, target=None):
        if name == "csgr_distill.vis.broken":
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        import a_package_that_is_not_installed  # noqa: F401


def test_pictures_for_a_missing_module_is_none_and_a_broken_one_is_an_error(monkeypatch):
    assert pictures_for("CSGR").__module__ == "csgr_distill.vis.csgr"
    assert pictures_for("DETRDistill").__module__ == "csgr_distill.vis.detrdistill"
    assert pictures_for("KD") is None and pictures_for("NoSuchMethod") is None
    monkeypatch.setattr(sys, "meta_path", [_BrokenPictures()] + sys.meta_path)
    with pytest.raises(ModuleNotFoundError, match="a_package_that_is_not_installed"):
        pictures_for("Broken")
    monkeypatch.setitem(sys.modules, "csgr_distill.vis.nopictures",
                        types.ModuleType("csgr_distill.vis.nopictures"))
    with pytest.raises(TypeError, match="defines no function pictures"):
        pictures_for("NoPictures")


def test_the_teacher_panel_gets_the_teachers_channel_order():
    """tools/visualize.py and DistillMixin.teacher_inputs share one RGB <-> BGR flip."""
    image = torch.arange(12.0).reshape(3, 2, 2)
    batch = [{"image": image, "height": 2, "width": 2}]
    assert in_channel_order(batch, "BGR", "BGR") is batch
    flipped, = in_channel_order(batch, "BGR", "RGB")
    assert torch.equal(flipped["image"], image[[2, 1, 0]]) and flipped["height"] == 2
    assert torch.equal(batch[0]["image"], image)  # the student's batch is left as it was
    with pytest.raises(ValueError, match="INPUT.FORMAT L cannot be derived from INPUT.FORMAT RGB"):
        in_channel_order(batch, "RGB", "L")
