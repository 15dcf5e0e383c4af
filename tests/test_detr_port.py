"""The DETR port: the library's Hungarian assignment against a brute-force permutation search, the
port's forward against python-detr's own DETR given the same weights (the official checkpoint
layout, converted), padding masks for images of different sizes, training/inference glue; the
Deformable DETR port's fidelity to the official code (per-layer heads with box refinement,
two-stage's proposals and encoder losses, dropout placement, initialisation) and checkpoint
conversion (official layout written independently, transformers' save_pretrained, hub layout)."""
import itertools
import math
import os

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from csgr_distill.config import add_distill_config
from csgr_distill.detr_port.convert import official_detr_to_port
from csgr_distill.detr_port.masks import level_mask, padding_mask
from tiny import REPO, fake_batch, logged_keys, train_opts


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_detr_cfg(depth=18, out=None):
    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, "configs/demo/Base-Demo-DETR.yaml"))
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "FrozenBN"  # as the official torchvision backbone
    cfg.MODEL.DETR.HIDDEN_DIM, cfg.MODEL.DETR.NHEADS = 32, 4
    cfg.MODEL.DETR.DIM_FEEDFORWARD, cfg.MODEL.DETR.NUM_QUERIES = 64, 10
    if out is not None:
        cfg.OUTPUT_DIR = str(out)
    return cfg


def test_hungarian_assignment_is_the_brute_force_optimum():
    from detr.models.matcher import HungarianMatcher
    from detr.util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
    torch.manual_seed(0)
    matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    q, k = 5, 4
    logits = torch.randn(1, q, k + 1)
    boxes = torch.rand(1, q, 4) * 0.5 + 0.25
    target = {"labels": torch.tensor([0, 2, 3]), "boxes": torch.rand(3, 4) * 0.4 + 0.3}
    (rows, cols), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])
    prob = logits[0].softmax(-1)
    cost = (-prob[:, target["labels"]] + 5.0 * torch.cdist(boxes[0], target["boxes"], p=1)
            - 2.0 * generalized_box_iou(box_cxcywh_to_xyxy(boxes[0]),
                                        box_cxcywh_to_xyxy(target["boxes"])))
    best = min(itertools.permutations(range(q), 3),
               key=lambda perm: float(sum(cost[p, t] for t, p in enumerate(perm))))
    got = {int(c): int(r) for r, c in zip(rows, cols)}
    assert [got[t] for t in range(3)] == list(best)


def test_padding_masks_of_images_of_different_sizes():
    images = ImageList.from_tensors([torch.zeros(3, 24, 64), torch.zeros(3, 64, 24)], 32)
    mask = padding_mask(images)
    assert mask.shape == (2, 64, 64)
    assert not mask[0, :24].any() and mask[0, 24:].all()
    assert not mask[1, :, :24].any() and mask[1, :, 24:].all()
    # stride 32: a cell takes the mask at its top-left pixel (DETR's nearest interpolation)
    small = level_mask(mask, (2, 2))
    assert small[0].tolist() == [[False, False], [True, True]]
    assert small[1].tolist() == [[False, True], [False, True]]


def _library_detr(cfg):
    """python-detr's own DETR with its own (torchvision) backbone, in its official layout."""
    from detr.models.backbone import BackboneBase, FrozenBatchNorm2d, Joiner
    from detr.models.detr import DETR
    from detr.models.position_encoding import PositionEmbeddingSine
    from detr.models.transformer import Transformer
    d = cfg.MODEL.DETR
    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = Joiner(BackboneBase(resnet, True, 512, False),
                      PositionEmbeddingSine(d.HIDDEN_DIM // 2, normalize=True))
    backbone.num_channels = 512  # as detr.models.backbone.build_backbone sets it
    transformer = Transformer(d_model=d.HIDDEN_DIM, nhead=d.NHEADS,
                              num_encoder_layers=d.ENC_LAYERS, num_decoder_layers=d.DEC_LAYERS,
                              dim_feedforward=d.DIM_FEEDFORWARD, dropout=0.0,
                              return_intermediate_dec=True)
    model = DETR(backbone, transformer, num_classes=d.NUM_CLASSES, num_queries=d.NUM_QUERIES,
                 aux_loss=True)
    with torch.no_grad():  # non-trivial frozen-BN statistics
        for name, buf in model.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0)
            elif "running_mean" in name or name.endswith(".bias"):
                buf.normal_(0, 0.1)
    return model.eval()


def test_forward_equals_the_library_detr_on_a_converted_official_checkpoint(tmp_path):
    from detr.util.misc import nested_tensor_from_tensor_list
    torch.manual_seed(0)
    cfg = tiny_detr_cfg()
    cfg.MODEL.DETR.DROPOUT = 0.0
    library = _library_detr(cfg)
    path = tmp_path / "detr-official.pth"
    torch.save({"model": library.state_dict()}, path)  # the official checkpoint layout
    port = build_model(cfg).eval()
    state = official_detr_to_port(torch.load(path, weights_only=False)["model"])
    port.load_state_dict(state, strict=True)
    # two images of different sizes (padding masks), RGB 0-255 as detectron2 feeds them
    images = [torch.rand(3, 64, 96) * 255, torch.rand(3, 96, 64) * 255]
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    with torch.no_grad():
        ours = port.predict(port.preprocess_image([{"image": x} for x in images]))
        ref = library(nested_tensor_from_tensor_list([(x - mean) / std for x in images]))
    assert torch.allclose(ours["pred_logits"], ref["pred_logits"], atol=1e-5)
    assert torch.allclose(ours["pred_boxes"], ref["pred_boxes"], atol=1e-5)
    for a, b in zip(ours["aux_outputs"], ref["aux_outputs"]):
        assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)


def test_training_losses_are_the_weighted_set_criterion_at_every_layer(tmp_path):
    cfg = tiny_detr_cfg()
    model = build_model(cfg).train()
    with EventStorage(0) as storage:
        losses = model(fake_batch())
    d = cfg.MODEL.DETR
    expected = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou")
                for s in [""] + [f"_{i}" for i in range(d.DEC_LAYERS - 1)]}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    assert "detr/class_error" in storage.latest()  # logged, not summed into the loss
    model.eval()
    with torch.no_grad():
        inst = model(fake_batch(n=1))[0]["instances"]
    assert len(inst) == d.NUM_QUERIES and inst.image_size == (64, 64)
    assert (inst.pred_classes < d.NUM_CLASSES).all()


def _tiny_opts(out):
    """2 iterations on the tiny shapes, DETR's augmentation scaled to their 64 px."""
    return train_opts(out, test=True) + ["INPUT.DETR_CROP_RESIZE", "(48, 56)",
                                         "INPUT.CROP.SIZE", "(40, 56)"]


@pytest.mark.parametrize("config", ["DETR-R18.yaml", "DeformableDETR-R18.yaml"])
def test_demo_variant_trains_evaluates_exports_and_reloads(tmp_path, tiny_shapes, config):
    """configs/demo/<variant> through tools/train_net.py (DETR's augmentation and AdamW on),
    --eval-only with detectron2's evaluator, and the exported student predicting the same."""
    import json
    import sys
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net
    from csgr_distill.cli import load_config
    from csgr_distill.export import StudentCheckpointer, export_student

    config = os.path.join(REPO, "configs/demo", config)
    out = tmp_path / "run"
    train_net.cli(["--config-file", config, *_tiny_opts(out)])
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= logged_keys(out)
    train_net.cli(["--config-file", config, "--eval-only", *_tiny_opts(tmp_path / "eval"),
                   "MODEL.WEIGHTS", str(out / "model_final.pth")])
    with open(tmp_path / "eval" / "eval_results.json") as f:
        assert "AP" in json.load(f)["bbox"]
    cfg = load_config(config, _tiny_opts(out))
    counts = export_student(str(out / "model_final.pth"), str(tmp_path / "student.pth"), cfg)
    plain = load_config(counts["config"])
    assert plain.MODEL.META_ARCHITECTURE == cfg.MODEL.META_ARCHITECTURE
    model = build_model(cfg).eval()
    StudentCheckpointer(model).load(str(out / "model_final.pth"))
    reloaded = build_model(plain).eval()
    StudentCheckpointer(reloaded).load(plain.MODEL.WEIGHTS)
    batch = fake_batch(n=1)
    with torch.no_grad():
        a, b = model(batch)[0]["instances"], reloaded(batch)[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)


def test_converter_tool_loads_strictly_and_remaps_coco_ids(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_detr_checkpoint
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    torch.manual_seed(0)
    cfg = tiny_detr_cfg()
    cfg.MODEL.DETR.NUM_CLASSES = 91  # an official COCO head: 91 ids + no-object
    official = tmp_path / "official.pth"
    torch.save({"model": _library_detr(cfg).state_dict()}, official)
    yaml_path = tmp_path / "detr.yaml"
    yaml_path.write_text(tiny_detr_cfg().dump())  # 6 classes: the plain conversion must not fit
    rc = convert_detr_checkpoint.run_cli(convert_detr_checkpoint.main, [
        "--input", str(official), "--output", str(tmp_path / "port.pth"),
        "--config-file", str(yaml_path)])
    assert rc != 0
    cfg80 = tiny_detr_cfg()
    cfg80.MODEL.DETR.NUM_CLASSES = 80
    yaml80 = tmp_path / "detr80.yaml"
    yaml80.write_text(cfg80.dump())
    rc = convert_detr_checkpoint.run_cli(convert_detr_checkpoint.main, [
        "--input", str(official), "--output", str(tmp_path / "port.pth"),
        "--config-file", str(yaml80), "--coco-to-contiguous"])
    assert rc == 0
    converted = torch.load(tmp_path / "port.pth", weights_only=False)["model"]
    original = torch.load(official, weights_only=False)["model"]
    ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    assert torch.equal(converted["class_embed.weight"][:80], original["class_embed.weight"][ids])
    assert torch.equal(converted["class_embed.weight"][80], original["class_embed.weight"][91])
    build_model(cfg80).load_state_dict(converted, strict=True)


def test_detr_recipe_optimizer_adamw_with_backbone_lr_and_full_clipping():
    from csgr_distill.engine.optimizer import build_optimizer
    cfg = tiny_detr_cfg()
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW) and "FullModelGradientClip" in type(opt).__name__
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            expected = 1e-5 if names[id(p)].startswith("backbone.") else 1e-4
            assert group["lr"] == pytest.approx(expected), names[id(p)]


def test_detr_augmentation_chooses_resize_or_crop():
    import numpy as np
    from detectron2.data import transforms as T
    from csgr_distill.detr_port.augmentation import detr_augmentations
    cfg = tiny_detr_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.INPUT.DETR_CROP_RESIZE, cfg.INPUT.CROP.SIZE = (96,), (40, 40)
    cfg.INPUT.CROP.TYPE = "absolute_range"
    augs = T.AugmentationList(detr_augmentations(cfg))
    kinds = set()
    np.random.seed(0)
    for _ in range(20):
        aug_input = T.AugInput(np.zeros((128, 96, 3), dtype=np.uint8),
                               boxes=np.array([[10.0, 10.0, 50.0, 60.0]]))
        transforms = augs(aug_input)
        kinds.add(any(isinstance(t, T.CropTransform) for t in transforms.transforms))
        assert max(aug_input.image.shape[:2]) <= 64
    assert kinds == {True, False}


#: MODEL.DETR options of the Deformable DETR variants (official: --with_box_refine, and
#: --with_box_refine --two_stage)
MODES = {"single_stage": [], "box_refine": ["MODEL.DETR.WITH_BOX_REFINE", "True"],
         "two_stage": ["MODEL.DETR.WITH_BOX_REFINE", "True", "MODEL.DETR.TWO_STAGE", "True"]}


def _deformable_cfg(mode="single_stage", extra=()):
    from csgr_distill.cli import load_config
    cfg = load_config(os.path.join(REPO, "configs/demo/DeformableDETR-R18.yaml"),
                      ["INPUT.FIXED_SIZE", "64", "MODEL.DETR.HIDDEN_DIM", "64",
                       "MODEL.DETR.NHEADS", "4", "MODEL.DETR.DIM_FEEDFORWARD", "64",
                       "MODEL.DETR.NUM_QUERIES", "10"] + MODES[mode] + list(extra),
                      check_steps=False)
    return cfg


def test_deformable_detr_masks_follow_the_librarys_convention():
    """The detectron2 encoder gives the library what its own conv encoder would: per level the
    feature map and the pixel mask (True = real pixel) interpolated to it."""
    from csgr_distill.detr_port.deformable_detr import _Detectron2Encoder
    model = build_model(_deformable_cfg()).eval()
    images = model.preprocess_image([{"image": torch.rand(3, 64, 40) * 255},
                                     {"image": torch.rand(3, 48, 64) * 255}])
    pixel_mask = (~padding_mask(images)).long()
    encoder = model.detector.model.backbone
    assert isinstance(encoder, _Detectron2Encoder)
    with torch.no_grad():
        levels = encoder(images.tensor, pixel_mask)
        feats = model.backbone(images.tensor)
    for (fmap, mask), name in zip(levels, ["res3", "res4", "res5"]):
        assert torch.equal(fmap, feats[name])
        expected = torch.nn.functional.interpolate(pixel_mask[None].float(),
                                                   size=fmap.shape[-2:]).to(torch.bool)[0]
        assert torch.equal(mask, expected)
    # the backbone is saved once, under backbone.
    keys = model.state_dict()
    assert not any(k.startswith("detector.model.backbone") for k in keys)
    assert any(k.startswith("backbone.res5") for k in keys)


def test_deformable_detr_trains_and_predicts_with_the_official_losses_and_init():
    model = build_model(_deformable_cfg()).train()
    bias = model.detector.class_embed[0].bias
    assert torch.allclose(bias, torch.full_like(bias, -math.log(99.0)))
    with EventStorage(0):
        losses = model(fake_batch())
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0",
                           "loss_giou_0"}
    assert all(torch.isfinite(v) for v in losses.values())
    raw = model.predict(model.preprocess_image(fake_batch()), None)
    assert raw.logits.shape == (2, 10, 6)
    model.eval()
    with torch.no_grad():
        inst = model(fake_batch(n=1))[0]["instances"]
    assert len(inst) == 60 and (inst.scores[:-1] >= inst.scores[1:]).all()  # 10 queries x 6


def test_deformable_costs_must_be_integers():
    cfg = _deformable_cfg()
    cfg.MODEL.DETR.CLASS_WEIGHT = 2.5
    with pytest.raises(ValueError, match="MODEL.DETR.CLASS_WEIGHT is 2.5"):
        build_model(cfg)


def _library_deformable(cfg):
    """transformers' own DeformableDetrForObjectDetection for ``cfg`` with its own ResNet-18
    (non-trivial frozen-BN statistics and weights), in eval mode."""
    from transformers import DeformableDetrForObjectDetection, ResNetConfig
    from csgr_distill.detr_port.deformable_detr import hf_deformable_config
    torch.manual_seed(0)
    config = hf_deformable_config(cfg, [128, 256, 512])
    config.backbone_config = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                          layer_type="basic",
                                          out_features=["stage2", "stage3", "stage4"])
    library = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():
        for name, buf in library.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                buf.normal_(0, 0.1)
        for p in library.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return library


def _two_images(port):
    return port.preprocess_image([{"image": torch.rand(3, 64, 48) * 255},
                                  {"image": torch.rand(3, 48, 64) * 255}])


def test_deformable_forward_equals_the_librarys_model_on_converted_weights():
    """transformers' DeformableDetrForObjectDetection with its own ResNet-18 and the port with
    that model's weights converted (detr_port.convert): same logits and boxes on two images of
    different sizes."""
    from csgr_distill.detr_port.convert import hf_deformable_detr_to_port
    cfg = _deformable_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    library = _library_deformable(cfg)
    port = build_model(cfg).eval()
    port.load_state_dict(hf_deformable_detr_to_port(library.state_dict()), strict=True)
    images = _two_images(port)
    pixel_mask = (~padding_mask(images)).long()
    with torch.no_grad():
        ours = port.predict(images)
        ref = library(pixel_values=images.tensor, pixel_mask=pixel_mask)
    assert torch.allclose(ours.logits, ref.logits, atol=1e-5)
    assert torch.allclose(ours.pred_boxes, ref.pred_boxes, atol=1e-5)


def _official_deformable_state(cfg, seed=0):
    """An official Deformable DETR ``model.state_dict()`` for ``cfg``'s sizes and variant, written
    here from the module names and shapes of fundamentalvision/Deformable-DETR
    (models/deformable_detr.py, deformable_transformer.py, ops/modules/ms_deform_attn.py,
    backbone.py), independently of the port and its converter; random values. Heads as the
    official model holds them: ``class_embed.N`` / ``bbox_embed.N`` for N < L (+ 1 in two-stage,
    the proposal heads); without box refinement one tensor shared by every N, with it one per N
    (``_get_clones``), also under ``transformer.decoder.bbox_embed.N`` (and, two-stage,
    ``transformer.decoder.class_embed.N``: the same tensors)."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.MODEL.DETR
    dim, ffn, heads, levels = d.HIDDEN_DIM, d.DIM_FEEDFORWARD, d.NHEADS, d.NUM_FEATURE_LEVELS
    state = {}

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    def linear(name, out_features, in_features):
        state[f"{name}.weight"] = rand(out_features, in_features)
        state[f"{name}.bias"] = rand(out_features)

    def norm(name, n):
        state[f"{name}.weight"] = 1 + rand(n)
        state[f"{name}.bias"] = rand(n)

    def deformable_attention(name, points):
        linear(f"{name}.sampling_offsets", heads * levels * points * 2, dim)
        linear(f"{name}.attention_weights", heads * levels * points, dim)
        linear(f"{name}.value_proj", dim, dim)
        linear(f"{name}.output_proj", dim, dim)

    # backbone.0.body: the torchvision ResNet-18 with frozen BN, without its fc
    resnet = torchvision.models.resnet18(weights=None,
                                         norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            state["backbone.0.body." + key] = (rand(*value.shape).abs() + 0.5
                                               if key.endswith("running_var")
                                               else rand(*value.shape))
    for i in range(d.ENC_LAYERS):
        layer = f"transformer.encoder.layers.{i}"
        deformable_attention(f"{layer}.self_attn", d.ENC_N_POINTS)
        norm(f"{layer}.norm1", dim)
        linear(f"{layer}.linear1", ffn, dim)
        linear(f"{layer}.linear2", dim, ffn)
        norm(f"{layer}.norm2", dim)
    for i in range(d.DEC_LAYERS):
        layer = f"transformer.decoder.layers.{i}"
        deformable_attention(f"{layer}.cross_attn", d.DEC_N_POINTS)
        norm(f"{layer}.norm1", dim)
        state[f"{layer}.self_attn.in_proj_weight"] = rand(3 * dim, dim)
        state[f"{layer}.self_attn.in_proj_bias"] = rand(3 * dim)
        linear(f"{layer}.self_attn.out_proj", dim, dim)
        norm(f"{layer}.norm2", dim)
        linear(f"{layer}.linear1", ffn, dim)
        linear(f"{layer}.linear2", dim, ffn)
        norm(f"{layer}.norm3", dim)
    state["transformer.level_embed"] = rand(levels, dim)
    if d.TWO_STAGE:
        linear("transformer.enc_output", dim, dim)
        norm("transformer.enc_output_norm", dim)
        linear("transformer.pos_trans", 2 * dim, 2 * dim)
        norm("transformer.pos_trans_norm", 2 * dim)
    else:
        linear("transformer.reference_points", 2, dim)
        state["query_embed.weight"] = rand(d.NUM_QUERIES, 2 * dim)
    channels = [128, 256, 512]  # ResNet-18's layer2-4
    for level in range(levels):
        if level < len(channels):
            state[f"input_proj.{level}.0.weight"] = rand(dim, channels[level], 1, 1)
        else:  # extra levels: 3x3 stride-2 convs on the last level, then on each other
            state[f"input_proj.{level}.0.weight"] = rand(dim, channels[-1] if level == len(
                channels) else dim, 3, 3)
        state[f"input_proj.{level}.0.bias"] = rand(dim)
        norm(f"input_proj.{level}.1", dim)  # GroupNorm(32, dim)
    count = d.DEC_LAYERS + (1 if d.TWO_STAGE else 0)
    distinct = count if d.WITH_BOX_REFINE else 1
    classes = [{"weight": rand(d.NUM_CLASSES, dim), "bias": rand(d.NUM_CLASSES)}
               for _ in range(distinct)]
    boxes = [{f"layers.{j}.{p}": rand(*(shape if p == "weight" else shape[:1]))
              for j, shape in enumerate([(dim, dim), (dim, dim), (4, dim)])
              for p in ("weight", "bias")} for _ in range(distinct)]
    for n in range(count):
        head_class, head_box = classes[n % distinct], boxes[n % distinct]
        homes = [("", head_class, head_box)]
        if d.WITH_BOX_REFINE:
            homes.append(("transformer.decoder.", None, head_box))
        if d.TWO_STAGE:
            homes.append(("transformer.decoder.", head_class, None))
        for prefix, c, b in homes:
            for k, v in (c or {}).items():
                state[f"{prefix}class_embed.{n}.{k}"] = v
            for k, v in (b or {}).items():
                state[f"{prefix}bbox_embed.{n}.{k}"] = v
    return state


@pytest.mark.parametrize("mode", list(MODES))
def test_official_deformable_detr_checkpoint_converts_and_loads_strictly(tmp_path, mode):
    """Each official tensor lands in the port under its own name (per-layer heads included) and
    the converter tool loads the result strictly."""
    import sys
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_detr_checkpoint
    from csgr_distill.detr_port.convert import official_deformable_detr_to_port

    cfg = _deformable_cfg(mode)
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    official = _official_deformable_state(cfg)
    port = build_model(cfg)
    converted = official_deformable_detr_to_port(official)
    assert set(converted) == set(port.state_dict())
    port.load_state_dict(converted, strict=True)
    detector, layers = port.detector, cfg.MODEL.DETR.DEC_LAYERS
    count = layers + (1 if mode == "two_stage" else 0)
    assert len(detector.class_embed) == count
    for n in range(count):  # after the load: each head holds its own key's values
        assert torch.equal(detector.class_embed[n].weight, official[f"class_embed.{n}.weight"])
        assert torch.equal(detector.bbox_embed[n].layers[2].bias,
                           official[f"bbox_embed.{n}.layers.2.bias"])
    if mode == "two_stage":
        assert torch.equal(detector.model.enc_output.weight,
                           official["transformer.enc_output.weight"])
        assert torch.equal(detector.model.pos_trans_norm.bias,
                           official["transformer.pos_trans_norm.bias"])
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(cfg.dump())
    assert convert_detr_checkpoint.run_cli(convert_detr_checkpoint.main, [
        "--input", str(path), "--output", str(tmp_path / "port.pth"), "--config-file",
        str(yaml_path), "--format", "official-deformable-detr"]) == 0


def _mlp(x, head, prefix):
    """The official 3-layer box MLP with weights ``head[prefix + 'layers.j.weight']``."""
    for j in range(3):
        x = F.linear(x, head[f"{prefix}layers.{j}.weight"], head[f"{prefix}layers.{j}.bias"])
        x = F.relu(x) if j < 2 else x
    return x


@pytest.mark.parametrize("mode", ["box_refine", "two_stage"])
def test_box_refinement_has_one_class_head_per_layer(mode):
    """Box refinement: every decoder layer's logits and boxes equal a reference computed with
    that layer's own official head (loaded separately from its own key), and the decoder refines
    with the same box heads (a layer's reference for the next = its box). transformers 5.23 ties
    the class heads to one parameter, which a load fills with the last layer's."""
    from csgr_distill.detr_port.convert import official_deformable_detr_to_port
    from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

    cfg = _deformable_cfg(mode, ["MODEL.DETR.DROPOUT", "0.0"])
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    official = _official_deformable_state(cfg)
    port = build_model(cfg).eval()
    heads = port.detector.class_embed
    assert len({id(h.weight) for h in heads}) == len(heads)  # separate parameters
    port.load_state_dict(official_deformable_detr_to_port(official), strict=True)
    with torch.no_grad():
        out = port.predict(_two_images(port))
        view = port.decoder_outputs(out)
    hidden = out.intermediate_hidden_states
    references = [out.init_reference_points] + list(out.intermediate_reference_points.unbind(1))
    for layer in range(cfg.MODEL.DETR.DEC_LAYERS):
        x = hidden[:, layer]
        logits = F.linear(x, official[f"class_embed.{layer}.weight"],
                          official[f"class_embed.{layer}.bias"])
        assert torch.allclose(view["pred_logits"][layer], logits, atol=1e-5), layer
        delta = _mlp(x, official, f"bbox_embed.{layer}.")
        ref = inverse_sigmoid(references[layer])
        delta = delta + ref if ref.shape[-1] == 4 else torch.cat([delta[..., :2] + ref,
                                                                   delta[..., 2:]], -1)
        assert torch.allclose(view["pred_boxes"][layer], delta.sigmoid(), atol=1e-5), layer
        assert torch.allclose(references[layer + 1], delta.sigmoid(), atol=1e-5), layer
    assert torch.equal(view["pred_logits"][-1], out.logits)


def test_deformable_init_follows_the_official_code():
    """The official initialisation (not transformers' N(0, 0.02) everywhere): object queries
    N(0, 1), xavier-uniform transformer weights (the decoder self-attention's q/k/v as one
    [3D, D] in_proj) and input projections, the focal prior on every class head, box refinement's
    heads starting as copies of one (the box bias -2 on layer 0's only), two-stage's bias 0."""
    def xavier_bound(weight, fan_in=None, fan_out=None):
        fan_out, fan_in = fan_out or weight.shape[0], fan_in or weight[0].numel()
        return math.sqrt(6.0 / (fan_in + fan_out))

    torch.manual_seed(0)
    model = build_model(_deformable_cfg("box_refine", ["MODEL.DETR.NUM_QUERIES", "100"]))
    m, d = model.detector.model, 64
    queries = m.query_position_embeddings.weight
    queries = queries.detach()
    assert 0.9 < float(queries.std()) < 1.1 and abs(float(queries.mean())) < 0.05
    for weight, bound in [
            (m.encoder.layers[0].mlp.fc1.weight, xavier_bound(m.encoder.layers[0].mlp.fc1.weight)),
            (m.decoder.layers[1].mlp.fc2.weight, xavier_bound(m.decoder.layers[1].mlp.fc2.weight)),
            (m.decoder.layers[0].self_attn.k_proj.weight,
             xavier_bound(None, fan_in=d, fan_out=3 * d)),
            (m.decoder.layers[0].self_attn.o_proj.weight,
             xavier_bound(m.decoder.layers[0].self_attn.o_proj.weight)),
            (m.reference_points.weight, xavier_bound(m.reference_points.weight)),
            (m.input_proj[0][0].weight, xavier_bound(m.input_proj[0][0].weight))]:
        assert bound * 0.85 < float(weight.detach().abs().max()) <= bound, (weight.shape, bound)
    assert not m.decoder.layers[0].self_attn.q_proj.bias.any()
    assert not m.reference_points.bias.any() and not m.input_proj[3][0].bias.any()
    assert not m.encoder.layers[0].self_attn.sampling_offsets.weight.any()  # MSDeformAttn's own
    classes, boxes = model.detector.class_embed, model.detector.bbox_embed
    assert torch.equal(classes[0].weight, classes[1].weight)  # copies of one head ...
    assert classes[0].weight is not classes[1].weight  # ... as separate parameters
    assert torch.allclose(classes[1].bias, torch.full_like(classes[1].bias, -math.log(99.0)))
    assert 0.9 / math.sqrt(3 * d) < float(classes[0].weight.std()) < 1.1 / math.sqrt(3 * d)
    assert torch.equal(boxes[0].layers[0].weight, boxes[1].layers[0].weight)
    assert boxes[0].layers[2].bias.tolist() == [0, 0, -2, -2]
    assert boxes[1].layers[2].bias.tolist() == [0, 0, 0, 0]
    assert m.decoder.bbox_embed[1].layers[2].weight is boxes[1].layers[2].weight
    two_stage = build_model(_deformable_cfg("two_stage")).detector
    assert all(b.layers[2].bias.tolist() == [0, 0, 0, 0] for b in two_stage.bbox_embed)
    assert two_stage.model.decoder.class_embed[-1].weight is two_stage.class_embed[-1].weight
    single = build_model(_deformable_cfg()).detector
    assert single.class_embed[1].weight is single.class_embed[0].weight  # official: one shared
    assert single.bbox_embed[1].layers[2].bias.tolist() == [0, 0, -2, -2]


def test_deformable_dropout_sits_where_the_official_layers_put_it(monkeypatch):
    """Every dropout of a training forward, by probability and tensor shape: the official
    layers drop each attention / FFN output (residual branches) and the FFN activations, the
    decoder also its self-attention probabilities (nn.MultiheadAttention's dropout), and
    nothing else (transformers also drops the encoder input and, by default, neither the
    activations nor the attention probabilities)."""
    from collections import Counter
    cfg = _deformable_cfg(extra=["MODEL.DETR.DIM_FEEDFORWARD", "96"])
    model = build_model(cfg).train()
    calls = Counter()
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        if training and p > 0:
            calls[(p, tuple(x.shape))] += 1
        return dropout(x, p, training, inplace)

    def recording_sdpa(query, key, *args, dropout_p=0.0, **kwargs):
        if dropout_p > 0:
            calls[(dropout_p, (*query.shape[:-1], key.shape[-2]))] += 1
        return sdpa(query, key, *args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(F, "dropout", recording_dropout)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with EventStorage(0):
        model(fake_batch())
    d = cfg.MODEL.DETR
    n, s, q = 2, 8 * 8 + 4 * 4 + 2 * 2 + 1, d.NUM_QUERIES  # tokens of res3-res5 + 1 at 64 px
    expected = Counter({
        (0.1, (n, s, d.HIDDEN_DIM)): 2 * d.ENC_LAYERS,  # self-attention and FFN outputs
        (0.1, (n, s, d.DIM_FEEDFORWARD)): d.ENC_LAYERS,  # FFN activations
        (0.1, (n, d.NHEADS, q, q)): d.DEC_LAYERS,  # self-attention probabilities
        (0.1, (n, q, d.HIDDEN_DIM)): 3 * d.DEC_LAYERS,  # self-, cross-attention, FFN outputs
        (0.1, (n, q, d.DIM_FEEDFORWARD)): d.DEC_LAYERS})
    assert calls == expected


def test_two_stage_keeps_num_queries_proposals():
    """Two-stage keeps NUM_QUERIES proposals (transformers' own default is 300, which the 85
    encoder positions of a 64 px image cannot give), with a clear error for too few positions
    and for two-stage without box refinement."""
    model = build_model(_deformable_cfg("two_stage")).eval()
    images = model.preprocess_image(fake_batch())
    with torch.no_grad():
        out = model.predict(images)
        inst = model(fake_batch(n=1))[0]["instances"]
    assert out.logits.shape == (2, 10, 6) and len(inst) == 60
    with pytest.raises(ValueError, match=r"NUM_QUERIES \(300\).*only 85 encoder positions"):
        build_model(_deformable_cfg("two_stage", ["MODEL.DETR.NUM_QUERIES", "300"])).predict(
            images)
    with pytest.raises(ValueError, match="WITH_BOX_REFINE True"):
        build_model(_deformable_cfg(extra=["MODEL.DETR.TWO_STAGE", "True"]))


def test_two_stage_family_view_takes_the_proposals_as_queries():
    """The family view of a two-stage model (160 px images: 534 encoder positions, enough for
    transformers' own 300 too): every layer's predictions, the proposals the decoder started
    from as the object queries, the extra decoder pass reproducing the forward from them and
    refusing learned queries."""
    model = build_model(_deformable_cfg("two_stage")).eval()
    with torch.no_grad():
        out = model.predict(model.preprocess_image(fake_batch(size=160)))
        view = model.decoder_outputs(out)
        again = model.decode(out, view["object_queries"])
    assert view["pred_logits"].shape == (2, 2, 10, 6) and view["object_queries"].shape == (2, 10, 4)
    assert torch.equal(view["pred_logits"][-1], out.logits)
    assert torch.allclose(out.init_reference_points, view["object_queries"].sigmoid(), atol=1e-6)
    assert torch.allclose(again["pred_logits"], view["pred_logits"], atol=1e-5)
    assert torch.allclose(again["pred_boxes"], view["pred_boxes"], atol=1e-5)
    with pytest.raises(ValueError, match="same MODEL.DETR.TWO_STAGE"):
        model.decode(out, torch.zeros(10, 128))


def test_two_stage_encoder_losses_are_the_official_class_agnostic_set_losses():
    """loss_{ce,bbox,giou}_enc against a brute-force reference (160 px images, 534 proposals): the
    best assignment of the two GT boxes of each image (both labelled class 0) to two of its
    encoder proposals under the official matching cost (2 focal class cost + 5 L1 + 2 (-GIoU)),
    then focal over every proposal and class, L1 and 1 - GIoU on the matches, each over the
    number of boxes, times its weight; and they train the proposal layers (enc_output, its norm
    and the last heads)."""
    from detr.util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
    from torchvision.ops import sigmoid_focal_loss
    from csgr_distill.detr_port.detr import detr_targets

    model = build_model(_deformable_cfg("two_stage", ["MODEL.DETR.DROPOUT", "0.0"])).train()
    batch = fake_batch(size=160)
    images = model.preprocess_image(batch)
    with EventStorage(0):
        losses = model.losses(images, [x["instances"] for x in batch])
        out = model.predict(images)
    c = model.detector.config
    targets = detr_targets([x["instances"] for x in batch], images.image_sizes)
    expected = {"ce": 0.0, "bbox": 0.0, "giou": 0.0}
    for n, target in enumerate(t["boxes"] for t in targets):
        logits = out.enc_outputs_class[n].detach()
        prob = logits.sigmoid()[:, 0]
        boxes = out.enc_outputs_coord_logits[n].detach().sigmoid()
        pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
        neg = 0.75 * prob ** 2 * -(1 - prob + 1e-8).log()
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target))
        cost = (c.class_cost * (pos - neg)[:, None] + c.bbox_cost * torch.cdist(boxes, target, p=1)
                - c.giou_cost * giou)
        pairs = cost[:, 0, None] + cost[None, :, 1]  # [i, j]: GT 0 on proposal i, GT 1 on j
        pairs.fill_diagonal_(float("inf"))
        best = divmod(int(pairs.argmin()), len(boxes))
        onehot = torch.zeros_like(logits)
        onehot[list(best), 0] = 1
        expected["ce"] += float(sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2,
                                                   reduction="sum"))
        expected["bbox"] += float((boxes[list(best)] - target).abs().sum())
        expected["giou"] += float((1 - giou[list(best), [0, 1]]).sum())
    num_boxes = sum(len(t["boxes"]) for t in targets)
    weights = {"ce": c.class_cost, "bbox": c.bbox_cost, "giou": c.giou_cost}
    for k, v in expected.items():
        assert float(losses[f"loss_{k}_enc"]) == pytest.approx(v / num_boxes * weights[k],
                                                               rel=1e-4), k
    (losses["loss_ce_enc"] + losses["loss_bbox_enc"] + losses["loss_giou_enc"]).backward()
    m = model.detector
    for p in (m.model.enc_output.weight, m.model.enc_output_norm.weight,
              m.class_embed[-1].weight, m.bbox_embed[-1].layers[2].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_save_pretrained_folder_and_safetensors_convert(tmp_path, mode):
    """What transformers' save_pretrained writes (a folder with model.safetensors: on-disk names,
    tied heads left out) converts, from the folder and from the file, loads strictly and gives
    the library model's outputs."""
    import sys
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_detr_checkpoint

    cfg = _deformable_cfg(mode, ["MODEL.DETR.DROPOUT", "0.0"])
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    library = _library_deformable(cfg)
    library.save_pretrained(str(tmp_path / "hf"))
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(cfg.dump())
    port = build_model(cfg).eval()
    images = _two_images(port)
    with torch.no_grad():
        ref = library(pixel_values=images.tensor, pixel_mask=(~padding_mask(images)).long())
    for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        out = tmp_path / "port.pth"
        assert convert_detr_checkpoint.run_cli(convert_detr_checkpoint.main, [
            "--input", str(source), "--output", str(out), "--config-file", str(yaml_path),
            "--format", "hf-deformable-detr"]) == 0
        port.load_state_dict(torch.load(out, weights_only=False)["model"], strict=True)
        with torch.no_grad():
            ours = port.predict(images)
        assert torch.allclose(ours.logits, ref.logits, atol=1e-5)
        assert torch.allclose(ours.pred_boxes, ref.pred_boxes, atol=1e-5)


def _on_disk(key):
    """A transformers in-memory key as its older checkpoints (and save_pretrained) name it."""
    return (key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
            .replace(".mlp.fc", ".fc").replace("self_attn.o_proj", "self_attn.out_proj"))


def test_hub_layout_with_a_timm_resnet_and_per_layer_heads_converts(tmp_path):
    """A checkpoint as the hub's SenseTime/deformable-detr-with-box-refine holds one: a timm
    ResNet (torchvision's names) under model.backbone.conv_encoder.model, and one class head per
    layer: each head and backbone tensor lands under its own name. A backbone that is not a
    ResNet is refused with the reason."""
    import sys
    from safetensors.torch import save_file
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_detr_checkpoint

    cfg = _deformable_cfg("box_refine")
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    library = _library_deformable(cfg)
    g = torch.Generator().manual_seed(1)
    state = {_on_disk(k): v.clone() for k, v in library.state_dict().items()
             if not k.startswith("model.backbone.")}
    for n in range(cfg.MODEL.DETR.DEC_LAYERS):  # separate heads, as before transformers 5
        state[f"class_embed.{n}.weight"] = torch.randn(6, 64, generator=g)
    resnet = torchvision.models.resnet18(weights=None,
                                         norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    timm = {k: torch.randn(v.shape, generator=g) for k, v in resnet.state_dict().items()
            if not k.startswith("fc.")}
    state.update({"model.backbone.conv_encoder.model." + k: v for k, v in timm.items()})
    save_file(state, str(tmp_path / "hub.safetensors"))
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(cfg.dump())
    out = tmp_path / "port.pth"
    assert convert_detr_checkpoint.run_cli(convert_detr_checkpoint.main, [
        "--input", str(tmp_path / "hub.safetensors"), "--output", str(out), "--config-file",
        str(yaml_path), "--format", "hf-deformable-detr"]) == 0
    converted = torch.load(out, weights_only=False)["model"]
    for n in range(cfg.MODEL.DETR.DEC_LAYERS):
        assert torch.equal(converted[f"detector.class_embed.{n}.weight"],
                           state[f"class_embed.{n}.weight"])
    assert torch.equal(converted["backbone.stem.conv1.weight"], timm["conv1.weight"])
    assert torch.equal(converted["backbone.res5.1.conv2.norm.running_var"],
                       timm["layer4.1.bn2.running_var"])
    assert torch.equal(converted["backbone.res3.0.shortcut.norm.bias"],
                       timm["layer2.0.downsample.1.bias"])
    state["model.backbone.conv_encoder.model.stages.0.blocks.0.conv_dw.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "convnext.safetensors"))
    assert convert_detr_checkpoint.run_cli(convert_detr_checkpoint.main, [
        "--input", str(tmp_path / "convnext.safetensors"), "--output", str(out),
        "--config-file", str(yaml_path), "--format", "hf-deformable-detr"]) == 2


@pytest.mark.parametrize("name", ["DeformableDETR-R50.yaml", "DeformableDETR-R50-BoxRefine.yaml",
                                  "DeformableDETR-R50-TwoStage.yaml"])
def test_coco_configs_build_the_official_variants(name):
    """configs/detr/DeformableDETR-R50*.yaml: the official recipe's variants, 300 queries (and
    proposals), per-layer heads with box refinement, one shared without."""
    from csgr_distill.cli import load_config
    cfg = load_config(os.path.join(REPO, "configs/detr", name),
                      ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"], check_steps=False)
    refine, two_stage = "BoxRefine" in name or "TwoStage" in name, "TwoStage" in name
    detector = build_model(cfg).detector
    assert (detector.config.with_box_refine, detector.config.two_stage) == (refine, two_stage)
    assert detector.config.two_stage_num_proposals == detector.config.num_queries == 300
    assert len(detector.class_embed) == 6 + two_stage
    distinct = len({id(h.weight) for h in detector.class_embed})
    assert distinct == (len(detector.class_embed) if refine else 1)


def test_deformable_losses_are_normalised_by_the_mean_box_count_over_processes(monkeypatch):
    """As the official criterion (all-reduce of the GT box count / world size), not by this
    process's count (transformers' criterion without accelerate): two processes faked, the other
    one with 6 boxes, this one with 4 -> every loss x 4 / 5."""
    from detectron2.utils import comm
    model = build_model(_deformable_cfg("box_refine", ["MODEL.DETR.DROPOUT", "0.0"])).train()
    batch = fake_batch()
    images = model.preprocess_image(batch)
    gt = [x["instances"] for x in batch]
    with EventStorage(0):
        alone = model.losses(images, gt)
        monkeypatch.setattr(comm, "get_world_size", lambda: 2)
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: t.add_(6))
        shared = model.losses(images, gt)
    assert set(shared) == set(alone) and "loss_giou_0" in shared
    for k, v in alone.items():
        assert float(shared[k]) == pytest.approx(float(v) * 4 / 5, rel=1e-5), k
