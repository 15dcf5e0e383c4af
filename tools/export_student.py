#!/usr/bin/env python
"""Write a plain detectron2 student from a distillation checkpoint (and config).

    tools/export_student.py --checkpoint output/csgr_retinanet_r50_soda10m/model_0004999.pth \\
        --config-file configs/CSGR-RetinaNet-R50.yaml \\
        --output output/csgr_retinanet_r50_soda10m/student_plain.pth [--format torchscript]

writes ``student_plain.pth`` (the student's weights: no distiller tensors, optimizer, scheduler or
iteration; no missing or unexpected keys in the student's detectron2 base class) and, with
``--config-file`` (the distillation yaml the checkpoint was trained with, plus ``KEY VALUE``
overrides), ``student_plain.yaml`` beside it: the config plain detectron2 loads
(``get_cfg(); cfg.merge_from_file(...)``), base meta-architecture, no ``MODEL.DISTILL``,
``MODEL.WEIGHTS`` = the written checkpoint. A distillation run writes the same pair itself as
``OUTPUT_DIR/model_final_student.{pth,yaml}``. Then e.g.
``tools/train_net.py --config-file output/.../student_plain.yaml --eval-only``.

``--format torchscript`` (needs ``--config-file``) also writes ``student_plain.ts``: the student
traced on the CPU with detectron2's ``TracingAdapter`` (RetinaNet and Faster R-CNN students),
checked to return exactly the eager model's boxes, scores and classes on a sample image
(``--sample-image``, default the first image of ``DATASETS.TEST[0]``). It runs with torch and
torchvision alone: ``import torchvision; m = torch.jit.load("student_plain.ts");
boxes, scores, classes = m(image)`` with ``image`` a float ``[3, H, W]`` tensor in the config's
``INPUT.FORMAT``, resized as in testing; the file's ``interface.txt`` says so in full.
"""
import argparse
import os
import sys

import csgr_distill  # noqa: F401  (registers the Distill* meta-architectures)
from csgr_distill.checkpoint import read_checkpoint
from csgr_distill.cli import add_debug_argument, load_config, parse_args_anywhere, run_cli
from csgr_distill.data import add_dataset_arguments
from csgr_distill.export import export_student, export_torchscript


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="where to write the plain student (.pth)")
    parser.add_argument("--config-file", default="",
                        help="the distillation yaml of the checkpoint: also write <output>.yaml")
    parser.add_argument("--format", choices=["checkpoint", "torchscript"], default="checkpoint",
                        help="torchscript: also write <output>.ts, the traced student")
    parser.add_argument("--sample-image", default=None,
                        help="torchscript: the image to trace and check with (default: the first "
                             "of DATASETS.TEST[0], else a random image of the test size)")
    add_debug_argument(parser)
    add_dataset_arguments(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE overrides of --config-file")
    args = parse_args_anywhere(parser, argv)
    cfg = None
    if args.config_file:
        cfg = load_config(args.config_file, args.opts, args.register_dataset, check_steps=False)
    elif args.opts:
        parser.error("KEY VALUE overrides need --config-file")
    elif args.format == "torchscript":
        parser.error("--format torchscript needs --config-file (the model is built from it)")
    counts = export_student(args.checkpoint, args.output, cfg)
    print(f"Wrote {counts['checkpoint']}: kept {counts['kept']} student tensors, dropped "
          f"{counts['dropped']} distillation-only tensors")
    if counts["config"]:
        print(f"Wrote {counts['config']}: loads with plain detectron2's get_cfg()")
    else:
        print("No config written: pass --config-file <distillation yaml> to also write "
              "a plain detectron2 yaml beside the checkpoint")
    if args.format == "torchscript":
        state = read_checkpoint(counts["checkpoint"])["model"]
        ts_path = os.path.splitext(counts["checkpoint"])[0] + ".ts"
        traced = export_torchscript(state, cfg, ts_path, args.sample_image)
        counts["torchscript"] = traced["torchscript"]
        h, w = traced["sample"]
        print(f"Wrote {traced['torchscript']}: traced on a {h}x{w} image, same {traced['detections']}"
              " detections as the eager model. Its interface:")
        print(traced["interface"].rstrip())
    return counts


if __name__ == "__main__":
    sys.exit(run_cli(main))
