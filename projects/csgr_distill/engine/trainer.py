"""DistillTrainer: DefaultTrainer + dataset check, teacher attachment, decay schedule, full-model
gradient clipping, plain-student export and per-dataset evaluators."""
import logging
import os

from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.utils import comm

from ..config import scale_schedule
from ..data.checks import check_training_data
from ..data.errors import check_datasets
from ..evaluation import build_evaluator
from ..export import write_student
from ..inherit import INHERIT_KEY, changed_since, inherit_from_teacher, snapshot
from .decay import DistillDecayHook
from .optimizer import build_optimizer
from .utils import unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["DistillTrainer", "unwrap_model", "STUDENT_EXPORT_NAME"]

#: ``OUTPUT_DIR/<this>.pth`` and ``.yaml``: the plain student a distillation run ends with
STUDENT_EXPORT_NAME = "model_final_student"


class _ExportStudentHook(HookBase):
    """When training has completed: write ``model_final_student.pth`` and
    ``model_final_student.yaml`` (:func:`csgr_distill.export.write_student`), which plain
    detectron2 loads. Registered before detectron2's ``EvalHook``, so a failing final evaluation
    does not lose them; a run that stopped with an error writes nothing."""

    def after_train(self):
        # TrainerBase.train leaves iter == max_iter only after the last step has completed
        if not comm.is_main_process() or self.trainer.iter < self.trainer.max_iter:
            return
        path = os.path.join(self.trainer.cfg.OUTPUT_DIR, STUDENT_EXPORT_NAME + ".pth")
        write_student(unwrap_model(self.trainer.model).state_dict(), path, self.trainer.cfg)


class DistillTrainer(DefaultTrainer):
    """Trains teachers, baseline students and distilled students alike.

    * before anything is built, checks that every ``DATASETS.TRAIN`` and ``DATASETS.TEST`` name is
      registered and on disk (:func:`csgr_distill.data.errors.check_datasets`), so a missing test
      set fails before the first iteration, not at the final evaluation; that no training set is
      empty and the head's class count matches the training classes
      (:func:`csgr_distill.data.checks.check_training_data`);
    * builds and attaches the teacher (strict load) before the first step when
      ``MODEL.DISTILL.ENABLED``;
    * with ``MODEL.DISTILL.INHERIT_TEACHER``, :meth:`resume_or_load` copies the teacher's neck and
      head into the student after ``MODEL.WEIGHTS`` is loaded, unless it resumes from a
      checkpoint (:mod:`csgr_distill.inherit`); ``self.inherited`` is the report (else None);
    * applies ``MODEL.DISTILL.DECAY`` before every step and logs ``distill/factor``; every
      distillation loss is part of the loss dict, so it reaches EventStorage (TensorBoard,
      metrics.json) like the detection losses;
    * the optimizer is detectron2's, with ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` added
      (:mod:`csgr_distill.engine.optimizer`);
    * a distillation run that completes writes ``model_final_student.{pth,yaml}`` (plain
      detectron2 weights and config) before the final evaluation.

    ``--resume`` (``resume_or_load(resume=True)``) restores what detectron2's checkpoint holds:
    the model weights, distiller parameters included (they are part of the model), the optimizer
    state (SGD momentum), the LR scheduler and the iteration; the decay factor is recomputed from
    the iteration (:class:`DistillDecayHook`) and the teacher is loaded again from
    ``MODEL.DISTILL.TEACHER.WEIGHTS`` (it is never in checkpoints). Not restored, so a resumed run
    is *not* bit-identical to an uninterrupted one: the data order (detectron2's
    ``TrainingSampler`` restarts its seeded stream, so other batches follow), the random-number
    states (augmentations), RetinaNet's loss-normaliser EMA (a plain attribute, back at its
    initial 100), and EventStorage's metric history and smoothing windows. A resumed run does not
    inherit the teacher's neck and head again (``MODEL.DISTILL.INHERIT_TEACHER``).
    """

    def __init__(self, cfg):
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")
        check_training_data(cfg)
        super().__init__(cfg)
        student = unwrap_model(self.model)
        self.inherited = None
        if getattr(student, "distill_enabled", False):
            student.attach_teacher()

    def resume_or_load(self, resume=True):
        """detectron2's ``resume_or_load`` (``MODEL.WEIGHTS``, or the last checkpoint of
        ``OUTPUT_DIR`` with ``resume``), then ``MODEL.DISTILL.INHERIT_TEACHER``: a run that starts
        at iteration 0 copies the teacher's neck and head into the student (the bottom-up stays
        the student's; neck/head tensors that ``MODEL.WEIGHTS`` loaded are replaced, with a
        warning); a run resumed from a checkpoint does not (the checkpoint holds them as
        trained). Call it before ``train()``, as ``tools/train_net.py`` does."""
        student = unwrap_model(self.model)
        inherit = (getattr(student, "distill_enabled", False)
                   and self.cfg.MODEL.DISTILL.get("INHERIT_TEACHER", False))
        before = snapshot(student) if inherit else None
        super().resume_or_load(resume=resume)
        self.inherited = None
        if not inherit:
            return
        if resume and self.checkpointer.has_checkpoint():
            logger.info("%s: not applied, resumed from %s at iteration %d: the checkpoint holds "
                        "the student's neck and head as trained so far", INHERIT_KEY,
                        self.checkpointer.get_checkpoint_file(), self.start_iter)
            return
        self.inherited = inherit_from_teacher(
            student, student.teacher.model, self.cfg.MODEL.DISTILL.TEACHER.CONFIG,
            replaced=changed_since(student, before))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """detectron2's scheduler, with ``SOLVER.STEPS`` given as fractions of ``MAX_ITER``
        converted to iterations (:func:`csgr_distill.config.scale_schedule`) for a config that
        did not go through :func:`csgr_distill.config.load_config`."""
        cfg = scale_schedule(cfg.clone(), check=False)
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader; with ``INPUT.DETR_AUGMENTATION`` its mapper applies DETR's
        augmentation (:func:`csgr_distill.detr_port.augmentation.detr_augmentations`)."""
        if not cfg.INPUT.get("DETR_AUGMENTATION", False):
            return super().build_train_loader(cfg)
        from detectron2.data import DatasetMapper, build_detection_train_loader

        from ..detr_port.augmentation import detr_augmentations
        mapper = DatasetMapper(cfg, is_train=True, augmentations=detr_augmentations(cfg))
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def build_hooks(self):
        ret = super().build_hooks()
        if self.cfg.MODEL.DISTILL.ENABLED:
            ret.insert(0, DistillDecayHook.from_config(self.cfg))
            evals = [i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)]
            ret.insert(evals[0] if evals else len(ret), _ExportStudentHook())
        return ret

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)
