#!/usr/bin/env python
"""Train or evaluate a teacher, a baseline student or a distilled student.

    tools/train_net.py --config-file configs/CSGR-RetinaNet-R50.yaml [--num-gpus 8] [KEY VALUE ...]
    tools/train_net.py --config-file configs/CSGR-RetinaNet-R50.yaml --eval-only MODEL.WEIGHTS m.pth
    tools/train_net.py --config-file ... --resume          # continue from OUTPUT_DIR/last_checkpoint

``--eval-only`` builds the student only (no teacher weights are needed) and also writes the
results to OUTPUT_DIR/eval_results.json.
"""
import json
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import csgr_distill  # noqa: F401  (registers meta-architectures, distillers, datasets)
from csgr_distill.config import add_distill_config
from csgr_distill.engine import DistillTrainer


def setup(args):
    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = DistillTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = DistillTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
                json.dump(res, f, indent=2)
        return res
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    return launch(
        main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args,),
    )


if __name__ == "__main__":
    cli()
