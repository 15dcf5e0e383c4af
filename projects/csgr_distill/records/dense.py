"""Dense one-stage detectors (detectron2's ``DenseDetector``: RetinaNet, FCOS, ...)."""
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.layers import CycleBatchNormList
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from torch import Tensor, nn

from ..outputs import DetectorOutputs
from .base import COMMON_FIELDS, Recorder, register_recorder

__all__ = ["DenseRecorder", "DenseHeadFrom", "dense_head_branches", "tower_blocks"]

#: a head's two towers: name in ``head_towers`` -> (its conv tower, its predictor) attributes
TOWERS = {"cls": ("cls_subnet", "cls_score"), "box": ("bbox_subnet", "bbox_pred")}
#: modules that end a tower's conv block
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                nn.SiLU, nn.Mish, nn.Hardswish, nn.Sigmoid, nn.Tanh)

#: one conv block of a tower: (its layers before the activation: conv [+ norm], the activation)
Block = Tuple[List[nn.Module], nn.Module]


def tower_blocks(head: nn.Module) -> Dict[str, List[Block]]:
    """A RetinaNet-style head's towers as conv blocks: ``{"cls": blocks, "box": blocks}``, each
    block ``(layers before its activation, the activation)`` in order (detectron2's
    ``RetinaNetHead``: ``cls_subnet`` / ``bbox_subnet`` = NUM_CONVS x (conv, [norm], ReLU)).

    Raises:
        ValueError: a head without ``cls_subnet``, ``bbox_subnet``, ``cls_score``, ``bbox_pred``,
            or whose towers are not such blocks, or have different depths.
    """
    missing = [a for pair in TOWERS.values() for a in pair if not hasattr(head, a)]
    if missing:
        raise ValueError(
            f"The record fields head_towers / head_from need a RetinaNet-style head (cls_subnet, "
            f"bbox_subnet, cls_score, bbox_pred); {type(head).__name__} lacks {missing}. Use a "
            "RetinaNet-family detector, or a method that does not read them")
    out = {}
    for tower, (subnet, _) in TOWERS.items():
        blocks, layers = [], []
        for layer in getattr(head, subnet).children():
            if isinstance(layer, _ACTIVATIONS):
                if not layers:
                    raise ValueError(f"{type(head).__name__}.{subnet}: an activation with no "
                                     "conv before it; head_towers needs (conv, [norm], activation) "
                                     "blocks")
                blocks.append((layers, layer))
                layers = []
            else:
                layers.append(layer)
        if layers:
            raise ValueError(f"{type(head).__name__}.{subnet} ends with {layers} after its last "
                             "activation; head_towers needs (conv, [norm], activation) blocks")
        out[tower] = blocks
    if len(out["cls"]) != len(out["box"]):
        raise ValueError(f"{type(head).__name__}: class tower of {len(out['cls'])} convs, box "
                         f"tower of {len(out['box'])}; head_towers needs towers of one depth")
    return out


def _run_layers(layers: Sequence[nn.Module], x: Tensor, level: int) -> Tensor:
    """``layers`` applied in order to level ``level``'s map ``x``; a ``CycleBatchNormList``
    (detectron2's per-level BatchNorm of heads with NORM "BN"/"SyncBN", which otherwise cycles
    through its levels call by call) is pointed at ``level`` first, so any subset or order of
    calls uses each level's own statistics."""
    for layer in layers:
        if isinstance(layer, CycleBatchNormList):
            layer._pos = level % len(layer)
        x = layer(x)
    return x


def run_tower(blocks: List[Block], x: Tensor, level: int, start: int = 0,
              stages: Optional[List[Tensor]] = None) -> Tensor:
    """A tower from stage ``start`` on: ``x`` ``[N, C, H, W]`` is stage ``start``'s activation
    (0: the tower's input; k >= 1: block k's output before its activation), the result the
    tower's output (after the last block's activation). ``stages``: appended with each later
    block's output before its activation."""
    if start > 0:
        x = blocks[start - 1][1](x)
    for layers, activation in blocks[start:]:
        x = _run_layers(layers, x, level)
        if stages is not None:
            stages.append(x)
        x = activation(x)
    return x


class DenseHeadFrom:
    """A dense detector's head run from a tower stage on, on given activations:
    ``head_from(k, cls, box) -> (cls_logits, box_deltas)``.

    ``cls`` and ``box``: per head level (all of them, in head order) ``[N, C_k, H_l, W_l]``, the
    activations of the class and box towers at stage ``k`` (as ``head_towers[...][k]``: 0 the
    head's input, k >= 1 conv block k's output before its activation). The towers run from there
    (block k's activation, blocks k+1..S) and the predictors follow, giving per level
    ``[N, A*K, H_l, W_l]`` and ``[N, A*4, H_l, W_l]`` (a ``DistributionRetinaNet``:
    ``[N, A*4*(REG_MAX+1), H_l, W_l]``) as the head's own; either input may be None, and its
    output then is. The head's own stage-k activations give back its own outputs.

    No ``no_grad`` inside: gradients reach the inputs; the teacher's parameters, frozen
    (``requires_grad=False``), receive none. So a student's activations can go through the
    teacher's layers with the gradient reaching the student. The modules run in their current
    mode (the teacher's: eval; a student's in training updates its BatchNorm statistics).

    Attributes:
        num_convs: S, the conv blocks per tower. num_classes: K.
        box_transform: the detector's ``box2box_transform`` (decodes ``box_deltas`` on anchors).
        num_levels: the head levels expected, in head order (``levels``: their names).
    """

    def __init__(self, model: nn.Module):
        self._head = model.head
        self._blocks = tower_blocks(model.head)
        self.num_convs = len(self._blocks["cls"])
        self.num_classes = int(model.num_classes)
        self.box_transform = getattr(model, "box2box_transform", None)
        self.levels = list(model.head_in_features)
        self.num_levels = len(self.levels)

    def __call__(self, k: int, cls: Optional[Sequence[Tensor]],
                 box: Optional[Sequence[Tensor]]) -> Tuple[Optional[List[Tensor]],
                                                           Optional[List[Tensor]]]:
        if not 0 <= int(k) <= self.num_convs:
            raise ValueError(f"head_from: stage {k} outside 0..{self.num_convs} (this head's "
                             f"towers have {self.num_convs} convs)")
        out = []
        for tower, maps in (("cls", cls), ("box", box)):
            if maps is None:
                out.append(None)
                continue
            if len(maps) != self.num_levels:
                raise ValueError(f"head_from: {len(maps)} {tower} maps for the head's "
                                 f"{self.num_levels} levels {self.levels}; give every level, "
                                 "in head order")
            predictor = getattr(self._head, TOWERS[tower][1])
            out.append([predictor(run_tower(self._blocks[tower], x, level, int(k)))
                        for level, x in enumerate(maps)])
        return out[0], out[1]


def dense_head_branches(head: nn.Module, features: List[Tensor], cls: bool,
                        box: bool) -> Tuple[List[Tensor], List[Tensor]]:
    """Run only the branches of a dense head that are asked for.

    RetinaNet-style heads (``cls_subnet`` + ``cls_score``, ``bbox_subnet`` + ``bbox_pred``) run
    branch by branch; any other head runs whole.

    Returns:
        ``(cls_logits, box_deltas)``: per level ``[N, A*K, H, W]`` and ``[N, A*4, H, W]``, or None
        for a branch not asked for.
    """
    branches = ("cls_subnet", "cls_score", "bbox_subnet", "bbox_pred")
    if not all(hasattr(head, b) for b in branches):
        logits, deltas = head(features)[:2]
        return (logits if cls else None), (deltas if box else None)
    logits = [head.cls_score(head.cls_subnet(f)) for f in features] if cls else None
    deltas = [head.bbox_pred(head.bbox_subnet(f)) for f in features] if box else None
    return logits, deltas


@register_recorder
class DenseRecorder(Recorder):
    family = "dense"
    model_types = (DenseDetector,)
    fields: Dict[str, str] = dict(
        COMMON_FIELDS,
        cls_logits="list over head levels of [N, A*K, H_l, W_l] class logits (A anchors/cell)",
        box_deltas="list over head levels of [N, A*4, H_l, W_l] box regression (a "
                   "DistributionRetinaNet: [N, A*4*(REG_MAX+1), H_l, W_l] side logits)",
        anchors="list over head levels of Boxes with H_l*W_l*A anchors",
        anchor_labels="list over images of [R] the detector's own anchor assignment "
                      "(label_anchors: class, K = background, -1 = ignored; R = all anchors of "
                      "all levels in head order)",
        anchor_gt_boxes="list over images of [R, 4] each anchor's matched ground-truth box",
        head_towers="dict 'cls' / 'box' -> list over tower stages k = 0..S of list over head "
                    "levels of [N, C, H_l, W_l]: stage 0 the head's input (the level's map), "
                    "stage k >= 1 the tower's k-th conv block after its conv (and norm), before "
                    "its activation; S = the convs per tower (MODEL.RETINANET.NUM_CONVS). "
                    "RetinaNet-style heads; the student's from its training forward",
        head_from="DenseHeadFrom: head_from(k, cls maps, box maps) -> (cls_logits, box_deltas), "
                  "this detector's towers from stage k (as head_towers) and its predictors, on "
                  "any activations of those shapes; gradients reach its inputs, never the "
                  "teacher's frozen parameters (attributes num_convs, num_classes, box_transform)",
    )

    def capture_methods(self, model, fields):
        if "anchor_labels" in fields or "anchor_gt_boxes" in fields:
            return {"label_anchors": (model, "label_anchors")}
        return {}

    def hook_modules(self, model, fields) -> Dict[str, nn.Module]:
        modules = {"backbone": model.backbone}
        if "cls_logits" in fields or "box_deltas" in fields:
            modules["head"] = model.head
        if "head_towers" in fields:
            # each block's last layer before its activation: called once per level
            for tower, blocks in tower_blocks(model.head).items():
                for k, (layers, activation) in enumerate(blocks, start=1):
                    if getattr(activation, "inplace", False):
                        raise ValueError(
                            f"head_towers: {type(model.head).__name__}'s {tower} tower has an "
                            f"in-place activation ({activation}), which overwrites the recorded "
                            "pre-activation map; build the head with inplace=False activations")
                    modules[_tower_key(tower, k)] = layers[-1]
        return modules

    def from_hooks(self, model, record, batched_inputs, fields) -> DetectorOutputs:
        image_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        predictions = record.get("head")
        out = self._record(model, image_sizes, record["backbone_input"].shape[-2:],
                           record["backbone"], fields,
                           predictions[0] if predictions else None,
                           predictions[1] if predictions else None)
        if "label_anchors" in record:
            out["anchor_labels"], out["anchor_gt_boxes"] = record["label_anchors"]
        if "head_towers" in fields:
            inputs = [record["backbone"][f] for f in model.head_in_features]
            towers = {}
            for tower, blocks in tower_blocks(model.head).items():
                towers[tower] = [inputs]
                for k in range(1, len(blocks) + 1):
                    calls = record[_tower_key(tower, k) + "_calls"]
                    if len(calls) != len(inputs):
                        raise RuntimeError(
                            f"head_towers: the {tower} tower's block {k} ran {len(calls)} times "
                            f"in the training forward, not once per head level ({len(inputs)})")
                    towers[tower].append(list(calls))
            out["head_towers"] = towers
        return out

    def record(self, model, images, batched_inputs, fields, student=None) -> DetectorOutputs:
        features = model.backbone(images.tensor)
        names = list(model.head_in_features)
        maps = [features[f] for f in names]
        if "head_towers" in fields:
            # one pass through the towers, keeping each stage; the predictors asked for follow
            towers, ends = {}, {}
            for tower, blocks in tower_blocks(model.head).items():
                per_level = []
                ends[tower] = []
                for level, x in enumerate(maps):
                    stages = [x]
                    ends[tower].append(run_tower(blocks, x, level, stages=stages))
                    per_level.append(stages)
                towers[tower] = [list(stage) for stage in zip(*per_level)]
            logits = [model.head.cls_score(x) for x in ends["cls"]] \
                if "cls_logits" in fields else None
            deltas = [model.head.bbox_pred(x) for x in ends["box"]] \
                if "box_deltas" in fields else None
        else:
            towers = None
            logits, deltas = dense_head_branches(model.head, maps, "cls_logits" in fields,
                                                 "box_deltas" in fields)
        out = self._record(model, images.image_sizes, images.tensor.shape[-2:], features,
                           fields, logits, deltas)
        if towers is not None:
            out["head_towers"] = towers
        if "anchor_labels" in fields or "anchor_gt_boxes" in fields:
            anchors = out.get("anchors") or model.anchor_generator([features[f] for f in names])
            device = images.tensor.device
            out["anchor_labels"], out["anchor_gt_boxes"] = model.label_anchors(
                anchors, [x["instances"].to(device) for x in batched_inputs])
        return out

    @staticmethod
    def _record(model, image_sizes, padded_size, features, fields, logits, deltas):
        names = list(model.head_in_features)
        out = DetectorOutputs("dense", image_sizes, padded_size, features=features,
                              feature_names=names)
        if "cls_logits" in fields:
            out["cls_logits"] = logits
        if "box_deltas" in fields:
            out["box_deltas"] = deltas
        if "anchors" in fields:
            out["anchors"] = model.anchor_generator([features[f] for f in names])
        if "head_from" in fields:
            out["head_from"] = DenseHeadFrom(model)
        return out


def _tower_key(tower: str, k: int) -> str:
    """The capture key of a tower's conv block ``k`` (1-based) in the student's forward."""
    return f"head_towers_{tower}_{k}"
