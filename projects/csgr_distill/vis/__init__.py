from .attention import grid, heatmap_on_image, labelled, level_map_to_image, mark_pixel
from .detections import (captioned, draw_detections, lower_score_threshold, rule_text,
                         top_detections)
from .rois import draw_shared_rois, pick_rois

__all__ = ["captioned", "draw_detections", "draw_shared_rois", "grid", "heatmap_on_image", "labelled",
           "level_map_to_image", "lower_score_threshold", "mark_pixel", "pick_rois", "rule_text",
           "top_detections"]
