"""tools/visualize.py: each model's best detections are drawn even when every score is below the
model's own test threshold, with the rule on the panel; baseline configs; no teacher weights
needed for the student; images picked by name or index; files named after the images."""
import os
import sys

import cv2
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, Instances

from csgr_distill.vis import rule_text, top_detections
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
    return {"tmp": tmp, "csgr": csgr_yaml, "baseline": str(baseline_yaml), "weights": weights}


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
