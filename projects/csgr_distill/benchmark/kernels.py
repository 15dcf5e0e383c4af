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

Each row also counts the ATen operators one forward + backward dispatches, ours and the
reference's (:mod:`~csgr_distill.benchmark.dispatch`: a device-independent measure of the launch
cost, taken on the CPU as on the GPU). ``python -m csgr_distill.benchmark.kernels ops --height
512 --width 640`` prints that count alone for every row, without timing (:func:`main`); a
method whose whole formula needs records but whose feature term runs on the maps alone (TAR)
gets a row for the feature term too (:data:`FEATURE_TERM`).
"""
import argparse
import math
import os
import sys
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

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
from .dispatch import DEFINITION as ATEN_OPS
from .dispatch import aten_ops, count_aten_ops, loss_step

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


class LossCase(NamedTuple):
    """One row's inputs: ``ours()`` and ``reference()`` (None: the method has none) return the
    losses of ``distiller`` on the same records; ``leaves``: the student tensors the gradient
    reaches."""

    label: str
    inputs: str
    distiller: torch.nn.Module
    ours: Callable[[], Dict[str, Tensor]]
    reference: Optional[Callable[[], Dict[str, Tensor]]]
    leaves: List[Tensor]


#: the row of a method's feature term alone on the p3-p7 maps, when its whole formula runs on the
#: records of another detector pair (TAR: its RoI terms on Faster R-CNN)
FEATURE_TERM = "{} (feature term)"


def loss_cases(device: str = "cpu", height: int = 800, width: int = 1333, batch: int = 2,
               channels: int = 256, num_classes: int = 6, methods=None) -> Iterator[LossCase]:
    """Every method's loss (and each variant it declares for ``kernels``; ``methods``: only these
    labels) on its inputs (module docstring): random p3-p7 maps of a ``height x width`` batch
    with 8 boxes per image for the losses that read only feature maps, the records of a detector
    pair otherwise; a method whose whole formula needs records but whose feature term runs on
    the maps alone (TAR) gives a second row, :data:`FEATURE_TERM`."""
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

    def on_maps(label, distiller):
        s_feats = {k: v.clone().requires_grad_(True) for k, v in feats["student"].items()}
        s_rec = DetectorOutputs("features", [(height, width)] * batch, padded,
                                features=s_feats, feature_names=list(LEVELS))
        t_rec = DetectorOutputs("features", [(height, width)] * batch, padded,
                                features=feats["teacher"], feature_names=list(LEVELS))
        return _case(label, "p3-p7 maps", distiller, s_rec, t_rec, gt_instances,
                     list(s_feats.values()))

    for label, opts in method_variants("kernels").items():
        wanted = methods is None or label in methods
        if not wanted and FEATURE_TERM.format(label) not in methods:
            continue
        name = opts[1][0]
        try:  # on a RetinaNet's p3-p7 maps
            distiller = _build(name, opts, channels, num_classes, device)
            features_only = all(set(f) == {"features"}
                                for f in fields_by_role(distiller).values())
        except ValueError:  # a pair the method refuses (LD, DETRDistill)
            features_only = False
        detector = record_detector(opts) if wanted or features_only else None
        if features_only and detector == "RetinaNet":
            if wanted:
                yield on_maps(label, distiller)
            continue
        if features_only and (methods is None or FEATURE_TERM.format(label) in methods):
            yield on_maps(FEATURE_TERM.format(label), distiller)
        if wanted:  # head outputs: the records of a detector pair the method supports
            distiller, s_rec, t_rec, gt_rec, leaves = recorded_inputs(label, detector, device,
                                                                       batch, height, width)
            yield _case(label, f"{detector} records", distiller, s_rec, t_rec, gt_rec, leaves)


def _case(label, inputs, distiller, s_rec, t_rec, gt_rec, leaves) -> LossCase:
    reference = None
    if distiller.reference_losses(s_rec, t_rec, gt_rec) is not None:
        reference = lambda: distiller.reference_losses(s_rec, t_rec, gt_rec)  # noqa: E731
    return LossCase(label, inputs, distiller, lambda: distiller(s_rec, t_rec, gt_rec), reference,
                    leaves)


def _compare(case: LossCase, device: str, repeats: int, warmup: int) -> dict:
    """Losses, gradients at the case's leaves, interleaved times, matmul FLOPs and operators
    dispatched (:func:`~csgr_distill.benchmark.dispatch.count_aten_ops`) of ``ours`` and
    ``reference``: one row of the table."""
    fns = {"ours": case.ours, "reference": case.reference}
    leaves = case.leaves

    def step(fn):
        return loss_step(case.distiller, fn, leaves)

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
    ops = {key: aten_ops(step(fn)) for key, fn in fns.items()}
    return {"losses": sorted(ours["losses"]), "ours_ms": 1e3 * median(times["ours"]),
            "reference_ms": 1e3 * median(times["reference"]),
            "speedup": median(times["reference"]) / median(times["ours"]),
            "ours_gflop": flops["ours"] / 1e9, "reference_gflop": flops["reference"] / 1e9,
            "flop_ratio": flops["reference"] / flops["ours"] if flops["ours"] else float("nan"),
            "ours_ops": sum(ops["ours"].leaves.values()),
            "reference_ops": sum(ops["reference"].leaves.values()),
            "ours_compute_ops": sum(ops["ours"].compute.values()),
            "reference_compute_ops": sum(ops["reference"].compute.values()),
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
    g = torch.Generator().manual_seed(1)
    rows: List[dict] = []
    for case in loss_cases(device, height, width, batch, channels, num_classes, methods):
        with EventStorage(0):
            if case.reference is None:
                row = {"note": "no straightforward reference",
                       "ours_ops": count_aten_ops(loss_step(case.distiller, case.ours,
                                                            case.leaves))}
            else:
                row = _compare(case, device, repeats, warmup)
        rows.append({"method": case.label, "inputs": case.inputs, **row})

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
               "over the largest absolute value, of the loss terms and of the gradient; aten ops "
               f"(fwd+bwd): {ATEN_OPS}")
    table = markdown_table(
        ["loss", "inputs", "ours (ms)", "straightforward (ms)", "speed-up", "matmul GFLOP ours",
         "matmul GFLOP straightforward", "FLOP ratio", "aten ops ours (fwd+bwd)",
         "aten ops straightforward (fwd+bwd)", "max rel diff (loss)", "max rel diff (grad)"],
        [[r["method"], r.get("inputs", "-"), r.get("ours_ms", "-"), r.get("reference_ms", "-"),
          r.get("speedup", "-"), r.get("ours_gflop", "-"), r.get("reference_gflop", "-"),
          r.get("flop_ratio", "-"), r.get("ours_ops", "-"), r.get("reference_ops", "-"),
          r.get("max_rel_diff_loss", "-"), r.get("max_rel_diff_grad", "-")] for r in rows])
    md = header_lines(f"kernels ({device})", info, command) + "\n" + setting + "\n\n" + table
    payload = {"machine": info, "setting": setting, "rows": rows}
    write_results(out_dir, "kernels", device, payload, md)
    return payload


def count_ops(device: str = "cpu", height: int = 512, width: int = 640, batch: int = 2,
              channels: int = 256, methods=None, reference: bool = True, out=print) -> List[dict]:
    """The ``aten ops`` column alone (no timing): operators dispatched by one forward + backward
    of every method's loss (and of its reference, with ``reference``) on :func:`loss_cases`'
    inputs; each row is printed with ``out`` as it is counted."""
    rows = []
    for case in loss_cases(device, height, width, batch, channels, methods=methods):
        row = {"method": case.label, "inputs": case.inputs}
        fns = {"ours": case.ours}
        if reference and case.reference is not None:
            fns["reference"] = case.reference
        with EventStorage(0):
            for key, fn in fns.items():
                counts = aten_ops(loss_step(case.distiller, fn, case.leaves))
                row[f"{key}_ops"] = sum(counts.leaves.values())
                row[f"{key}_compute_ops"] = sum(counts.compute.values())
        rows.append(row)
        out(f"| {case.label} | {case.inputs} | {row['ours_ops']} | {row['ours_compute_ops']} | "
            f"{row.get('reference_ops', '-')} | {row.get('reference_compute_ops', '-')} |")
    return rows


def main(argv=None) -> int:
    """``python -m csgr_distill.benchmark.kernels ops [--height 512 --width 640] [--methods ...]``:
    print the operators dispatched per forward + backward of every method (a markdown table)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("part", choices=["ops"])
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="*", default=None, help="row labels (default: all)")
    p.add_argument("--no-reference", action="store_true",
                   help="count ours only (the references of the head-output losses are slow)")
    args = p.parse_args(argv)
    print(f"{ATEN_OPS}; compute: the operators that do work, views, allocations and detaching "
          f"left out (about the kernels a GPU launches); input {args.height}x{args.width}, batch {args.batch}, "
          f"{args.channels} channels, {args.device}\n")
    print("| loss | inputs | aten ops ours (fwd+bwd) | compute | "
          "aten ops straightforward (fwd+bwd) | compute |\n"
          "|---|---|---:|---:|---:|---:|", flush=True)
    count_ops(args.device, args.height, args.width, args.batch, args.channels, args.methods,
              not args.no_reference, out=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":  # python -m imports csgr_distill first: every method is registered
    sys.exit(main())
