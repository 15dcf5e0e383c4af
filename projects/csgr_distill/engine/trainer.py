"""DistillTrainer: DefaultTrainer + machine and dataset checks, teacher attachment, decay schedule,
full-model gradient clipping, a stop with the cause on non-finite losses or gradients, checkpoints
written whole, plain-student export and per-dataset evaluators."""
import logging
import math
import os
from typing import Dict, List, Optional

import torch
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.utils import comm

from ..backbone_weights import load_backbone_weights
from ..checkpoint import CheckedCheckpointer
from ..cli import debug_enabled, user_error_message
from ..config import scale_schedule
from ..data.checks import check_training_data
from ..data.errors import check_datasets
from ..detr_port.augmentation import detr_augmentations
from ..evaluation import build_evaluator
from ..export import write_student
from ..inherit import INHERIT_KEY, changed_since, inherit_from_teacher, snapshot
from .checks import check_device
from .decay import DistillDecayHook
from .optimizer import (GradientCheckHook, NonFiniteGradientError, build_optimizer,
                        checks_gradients)
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


class _LastLosses:
    """A forward hook on the trained model keeping its last training loss dict (detached; no
    host sync), to name the losses when a step diverges."""

    def __init__(self):
        self.losses: Optional[Dict[str, torch.Tensor]] = None

    def __call__(self, module, inputs, output):
        if module.training and isinstance(output, dict):
            self.losses = {k: v.detach() for k, v in output.items() if torch.is_tensor(v)}


class _OneLineUserErrors(logging.Filter):
    """For detectron2's ``"Exception during training:"`` record (its traceback, logged before the
    exception propagates): a known user error (:func:`csgr_distill.cli.user_error_message`) is
    logged as its one-line message instead, unless ``--debug`` / ``CSGR_DEBUG=1``."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or debug_enabled():
            return True
        if str(exc).startswith(_DETECTRON2_LOSS_CHECK):
            return False  # "Exception in writing metrics": DistillTrainer.run_step says it better
        message = user_error_message(exc)
        if message is not None:
            record.msg, record.args = "Training stopped: %s", (message,)
            record.exc_info = record.exc_text = None
        return True


#: detectron2's SimpleTrainer message for a non-finite total loss
_DETECTRON2_LOSS_CHECK = "Loss became infinite or NaN at iteration="


class DistillTrainer(DefaultTrainer):
    """Trains teachers, baseline students and distilled students alike.

    * before anything is built, checks the machine (:func:`~csgr_distill.engine.checks.
      check_device`: ``MODEL.DEVICE`` exists, ``SOLVER.AMP.ENABLED`` only on CUDA) and that
      every ``DATASETS.TRAIN`` and ``DATASETS.TEST`` name is registered and on disk
      (:func:`csgr_distill.data.errors.check_datasets`), so a missing test set fails before the
      first iteration, not at the final evaluation; that no training set is empty and the
      head's class count matches the training classes
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
      detectron2 weights and config) before the final evaluation;
    * a step whose losses or gradients are NaN or infinite stops the run before the weights
      change, with one message naming the non-finite (or the largest) losses and their weight
      keys (:meth:`divergence_message`); the gradients' global norm is checked every step (one
      host sync: the full-model clipping's norm, else :class:`~csgr_distill.engine.optimizer.
      GradientCheckHook`'s; with AMP, detectron2's GradScaler skips such steps itself);
    * checkpoints are read and written by :class:`~csgr_distill.checkpoint.CheckedCheckpointer`:
      an unreadable ``MODEL.WEIGHTS`` or last checkpoint is one message saying what the file is,
      and a checkpoint is written to a temporary file renamed when complete (a full disk leaves
      no truncated ``model_*.pth``; ``last_checkpoint`` names only complete files);
    * warnings that make the trained model doubtful (a distillation loss dwarfing the detection
      losses) are repeated when training ends and kept in ``self.warnings``
      (``tools/train_net.py`` writes them into ``eval_results.json``).

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
        check_device(cfg, training=True, world_size=comm.get_world_size())
        check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")
        check_training_data(cfg)
        super().__init__(cfg)
        student = unwrap_model(self.model)
        self.inherited = None
        self.warnings: List[str] = []
        if getattr(student, "distill_enabled", False):
            student.attach_teacher()
        self._last_losses = _LastLosses()
        self.model.register_forward_hook(self._last_losses)
        if not cfg.SOLVER.AMP.ENABLED and not checks_gradients(self.optimizer):
            # the SimpleTrainer runs after_backward of its own hooks only
            self._trainer.register_hooks([GradientCheckHook()])

    def run_step(self):
        """detectron2's step; a non-finite loss or gradient becomes :meth:`divergence_message`."""
        try:
            super().run_step()
        except NonFiniteGradientError as e:
            raise FloatingPointError(self.divergence_message(e.norm)) from e
        except FloatingPointError as e:
            if not str(e).startswith(_DETECTRON2_LOSS_CHECK):
                raise  # the distillers' own check names the loss and its weight key
            raise FloatingPointError(self.divergence_message()) from e

    def divergence_message(self, gradient_norm: Optional[float] = None) -> str:
        """One line on a step whose losses (or, from finite losses, gradients: their global norm
        ``gradient_norm``) are not finite: the non-finite or largest losses with their weight keys
        (``DistillMixin.loss_weight_hint``), whether the weights are still finite, what to lower.
        Host syncs here are on the failure path only."""
        student = unwrap_model(self.model)
        losses = {k: float(v) for k, v in (self._last_losses.losses or {}).items()}
        hint = getattr(student, "loss_weight_hint", lambda name: None)

        def named(keys):
            return ", ".join(f"{k} = {losses[k]:.3g}" + (f" ({hint(k)})" if hint(k) else "")
                             for k in keys)

        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        broken = [n for n, p in student.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad or gradient_norm is None:
            text = (f"Loss became infinite or NaN at iteration {self.iter}: "
                    f"{named(bad) or 'the total loss'}")
        else:
            largest = sorted(losses, key=lambda k: -abs(losses[k]))[:3]
            text = (f"Gradients became infinite or NaN at iteration {self.iter} (their global norm "
                    f"is {gradient_norm}) although every loss is finite; the largest losses: "
                    f"{named(largest)}. Lower the weight named first")
        if broken:
            text += (f"; {len(broken)} parameters already hold NaN/inf (e.g. {broken[0]}): an "
                     "earlier update blew them up; lower SOLVER.BASE_LR or clip the gradients "
                     "(SOLVER.CLIP_GRADIENTS.ENABLED True, CLIP_TYPE full_model)")
        elif bad:
            size, name = max((float(p.detach().abs().max()), n)
                             for n, p in student.named_parameters() if p.numel())
            text += (f"; the weights are finite (the largest: {size:.3g}, in {name}): lower "
                     "SOLVER.BASE_LR if they grew large, else that loss's weight, or check the "
                     "input data (boxes, images)")
        last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""
        return text + (f". This step was not applied; the last checkpoint is {last}" if last
                       else ". This step was not applied")

    def train(self):
        """detectron2's ``train`` (a user error that stops it is logged in one line, not with its
        traceback: ``run_cli`` prints it); then the warnings the model gave
        (``training_warnings``) are logged again, as the run's summary, and kept in
        ``self.warnings``."""
        train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
        one_line = _OneLineUserErrors()
        train_loop_logger.addFilter(one_line)
        try:
            result = super().train()
        finally:
            train_loop_logger.removeFilter(one_line)
        self.warnings = list(getattr(unwrap_model(self.model), "training_warnings", []))
        if self.warnings and comm.is_main_process():
            logger.warning("Training finished with %d warning(s); the model it trained may be "
                           "useless:\n  %s", len(self.warnings), "\n  ".join(self.warnings))
        return result

    def resume_or_load(self, resume=True):
        """detectron2's ``resume_or_load`` (``MODEL.WEIGHTS``, or the last checkpoint of
        ``OUTPUT_DIR`` with ``resume``); a run that starts at iteration 0 then loads
        ``MODEL.BACKBONE_WEIGHTS`` into its ResNet (:mod:`csgr_distill.backbone_weights`; the
        report in ``self.backbone_loaded``); then ``MODEL.DISTILL.INHERIT_TEACHER``: a run that starts
        at iteration 0 copies the teacher's neck and head into the student (the bottom-up stays
        the student's; neck/head tensors that ``MODEL.WEIGHTS`` loaded are replaced, with a
        warning); a run resumed from a checkpoint does not (the checkpoint holds them as
        trained). Call it before ``train()``, as ``tools/train_net.py`` does."""
        student = unwrap_model(self.model)
        inherit = (getattr(student, "distill_enabled", False)
                   and self.cfg.MODEL.DISTILL.get("INHERIT_TEACHER", False))
        before = snapshot(student) if inherit else None
        super().resume_or_load(resume=resume)
        resumed = resume and self.checkpointer.has_checkpoint()
        self.backbone_loaded = None
        backbone_weights = self.cfg.MODEL.get("BACKBONE_WEIGHTS", "")
        if backbone_weights and not resumed:
            self.backbone_loaded = load_backbone_weights(student, backbone_weights)
        self.inherited = None
        if not inherit:
            return
        if resumed:
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
        mapper = DatasetMapper(cfg, is_train=True, augmentations=detr_augmentations(cfg))
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    def build_hooks(self):
        # DefaultTrainer.__init__ calls this right after making its DetectionCheckpointer: it is
        # replaced here, before the hooks (PeriodicCheckpointer) take it
        self.checkpointer = CheckedCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, what="MODEL.WEIGHTS",
            **self.checkpointer.checkpointables)
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
