"""The one record of what a detector exposes to distillers.

Distillers read a :class:`DetectorOutputs` of the student and one of the teacher; they never reach
into a model. A meta-architecture fills only the fields that some configured distiller asks for
(see :data:`OUTPUT_FIELDS` and ``Distiller.required_outputs``).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

#: Fields a distiller may request through its ``required_outputs`` attribute.
OUTPUT_FIELDS = ("features", "cls_logits", "box_deltas", "anchors")


@dataclass
class DetectorOutputs:
    """What one detector computed for one batch.

    Attributes:
        image_sizes: per image ``(h, w)`` of the resized, unpadded input.
        padded_size: ``(H_in, W_in)`` of the padded batch tensor.
        features: FPN level name -> ``[N, C, H_l, W_l]``.
        cls_logits: dense heads: per level ``[N, A*K, H_l, W_l]`` class logits (K classes,
            A anchors per cell), in the order of ``feature_names``.
        box_deltas: dense heads: per level ``[N, A*4, H_l, W_l]`` box regression.
        anchors: dense heads: per level ``Boxes`` with ``H_l*W_l*A`` anchors.
        feature_names: level names of the head inputs, in order (e.g. ``p3..p7``).
        extras: anything detector-specific (R-CNN proposals, DETR decoder states).
    """

    image_sizes: List[Tuple[int, int]]
    padded_size: Tuple[int, int]
    features: Dict[str, Tensor] = field(default_factory=dict)
    cls_logits: Optional[List[Tensor]] = None
    box_deltas: Optional[List[Tensor]] = None
    anchors: Optional[List[Any]] = None
    feature_names: List[str] = field(default_factory=list)
    extras: Dict[str, Any] = field(default_factory=dict)

    def level_logits(self, level: str) -> Tensor:
        """Class logits ``[N, A*K, H, W]`` of one level, by name (requires ``cls_logits``)."""
        if self.cls_logits is None:
            raise KeyError("cls_logits were not recorded; add 'cls_logits' to the distiller's "
                           "required_outputs")
        return self.cls_logits[self.feature_names.index(level)]
