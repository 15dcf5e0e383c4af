"""The DETR port: the library's Hungarian assignment against a brute-force permutation search, the
port's forward against python-detr's own DETR given the same weights (the official checkpoint
layout, converted), padding masks for images of different sizes, training/inference glue."""
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
    from csgr_distill.config import load_config
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


def _deformable_cfg():
    from csgr_distill.config import load_config
    cfg = load_config(os.path.join(REPO, "configs/demo/DeformableDETR-R18.yaml"),
                      ["INPUT.FIXED_SIZE", "64", "MODEL.DETR.HIDDEN_DIM", "64",
                       "MODEL.DETR.NHEADS", "4", "MODEL.DETR.DIM_FEEDFORWARD", "64",
                       "MODEL.DETR.NUM_QUERIES", "10"], check_steps=False)
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


def test_deformable_forward_equals_the_librarys_model_on_converted_weights():
    """transformers' DeformableDetrForObjectDetection with its own ResNet-18 and the port with
    that model's weights converted (detr_port.convert): same logits and boxes on two images of
    different sizes."""
    from transformers import DeformableDetrForObjectDetection, ResNetConfig
    from csgr_distill.detr_port.convert import hf_deformable_detr_to_port
    from csgr_distill.detr_port.deformable_detr import hf_deformable_config
    torch.manual_seed(0)
    cfg = _deformable_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    config = hf_deformable_config(cfg, [128, 256, 512])
    config.backbone_config = ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                          layer_type="basic",
                                          out_features=["stage2", "stage3", "stage4"])
    library = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():  # non-trivial frozen-BN statistics and heads
        for name, buf in library.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                buf.normal_(0, 0.1)
        for p in library.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    port = build_model(cfg).eval()
    port.load_state_dict(hf_deformable_detr_to_port(library.state_dict()), strict=True)
    images = port.preprocess_image([{"image": torch.rand(3, 64, 48) * 255},
                                    {"image": torch.rand(3, 48, 64) * 255}])
    pixel_mask = (~padding_mask(images)).long()
    with torch.no_grad():
        ours = port.predict(images)
        ref = library(pixel_values=images.tensor, pixel_mask=pixel_mask)
    assert torch.allclose(ours.logits, ref.logits, atol=1e-5)
    assert torch.allclose(ours.pred_boxes, ref.pred_boxes, atol=1e-5)


#: the library's names inside ``model.`` -> the official code's inside ``transformer.``
_OFFICIAL_NAMES = [
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.norm2."),
    (r"\.mlp\.fc1\.", ".linear1."),
    (r"\.mlp\.fc2\.", ".linear2."),
    (r"^decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"decoder.layers.\1.norm1."),
    (r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.layers.\1.norm2."),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.layers.\1.norm3."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
]


def _official_deformable_layout(port_state):
    """The port's weights written as an official Deformable DETR checkpoint names them (the
    layout of fundamentalvision/Deformable-DETR, stated here independently of the converter)."""
    import re
    official = {}
    for key, value in port_state.items():
        if key.startswith("backbone."):
            k = key[len("backbone."):]
            k = k.replace("stem.conv1.norm.", "bn1.").replace("stem.conv1.", "conv1.")
            k = re.sub(r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}.", k)
            k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
            k = k.replace(".shortcut.norm.", ".downsample.1.")
            k = k.replace(".shortcut.", ".downsample.0.")
            official["backbone.0.body." + k] = value
            continue
        k = key[len("detector."):]
        if k.startswith("model.query_position_embeddings."):
            official["query_embed." + k.split(".")[-1]] = value
        elif k.startswith("model.input_proj."):
            official[k[len("model."):]] = value
        elif k.startswith(("class_embed.", "bbox_embed.")):
            official[k] = value
        else:
            t = k[len("model."):]
            for pattern, repl in _OFFICIAL_NAMES:
                t = re.sub(pattern, repl, t)
            m = re.match(r"^decoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", t)
            if m:
                name = f"transformer.decoder.layers.{m.group(1)}.self_attn.in_proj_{m.group(3)}"
                official.setdefault(name, {})[m.group(2)] = value
                continue
            official["transformer." + t] = value
    for key in [k for k, v in official.items() if isinstance(v, dict)]:
        parts = official[key]
        official[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return official


def test_official_deformable_detr_checkpoint_converts_and_loads_strictly(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_detr_checkpoint
    from csgr_distill.detr_port.convert import official_deformable_detr_to_port

    cfg = _deformable_cfg()
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    torch.manual_seed(0)
    port = build_model(cfg)
    with torch.no_grad():
        for p in port.parameters():
            p.normal_()
    official = _official_deformable_layout(port.state_dict())
    assert "transformer.decoder.layers.0.self_attn.in_proj_weight" in official
    assert "transformer.level_embed" in official and "query_embed.weight" in official
    converted = official_deformable_detr_to_port(official)
    assert set(converted) == set(port.state_dict())
    for k, v in port.state_dict().items():
        assert torch.equal(converted[k], v), k
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(cfg.dump())
    assert convert_detr_checkpoint.run_cli(convert_detr_checkpoint.main, [
        "--input", str(path), "--output", str(tmp_path / "port.pth"), "--config-file",
        str(yaml_path), "--format", "official-deformable-detr"]) == 0
