from .attention import grid, heatmap_on_image, labelled, level_map_to_image, mark_pixel
from .detections import (captioned, draw_detections, lower_score_threshold, rule_text,
                         top_detections)
from .distributions import chosen_anchor, draw_ld_regions
from .rois import draw_shared_rois, pick_rois

__all__ = ["captioned", "chosen_anchor", "draw_detections", "draw_ld_regions",
           "draw_shared_rois", "grid", "heatmap_on_image", "labelled",
           "level_map_to_image", "lower_score_threshold", "mark_pixel", "pick_rois", "rule_text",
           "top_detections"]
