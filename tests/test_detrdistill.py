"""DETRDistill (docs/methods/DETRDistill.md) against hand-computed cases: matching with the soft
class cost against a brute-force permutation search, the teacher's boxes clipped to the image
before the matching and the pair losses (the authors' code) on a hand case where it changes both,
each loss on a hand case (soft-target BCE, temperature KL, the target-aware mask with its floor
and per-image maximum, quality with and without GT), the contrastive term against a
re-implementation of the authors' formula, the query-prior pass (teacher's queries, each layer's
or the last layer's teacher assignment; absent at inference and in the export), gradients,
configs and 2-iteration runs."""
import itertools
import math
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from csgr_distill.cli import load_config
from csgr_distill.distillers.detrdistill import (DETRDistillDistiller, clip_to_image,
                                                 match_predictions, soft_class_cost,
                                                 target_aware_mask)
from csgr_distill.outputs import DetectorOutputs
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


def _record(logits, boxes, softmax=False, **fields):
    """A hand-built DETR record: ``logits`` ``[L, N, Q, C]``, ``boxes`` ``[L, N, Q, 4]``."""
    n = logits.shape[1]
    return DetectorOutputs("detr", [(100, 100)] * n, (100, 100), pred_logits=logits,
                           pred_boxes=boxes, softmax=softmax, **fields)


def _gt(n):
    from detectron2.structures import Boxes, Instances
    out = []
    for _ in range(n):
        inst = Instances((100, 100))
        inst.gt_boxes, inst.gt_classes = Boxes(torch.tensor([[40.0, 40.0, 60.0, 70.0]])), \
            torch.tensor([0])
        out.append(inst)
    return out


# teacher A crosses the left border: corners x -0.1 .. 0.2, clipped to 0 .. 0.2 (by hand)
T_A, T_A_CLIPPED = [0.05, 0.5, 0.3, 0.2], [0.1, 0.5, 0.2, 0.2]
T_B = [0.85, 0.5, 0.2, 0.2]  # inside the image
S_0, S_1 = T_A, T_A_CLIPPED  # the student has one box on each


def test_teacher_boxes_are_clipped_to_the_image_before_matching_and_pair_losses():
    """The authors' code clips the teacher's boxes to the image before its matching and its
    L1/GIoU targets. A hand case where that flips the matching and changes L1 and GIoU: with the
    clipped A, student 1 sits exactly on it and student 0 goes to B; with A as predicted,
    student 0 sits exactly on A and student 1 goes to B."""
    s_boxes = torch.tensor([[[S_0, S_1]]])  # [L=1, N=1, Q=2, 4]
    t_boxes = torch.tensor([[[T_A, T_B]]])
    logits = torch.zeros(1, 1, 2, 3)  # equal class costs: the boxes decide
    student, teacher = _record(logits, s_boxes), _record(logits, t_boxes)

    # brute force over both assignments on the hand-clipped boxes, costs written out
    def cost(s, t):
        s, t = torch.tensor(s), torch.tensor(t)
        from detr.util.box_ops import generalized_box_iou
        return float(5 * (s - t).abs().sum() - 2 * generalized_box_iou(_xyxy(s[None]),
                                                                       _xyxy(t[None]))[0, 0])

    def best(t0, t1):
        straight = cost(S_0, t0) + cost(S_1, t1)
        crossed = cost(S_0, t1) + cost(S_1, t0)
        return [0, 1] if straight < crossed else [1, 0]

    assert best(T_A_CLIPPED, T_B) == [1, 0] and best(T_A, T_B) == [0, 1]
    for clip, teacher_of_student, l1_sum, giou_loss_sum in (
            # clipped: pairs (S0, B), (S1, A'): L1 0.8 + 0.1 and 0; GIoU(S0, B) = -0.11 / 0.21
            (True, [1, 0], 0.9, 1 + 11 / 21),
            # as predicted: pairs (S0, A), (S1, B): L1 0 and 0.75; GIoU(S1, B) = -0.11 / 0.19
            (False, [0, 1], 0.75, 1 + 11 / 19)):
        d = _distiller(feature_weight=0.0, clip_teacher_boxes=clip)
        (i, j), = d.match_layers(student, teacher)[0]
        assert j[i.argsort()].tolist() == teacher_of_student
        out = d(student, teacher, _gt(1))
        assert float(out["loss_detrdistill_l1_l0"]) == pytest.approx(5 * l1_sum / 2, rel=1e-5)
        assert float(out["loss_detrdistill_giou_l0"]) == pytest.approx(2 * giou_loss_sum / 2,
                                                                       rel=1e-5)
    # the default is the authors' (clipped)
    assert _distiller().clip_teacher_boxes
    # the clip itself: A's corners clamped; B, inside, bit for bit
    assert torch.allclose(clip_to_image(t_boxes)[0, 0, 0], torch.tensor(T_A_CLIPPED), atol=1e-7)
    assert torch.equal(clip_to_image(t_boxes)[0, 0, 1], t_boxes[0, 0, 1])


def _authors_contrastive(head, s_layer, t_layer, teacher_of_student):
    """The authors' contrastive term (their ``MoCoCLHead`` on their inputs), written out here as
    a reference on the distiller's own head weights: every student query of the batch in order
    (``[N*Q, D_s]``) against the teacher query matched to each (``[N*Q, D_t]``); each side a
    linear projection then linear -> BatchNorm1d (batch statistics) -> ReLU -> linear; L2
    normalisation; logits = teacher x student^T / 0.07; cross-entropy with the diagonal as
    the positives, averaged."""
    def side(x, seq):
        proj, fc1, bn, _, fc2 = seq
        x = F.linear(F.linear(x, proj.weight, proj.bias), fc1.weight, fc1.bias)
        x = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        return F.normalize(F.linear(F.relu(x), fc2.weight, fc2.bias), dim=1)

    img = side(s_layer.reshape(-1, s_layer.shape[-1]), head.student_head)
    pts = side(torch.cat([t_layer[n][teacher_of_student[n]] for n in range(len(t_layer))]),
               head.teacher_head)
    logits = torch.einsum("nc,ck->nk", pts, img.T) / 0.07
    return F.cross_entropy(logits, torch.arange(len(logits)))


def test_contrastive_term_is_the_authors_formula_on_every_layer():
    g = torch.Generator().manual_seed(3)
    layers, n, q, ds, dt = 2, 2, 5, 4, 6  # different widths: each side has its own head
    logits = torch.randn(layers, n, q, 3, generator=g)
    s_boxes = torch.rand(layers, n, q, 4, generator=g) * 0.4 + 0.3
    t_boxes = torch.rand(layers, n, q, 4, generator=g) * 0.4 + 0.3
    s_q = torch.randn(layers, n, q, ds, generator=g, requires_grad=True)
    t_q = torch.randn(layers, n, q, dt, generator=g, requires_grad=True)
    student = _record(logits, s_boxes, query_embeds=s_q)
    teacher = _record(torch.randn(layers, n, q, 3, generator=g), t_boxes, query_embeds=t_q)
    d = _distiller(student_dim=ds, teacher_dim=dt, logits_weight=0.0, feature_weight=0.0,
                   contrast_weight=0.2).train()
    out = d(student, teacher, _gt(n))
    assert sorted(out) == [f"loss_detrdistill_contrast_l{k}" for k in range(layers)]
    pairs = d.match_layers(student, teacher)
    for layer in range(layers):
        order = [j[i.argsort()] for i, j in pairs[layer]]  # teacher index of each student query
        assert all(sorted(o.tolist()) == list(range(q)) for o in order)
        expected = 0.2 * _authors_contrastive(d.contrast_head, s_q[layer], t_q[layer], order)
        assert torch.allclose(out[f"loss_detrdistill_contrast_l{layer}"], expected, atol=1e-6)
    sum(out.values()).backward()
    assert s_q.grad.abs().sum() > 0 and t_q.grad is None  # the teacher's embeddings: detached
    heads = d.contrast_head
    assert all(p.grad is not None for p in heads.parameters())  # both heads learn
    # the other components' weights are 0: no heads without the term
    assert _distiller().contrast_head is None


def _query_prior_records(layers=3, n=2, q=4, g=None):
    """Records for the query-prior pass: the student's decoder returns fixed predictions and
    its set losses note which assignment each layer got; the teacher's assignment differs
    layer by layer."""
    g = g or torch.Generator().manual_seed(5)
    calls = []
    extra = {"pred_logits": torch.randn(layers, n, q, 3, generator=g),
             "pred_boxes": torch.rand(layers, n, q, 4, generator=g)}

    def set_losses(logits, boxes, targets, indices, suffix=""):
        layer = int(suffix[len("_l"):])
        assert torch.equal(logits, extra["pred_logits"][layer])
        calls.append((layer, indices))
        return {"loss_ce" + suffix: logits.sum() * 0 + layer}

    logits, boxes = torch.zeros(layers, n, q, 3), torch.rand(layers, n, q, 4, generator=g)
    student = _record(logits, boxes, decoder=lambda queries: extra, set_losses=set_losses)
    matches = [[(torch.tensor([layer % q]), torch.tensor([0])) for _ in range(n)]
               for layer in range(layers)]  # layer l assigns query l to the GT
    teacher = _record(logits, boxes, object_queries=torch.randn(q, 8, generator=g),
                      matches=matches)
    return student, teacher, calls


@pytest.mark.parametrize("assignment", ["per_layer", "last"])
def test_query_prior_layers_use_each_layers_or_the_last_teacher_assignment(assignment):
    student, teacher, calls = _query_prior_records()
    d = _distiller(logits_weight=0.0, feature_weight=0.0, query_prior_weight=1.0,
                   query_prior_assignment=assignment)
    out = d(student, teacher, _gt(2))
    assert sorted(out) == [f"loss_detrdistill_qp_ce_l{k}" for k in range(3)]
    assert [layer for layer, _ in calls] == [0, 1, 2]
    for layer, indices in calls:
        used = layer if assignment == "per_layer" else -1
        assert indices is teacher.matches[used], (assignment, layer)
    assert _distiller().query_prior_assignment == "per_layer"  # the authors' code
    with pytest.raises(ValueError, match="QUERY_PRIOR_ASSIGNMENT is 'first'"):
        _distiller(query_prior_assignment="first")


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
        calls, assignments = [], []
        decoder, set_losses = student.decoder, student.set_losses
        student["decoder"] = lambda q: calls.append(q) or decoder(q)
        student["set_losses"] = lambda *a: assignments.append(a[3]) or set_losses(*a)
        out = original(student, teacher, targets)
        seen.update(queries=calls[0], teacher_queries=teacher.object_queries,
                    matches=teacher.matches, used=assignments, out=out)
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
    # the assignment used is the teacher's own (its matcher on its predictions), layer l's for
    # layer l (the default, as the authors' code)
    assert len(seen["used"]) == layers
    assert all(used is seen["matches"][layer] for layer, used in enumerate(seen["used"]))
    assert all(len(i) == 2 for m in seen["matches"] for i, _ in m)
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
def test_demo_config_with_csgr_and_contrast_trains_evaluates_and_exports_without_extras(
        variant, teachers, tmp_path, tiny_shapes):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net
    from csgr_distill.export import StudentCheckpointer

    config = os.path.join(REPO, f"configs/demo/DETRDistill-{variant}-R18.yaml")
    out = tmp_path / "run"
    crop = ["INPUT.DETR_CROP_RESIZE", "(48, 56)", "INPUT.CROP.SIZE", "(40, 56)"]
    train_net.cli(["--config-file", config, *SMALL, *train_opts(out), *crop,
                   "MODEL.DISTILL.METHODS", "['DETRDistill', 'CSGR']",
                   "MODEL.DISTILL.DETRDISTILL.CONTRAST_WEIGHT", "0.2",  # the released config's
                   "MODEL.DISTILL.TEACHER.CONFIG", teachers[variant][0],
                   "MODEL.DISTILL.TEACHER.WEIGHTS", teachers[variant][1]])
    keys = logged_keys(out)
    assert {"loss_detrdistill_cls_l0", "loss_detrdistill_feat_l1", "loss_detrdistill_qp_ce_l1",
            "loss_detrdistill_contrast_l0", "loss_detrdistill_contrast_l1",
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
    # the released code's: clipped teacher boxes, each layer's teacher assignment; its
    # contrastive term (not in the paper) off, with its temperature and width when turned on
    assert (c.CLIP_TEACHER_BOXES, c.QUERY_PRIOR_ASSIGNMENT) == (True, "per_layer")
    assert (c.CONTRAST_TEMPERATURE, c.CONTRAST_DIM) == (0.07, 512)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)


def test_released_config_adds_the_contrastive_term_to_the_paper_setting():
    paper, released = (load_config(os.path.join(REPO, f"configs/DETRDistill-{name}.yaml"),
                                   check_steps=False)
                       for name in ("DeformableDETR-R50", "DeformableDETR-R50-released"))
    assert released.MODEL.DISTILL.DETRDISTILL.CONTRAST_WEIGHT == 0.2
    released.MODEL.DISTILL.DETRDISTILL.CONTRAST_WEIGHT = 0.0
    released.OUTPUT_DIR = paper.OUTPUT_DIR
    assert released.dump() == paper.dump()  # nothing else differs


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
