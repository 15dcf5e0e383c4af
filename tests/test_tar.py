"""TAR (docs/methods/TAR.md) against hand-computed cases: Gaussian masks on known boxes,
the masked feature term, classification KD with temperature, the adaptive regression rule on
hand-made RoIs, proposal sharing on a tiny Faster R-CNN pair (both heads see identical RoIs, in
each PROPOSALS mode), gradients, the linear decay, the configs, errors."""
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from csgr_distill.cli import load_config
from csgr_distill.config import add_distill_config
from csgr_distill.distillers.tar import (TARDistiller, adaptive_regression_targets,
                                         gaussian_masks, tar_cls_kd)
from csgr_distill.engine.decay import method_schedules
from csgr_distill.outputs import DetectorOutputs
from tiny import REPO, fake_batch, logged_keys, rcnn_base_cfg, train_opts, write_model, build_distiller

T = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# Gaussian masks
# ---------------------------------------------------------------------------------------------
def test_gaussian_mask_centre_is_one_and_sigma_is_half_the_box_size():
    # 8x8 grid over a 64x64 batch (8 px cells). Box x 12..28, y 20..36: centre (20, 28) px =
    # (2.5, 3.5) cells = the centre of cell (row 3, col 2); size 2 x 2 cells -> sigma 1 cell.
    m = gaussian_masks([_boxes([12, 20, 28, 36])], (8, 8), (64, 64))[0]
    assert m.shape == (8, 8)
    assert math.isclose(float(m[3, 2]), 1.0, abs_tol=1e-6)
    assert float(m.max()) == float(m[3, 2])
    # one sigma (one cell) away along x, along y, and diagonally
    assert math.isclose(float(m[3, 3]), math.exp(-0.5), rel_tol=1e-5)
    assert math.isclose(float(m[4, 2]), math.exp(-0.5), rel_tol=1e-5)
    assert math.isclose(float(m[4, 3]), math.exp(-1.0), rel_tol=1e-5)
    # an anisotropic box: x 0..32 (4 cells, sigma 2), y 28..36 (1 cell, sigma 0.5)
    m = gaussian_masks([_boxes([0, 28, 32, 36])], (8, 8), (64, 64))[0]
    # centre (2.0, 4.0) cells: cell (row 3, col 1) is 0.5 from it on both axes
    expected = math.exp(-(0.5 ** 2 / (2 * 2 ** 2) + 0.5 ** 2 / (2 * 0.5 ** 2)))
    assert math.isclose(float(m[3, 1]), expected, rel_tol=1e-5)


def test_gaussian_mask_direct_formula_on_every_cell_with_sigma_scale():
    boxes = _boxes([5, 7, 40, 30], [33, 2, 60, 61])
    m = gaussian_masks([boxes], (4, 8), (32, 64), sigma_scale=0.3)[0]  # x: /8, y: /8
    for i in range(4):
        for j in range(8):
            vals = []
            for x1, y1, x2, y2 in boxes.tolist():
                x1, x2, y1, y2 = x1 / 8, x2 / 8, y1 / 8, y2 / 8
                sx, sy = 0.3 * (x2 - x1), 0.3 * (y2 - y1)
                x0, y0 = (x1 + x2) / 2, (y1 + y2) / 2
                vals.append(math.exp(-((j + 0.5 - x0) ** 2 / (2 * sx ** 2)
                                       + (i + 0.5 - y0) ** 2 / (2 * sy ** 2))))
            assert math.isclose(float(m[i, j]), max(vals), rel_tol=1e-5, abs_tol=1e-7)


def test_gaussian_mask_max_over_overlapping_boxes_and_border_and_no_boxes():
    big, small = [0, 0, 64, 64], [36, 36, 52, 52]  # small: centre 44 px = cell 5.5
    m = gaussian_masks([_boxes(big, small), _boxes(), _boxes([60, 60, 64, 64])], (8, 8),
                       (64, 64))
    alone_big = gaussian_masks([_boxes(big)], (8, 8), (64, 64))[0]
    alone_small = gaussian_masks([_boxes(small)], (8, 8), (64, 64))[0]
    assert torch.allclose(m[0], torch.maximum(alone_big, alone_small))
    assert math.isclose(float(m[0, 5, 5]), 1.0, abs_tol=1e-6)  # the small box's centre
    assert torch.equal(m[1], torch.zeros(8, 8))  # no boxes: an all-zero mask
    # a box at the bottom-right corner, half a cell: its centre (7.75, 7.75) is off every cell
    # centre; values fall off fast but stay finite and peak in the corner cell
    assert torch.isfinite(m[2]).all() and float(m[2].argmax()) == 63
    assert 0 < float(m[2, 7, 7]) < 1


def test_degenerate_boxes_give_no_nan():
    m = gaussian_masks([_boxes([10, 10, 10, 30], [20, 20, 20, 20])], (4, 4), (32, 32))
    assert torch.isfinite(m).all()


# ---------------------------------------------------------------------------------------------
# the three terms
# ---------------------------------------------------------------------------------------------
def _tar(**kw):
    args = dict(in_features=["p3"], student_channels={"p3": 2}, teacher_channels={"p3": 2},
                feat_weight=1.0, sigma_scale=0.5, cls_weight=0.0, temperature=1.0,
                reg_weight=0.0, reg_compare="student", reg_beta=1.0, proposals="student")
    args.update(kw)
    return TARDistiller(**args)


def _instances(*boxes, size=(64, 64)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(_boxes(*boxes))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.long)
    return inst


def test_feature_term_on_a_hand_made_case():
    torch.manual_seed(0)
    s, t = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    gts = [_instances([12, 20, 28, 36]), _instances()]
    rec = lambda f: DetectorOutputs("dense", [(64, 64)] * 2, (64, 64), features={"p3": f},
                                    feature_names=["p3"])
    losses = _tar(feat_weight=0.5)(rec(s), rec(t), gts)
    assert list(losses) == ["loss_tar_feat_p3"]
    m = gaussian_masks([g.gt_boxes.tensor for g in gts], (8, 8), (64, 64))
    expected = 0.5 * float((m[:, None] * (s - t) ** 2).sum() / m.sum())
    assert math.isclose(float(losses["loss_tar_feat_p3"]), expected, rel_tol=1e-5)
    # no boxes in the batch: 0, not NaN
    losses = _tar()(rec(s), rec(t), [_instances(), _instances()])
    assert float(losses["loss_tar_feat_p3"]) == 0.0


def test_cls_kd_with_temperature_on_a_hand_case():
    zs = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    zt = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    tau = 2.0
    total = 0.0
    for s, t in zip(zs.tolist(), zt.tolist()):
        ps = [math.exp(v / tau) for v in s]
        pt = [math.exp(v / tau) for v in t]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = tau ** 2 * total / 2
    assert math.isclose(float(tar_cls_kd(zs, zt, tau)), expected, rel_tol=1e-6)
    assert float(tar_cls_kd(zt, zt, tau)) == pytest.approx(0.0, abs=1e-7)
    assert float(tar_cls_kd(zs[:0], zt[:0], tau)) == 0.0


def _deltas_for(box, proposal, k=2, cls=0):
    """[1, 4K] deltas that decode ``proposal`` to ``box`` for class ``cls`` (zeros elsewhere)."""
    d = torch.zeros(1, 4 * k)
    d[0, 4 * cls:4 * cls + 4] = T.get_deltas(_boxes(proposal), _boxes(box))[0]
    return d


def test_adaptive_regression_rule_on_hand_made_rois():
    gt = [10, 10, 30, 30]
    prop = [8, 8, 28, 28]
    near, far = [10, 10, 30, 31], [14, 14, 40, 40]  # IoU with gt: 0.95, ~0.2
    # RoI 0: teacher better than student; RoI 1: worse; RoI 2: negative (background, K = 2);
    # RoI 3: class 1, teacher better; its class-0 slots are garbage and must not be read
    proposals = _boxes(prop, prop, prop, prop)
    gt_boxes = _boxes(gt, gt, gt, gt)
    classes = torch.tensor([0, 0, 2, 1])
    s = torch.cat([_deltas_for(far, prop), _deltas_for(near, prop), _deltas_for(far, prop),
                   _deltas_for(far, prop, cls=1) + torch.tensor([[9., 9, 9, 9, 0, 0, 0, 0]])])
    t = torch.cat([_deltas_for(near, prop), _deltas_for(far, prop), _deltas_for(near, prop),
                   _deltas_for(near, prop, cls=1) - torch.tensor([[9., 9, 9, 9, 0, 0, 0, 0]])])
    pos, sel, target = adaptive_regression_targets(proposals, gt_boxes, classes, 2, s, t, T, T)
    assert pos.tolist() == [True, True, False, True]
    assert sel.tolist() == [True, False, False, True]
    assert torch.allclose(target[0], t[0, :4], atol=1e-5)
    assert torch.allclose(target[3], t[3, 4:], atol=1e-5)
    # against the proposal (IoU 0.68 with the gt): the near teacher box beats it, the far not
    _, sel, _ = adaptive_regression_targets(proposals, gt_boxes, classes, 2, s, t, T, T,
                                            compare="proposal")
    assert sel.tolist() == [True, False, False, True]
    t_far = torch.cat([_deltas_for(far, prop)] * 4)
    _, sel, _ = adaptive_regression_targets(proposals, gt_boxes, classes, 2, s, t_far, T, T,
                                            compare="proposal")
    assert sel.tolist() == [False, False, False, False]


def test_teacher_box_is_re_encoded_in_the_students_transform():
    prop, box = [8, 8, 28, 28], [10, 10, 30, 31]
    t_transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    t = torch.zeros(1, 8)
    t[0, :4] = t_transform.get_deltas(_boxes(prop), _boxes(box))[0]
    _, sel, target = adaptive_regression_targets(
        _boxes(prop), _boxes([10, 10, 30, 30]), torch.tensor([0]), 2, torch.zeros(1, 8), t,
        T, t_transform)
    assert sel.tolist() == [True]
    assert torch.allclose(target[0], T.get_deltas(_boxes(prop), _boxes(box))[0], atol=1e-5)


class _Head:
    """A stand-in RoIHead: box transform and class count only."""
    box_transform, num_classes = T, 2


def test_regression_loss_is_smooth_l1_over_the_positive_count():
    prop, gt, near, far = [8, 8, 28, 28], [10, 10, 30, 30], [10, 10, 30, 31], [14, 14, 40, 40]
    rois = Instances((64, 64), proposal_boxes=Boxes(_boxes(prop, prop, prop)),
                     gt_classes=torch.tensor([0, 0, 2]), gt_boxes=Boxes(_boxes(gt, gt, gt)))
    s = torch.cat([_deltas_for(far, prop), _deltas_for(near, prop), _deltas_for(far, prop)])
    t = torch.cat([_deltas_for(near, prop), _deltas_for(far, prop), _deltas_for(near, prop)])
    rec = lambda: DetectorOutputs("rcnn", [(64, 64)], (64, 64), features={}, feature_names=[],
                                  roi_head=_Head())
    loss = _tar(reg_weight=1.0, reg_beta=0.5).regression_loss([rois], s, t, rec(), rec())
    # RoI 0 selected, 2 positives
    diff = (s[0, :4] - t[0, :4]).abs()
    per = torch.where(diff < 0.5, 0.5 * diff ** 2 / 0.5, diff - 0.25)
    assert math.isclose(float(loss), float(per.sum()) / 2, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# proposal sharing on a tiny Faster R-CNN pair
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rcnn_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tar_teacher")
    return write_model(tmp, rcnn_base_cfg(tmp / "t", fpn_channels=32), "teacher")[:2]


def _student(tmp_path, teacher, **tar):
    cfg = rcnn_base_cfg(tmp_path / "student")
    cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = ["TAR"]
    cfg.MODEL.DISTILL.TEACHER.CONFIG, cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher
    cfg.MODEL.DISTILL.TAR.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    for k, v in tar.items():
        cfg.MODEL.DISTILL.TAR[k] = v
    torch.manual_seed(1)
    model = build_model(cfg)
    model.train()
    return model


def _forward(model, batch):
    with EventStorage(0):  # the R-CNN logs its sampling statistics
        return model(batch)


def _pooled_boxes(module):
    """Capture the boxes a box pooler is called with (a list per call)."""
    seen = []
    module.register_forward_hook(
        lambda _m, inputs, _o: seen.append([b.tensor.clone() for b in inputs[1]]))
    return seen


@pytest.mark.parametrize("mode", ["student", "teacher", "union"])
def test_both_heads_answer_for_identical_rois(tmp_path, tiny_shapes, rcnn_teacher, mode):
    model = _student(tmp_path, rcnn_teacher, PROPOSALS=mode)
    teacher = model.teacher.model
    s_seen, t_seen = _pooled_boxes(model.roi_heads.box_pooler), \
        _pooled_boxes(teacher.roi_heads.box_pooler)
    distiller = model.distillers["TAR"]
    shared = []
    original = distiller.shared_predictions

    def spy(student, teacher_rec):
        rois, s_pred, t_pred = original(student, teacher_rec)
        shared.append((rois, s_pred, t_pred))
        return rois, s_pred, t_pred

    distiller.shared_predictions = spy
    losses = _forward(model, fake_batch())
    assert {"loss_tar_cls", "loss_tar_reg", "loss_cls", "loss_box_reg"} <= set(losses)
    rois, (s_cls, s_deltas), (t_cls, t_deltas) = shared[0]
    shared_boxes = [r.proposal_boxes.tensor for r in rois]
    n = sum(len(b) for b in shared_boxes)
    assert s_cls.shape == t_cls.shape == (n, 7) and s_deltas.shape == t_deltas.shape == (n, 24)
    # the teacher's box head pooled exactly the shared RoIs (its last call) ...
    assert all(torch.equal(a, b) for a, b in zip(t_seen[-1], shared_boxes))
    # ... and so did the student's: in its own forward (student mode) or in a second head pass
    assert all(torch.equal(a, b) for a, b in zip(s_seen[-1], shared_boxes))
    if mode == "student":
        assert len(s_seen) == 1 and len(t_seen) == 1  # no extra student head pass
    else:
        assert len(s_seen) == 2
        if mode == "union":
            own = s_seen[0]
            assert all(torch.equal(a[:len(o)], o) for a, o in zip(shared_boxes, own))
            assert all(len(a) > len(o) for a, o in zip(shared_boxes, own))
    assert all(torch.isfinite(v).all() for v in losses.values())


def test_teacher_sampling_statistics_stay_out_of_the_students_metrics(tmp_path, tiny_shapes,
                                                                      rcnn_teacher):
    model = _student(tmp_path, rcnn_teacher, PROPOSALS="teacher")
    with EventStorage(0) as storage:
        model(fake_batch())
    # one value: the student's own sampling (the teacher's went to a storage of its own)
    assert len(storage.history("roi_head/num_fg_samples").values()) == 1


def test_gradients_reach_the_student_heads_never_the_teacher(tmp_path, tiny_shapes,
                                                             rcnn_teacher):
    model = _student(tmp_path, rcnn_teacher, FEAT_WEIGHT=0.0)  # the head terms only
    losses = _forward(model, fake_batch())
    (losses["loss_tar_cls"] + losses["loss_tar_reg"]).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad
               for p in model.teacher.model.parameters())


def test_linear_decay_is_tars_default_schedule():
    cfg = add_distill_config(get_cfg())
    cfg.SOLVER.MAX_ITER = 1000
    cfg.MODEL.DISTILL.METHODS = ["TAR", "CSGR"]
    schedules = method_schedules(cfg)
    assert list(schedules) == ["TAR"]  # CSGR follows MODEL.DISTILL.DECAY ("none")
    tar = schedules["TAR"]
    for it in (0, 1, 250, 500, 999, 1000, 1200):
        assert math.isclose(tar(it), max(0.0, 1 - it / 1000), abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# configs and errors
# ---------------------------------------------------------------------------------------------
def _merged(path):
    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, path))
    return cfg


def test_configs_per_detector():
    rcnn = _merged("configs/TAR-FasterRCNN-R50.yaml")
    node = rcnn.MODEL.DISTILL.TAR
    assert list(rcnn.MODEL.DISTILL.METHODS) == ["TAR"]
    assert rcnn.MODEL.META_ARCHITECTURE == "DistillGeneralizedRCNN"
    assert node.IN_FEATURES == ["p2", "p3", "p4", "p5"]
    assert node.CLS_WEIGHT > 0 and node.REG_WEIGHT > 0 and node.FEAT_WEIGHT > 0
    assert node.PROPOSALS == "student" and node.REG_COMPARE == "student"
    assert node.DECAY.TYPE == "linear" and node.DECAY.FINAL_FACTOR == 0.0
    assert rcnn.DATASETS.TRAIN == ("soda10m_train",)
    voc = _merged("configs/TAR-FasterRCNN-R50-VOC.yaml")
    assert voc.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval")
    assert voc.DATASETS.TEST == ("voc_2007_test",)
    assert voc.MODEL.ROI_HEADS.NUM_CLASSES == 20
    assert voc.MODEL.DISTILL.TAR.CLS_WEIGHT > 0
    # a RetinaNet student distils the features only (no RoIs)
    retina = _merged("configs/demo/Base-Demo-RetinaNet.yaml").MODEL.DISTILL.TAR
    assert retina.CLS_WEIGHT == 0 and retina.REG_WEIGHT == 0 and retina.FEAT_WEIGHT > 0


@pytest.mark.parametrize("key,value,match", [
    ("PROPOSALS", "both", "MODEL.DISTILL.TAR.PROPOSALS is 'both'"),
    ("REG_COMPARE", "gt", "MODEL.DISTILL.TAR.REG_COMPARE is 'gt'"),
    ("TEMPERATURE", 0.0, "MODEL.DISTILL.TAR.TEMPERATURE must be > 0"),
    ("SIGMA_SCALE", -1.0, "MODEL.DISTILL.TAR.SIGMA_SCALE must be > 0"),
    ("CLS_WEIGHT", -1.0, "MODEL.DISTILL.TAR.CLS_WEIGHT must be >= 0"),
])
def test_config_errors_name_the_key(key, value, match):
    cfg = add_distill_config(get_cfg())
    cfg.MODEL.DISTILL.TAR[key] = value
    shapes = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in range(3, 8)}
    with pytest.raises(ValueError, match=match):
        build_distiller("TAR", cfg, shapes, shapes)


def test_all_weights_zero_is_refused():
    cfg = add_distill_config(get_cfg())
    for k in ("FEAT_WEIGHT", "CLS_WEIGHT", "REG_WEIGHT"):
        cfg.MODEL.DISTILL.TAR[k] = 0.0
    shapes = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in range(3, 8)}
    with pytest.raises(ValueError, match="all 0"):
        build_distiller("TAR", cfg, shapes, shapes)


def test_feature_only_tar_asks_for_features_only():
    d = _tar()
    assert d.required_outputs == {"student": ("features",), "teacher": ("features",)}
    d = _tar(cls_weight=1.0, proposals="teacher")
    assert "roi_head" in d.required_outputs["student"]
    assert "rois" in d.required_outputs["teacher"]


def test_demo_tar_config_trains_two_iterations_and_evaluates_without_teacher(tmp_path,
                                                                             tiny_shapes):
    """configs/demo/TAR-FasterRCNN-R18.yaml through tools/train_net.py: every TAR term logged,
    TAR's own linear factor 1 -> 0.5; then --eval-only with the teacher's files absent."""
    import json
    import sys
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net

    teacher_yaml = os.path.join(REPO, "configs/demo/teacher-FasterRCNN-R18-wide.yaml")
    _, teacher_weights, _ = write_model(tmp_path, load_config(teacher_yaml, check_steps=False),
                                        "teacher")
    config = os.path.join(REPO, "configs/demo/TAR-FasterRCNN-R18.yaml")
    out = tmp_path / "run"
    train_net.cli(["--config-file", config, *train_opts(out),
                   "MODEL.DISTILL.TEACHER.CONFIG", teacher_yaml,
                   "MODEL.DISTILL.TEACHER.WEIGHTS", teacher_weights])
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = logged_keys(out)
    expected = {"loss_tar_cls", "loss_tar_reg"} | {f"loss_tar_feat_p{i}" for i in range(2, 6)}
    assert expected <= keys
    assert [r["distill/factor_TAR"] for r in rows if "distill/factor_TAR" in r][-1] == 0.5
    eval_dir = tmp_path / "eval"
    train_net.cli(["--config-file", config, "--eval-only", *train_opts(eval_dir, test=True),
                   "MODEL.WEIGHTS", str(out / "model_final.pth"),
                   "MODEL.DISTILL.TEACHER.CONFIG", str(tmp_path / "absent.yaml"),
                   "MODEL.DISTILL.TEACHER.WEIGHTS", str(tmp_path / "absent.pth")])
    with open(eval_dir / "eval_results.json") as f:
        assert "AP" in json.load(f)["bbox"]


@pytest.mark.parametrize("path", ["configs/TAR-FasterRCNN-R50.yaml",
                                  "configs/TAR-FasterRCNN-R50-VOC.yaml"])
def test_paper_configs_build_their_student_and_check_the_pair(path):
    """The R50 student builds with its TAR distiller; the R101 teacher is read from its yaml (on
    the meta device: its checkpoint is never needed to build)."""
    cfg = load_config(os.path.join(REPO, path), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    tar = model.distillers["TAR"]
    assert tar.in_features == ["p2", "p3", "p4", "p5"] and tar.uses_rois
    assert model.distill_fields["teacher"] == ("features", "roi_head")


def test_demo_rcnn_base_keeps_the_rcnn_distill_settings():
    """Base-Demo-RCNN.yaml restates Base-Distill-RCNN-FPN.yaml's R-CNN settings and TAR's
    defaults (its RetinaNet base changed them): they must not drift apart."""
    demo = _merged("configs/demo/Base-Demo-RCNN.yaml").MODEL.DISTILL
    paper = _merged("configs/Base-Distill-RCNN-FPN.yaml").MODEL.DISTILL
    defaults = add_distill_config(get_cfg()).MODEL.DISTILL
    for method in ("CSGR", "MIMIC", "PKD", "FGD", "TAR"):
        assert demo[method].IN_FEATURES == paper[method].IN_FEATURES, method
    assert demo.FGD == paper.FGD
    assert demo.TAR == paper.TAR
    assert (demo.TAR.CLS_WEIGHT, demo.TAR.REG_WEIGHT) == (defaults.TAR.CLS_WEIGHT,
                                                          defaults.TAR.REG_WEIGHT)


def test_pick_rois_takes_selected_rejected_and_negative_rois_of_one_image():
    from csgr_distill.vis import pick_rois
    t_prob = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4],
                           [0.99, 0.01]])
    details = {"image": torch.tensor([0, 0, 0, 0, 0, 1]), "t_prob": t_prob,
               "positive": torch.tensor([True, True, True, False, False, True]),
               "selected": torch.tensor([True, True, False, False, False, True])}
    # selected by teacher foreground prob (0, then 1), the rejected positive 2, the most
    # object-like negative 4; image 1's RoI never
    assert pick_rois(details, image=0) == [0, 1, 2, 4]
    assert pick_rois(details, image=0, selected=1, rejected=0, negatives=2) == [0, 4, 3]


def test_visualize_draws_tar_masks_and_shared_rois(tmp_path, tiny_shapes, rcnn_teacher):
    import sys
    import cv2
    from detectron2.data import DatasetCatalog
    from tiny import TINY_VAL
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import visualize

    cfg = rcnn_base_cfg(tmp_path / "student")
    cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = ["TAR"]
    cfg.MODEL.DISTILL.TEACHER.CONFIG, cfg.MODEL.DISTILL.TEACHER.WEIGHTS = rcnn_teacher
    cfg.MODEL.DISTILL.TAR.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    yaml_path, weights, _ = write_model(tmp_path, cfg, "tar")
    written = visualize.main(["--config-file", yaml_path, "--weights", weights, "--output",
                              str(tmp_path / "vis"), "--num-images", "1", "--dataset", TINY_VAL,
                              "--level", "p3"])
    stem = os.path.splitext(os.path.basename(DatasetCatalog.get(TINY_VAL)[0]["file_name"]))[0]
    assert sorted(os.path.basename(p) for p in written) == [
        f"{stem}_{name}.png" for name in ("detections", "tar_gaussian_masks", "tar_shared_rois")]
    for p in written:
        picture = cv2.imread(p)
        assert picture is not None and picture.std() > 0
