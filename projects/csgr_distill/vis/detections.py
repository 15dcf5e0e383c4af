"""Detection panels: the detections that matter at any score level, drawn by detectron2's
Visualizer, with the selection rule written on the panel.

A weak or young detector (the demo's students reach 6-8 AP) scores few boxes above a fixed
threshold such as 0.4, so a fixed threshold shows an empty panel. The rule here is relative: the
``top_k`` highest-scoring detections of each image, among those at or above ``score_floor``.
"""
from typing import Optional, Sequence

import numpy as np
import torch
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

__all__ = ["captioned", "draw_detections", "lower_score_threshold", "rule_text",
           "top_detections"]


def top_detections(instances: Instances, top_k: int, score_floor: float) -> Instances:
    """The ``top_k`` highest-scoring of ``instances`` with ``score >= score_floor``, best first
    (``top_k <= 0``: all of them)."""
    instances = instances.to("cpu")
    order = torch.argsort(instances.scores, descending=True)
    order = order[instances.scores[order] >= score_floor]
    if top_k > 0:
        order = order[:top_k]
    return instances[order]


def rule_text(top_k: int, score_floor: float) -> str:
    """The rule of :func:`top_detections` as written on a panel, e.g. ``top 10 ≥ 0.05``."""
    return (f"top {top_k}" if top_k > 0 else "all") + f" ≥ {score_floor:g}"


def lower_score_threshold(model, score_floor: float, top_k: int) -> None:
    """Let ``model`` (a detectron2 RetinaNet-like dense detector or a GeneralizedRCNN) return
    every detection down to ``score_floor`` and at least ``top_k`` per image: its test score
    threshold is set to ``score_floor`` and its per-image detection limit raised to ``top_k``
    when lower (the model's own ``SCORE_THRESH_TEST`` would hide what the panel's rule keeps).
    Models of other types are left as they are."""
    heads = [model, getattr(getattr(model, "roi_heads", None), "box_predictor", None)]
    for head in heads:
        if head is None:
            continue
        if hasattr(head, "test_score_thresh"):
            head.test_score_thresh = score_floor
        for limit in ("max_detections_per_image", "test_topk_per_image"):
            if hasattr(head, limit) and top_k > getattr(head, limit):
                setattr(head, limit, top_k)


def draw_detections(rgb: np.ndarray, instances: Instances, metadata, scale: float) -> np.ndarray:
    """``instances`` on ``rgb`` (uint8 RGB) with detectron2's Visualizer: boxes, class names and
    scores (``circle 23%``)."""
    return Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(
        instances.to("cpu")).get_image()


def captioned(rgb: np.ndarray, lines: Sequence[str], font_size: Optional[int] = None
              ) -> np.ndarray:
    """``rgb`` below a dark band holding ``lines`` of white text (detectron2's ``draw_text``),
    so the caption never hides a box."""
    h, w = rgb.shape[:2]
    font = font_size or max(9, min(16, w // 24))
    line_h = int(font * 1.45)
    band = np.full((line_h * len(lines) + font // 2, w, 3), 40, dtype=np.uint8)
    v = Visualizer(band)
    for i, text in enumerate(lines):
        v.draw_text(text, (4, font // 4 + i * line_h), font_size=font, color="w",
                    horizontal_alignment="left")
    return np.concatenate([v.output.get_image(), rgb], axis=0)
