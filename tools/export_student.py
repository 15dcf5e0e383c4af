#!/usr/bin/env python
"""Write a student checkpoint that a plain detectron2 config loads with no missing/unexpected keys.

    tools/export_student.py --checkpoint output/csgr_retinanet_r50_soda10m/model_final.pth \
        --output output/csgr_retinanet_r50_soda10m/student_plain.pth

Drops the distillers' parameters (adapters, classifiers, attention blocks) and the optimizer,
scheduler and iteration. Then e.g.
``tools/train_net.py --config-file configs/baselines/RetinaNet-R50-SODA10M.yaml --eval-only
MODEL.WEIGHTS .../student_plain.pth``.
"""
import argparse

from csgr_distill.export import export_student


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="where to write the plain student")
    args = parser.parse_args(argv)
    counts = export_student(args.checkpoint, args.output)
    print(f"Wrote {args.output}: kept {counts['kept']} student tensors, dropped "
          f"{counts['dropped']} distillation-only tensors")
    return counts


if __name__ == "__main__":
    main()
