"""DETR's training augmentation with detectron2's transforms (``INPUT.DETR_AUGMENTATION``):
a horizontal flip, then, each half the time, either a multi-scale resize or a resize + random
crop + multi-scale resize (DETR's ``make_coco_transforms``)."""
import numpy as np
from detectron2.data import transforms as T

__all__ = ["ChooseOne", "detr_augmentations"]


class ChooseOne(T.Augmentation):
    """Apply one of several augmentation lists, chosen uniformly at random per image."""

    def __init__(self, choices):
        super().__init__()
        self.choices = [T.AugmentationList(c) for c in choices]

    def __call__(self, aug_input):
        return self.choices[np.random.randint(len(self.choices))](aug_input)

    def get_transform(self, *args):  # pragma: no cover - __call__ is what AugmentationList uses
        raise NotImplementedError("ChooseOne applies a whole augmentation list: call it")


def detr_augmentations(cfg):
    """The list for ``DatasetMapper(cfg, is_train=True, augmentations=...)``: flip, then either
    ``ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN, "choice")`` or
    ``ResizeShortestEdge(INPUT.DETR_CROP_RESIZE)`` + ``RandomCrop(INPUT.CROP.TYPE,
    INPUT.CROP.SIZE)`` + the same multi-scale resize."""
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, "choice")
    crop = [T.ResizeShortestEdge(cfg.INPUT.DETR_CROP_RESIZE, sample_style="choice"),
            T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, "choice")]
    return [T.RandomFlip(), ChooseOne([[resize], crop])]
