"""The baselines MIMIC, PKD and KD: hand-made cases, invariances, gradients, the benchmark's
straightforward references, configs, 2-iteration training on RetinaNet and Faster R-CNN, and
heterogeneous teacher/student pairs for the feature methods."""
import json
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from csgr_distill.config import add_distill_config
from csgr_distill.distillers.kd import KDDistiller, sigmoid_kl, softmax_kl
from csgr_distill.distillers.mimic import MIMICDistiller
from csgr_distill.distillers.pkd import PKDDistiller, pearson_loss
from csgr_distill.engine import DistillTrainer
from csgr_distill.outputs import DetectorOutputs
from tiny import base_cfg, fake_batch, rcnn_base_cfg, write_model, build_distiller

LN3 = math.log(3.0)


def _outputs(features=None, feature_names=None, **fields):
    """A record of hand-made tensors (features and/or other fields; sizes are not read)."""
    features = features or {}
    names = list(features) if feature_names is None else list(feature_names)
    return DetectorOutputs("dense", [(64, 64)], (64, 64), features=features,
                           feature_names=names, **fields)


def _feature_distiller(cls, cs=1, ct=1, levels=("p3",), weight=1.0):
    return cls(in_features=list(levels), student_channels={lv: cs for lv in levels},
               teacher_channels={lv: ct for lv in levels}, weight=weight).double()


def _kd(k=1, activation="sigmoid", temperature=1.0, weight=1.0):
    return KDDistiller(field="cls_logits", classes_per_anchor=k, weight=weight,
                       temperature=temperature, activation=activation)


def _kd_losses(d, s_logits, t_logits, levels=("p3",)):
    s = _outputs(cls_logits=list(s_logits), feature_names=list(levels))
    t = _outputs(cls_logits=list(t_logits), feature_names=list(levels))
    return d(s, t, [])


def _bernoulli_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


# hand case: 1 image, 1x2 map.  S: ch0 [1, 3], ch1 [0, 2];  T: ch0 [5, 1], ch1 [2, 4]
S = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]]], dtype=torch.float64)
T = torch.tensor([[[[5.0, 1.0]], [[2.0, 4.0]]]], dtype=torch.float64)


# ---------------------------------------------------------------- MIMIC
def test_mimic_hand_case():
    d = _feature_distiller(MIMICDistiller, cs=2, ct=2, weight=0.5)
    # differences ch0 [-4, 2], ch1 [-2, -2]: squares 16 + 4 + 4 + 4 = 28 over 4 elements = 7
    losses = d(_outputs({"p3": S}), _outputs({"p3": T}), [])
    assert list(losses) == ["loss_mimic_p3"]
    assert losses["loss_mimic_p3"].item() == pytest.approx(0.5 * 7.0, rel=1e-12)


def test_mimic_adapter_hand_case():
    d = _feature_distiller(MIMICDistiller, cs=1, ct=2)
    adapter = d.adapters["p3"]
    assert isinstance(adapter, nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (1, 2)
    assert isinstance(_feature_distiller(MIMICDistiller, cs=2, ct=2).adapters["p3"], nn.Identity)
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1, 1))
        adapter.bias.copy_(torch.tensor([1.0, 0.0]))
    # r(S) for S = [1, 3]: ch0 2s + 1 = [3, 7], ch1 -s = [-1, -3]; T ch0 [5, 1], ch1 [2, 4]
    # differences [-2, 6], [-3, -7]: squares 4 + 36 + 9 + 49 = 98 over 4 elements
    losses = d(_outputs({"p3": S[:, :1]}), _outputs({"p3": T}), [])
    assert losses["loss_mimic_p3"].item() == pytest.approx(98 / 4, rel=1e-12)


# ---------------------------------------------------------------- PKD
def test_pkd_hand_case():
    d = _feature_distiller(PKDDistiller, cs=2, ct=2, weight=6.0)
    # unbiased std sqrt(2) per channel: S_hat = [[-r, r], [-r, r]], T_hat = [[r, -r], [-r, r]]
    # (r = 1/sqrt(2)); ch0 differs by 2r twice, ch1 not at all: (2 * 4 r^2) / 4 / 2 = 1/2
    losses = d(_outputs({"p3": S}), _outputs({"p3": T}), [])
    assert list(losses) == ["loss_pkd_p3"]
    assert losses["loss_pkd_p3"].item() == pytest.approx(6.0 * 0.5, rel=1e-5)


def test_pkd_is_one_minus_the_mean_pearson_correlation():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    t = 0.6 * s + torch.randn(2, 3, 4, 5, dtype=torch.float64)
    m = 2 * 4 * 5
    r = [torch.corrcoef(torch.stack([s[:, c].flatten(), t[:, c].flatten()]))[0, 1].item()
         for c in range(3)]
    expected = (m - 1) / m * (1 - sum(r) / 3)
    assert pearson_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 4, 1, 1), (1, 2, 1, 3)])
def test_pkd_hand_written_gradient_is_autograds(shape):
    """The fused loss's backward (the standardisation's gradient written for this loss, its
    zero-mean term kept) against autograd through :func:`pearson_loss`, float64; a constant
    channel and single-position maps included."""
    from csgr_distill.distillers.pkd import _PearsonLoss
    torch.manual_seed(3)
    s = (torch.randn(shape, dtype=torch.float64) * 4 + 1).requires_grad_()
    t = torch.randn(shape, dtype=torch.float64) * 0.3 - 2
    with torch.no_grad():
        s[:, 0] = 1.5  # a constant channel: no spread, zero gradient through sigma
    scale = 0.7
    ours = _PearsonLoss.apply(s, t, scale)
    (g_ours,) = torch.autograd.grad(ours * 1.3, s)
    ref = pearson_loss(s, t) * (2 * s[0].numel() * s.shape[0] * scale)
    (g_ref,) = torch.autograd.grad(ref * 1.3, s)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-13)
    # the sum over (n, h, w) of each channel's gradient is 0: an adapter's bias gets none
    # (the constant channel's gradient is large, 1 / eps: through the mean, not sigma)
    assert (g_ours.sum(dim=(0, 2, 3)).abs() <= 1e-14 * g_ours.abs().amax(dim=(0, 2, 3)) * s[0].numel()).all()


def test_pkd_is_invariant_to_affine_maps_of_the_teachers_channels():
    torch.manual_seed(1)
    d = _feature_distiller(PKDDistiller, cs=4, ct=4, levels=("p3", "p4"), weight=6.0)
    s = {"p3": torch.randn(2, 4, 6, 6, dtype=torch.float64),
         "p4": torch.randn(2, 4, 3, 3, dtype=torch.float64)}
    t = {k: v + torch.randn_like(v) for k, v in s.items()}
    a = torch.tensor([0.5, 3.0, 40.0, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    b = torch.tensor([-2.0, 0.0, 7.0, 100.0], dtype=torch.float64).view(1, 4, 1, 1)
    base = d(_outputs(s), _outputs(t), [])
    moved = d(_outputs(s), _outputs({k: a * v + b for k, v in t.items()}), [])
    for k in base:
        assert base[k].item() > 1.0
        assert moved[k].item() == pytest.approx(base[k].item(), abs=1e-5)
    # the student's channels too (identity adapter)
    moved_s = d(_outputs({k: a * v + b for k, v in s.items()}), _outputs(t), [])
    assert all(moved_s[k].item() == pytest.approx(base[k].item(), abs=1e-5) for k in base)
    # zero when the teacher is the student up to such a map
    same = d(_outputs(s), _outputs({k: a * v + b for k, v in s.items()}), [])
    assert all(abs(v.item()) < 1e-5 for v in same.values())
    # a negative scale is not such a map: channel 1 flips sign, r = -1 there: 6 * 2 / 4
    flip = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    flipped = d(_outputs(s), _outputs({k: flip * v for k, v in s.items()}), [])
    m = 2 * 6 * 6
    assert flipped["loss_pkd_p3"].item() == pytest.approx(6 * 2 * (m - 1) / m / 4, rel=1e-5)


def test_pkd_adapter_when_channels_differ():
    d = _feature_distiller(PKDDistiller, cs=3, ct=5)
    assert isinstance(d.adapters["p3"], nn.Conv2d)
    assert (d.adapters["p3"].in_channels, d.adapters["p3"].out_channels) == (3, 5)
    # the adapter's output is what is standardised: the loss equals pearson_loss of r(S), T
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    loss = d(_outputs({"p3": s}), _outputs({"p3": t}), [])["loss_pkd_p3"]
    with torch.no_grad():
        assert loss.item() == pytest.approx(pearson_loss(d.adapters["p3"](s), t).item(), rel=1e-12)


# ---------------------------------------------------------------- KD
def test_kd_sigmoid_hand_case():
    # one anchor, one logit: s = 0 (q = 1/2), t = ln 3 (p = 3/4)
    s = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    t = torch.full((1, 1, 1, 1), LN3, dtype=torch.float64)
    loss = _kd_losses(_kd(), [s], [t])["loss_kd_p3"]
    assert loss.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)
    # T = 2: p = sigmoid(ln 3 / 2) = sqrt(3) / (1 + sqrt(3)), times T^2
    p = math.sqrt(3) / (1 + math.sqrt(3))
    loss = _kd_losses(_kd(temperature=2.0, weight=0.5), [s], [t])["loss_kd_p3"]
    assert loss.item() == pytest.approx(0.5 * 4 * _bernoulli_kl(p, 0.5), rel=1e-12)


def test_kd_softmax_hand_case():
    # one anchor, K = 2: s = [0, 0] (q = [1/2, 1/2]), t = [ln 3, 0] (p = [3/4, 1/4])
    s = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([LN3, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    loss = _kd_losses(_kd(k=2, activation="softmax"), [s], [t])["loss_kd_p3"]
    assert loss.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_kd_is_zero_for_equal_logits(activation):
    torch.manual_seed(3)
    logits = [torch.randn(2, 6, 4, 4, dtype=torch.float64) * 5,
              torch.randn(2, 6, 2, 2, dtype=torch.float64) * 5]
    d = _kd(k=3, activation=activation, temperature=2.0)
    losses = _kd_losses(d, logits, [x.clone() for x in logits], ("p3", "p4"))
    assert all(v.item() == pytest.approx(0.0, abs=1e-12) for v in losses.values())
    other = _kd_losses(d, logits, [x + torch.randn_like(x) for x in logits], ("p3", "p4"))
    assert all(v.item() > 1e-3 for v in other.values())


def test_kd_sigmoid_matches_direct_formula_mean_over_anchors():
    # N = 2, A = 2 anchors, K = 3 classes: p3 4x4, p4 2x2 -> 2 * 2 * (16 + 4) = 80 anchors
    torch.manual_seed(4)
    s = [torch.randn(2, 6, 4, 4, dtype=torch.float64), torch.randn(2, 6, 2, 2, dtype=torch.float64)]
    t = [torch.randn(2, 6, 4, 4, dtype=torch.float64), torch.randn(2, 6, 2, 2, dtype=torch.float64)]
    temp, weight = 1.5, 0.7
    losses = _kd_losses(_kd(k=3, temperature=temp, weight=weight), s, t, ("p3", "p4"))
    for level, sl, tl in zip(("p3", "p4"), s, t):
        total = sum(_bernoulli_kl(1 / (1 + math.exp(-b / temp)), 1 / (1 + math.exp(-a / temp)))
                    for a, b in zip(sl.flatten().tolist(), tl.flatten().tolist()))
        assert losses[f"loss_kd_{level}"].item() == pytest.approx(
            weight * temp ** 2 * total / 80, rel=1e-10)


def test_kd_softmax_matches_direct_formula_mean_over_anchors():
    torch.manual_seed(5)
    s = [torch.randn(2, 6, 3, 3, dtype=torch.float64), torch.randn(2, 6, 1, 2, dtype=torch.float64)]
    t = [torch.randn(2, 6, 3, 3, dtype=torch.float64), torch.randn(2, 6, 1, 2, dtype=torch.float64)]
    temp = 2.0
    losses = _kd_losses(_kd(k=3, activation="softmax", temperature=temp), s, t, ("p3", "p4"))
    n_anchors = 2 * 2 * (9 + 2)
    for level, sl, tl in zip(("p3", "p4"), s, t):
        n, _, h, w = sl.shape
        total = 0.0
        for i in range(n):
            for a in range(2):
                for y in range(h):
                    for x in range(w):
                        zs = [sl[i, 3 * a + k, y, x].item() / temp for k in range(3)]
                        zt = [tl[i, 3 * a + k, y, x].item() / temp for k in range(3)]
                        q = [math.exp(z) / sum(math.exp(v) for v in zs) for z in zs]
                        p = [math.exp(z) / sum(math.exp(v) for v in zt) for z in zt]
                        total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
        assert losses[f"loss_kd_{level}"].item() == pytest.approx(
            temp ** 2 * total / n_anchors, rel=1e-10)


def test_kd_elementwise_helpers_shapes():
    x, y = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4)
    assert sigmoid_kl(x, y).shape == (2, 6, 3, 4) and (sigmoid_kl(x, y) > -1e-6).all()
    assert softmax_kl(x, y, num_classes=3).shape == (2, 2, 3, 4)


def test_sigmoid_kl_keeps_its_digits_when_student_and_teacher_nearly_agree():
    # the KL is second order in s - t; a difference of two BCEs of ~0.05 per logit cancels:
    # float32 errors were 3.3e-2 (spread 1e-3) and 1.7e-4 (1e-2) relative; now 1.5e-3, 2.4e-5
    g = torch.Generator().manual_seed(0)
    t = torch.randn(100000, generator=g) * 2 - 3
    for spread, tol in ((1e-3, 1e-2), (1e-2, 1e-4)):
        s = t + torch.randn(100000, generator=g) * spread
        exact = sigmoid_kl(s.double(), t.double()).sum().item()
        assert sigmoid_kl(s, t).sum().item() == pytest.approx(exact, rel=tol)
    x = torch.tensor([30.0, -30.0, 0.0])  # saturated probabilities stay finite and exact
    assert sigmoid_kl(x, x).abs().max().item() == 0.0
    assert torch.isfinite(sigmoid_kl(-x, x)).all()


def test_kd_mismatched_heads_are_an_error():
    d = _kd(k=2)
    with pytest.raises(ValueError, match="same anchors"):
        _kd_losses(d, [torch.randn(1, 4, 2, 2)], [torch.randn(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="levels"):
        d(_outputs(cls_logits=[torch.randn(1, 2, 2, 2)], feature_names=["p3"]),
          _outputs(cls_logits=[torch.randn(1, 2, 2, 2)], feature_names=["p4"]), [])
    with pytest.raises(ValueError, match="K = 2"):
        _kd_losses(d, [torch.randn(1, 3, 2, 2)], [torch.randn(1, 3, 2, 2)])


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("cls", [MIMICDistiller, PKDDistiller])
def test_feature_gradients_reach_student_and_adapter_never_teacher(cls):
    torch.manual_seed(6)
    d = _feature_distiller(cls, cs=4, ct=6, levels=("p3", "p4"))
    s = {"p3": torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True),
         "p4": torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)}
    t = {k: torch.randn(2, 6, *v.shape[-2:], dtype=torch.float64, requires_grad=True)
         for k, v in s.items()}
    sum(d(_outputs(s), _outputs(t), []).values()).backward()
    for k in s:
        assert t[k].grad is None
        assert s[k].grad is not None and s[k].grad.abs().sum() > 0
        _check_adapter_grads(d, k)


def _check_adapter_grads(d, level):
    """The adapter's weight learns; its bias too for MIMIC, while PKD's standardisation removes
    any per-channel offset, so there the bias gradient is 0 (but present: DDP sees it used)."""
    adapter = d.adapters[level]
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert adapter.bias.grad is not None
    bias_grad = adapter.bias.grad.abs().max().item()
    if isinstance(d, PKDDistiller):
        assert bias_grad < 1e-6 * adapter.weight.grad.abs().max().item()
    else:
        assert bias_grad > 0


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_kd_gradients_reach_the_student_never_the_teacher(activation):
    torch.manual_seed(7)
    s = [torch.randn(2, 6, 3, 3, requires_grad=True)]
    t = [torch.randn(2, 6, 3, 3, requires_grad=True)]
    d = _kd(k=3, activation=activation)
    assert not list(d.parameters())  # KD has nothing to learn
    sum(_kd_losses(d, s, t).values()).backward()
    assert t[0].grad is None and s[0].grad.abs().sum() > 0


# ---------------------------------------------------------------- references (benchmark)
@pytest.mark.parametrize("name,cls", [("MIMIC", MIMICDistiller), ("PKD", PKDDistiller)])
def test_feature_methods_equal_their_straightforward_reference(name, cls):
    torch.manual_seed(8)
    d = _feature_distiller(cls, cs=8, ct=16, levels=("p3", "p4", "p5"), weight=2.5)
    s = {lv: torch.randn(3, 8, 8 >> i, 6 >> i, dtype=torch.float64, requires_grad=True)
         for i, lv in enumerate(("p3", "p4", "p5"))}
    t = {lv: torch.randn(3, 16, *v.shape[-2:], dtype=torch.float64) * 3 + 1 for lv, v in s.items()}
    ours = d(_outputs(s), _outputs(t), [])
    ref = d.reference_losses(_outputs(s), _outputs(t), [])
    assert set(ours) == set(ref) == {f"loss_{name.lower()}_{lv}" for lv in s}
    for k in ours:
        assert ours[k].item() == pytest.approx(ref[k].item(), rel=1e-10)
    g_ours = torch.autograd.grad(sum(ours.values()), list(s.values()))
    g_ref = torch.autograd.grad(sum(ref.values()), list(s.values()))
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-14) for a, b in zip(g_ours, g_ref))


# ---------------------------------------------------------------- config
def _cfg(arch="DistillRetinaNet"):
    cfg = add_distill_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.RETINANET.NUM_CLASSES = 6
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    return cfg


def _shapes(channels, levels=("p3", "p4", "p5", "p6", "p7")):
    return {lv: ShapeSpec(channels=channels, stride=2 ** int(lv[1:])) for lv in levels}


def test_defaults_and_from_config():
    cfg = _cfg()
    assert cfg.MODEL.DISTILL.PKD.WEIGHT == 6.0  # the paper's (two-stage, RetinaNet-R50 2x)
    assert cfg.MODEL.DISTILL.MIMIC.WEIGHT == 1.0 and cfg.MODEL.DISTILL.KD.TEMPERATURE == 1.0
    for name in ("MIMIC", "PKD", "KD"):
        assert cfg.MODEL.DISTILL[name].DECAY.TYPE == "default"
    mimic = build_distiller("MIMIC", cfg, _shapes(8), _shapes(16))
    pkd = build_distiller("PKD", cfg, _shapes(16), _shapes(16))
    assert mimic.in_features == pkd.in_features == ["p3", "p4", "p5", "p6", "p7"]
    assert isinstance(mimic.adapters["p7"], nn.Conv2d) and isinstance(pkd.adapters["p3"], nn.Identity)
    assert pkd.weight == 6.0 and pkd.loss_weight_keys == {"loss_pkd": "MODEL.DISTILL.PKD.WEIGHT"}
    assert mimic.loss_weight_keys == {"loss_mimic": "MODEL.DISTILL.MIMIC.WEIGHT"}
    kd = build_distiller("KD", cfg, _shapes(8), _shapes(16))
    assert (kd.field, kd.classes_per_anchor, kd.activation) == ("cls_logits", 6, "sigmoid")
    assert kd.required_outputs == {"student": ("cls_logits",), "teacher": ("cls_logits",)}
    kd = build_distiller("KD", _cfg("DistillGeneralizedRCNN"), _shapes(8), _shapes(16))
    assert (kd.field, kd.classes_per_anchor) == ("rpn_objectness_logits", 1)


@pytest.mark.parametrize("name,key,value,arch", [
    ("MIMIC", "IN_FEATURES", ["p3", "p2"], "DistillRetinaNet"),
    ("MIMIC", "IN_FEATURES", [], "DistillRetinaNet"),
    ("PKD", "IN_FEATURES", ["p3", "p3"], "DistillRetinaNet"),
    ("KD", "ACTIVATION", "softmx", "DistillRetinaNet"),
    ("KD", "TEMPERATURE", 0.0, "DistillRetinaNet"),
    ("KD", "ACTIVATION", "softmax", "DistillGeneralizedRCNN"),  # one objectness logit
])
def test_config_errors_name_the_key(name, key, value, arch):
    cfg = _cfg(arch)
    cfg.MODEL.DISTILL[name][key] = value
    with pytest.raises(ValueError, match=rf"MODEL\.DISTILL\.{name}\.{key}"):
        build_distiller(name, cfg, _shapes(8), _shapes(16))


# ---------------------------------------------------------------- detectors
def _distill(cfg, teacher_yaml, teacher_weights, method):
    cfg.MODEL.META_ARCHITECTURE = "Distill" + cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = [method]
    cfg.MODEL.DISTILL.TEACHER.CONFIG = teacher_yaml
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher_weights
    return cfg


def _pair(tmp_path, student_family, teacher_family, method):
    """(student cfg, teacher weights path) of a tiny pair: 16-channel student FPN, 32-channel
    teacher FPN (adapters), ``family`` in {"retinanet", "rcnn"}."""
    make = {"retinanet": base_cfg, "rcnn": rcnn_base_cfg}
    tyaml, tw, _ = write_model(tmp_path, make[teacher_family](tmp_path / "t", fpn_channels=32), "t")
    cfg = _distill(make[student_family](tmp_path / "s"), tyaml, tw, method)
    if student_family == "rcnn" and teacher_family == "rcnn":
        for m in ("MIMIC", "PKD"):
            cfg.MODEL.DISTILL[m].IN_FEATURES = ["p2", "p3", "p4", "p5"]
    elif student_family != teacher_family:  # the levels both have
        for m in ("MIMIC", "PKD"):
            cfg.MODEL.DISTILL[m].IN_FEATURES = ["p3", "p4", "p5", "p6"]
    return cfg


_LEVELS = {("retinanet", "MIMIC"): ["p3", "p4", "p5", "p6", "p7"],
           ("retinanet", "PKD"): ["p3", "p4", "p5", "p6", "p7"],
           ("retinanet", "KD"): ["p3", "p4", "p5", "p6", "p7"],
           ("rcnn", "MIMIC"): ["p2", "p3", "p4", "p5"],
           ("rcnn", "PKD"): ["p2", "p3", "p4", "p5"],
           ("rcnn", "KD"): ["p2", "p3", "p4", "p5", "p6"]}  # the RPN's levels


@pytest.mark.parametrize("family", ["retinanet", "rcnn"])
@pytest.mark.parametrize("method", ["MIMIC", "PKD", "KD"])
def test_two_iteration_training(tmp_path, tiny_shapes, family, method):
    cfg = _pair(tmp_path, family, family, method)
    cfg.DATASETS.TEST = ()
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    teacher = trainer.model.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    logged = {k: v for r in rows for k, v in r.items()}
    for lv in _LEVELS[(family, method)]:
        key = f"loss_{method.lower()}_{lv}"
        assert key in logged and math.isfinite(logged[key]) and logged[key] > 0, key
    assert not [k for k in logged if k.startswith(f"loss_{method.lower()}_")
                and k.split("_")[-1] not in _LEVELS[(family, method)]]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final_student.pth"))


def _step(model, batch):
    model.train()
    with EventStorage(0):
        return model(batch)


def test_kd_on_faster_rcnn_distils_the_real_rpn_objectness(tmp_path):
    model = build_model(_pair(tmp_path, "rcnn", "rcnn", "KD"))
    assert model.distill_fields == {"student": ("rpn_objectness_logits",),
                                    "teacher": ("rpn_objectness_logits",)}
    teacher = model.attach_teacher().model
    batch = fake_batch(2)
    with torch.no_grad():
        record = model.run_teacher(batch)
        feats = teacher.backbone(teacher.preprocess_image(batch).tensor)
        rpn = teacher.proposal_generator
        expected, _ = rpn.rpn_head([feats[f] for f in rpn.in_features])
    assert list(record.rpn_objectness_logits) == list(rpn.in_features)
    for lv, x in zip(rpn.in_features, expected):
        assert torch.equal(record.rpn_objectness_logits[lv], x)
    # the student's logits are the ones its RPN loss used: they carry its gradient
    seen = {}

    def keep(_module, _inputs, out):
        seen["logits"] = out[0]

    model.proposal_generator.rpn_head.register_forward_hook(keep)
    losses = _step(model, batch)
    kd = model.distillers["KD"]
    student = _outputs(rpn_objectness_logits=dict(zip(rpn.in_features, seen["logits"])),
                       feature_names=[])
    with torch.no_grad():
        direct = kd(student, model.run_teacher(batch), [])
    for k, v in direct.items():
        assert losses[k].item() == pytest.approx(v.item(), rel=1e-5)
    sum(losses[k] for k in direct).backward()
    assert model.proposal_generator.rpn_head.objectness_logits.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_refuses_a_teacher_of_another_family(tmp_path):
    with pytest.raises(ValueError, match=r"\['cls_logits'\] from the teacher, a rcnn detector"):
        build_model(_pair(tmp_path, "retinanet", "rcnn", "KD"))
    with pytest.raises(ValueError, match=r"\['rpn_objectness_logits'\] from the teacher, a dense"):
        build_model(_pair(tmp_path, "rcnn", "retinanet", "KD"))


@pytest.mark.parametrize("method", ["MIMIC", "PKD"])
@pytest.mark.parametrize("student,teacher", [("retinanet", "rcnn"), ("rcnn", "retinanet")])
def test_heterogeneous_pairs(tmp_path, method, student, teacher):
    model = build_model(_pair(tmp_path, student, teacher, method))
    t_model = model.attach_teacher().model
    losses = _step(model, fake_batch(2))
    prefix = f"loss_{method.lower()}_"
    assert sorted(k for k in losses if k.startswith(prefix)) == [
        prefix + lv for lv in ("p3", "p4", "p5", "p6")]
    for lv in ("p3", "p4", "p5", "p6"):
        assert torch.isfinite(losses[prefix + lv]) and losses[prefix + lv] > 0
    sum(v for k, v in losses.items() if k.startswith(prefix)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    for lv in ("p3", "p4", "p5", "p6"):
        _check_adapter_grads(model.distillers[method], lv)
    assert all(p.grad is None for p in t_model.parameters())
