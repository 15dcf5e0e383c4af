from .attention import grid, heatmap_on_image, labelled, level_map_to_image, mark_pixel
from .detections import (captioned, draw_detections, lower_score_threshold, rule_text,
                         top_detections)

__all__ = ["captioned", "draw_detections", "grid", "heatmap_on_image", "labelled",
           "level_map_to_image", "lower_score_threshold", "mark_pixel", "rule_text",
           "top_detections"]
