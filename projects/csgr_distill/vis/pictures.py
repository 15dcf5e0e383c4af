"""Each method's pictures, found by name: what they read and how they are written.

A method's pictures live in a module ``csgr_distill.vis.<registered name in lower case>`` (the
Distiller contract, :mod:`csgr_distill.distillers.base`) that defines

    pictures(inputs: PictureInputs, distiller) -> List[str]  # the files written

:func:`pictures_for` finds that function by name; nothing lists the methods that have pictures.
:func:`method_pictures` records one image as a training step does (the student's record and the
teacher's, on the student's grid), builds the :class:`PictureInputs` and calls the pictures of
every method given. ``tools/visualize.py`` does the rest (arguments, images, detection panels).
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from .attention import heatmap_on_image, level_map_to_image

__all__ = ["PictureInputs", "default_pixel", "gt_boxes_in_input", "method_pictures",
           "picture_level", "pictures_for", "save_rgb"]

#: ``pictures(inputs, distiller) -> written file paths``
Pictures = Callable[["PictureInputs", object], List[str]]


@dataclass
class PictureInputs:
    """What a method's pictures read: the two records of one image (a training step's), the
    ground truth in the model's input pixels, and how to draw on the image."""

    d: dict  # the dataset dict
    student: object  # the DetectorOutputs of the student
    teacher: object  # ... and of the teacher
    gt_instances: list  # [Instances] with gt_boxes (XYXY) and gt_classes, in input pixels
    level: str  # the level drawn (--level)
    stride: int  # its stride
    image_size: Tuple[int, int]  # the model's resized input (h, w)
    orig_hw: Tuple[int, int]  # the dataset image (h, w)
    rgb: np.ndarray  # the image, enlarged for display: uint8 [H_out, W_out, 3]
    metadata: object  # the dataset's (thing_classes)
    stem_path: str  # <output folder>/<image stem>: a picture is stem_path + "_<method>_*.png"
    model: object = None  # the student model (e.g. its box transform)
    pixel: Optional[Tuple[int, int]] = None  # grid cell (row, col) asked for (--pixel)

    @property
    def display_scale(self) -> Tuple[float, float]:
        """(x, y) from the model's input pixels to the display image's."""
        out_h, out_w = self.rgb.shape[:2]
        return out_w / self.image_size[1], out_h / self.image_size[0]

    def heat(self, level_map, smooth=True) -> np.ndarray:
        """A level map ``[h, w]`` over the display image."""
        return heatmap_on_image(self.rgb, level_map_to_image(
            level_map, self.stride, self.image_size, self.rgb.shape[:2], smooth=smooth))

    def with_gt_boxes(self, image: np.ndarray) -> np.ndarray:
        """``image`` (the size of the display image) with the ground-truth boxes in white."""
        sx, sy = self.display_scale
        v = Visualizer(image)
        for x0, y0, x1, y1 in self.gt_instances[0].gt_boxes.tensor.tolist():
            v.draw_box([x0 * sx, y0 * sy, x1 * sx, y1 * sy], edge_color="w")
        return v.output.get_image()


def save_rgb(path: str, rgb: np.ndarray) -> str:
    """Write the uint8 RGB image ``rgb`` ``[H, W, 3]`` to ``path`` (the format from its
    extension) and return ``path``."""
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)
    return path


def pictures_for(name: str) -> Optional[Pictures]:
    """The ``pictures`` function of the method registered as ``name``: that of the module
    ``csgr_distill.vis.<name in lower case>``; None when there is no such module. An error
    inside an existing module (e.g. a package it imports is missing) propagates."""
    module_name = f"{__package__}.{name.lower()}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise
    pictures = getattr(module, "pictures", None)
    if not callable(pictures):
        raise TypeError(f"{module_name} (the pictures of the method {name}) defines no function "
                        "pictures(inputs, distiller) -> [written files]")
    return pictures


def picture_level(student, distillers: Dict[str, object]) -> str:
    """``--level``'s default: p3 when the student has it, else the first level a drawn method
    distils (a DETR's res5), else the student's first level."""
    levels = list(student.backbone.output_shape())
    if "p3" in levels:
        return "p3"
    for d in distillers.values():
        for level in getattr(d, "in_features", ()):
            if level in levels:
                return level
    return levels[0]


def gt_boxes_in_input(d: dict, image_size, orig_hw) -> torch.Tensor:
    """The dataset dict's boxes ``[B, 4]`` (XYXY) in the model's resized input pixels."""
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
             for a in d.get("annotations", [])]
    sy, sx = image_size[0] / orig_hw[0], image_size[1] / orig_hw[1]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * torch.tensor(
        [sx, sy, sx, sy])


def default_pixel(d: dict, stride: int, image_size, orig_hw) -> Tuple[int, int]:
    """Grid cell (row, col) at the centre of the largest ground-truth box (or the image centre).

    ``image_size``: the model's resized input (h, w); ``orig_hw``: the dataset image (h, w)."""
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
             for a in d.get("annotations", [])]
    if boxes:
        x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    else:
        cy, cx = orig_hw[0] / 2, orig_hw[1] / 2
    sy, sx = image_size[0] / orig_hw[0], image_size[1] / orig_hw[1]
    rows = max(1, int(np.ceil(image_size[0] / stride)))
    cols = max(1, int(np.ceil(image_size[1] / stride)))
    return min(int(cy * sy // stride), rows - 1), min(int(cx * sx // stride), cols - 1)


def method_pictures(student, distillers: Dict[str, object], d: dict, inputs: List[dict],
                    rgb: np.ndarray, scale: float, metadata, level: str, stem_path: str,
                    pixel: Optional[Tuple[int, int]] = None) -> List[str]:
    """The pictures of every method of ``distillers`` (name -> the student's distiller; each
    must have :func:`pictures_for`), from the records a training step gives the distillers.

    ``student``: a ``Distill*`` model with distillation on, in eval mode; ``inputs``: the image
    as the model takes it (``[{"image": [3, h, w], "height", "width"}]``); ``rgb``: the dataset
    image (RGB uint8), drawn ``scale`` times larger. Returns the files written."""
    stride = student.backbone.output_shape()[level].stride
    orig_hw = rgb.shape[:2]
    image_size = tuple(inputs[0]["image"].shape[-2:])
    gt = Instances(image_size)
    gt.gt_boxes = Boxes(gt_boxes_in_input(d, image_size, orig_hw))
    gt.gt_classes = torch.tensor([a["category_id"] for a in d.get("annotations", [])],
                                 dtype=torch.long)
    inputs = [dict(inputs[0], instances=gt)]  # what the R-CNN's RoI sampling matches against
    with torch.no_grad():
        s_images = student.preprocess_image(inputs)
        s_rec = student.recorder.record(student, s_images, inputs,
                                        student.distill_fields["student"])
        t_rec = student.run_teacher(inputs, s_rec)
    pic = PictureInputs(d=d, student=s_rec, teacher=t_rec, gt_instances=[gt], level=level,
                        stride=stride, image_size=image_size, orig_hw=orig_hw,
                        rgb=cv2.resize(rgb, None, fx=scale, fy=scale,
                                       interpolation=cv2.INTER_LINEAR),
                        metadata=metadata, stem_path=stem_path, model=student, pixel=pixel)
    written = []
    for name, distiller in distillers.items():
        pictures = pictures_for(name)
        if pictures is None:
            raise ValueError(f"the method {name} has no pictures (no module "
                             f"{__package__}.{name.lower()})")
        written += pictures(pic, distiller)
    return written
