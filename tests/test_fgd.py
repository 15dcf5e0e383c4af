"""FGD (docs/methods/FGD.md) against hand-computed cases: masks on known boxes (overlap, map
border, an image smaller than the padded batch under both box scalings, no boxes, boxes smaller
than a cell), attention with T = 0.5 against its direct formula, the GC blocks making the global
term a plain MSE at initialisation, each loss on a tiny hand-made case, gradients, the
straightforward reference, the published defaults per detector, errors, pictures."""
import math
import os
import sys

import cv2
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from csgr_distill.config import add_distill_config
from csgr_distill.distillers.fgd import FGDDistiller, fgd_attention, fgd_masks
from csgr_distill.layers import GlobalContextBlock
from csgr_distill.outputs import DetectorOutputs
from tiny import REPO, TINY_VAL, make_teacher, student_cfg, write_model, build_distiller


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _fgd(channels=2, student_channels=None, levels=("p3",), **kw):
    args = dict(temperature=0.5, alpha=1.0, beta=1.0, gamma=1.0, lambda_gl=1.0)
    args.update(kw)
    s = student_channels or channels
    return FGDDistiller(in_features=list(levels), student_channels={f: s for f in levels},
                        teacher_channels={f: channels for f in levels}, **args)


def _record(feats, image_sizes, padded):
    return DetectorOutputs("dense", image_sizes, padded, features=feats,
                           feature_names=list(feats))


def _instances(boxes_per_image, image_sizes):
    out = []
    for b, size in zip(boxes_per_image, image_sizes):
        inst = Instances(size)
        inst.gt_boxes = Boxes(b)
        inst.gt_classes = torch.zeros(len(b), dtype=torch.long)
        out.append(inst)
    return out


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def test_overlapping_boxes_keep_the_smaller_boxs_value():
    # 4x4 grid over a 32x32 batch: the big box covers all 16 cells (1/16 each), the small one
    # x, y in [8, 15] -> cells floor(1.0)..ceil(1.875) = 1..2 on both axes: 4 cells of 1/4
    fg, bg = fgd_masks([_boxes([0, 0, 32, 32], [8, 8, 15, 15])], (4, 4), [(32, 32)], (32, 32))
    expected = torch.full((4, 4), 1 / 16)
    expected[1:3, 1:3] = 0.25
    assert torch.allclose(fg[0], expected)
    assert torch.equal(bg[0], torch.zeros(4, 4))  # no background cell: zeros, not NaN
    # the order of the boxes does not matter
    fg2, _ = fgd_masks([_boxes([8, 8, 15, 15], [0, 0, 32, 32])], (4, 4), [(32, 32)], (32, 32))
    assert torch.equal(fg, fg2)


def test_box_at_the_map_border_counts_the_cells_it_covers_on_the_map():
    # x, y in [20, 32] -> cells 2..4, clipped to 2..3: 4 cells (the official code divides by 9)
    fg, bg = fgd_masks([_boxes([20, 20, 32, 32])], (4, 4), [(32, 32)], (32, 32))
    expected = torch.zeros(4, 4)
    expected[2:, 2:] = 0.25
    assert torch.allclose(fg[0], expected)
    assert torch.allclose(bg[0], (expected == 0).float() / 12)
    assert math.isclose(float(fg[0].sum()), 1.0, rel_tol=1e-6)


def test_image_smaller_than_the_padded_batch_under_both_scalings():
    # a 16x16 image in a 32x32 batch; 4x4 grid (stride 8); box [0, 8] on both axes
    box = [_boxes([0, 0, 8, 8]), _boxes([0, 0, 8, 8])]
    sizes, padded = [(16, 16), (32, 32)], (32, 32)
    fg, _ = fgd_masks(box, (4, 4), sizes, padded, "padded")
    # padded: 8 * 4/32 = 1 -> cells 0..1 for both images (the cells under the box)
    for i in range(2):
        expected = torch.zeros(4, 4)
        expected[:2, :2] = 0.25
        assert torch.allclose(fg[i], expected)
    fg, _ = fgd_masks(box, (4, 4), sizes, padded, "unpadded")
    # unpadded (official): 8 * 4/16 = 2 -> cells 0..2 for the small image: stretched, 9 cells
    expected = torch.zeros(4, 4)
    expected[:3, :3] = 1 / 9
    assert torch.allclose(fg[0], expected)
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 0.25
    assert torch.allclose(fg[1], expected)  # an image filling the batch: the same either way


def test_image_without_boxes_is_all_background():
    fg, bg = fgd_masks([_boxes(), _boxes([0, 0, 8, 8])], (4, 4), [(32, 32)] * 2, (32, 32))
    assert torch.equal(fg[0], torch.zeros(4, 4))
    assert torch.allclose(bg[0], torch.full((4, 4), 1 / 16))
    assert math.isclose(float(bg[1].sum()), 1.0, rel_tol=1e-6)


def test_boxes_smaller_than_a_cell_and_degenerate_boxes():
    fg, _ = fgd_masks([_boxes([9, 9, 9.5, 9.5])], (4, 4), [(32, 32)], (32, 32))
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = 0.25  # 1.125 .. 1.1875 -> cells 1..2
    assert torch.allclose(fg[0], expected)
    fg, _ = fgd_masks([_boxes([8, 8, 8, 8])], (4, 4), [(32, 32)], (32, 32))
    expected = torch.zeros(4, 4)
    expected[1, 1] = 1.0  # a point on a cell corner: one cell
    assert torch.allclose(fg[0], expected)
    # a zero-width box on the right edge lands off the map: no cell, no division by zero
    fg, bg = fgd_masks([_boxes([32, 0, 32, 8])], (4, 4), [(32, 32)], (32, 32))
    assert torch.equal(fg[0], torch.zeros(4, 4)) and torch.isfinite(bg).all()


def test_mask_errors():
    with pytest.raises(ValueError, match="BOX_SCALING"):
        fgd_masks([_boxes()], (4, 4), [(32, 32)], (32, 32), "stretched")
    with pytest.raises(ValueError, match="2 box lists for 1 images"):
        fgd_masks([_boxes(), _boxes()], (4, 4), [(32, 32)], (32, 32))


# ---------------------------------------------------------------------------------------------
# attention and GC blocks
# ---------------------------------------------------------------------------------------------
def test_attention_with_temperature_half_matches_the_direct_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 3)
    spatial, channel = fgd_attention(x, 0.5)
    for n in range(2):
        g = [[sum(abs(float(x[n, c, i, j])) for c in range(3)) / 3 for j in range(3)]
             for i in range(2)]
        z = sum(math.exp(v / 0.5) for row in g for v in row)
        for i in range(2):
            for j in range(3):
                assert math.isclose(float(spatial[n, i, j]), 6 * math.exp(g[i][j] / 0.5) / z,
                                    rel_tol=1e-5)
        gc = [float(x[n, c].abs().sum()) / 6 for c in range(3)]
        zc = sum(math.exp(v / 0.5) for v in gc)
        for c in range(3):
            assert math.isclose(float(channel[n, c]), 3 * math.exp(gc[c] / 0.5) / zc,
                                rel_tol=1e-5)
    assert torch.allclose(spatial.sum(dim=(1, 2)), torch.full((2,), 6.0))
    assert torch.allclose(channel.sum(dim=1), torch.full((2,), 3.0))


def test_gc_block_is_the_identity_at_initialisation_and_not_after():
    torch.manual_seed(0)
    block = GlobalContextBlock(8)
    x = torch.randn(2, 8, 3, 5)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.transform[-1].bias.fill_(0.1)
    assert torch.allclose(block(x), x + 0.1)
    # the pooled context is the softmax-weighted sum over positions
    w = torch.softmax(block.context(x).flatten(1), dim=1)
    expected = (x.flatten(2) * w[:, None]).sum(-1)
    assert torch.allclose(block.pooled(x)[..., 0, 0], expected, atol=1e-6)


def test_global_term_is_a_plain_summed_mse_at_initialisation():
    torch.manual_seed(0)
    d = _fgd(channels=4)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    fg, bg = fgd_masks([_boxes([0, 0, 8, 8])] * 2, (3, 3), [(24, 24)] * 2, (24, 24))
    terms = d.level_losses(s, t, "p3", fg, bg)
    assert torch.allclose(terms["gl"], ((s - t) ** 2).sum() / 2)
    with torch.no_grad():  # trained GC blocks relate the maps otherwise
        d.student_context["p3"].transform[-1].weight.normal_()
    assert not torch.allclose(d.level_losses(s, t, "p3", fg, bg)["gl"], ((s - t) ** 2).sum() / 2)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def _hand_case():
    """N=1, C=2, 2x2 grid over a 16x16 batch. |T| = 1 everywhere, so the teacher's attention is
    1 at every position and channel; S = T except S[c0,(0,0)] = 1.5, S[c1,(1,1)] = 0.7. One
    degenerate box at the origin: M_fg = 1 at (0,0); M_bg = 1/3 elsewhere."""
    t = torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]], [[-1.0, 1.0], [1.0, 1.0]]]])
    s = t.clone()
    s[0, 0, 0, 0] = 1.5
    s[0, 1, 1, 1] = 0.7
    return s, t, [_boxes([0, 0, 0, 0])]


def test_each_loss_on_a_hand_made_case():
    s, t, boxes = _hand_case()
    d = _fgd(alpha=2.0, beta=3.0, gamma=5.0, lambda_gl=7.0)
    out = d(_record({"p3": s}, [(16, 16)], (16, 16)), _record({"p3": t}, [(16, 16)], (16, 16)),
            _instances(boxes, [(16, 16)]))
    assert sorted(out) == ["loss_fgd_at_p3", "loss_fgd_bg_p3", "loss_fgd_fg_p3", "loss_fgd_gl_p3"]
    out = {k: v.detach() for k, v in out.items()}
    # fg: 1 * 1 * 1 * 0.5^2 at (0,0); bg: (1/3) * 0.3^2 at (1,1)
    assert math.isclose(float(out["loss_fgd_fg_p3"]), 2.0 * 0.25, rel_tol=1e-6)
    assert math.isclose(float(out["loss_fgd_bg_p3"]), 3.0 * 0.09 / 3, rel_tol=1e-5)
    # attention: the student's mean |S| is 1.25, 1, 1, 0.85 over positions and 1.125, 0.925
    # over channels; the teacher's attention is 1 everywhere
    z = sum(math.exp(v / 0.5) for v in (1.25, 1, 1, 0.85))
    spatial = [4 * math.exp(v / 0.5) / z for v in (1.25, 1, 1, 0.85)]
    zc = sum(math.exp(v / 0.5) for v in (1.125, 0.925))
    channel = [2 * math.exp(v / 0.5) / zc for v in (1.125, 0.925)]
    l_at = sum(abs(a - 1) for a in spatial) + sum(abs(a - 1) for a in channel)
    assert math.isclose(float(out["loss_fgd_at_p3"]), 5.0 * l_at, rel_tol=1e-5)
    # global, GC blocks at initialisation: the summed squared difference
    assert math.isclose(float(out["loss_fgd_gl_p3"]), 7.0 * (0.25 + 0.09), rel_tol=1e-5)


def test_sums_are_divided_by_the_batch_size():
    s, t, boxes = _hand_case()
    d = _fgd()
    one = d(_record({"p3": s}, [(16, 16)], (16, 16)), _record({"p3": t}, [(16, 16)], (16, 16)),
            _instances(boxes, [(16, 16)]))
    two = d(_record({"p3": s.repeat(2, 1, 1, 1)}, [(16, 16)] * 2, (16, 16)),
            _record({"p3": t.repeat(2, 1, 1, 1)}, [(16, 16)] * 2, (16, 16)),
            _instances(boxes * 2, [(16, 16)] * 2))
    for k in one:
        assert torch.allclose(one[k], two[k]), k


def test_gradients_reach_the_student_and_the_distiller_never_the_teacher():
    torch.manual_seed(0)
    d = _fgd(channels=4, student_channels=3, levels=("p3", "p4"))
    with torch.no_grad():  # trained GC blocks: every parameter on the gradient path
        for block in list(d.student_context.values()) + list(d.teacher_context.values()):
            block.transform[-1].weight.normal_(0, 0.1)
    s = {"p3": torch.randn(2, 3, 4, 4, requires_grad=True),
         "p4": torch.randn(2, 3, 2, 2, requires_grad=True)}
    t = {"p3": torch.randn(2, 4, 4, 4, requires_grad=True),
         "p4": torch.randn(2, 4, 2, 2, requires_grad=True)}
    sizes = [(32, 32), (24, 20)]
    gt = _instances([_boxes([2, 2, 20, 14]), _boxes()], sizes)
    losses = d(_record(s, sizes, (32, 32)), _record(t, sizes, (32, 32)), gt)
    assert len(losses) == 8 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for f in s.values():
        assert f.grad is not None and f.grad.abs().sum() > 0
    for f in t.values():
        assert f.grad is None
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("context.bias"):
            # a constant added before the spatial softmax: its gradient is 0 mathematically,
            # and exactly 0 or a rounding residue numerically
            assert p.grad.abs().sum() < 1e-5, name
            continue
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scaling", ["padded", "unpadded"])
def test_equals_the_straightforward_reference(scaling):
    torch.manual_seed(0)
    d = _fgd(channels=6, student_channels=4, levels=("p3", "p4"), alpha=1e-3, beta=5e-4,
             gamma=5e-4, lambda_gl=5e-6, box_scaling=scaling)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sizes, padded = [(64, 48), (40, 64)], (64, 64)
    s = {"p3": torch.randn(2, 4, 8, 8), "p4": torch.randn(2, 4, 4, 4)}
    t = {"p3": torch.randn(2, 6, 8, 8), "p4": torch.randn(2, 6, 4, 4)}
    boxes = [_boxes([3.3, 5.1, 30.2, 40.7], [10, 10, 14, 12.5], [0, 0, 48, 64]),
             _boxes([20.5, 1.2, 63.9, 39.9])]
    ours = d(_record(s, sizes, padded), _record(t, sizes, padded), _instances(boxes, sizes))
    ref = d.reference_losses(_record(s, sizes, padded), _record(t, sizes, padded),
                             _instances(boxes, sizes))
    assert sorted(ours) == sorted(ref)
    for k in ours:
        assert torch.allclose(ours[k], ref[k], rtol=1e-5, atol=1e-9), k


def test_padded_and_unpadded_scaling_differ_only_for_images_smaller_than_the_batch():
    torch.manual_seed(0)
    s, t = {"p3": torch.randn(1, 2, 4, 4)}, {"p3": torch.randn(1, 2, 4, 4)}
    boxes = [_boxes([0, 0, 8, 8])]
    losses = {}
    for scaling in ("padded", "unpadded"):
        d = _fgd(box_scaling=scaling)
        for size in ((32, 32), (16, 16)):
            losses[scaling, size] = d(_record(s, [size], (32, 32)), _record(t, [size], (32, 32)),
                                      _instances(boxes, [size]))["loss_fgd_fg_p3"]
    assert torch.equal(losses["padded", (32, 32)], losses["unpadded", (32, 32)])
    assert not torch.equal(losses["padded", (16, 16)], losses["unpadded", (16, 16)])


def test_needs_the_ground_truth():
    d = _fgd()
    rec = _record({"p3": torch.randn(1, 2, 2, 2)}, [(16, 16)], (16, 16))
    with pytest.raises(ValueError, match="FGD needs the ground-truth instances of the 1 images"):
        d(rec, rec, None)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def _merged(path):
    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, path))
    return cfg.MODEL.DISTILL.FGD


def test_published_defaults_per_detector():
    retina = _merged("configs/FGD-RetinaNet-R50.yaml")
    assert (retina.TEMPERATURE, retina.ALPHA, retina.BETA, retina.GAMMA, retina.LAMBDA) == (
        0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    assert retina.IN_FEATURES == ["p3", "p4", "p5", "p6", "p7"]
    assert retina.BOX_SCALING == "padded"
    rcnn = _merged("configs/FGD-FasterRCNN-R50.yaml")
    assert (rcnn.TEMPERATURE, rcnn.ALPHA, rcnn.BETA, rcnn.GAMMA, rcnn.LAMBDA) == (
        0.5, 5e-5, 2.5e-5, 5e-5, 5e-7)
    assert rcnn.IN_FEATURES == ["p2", "p3", "p4", "p5"]
    for path in ("configs/FGD-RetinaNet-R50.yaml", "configs/FGD-FasterRCNN-R50.yaml"):
        cfg = add_distill_config(get_cfg())
        cfg.merge_from_file(os.path.join(REPO, path))
        assert list(cfg.MODEL.DISTILL.METHODS) == ["FGD"] and cfg.MODEL.DISTILL.INHERIT_TEACHER
        assert cfg.DATASETS.TRAIN == ("soda10m_train",)  # the paper protocol
    demo = _merged("configs/demo/FGD-RetinaNet-R18.yaml")
    assert (demo.ALPHA, demo.BETA, demo.GAMMA, demo.LAMBDA) == (1e-3, 5e-4, 5e-4, 5e-6)


@pytest.mark.parametrize("key,value,match", [
    ("TEMPERATURE", 0.0, "MODEL.DISTILL.FGD.TEMPERATURE must be > 0"),
    ("BOX_SCALING", "stretched", "MODEL.DISTILL.FGD.BOX_SCALING is 'stretched'"),
    ("IN_FEATURES", ["p3", "p9"], r"MODEL.DISTILL.FGD.IN_FEATURES names levels \['p9'\]"),
])
def test_config_errors_name_the_key(key, value, match):
    cfg = add_distill_config(get_cfg())
    cfg.MODEL.DISTILL.FGD[key] = value
    shapes = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in range(3, 8)}
    with pytest.raises(ValueError, match=match):
        build_distiller("FGD", cfg, shapes, shapes)


def test_from_config_builds_one_pair_of_gc_blocks_and_one_adapter_per_level():
    cfg = add_distill_config(get_cfg())
    s_shapes = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in range(3, 8)}
    t_shapes = {f"p{i}": ShapeSpec(channels=16, stride=2 ** i) for i in range(3, 8)}
    d = build_distiller("FGD", cfg, s_shapes, t_shapes)
    assert d.in_features == ["p3", "p4", "p5", "p6", "p7"]
    assert set(d.student_context) == set(d.teacher_context) == set(d.adapters) == set(s_shapes)
    assert d.adapters["p3"].in_channels == 8 and d.adapters["p3"].out_channels == 16
    assert d.student_context["p3"].transform[0].out_channels == 8  # C/2 of the teacher's 16
    assert d.loss_weight_keys["loss_fgd_gl"] == "MODEL.DISTILL.FGD.LAMBDA"


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------
def test_visualize_draws_fgd_masks_and_attention(tmp_path, tiny_shapes):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import visualize

    teacher_yaml, teacher_weights, _ = make_teacher(tmp_path)
    cfg = student_cfg(tmp_path, teacher_yaml, teacher_weights, methods=("CSGR", "FGD"))
    yaml_path, weights, _ = write_model(tmp_path, cfg, "fgd")
    written = visualize.main(["--config-file", yaml_path, "--weights", weights, "--output",
                              str(tmp_path / "vis"), "--num-images", "1", "--dataset", TINY_VAL])
    stem = os.path.splitext(os.path.basename(DatasetCatalog.get(TINY_VAL)[0]["file_name"]))[0]
    assert sorted(os.path.basename(p) for p in written) == [
        f"{stem}_{name}.png" for name in ("csgr_category_attention", "csgr_criss_cross",
                                          "detections", "fgd_masks_attention")]
    picture = cv2.imread([p for p in written if p.endswith("_fgd_masks_attention.png")][0])
    assert picture is not None and picture.shape[1] > 3 * picture.shape[0]  # four tiles a row
