"""DETRDistill (shared/methods/DETRDistill.md) against hand-computed cases: matching with the soft
class cost against a brute-force permutation search, each loss on a hand case (soft-target BCE,
temperature KL, the target-aware mask with its floor and per-image maximum, quality with and
without GT), the query-prior pass (teacher's queries and assignment; absent at inference and in
the export), gradients, configs and 2-iteration runs."""
import itertools
import math
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from csgr_distill.config import load_config
from csgr_distill.distillers.detrdistill import (DETRDistillDistiller, match_predictions,
                                                 soft_class_cost, target_aware_mask)
from tiny import REPO, fake_batch, logged_keys, train_opts, write_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["INPUT.FIXED_SIZE", "64", "MODEL.DETR.HIDDEN_DIM", "64",
         "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.NUM_QUERIES", "10"]
VARIANTS = ("DETR", "DeformableDETR")


def _xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


@pytest.mark.parametrize("softmax", [False, True])
def test_matching_is_the_brute_force_optimum_of_the_soft_cost(softmax):
    from detr.util.box_ops import generalized_box_iou
    torch.manual_seed(0)
    q, c = 5, 4
    s_l, t_l = torch.randn(1, q, c), torch.randn(1, q, c)
    s_b, t_b = torch.rand(1, q, 4) * 0.4 + 0.3, torch.rand(1, q, 4) * 0.4 + 0.3
    (i, j), = match_predictions(s_l, s_b, t_l, t_b, softmax)
    cost = (soft_class_cost(s_l[0], t_l[0], softmax) + 5 * torch.cdist(s_b[0], t_b[0], p=1)
            - 2 * generalized_box_iou(_xyxy(s_b[0]), _xyxy(t_b[0])))
    best = min(itertools.permutations(range(q)),
               key=lambda perm: float(sum(cost[a, perm[a]] for a in range(q))))
    assert [int(j[list(i).index(a)]) for a in range(q)] == list(best)


@pytest.mark.parametrize("softmax", [False, True])
def test_batched_costs_equal_the_per_image_ones(softmax):
    # match_predictions computes every layer's and image's costs in one pass: the same matrices
    from detr.util.box_ops import generalized_box_iou
    from torchvision.ops import generalized_box_iou as tv_generalized_box_iou
    g = torch.Generator().manual_seed(1)
    s_l, t_l = torch.randn(3, 2, 7, 5, generator=g), torch.randn(3, 2, 6, 5, generator=g)
    s_b = torch.rand(3, 2, 7, 4, generator=g) * 0.4 + 0.3
    t_b = torch.rand(3, 2, 6, 4, generator=g) * 0.4 + 0.3
    # the batched GIoU match_predictions uses
    giou = torch.vmap(tv_generalized_box_iou)(_xyxy(s_b).flatten(0, 1),
                                              _xyxy(t_b).flatten(0, 1)).view(3, 2, 7, 6)
    cls = soft_class_cost(s_l, t_l, softmax)
    for a in range(3):
        for n in range(2):
            assert torch.allclose(giou[a, n], generalized_box_iou(_xyxy(s_b[a, n]),
                                                                  _xyxy(t_b[a, n])), atol=1e-6)
            p = F.softmax(t_l[a, n], -1) if softmax else torch.sigmoid(t_l[a, n])
            direct = (-(p[None] * F.log_softmax(s_l[a, n], -1)[:, None]).sum(-1) if softmax else
                      F.binary_cross_entropy_with_logits(
                          s_l[a, n][:, None].expand(7, 6, 5), p[None].expand(7, 6, 5),
                          reduction="none").sum(-1))
            assert torch.allclose(cls[a, n], direct, atol=1e-5)
    flat = match_predictions(s_l.flatten(0, 1), s_b.flatten(0, 1), t_l.flatten(0, 1),
                             t_b.flatten(0, 1), softmax)
    for k, (i, j) in enumerate(flat):
        (i1, j1), = match_predictions(s_l[k // 2, k % 2][None], s_b[k // 2, k % 2][None],
                                      t_l[k // 2, k % 2][None], t_b[k // 2, k % 2][None], softmax)
        assert i.tolist() == i1.tolist() and j.tolist() == j1.tolist() and len(i) == 6


def test_soft_class_cost_by_hand():
    s, t = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.0]])
    p = torch.sigmoid(t[0])
    bce = sum(float(-(p[k] * F.logsigmoid(s[0, k]) + (1 - p[k]) * F.logsigmoid(-s[0, k])))
              for k in range(2))
    assert math.isclose(float(soft_class_cost(s, t, False)[0, 0]), bce, rel_tol=1e-5)
    ce = -float((F.softmax(t[0], -1) * F.log_softmax(s[0], -1)).sum())
    assert math.isclose(float(soft_class_cost(s, t, True)[0, 0]), ce, rel_tol=1e-5)


def _distiller(**kw):
    args = dict(student_dim=4, teacher_dim=4, logits_weight=1.0, feature_weight=1.0,
                query_prior_weight=0.0, contrast_weight=0.0, temperature=2.0, topk=3,
                mask_floor=0.01, contrast_temperature=0.07)
    args.update(kw)
    return DETRDistillDistiller(**args)


def test_pair_losses_soft_bce_kl_l1_giou_averaged_by_pairs():
    torch.manual_seed(1)
    s_l, t_l = torch.randn(1, 3, 2), torch.randn(1, 3, 2)
    s_b, t_b = torch.rand(1, 3, 4) * 0.3 + 0.3, torch.rand(1, 3, 4) * 0.3 + 0.3
    pairs = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]
    d = _distiller()
    out = d.pair_losses(s_l, s_b, t_l, t_b, pairs, softmax=False)
    sl, tl = s_l[0, [0, 2]], t_l[0, [1, 0]]
    bce = F.binary_cross_entropy_with_logits(sl, torch.sigmoid(tl), reduction="sum") / 2
    assert math.isclose(float(out["cls"]), float(bce), rel_tol=1e-5)
    l1 = (s_b[0, [0, 2]] - t_b[0, [1, 0]]).abs().sum() / 2
    assert math.isclose(float(out["l1"]), 5 * float(l1), rel_tol=1e-5)
    from detr.util.box_ops import generalized_box_iou
    g = torch.diag(generalized_box_iou(_xyxy(s_b[0, [0, 2]]), _xyxy(t_b[0, [1, 0]])))
    assert math.isclose(float(out["giou"]), 2 * float((1 - g).sum() / 2), rel_tol=1e-5)
    kl = d.pair_losses(s_l, s_b, t_l, t_b, pairs, softmax=True)["cls"]
    tau = 2.0
    ps, pt = F.softmax(sl / tau, -1), F.softmax(tl / tau, -1)
    expected = tau ** 2 * float((pt * (pt.log() - ps.log())).sum()) / 2
    assert math.isclose(float(kl), expected, rel_tol=1e-5)


def test_target_aware_mask_floor_and_per_image_maximum():
    feature = torch.tensor([[[1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [0.0, 0.0]]])  # [2, 2, 2]
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    quality = torch.tensor([0.5, 0.25])
    m = target_aware_mask(queries, quality, feature)
    # cosines at (0,0): (1, 0); (0,1): (0, 1); (1,0): zero feature -> 0; (1,1): (-1, 0)
    raw = torch.tensor([[0.5, 0.25], [0.01, 0.01]])  # sums, floored at 0.01
    assert torch.allclose(m, raw / 0.5, atol=1e-6)
    assert float(m.max()) == pytest.approx(1.0)


def test_quality_is_score_times_max_iou_or_the_score_without_gt():
    d = _distiller(topk=2)
    logits = torch.tensor([[3.0, -3.0], [-3.0, 1.0], [0.0, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]])
    gt = _xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]]))
    q, c = d.quality(logits, boxes, gt, softmax=False)
    assert q.tolist() == [0, 1]  # (query 0, class 0) then (query 1, class 1)
    assert math.isclose(float(c[0]), float(torch.sigmoid(torch.tensor(3.0))) * 0.5, rel_tol=1e-5)
    assert float(c[1]) == pytest.approx(0.0)  # no overlap with the GT
    q, c = d.quality(logits, boxes, torch.zeros(0, 4), softmax=False)
    assert torch.allclose(c, torch.sigmoid(torch.tensor([3.0, 1.0])))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detrdistill_teachers")
    return {v: write_model(tmp, load_config(os.path.join(
        REPO, f"configs/demo/teacher-{v}-R18-wide.yaml"), SMALL, check_steps=False), v)[:2]
        for v in VARIANTS}


def _student_cfg(variant, teacher, extra=()):
    return load_config(os.path.join(REPO, f"configs/demo/DETRDistill-{variant}-R18.yaml"),
                       SMALL + ["MODEL.DISTILL.TEACHER.CONFIG", teacher[0],
                                "MODEL.DISTILL.TEACHER.WEIGHTS", teacher[1]] + list(extra),
                       check_steps=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_query_prior_pass_uses_the_teachers_queries_and_assignment(variant, teachers):
    model = build_model(_student_cfg(variant, teachers[variant])).train()
    distiller = model.distillers["DETRDistill"]
    seen = {}
    original = distiller.query_prior_losses

    def spy(student, teacher, targets):
        calls = []
        decoder = student.decoder
        student["decoder"] = lambda q: calls.append(q) or decoder(q)
        out = original(student, teacher, targets)
        seen.update(queries=calls[0], teacher_queries=teacher.object_queries,
                    matches=teacher.matches[-1], out=out)
        return out

    distiller.query_prior_losses = spy
    with EventStorage(0):
        losses = model(fake_batch())
    assert torch.equal(seen["queries"], seen["teacher_queries"].detach())
    assert not seen["queries"].requires_grad
    layers = 2  # the demo configs: MODEL.DETR.DEC_LAYERS 2
    for layer in range(layers):
        for k in ("ce", "bbox", "giou"):
            assert f"loss_detrdistill_qp_{k}_l{layer}" in losses
    for layer in range(layers):
        for k in ("cls", "l1", "giou", "feat"):
            assert torch.isfinite(losses[f"loss_detrdistill_{k}_l{layer}"])
    # the assignment used is the teacher's own (its matcher on its predictions)
    assert all(len(i) == 2 for i, _ in seen["matches"])
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.model.parameters())


def test_query_prior_loss_is_the_set_loss_under_the_given_assignment(teachers):
    """With the student's own queries and assignment the query-prior terms are the student's own
    set losses (a pass that reproduces the forward, supervised as the criterion supervises it)."""
    from csgr_distill.detr_port.detr import detr_targets
    model = build_model(_student_cfg("DETR", teachers["DETR"])).eval()
    batch = fake_batch()
    with torch.no_grad():
        rec = model.recorder.record(model, model.preprocess_image(batch), batch,
                                    ("pred_logits", "pred_boxes", "object_queries", "decoder",
                                     "set_losses", "matches"))
        targets = detr_targets([x["instances"] for x in batch], rec.image_sizes)
        extra = rec.decoder(rec.object_queries)
        own = rec.set_losses(extra["pred_logits"][-1], extra["pred_boxes"][-1], targets,
                             rec.matches[-1])
        reference = model.losses({"pred_logits": rec.pred_logits[-1],
                                  "pred_boxes": rec.pred_boxes[-1]},
                                 [x["instances"] for x in batch], rec.image_sizes)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert torch.allclose(own[k], reference[k], atol=1e-5), k


def test_refusals_name_the_keys(teachers):
    cfg = _student_cfg("DETR", teachers["DETR"], ["MODEL.DETR.DEC_LAYERS", "3"])
    with pytest.raises(ValueError, match="DEC_LAYERS 3, the teacher 2"):
        build_model(cfg)
    cfg = _student_cfg("DETR", teachers["DETR"], ["MODEL.DETR.HIDDEN_DIM", "32",
                                                  "MODEL.DETR.NHEADS", "4"])
    with pytest.raises(ValueError, match="QUERY_PRIOR_WEIGHT 0"):
        build_model(cfg)
    with pytest.raises(ValueError, match="every component's weight is 0"):
        _distiller(logits_weight=0.0, feature_weight=0.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_demo_config_with_csgr_trains_evaluates_and_exports_without_the_extra_pass(
        variant, teachers, tmp_path, tiny_shapes):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net
    from csgr_distill.export import StudentCheckpointer

    config = os.path.join(REPO, f"configs/demo/DETRDistill-{variant}-R18.yaml")
    out = tmp_path / "run"
    crop = ["INPUT.DETR_CROP_RESIZE", "(48, 56)", "INPUT.CROP.SIZE", "(40, 56)"]
    train_net.cli(["--config-file", config, *SMALL, *train_opts(out), *crop,
                   "MODEL.DISTILL.METHODS", "['DETRDistill', 'CSGR']",
                   "MODEL.DISTILL.TEACHER.CONFIG", teachers[variant][0],
                   "MODEL.DISTILL.TEACHER.WEIGHTS", teachers[variant][1]])
    keys = logged_keys(out)
    assert {"loss_detrdistill_cls_l0", "loss_detrdistill_feat_l1", "loss_detrdistill_qp_ce_l1",
            "loss_csgr_cs_res5", "loss_giou"} <= keys
    plain = load_config(str(out / "model_final_student.yaml"))
    weights = torch.load(plain.MODEL.WEIGHTS, weights_only=False)["model"]
    assert not any(k.startswith("distillers.") for k in weights)
    reloaded = build_model(plain).eval()
    StudentCheckpointer(reloaded).load(plain.MODEL.WEIGHTS)
    with torch.no_grad():
        assert len(reloaded(fake_batch(n=1))[0]["instances"]) > 0


@pytest.mark.parametrize("path", ["configs/DETRDistill-DeformableDETR-R50.yaml",
                                  "configs/DETRDistill-DETR-R50.yaml"])
def test_paper_configs_have_the_published_setting(path):
    cfg = load_config(os.path.join(REPO, path), check_steps=False)
    c = cfg.MODEL.DISTILL.DETRDISTILL
    assert list(cfg.MODEL.DISTILL.METHODS) == ["DETRDistill"]
    assert (c.COST_CLASS, c.COST_L1, c.COST_GIOU, c.TOPK, c.MASK_FLOOR) == (1, 5, 2, 100, 0.01)
    assert (c.LOGITS_WEIGHT, c.FEATURE_WEIGHT, c.QUERY_PRIOR_WEIGHT, c.CONTRAST_WEIGHT) == (
        1, 1, 1, 0)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)


@pytest.mark.parametrize("variant", VARIANTS)
def test_visualize_draws_the_mask_and_the_matches(variant, teachers, tmp_path, tiny_shapes):
    import cv2
    from tiny import TINY_VAL
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import visualize

    cfg = _student_cfg(variant, teachers[variant], ["DATASETS.TEST", f"('{TINY_VAL}',)"])
    yaml_path, weights, _ = write_model(tmp_path, cfg, "dd")
    written = visualize.main(["--config-file", yaml_path, "--weights", weights, "--output",
                              str(tmp_path / "vis"), "--num-images", "1"])
    assert sorted(p.rsplit("_", 1)[-1] for p in written) == ["detections.png", "detrdistill.png"]
    picture = cv2.imread([p for p in written if p.endswith("_detrdistill.png")][0])
    assert picture is not None and picture.shape[1] > 1.5 * picture.shape[0]
