"""FGD's pictures: its foreground and background masks and the spatial attention of teacher and
student on one level (:mod:`csgr_distill.vis.pictures`)."""
from typing import List

from .attention import grid, labelled
from .pictures import PictureInputs, save_rgb

__all__ = ["pictures"]


def pictures(pic: PictureInputs, fgd) -> List[str]:
    """FGD's weights on one level (``<stem>_fgd_masks_attention.png``): the foreground mask (with
    the ground-truth boxes), the background mask (grid cells, min-max scaled), and the spatial
    attention of teacher and student (the student's from its adapted map)."""
    maps = fgd.maps(pic.student, pic.teacher, pic.gt_instances, pic.level)
    fg = pic.with_gt_boxes(pic.heat(maps["fg"][0], smooth=False))
    tiles = [labelled(fg, f"fg mask {pic.level} ({fgd.box_scaling})"),
             labelled(pic.heat(maps["bg"][0], smooth=False), f"bg mask {pic.level}"),
             labelled(pic.heat(maps["teacher_spatial"][0]), "teacher spatial attention"),
             labelled(pic.heat(maps["student_spatial"][0]), "student spatial attention")]
    return [save_rgb(pic.stem_path + "_fgd_masks_attention.png", grid(tiles, cols=4))]
