#!/usr/bin/env python
"""Write a plain detectron2 student from a distillation checkpoint (and config).

    tools/export_student.py --checkpoint output/csgr_retinanet_r50_soda10m/model_0004999.pth \
        --config-file configs/CSGR-RetinaNet-R50.yaml \
        --output output/csgr_retinanet_r50_soda10m/student_plain.pth

writes ``student_plain.pth`` (the student's weights: no distiller tensors, optimizer, scheduler or
iteration; no missing or unexpected keys in the student's detectron2 base class) and, with
``--config-file`` (the distillation yaml the checkpoint was trained with, plus ``KEY VALUE``
overrides), ``student_plain.yaml`` beside it: the config plain detectron2 loads
(``get_cfg(); cfg.merge_from_file(...)``), base meta-architecture, no ``MODEL.DISTILL``,
``MODEL.WEIGHTS`` = the written checkpoint. A distillation run writes the same pair itself as
``OUTPUT_DIR/model_final_student.{pth,yaml}``. Then e.g.
``tools/train_net.py --config-file output/.../student_plain.yaml --eval-only``.
"""
import argparse

from detectron2.config import get_cfg

import csgr_distill  # noqa: F401  (registers the Distill* meta-architectures)
from csgr_distill.config import add_distill_config
from csgr_distill.export import export_student


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="where to write the plain student (.pth)")
    parser.add_argument("--config-file", default="",
                        help="the distillation yaml of the checkpoint: also write <output>.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE overrides of --config-file")
    args = parser.parse_args(argv)
    cfg = None
    if args.config_file:
        cfg = add_distill_config(get_cfg())
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    elif args.opts:
        parser.error("KEY VALUE overrides need --config-file")
    counts = export_student(args.checkpoint, args.output, cfg)
    print(f"Wrote {counts['checkpoint']}: kept {counts['kept']} student tensors, dropped "
          f"{counts['dropped']} distillation-only tensors")
    if counts["config"]:
        print(f"Wrote {counts['config']}: loads with plain detectron2's get_cfg()")
    else:
        print("No config written: pass --config-file <distillation yaml> to also write "
              "a plain detectron2 yaml beside the checkpoint")
    return counts


if __name__ == "__main__":
    main()
