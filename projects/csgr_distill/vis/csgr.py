"""CSGR's pictures: its class attention and the criss-cross attention of one grid cell, teacher
and student, on one level (:mod:`csgr_distill.vis.pictures`)."""
from typing import List

import torch

from .attention import grid, labelled, mark_pixel
from .pictures import PictureInputs, default_pixel, save_rgb

__all__ = ["pictures"]


def pictures(pic: PictureInputs, csgr) -> List[str]:
    """CSGR's class attention (``<stem>_csgr_category_attention.png``: one tile per class,
    teacher row above student row; the learned classifier's, or the teacher's logits with
    ``ATTENTION teacher_head``) and the criss-cross attention of one grid cell
    (``<stem>_csgr_criss_cross.png``: ``pic.pixel``, else the centre of the largest box),
    teacher and student."""
    level, stride = pic.level, pic.stride
    t_logits = pic.teacher.level_logits(level) if "cls_logits" in pic.teacher else None
    feats = {"teacher": pic.teacher.features, "student": pic.student.features}
    with torch.no_grad():
        maps = {role: csgr.attention_maps(f, level, role, teacher_logits=t_logits)
                for role, f in feats.items()}
    tiles = [labelled(pic.heat(maps[role]["category"][0, k]), f"{role[0]}: {name}")
             for role in ("teacher", "student")
             for k, name in enumerate(pic.metadata.thing_classes)]
    written = [save_rgb(pic.stem_path + "_csgr_category_attention.png",
                        grid(tiles, cols=len(pic.metadata.thing_classes)))]

    i, j = pic.pixel or default_pixel(pic.d, stride, pic.image_size, pic.orig_hw)
    with torch.no_grad():
        pix = {role: csgr.pixel_attention(f, level, i, j, role) for role, f in feats.items()}
    sx, sy = pic.display_scale
    xy = ((j + 0.5) * stride * sx, (i + 0.5) * stride * sy)
    tiles = [labelled(mark_pixel(pic.heat(pix[role][0], smooth=False), xy),
                      f"{role}: ({i},{j}) {level}") for role in ("teacher", "student")]
    written.append(save_rgb(pic.stem_path + "_csgr_criss_cross.png", grid(tiles, cols=2)))
    return written
