#!/usr/bin/env python
"""Measure every registered distiller: accuracy gain, training overhead, loss kernels.

    tools/benchmark.py all                    # the three parts with their defaults
    tools/benchmark.py gain [--seeds 3] [--iters 600] [--methods CSGR ...] [--variant 'L=K V']
    tools/benchmark.py overhead [--device cuda] [--height 800 --width 1333] [--batch 2]
    tools/benchmark.py kernels [--device cuda] [--repeats 5]

Each part writes results/<part>.json and results/<part>.md (+ PNG plots for gain); sections for
other devices/detectors already in those files are kept. While gain trains, detectron2's
periodic lines (iteration, losses, ETA) of the current run are shown; each run's whole output is
in its train.log. A known user error prints one message (``--debug``: the traceback). Defaults fit the 2-core CPU machine:
gain ~1 h (teacher once + 3 seeds x {baseline, each method, CSGR options}), overhead ~30 min
(512x640, batch 2, three detector pairs), kernels ~20 min (800x1333 -> p3..p7, batch 2).
"""
import argparse
import os
import shlex
import sys
import time

import csgr_distill  # noqa: F401  (registers distillers, meta-architectures, datasets)
from csgr_distill.benchmark import gain, kernels, overhead
from csgr_distill.cli import add_debug_argument, run_cli
from csgr_distill.data import add_dataset_arguments, pipeline_overrides
from csgr_distill.teacher import REPO_ROOT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["gain", "overhead", "kernels", "all"])
    p.add_argument("--results", default=os.path.join(REPO_ROOT, "results"),
                   help="folder of the result tables and plots")
    p.add_argument("--work-dir", default=os.path.join(REPO_ROOT, "output", "benchmark"),
                   help="gain: checkpoints and logs of every run (finished runs are reused)")
    p.add_argument("--device", default="cpu", help="overhead/kernels: cpu or cuda")
    g = p.add_argument_group("gain")
    g.add_argument("--seeds", type=int, default=3)
    g.add_argument("--first-seed", type=int, default=0,
                   help="seeds --first-seed .. --first-seed + --seeds - 1 (e.g. add seeds 1-2 to a "
                        "seed-0 run whose work folder is gone: --first-seed 1 --seeds 2)")
    g.add_argument("--iters", type=int, default=None, help="student iterations (default: their config, 600)")
    g.add_argument("--teacher-iters", type=int, default=None, help="default: its config (2000)")
    g.add_argument("--teacher-weights", default=None, help="reuse a trained demo teacher")
    g.add_argument("--methods", nargs="*", default=None,
                   help="labels to run (gain: besides the baseline; overhead: besides the "
                        "student and the floor; kernels: these only). Default: every registered "
                        "method and the variants it declares that the pair supports; "
                        "'--methods' alone: none (e.g. with --variant)")
    g.add_argument("--variant", action="append", default=[], metavar="'LABEL=KEY VALUE ...'",
                   help="an extra student run with these config overrides (repeatable), e.g. "
                        "--variant 'CSGR weights x4=MODEL.DISTILL.CSGR.ALPHA 2e-3 "
                        "MODEL.DISTILL.CSGR.BETA 4e-5'")
    add_dataset_arguments(g)
    g.add_argument("--train", default=None, metavar="NAME",
                   help="train teacher and students on this dataset (default shapes_train); the "
                        "class count follows its classes")
    g.add_argument("--test", default=None, metavar="NAME",
                   help="evaluate on this dataset (default shapes_val)")
    g.add_argument("--detector", default="retinanet", choices=list(gain.DETECTORS),
                   help="the demo detector pair: RetinaNet (default), Faster R-CNN (rcnn: adds "
                        "TAR's ablation and CSGR+TAR heads) or RetinaNet with the distribution "
                        "box branch (retinanet-dist: the pair LD needs, with CSGR+LD, FGD+LD), "
                        "DETR or Deformable DETR (detr, deformable-detr: with DETRDistill's "
                        "ablation and DETRDistill+CSGR)")
    g.add_argument("--no-teacher-check", action="store_true",
                   help="skip the teacher check (after the first baseline run: a loud warning "
                        "when the teacher does not beat the baseline student)")
    g.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="overrides for every run (teacher and students), e.g. --opts "
                        "INPUT.FIXED_SIZE 256; the results get their own section and plots, "
                        "named after them")
    o = p.add_argument_group("overhead / kernels")
    o.add_argument("--height", type=int, default=None,
                   help="input height (default: overhead 512, kernels 800)")
    o.add_argument("--width", type=int, default=None,
                   help="input width (default: overhead 640, kernels 1333)")
    o.add_argument("--batch", type=int, default=2)
    o.add_argument("--repeats", type=int, default=None,
                   help="timed repeats (default: overhead 8, kernels 5)")
    o.add_argument("--detectors", nargs="*", default=list(overhead.DEFAULT_DETECTORS),
                   choices=list(overhead.DETECTORS))
    add_debug_argument(p)
    args = p.parse_args(argv)
    if args.teacher_weights and not os.path.isfile(args.teacher_weights):
        raise FileNotFoundError(f"--teacher-weights {args.teacher_weights!r} does not exist: give "
                                "a trained demo teacher (e.g. output/demo/teacher/model_final.pth)"
                                " or leave it out to train one")
    return args


def main(argv=None):
    args = parse_args(argv)
    command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    t0 = time.time()

    def log(msg):
        print(f"[{(time.time() - t0) / 60:5.1f} min] {msg}", flush=True)

    parts = ["kernels", "overhead", "gain"] if args.part == "all" else [args.part]
    for part in parts:
        log(f"{part} ...")
        if part == "kernels":
            kernels.run(args.results, device=args.device, height=args.height or 800,
                        width=args.width or 1333, batch=args.batch, repeats=args.repeats or 5,
                        command=command, methods=args.methods)
        elif part == "overhead":
            overhead.run(args.results, device=args.device, height=args.height or 512,
                         width=args.width or 640, batch=args.batch, repeats=args.repeats or 8,
                         detectors=args.detectors, command=command, methods=args.methods)
        else:
            gain.run(args.results, args.work_dir, seeds=args.seeds, first_seed=args.first_seed,
                     iters=args.iters,
                     teacher_iters=args.teacher_iters, teacher_weights=args.teacher_weights,
                     methods=args.methods,
                     variants=dict(gain.parse_variant(v) for v in args.variant),
                     command=command, progress=log,
                     data_opts=pipeline_overrides(args.register_dataset, args.train, args.test),
                     opts=args.opts,
                     check_teacher=not args.no_teacher_check, detector=args.detector)
        log(f"{part} done -> {os.path.join(args.results, part)}.md")
        print(open(os.path.join(args.results, f"{part}.md")).read())


if __name__ == "__main__":
    sys.exit(run_cli(main))
