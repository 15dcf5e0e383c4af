"""Key conversion of DETR-family checkpoints to this port's layout.

The official DETR code keeps a torchvision ResNet under ``backbone.0.body.`` (``conv1``, ``bn1``,
``layerX.Y.convZ`` / ``bnZ`` / ``downsample.{0,1}``); this port keeps a detectron2 ResNet under
``backbone.`` (``stem.conv1`` with ``.norm``, ``res{X+1}.Y.convZ`` with ``.norm``,
``shortcut``). Every other key (``transformer.*``, ``class_embed.*``, ``bbox_embed.*``,
``query_embed.*``, ``input_proj.*``) has the same name in both.

A Hugging Face ``DeformableDetrForObjectDetection`` keeps its ResNet under
``model.backbone.model.`` (a transformers ResNet: ``embedder.embedder``,
``encoder.stages.S.layers.B.layer.K`` / ``.shortcut``, each a ``convolution`` +
``normalization``; a timm ResNet, as the hub's ``SenseTime/deformable-detr*`` checkpoints: the
torchvision names); the port's ``DeformableDetr`` keeps the detectron2 ResNet under ``backbone.``
and the rest of the library's model under ``detector.``. What ``save_pretrained`` writes has
older names (``model.backbone.conv_encoder.model.``, ``layers.N.fc1``, ``self_attn.out_proj``:
transformers' own conversion mapping turns them into the in-memory ones) and leaves out the heads
it ties (:func:`fill_shared_heads` puts them back).
"""
import json
import os
import re
from typing import Dict, Iterable, List, Mapping, Tuple

import torch

__all__ = ["torchvision_resnet_to_detectron2", "official_detr_to_port", "coco_ids_to_contiguous",
           "hf_resnet_to_detectron2", "hf_deformable_detr_to_port", "fill_shared_heads",
           "official_deformable_detr_to_port", "read_state_dict"]


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


def coco_ids_to_contiguous(state: Dict[str, torch.Tensor], key: str = "class_embed",
                           no_object: bool = True) -> Dict[str, torch.Tensor]:
    """Official COCO heads score the 91 COCO category ids (DETR: plus no-object, 92 rows;
    Deformable DETR: 91 sigmoid rows); detectron2's COCO datasets number the 80 classes 0..79.
    Keep the rows of those 80 ids in detectron2's order (then DETR's no-object row), for every
    head whose name starts with ``key`` (Deformable DETR has one per decoder layer), so the model
    is evaluated by detectron2's COCO evaluator and distils into 80-class students."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    rows = 92 if no_object else 91
    out = dict(state)
    names = [k for k in state if k.startswith(key) and k.endswith((".weight", ".bias"))]
    if not names:
        raise ValueError(f"no class head {key}* in the checkpoint")
    for name in names:
        if state[name].shape[0] != rows:
            raise ValueError(f"{name} has {state[name].shape[0]} rows; an official COCO head has "
                             f"{rows}")
        keep = [state[name][ids]] + ([state[name][-1:]] if no_object else [])
        out[name] = torch.cat(keep)
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


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in ``path``: a ``save_pretrained`` folder (``model.safetensors``, its
    sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``), a ``.safetensors``
    file, or a torch file (a state dict, or ``{"model": state_dict}`` as detectron2 and the
    official DETR code save). Raises ``ValueError`` naming what it looked for."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(os.path.join(path, shard)))
            return state
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return read_state_dict(os.path.join(path, name))
        raise ValueError(f"{path}: a folder without model.safetensors, "
                         "model.safetensors.index.json or pytorch_model.bin (not a "
                         "save_pretrained folder)")
    if path.endswith(".safetensors"):
        return load_file(path)
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict, nor {{'model': state_dict}}")
    return state


def _transformers_names(keys: Iterable[str]) -> Dict[str, str]:
    """Each key as ``save_pretrained`` writes it -> its in-memory name, by transformers' own
    conversion mapping for ``deformable_detr`` (in-memory names pass unchanged)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    rules = get_checkpoint_conversion_mapping("deformable_detr")
    names = {}
    for key in keys:
        name = key
        for rule in rules:
            name, _ = rule.rename_source_key(name)
        names[key] = name
    return names


def hf_deformable_detr_to_port(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A transformers ``DeformableDetrForObjectDetection`` state dict, in memory
    (``model.state_dict()``) or as ``save_pretrained`` writes it, with a ResNet backbone (a
    transformers ResNet, or a timm ResNet with torchvision's names, as the hub's
    ``SenseTime/deformable-detr*``) -> this port's :class:`DeformableDetr` state dict, heads not
    yet completed (:func:`fill_shared_heads`). Another backbone raises ``KeyError``: the port's
    backbone is a detectron2 ResNet."""
    out = {}
    prefix = "model.backbone.model."
    names = _transformers_names(state)
    for key, value in state.items():
        key = names[key]
        if key.startswith(prefix):
            if key.endswith("num_batches_tracked"):
                continue
            rest = key[len(prefix):]
            rest = rest[len("_backbone."):] if rest.startswith("_backbone.") else rest
            if rest.startswith(("embedder.", "encoder.stages.")):
                out["backbone." + hf_resnet_to_detectron2(rest)] = value
            elif re.match(r"(conv1|bn1|layer[1-4])\.", rest):
                out["backbone." + torchvision_resnet_to_detectron2(rest)] = value
            else:
                raise KeyError(
                    f"backbone key {key!r} is neither a transformers ResNet's nor a timm / "
                    "torchvision ResNet's: the port's backbone is a detectron2 ResNet, so "
                    "checkpoints with other backbones (timm ConvNeXt, Swin, ResNet-D, ...) "
                    "cannot be converted")
        else:
            out["detector." + key] = value
    return out


_HEAD_KEY = re.compile(r"^detector\.(?:model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)$")


def fill_shared_heads(state: Mapping[str, torch.Tensor], wanted: Iterable[str]
                      ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Complete the per-layer heads a transformers checkpoint leaves out for the port's keys
    ``wanted``. Every head lives under ``detector.class_embed.N`` / ``detector.bbox_embed.N``
    and, with box refinement (two-stage), also ``detector.model.decoder.bbox_embed.N``
    (``class_embed.N``); ``save_pretrained`` writes one name per tensor it ties. A missing head
    of layer N is taken from the same layer's other name, else from layer 0 (a checkpoint with
    one head shared by every layer: without box refinement, as the official model, or a box
    refinement saved by transformers >= 5, which ties its class heads). Returns the completed
    dict and the keys taken from layer 0."""
    out, from_first = dict(state), []
    for key in wanted:
        m = _HEAD_KEY.match(key)
        if key in out or m is None:
            continue
        head, layer, rest = m.groups()
        homes = [f"detector.{head}.{{}}.{rest}", f"detector.model.decoder.{head}.{{}}.{rest}"]
        same_layer = [h.format(layer) for h in homes if h.format(layer) in state]
        first = [h.format(0) for h in homes if h.format(0) in state]
        if same_layer:
            out[key] = state[same_layer[0]]
        elif first:
            out[key] = state[first[0]]
            from_first.append(key)
    return out, from_first


#: official Deformable DETR (fundamentalvision/Deformable-DETR) -> transformers names, applied in
#: order to the part of a key after ``transformer.`` (regex, replacement)
_DEFORMABLE_RULES = [
    (r"^level_embed$", "model.level_embed"),
    (r"^reference_points\.", "model.reference_points."),
    (r"^(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"model.\1."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.", r"model.encoder.layers.\1.self_attn."),
    (r"^encoder\.layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.final_layer_norm."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.linear1\.", r"model.\1.layers.\2.mlp.fc1."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.linear2\.", r"model.\1.layers.\2.mlp.fc2."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"model.decoder.layers.\1.encoder_attn."),
    (r"^decoder\.layers\.(\d+)\.norm1\.", r"model.decoder.layers.\1.encoder_attn_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.norm2\.", r"model.decoder.layers.\1.self_attn_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.final_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.",
     r"model.decoder.layers.\1.self_attn.o_proj."),
    (r"^decoder\.(bbox_embed|class_embed)\.", r"model.decoder.\1."),
]


def official_deformable_detr_to_port(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An official Deformable DETR ``model`` state dict -> this port's :class:`DeformableDetr`:
    the torchvision ResNet renamed as for DETR, ``transformer.*`` renamed to the library's
    modules (:data:`_DEFORMABLE_RULES`; the decoder's ``nn.MultiheadAttention`` ``in_proj``
    split into ``q_proj``, ``k_proj``, ``v_proj``), ``query_embed`` -> the library's
    ``query_position_embeddings``; ``class_embed``/``bbox_embed``/``input_proj`` keep their
    names under ``model``/the detector."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.0.body."):
            if not key.endswith("num_batches_tracked"):
                out["backbone." + torchvision_resnet_to_detectron2(
                    key[len("backbone.0.body."):])] = value
            continue
        if key.startswith("transformer."):
            rest = key[len("transformer."):]
            m = re.match(r"^decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", rest)
            if m:
                q, k, v = value.chunk(3, dim=0)
                base = f"detector.model.decoder.layers.{m.group(1)}.self_attn."
                for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{base}{name}.{m.group(2)}"] = part
                continue
            for pattern, repl in _DEFORMABLE_RULES:
                if re.match(pattern, rest):
                    out["detector." + re.sub(pattern, repl, rest)] = value
                    break
            else:
                raise KeyError(f"official Deformable DETR key without a rule: {key!r}")
            continue
        if key.startswith("query_embed."):
            out["detector.model.query_position_embeddings." + key[len("query_embed."):]] = value
        elif key.startswith("input_proj."):
            out["detector.model." + key] = value
        else:  # class_embed.*, bbox_embed.*
            out["detector." + key] = value
    return out
