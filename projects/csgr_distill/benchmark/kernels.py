"""kernels: forward+backward time of each distiller's loss on realistic FPN shapes, ours against a
straightforward implementation of the same formula (``references.py``), plus their difference."""
import math
import os
from typing import Dict, List

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances

from ..config import add_distill_config
from ..distillers import DISTILLER_REGISTRY
from ..distillers.registry import fields_by_role
from ..layers import CrissCrossAttention
from ..layers.reference import NaiveCrissCrossAttention
from ..outputs import DetectorOutputs
from ..teacher import REPO_ROOT
from .common import header_lines, machine_info, markdown_table, matmul_flops, median, \
    method_variants, time_calls, write_results
from .references import REFERENCE_LOSSES, GroundTruth

LEVELS = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


def fpn_shapes(height: int, width: int, divisibility: int = 32) -> Dict[str, tuple]:
    """Level -> (H, W) of an FPN on an input padded to ``divisibility`` (RetinaNet p3-p7)."""
    ph = math.ceil(height / divisibility) * divisibility
    pw = math.ceil(width / divisibility) * divisibility
    return {k: (math.ceil(ph / s), math.ceil(pw / s)) for k, s in LEVELS.items()}


def _build(name, opts, channels, num_classes, device):
    cfg = add_distill_config(get_cfg())
    # the p3-p7 maps are a RetinaNet's: its detector config (e.g. TAR without RoI terms)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/Base-RetinaNet-SODA10M.yaml"))
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.merge_from_list(opts)
    shapes = {k: ShapeSpec(channels=channels, stride=s) for k, s in LEVELS.items()}
    distiller = DISTILLER_REGISTRY.get(name)(cfg, shapes, shapes).to(device)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained state: CSGR's gamma and FGD's zero-initialised GC convs
        for p in distiller.parameters():  # != 0, so every term matters
            if p.numel() == 1:
                p.fill_(0.5)
            elif not p.any():
                p.normal_(0.0, 0.01)
    return distiller


def synthetic_boxes(height: int, width: int, batch: int, per_image: int, generator,
                    num_classes: int) -> List[Instances]:
    """Per image ``per_image`` random ground-truth boxes (8 to 50 % of each side, classes at
    random) as the detectors' training forward receives them, for the losses that read boxes."""
    out = []
    for _ in range(batch):
        size = torch.rand(per_image, 2, generator=generator) * 0.42 + 0.08
        wh = size * torch.tensor([width, height])
        xy = torch.rand(per_image, 2, generator=generator) * (torch.tensor([width, height]) - wh)
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(num_classes, (per_image,), generator=generator)
        out.append(inst)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(out_dir: str, device: str = "cpu", height: int = 800, width: int = 1333, batch: int = 2,
        channels: int = 256, num_classes: int = 6, repeats: int = 5, warmup: int = 1,
        command: str = "") -> dict:
    sizes = fpn_shapes(height, width)
    padded = (math.ceil(height / 32) * 32, math.ceil(width / 32) * 32)
    g = torch.Generator().manual_seed(0)
    feats = {
        role: {k: torch.randn(batch, channels, h, w, generator=g).to(device) for k, (h, w) in
               sizes.items()}
        for role in ("student", "teacher")
    }
    # ground truth for the methods that read boxes (FGD's masks): 8 boxes per image
    gt_instances = synthetic_boxes(height, width, batch, 8, g, num_classes)
    gt = GroundTruth([i.gt_boxes.tensor for i in gt_instances], [(height, width)] * batch,
                     padded)
    gt_instances = [i.to(device) for i in gt_instances]
    rows: List[dict] = []
    for label, opts in method_variants().items():
        name = opts[1][0]
        if name not in REFERENCE_LOSSES:
            rows.append({"method": label, "note": "no straightforward reference registered"})
            continue
        distiller = _build(name, opts, channels, num_classes, device)
        if any(set(f) != {"features"} for f in fields_by_role(distiller).values()):
            continue  # the loss kernel needs detector head outputs (e.g. teacher_head): skipped
        s_feats = {k: v.clone().requires_grad_(True) for k, v in feats["student"].items()}
        s_out = DetectorOutputs("features", [(height, width)] * batch, padded,
                                features=s_feats, feature_names=list(LEVELS))
        t_out = DetectorOutputs("features", [(height, width)] * batch, padded,
                                features=feats["teacher"], feature_names=list(LEVELS))

        def ours():
            return distiller(s_out, t_out, gt_instances)

        def reference():
            return REFERENCE_LOSSES[name](distiller, s_feats, feats["teacher"], gt)

        results = {}
        for key, fn in (("ours", ours), ("reference", reference)):
            distiller.zero_grad(set_to_none=True)
            for v in s_feats.values():
                v.grad = None
            losses = fn()
            sum(losses.values()).backward()
            results[key] = {
                "losses": {k: v.detach().double() for k, v in losses.items()},
                "grad": torch.cat([s_feats[k].grad.flatten() for k in LEVELS]).double(),
            }

        def step(fn):
            def call():
                distiller.zero_grad(set_to_none=True)
                sum(fn().values()).backward()
            return call

        t_ours, t_ref = [], []
        for _ in range(repeats):  # interleaved, so drift affects both alike
            t_ours += time_calls(step(ours), device, 1, warmup)
            t_ref += time_calls(step(reference), device, 1, warmup)
        loss_rel = max(_rel(results["ours"]["losses"][k], results["reference"]["losses"][k])
                       for k in results["ours"]["losses"])
        grad_rel = _rel(results["ours"]["grad"], results["reference"]["grad"])
        flops = {"ours": matmul_flops(step(ours)), "reference": matmul_flops(step(reference))}
        rows.append({"method": label, "ours_ms": 1e3 * median(t_ours),
                     "reference_ms": 1e3 * median(t_ref),
                     "speedup": median(t_ref) / median(t_ours),
                     "ours_gflop": flops["ours"] / 1e9, "reference_gflop": flops["reference"] / 1e9,
                     "flop_ratio": flops["reference"] / flops["ours"] if flops["ours"] else float("nan"),
                     "max_rel_diff_loss": loss_rel, "max_rel_diff_grad": grad_rel})

    # the criss-cross layer alone, at the largest level
    h, w = sizes["p3"]
    x = torch.randn(batch, channels, h, w, generator=g).to(device).requires_grad_(True)
    layer = CrissCrossAttention(channels).to(device)
    naive = NaiveCrissCrossAttention(channels).to(device)
    naive.load_state_dict(layer.state_dict())
    with torch.no_grad():
        layer.gamma.fill_(0.5)
        naive.gamma.fill_(0.5)
    cc = {"ours": [], "reference": []}
    for _ in range(repeats):
        for key, mod in (("ours", layer), ("reference", naive)):
            cc[key] += time_calls(lambda m=mod: m(x).pow(2).sum().backward(), device, 1, warmup)
    with torch.no_grad():
        cc_rel = _rel(layer(x).double(), naive(x).double())
    cc_flops = {key: matmul_flops(lambda m=mod: m(x).pow(2).sum().backward())
                for key, mod in (("ours", layer), ("reference", naive))}
    rows.append({"method": f"criss-cross layer alone (p3 {h}x{w})",
                 "ours_ms": 1e3 * median(cc["ours"]), "reference_ms": 1e3 * median(cc["reference"]),
                 "speedup": median(cc["reference"]) / median(cc["ours"]),
                 "ours_gflop": cc_flops["ours"] / 1e9, "reference_gflop": cc_flops["reference"] / 1e9,
                 "flop_ratio": cc_flops["reference"] / cc_flops["ours"],
                 "max_rel_diff_loss": cc_rel, "max_rel_diff_grad": float("nan")})

    info = machine_info(device)
    setting = (f"input {height}x{width} (p3..p7 = "
               + ", ".join(f"{h}x{w}" for h, w in sizes.values())
               + f"), batch {batch}, {channels} channels, K={num_classes}, forward+backward, "
               f"median of {repeats} interleaved repeats; matmul GFLOP: forward+backward "
               "matrix products counted by torch.utils.flop_counter (the FLOP ratio bounds the "
               "speed-up of matmul-bound code)")
    table = markdown_table(
        ["loss", "ours (ms)", "straightforward (ms)", "speed-up", "matmul GFLOP ours",
         "matmul GFLOP straightforward", "FLOP ratio", "max rel diff (loss)",
         "max rel diff (grad)"],
        [[r["method"], r.get("ours_ms", "-"), r.get("reference_ms", "-"), r.get("speedup", "-"),
          r.get("ours_gflop", "-"), r.get("reference_gflop", "-"), r.get("flop_ratio", "-"),
          r.get("max_rel_diff_loss", "-"), r.get("max_rel_diff_grad", "-")] for r in rows])
    md = header_lines(f"kernels ({device})", info, command) + "\n" + setting + "\n\n" + table
    payload = {"machine": info, "setting": setting, "rows": rows}
    write_results(out_dir, "kernels", device, payload, md)
    return payload
