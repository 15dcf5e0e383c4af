"""What every benchmark part shares: machine description, timing, result files."""
import datetime
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..distillers import DISTILLER_REGISTRY, registered_distillers


def machine_info(device: str) -> Dict[str, str]:
    """Where and with what a number was measured."""
    info = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "cpu": _cpu_name(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_flops(call) -> int:
    """FLOPs of the matrix products (mm/bmm/conv/einsum) that ``call()`` runs, backward included:
    the work a matmul-bound implementation cannot avoid, so the ratio of two counts is the
    speed-up one can expect from doing less of it."""
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def time_calls(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> List[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


#: a table cell without a number (an AP of a size no object has, a std over one seed, a share
#: of a gap that is not positive); each table says which in a footnote
NO_VALUE = "—"


def missing(x) -> bool:
    """None or NaN: a number that does not exist."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def number_cell(x, spec: str = ".2f") -> str:
    """``format(x, spec)``, or :data:`NO_VALUE` for None/NaN."""
    return NO_VALUE if missing(x) else format(x, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str, part: str, section: str, payload: dict, markdown: str) -> None:
    """Update ``results/<part>.json`` and ``results/<part>.md`` with one section (e.g. a device).

    Sections of other devices/detectors already in the files are kept, so CPU and GPU rows of the
    same part live side by side.
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{part}.json")
    data = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            data = json.load(f)
    data[section] = dict(payload, markdown=markdown.rstrip())
    with open(json_path, "w") as f:
        json.dump(data, f, indent=2)
    with open(os.path.join(out_dir, f"{part}.md"), "w") as f:
        f.write("\n\n".join(v["markdown"] for _, v in sorted(data.items())) + "\n")


def header_lines(title: str, info: Dict[str, str], command: str) -> str:
    machine = ", ".join(f"{k} {v}" for k, v in info.items() if k != "date")
    return f"### {title}\n\n{info['date']} · {machine}\n\n`{command}`\n"


def method_variants(part: str, family: Optional[str] = None) -> Dict[str, List]:
    """label -> cfg overrides of every run a benchmark ``part`` (``"gain"``, ``"overhead"``,
    ``"kernels"``) measures: each registered distiller with its defaults, and the
    :class:`~csgr_distill.distillers.Variant` s it declares for that part (and for the detector
    ``family``, when given) whose methods are all registered. Which of them a detector pair can
    run is asked of the methods themselves (:func:`~csgr_distill.distillers.pair_problem`).

    The one list the three benchmark parts share, so they grow with the registry together.
    """
    names = registered_distillers()
    out: Dict[str, List] = {}
    for name in names:
        out[name] = ["MODEL.DISTILL.METHODS", [name]]
        for label, variant in DISTILLER_REGISTRY.get(name).benchmark_variants.items():
            if part not in variant.parts:
                continue
            if family is not None and variant.families is not None \
                    and family not in variant.families:
                continue
            opts = variant.overrides(name)
            if all(m in names for m in opts[1]):
                out[label] = opts
    return out
