#!/usr/bin/env python
"""Convert a DETR-family checkpoint into this project's layout and check that it loads strictly
into the model of ``--config-file``:

* ``--format official-detr`` (default): facebookresearch/detr's (e.g. ``detr-r50-e632da11.pth``:
  ``{"model": state_dict}``, a torchvision ResNet under ``backbone.0.body.``) -> ``Detr``;
* ``--format official-deformable-detr``: fundamentalvision/Deformable-DETR's (``transformer.*``
  renamed to transformers' modules, the decoder's ``in_proj`` split into q/k/v) ->
  ``DeformableDetr``;
* ``--format hf-deformable-detr``: a transformers ``DeformableDetrForObjectDetection`` with a
  ResNet backbone (a transformers ResNet, or a timm ResNet as the hub's
  ``SenseTime/deformable-detr*`` checkpoints): a ``save_pretrained`` folder, its
  ``model.safetensors``, or a ``.pth`` of ``model.state_dict()`` (or ``{"model": ...}``) ->
  ``DeformableDetr``; the heads ``save_pretrained`` leaves out (tied) are filled from the names
  it kept. Other backbones (timm ConvNeXt, Swin, ResNet-D, ...) cannot be converted: the port's
  backbone is a detectron2 ResNet. docs/detr_port.md has the details.


    tools/convert_detr_checkpoint.py --input detr-r50-e632da11.pth --output detr_r50_port.pth \\
        --config-file configs/detr/DETR-R50.yaml

then ``MODEL.WEIGHTS detr_r50_port.pth`` (or ``MODEL.DISTILL.TEACHER.WEIGHTS`` for a teacher).
Official COCO checkpoints score the 91 COCO category ids; with ``--coco-to-contiguous`` their
class head keeps the 80 classes in detectron2's order (``MODEL.DETR.NUM_CLASSES 80``, evaluated
by detectron2's COCO evaluator); without it the model needs ``MODEL.DETR.NUM_CLASSES 91``. A key
that does not load (missing, unexpected or of another shape) is an error naming it.
"""
import argparse
import sys

import torch
from detectron2.modeling import build_model

import csgr_distill  # noqa: F401  (registers Detr)
from csgr_distill.cli import CliError, add_debug_argument, load_config, run_cli
from csgr_distill.detr_port.convert import (coco_ids_to_contiguous, fill_shared_heads,
                                            hf_deformable_detr_to_port,
                                            official_deformable_detr_to_port,
                                            official_detr_to_port, read_state_dict)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="the checkpoint: a .pth; for hf-deformable-detr also a .safetensors file "
                        "or a save_pretrained folder")
    p.add_argument("--output", required=True, help="converted checkpoint (.pth)")
    p.add_argument("--config-file", required=True,
                   help="the Detr config the weights are for (checked by a strict load)")
    p.add_argument("--format", default="official-detr",
                   choices=["official-detr", "official-deformable-detr", "hf-deformable-detr"])
    p.add_argument("--coco-to-contiguous", action="store_true",
                   help="remap an official COCO class head (92 rows) to detectron2's 80 classes")
    add_debug_argument(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    args = p.parse_args(argv)
    try:
        state = read_state_dict(args.input)
    except (ValueError, OSError) as e:
        raise CliError(f"--input: {e}") from e
    marker = "model.backbone." if args.format == "hf-deformable-detr" else "backbone.0.body."
    if not any(k.startswith(marker) for k in state):
        raise CliError(f"--input {args.input}: not a {args.format} checkpoint (no {marker}* "
                       "keys)")
    try:
        converted = {"official-detr": official_detr_to_port,
                     "official-deformable-detr": official_deformable_detr_to_port,
                     "hf-deformable-detr": hf_deformable_detr_to_port}[args.format](state)
    except KeyError as e:
        raise CliError(f"--input {args.input}: {e.args[0]}") from e
    if args.coco_to_contiguous:
        try:
            if args.format == "official-detr":
                converted = coco_ids_to_contiguous(converted, "class_embed.")
            else:
                for prefix in ("detector.class_embed.", "detector.model.decoder.class_embed."):
                    if any(k.startswith(prefix) for k in converted):
                        converted = coco_ids_to_contiguous(converted, prefix, no_object=False)
        except ValueError as e:
            raise CliError(f"--coco-to-contiguous: {e}") from e
    cfg = load_config(args.config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"] + args.opts,
                      check_steps=False)
    model = build_model(cfg)
    own = model.state_dict()
    if args.format == "hf-deformable-detr":
        converted, from_first = fill_shared_heads(converted, own)
        if from_first and cfg.MODEL.DETR.WITH_BOX_REFINE:
            print(f"Note: {len(from_first)} head tensors of decoder layers 1.. are layer 0's: the "
                  "checkpoint has one class head for every layer (transformers >= 5 ties box "
                  "refinement's class heads when it trains and saves); the official model and "
                  "this port have one per layer, which start equal here")
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
              if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    if missing or unexpected or shapes:
        raise CliError(
            f"the converted weights do not fit {args.config_file}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {shapes[:5]} (check MODEL.DETR.* and "
            "MODEL.RESNETS.DEPTH against the checkpoint; --coco-to-contiguous for an official "
            "COCO head in an 80-class model)")
    model.load_state_dict(converted, strict=True)
    torch.save({"model": converted, "__author__": "csgr_distill convert_detr_checkpoint"},
               args.output)
    print(f"Wrote {args.output}: {len(converted)} tensors, loaded strictly into "
          f"{cfg.MODEL.META_ARCHITECTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
