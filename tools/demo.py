#!/usr/bin/env python
"""The embedded default, end to end on the CPU (behind ``make demo``).

generate shapes -> train teacher -> train baseline student -> evaluate both and check that the
teacher beats the baseline (a loud warning with both numbers when it does not) -> train the
distilled student (CSGR by default; same iterations) -> evaluate it (--eval-only, through its
exported plain checkpoint) -> table (markdown + json), bar chart, visualizations, all under
``output/demo/``.

A smoke run of the whole loop, pictures included, in a few minutes (teacher 300 and students 100
iterations, everything under ``output/demo_quick/``; its table, json and chart say that it is a
smoke run, whose numbers measure nothing)::

    tools/demo.py --quick

Another method instead of CSGR (``--method NAME``: a registered distiller with a demo config
``configs/demo/<NAME>-RetinaNet-R18.yaml``; an unknown one is an error listing those available)::

    tools/demo.py --method FGD

trains ``output/demo/student_fgd``, names its row ``student R18 + FGD`` and writes
``results_fgd.{md,json,png}`` and ``vis_fgd/`` (the default CSGR run: ``results.*``, ``vis/``), so
that the tables of several methods sit side by side.

Your own data instead of the shapes (the class count follows ``--train``; give the input size of
your images with ``INPUT.FIXED_SIZE``; every trailing ``KEY VALUE`` goes to every model)::

    tools/demo.py --register-dataset mine_train=coco:data/train.json:data/images \
        --register-dataset mine_val=voc:data/VOC:val --train mine_train --test mine_val \
        INPUT.FIXED_SIZE 256

Every stage is a call of the project's own command-line tools, so the demo exercises exactly
what a user runs. One progress line per stage, with elapsed time and ETA; while a stage trains or
evaluates, detectron2's own periodic lines (``eta: ... iter: N  total_loss: ...``, ``Inference
done N/M ... ETA=``) are shown as they come; every tool's whole output is in
``output/demo/logs/<stage>.log``. A stage that fails stops the demo with its tool's error
message and the log's path.
"""
import argparse
import json
import os
import sys
import time
import warnings

# detectron2 (a59f0563) calls torch.jit.script at import; torch 2.14 warns about it
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join("configs", "demo")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

#: the method distilled when --method is not given
DEFAULT_METHOD = "CSGR"
#: a method's demo config is ``configs/demo/<NAME><this>``
METHOD_CONFIG_SUFFIX = "-RetinaNet-R18.yaml"

#: where the demo writes (``--quick``: :data:`QUICK_ROOT`)
DEFAULT_ROOT = "output/demo"
QUICK_ROOT = "output/demo_quick"
#: ``--quick``: teacher and student iterations of the smoke run (the whole loop, pictures
#: included, in a few minutes; its numbers show that the loop works, not what a method gains)
QUICK_ITERS = {"teacher": 300, "student": 100}

#: name -> (config, run folder under the demo's root, weights file in it, config used for
#: evaluation); the distilled student's entry comes from :func:`models_for`
MODELS = {
    "teacher R18-wide": ("teacher-RetinaNet-R18-wide.yaml", "teacher", "model_final.pth",
                         "teacher-RetinaNet-R18-wide.yaml"),
    "student R18 (baseline)": ("student-RetinaNet-R18.yaml", "student_baseline",
                               "model_final.pth", "student-RetinaNet-R18.yaml"),
}
#: rough relative cost of each stage on the 2-core reference machine (seconds), for the ETA only
STAGE_COST = {"data": 10, "teacher": 550, "baseline": 130, "check": 30, "distill": 170,
              "eval": 15, "report": 15}
#: --quick's stages cost about this share of the full demo's (for the ETA only)
QUICK_SCALE = 0.15


def student_dir(method: str, root: str = DEFAULT_ROOT) -> str:
    """``<root>/student_<method lower>``: the distilled student's run."""
    return f"{root}/student_{method.lower()}"


def distilled_name(method: str) -> str:
    """The table row of the distilled student, e.g. ``student R18 + CSGR``."""
    return f"student R18 + {method}"


def models_for(method: str) -> dict:
    """:data:`MODELS` with the student distilled by ``method``: trained with
    ``configs/demo/<method><METHOD_CONFIG_SUFFIX>`` into :func:`student_dir`, evaluated from its
    exported checkpoint with the *plain* student config."""
    return dict(MODELS, **{distilled_name(method): (
        method + METHOD_CONFIG_SUFFIX, os.path.basename(student_dir(method)),
        "model_final_student.pth", "student-RetinaNet-R18.yaml")})


def available_methods():
    """The methods ``--method`` takes: registered distillers (``DISTILLER_REGISTRY``) with a demo
    config ``configs/demo/<NAME>-RetinaNet-R18.yaml``, sorted."""
    import csgr_distill  # noqa: F401  (registers every distiller)
    from csgr_distill.distillers import registered_distillers

    folder = os.path.join(REPO, DEMO_CFG)
    configs = {f[:-len(METHOD_CONFIG_SUFFIX)] for f in os.listdir(folder)
               if f.endswith(METHOD_CONFIG_SUFFIX)}
    return sorted(configs & set(registered_distillers()))


def check_method(method: str) -> str:
    """``method`` as registered (case-insensitive: ``fgd`` is ``FGD``); a ``CliError`` naming
    what is missing and listing the available methods when it cannot run."""
    from csgr_distill.cli import CliError
    from csgr_distill.distillers import registered_distillers

    available = available_methods()
    for name in available:
        if name.lower() == method.lower():
            return name
    registered = {n.lower(): n for n in registered_distillers()}
    config = os.path.join(DEMO_CFG, registered.get(method.lower(), method) + METHOD_CONFIG_SUFFIX)
    if method.lower() in registered:
        why = (f"{registered[method.lower()]} is a registered distiller but has no demo config "
               f"({config} does not exist)")
    elif os.path.isfile(os.path.join(REPO, config)):
        why = f"{config} exists but {method!r} is not a registered distiller"
    else:
        why = f"{method!r} is not a registered distiller and {config} does not exist"
    raise CliError(
        f"--method {method}: {why}. Available: {', '.join(available) or 'none'} (a registered "
        f"distiller with a demo config {DEMO_CFG}/<NAME>{METHOD_CONFIG_SUFFIX})")


def fmt_metric(value) -> str:
    """``12.34``, or ``—`` for a metric without a value (None, NaN)."""
    from csgr_distill.benchmark.common import number_cell

    return number_cell(value, ".2f")


def fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Prints one line per stage: index, name, stage time, elapsed, ETA (scaled by observed speed)."""

    def __init__(self, stages, scale: float = 1.0):
        self.stages = stages
        self.scale = float(scale)  # the stage costs of a shorter run (--quick)
        self.t0 = time.time()
        self.done_est = 0.0
        self.done_real = 0.0

    def run(self, key, title, fn):
        i = self.stages.index(key) + 1
        print(f"[{i}/{len(self.stages)}] {title} ...", flush=True)
        t = time.time()
        result = fn()
        took = time.time() - t
        elapsed = time.time() - self.t0
        if key != "data":  # scale the estimates by this machine's speed on the heavy stages
            self.done_est += STAGE_COST[key] * self.scale
            self.done_real += took
        speed = self.done_real / self.done_est if self.done_est else 1.0
        remaining = sum(STAGE_COST[k] for k in self.stages[i:]) * speed * self.scale
        print(f"[{i}/{len(self.stages)}] {title}: done in {fmt(took)} | elapsed {fmt(elapsed)} | "
              f"ETA {fmt(remaining)}", flush=True)
        return result


def run_tool(args, log_path):
    """Run a project tool in a subprocess: its whole output to ``log_path``, its progress lines
    to the console as they come; a failure is a ``CliError`` with the tool's own ``error:``
    message and the log's path (:func:`csgr_distill.cli.run_tool`)."""
    from csgr_distill.cli import run_tool as run

    run([sys.executable] + list(args), os.path.join(REPO, log_path), cwd=REPO,
        name=args[0])


def train(config, run_dir, opts, root=DEFAULT_ROOT):
    """Train ``configs/demo/<config>`` into ``<root>/<run_dir>`` (no evaluation during training:
    the eval stage evaluates every model the same way)."""
    run_tool(["tools/train_net.py", "--config-file", os.path.join(DEMO_CFG, config),
              "OUTPUT_DIR", f"{root}/{run_dir}"] + opts + ["DATASETS.TEST", "()"],
             os.path.join(root, "logs", run_dir + ".log"))


def weights_of(name, models, root=DEFAULT_ROOT) -> str:
    """The weights file of model ``name`` (``<root>/<run>/<file>``)."""
    _, run_dir, weights, _ = models[name]
    return f"{root}/{run_dir}/{weights}"


def evaluate(name, opts, models=MODELS, root=DEFAULT_ROOT):
    eval_cfg = models[name][3]
    out_dir = os.path.join(root, "eval", name.split(" (")[0].replace(" + ", "_")
                           .replace(" ", "_").lower())
    run_tool(["tools/train_net.py", "--config-file", os.path.join(DEMO_CFG, eval_cfg),
              "--eval-only", "MODEL.WEIGHTS", weights_of(name, models, root),
              "OUTPUT_DIR", out_dir] + opts,
             os.path.join(root, "logs", "eval_" + os.path.basename(out_dir) + ".log"))
    with open(os.path.join(REPO, out_dir, "eval_results.json")) as f:
        return json.load(f)["bbox"]


#: the label of a ``--quick`` run's table, chart and json
SMOKE_LABEL = ("SMOKE RUN (--quick): a few hundred iterations, to show the whole loop works; "
               "these numbers say nothing about what the method gains")


def write_report(results, out_dir, iters, train_set="shapes_train", test_set="shapes_val",
                 method=DEFAULT_METHOD, suffix="", smoke=False):
    """Markdown + json table and a bar chart (``results<suffix>.{md,json,png}``) of the teacher,
    the baseline and the student distilled by ``method``; returns the markdown. ``smoke``: a
    ``--quick`` run, labelled :data:`SMOKE_LABEL` in all three."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from csgr_distill.benchmark.common import NO_VALUE
    from csgr_distill.benchmark.common import missing as missing_value

    names = list(results)
    lines = [f"**{SMOKE_LABEL}.**", ""] if smoke else []
    lines += ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt_metric(results[n].get(m)) for m in METRICS)
                     + " |")
    missing = any(missing_value(results[n].get(m)) for n in names for m in METRICS)
    base, student = results["student R18 (baseline)"], results[distilled_name(method)]
    teacher = results["teacher R18-wide"]
    gap = teacher["AP"] - base["AP"]
    closed = (student["AP"] - base["AP"]) / gap * 100 if abs(gap) > 1e-9 else None
    lines.append("")
    if missing:
        lines += [f"{NO_VALUE} : no value (no objects of that size in the validation set)", ""]
    share = f"{closed:.0f}% of" if closed is not None else "no share of"
    lines.append(f"{method} gain over the baseline student: {student['AP'] - base['AP']:+.2f} AP "
                 f"({share} the teacher-student gap of {gap:.2f} AP); "
                 f"students trained {iters} iterations each on {train_set}, evaluated on "
                 f"{test_set}.")
    md = "\n".join(lines)
    with open(os.path.join(out_dir, f"results{suffix}.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out_dir, f"results{suffix}.json"), "w") as f:
        json.dump({"results": results, "student_iters": iters,
                   "gain_AP": student["AP"] - base["AP"], "gap_closed_percent": closed,
                   "smoke_run": bool(smoke)}, f, indent=2, allow_nan=False)

    x = np.arange(len(METRICS))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, n in enumerate(names):
        values = [results[n].get(m) for m in METRICS]
        ax.bar(x + (i - (len(names) - 1) / 2) * width,
               [float("nan") if v is None else v for v in values], width, label=n)
    ax.set_xticks(x, [m if any(not missing_value(results[n].get(m)) for n in names)
                      else f"{m}\n({NO_VALUE}: no objects)" for m in METRICS])
    ax.set_ylabel(f"metric on {test_set}")
    title = f"Demo: teacher vs baseline student vs {method}-distilled student"
    ax.set_title(title + ("\nSMOKE RUN (--quick): the loop works; not a measure of the gain"
                          if smoke else ""), color="firebrick" if smoke else "black")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"results{suffix}.png"), dpi=120)
    plt.close(fig)
    return md


def main(argv=None):
    from csgr_distill.cli import add_debug_argument
    from csgr_distill.data import add_dataset_arguments

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default=DEFAULT_METHOD, metavar="NAME",
                        help="the distillation method of the distilled student (default "
                             f"{DEFAULT_METHOD}): a registered distiller with a demo config "
                             f"{DEMO_CFG}/<NAME>{METHOD_CONFIG_SUFFIX}")
    parser.add_argument("--teacher-iters", type=int, default=None,
                        help="override SOLVER.MAX_ITER of the teacher (default: its config)")
    parser.add_argument("--student-iters", type=int, default=None,
                        help="override SOLVER.MAX_ITER of both students (default: their config)")
    add_dataset_arguments(parser)
    parser.add_argument("--train", default=None, metavar="NAME",
                        help="train every model on this dataset (default shapes_train); the class "
                             "count follows its classes")
    parser.add_argument("--test", default=None, metavar="NAME",
                        help="evaluate and draw on this dataset (default shapes_val)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: teacher {QUICK_ITERS['teacher']} and students "
                             f"{QUICK_ITERS['student']} iterations, everything (table, chart, "
                             f"pictures) under {QUICK_ROOT}/, labelled as a smoke run; a few "
                             "minutes instead of ~40 on a 2-core CPU")
    parser.add_argument("--no-teacher-check", action="store_true",
                        help="skip the teacher check (before distilling: a loud warning when the "
                             "teacher does not beat the baseline student)")
    add_debug_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE overrides for every model, e.g. INPUT.FIXED_SIZE 256")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    method = check_method(args.method)  # before anything trains
    models = models_for(method)
    distilled = distilled_name(method)
    suffix = "" if method == DEFAULT_METHOD else "_" + method.lower()
    out_dir = QUICK_ROOT if args.quick else DEFAULT_ROOT
    os.makedirs(out_dir, exist_ok=True)
    teacher_iters, student_iters = args.teacher_iters, args.student_iters
    if args.quick:
        teacher_iters = teacher_iters or QUICK_ITERS["teacher"]
        student_iters = student_iters or QUICK_ITERS["student"]

    def iters_opts(n):
        # the lr steps at the same fractions of the schedule (csgr_distill.config.scale_schedule)
        return [] if n is None else ["SOLVER.MAX_ITER", str(n), "SOLVER.STEPS", "(0.8, 0.95)"]

    stages = ["data", "teacher", "baseline", "check", "distill", "eval", "report"]
    progress = Progress(stages, scale=QUICK_SCALE if args.quick else 1.0)
    common = []

    def data():
        import csgr_distill.data as D
        from detectron2.data import DatasetCatalog

        # the students distil from this run's teacher (the yamls name output/demo/teacher)
        common[:] = (D.pipeline_overrides(args.register_dataset, args.train, args.test)
                     + ["MODEL.DISTILL.TEACHER.WEIGHTS", weights_of("teacher R18-wide", models,
                                                                      out_dir)]
                     + list(args.opts))
        return {s: len(DatasetCatalog.get(n)) for s, n in (("train", train_set), ("val", test_set))}

    train_set, test_set = args.train or "shapes_train", args.test or "shapes_val"
    sizes = progress.run("data", "register / generate the data", data)
    print(f"      {train_set}: {sizes['train']} images, {test_set}: {sizes['val']} images")
    if args.quick:
        print(f"      smoke run (--quick): teacher {teacher_iters}, students {student_iters} "
              f"iterations, into {out_dir}/")
    progress.run("teacher", "train teacher (RetinaNet R18-FPN, wide FPN and head)",
                 lambda: train(models["teacher R18-wide"][0], models["teacher R18-wide"][1],
                               common + iters_opts(teacher_iters), out_dir))
    progress.run("baseline", "train baseline student (RetinaNet R18-FPN)",
                 lambda: train(models["student R18 (baseline)"][0],
                               models["student R18 (baseline)"][1],
                               common + iters_opts(student_iters), out_dir))
    results = {}

    def check():
        for name in ("teacher R18-wide", "student R18 (baseline)"):
            results[name] = evaluate(name, common, models, out_dir)
        if not args.no_teacher_check:
            from csgr_distill.cli import load_config
            from csgr_distill.evaluation.teacher_check import teacher_check

            cfg = load_config(os.path.join(DEMO_CFG, models[distilled][0]), common,
                              check_steps=False)
            teacher_check(cfg, baseline_ap=results["student R18 (baseline)"]["AP"],
                          teacher_ap=results["teacher R18-wide"]["AP"], dataset_name=test_set)

    progress.run("check", f"evaluate teacher and baseline on {test_set}, teacher check", check)
    # OUTPUT_DIR given, not left to the method's yaml: the evaluation reads the run from there
    progress.run("distill", f"train {method} student (RetinaNet R18-FPN <- wide R18 teacher)",
                 lambda: train(models[distilled][0], models[distilled][1],
                               common + iters_opts(student_iters), out_dir))
    progress.run("eval", f"evaluate the {method} student on {test_set} (--eval-only)",
                 lambda: results.update({distilled: evaluate(distilled, common, models,
                                                             out_dir)}))
    results = {n: results[n] for n in models}

    def report():
        from csgr_distill.config import add_distill_config  # noqa: F401
        from detectron2.config import get_cfg

        cfg = get_cfg()
        add_distill_config(cfg)
        cfg.merge_from_file(os.path.join(DEMO_CFG, "student-RetinaNet-R18.yaml"))
        iters = student_iters or cfg.SOLVER.MAX_ITER
        md = write_report(results, out_dir, iters, train_set, test_set, method, suffix,
                          smoke=args.quick)
        # ground truth | teacher | student, each model's 10 best boxes >= 0.05 (the students'
        # scores are low: a fixed 0.4 threshold would show nothing), the method's own pictures
        # (tools/visualize.py draws what it can for that config, e.g. CSGR's attention maps; the
        # training checkpoint holds the distiller's parts); then the same images for the
        # baseline student, to compare
        for name, weights, vis_dir, log in (
                (distilled, student_dir(method, out_dir) + "/model_final.pth", "vis" + suffix,
                 "visualize" + suffix),
                ("student R18 (baseline)", weights_of("student R18 (baseline)", models, out_dir),
                 os.path.join("vis" + suffix, "baseline"), "visualize_baseline" + suffix)):
            run_tool(["tools/visualize.py", "--config-file", os.path.join(DEMO_CFG,
                                                                           models[name][0]),
                      "--weights", weights, "--dataset", test_set, "--num-images", "3",
                      "--top-k", "10", "--score-floor", "0.05",
                      "--output", os.path.join(out_dir, vis_dir)] + common,
                     os.path.join(out_dir, "logs", log + ".log"))
        return md

    md = progress.run("report", "write table, chart and visualizations", report)
    print()
    print(md)
    print()
    print(f"Written: {out_dir}/results{suffix}.md, results{suffix}.json, results{suffix}.png, "
          f"vis{suffix}/*.png (baseline student: vis{suffix}/baseline/), logs/*.log")
    print(f"Total time {fmt(time.time() - progress.t0)}. Benchmarks of every method: README "
          "'Results' (tools/benchmark.py).")
    if args.quick:
        print(f"{SMOKE_LABEL}. The full demo: tools/demo.py (make demo).")


if __name__ == "__main__":
    from csgr_distill.cli import run_cli

    sys.exit(run_cli(main))
