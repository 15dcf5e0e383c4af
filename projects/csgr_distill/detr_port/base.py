"""What the DETR-family meta-architectures share: pixel normalisation and batching, the device,
the backbone's shapes, and turning normalised (cx, cy, w, h) boxes into detectron2 results."""
from typing import Dict, List

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from ..detectors import register_detector

__all__ = ["DetrFamily"]


class DetrFamily(nn.Module):
    """Base of ``Detr`` and ``DeformableDetr``: subclasses set ``self.backbone`` (a detectron2
    backbone) and call :meth:`_init_pixels`."""

    def _init_pixels(self, pixel_mean, pixel_std, input_format: str) -> None:
        self.input_format = input_format
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Normalised images, padded at the bottom/right into one batch."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.backbone.output_shape()

    def to_results(self, boxes: Tensor, scores: Tensor, labels: Tensor, batched_inputs,
                   image_sizes) -> List[Dict[str, Instances]]:
        """Per image ``boxes`` ``[M, 4]`` (cx, cy, w, h) normalised by the unpadded input size,
        ``scores``/``labels`` ``[M]`` -> detectron2's ``{"instances": ...}`` at the requested
        output size."""
        from detr.util.box_ops import box_cxcywh_to_xyxy

        results = []
        for i, (h, w) in enumerate(image_sizes):
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(box_cxcywh_to_xyxy(boxes[i]) * torch.tensor(
                [w, h, w, h], dtype=torch.float32, device=self.device))
            inst.scores, inst.pred_classes = scores[i], labels[i]
            x = batched_inputs[i]
            results.append({"instances": detector_postprocess(
                inst, x.get("height", h), x.get("width", w))})
        return results


register_detector(DetrFamily, num_classes_key="MODEL.DETR.NUM_CLASSES")
