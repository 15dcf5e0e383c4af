"""Pictures of detectors and of what each distillation method distils.

Drawing primitives (:mod:`.attention`, :mod:`.detections`), the frame every method's pictures
share (:mod:`.pictures`: :class:`PictureInputs`, :func:`pictures_for`, :func:`method_pictures`),
and one module per method with pictures, named after the method's registered name in lower case
(e.g. ``vis/csgr.py``) and found by :func:`pictures_for`; LD's and TAR's drawing helpers are
exported here too.
"""
from .attention import grid, heatmap_on_image, labelled, level_map_to_image, mark_pixel
from .detections import (captioned, draw_detections, lower_score_threshold, rule_text,
                         top_detections)
from .ld import chosen_anchor, draw_ld_regions
from .pictures import PictureInputs, method_pictures, pictures_for, save_rgb
from .tar import draw_shared_rois, pick_rois

__all__ = ["PictureInputs", "captioned", "chosen_anchor", "draw_detections", "draw_ld_regions",
           "draw_shared_rois", "grid", "heatmap_on_image", "labelled", "level_map_to_image",
           "lower_score_threshold", "mark_pixel", "method_pictures", "pick_rois",
           "pictures_for", "rule_text", "save_rgb", "top_detections"]
