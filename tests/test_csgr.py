"""CSGR distiller: loss values on hand-made cases, reductions, gradients, config validation."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from torch import nn

from csgr_distill.config import add_distill_config
from tiny import build_distiller
from csgr_distill.distillers.csgr import CSGRDistiller, category_vectors
from csgr_distill.detectors import num_classes_of
from csgr_distill.layers.reference import loop_category_vectors, loop_channel_standardize
from csgr_distill.outputs import DetectorOutputs

R = 1 / math.sqrt(2)


def _outputs(features, cls_logits=None):
    n, _, h, w = next(iter(features.values())).shape
    fields = {"features": features, "feature_names": list(features)}
    if cls_logits is not None:
        fields["cls_logits"] = cls_logits
    return DetectorOutputs("dense", [(h, w)] * n, (h, w), **fields)


def _distiller(cs=2, ct=2, k=1, levels=("p3",), **kw):
    return CSGRDistiller(in_features=list(levels), student_channels={l: cs for l in levels},
                         teacher_channels={l: ct for l in levels}, num_classes=k, **kw).double()


# hand case: 1 image, 2 channels, 1x2 map.
#   S: ch0 [1, 3], ch1 [0, 2]  -> S_hat = [[-r, r], [-r, r]]     (unbiased std sqrt(2))
#   T: ch0 [5, 1], ch1 [2, 4]  -> T_hat = [[r, -r], [-r, r]]
S = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]], dtype=torch.float64)
T = torch.tensor([[[[5.0, 1.0]], [[2.0, 4.0]]]], dtype=torch.float64)


def test_hand_case_learned_attention_and_weights():
    d = _distiller(alpha=0.5, beta=0.25)
    with torch.no_grad():
        d.levels["p3"].classifier.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    losses = d(_outputs({"p3": S}), _outputs({"p3": T}), [])
    assert set(losses) == {"loss_csgr_cs_p3", "loss_csgr_gr_p3"}
    # M_S = [-r, r] -> A_S = [s(-2r), s(2r)] -> V_S = [r tanh r, r tanh r]
    # M_T = [r, -r] -> V_T = [r tanh r, -r tanh r]  -> L_cs = (2 r tanh r)^2 = 2 tanh^2 r
    l_cs = 2 * math.tanh(R) ** 2
    # gamma = 0: L_gr = sum (T_hat - S_hat)^2 = 4 * (2r)^2 / 2 ... = 4
    l_gr = 4.0
    assert losses["loss_csgr_cs_p3"].item() == pytest.approx(0.5 * l_cs, rel=1e-5)
    assert losses["loss_csgr_gr_p3"].item() == pytest.approx(0.25 * l_gr, rel=1e-5)


def test_hand_case_divides_by_batch_size():
    # the same image twice: per channel values [a, b, a, b] -> x_hat = +-sqrt(3)/2, and the sums
    # over two identical images divided by N = 2 equal one image's value at that r.
    d = _distiller(alpha=1.0, beta=1.0)
    with torch.no_grad():
        d.levels["p3"].classifier.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    r = math.sqrt(3) / 2
    losses = d(_outputs({"p3": torch.cat([S, S])}), _outputs({"p3": torch.cat([T, T])}), [])
    assert losses["loss_csgr_cs_p3"].item() == pytest.approx(4 * r * r * math.tanh(r) ** 2,
                                                             rel=1e-5)
    assert losses["loss_csgr_gr_p3"].item() == pytest.approx(8 * r * r, rel=1e-5)  # = 6


def test_hand_case_teacher_head_attention():
    d = _distiller(k=2, attention="teacher_head", alpha=1.0, beta=1.0)
    # the teacher's logits only: the student may be of any family
    assert d.required_outputs == {"student": ("features",), "teacher": ("features", "cls_logits")}
    assert CSGRDistiller.required_outputs == {"student": ("features",), "teacher": ("features",)}
    assert d.levels["p3"].classifier is None
    # [N, A*K, H, W] with A = 2 anchors, K = 2 classes, anchor-major as in detectron2's heads
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0],     # anchor 0: class 0, class 1
                           [1.0, 0.0], [3.0, 0.0]],    # anchor 1: class 0, class 1
                          dtype=torch.float64).view(1, 4, 1, 2)
    # max over anchors: class 0 [1, 2], class 1 [3, 1]
    # class 0: A = [s(-1), s(1)] -> V_S = [r t, r t], V_T = [-r t, r t], t = tanh(1/2)
    # class 1: A = [s(2), s(-2)] -> V_S = [-r u, -r u], V_T = [r u, -r u], u = tanh(1)
    expected = 2 * math.tanh(0.5) ** 2 + 2 * math.tanh(1.0) ** 2
    losses = d(_outputs({"p3": S}), _outputs({"p3": T}, cls_logits=[logits]), [])
    assert losses["loss_csgr_cs_p3"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_csgr_gr_p3"].item() == pytest.approx(4.0, rel=1e-5)
    maps = d.attention_maps({"p3": T}, "p3", role="teacher", teacher_logits=logits)
    sig = torch.sigmoid(torch.tensor([-1.0, 1.0, 2.0, -2.0], dtype=torch.float64))
    assert torch.allclose(maps["category"].flatten(), sig, atol=1e-12)


def test_category_vectors_match_loops():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    feat = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    att = torch.softmax(logits.flatten(2), dim=2).view_as(logits)
    assert torch.allclose(category_vectors(att, feat), loop_category_vectors(logits, feat),
                          atol=1e-12)


def test_random_case_matches_brute_force():
    # student 8 channels, teacher 16 (adapter), 3 images, 4 classes, gamma != 0
    torch.manual_seed(0)
    d = _distiller(cs=8, ct=16, k=4, alpha=0.3, beta=0.7)
    with torch.no_grad():
        d.levels["p3"].cca.gamma.fill_(0.5)
    s = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    t = torch.randn(3, 16, 4, 5, dtype=torch.float64) * 3 + 1
    losses = d(_outputs({"p3": s}), _outputs({"p3": t}), [])
    mod = d.levels["p3"]
    with torch.no_grad():
        s_hat = loop_channel_standardize(mod.adapter(s))
        t_hat = loop_channel_standardize(t)
        v_s = loop_category_vectors(mod.classifier(s_hat), s_hat)
        v_t = loop_category_vectors(mod.classifier(t_hat), t_hat)
        l_cs = sum(float((v_t[b] - v_s[b]).pow(2).sum()) for b in range(3)) / 3
        l_gr = sum(float((mod.cca(t_hat)[b] - mod.cca(s_hat)[b]).pow(2).sum())
                   for b in range(3)) / 3
    assert losses["loss_csgr_cs_p3"].item() == pytest.approx(0.3 * l_cs, rel=1e-8)
    assert losses["loss_csgr_gr_p3"].item() == pytest.approx(0.7 * l_gr, rel=1e-8)


def test_adapter_when_channels_differ():
    d = _distiller(cs=8, ct=16, k=3)
    assert isinstance(d.levels["p3"].adapter, nn.Conv2d)
    assert d.levels["p3"].adapter.in_channels == 8 and d.levels["p3"].adapter.out_channels == 16
    assert isinstance(_distiller(cs=16, ct=16, k=3).levels["p3"].adapter, nn.Identity)


def test_independent_modules_per_level_and_loss_names():
    d = _distiller(cs=4, ct=4, k=2, levels=("p3", "p4"))
    assert d.levels["p3"].cca is not d.levels["p4"].cca
    assert d.levels["p3"].classifier is not d.levels["p4"].classifier
    feats = {"p3": torch.randn(2, 4, 4, 4, dtype=torch.float64),
             "p4": torch.randn(2, 4, 2, 2, dtype=torch.float64)}
    losses = d(_outputs(feats), _outputs({k: v + 1 for k, v in feats.items()}), [])
    assert sorted(losses) == ["loss_csgr_cs_p3", "loss_csgr_cs_p4",
                              "loss_csgr_gr_p3", "loss_csgr_gr_p4"]


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_gradients(gamma):
    torch.manual_seed(1)
    d = _distiller(cs=8, ct=16, k=3)
    with torch.no_grad():
        d.levels["p3"].cca.gamma.fill_(gamma)
    s = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 16, 4, 5, dtype=torch.float64, requires_grad=True)
    losses = d(_outputs({"p3": s}), _outputs({"p3": t}), [])
    sum(losses.values()).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    mod = d.levels["p3"]
    must = [mod.adapter.weight, mod.adapter.bias, mod.classifier.weight, mod.cca.gamma]
    if gamma != 0:  # at gamma = 0 the CCA output does not depend on q, k, v
        must += [mod.cca.query.weight, mod.cca.key.weight, mod.cca.value.weight]
    for p in must:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # b_v cancels in CCA(T) - CCA(S) (attention rows sum to 1): its gradient is exactly 0, but
    # it is in the graph, so DDP (find_unused_parameters=False) sees every parameter used.
    assert mod.cca.value.bias.grad is not None
    assert torch.count_nonzero(mod.cca.value.bias.grad) == 0


def test_classifier_gets_gradient_through_teacher_branch():
    # T_hat is detached, but V_T depends on W through A_T: the full gradient of W differs from
    # the one obtained with the teacher attention cut off.
    torch.manual_seed(2)
    d = _distiller(cs=4, ct=4, k=2)
    s = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    w = d.levels["p3"].classifier.weight
    (g_full,) = torch.autograd.grad(d.level_losses(s, t, "p3")["cs"], w)
    s_hat, t_hat = d.normalized(s, "p3", "student"), d.normalized(t, "p3", "teacher")
    v_s = category_vectors(d._category_attention(s_hat, "p3"), s_hat)
    v_t = category_vectors(d._category_attention(t_hat, "p3"), t_hat)
    (g_manual,) = torch.autograd.grad((v_t - v_s).pow(2).sum() / 2, w, retain_graph=True)
    v_t_cut = category_vectors(d._category_attention(t_hat, "p3").detach(), t_hat)
    (g_student_only,) = torch.autograd.grad((v_t_cut - v_s).pow(2).sum() / 2, w)
    assert torch.allclose(g_full, g_manual, atol=1e-12)
    assert not torch.allclose(g_full, g_student_only, atol=1e-6)


def test_visualisation_helpers():
    torch.manual_seed(3)
    d = _distiller(cs=8, ct=16, k=3)
    feats = {"p3": torch.randn(2, 8, 4, 5, dtype=torch.float64)}
    maps = d.attention_maps(feats, "p3")
    assert maps["category"].shape == (2, 3, 4, 5)
    assert torch.allclose(maps["category"].sum(dim=(2, 3)), torch.ones(2, 3, dtype=torch.float64))
    assert maps["normalized"].shape == (2, 16, 4, 5) and maps["vectors"].shape == (2, 3, 16)
    pix = d.pixel_attention(feats, "p3", 1, 2)
    assert pix.shape == (2, 4, 5)
    assert torch.allclose(pix.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


def test_runtime_size_mismatch():
    d = _distiller(cs=4, ct=4, k=2)
    with pytest.raises(ValueError, match="spatial"):
        d(_outputs({"p3": torch.randn(1, 4, 4, 4)}), _outputs({"p3": torch.randn(1, 4, 4, 5)}), [])
    with pytest.raises(KeyError, match="p3"):
        d(_outputs({"p4": torch.randn(1, 4, 4, 4)}), _outputs({"p3": torch.randn(1, 4, 4, 4)}), [])


# ---------------------------------------------------------------- config
def _cfg(**csgr):
    cfg = add_distill_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 6
    cfg.MODEL.DISTILL.CSGR.IN_FEATURES = ["p3", "p4"]
    for k, v in csgr.items():
        cfg.MODEL.DISTILL.CSGR[k] = v
    return cfg


def _shapes(channels, strides=(8, 16)):
    return {f"p{3 + i}": ShapeSpec(channels=channels, stride=s) for i, s in enumerate(strides)}


def test_from_config():
    d = build_distiller("CSGR", _cfg(ALPHA=0.1, BETA=0.2, RECURRENCE=2),
                                       _shapes(8), _shapes(16))
    assert d.num_classes == 6 and d.alpha == 0.1 and d.beta == 0.2
    assert d.levels["p4"].classifier.out_channels == 6
    assert d.levels["p3"].cca.recurrence == 2
    assert isinstance(d.levels["p3"].adapter, nn.Conv2d)
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 9
    assert num_classes_of(cfg) == 9


@pytest.mark.parametrize("kw,student,teacher,key", [
    ({"ATTENTION": "teacher"}, _shapes(8), _shapes(8), "MODEL.DISTILL.CSGR.ATTENTION"),
    ({"RECURRENCE": 3}, _shapes(8), _shapes(8), "MODEL.DISTILL.CSGR.RECURRENCE"),
    ({"IN_FEATURES": ["p3", "p5"]}, _shapes(8), _shapes(8), "MODEL.DISTILL.CSGR.IN_FEATURES"),
])
def test_config_errors_name_the_key(kw, student, teacher, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_distiller("CSGR", _cfg(**kw), student, teacher)
