"""overhead: per-iteration wall time and peak memory of a full training step (forward, backward,
SGD step) for

* the student alone,
* the student plus a teacher forward (the physical floor of any feature distillation),
* the student under each registered distiller and each variant a method declares for
  ``overhead`` (CSGR's options; on the DETR family DETRDistill's components one by one and its
  last-layer query-prior assignment), wherever the detector's pair supports it,

for RetinaNet, Faster R-CNN and the distribution-head RetinaNet (and, on request, DETR and
Deformable DETR) at a stated image size and batch. Times come from one process,
variants interleaved round by round, medians over repeats. Peak memory: on CUDA
``max_memory_allocated`` in the same process; on the CPU the peak resident set of a fresh process
per variant (``--memory-probe``; high-water mark reset after the imports) minus its resident set
before building the models, i.e. weights + gradients + optimizer state + teacher + activations.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from ..config import add_distill_config
from ..distillers import pair_problem
from ..records import DetectorSpec, recorder_for
from ..teacher import REPO_ROOT, FrozenTeacher, build_teacher_cfg
from .common import header_lines, machine_info, markdown_table, matmul_flops, median, \
    method_variants, synchronize, time_calls, write_results

#: detector -> (distilled student config, teacher config)
DETECTORS = {
    "RetinaNet": ("configs/CSGR-RetinaNet-R50.yaml", "configs/teachers/RetinaNet-R101-SODA10M.yaml"),
    "Faster R-CNN": ("configs/CSGR-FasterRCNN-R50.yaml",
                     "configs/teachers/FasterRCNN-R101-SODA10M.yaml"),
    "RetinaNet, distribution head": ("configs/LD-RetinaNet-R50.yaml",
                                     "configs/teachers/RetinaNet-Dist-R101-SODA10M.yaml"),
    "Deformable DETR": ("configs/CSGR-DeformableDETR-R50.yaml",
                        "configs/detr/DeformableDETR-R101.yaml"),
    "DETR": ("configs/CSGR-DETR-R50.yaml", "configs/detr/DETR-R101.yaml"),
}
#: detectors timed by default (the DETR family on request: --detectors DETR "Deformable DETR")
DEFAULT_DETECTORS = ("RetinaNet", "Faster R-CNN", "RetinaNet, distribution head")
STUDENT, FLOOR = "student alone", "student + teacher forward (floor)"


def student_config(path: str, device: str, opts: List):
    """The student config ``path`` (repository-relative) for timing: no weights, ``device``,
    the teacher config path made absolute, then ``opts``."""
    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO_ROOT, path))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.MODEL.DISTILL.TEACHER.CONFIG = os.path.join(REPO_ROOT, cfg.MODEL.DISTILL.TEACHER.CONFIG)
    cfg.merge_from_list(opts)
    return cfg


def synthetic_batch(batch: int, height: int, width: int, seed: int = 0) -> List[dict]:
    """Images with 5 random boxes each, as the dataset mapper would give them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.rand(5, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = 16 + torch.rand(5, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3])
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 6, (5,), generator=g)
        out.append({"image": torch.rand(3, height, width, generator=g) * 255, "instances": inst,
                    "height": height, "width": width})
    return out


class _Variant:
    """One timed configuration: a model, its optimizer, and an optional extra teacher forward."""

    def __init__(self, label, model, teacher_forward: Optional[FrozenTeacher] = None):
        self.label, self.model, self.teacher_forward = label, model, teacher_forward
        self.last_losses: Dict[str, float] = {}
        self.optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
        # lr 0: timing only (the step costs the same); random FrozenBN weights must not drift

    def step(self, batch):
        with EventStorage(0):
            losses = self.model(batch)
            if self.teacher_forward is not None:
                with torch.no_grad():  # what every feature distiller needs of the teacher
                    t = self.teacher_forward.model
                    recorder_for(t).record(t, t.preprocess_image(batch), batch,
                                                 ("features",), None)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}


def build_variants(detector: str, device: str, only: Optional[str] = None,
                   methods: Optional[Sequence[str]] = None) -> List[_Variant]:
    """Student, floor, and every method (and variant declared for ``overhead``) that the
    detector's pair supports -- the methods' own build-time checks decide -- sharing one (random)
    teacher. ``only``: that label alone; ``methods``: only these labels (besides student and
    floor)."""
    student_cfg_path, _ = DETECTORS[detector]
    base = student_config(student_cfg_path, device, ["MODEL.DISTILL.ENABLED", False])
    torch.manual_seed(0)
    variants = []
    if only == STUDENT:
        return [_Variant(STUDENT, build_model(base).train())]
    teacher_cfg = build_teacher_cfg(student_config(student_cfg_path, device, []))
    teacher = FrozenTeacher(build_model(teacher_cfg), teacher_cfg)  # random weights: timing only
    if only in (None, STUDENT):
        variants.append(_Variant(STUDENT, build_model(base).train()))
    if only in (None, FLOOR):
        variants.append(_Variant(FLOOR, build_model(base).train(), teacher_forward=teacher))
    family = DetectorSpec.from_cfg(base).family
    for label, opts in method_variants("overhead", family).items():
        if only not in (None, label) or (methods is not None and label not in methods):
            continue
        cfg = student_config(student_cfg_path, device, opts)
        problem = pair_problem(cfg)
        if problem is not None:  # e.g. LD on a RetinaNet without the distribution head
            if only is not None or methods is not None:
                print(f"[overhead] {detector}: skipping {label}: {problem}", file=sys.stderr)
            continue
        model = build_model(cfg).train()
        model.attach_teacher(teacher)
        variants.append(_Variant(label, model))
    return variants


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux >= 4.0):
    the imports' transient peak must not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_probe(detector: str, label: str, device: str, batch: int, height: int, width: int,
                 steps: int = 2) -> Dict[str, float]:
    """Peak memory of ``steps`` training steps of one variant in this (fresh) process."""
    if not device.startswith("cuda"):
        _reset_peak_rss()
    base_rss = _proc_status_mb("VmRSS")
    variants = build_variants(detector, device, only=label)
    if not variants:
        return {"peak_mb": float("nan")}
    v = variants[0]
    data = synthetic_batch(batch, height, width)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        v.step(data)
    synchronize(device)
    if device.startswith("cuda"):
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_mb": _proc_status_mb("VmHWM") - base_rss}


def _probe_in_subprocess(detector, label, device, batch, height, width) -> float:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "csgr_distill.benchmark.overhead", "--memory-probe",
               detector, label, device, str(batch), str(height), str(width), out.name]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(f"[overhead] memory probe {detector}/{label} failed:\n{proc.stderr[-2000:]}",
                  file=sys.stderr)
            return float("nan")
        return json.load(open(out.name))["peak_mb"]


def run(out_dir: str, device: str = "cpu", height: int = 512, width: int = 640, batch: int = 2,
        repeats: int = 8, warmup: int = 2, detectors=DEFAULT_DETECTORS, command: str = "",
        measure_memory: bool = True, methods: Optional[Sequence[str]] = None) -> dict:
    """Time every detector of ``detectors`` (``methods``: only these labels besides the student
    and the floor) and write ``overhead.{json,md}`` into ``out_dir``."""
    sections = {}
    info = machine_info(device)
    for detector in detectors:
        variants = build_variants(detector, device, methods=methods)
        data = synthetic_batch(batch, height, width)
        times = {v.label: [] for v in variants}
        for v in variants:
            time_calls(lambda v=v: v.step(data), device, 0, warmup)
        flops = {v.label: matmul_flops(lambda v=v: v.step(data)) for v in variants}
        for _ in range(repeats):
            for v in variants:
                times[v.label] += time_calls(lambda v=v: v.step(data), device, 1, 0)
        losses = {v.label: v.last_losses for v in variants}  # of the last timed step
        del variants
        if not measure_memory:
            memory = {label: float("nan") for label in times}
        elif device.startswith("cuda"):
            memory = {label: memory_probe(detector, label, device, batch, height, width)["peak_mb"]
                      for label in times}
        else:
            memory = {label: _probe_in_subprocess(detector, label, device, batch, height, width)
                      for label in times}
        student_t, floor_t = median(times[STUDENT]), median(times[FLOOR])
        rows = []
        for label, ts in times.items():
            t = median(ts)
            rows.append({
                "variant": label, "step_ms": 1e3 * t,
                "vs_student": t / student_t, "vs_floor": t / floor_t,
                "machinery_over_floor_percent": 100.0 * (t - floor_t) / floor_t,
                "matmul_gflop": flops[label] / 1e9,
                "matmul_flop_over_floor_percent": 100.0 * (flops[label] - flops[FLOOR])
                / flops[FLOOR],
                "peak_mb": memory[label], "memory_vs_student": memory[label] / memory[STUDENT],
                "losses": losses[label],
                "losses_finite": all(math.isfinite(x) for x in losses[label].values()),
            })
        setting = (f"{detector}: student {DETECTORS[detector][0]}, teacher "
                   f"{DETECTORS[detector][1]} (random weights), input {height}x{width}, batch "
                   f"{batch}, full training step (forward + backward + SGD), median of {repeats}; "
                   "matmul GFLOP: the step's matrix products (convs included), counted by "
                   "torch.utils.flop_counter")
        table = markdown_table(
            ["variant", "step (ms)", "x student", "x floor", "over floor (%)", "matmul GFLOP",
             "matmul GFLOP over floor (%)", "peak memory (MB)", "memory x student"],
            [[r["variant"], r["step_ms"], r["vs_student"], r["vs_floor"],
              r["machinery_over_floor_percent"], r["matmul_gflop"],
              r["matmul_flop_over_floor_percent"], r["peak_mb"], r["memory_vs_student"]]
             for r in rows])
        md = header_lines(f"overhead: {detector} ({device})", info, command) + "\n" + setting \
            + "\n\n" + table
        payload = {"machine": info, "setting": setting, "rows": rows}
        write_results(out_dir, "overhead", f"{device} {detector}", payload, md)
        sections[detector] = payload
    return sections


if __name__ == "__main__":
    if len(sys.argv) == 9 and sys.argv[1] == "--memory-probe":
        _, _, det, lab, dev, b, h, w, out_path = sys.argv
        import csgr_distill  # noqa: F401  (registrations)

        result = memory_probe(det, lab, dev, int(b), int(h), int(w))
        with open(out_path, "w") as f:
            json.dump(result, f)
    else:
        raise SystemExit("internal entry point of tools/benchmark.py overhead")
