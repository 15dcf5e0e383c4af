"""LD's pictures: which anchors its main and VLR terms distil, and the teacher's and the
student's distributions over one box's side distances (:mod:`csgr_distill.vis.pictures`)."""
from typing import Dict, List, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .pictures import PictureInputs, save_rgb

__all__ = ["pictures", "draw_ld_regions", "chosen_anchor"]

SIDES = ("left", "top", "right", "bottom")


def chosen_anchor(details: Dict[str, torch.Tensor]) -> int:
    """The positive anchor drawn with its distributions: the one the student scores highest
    (the largest main-LD weight); -1 without positives."""
    pos = torch.nonzero(details["positive"]).flatten()
    if len(pos) == 0:
        return -1
    return int(pos[details["weight"][pos].argmax()])


def _centres(anchors: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    """(x, y, value) of the masked anchors, one dot per centre (the largest value there)."""
    c = ((anchors[:, :2] + anchors[:, 2:]) / 2)[mask]
    v = values[mask]
    best: Dict[Tuple[float, float], float] = {}
    for (x, y), val in zip(c.tolist(), v.tolist()):
        best[(x, y)] = max(val, best.get((x, y), -1.0))
    if not best:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    xy = np.array(list(best))
    return xy[:, 0], xy[:, 1], np.array(list(best.values()))


def draw_ld_regions(rgb: np.ndarray, details: Dict[str, torch.Tensor],
                    gt_boxes: torch.Tensor, scale: Tuple[float, float] = (1.0, 1.0),
                    bins_unit: str = "strides") -> np.ndarray:
    """One picture: the main region (positive anchors' centres, coloured by the student's max
    class score, the weight of main LD), the VLR (centres coloured by the IoU weight), both with
    the GT boxes, and the four side distributions of :func:`chosen_anchor` (teacher vs student,
    the GT's distance as a line when ``details`` has ``side_targets`` ``[R, 4]``). ``details``:
    :meth:`LDDistiller.region_details` on CPU."""
    sx, sy = scale
    k = chosen_anchor(details)
    fig = Figure(figsize=(13, 3.8), dpi=100)
    canvas = FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 6)
    for col, (mask, values, title) in enumerate((
            (details["positive"], details["weight"], "main region: student score"),
            (details["vlr"], details["vlr_iou"], "VLR: IoU weight"))):
        ax = fig.add_subplot(gs[:, 2 * col:2 * col + 2])
        ax.imshow(rgb)
        ax.set_axis_off()
        for x1, y1, x2, y2 in gt_boxes.tolist():
            ax.add_patch(Rectangle((x1 * sx, y1 * sy), (x2 - x1) * sx, (y2 - y1) * sy,
                                   fill=False, lw=1.2, ec="white"))
        x, y, v = _centres(details["anchors"], values, mask)
        sc = ax.scatter(x * sx, y * sy, c=v, s=14, cmap="viridis", vmin=0, vmax=max(1e-6, v.max())
                        if len(v) else 1, edgecolors="black", linewidths=0.3)
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(f"{title} ({int(mask.sum())} anchors)", fontsize=8)
        if col == 0 and k >= 0:
            cx, cy = ((details["anchors"][k, :2] + details["anchors"][k, 2:]) / 2).tolist()
            ax.scatter([cx * sx], [cy * sy], s=60, marker="x", c="red")
    if k >= 0:
        bins = np.arange(details["s_prob"].shape[-1])
        for side in range(4):
            ax = fig.add_subplot(gs[side // 2, 4 + side % 2])
            ax.bar(bins - 0.2, details["t_prob"][k, side].numpy(), width=0.4, color="magenta",
                   label="teacher")
            ax.bar(bins + 0.2, details["s_prob"][k, side].numpy(), width=0.4, color="orange",
                   label="student")
            if "side_targets" in details:
                ax.axvline(float(details["side_targets"][k, side]), color="black", lw=1)
            ax.set_title(f"{SIDES[side]} (bins in {bins_unit})", fontsize=7)
            ax.tick_params(labelsize=6)
            if side == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def pictures(pic: PictureInputs, ld) -> List[str]:
    """LD's regions and one box's distributions (``<stem>_ld_regions.png``,
    :func:`draw_ld_regions`; the ground truth's side distances from the student's box
    transform)."""
    details = {k: v.cpu() for k, v in
               ld.region_details(pic.student, pic.teacher, pic.gt_instances).items()}
    details["side_targets"] = pic.model.box2box_transform.side_targets(
        details["anchors"], details["gt_boxes"])
    return [save_rgb(pic.stem_path + "_ld_regions.png", draw_ld_regions(
        pic.rgb, details, pic.gt_instances[0].gt_boxes.tensor, pic.display_scale))]
