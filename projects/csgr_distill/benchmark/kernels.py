"""kernels: forward+backward time of each distiller's loss on realistic shapes, ours against a
straightforward implementation of the same formula (the method's own
:meth:`~csgr_distill.distillers.Distiller.reference_losses`), plus their difference.

Two kinds of input:

* losses that read only feature maps (CSGR, MIMIC, PKD, FGD, TAR's feature term on RetinaNet)
  get random p3-p7 maps of an 800x1333 input;
* losses that read head outputs (KD, LD, TAR's RoI terms, DETRDistill) get the records of one
  training forward of that method's student and teacher (random weights) on a synthetic batch
  of the same size, on the first ``overhead`` detector pair whose configs the method supports
  (its own build-time checks decide: KD on RetinaNet, LD on the distribution-head RetinaNet,
  TAR on Faster R-CNN, DETRDistill on DETR). The records' tensors are
  made leaves, so the timed backward stops at them; what a record offers as a callable (the
  teacher's RoI head for TAR's shared RoIs, the student's extra decoder pass for DETRDistill's
  query prior) runs inside the timed call, in ours and in the reference alike. An un-normalised
  random ResNet's maps reach ~1e6, so both backbones' outputs are scaled to unit std while
  recording, and the layers after the backbones are re-drawn at unit gain (detectron2's heads
  start at std 0.01, which makes every logit its prior and KD's KL ~1e-6, all rounding): the
  heads then give values in a trained network's range, and student and teacher disagree.
"""
import math
import os
from typing import Dict, List

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import Tensor

from ..config import add_distill_config
from ..distillers import DISTILLER_REGISTRY, build_distillers, fields_by_role, pair_problem
from ..layers import CrissCrossAttention
from ..layers.reference import NaiveCrissCrossAttention
from ..outputs import DetectorOutputs
from ..records import DetectorSpec
from ..teacher import REPO_ROOT, build_teacher_cfg
from . import overhead
from .common import header_lines, machine_info, markdown_table, matmul_flops, median, \
    method_variants, time_calls, write_results

LEVELS = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}


def record_detector(opts) -> str:
    """The ``overhead`` detector pair whose records feed a head-output loss: of the pairs whose
    configs support the run ``opts`` (the method's own build-time checks), the one on which it
    reads the most record fields (its whole formula: TAR's RoI terms on Faster R-CNN, not its
    feature term alone on RetinaNet); the first of equals."""
    best, most = None, -1
    for detector, (student, _) in overhead.DETECTORS.items():
        cfg = overhead.student_config(student, "cpu", opts)
        if pair_problem(cfg) is not None:
            continue
        built = build_distillers(cfg, DetectorSpec.from_cfg(cfg),
                                 DetectorSpec.from_cfg(build_teacher_cfg(cfg)))
        fields = sum(len(set(f)) for d in built.values() for f in fields_by_role(d).values())
        if fields > most:
            best, most = detector, fields
    if best is None:
        raise ValueError(f"no benchmark detector pair supports {opts}")
    return best


def fpn_shapes(height: int, width: int, divisibility: int = 32) -> Dict[str, tuple]:
    """Level -> (H, W) of an FPN on an input padded to ``divisibility`` (RetinaNet p3-p7)."""
    ph = math.ceil(height / divisibility) * divisibility
    pw = math.ceil(width / divisibility) * divisibility
    return {k: (math.ceil(ph / s), math.ceil(pw / s)) for k, s in LEVELS.items()}


def _build(name, opts, channels, num_classes, device):
    cfg = add_distill_config(get_cfg())
    # the p3-p7 maps are a RetinaNet's: its detector config
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs/Base-RetinaNet-SODA10M.yaml"))
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.merge_from_list(opts)
    shapes = {k: ShapeSpec(channels=channels, stride=s) for k, s in LEVELS.items()}
    spec = DetectorSpec.from_shapes(cfg, shapes)
    distiller = DISTILLER_REGISTRY.get(name)(cfg, spec, spec).to(device)
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


def _unit_std(leaf: bool):
    """A forward hook scaling a backbone's output maps to unit std (module docstring); with
    ``leaf`` the scaled maps are new leaves requiring grad."""
    def hook(_module, _inputs, output):
        out = {}
        for k, v in output.items():
            v = v / v.detach().std().clamp_min(1e-12)
            out[k] = v.detach().requires_grad_(True) if leaf else v
        return out
    return hook


def _unit_gain(model: torch.nn.Module, skip: torch.nn.Module) -> None:
    """Re-draw the weights of ``model``'s convolutions and linear layers outside ``skip`` (its
    backbone) with variance ``2 / fan_in`` (ReLU towers keep their scale), biases kept (a
    RetinaNet's class prior stays)."""
    inside = {id(m) for m in skip.modules()}
    with torch.no_grad():
        for m in model.modules():
            if id(m) not in inside and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def _as_leaves(x, leaves: List[Tensor]):
    """``x`` (a tensor, or lists/tuples/dicts of them) with every tensor that requires grad
    replaced by a leaf copy (kept when already a leaf); the leaves are appended to ``leaves``."""
    if isinstance(x, Tensor):
        if not x.requires_grad:
            return x
        if not x.is_leaf:
            x = x.detach().requires_grad_(True)
        leaves.append(x)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_as_leaves(v, leaves) for v in x)
    if isinstance(x, dict):
        return {k: _as_leaves(v, leaves) for k, v in x.items()}
    return x


def recorded_inputs(label: str, detector: str, device: str, batch: int, height: int, width: int):
    """``(distiller, student record, teacher record, gt_instances, leaves)`` of one training
    forward of ``label``'s student on the ``detector`` pair (random weights) on a synthetic
    ``batch x height x width`` batch; ``leaves``: the student tensors the loss's gradient
    reaches."""
    (variant,) = overhead.build_variants(detector, device, only=label)
    model = variant.model
    teacher = model.teacher.model
    torch.manual_seed(0)
    _unit_gain(teacher, teacher.backbone)
    _unit_gain(model, model.backbone)  # the teacher is no submodule of the student
    captured = {}

    def capture(losses, student, teacher, gt_instances):
        captured.update(student=student, teacher=teacher, gt=gt_instances)
        return losses

    model.add_distill_losses = capture  # the instance attribute shadows the method
    hooks = [model.backbone.register_forward_hook(_unit_std(leaf=True)),
             teacher.backbone.register_forward_hook(_unit_std(leaf=False))]
    try:
        with EventStorage(0):
            model(overhead.synthetic_batch(batch, height, width))
    finally:
        for h in hooks:
            h.remove()
        del model.add_distill_losses
    leaves: List[Tensor] = []
    student = captured["student"]
    for name in list(student):
        student[name] = _as_leaves(student[name], leaves)
    (distiller,) = model.distillers.values()
    return distiller, student, captured["teacher"], captured["gt"], leaves


def _compare(distiller, fns: Dict[str, object], leaves: List[Tensor], device: str,
             repeats: int, warmup: int) -> dict:
    """Losses, gradients at ``leaves``, interleaved times and matmul FLOPs of ``fns`` (``ours``
    and ``reference``, each ``() -> losses``): one row of the table."""
    def step(fn):
        def call():
            distiller.zero_grad(set_to_none=True)
            for v in leaves:
                v.grad = None
            torch.manual_seed(0)  # the same dropout in both (DETRDistill's extra decoder pass)
            losses = fn()
            # retain_graph: a record's callables reach into the recorded forward's graph
            sum(losses.values()).backward(retain_graph=True)
            return losses
        return call

    results = {}
    for key, fn in fns.items():
        losses = {k: v.detach().double() for k, v in step(fn)().items()}
        grad = torch.cat([(v.grad if v.grad is not None else torch.zeros_like(v)).flatten()
                          for v in leaves]).double()
        results[key] = {"losses": losses, "grad": grad}
    times = {key: [] for key in fns}
    for _ in range(repeats):  # interleaved, so drift affects both alike
        for key, fn in fns.items():
            times[key] += time_calls(step(fn), device, 1, warmup)
    ours, ref = results["ours"], results["reference"]
    if set(ours["losses"]) != set(ref["losses"]):
        raise AssertionError(f"ours returns {sorted(ours['losses'])}, the reference "
                             f"{sorted(ref['losses'])}")
    flops = {key: matmul_flops(step(fn)) for key, fn in fns.items()}
    return {"losses": sorted(ours["losses"]), "ours_ms": 1e3 * median(times["ours"]),
            "reference_ms": 1e3 * median(times["reference"]),
            "speedup": median(times["reference"]) / median(times["ours"]),
            "ours_gflop": flops["ours"] / 1e9, "reference_gflop": flops["reference"] / 1e9,
            "flop_ratio": flops["reference"] / flops["ours"] if flops["ours"] else float("nan"),
            # over the loss terms as one vector, like the gradient: a tiny term (KD's p7 on a
            # test-sized input, a KL of ~1e-8 that float32 cannot resolve) is not blown up
            "max_rel_diff_loss": _rel(*(torch.stack([r["losses"][k] for k in sorted(ref["losses"])])
                                        for r in (ours, ref))),
            "max_rel_diff_grad": _rel(ours["grad"], ref["grad"])}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(out_dir: str, device: str = "cpu", height: int = 800, width: int = 1333, batch: int = 2,
        channels: int = 256, num_classes: int = 6, repeats: int = 5, warmup: int = 1,
        command: str = "", methods=None) -> dict:
    """Compare every method's loss (and each variant it declares for ``kernels``; ``methods``:
    only these labels) with its straightforward reference, and the criss-cross layer with the
    naive one; write ``kernels.{json,md}`` into ``out_dir``."""
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
    gt_instances = [i.to(device) for i in gt_instances]
    rows: List[dict] = []
    for label, opts in method_variants("kernels").items():
        if methods is not None and label not in methods:
            continue
        name = opts[1][0]
        try:  # on a RetinaNet's p3-p7 maps
            distiller = _build(name, opts, channels, num_classes, device)
            features_only = all(set(f) == {"features"}
                                for f in fields_by_role(distiller).values())
        except ValueError:  # a pair the method refuses (LD, DETRDistill)
            features_only = False
        if features_only and record_detector(opts) == "RetinaNet":
            s_feats = {k: v.clone().requires_grad_(True) for k, v in feats["student"].items()}
            s_rec = DetectorOutputs("features", [(height, width)] * batch, padded,
                                    features=s_feats, feature_names=list(LEVELS))
            t_rec = DetectorOutputs("features", [(height, width)] * batch, padded,
                                    features=feats["teacher"], feature_names=list(LEVELS))
            gt_rec, leaves, inputs = gt_instances, list(s_feats.values()), "p3-p7 maps"
        else:  # head outputs: the records of a detector pair the method supports
            detector = record_detector(opts)
            distiller, s_rec, t_rec, gt_rec, leaves = recorded_inputs(label, detector, device,
                                                                       batch, height, width)
            inputs = f"{detector} records"
        if distiller.reference_losses(s_rec, t_rec, gt_rec) is None:
            rows.append({"method": label, "note": "no straightforward reference"})
            continue
        fns = {"ours": lambda d=distiller, s=s_rec, t=t_rec, g=gt_rec: d(s, t, g),
               "reference": lambda d=distiller, s=s_rec, t=t_rec, g=gt_rec:
               d.reference_losses(s, t, g)}
        with EventStorage(0):
            row = _compare(distiller, fns, leaves, device, repeats, warmup)
        rows.append({"method": label, "inputs": inputs, **row})

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
               "speed-up of matmul-bound code); head-output losses: the records of their "
               "detector pair (random weights, backbone maps at unit std, heads at unit gain) on a "
               "synthetic batch of that input size; max rel diff: the largest absolute difference "
               "over the largest absolute value, of the loss terms and of the gradient")
    table = markdown_table(
        ["loss", "inputs", "ours (ms)", "straightforward (ms)", "speed-up", "matmul GFLOP ours",
         "matmul GFLOP straightforward", "FLOP ratio", "max rel diff (loss)",
         "max rel diff (grad)"],
        [[r["method"], r.get("inputs", "-"), r.get("ours_ms", "-"), r.get("reference_ms", "-"),
          r.get("speedup", "-"), r.get("ours_gflop", "-"), r.get("reference_gflop", "-"),
          r.get("flop_ratio", "-"),
          r.get("max_rel_diff_loss", "-"), r.get("max_rel_diff_grad", "-")] for r in rows])
    md = header_lines(f"kernels ({device})", info, command) + "\n" + setting + "\n\n" + table
    payload = {"machine": info, "setting": setting, "rows": rows}
    write_results(out_dir, "kernels", device, payload, md)
    return payload
