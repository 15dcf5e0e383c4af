"""gain: on the embedded ``shapes`` data, train the teacher once, then the baseline student and the
student under every registered distiller (plus CSGR's options and selected combinations) for the
same iterations over several seeds; AP mean +- std, gain over the baseline, share of the
teacher-student gap closed, AP-vs-iteration curves.

Every run is a call of ``tools/train_net.py`` (the user's path), with the demo configs
(``configs/demo/``: wide R18 teacher, R18 student, 128 px images). Finished runs are kept
(``<output>/runs/<method>/seed<k>/final.json``) so an interrupted benchmark continues.
"""
import json
import os
import shlex
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from ..distillers import registered_distillers
from ..teacher import REPO_ROOT
from .common import header_lines, machine_info, markdown_table, method_variants, write_results

TEACHER_CFG = "configs/demo/teacher-RetinaNet-R18-wide.yaml"
STUDENT_CFG = "configs/demo/CSGR-RetinaNet-R18.yaml"
BASELINE = "baseline (no distillation)"
METRICS = ("AP", "AP50", "AP75")
#: combinations worth running once all their members are registered
COMBINATIONS: List[Tuple[str, ...]] = [("CSGR", "LD"), ("FGD", "LD")]


def method_runs(selected: Optional[List[str]] = None,
                extra: Optional[Dict[str, List]] = None) -> Dict[str, List]:
    """label -> cfg overrides, for the baseline, every registered distiller, CSGR's options and
    the combinations whose members are all registered. ``selected`` filters by label; ``extra``
    (label -> overrides, e.g. a loss-weight sweep) is run besides whatever is selected."""
    names = registered_distillers()
    runs = {BASELINE: ["MODEL.DISTILL.ENABLED", False]}
    runs.update(method_variants())
    for combo in COMBINATIONS:
        if all(c in names for c in combo):
            runs["+".join(combo)] = ["MODEL.DISTILL.METHODS", list(combo)]
    if selected is not None:
        unknown = [s for s in selected if s not in runs]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; available: {list(runs)}")
        runs = {k: v for k, v in runs.items() if k in selected or k == BASELINE}
    for label, opts in (extra or {}).items():
        if label in runs:
            raise SystemExit(f"--variant {label!r}: that label is taken; name the variant "
                             "differently")
        runs[label] = list(opts)
    return runs


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """``"LABEL=KEY VALUE [KEY VALUE ...]"`` -> (label, overrides) for ``--variant``."""
    label, sep, rest = text.partition("=")
    opts = shlex.split(rest)
    if not sep or not label.strip() or not opts or len(opts) % 2:
        raise SystemExit(f"--variant {text!r}: expected 'LABEL=KEY VALUE [KEY VALUE ...]', e.g. "
                         "--variant 'CSGR weights x4=MODEL.DISTILL.CSGR.ALPHA 2e-3 "
                         "MODEL.DISTILL.CSGR.BETA 4e-5'")
    return label.strip(), opts


def student_cfg():
    """The students' config as ``train_net.py`` reads it (before per-run overrides)."""
    from detectron2.config import get_cfg

    from ..config import add_distill_config

    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO_ROOT, STUDENT_CFG))
    return cfg


def check_overrides(plan: Dict[str, List]) -> None:
    """Fail before any training if a run's overrides are not valid keys/values of the student
    config (a typo in ``--variant`` would otherwise surface only after the teacher is trained)."""
    base = student_cfg()
    for label, opts in plan.items():
        cfg = base.clone()
        try:
            cfg.merge_from_list(_opts_str(opts))
        except Exception as e:  # yacs raises KeyError/ValueError/AssertionError
            raise SystemExit(f"gain run {label!r}: bad config override {opts}: {e!r}") from e


def _train_net(args: List[str], log_path: str) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools/train_net.py")]
                              + [str(a) for a in args], cwd=REPO_ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(open(log_path).readlines()[-25:])
        raise RuntimeError(f"train_net.py failed (log {log_path}):\n{tail}")


def _opts_str(opts: List) -> List[str]:
    return [str(o) for o in opts]


def _read_curve(metrics_json: str) -> List[Tuple[int, Dict[str, float]]]:
    """(iteration, {AP, AP50, AP75}) of every evaluation logged in a metrics.json."""
    curve = []
    with open(metrics_json) as f:
        for line in f:
            row = json.loads(line)
            if "bbox/AP" in row:
                curve.append((row["iteration"] + 1, {m: row[f"bbox/{m}"] for m in METRICS}))
    return curve


def _schedule(iters: Optional[int]) -> List:
    """Overrides for ``iters`` iterations with lr steps at 80 % and 95 % (none: the config's)."""
    if not iters:
        return []
    return ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", f"({int(iters * .8)},{int(iters * .95)})"]


def train_teacher(out: str, iters: Optional[int], weights: Optional[str]) -> Tuple[str, dict]:
    """The teacher's weights (trained here unless given or already there) and its AP."""
    if not weights:
        tdir = os.path.join(out, "teacher")
        weights = os.path.join(tdir, "model_final.pth")
        if not os.path.isfile(weights):
            opts = ["OUTPUT_DIR", tdir, "DATASETS.TEST", "()"] + _schedule(iters)
            _train_net(["--config-file", TEACHER_CFG] + opts, os.path.join(tdir, "train.log"))
    eval_dir = os.path.join(out, "teacher_eval")
    result = os.path.join(eval_dir, "eval_results.json")
    if not os.path.isfile(result):
        _train_net(["--config-file", TEACHER_CFG, "--eval-only", "MODEL.WEIGHTS", weights,
                    "OUTPUT_DIR", eval_dir], os.path.join(eval_dir, "eval.log"))
    with open(result) as f:
        bbox = json.load(f)["bbox"]
    return weights, {m: bbox[m] for m in METRICS}


def run_student(out: str, label: str, opts: List, seed: int, teacher_weights: str,
                iters: Optional[int], default_iters: int, eval_points: int) -> dict:
    """One student run of ``iters`` (None: the config's ``default_iters``) iterations; returns
    {"final": {...}, "curve": [...]} (cached in final.json)."""
    folder = label.replace(" ", "_").replace("+", "_").replace("/", "_")
    rdir = os.path.join(out, "runs", folder, f"seed{seed}")
    final_json = os.path.join(rdir, "final.json")
    if os.path.isfile(final_json):
        with open(final_json) as f:
            return json.load(f)
    args = ["--config-file", STUDENT_CFG, "SEED", seed, "OUTPUT_DIR", rdir,
            "TEST.EVAL_PERIOD", max(1, (iters or default_iters) // eval_points),
            "MODEL.DISTILL.TEACHER.WEIGHTS", teacher_weights] + _schedule(iters) + _opts_str(opts)
    _train_net(args, os.path.join(rdir, "train.log"))
    curve = _read_curve(os.path.join(rdir, "metrics.json"))
    result = {"final": curve[-1][1], "curve": curve, "seed": seed, "label": label}
    with open(final_json, "w") as f:
        json.dump(result, f)
    return result


def _mean_std(xs: List[float]) -> Tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize(teacher: dict, runs: Dict[str, List[dict]]) -> List[dict]:
    base_ap = [r["final"]["AP"] for r in runs[BASELINE]]
    base_mean, base_std = _mean_std(base_ap)
    gap = teacher["AP"] - base_mean
    rows = []
    for label, rs in runs.items():
        row = {"method": label, "seeds": len(rs)}
        for m in METRICS:
            row[m], row[m + "_std"] = _mean_std([r["final"][m] for r in rs])
        row["gain_AP"] = row["AP"] - base_mean
        row["gap_closed_percent"] = 100.0 * row["gain_AP"] / gap if gap > 0 else float("nan")
        row["gain_over_2std"] = row["gain_AP"] > 2 * max(row["AP_std"], base_std)
        rows.append(row)
    return rows


def plot(out_dir: str, teacher: dict, rows: List[dict], runs: Dict[str, List[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.bar(x, [r["AP"] for r in rows], yerr=[r["AP_std"] for r in rows], capsize=4,
           color=["#999999"] + ["C%d" % i for i in range(len(rows) - 1)])
    ax.axhline(teacher["AP"], color="k", ls="--", lw=1, label=f"teacher {teacher['AP']:.1f}")
    ax.set_xticks(x, [r["method"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("AP on shapes_val (mean ± std over seeds)")
    lo = min(r["AP"] - 2 * (r["AP_std"] or 0) for r in rows)
    ax.set_ylim(max(0, lo - 2), max(teacher["AP"], max(r["AP"] for r in rows)) + 2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gain_ap.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, rs) in enumerate(runs.items()):
        iters = [it for it, _ in rs[0]["curve"]]
        aps = np.array([[c["AP"] for _, c in r["curve"]] for r in rs])
        mean, std = aps.mean(0), aps.std(0)
        color = "#777777" if label == BASELINE else f"C{i - 1}"
        ax.plot(iters, mean, marker="o", label=label, color=color)
        ax.fill_between(iters, mean - std, mean + std, alpha=0.15, color=color)
    ax.axhline(teacher["AP"], color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("student iteration")
    ax.set_ylabel("AP on shapes_val")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gain_curves.png"), dpi=120)
    plt.close(fig)


def run(out_dir: str, work_dir: str, seeds: int = 3, iters: Optional[int] = None,
        teacher_iters: Optional[int] = None, teacher_weights: Optional[str] = None,
        methods: Optional[List[str]] = None, variants: Optional[Dict[str, List]] = None,
        eval_points: int = 3, command: str = "", progress=print) -> dict:
    plan = method_runs(methods, variants)
    check_overrides(plan)
    progress(f"[gain] teacher ({TEACHER_CFG})")
    weights, teacher = train_teacher(work_dir, teacher_iters, teacher_weights)
    progress(f"[gain] teacher AP {teacher['AP']:.2f}")
    default_iters = student_cfg().SOLVER.MAX_ITER
    runs: Dict[str, List[dict]] = {label: [] for label in plan}
    for seed in range(seeds):
        for label, opts in plan.items():
            r = run_student(work_dir, label, opts, seed, weights, iters, default_iters,
                            eval_points)
            runs[label].append(r)
            progress(f"[gain] seed {seed} {label}: AP {r['final']['AP']:.2f}")
    rows = summarize(teacher, runs)
    info = machine_info("cpu")
    setting = (f"shapes_train -> shapes_val; teacher RetinaNet R18-FPN wide ({TEACHER_CFG}), students "
               f"RetinaNet R18-FPN ({STUDENT_CFG}) trained {iters or default_iters} iterations each, "
               f"seeds 0..{seeds - 1}; teacher AP {teacher['AP']:.2f} / AP50 "
               f"{teacher['AP50']:.2f} / AP75 {teacher['AP75']:.2f}")
    table = markdown_table(
        ["method", "AP", "AP50", "AP75", "gain AP", "gap closed (%)", "gain > 2 std"],
        [[r["method"], f"{r['AP']:.2f} ± {r['AP_std']:.2f}", f"{r['AP50']:.2f} ± {r['AP50_std']:.2f}",
          f"{r['AP75']:.2f} ± {r['AP75_std']:.2f}", f"{r['gain_AP']:+.2f}",
          f"{r['gap_closed_percent']:.0f}", "yes" if r["gain_over_2std"] else "no"]
         for r in rows])
    md = (header_lines("gain (shapes)", info, command) + "\n" + setting + "\n\n" + table
          + "\n\n![AP per method](gain_ap.png) ![AP vs iteration](gain_curves.png)")
    payload = {"machine": info, "setting": setting, "teacher": teacher, "rows": rows,
               "runs": runs}
    os.makedirs(out_dir, exist_ok=True)
    plot(out_dir, teacher, rows, runs)
    write_results(out_dir, "gain", "shapes", payload, md)
    return payload
