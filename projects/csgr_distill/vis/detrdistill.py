"""DETRDistill's pictures: the target-aware mask of the last decoder layer and its teacher <->
student matches (:mod:`csgr_distill.vis.pictures`)."""
from typing import List

import torch
from detectron2.utils.visualizer import Visualizer
from torch.nn import functional as F

from ..distillers.detrdistill import match_predictions, target_aware_mask
from .attention import grid, heatmap_on_image, labelled, level_map_to_image
from .pictures import PictureInputs, save_rgb

__all__ = ["pictures"]

#: matches drawn: the pairs whose teacher score is highest
SHOWN_MATCHES = 5


def pictures(pic: PictureInputs, dd) -> List[str]:
    """DETRDistill on the last decoder layer (``<stem>_detrdistill.png``): the target-aware mask
    on the first encoder input level, and the student <-> teacher matches of the layer's
    predictions (the pairs whose teacher score is highest; magenta teacher, orange student, a
    line between their centres)."""
    s, t = pic.student, pic.teacher
    h, w = pic.image_size
    with torch.no_grad():
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        gt = pic.gt_instances[0].gt_boxes.tensor / scale  # normalised xyxy, as the predictions
        t_lg, t_bx = t.pred_logits[-1][0], t.pred_boxes[-1][0]
        queries, quality = dd.quality(t_lg, t_bx, gt, t.softmax)
        name = next(iter(t.encoder_inputs))
        feat = t.encoder_inputs[name][0]
        mask = target_aware_mask(t.query_embeds[-1][0][queries], quality, feat, dd.mask_floor)
        (si, ti), = match_predictions(s.pred_logits[-1][:1], s.pred_boxes[-1][:1], t_lg[None],
                                      dd.teacher_match_boxes(t_bx)[None], s.softmax, dd.costs)
    stride = s.padded_size[0] / feat.shape[-2]
    heat = heatmap_on_image(pic.rgb, level_map_to_image(mask, int(round(stride)), pic.image_size,
                                                        pic.rgb.shape[:2], smooth=False))
    prob = F.softmax(t_lg, -1)[:, :-1] if t.softmax else torch.sigmoid(t_lg)
    order = torch.argsort(prob.max(-1).values[ti], descending=True)[:SHOWN_MATCHES]
    out_h, out_w = pic.rgb.shape[:2]
    v = Visualizer(pic.rgb.copy())
    for k in order.tolist():
        for box, colour in ((t_bx[ti[k]], "magenta"), (s.pred_boxes[-1][0][si[k]], "orange")):
            cx, cy, bw, bh = box.tolist()
            v.draw_box([(cx - bw / 2) * out_w, (cy - bh / 2) * out_h, (cx + bw / 2) * out_w,
                        (cy + bh / 2) * out_h], edge_color=colour)
        (tx, ty), (sx, sy) = t_bx[ti[k]][:2].tolist(), s.pred_boxes[-1][0][si[k]][:2].tolist()
        v.draw_line([tx * out_w, sx * out_w], [ty * out_h, sy * out_h], color="w")
    tiles = [labelled(heat, f"target-aware mask ({name})"),
             labelled(v.output.get_image(), "matches: teacher / student")]
    return [save_rgb(pic.stem_path + "_detrdistill.png", grid(tiles, cols=2))]
