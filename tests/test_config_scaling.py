"""Derived config keys (INPUT.FIXED_SIZE, SOLVER.STEPS as fractions of MAX_ITER) and the
command-line form of MODEL.DISTILL.TEACHER.OPTS."""
import os

import pytest
from detectron2.config import get_cfg

from csgr_distill.config import (
    add_distill_config,
    apply_derived_keys,
    check_teacher_opts,
    merge_command_line,
    scale_schedule,
)
from tiny import REPO

DEMO = os.path.join(REPO, "configs", "demo")


def _demo(name, opts=()):
    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(os.path.join(DEMO, name))
    merge_command_line(cfg, list(opts))
    return apply_derived_keys(cfg)


def test_demo_defaults_are_unchanged():
    student = _demo("student-RetinaNet-R18.yaml")
    teacher = _demo("teacher-RetinaNet-R18-wide.yaml")
    assert (student.SOLVER.MAX_ITER, student.SOLVER.STEPS) == (600, (480, 570))
    assert (teacher.SOLVER.MAX_ITER, teacher.SOLVER.STEPS) == (2000, (1600, 1900))
    for cfg in (student, teacher):
        assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST,
                cfg.INPUT.MAX_SIZE_TEST) == ((128,), 128, 128, 128)
        assert cfg.INPUT.FIXED_SIZE == 0 and cfg.DATASETS.REGISTER == []


def test_steps_as_fractions_follow_max_iter():
    cfg = _demo("student-RetinaNet-R18.yaml", ["SOLVER.STEPS", "(0.8, 0.95)"])
    assert cfg.SOLVER.STEPS == (480, 570)  # the demo's steps at its 600 iterations
    cfg = _demo("student-RetinaNet-R18.yaml",
                ["SOLVER.STEPS", "(0.8, 0.95)", "SOLVER.MAX_ITER", "1000"])
    assert cfg.SOLVER.STEPS == (800, 950)
    cfg = _demo("teacher-RetinaNet-R18-wide.yaml", ["SOLVER.STEPS", "(0.8, 0.95)"])
    assert cfg.SOLVER.STEPS == (1600, 1900)
    assert scale_schedule(cfg).SOLVER.STEPS == (1600, 1900)  # a second call changes nothing
    # a tiny run: steps on iteration 0 or repeated are dropped
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 2, (0.3, 0.8, 0.95)
    assert scale_schedule(cfg).SOLVER.STEPS == (1,)


def test_steps_beyond_max_iter_are_an_error_naming_both():
    # the demo configs give fractions, so a shorter MAX_ITER just moves the steps
    assert _demo("student-RetinaNet-R18.yaml", ["SOLVER.MAX_ITER", "500"]).SOLVER.STEPS == (400, 475)
    with pytest.raises(ValueError) as e:
        _demo("student-RetinaNet-R18.yaml", ["SOLVER.STEPS", "(480, 570)", "SOLVER.MAX_ITER", "500"])
    msg = str(e.value)
    assert msg.startswith("SOLVER.STEPS (480, 570) has steps at or beyond SOLVER.MAX_ITER 500 "
                          "(570)")
    assert 'SOLVER.STEPS "(0.8, 0.95)"' in msg and 'SOLVER.STEPS "(400, 475)"' in msg
    with pytest.raises(ValueError, match="mixes fractions"):
        _demo("student-RetinaNet-R18.yaml", ["SOLVER.STEPS", "(0.5, 570)"])
    # other schedulers do not read the steps; a teacher config is not checked
    cfg = _demo("student-RetinaNet-R18.yaml", ["SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR",
                                               "SOLVER.STEPS", "(480, 570)", "SOLVER.MAX_ITER", "100"])
    assert cfg.SOLVER.STEPS == (480, 570)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    apply_derived_keys(cfg, check_steps=False)


def test_trainer_scheduler_reads_fractional_steps_as_iterations():
    """A config that skipped load_config (e.g. built in Python) still decays where it says: the
    trainer's scheduler converts fractions itself instead of dropping the lr at iteration 0."""
    from csgr_distill.engine import DistillTrainer
    from torch import nn

    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(os.path.join(DEMO, "student-RetinaNet-R18.yaml"))  # raw: (0.8, 0.95)
    opt = DistillTrainer.build_optimizer(cfg, nn.Linear(2, 2))
    sched = DistillTrainer.build_lr_scheduler(cfg, opt)
    multi = sched._multiplier._schedulers[1]  # warm-up, then the multi-step
    assert list(multi._milestones) == [480, 570]


def test_fixed_size_sets_the_four_input_keys():
    cfg = _demo("student-RetinaNet-R18.yaml", ["INPUT.FIXED_SIZE", "200"])
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST,
            cfg.INPUT.MAX_SIZE_TEST) == ((200,), 200, 200, 200)
    cfg.freeze()
    apply_derived_keys(cfg)  # frozen: nothing to change, and it stays frozen
    assert cfg.is_frozen()
    with pytest.raises(ValueError, match="INPUT.FIXED_SIZE is -1"):
        _demo("student-RetinaNet-R18.yaml", ["INPUT.FIXED_SIZE", "-1"])


def test_teacher_opts_on_the_command_line_shows_the_exact_form():
    cfg = add_distill_config(get_cfg())
    with pytest.raises(ValueError) as e:  # yacs: "Override list has odd length"
        merge_command_line(cfg, ["MODEL.DISTILL.TEACHER.OPTS", "MODEL.RETINANET.NUM_CLASSES", "1"])
    assert "MODEL.DISTILL.TEACHER.OPTS \"['MODEL.RETINANET.NUM_CLASSES', 1]\"" in str(e.value)
    with pytest.raises(ValueError) as e:  # even length, yacs: "Type mismatch"
        merge_command_line(cfg, ["MODEL.DISTILL.TEACHER.OPTS", "MODEL.RETINANET.NUM_CLASSES", "3",
                                 "SOLVER.BASE_LR"])
    assert "MODEL.DISTILL.TEACHER.OPTS \"['MODEL.RETINANET.NUM_CLASSES', 3]\"" in str(e.value)
    merge_command_line(cfg, ["SOLVER.BASE_LR", "0.5", "MODEL.DISTILL.TEACHER.OPTS",
                             "['MODEL.RETINANET.NUM_CLASSES', 1]"])
    assert cfg.MODEL.DISTILL.TEACHER.OPTS == ["MODEL.RETINANET.NUM_CLASSES", 1]
    assert cfg.SOLVER.BASE_LR == 0.5
    assert check_teacher_opts(cfg.MODEL.DISTILL.TEACHER.OPTS) == ["MODEL.RETINANET.NUM_CLASSES", 1]
    with pytest.raises(ValueError, match=r"\"\['MODEL.ROI_HEADS.NUM_CLASSES', 4\]\""):
        check_teacher_opts(["MODEL.ROI_HEADS.NUM_CLASSES", 4, "SOLVER.BASE_LR"])
