"""DistillTrainer: DefaultTrainer + teacher attachment, decay schedule, per-dataset evaluators."""
import logging
import os

import torch

from detectron2.engine import DefaultTrainer, HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..evaluation import build_evaluator
from ..export import student_state_dict
from .decay import DistillDecay, DistillDecayHook

logger = logging.getLogger(__name__)

__all__ = ["DistillTrainer", "unwrap_model"]


def unwrap_model(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class _ExportStudentHook(HookBase):
    """After training: write ``model_final_student.pth``, which a plain detectron2 config loads."""

    def after_train(self):
        if not comm.is_main_process() or self.trainer.iter + 1 < self.trainer.max_iter:
            return
        model = unwrap_model(self.trainer.model)
        path = os.path.join(self.trainer.cfg.OUTPUT_DIR, "model_final_student.pth")
        torch.save({"model": student_state_dict(model.state_dict())}, path)
        logger.info("Wrote the plain student checkpoint %s", path)


class DistillTrainer(DefaultTrainer):
    """Trains teachers, baseline students and distilled students alike.

    * builds and attaches the teacher (strict load) before the first step when
      ``MODEL.DISTILL.ENABLED``;
    * applies ``MODEL.DISTILL.DECAY`` before every step and logs ``distill/factor``; every
      distillation loss is part of the loss dict, so it reaches EventStorage (TensorBoard,
      metrics.json) like the detection losses;
    * distiller parameters are part of the model, so checkpoints and ``--resume`` keep them.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        student = unwrap_model(self.model)
        if getattr(student, "distill_enabled", False):
            student.attach_teacher()

    def build_hooks(self):
        hooks = super().build_hooks()
        if self.cfg.MODEL.DISTILL.ENABLED:
            hooks.insert(0, DistillDecayHook(DistillDecay.from_config(self.cfg)))
            hooks.append(_ExportStudentHook())
        return hooks

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)
