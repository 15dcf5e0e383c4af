"""TAR's pictures: its Gaussian mask and the masked feature difference on one level, and, on
Faster R-CNN, the shared RoIs: which regions both heads answered for, their boxes and class
distributions, and which ones the adaptive regression rule selected
(:mod:`csgr_distill.vis.pictures`)."""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..distillers.tar import gaussian_masks
from .attention import grid, labelled
from .pictures import PictureInputs, save_rgb

__all__ = ["pictures", "pick_rois", "draw_shared_rois"]


def pick_rois(details: Dict[str, torch.Tensor], image: int = 0, selected: int = 3,
              rejected: int = 2, negatives: int = 1) -> List[int]:
    """Row indices of a few RoIs of one image worth looking at: up to ``selected`` positives
    whose teacher box the rule takes (best teacher IoU first, i.e. largest class probability of
    the teacher on its GT class), up to ``rejected`` positives it does not take, and
    ``negatives`` background RoIs the teacher finds most object-like."""
    rows = torch.nonzero(details["image"] == image).flatten()
    pos, sel = details["positive"][rows], details["selected"][rows]
    t_fg = 1 - details["t_prob"][rows, -1]

    def best(mask, n):
        idx = rows[mask]
        order = torch.argsort(t_fg[mask], descending=True)
        return idx[order[:n]].tolist()

    return best(pos & sel, selected) + best(pos & ~sel, rejected) + best(~pos, negatives)


def draw_shared_rois(rgb: np.ndarray, details: Dict[str, torch.Tensor], class_names: Sequence[str],
                     scale: Tuple[float, float] = (1.0, 1.0), proposals_from: str = "student",
                     image: int = 0) -> np.ndarray:
    """One picture: the image with a few shared RoIs (:func:`pick_rois`; white: the RoI, magenta:
    the teacher's box, orange: the student's, for its GT class; ``T`` marks RoIs whose teacher box
    is a regression target) and, per RoI, the teacher's and the student's class distributions.

    Args:
        rgb: ``[H, W, 3]`` uint8 display image; ``scale``: (x, y) from model input pixels to it.
        details: :meth:`TARDistiller.roi_details` on CPU.
        class_names: K foreground names then the background's.
    Returns an RGB ``uint8`` image.
    """
    rows = pick_rois(details, image)
    n = max(len(rows), 1)
    fig = Figure(figsize=(4 + 2.6 * n, 4.2), dpi=100)  # no pyplot: no backend of the user's
    canvas = FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, n + 2, height_ratios=[1, 1])
    ax = fig.add_subplot(gs[:, :2])
    ax.imshow(rgb)
    ax.set_axis_off()
    sx, sy = scale
    colours = {"proposals": "white", "t_box": "magenta", "s_box": "orange"}
    for k, r in enumerate(rows):
        keys = ("proposals", "t_box", "s_box") if details["positive"][r] else ("proposals",)
        for key in keys:
            x1, y1, x2, y2 = details[key][r].tolist()
            ax.add_patch(Rectangle((x1 * sx, y1 * sy), (x2 - x1) * sx, (y2 - y1) * sy,
                                       fill=False, lw=1.5, ec=colours[key],
                                       ls="--" if key == "proposals" else "-"))
        x1, y1 = details["proposals"][r, :2].tolist()
        tag = f"{k + 1}" + (" T" if details["selected"][r] else "")
        ax.text(x1 * sx + 2, y1 * sy + 2, tag, color="black", fontsize=8, va="top",
                bbox=dict(facecolor="white", alpha=0.8, pad=1, lw=0))
    ax.set_title(f"shared RoIs ({proposals_from} proposals): RoI, teacher, student box",
                 fontsize=8)
    x = np.arange(len(class_names))
    for k, r in enumerate(rows):
        a = fig.add_subplot(gs[:, k + 2])
        a.barh(x - 0.2, details["t_prob"][r].numpy(), height=0.4, color="magenta",
               label="teacher")
        a.barh(x + 0.2, details["s_prob"][r].numpy(), height=0.4, color="orange",
               label="student")
        a.set_yticks(x)
        a.set_yticklabels(class_names if k == 0 else [], fontsize=7)
        a.invert_yaxis()
        a.set_xlim(0, 1)
        a.tick_params(axis="x", labelsize=7)
        gt = int(details["gt_classes"][r])
        rule = ("teacher box is the target" if details["selected"][r] else
                "student box kept" if details["positive"][r] else "background RoI")
        a.set_title(f"RoI {k + 1}: GT {class_names[gt]}\n{rule}", fontsize=7)
        if k == 0:
            a.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def pictures(pic: PictureInputs, tar) -> List[str]:
    """TAR's feature weights on one level (``<stem>_tar_gaussian_masks.png``: the Gaussian mask
    with the ground-truth boxes, and the masked squared difference ``M * sum_c (r(S) - T)^2``
    it penalises) and, when its head terms are on, the shared RoIs
    (``<stem>_tar_shared_rois.png``, :func:`draw_shared_rois`)."""
    level = pic.level
    s_feat, t_feat = pic.student.features[level], pic.teacher.features[level]
    with torch.no_grad():
        mask = gaussian_masks([pic.gt_instances[0].gt_boxes.tensor], s_feat.shape[-2:],
                              pic.student.padded_size, tar.sigma_scale)[0]
        diff = ((tar.adapters[level](s_feat) - t_feat) ** 2).sum(1)[0]
    tiles = [labelled(pic.with_gt_boxes(pic.heat(mask, smooth=False)), f"Gaussian mask {level}"),
             labelled(pic.heat(mask * diff, smooth=False), f"mask x diff^2 {level}")]
    written = [save_rgb(pic.stem_path + "_tar_gaussian_masks.png", grid(tiles, cols=2))]
    if tar.uses_rois:
        details = {k: v.cpu() for k, v in tar.roi_details(pic.student, pic.teacher).items()}
        names = list(pic.metadata.thing_classes) + ["background"]
        written.append(save_rgb(pic.stem_path + "_tar_shared_rois.png", draw_shared_rois(
            pic.rgb, details, names, scale=pic.display_scale, proposals_from=tar.proposals)))
    return written
