"""Key conversion of DETR-family checkpoints to this port's layout.

The official DETR code keeps a torchvision ResNet under ``backbone.0.body.`` (``conv1``, ``bn1``,
``layerX.Y.convZ`` / ``bnZ`` / ``downsample.{0,1}``); this port keeps a detectron2 ResNet under
``backbone.`` (``stem.conv1`` with ``.norm``, ``res{X+1}.Y.convZ`` with ``.norm``,
``shortcut``). Every other key (``transformer.*``, ``class_embed.*``, ``bbox_embed.*``,
``query_embed.*``, ``input_proj.*``) has the same name in both.

A Hugging Face ``DeformableDetrForObjectDetection`` keeps its ResNet under
``model.backbone.model.`` (``embedder.embedder``, ``encoder.stages.S.layers.B.layer.K`` /
``.shortcut``, each a ``convolution`` + ``normalization``); the port's ``DeformableDetr`` keeps
the detectron2 ResNet under ``backbone.`` and the rest of the library's model under
``detector.``.
"""
import re
from typing import Dict, Mapping

import torch

__all__ = ["torchvision_resnet_to_detectron2", "official_detr_to_port", "coco_ids_to_contiguous",
           "hf_resnet_to_detectron2", "hf_deformable_detr_to_port"]


def torchvision_resnet_to_detectron2(key: str) -> str:
    """One torchvision ResNet key (without prefix) -> detectron2's ResNet key."""
    if key.startswith("conv1."):
        return "stem.conv1." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1."):]
    m = re.match(r"layer(\d)\.(\d+)\.(.*)$", key)
    if m is None:
        raise KeyError(f"not a torchvision ResNet key: {key!r}")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    return f"res{stage}.{block}.{rest}"


def official_detr_to_port(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official DETR ``model`` state dict -> this port's :class:`Detr` state dict (the
    ResNet renamed, ``num_batches_tracked`` buffers dropped: detectron2's frozen BN has none)."""
    out = {}
    prefix = "backbone.0.body."
    for key, value in state.items():
        if key.startswith(prefix):
            if key.endswith("num_batches_tracked"):
                continue
            out["backbone." + torchvision_resnet_to_detectron2(key[len(prefix):])] = value
        else:
            out[key] = value
    return out


def coco_ids_to_contiguous(state: Dict[str, torch.Tensor],
                           key: str = "class_embed") -> Dict[str, torch.Tensor]:
    """Official COCO DETR heads score the 91 COCO category ids (plus no-object, 92 rows);
    detectron2's COCO datasets number the 80 classes 0..79. Keep the rows of those 80 ids in
    detectron2's order, then the no-object row (``[81, D]``), so the model is evaluated by
    detectron2's COCO evaluator and distils into 80-class students."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    out = dict(state)
    for suffix in ("weight", "bias"):
        name = f"{key}.{suffix}"
        rows = state[name].shape[0]
        if rows != 92:
            raise ValueError(f"{name} has {rows} rows; an official COCO head has 92 (91 ids + "
                             "no-object)")
        out[name] = torch.cat([state[name][ids], state[name][-1:]])
    return out


def hf_resnet_to_detectron2(key: str) -> str:
    """One key of a transformers ``ResNetBackbone`` (without prefix) -> detectron2's ResNet."""
    m = re.match(r"embedder\.embedder\.(convolution|normalization)\.(.*)$", key)
    if m:
        return "stem.conv1." + ("" if m.group(1) == "convolution" else "norm.") + m.group(2)
    m = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(layer\.(\d+)|shortcut)\."
                 r"(convolution|normalization)\.(.*)$", key)
    if m is None:
        raise KeyError(f"not a transformers ResNet key: {key!r}")
    stage, block = int(m.group(1)) + 2, m.group(2)
    conv = "shortcut" if m.group(3) == "shortcut" else f"conv{int(m.group(4)) + 1}"
    norm = "" if m.group(5) == "convolution" else "norm."
    return f"res{stage}.{block}.{conv}.{norm}{m.group(6)}"


def hf_deformable_detr_to_port(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A transformers ``DeformableDetrForObjectDetection`` state dict (ResNet backbone) -> this
    port's :class:`DeformableDetr` state dict."""
    out = {}
    prefix = "model.backbone.model."
    for key, value in state.items():
        if key.startswith(prefix):
            if key.endswith("num_batches_tracked"):
                continue
            out["backbone." + hf_resnet_to_detectron2(key[len(prefix):])] = value
        else:
            out["detector." + key] = value
    return out
