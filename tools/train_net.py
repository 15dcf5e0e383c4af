#!/usr/bin/env python
"""Train or evaluate a teacher, a baseline student or a distilled student.

    tools/train_net.py --config-file configs/CSGR-RetinaNet-R50.yaml [--num-gpus 8] [KEY VALUE ...]
    tools/train_net.py --config-file configs/CSGR-RetinaNet-R50.yaml --eval-only MODEL.WEIGHTS m.pth
    tools/train_net.py --config-file ... --resume          # continue from OUTPUT_DIR/last_checkpoint
    tools/train_net.py --config-file CONFIG --register-dataset mine_train=coco:train.json:images \
        --register-dataset mine_val=voc:VOC:val DATASETS.TRAIN "('mine_train',)" ...
    tools/train_net.py --config-file CSGR.yaml --teacher-check output/baseline  # teacher vs baseline

Every ``DATASETS.TRAIN``/``DATASETS.TEST`` name is checked (registered, files on disk) before
anything is trained or evaluated. A distillation run ends with
``OUTPUT_DIR/model_final_student.{pth,yaml}``, a plain detectron2 checkpoint and config, and
every training run with its final evaluation in ``OUTPUT_DIR/eval_results.json`` (``tools/compare.py``
tabulates runs). The config is read by :func:`csgr_distill.config.load_config`: the user's own
datasets (``DATASETS.REGISTER`` or ``--register-dataset``), ``INPUT.FIXED_SIZE``, steps as
fractions of ``SOLVER.MAX_ITER``.

``--eval-only`` builds the student with ``MODEL.DISTILL.ENABLED False``: nothing of the teacher is
read (neither its yaml nor its weights), and the ``distillers.*`` tensors of a training checkpoint
are dropped with one info line. It also writes the results to ``OUTPUT_DIR/eval_results.json``
(strict JSON: an AP without a value, e.g. APl when no object is large, is ``null``).

``--resume`` restores the weights (distillers included), optimizer, LR scheduler and iteration, but
not the data order, random states or RetinaNet's loss-normaliser EMA: the resumed run is not
bit-identical to an uninterrupted one (see ``DistillTrainer``).

A known user error (a missing dataset, teacher yaml or checkpoint, an unknown method or config key)
prints one ``error: ...`` message and exits with code 2; ``--debug`` (or ``CSGR_DEBUG=1``) shows
the traceback instead (``csgr_distill.cli``). Checked before anything is built: ``--num-gpus``
against the GPUs of the machine, ``MODEL.DEVICE``, ``SOLVER.AMP.ENABLED`` (CUDA only), a
writable ``OUTPUT_DIR``. The flags may also follow the ``KEY VALUE`` overrides. Warnings that make
the trained model doubtful are repeated at the end of training and written into
``eval_results.json`` (``"warnings"``).
"""
import json
import math
import os
import sys

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import csgr_distill  # noqa: F401  (registers meta-architectures, distillers, datasets)
from csgr_distill.checkpoint import atomic_open
from csgr_distill.cli import (ReportUserErrors, add_debug_argument, load_config,
                              parse_args_anywhere, run_cli)
from csgr_distill.data import add_dataset_arguments, register_from_cfg
from csgr_distill.data.errors import check_datasets
from csgr_distill.engine import DistillTrainer
from csgr_distill.engine.checks import check_device, check_output_dir, check_processes
from csgr_distill.export import StudentCheckpointer, without_distillation
from csgr_distill.evaluation.teacher_check import read_metric, teacher_check


def setup(args):
    cfg = load_config(args.config_file, args.opts, args.register_dataset, register_datasets=False)
    cfg.freeze()
    check_device(cfg, training=not args.eval_only, world_size=comm.get_world_size())
    if comm.is_main_process():
        check_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    # this project's own info lines (exports, dropped tensors) on the console and in
    # OUTPUT_DIR/log.txt, like detectron2's; still propagated, so handlers on the root logger
    # (pytest's caplog, an application's own logging) see them too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="csgr_distill",
                 abbrev_name="csgr").propagate = True
    # the user's datasets, registered once the loggers are set up: their "Registered dataset"
    # lines and warnings reach the console and log.txt
    register_from_cfg(cfg)
    return cfg


def strict_json(value):
    """``value`` with every NaN/inf float as None, so ``json.dump(allow_nan=False)`` writes
    strict JSON (``null``; COCO's AP of a size no object has, e.g. APl on shapes, is NaN)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(args):
    cfg = setup(args)
    if args.eval_only:
        cfg = without_distillation(cfg)  # the student alone, as evaluation needs it
        check_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")
        model = DistillTrainer.build_model(cfg)
        StudentCheckpointer(model, save_dir=cfg.OUTPUT_DIR, what="MODEL.WEIGHTS").resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = DistillTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            write_eval_results(cfg, res)
        return res
    if args.teacher_check is not None:
        run_teacher_check(cfg, args.teacher_check)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # detectron2 returns the final evaluation only with TEST.EXPECTED_RESULTS; it keeps it here
    res = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process() and res:
        # the final evaluation, as --eval-only writes it, with the run's warnings
        write_eval_results(cfg, res, trainer.warnings)
    return res


def write_eval_results(cfg, res, warnings=()):
    """``OUTPUT_DIR/eval_results.json``: the evaluation results, strict JSON; ``warnings`` (the
    training's, e.g. a distillation loss that dwarfed the detection losses) as ``"warnings"``."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    res = dict(res, warnings=list(warnings)) if warnings else res
    with atomic_open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
        json.dump(strict_json(res), f, indent=2, allow_nan=False)


def run_teacher_check(cfg, baseline: str):
    """``--teacher-check [BASELINE]``: evaluate the teacher on ``DATASETS.TEST[0]`` before
    training and warn loudly when it does not beat ``BASELINE`` (the baseline student's bbox AP:
    a number, its ``eval_results.json`` or the OUTPUT_DIR holding it)."""
    if not cfg.MODEL.DISTILL.ENABLED:
        raise ValueError("--teacher-check needs a distillation config (MODEL.DISTILL.ENABLED "
                         "True with a teacher); this config trains without a teacher")
    baseline_ap = None
    if baseline:
        try:
            baseline_ap = float(baseline)
        except ValueError:
            baseline_ap = read_metric(baseline)
    if comm.is_main_process():
        teacher_check(cfg, baseline_ap=baseline_ap)


def cli(argv=None):
    """Parse ``argv`` and train or evaluate; exceptions propagate (``run_cli`` turns the known
    user errors into one message). With more than one process each worker reports its own user
    error (``ReportUserErrors``) and exits with code 2."""
    parser = add_dataset_arguments(add_debug_argument(default_argument_parser()))
    parser.add_argument(
        "--teacher-check", nargs="?", const="", default=None, metavar="BASELINE",
        help="before distilling, evaluate the teacher on DATASETS.TEST[0] and warn loudly when "
             "it does not beat BASELINE: the baseline student's bbox AP, its eval_results.json "
             "or its OUTPUT_DIR (without BASELINE: the teacher's AP is logged)")
    args = parse_args_anywhere(parser, argv)
    print("Command Line Args:", args)
    check_processes(args.num_gpus)
    processes = args.num_gpus * args.num_machines
    return launch(
        main if processes == 1 else ReportUserErrors(main), args.num_gpus,
        num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    sys.exit(run_cli(cli))
