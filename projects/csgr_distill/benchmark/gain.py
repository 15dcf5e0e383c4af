"""gain: on the embedded ``shapes`` data, train the teacher once, then the baseline student and the
student under every registered distiller (plus CSGR's options and selected combinations) for the
same iterations over several seeds; AP mean +- std, gain over the baseline, share of the
teacher-student gap closed, AP-vs-iteration curves.

Every run is a call of ``tools/train_net.py`` (the user's path), with the demo configs
(``configs/demo/``: wide R18 teacher, R18 student, 128 px images).

Cache. Finished runs are kept in the work folder, so an interrupted benchmark continues, and are
reused only when everything that defines them is unchanged. Each run has a *key material* (a
JSON-able dict: what defines the run, see :func:`student_material` and :func:`train_teacher`) and
a *key*, the first 12 hex digits of its sha1 (:func:`cache_key`); the key is part of the folder:

* ``<work>/teacher-<key>/``       the trained teacher (``model_final.pth``, ``final.json``)
* ``<work>/teacher_eval-<key>/``  its evaluation (``final.json``)
* ``<work>/runs/<label>/seed<k>-<key>/``  one student run (``final.json``)

``final.json`` is ``{"key": str, "key_material": dict, "result": dict}``; a folder is reused only
if its ``final.json`` holds the same material. Folders of the old layout (no key) are never read.
A student is keyed by its iterations, seed, eval points, overrides, merged config, the data's
content (:func:`data_material`: the annotation files' sha1 and the image list with file sizes of
the training and test sets; none for the generated ``shapes`` sets), the teacher
(sha1 of the weights file, teacher config, teacher iterations; none when distillation is off: the
baseline never builds the teacher), the code (:func:`code_version`) and the torch/detectron2
versions; the teacher by its training set's content too, its evaluation by the test set's.
Every result says whether it came from the cache (``"cached": true``), and so do the progress
lines and the markdown (a "cached runs" footnote and the teacher line).

Resuming. Every run saves a checkpoint each :data:`CHECKPOINT_PERIOD` iterations; a run killed
before it finished (a session's end, a lost machine) continues from its last checkpoint when the
same command runs again (``train_net.py --resume``), so it loses at most that many iterations.
A resumed run is not bit-identical to an uninterrupted one (the data order and random states
restart at the checkpoint), so it says so: ``"resumed_from": [iteration, ...]`` in its result,
on its progress line and in a "resumed runs" footnote (the teacher: on its line).

Sharing a work folder. Several invocations may run at once on one work folder (e.g. one per core,
each ``OMP_NUM_THREADS=1``): each run is trained under its folder's lock (:mod:`.run_lock`). A
student run another invocation is training is left for later: this invocation trains the next
one, then comes back, waits for the other to finish it and reads it from the cache. The teacher
and the backbone runs are waited for (everything after them needs them).
"""
import hashlib
import json
import math
import os
import re
import shlex
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from ..cli import load_config, run_tool
from ..data.fingerprint import dataset_fingerprint, file_sha1
from ..distillers import pair_problem
from ..records import DetectorSpec
from ..evaluation.teacher_check import teacher_check
from ..teacher import REPO_ROOT, build_teacher_cfg
from .common import (NO_VALUE, header_lines, machine_info, markdown_table,
                     method_variants, missing, number_cell, write_results)
from .run_lock import RunBusy, run_lock

TEACHER_CFG = "configs/demo/teacher-RetinaNet-R18-wide.yaml"
STUDENT_CFG = "configs/demo/CSGR-RetinaNet-R18.yaml"
#: ``--detector`` -> (teacher config, student config, description); every method run overrides
#: the student config's MODEL.DISTILL.METHODS
DETECTORS = {
    "retinanet": (TEACHER_CFG, STUDENT_CFG, "teacher RetinaNet R18-FPN wide, students RetinaNet "
                                            "R18-FPN"),
    "rcnn": ("configs/demo/teacher-FasterRCNN-R18-wide.yaml",
             "configs/demo/TAR-FasterRCNN-R18.yaml",
             "teacher Faster R-CNN R18-FPN wide, students Faster R-CNN R18-FPN"),
    "retinanet-dist": ("configs/demo/teacher-RetinaNet-Dist-R18-wide.yaml",
                       "configs/demo/LD-RetinaNet-Dist-R18.yaml",
                       "teacher RetinaNet R18-FPN wide, students RetinaNet R18-FPN, both with "
                       "the distribution box branch (DistributionRetinaNet)"),
    "detr": ("configs/demo/teacher-DETR-R18-wide.yaml", "configs/demo/DETRDistill-DETR-R18.yaml",
             "teacher DETR R18 (3 encoder layers, FFN 512, 3.3x the iterations), students DETR "
             "R18 (d_model 128, 2 + 2 layers)"),
    "deformable-detr": ("configs/demo/teacher-DeformableDETR-R18-wide.yaml",
                        "configs/demo/DETRDistill-DeformableDETR-R18.yaml",
                        "teacher Deformable DETR R18 (3 encoder layers, FFN 512, 3.3x the "
                        "iterations), students Deformable DETR R18 (d_model 128, 2 + 2 layers)"),
}
#: ``--detector`` -> the pair whose trained models give its ResNets (``MODEL.BACKBONE_WEIGHTS``):
#: a DETR is never trained from a random backbone in practice, and from scratch the demo DETRs
#: learn next to nothing in a CPU budget (docs/results/detr-shapes.md). The teacher starts from
#: that pair's teacher's R18, every student (distilled or not, every seed) from its seed-0
#: baseline student's R18: one initialisation for all students.
BACKBONES_FROM = {"detr": "retinanet", "deformable-detr": "retinanet"}
BASELINE = "baseline (no distillation)"
METRICS = ("AP", "AP50", "AP75")
def method_runs(selected: Optional[List[str]] = None,
                extra: Optional[Dict[str, List]] = None,
                detector: str = "retinanet", base=None) -> Dict[str, List]:
    """label -> cfg overrides: the baseline, then every registered distiller and the variants it
    declares for ``gain`` (:func:`~csgr_distill.benchmark.common.method_variants`), kept where
    the ``detector`` pair supports them: the methods' own build-time checks on the pair's
    configs decide (:func:`~csgr_distill.distillers.pair_problem`; ``base``: the students'
    config, default :func:`student_cfg` of the detector). ``selected`` filters by label;
    ``extra`` (label -> overrides, e.g. a loss-weight sweep) is run besides whatever is
    selected, unchecked (a bad one fails before training in :func:`check_overrides`)."""
    if base is None:
        base = student_cfg((), DETECTORS[detector][1])
    family = DetectorSpec.from_cfg(base).family
    runs = {BASELINE: ["MODEL.DISTILL.ENABLED", False]}
    for label, opts in method_variants("gain", family).items():
        cfg = base.clone()
        cfg.merge_from_list(_opts_str(opts))
        cfg.MODEL.DISTILL.ENABLED = True
        if pair_problem(cfg) is None:
            runs[label] = opts
    if selected is not None:
        unknown = [s for s in selected if s not in runs]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; available on the {detector} pair: "
                             f"{list(runs)}")
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


def student_cfg(data_opts: Sequence[str] = (), config: Optional[str] = None):
    """The students' config (``config``, default :data:`STUDENT_CFG`) as ``train_net.py`` reads
    it (before per-run overrides), with the ``data_opts`` of
    :func:`csgr_distill.data.pipeline_overrides`."""
    return load_config(os.path.join(REPO_ROOT, config or STUDENT_CFG), _opts_str(data_opts),
                       check_steps=False)


def check_overrides(plan: Dict[str, List], base=None) -> None:
    """Fail before any training if a run's overrides are not valid keys/values of the student
    config (a typo in ``--variant`` would otherwise surface only after the teacher is trained)."""
    base = base if base is not None else student_cfg()
    for label, opts in plan.items():
        cfg = base.clone()
        try:
            cfg.merge_from_list(_opts_str(opts))
        except Exception as e:  # yacs raises KeyError/ValueError/AssertionError
            raise SystemExit(f"gain run {label!r}: bad config override {opts}: {e!r}") from e


def _train_net(args: List[str], log_path: str) -> None:
    """``tools/train_net.py args``: its whole output to ``log_path``, detectron2's progress lines
    (iteration, losses, ETA; evaluation progress) to the console as they come; a failure is one
    error with the run's own message (:func:`csgr_distill.cli.run_tool`)."""
    print(f"      running tools/train_net.py{' --eval-only' if '--eval-only' in args else ''}, "
          f"log {log_path}", flush=True)
    run_tool([sys.executable, os.path.join(REPO_ROOT, "tools/train_net.py")]
             + [str(a) for a in args], log_path, cwd=REPO_ROOT, name="train_net.py")


def _opts_str(opts: List) -> List[str]:
    return [str(o) for o in opts]


def _read_curve(metrics_json: str, iters: int) -> List[Tuple[int, Dict[str, float]]]:
    """(iterations trained, {AP, AP50, AP75}) of every evaluation logged in a metrics.json of a
    run of ``iters`` iterations, in iteration order. A periodic evaluation is logged at the
    0-based iteration it follows (199: after 200 iterations), the final one at ``iters`` itself
    (detectron2 sets the storage's iteration to ``max_iter`` for ``after_train``): both are
    counted in iterations trained (:func:`curve_point`). A resumed run logs again from its
    checkpoint on (detectron2 appends to the file): for an iteration logged twice the later row
    wins."""
    curve = {}
    with open(metrics_json) as f:
        for line in f:
            row = json.loads(line)
            if "bbox/AP" in row:
                curve[curve_point(row["iteration"], iters)] = {m: row[f"bbox/{m}"]
                                                                for m in METRICS}
    return sorted(curve.items())


def curve_point(logged_iteration: int, iters: int) -> int:
    """Iterations trained when an evaluation logged at ``logged_iteration`` ran: the logged
    iteration + 1, but ``iters`` for the final evaluation, which is logged at ``iters``. Runs
    stored before this was known have their final point at ``iters + 1``; they are read through
    this too."""
    return min(logged_iteration + 1, iters)


def eval_points_of(iters: int, period: int) -> List[int]:
    """The iterations after which detectron2's EvalHook evaluates a run of ``iters`` iterations
    with ``TEST.EVAL_PERIOD`` ``period``: every multiple of ``period`` below ``iters``, and
    ``iters``."""
    return sorted(set(range(period, iters, period)) | {iters})


# ----------------------------------------------------------------------------------------------
# resuming


#: SOLVER.CHECKPOINT_PERIOD of every gain run: a killed run loses at most this many iterations.
#: Not part of the key material: saving weights does not change what is trained.
CHECKPOINT_PERIOD = 200
_PERIODIC = re.compile(r"model_(\d{7})\.pth")


def resume_point(rdir: str, iters: int) -> Optional[int]:
    """The iteration a killed run in ``rdir`` continues from: what its last checkpoint holds
    (``model_0000399.pth`` -> 400, ``model_final.pth`` -> ``iters``), None when it has none."""
    try:
        with open(os.path.join(rdir, "last_checkpoint")) as f:
            name = f.read().strip()
    except OSError:
        return None
    if not os.path.isfile(os.path.join(rdir, name)):
        return None
    if name == "model_final.pth":
        return iters
    m = _PERIODIC.fullmatch(name)
    return int(m.group(1)) + 1 if m else None


def _train_resumable(config: str, args: List, rdir: str, iters: int) -> List[int]:
    """``train_net.py --config-file config args`` into ``rdir`` with checkpoints every
    :data:`CHECKPOINT_PERIOD` iterations; continued with ``--resume`` when an earlier attempt left
    a checkpoint there, else started in a cleaned folder (a killed run's ``metrics.json``, to
    which detectron2 would append, is removed). Returns every iteration this run was resumed
    from, over all its attempts (kept in ``<rdir>/resumed_from.json``; [] for a run that never
    was)."""
    record = os.path.join(rdir, "resumed_from.json")
    start = resume_point(rdir, iters)
    if start is None:
        for stale in ("metrics.json", "resumed_from.json"):
            if os.path.exists(os.path.join(rdir, stale)):
                os.remove(os.path.join(rdir, stale))
        resumed: List[int] = []
    else:
        try:
            with open(record) as f:
                resumed = json.load(f)
        except (OSError, ValueError):
            resumed = []
        resumed.append(start)
        with open(record, "w") as f:
            json.dump(resumed, f)
    train_args = ["--config-file", config] + _opts_str(args) + [
        "SOLVER.CHECKPOINT_PERIOD", CHECKPOINT_PERIOD, "OUTPUT_DIR", rdir]
    log = "train.log" if start is None else f"train-resumed-at-{start}.log"
    _train_net((["--resume"] if start is not None else []) + train_args,
               os.path.join(rdir, log))
    return resumed


def _remove_periodic_checkpoints(rdir: str) -> None:
    """Delete a finished run's ``model_<iteration>.pth`` files (``model_final.pth`` stays)."""
    for name in os.listdir(rdir):
        if _PERIODIC.fullmatch(name):
            os.remove(os.path.join(rdir, name))


def _fill_curve(curve: List[Tuple[int, Dict[str, float]]], expected: List[int], rdir: str,
                config: str, run_opts: List) -> List[Tuple[int, Dict[str, float]]]:
    """A run killed while it evaluated after iteration ``p`` resumes from its checkpoint of ``p``
    (saved just before that evaluation) and does not evaluate ``p`` again: evaluate that
    checkpoint now (``--eval-only``), so every run has the same curve points. Points without a
    checkpoint stay missing."""
    have = {it for it, _ in curve}
    added = []
    for p in expected:
        ckpt = os.path.join(rdir, f"model_{p - 1:07d}.pth")
        if p in have or not os.path.isfile(ckpt):
            continue
        out = os.path.join(rdir, f"eval_at_{p}")
        _train_net(["--config-file", config, "--eval-only"] + _opts_str(run_opts)
                   + ["MODEL.WEIGHTS", ckpt, "OUTPUT_DIR", out], os.path.join(out, "eval.log"))
        with open(os.path.join(out, "eval_results.json")) as f:
            bbox = json.load(f)["bbox"]
        # eval_results.json is strict JSON (null for no value); metrics.json rows have NaN
        added.append((p, {m: float("nan") if bbox[m] is None else bbox[m] for m in METRICS}))
    return sorted(curve + added)


def _schedule(iters: Optional[int]) -> List:
    """Overrides for ``iters`` iterations with lr steps at 80 % and 95 % (none: the config's)."""
    if not iters:
        return []
    return ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", f"({int(iters * .8)},{int(iters * .95)})"]


# ----------------------------------------------------------------------------------------------
# cache keys


#: what the training code is: the package minus the parts training never imports, plus the script
CODE_DIRS = ("projects/csgr_distill",)
CODE_EXCLUDE = ("projects/csgr_distill/benchmark", "projects/csgr_distill/vis")
CODE_FILES = ("tools/train_net.py",)


def data_material(cfg, keys: Sequence[str] = ("TRAIN", "TEST")) -> Dict[str, dict]:
    """name -> :func:`csgr_distill.data.dataset_fingerprint` (the annotation files' sha1, the
    image list with file sizes) of every set of ``cfg.DATASETS.<key>`` that has one. The
    generated ``shapes`` sets have none (their content follows from the code, keyed by
    :func:`code_version`), so the material of a run on them is what it was before datasets were
    fingerprinted, and so is its key."""
    return {name: fp for key in keys for name in cfg.DATASETS[key]
            for fp in [dataset_fingerprint(name)] if fp is not None}


def _with_data(material: dict, cfg, keys: Sequence[str]) -> dict:
    """``material`` plus ``"data"``: :func:`data_material`, when any set has a fingerprint."""
    data = data_material(cfg, keys)
    return dict(material, data=data) if data else material


def code_version() -> str:
    """sha1 hex digest of the training code: every ``*.py`` under ``projects/csgr_distill`` except
    ``benchmark/`` and ``vis/``, plus ``tools/train_net.py``. Each file adds its path relative to
    the repository root and its bytes, in sorted path order, so the digest does not depend on
    where the clone lives, and any edit of a source training imports changes it."""
    paths = list(CODE_FILES)
    for top in CODE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO_ROOT, top)):
            rel_dir = os.path.relpath(dirpath, REPO_ROOT)
            dirnames[:] = [d for d in dirnames if d != "__pycache__"
                           and os.path.join(rel_dir, d) not in CODE_EXCLUDE]
            paths += [os.path.join(rel_dir, n) for n in filenames if n.endswith(".py")]
    h = hashlib.sha1()
    for rel in sorted(paths):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(REPO_ROOT, rel), "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


def libraries() -> Dict[str, str]:
    """Versions of the libraries training runs on ({"torch": ..., "detectron2": ...})."""
    import detectron2
    import torch

    return {"torch": torch.__version__, "detectron2": detectron2.__version__}


def omp_threads() -> Optional[str]:
    """``OMP_NUM_THREADS`` as the runs' ``train_net.py`` processes inherit it (None: unset, torch's
    default of the machine's cores). The intra-op thread count changes the order of float sums,
    so a CPU run trained with 1 thread ends at other numbers than with 2: every key holds it, and
    a set value names the results section (:func:`results_name`)."""
    return os.environ.get("OMP_NUM_THREADS") or None


def cache_key(material: dict) -> str:
    """12 hex digits of the sha1 of ``material`` as canonical JSON (sorted keys)."""
    return hashlib.sha1(_canonical(material).encode()).hexdigest()[:12]


def _canonical(material: dict) -> str:
    return json.dumps(material, sort_keys=True, separators=(",", ":"))


def _config_text(cfg) -> str:
    """A merged CfgNode as YAML text (``cfg.dump()``, keys sorted) with ``OUTPUT_DIR`` and the
    teacher's weights path blanked: they only name cache folders (the weights are keyed by the
    sha1 of their bytes instead)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = ""
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    if cfg.MODEL.get("BACKBONE_WEIGHTS", ""):
        cfg.MODEL.BACKBONE_WEIGHTS = "<keyed by the sha1 of its bytes>"
    return cfg.dump()


def _load_cached(rdir: str, material: dict) -> Optional[dict]:
    """The result stored in ``<rdir>/final.json`` if it was made with exactly ``material``, else
    None (missing, unreadable, or another material)."""
    try:
        with open(os.path.join(rdir, "final.json")) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or "key_material" not in stored:
        return None
    if _canonical(stored["key_material"]) != _canonical(material):
        return None
    return stored["result"]


def _store(rdir: str, material: dict, result: dict) -> None:
    """Write ``<rdir>/final.json`` = {"key", "key_material", "result"} (atomically)."""
    os.makedirs(rdir, exist_ok=True)
    tmp = os.path.join(rdir, "final.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"key": cache_key(material), "key_material": material, "result": result}, f,
                  indent=1)
    os.replace(tmp, os.path.join(rdir, "final.json"))


# ----------------------------------------------------------------------------------------------
# runs


def teacher_cfg(opts: List, config: Optional[str] = None):
    """The teacher's config (``config``, default :data:`TEACHER_CFG`) as ``train_net.py`` reads
    it with ``opts``."""
    return load_config(os.path.join(REPO_ROOT, config or TEACHER_CFG), _opts_str(opts),
                       check_steps=False)


def train_teacher(out: str, iters: Optional[int], weights: Optional[str], code: str,
                  data_opts: Sequence[str] = (), config: Optional[str] = None,
                  backbone: Optional[str] = None, progress=print) -> dict:
    """The teacher: trained here (``iters``, None: its config's) unless ``weights`` are given, and
    evaluated; both steps are cached under keys (module docstring). ``data_opts``: the data
    overrides of every run (:func:`csgr_distill.data.pipeline_overrides`); ``backbone``: a
    checkpoint whose ResNet starts the teacher's (``MODEL.BACKBONE_WEIGHTS``, keyed by the sha1
    of its bytes). Training and evaluation each wait while another invocation holds their folder
    (``progress`` says so), then read its result from the cache.

    Returns {"AP", "AP50", "AP75": float, "weights": path, "weights_sha1": str, "iters": int or
    None (given weights), "given": bool, "cached": bool (nothing was trained or evaluated now),
    "train_cached": bool or None (given), "eval_cached": bool, "train_key", "eval_key": str,
    "resumed_from": [iteration, ...] (module docstring)}.
    """
    info = {"given": bool(weights), "train_cached": None, "train_key": None, "iters": None,
            "resumed_from": []}
    if not weights:
        opts = list(data_opts) + ["DATASETS.TEST", "()"] + _schedule(iters)
        if backbone:
            opts += ["MODEL.BACKBONE_WEIGHTS", backbone]
        config = config or TEACHER_CFG
        cfg = teacher_cfg(opts, config)
        material = _with_data({"run": "teacher", "iters": int(cfg.SOLVER.MAX_ITER),
                               "overrides": _opts_str(opts), "config": _config_text(cfg),
                               "code": code, "libraries": libraries(),
                               "omp_num_threads": omp_threads()}, cfg, ("TRAIN",))
        if backbone:
            material["backbone_weights_sha1"] = file_sha1(backbone)
        tdir = os.path.join(out, f"teacher-{cache_key(material)}")
        weights = os.path.join(tdir, "model_final.pth")
        with run_lock(tdir, on_wait=_waiting(progress, f"the teacher ({config})")):
            stored = _load_cached(tdir, material)
            done = stored is not None and os.path.isfile(weights)
            if not done:
                resumed = _train_resumable(config, opts, tdir, material["iters"])
                _remove_periodic_checkpoints(tdir)
                stored = {"weights": "model_final.pth", "resumed_from": resumed}
                _store(tdir, material, stored)
        info.update(train_cached=done, train_key=cache_key(material), iters=material["iters"],
                    resumed_from=stored.get("resumed_from", []))
    sha1 = file_sha1(weights)
    opts = list(data_opts) + ["MODEL.WEIGHTS", weights]
    eval_cfg = teacher_cfg(list(data_opts), config)
    material = _with_data({"run": "teacher eval", "weights_sha1": sha1,
                           "config": _config_text(eval_cfg), "code": code,
                           "libraries": libraries(), "omp_num_threads": omp_threads()},
                          eval_cfg, ("TEST",))
    eval_dir = os.path.join(out, f"teacher_eval-{cache_key(material)}")
    with run_lock(eval_dir, on_wait=_waiting(progress, "the teacher's evaluation")):
        metrics = _load_cached(eval_dir, material)
        info["eval_cached"] = metrics is not None
        if metrics is None:
            _train_net(["--config-file", config or TEACHER_CFG, "--eval-only"] + opts
                       + ["OUTPUT_DIR", eval_dir],
                       os.path.join(eval_dir, "eval.log"))
            with open(os.path.join(eval_dir, "eval_results.json")) as f:
                bbox = json.load(f)["bbox"]
            metrics = {m: bbox[m] for m in METRICS}
            _store(eval_dir, material, metrics)
    info.update(metrics, weights=weights, weights_sha1=sha1, eval_key=cache_key(material),
                cached=info["eval_cached"] and info["train_cached"] is not False)
    return info


def student_material(base_cfg, run_opts: List, opts: List, seed: int, iters: int,
                     eval_points: int, teacher: dict, code: str) -> dict:
    """What defines one student run, as a JSON-able dict: {"run": "student", "iters", "seed",
    "eval_points", "overrides" (the run's own, as strings), "config" (the merged student config
    as YAML text, :func:`_config_text`), "teacher", "code", "libraries", "omp_num_threads"
    (:func:`omp_threads`)} and "data" (the
    training and test sets' :func:`data_material`, when they have one).

    ``run_opts`` are all overrides given to ``train_net.py`` besides OUTPUT_DIR (seed, schedule,
    eval period, teacher weights, then ``opts``). ``teacher`` is None when the merged config has
    distillation off (the student then never builds the teacher), else {"weights_sha1",
    "iters" (None: given weights), "config" (the teacher config as the student builds it, from
    MODEL.DISTILL.TEACHER.CONFIG and .OPTS, as YAML text)}.
    """
    cfg = base_cfg.clone()
    cfg.merge_from_list(_opts_str(run_opts))
    used_teacher = None
    if cfg.MODEL.DISTILL.ENABLED:
        keyed = cfg.clone()
        keyed.MODEL.DISTILL.TEACHER.WEIGHTS = ""  # -> the teacher yaml's own MODEL.WEIGHTS
        used_teacher = {"weights_sha1": teacher["weights_sha1"], "iters": teacher["iters"],
                        "config": _config_text(build_teacher_cfg(keyed))}
    material = _with_data({"run": "student", "iters": iters, "seed": seed,
                           "eval_points": eval_points, "overrides": _opts_str(opts),
                           "config": _config_text(cfg), "teacher": used_teacher, "code": code,
                           "libraries": libraries(), "omp_num_threads": omp_threads()},
                          cfg, ("TRAIN", "TEST"))
    if cfg.MODEL.get("BACKBONE_WEIGHTS", ""):
        material["backbone_weights_sha1"] = file_sha1(cfg.MODEL.BACKBONE_WEIGHTS)
    return material


def _folder(label: str) -> str:
    return label.replace(" ", "_").replace("+", "_").replace("/", "_")


def _waiting(progress, what: str):
    """``on_wait`` of :func:`run_lock`: one progress line naming the run and its holder."""
    return lambda holder: progress(f"[gain] {what}: being trained by another invocation "
                                   f"({holder}); waiting for it")


def run_student(out: str, label: str, opts: List, seed: int, teacher: dict, iters: int,
                eval_points: int, code: str, base_cfg=None, data_opts: Sequence[str] = (),
                config: Optional[str] = None, backbone: Optional[str] = None,
                wait: bool = True, progress=print, teacher_opts: Sequence[str] = ()) -> dict:
    """One student run of ``iters`` iterations under the ``teacher`` of :func:`train_teacher`,
    from the cache (``<out>/runs/<label>/seed<seed>-<key>/final.json``) when its key material
    matches, else trained now.

    ``backbone``: a checkpoint whose ResNet starts the student's (``MODEL.BACKBONE_WEIGHTS``).
    ``teacher_opts``: the overrides the teacher was trained with beyond its yaml (``--opts``); a
    distilled student builds its teacher with them (appended to ``MODEL.DISTILL.TEACHER.OPTS``),
    or a teacher trained with e.g. ``MODEL.DETR.WITH_BOX_REFINE True`` would not load.
    While another invocation trains this run (its folder's lock, :mod:`.run_lock`): ``wait``
    True waits for it (``progress`` says so) and reads its result, False raises
    :class:`~.run_lock.RunBusy`.

    Returns {"final": {AP, AP50, AP75}, "curve": [(iteration, {AP, AP50, AP75}), ...], "seed",
    "label", "iters", "key": str, "cached": bool, "resumed_from": [iteration, ...], "weights":
    the run's final checkpoint}.
    """
    config = config or STUDENT_CFG
    base_cfg = base_cfg if base_cfg is not None else student_cfg(data_opts, config)
    run_opts = (_opts_str(data_opts) + ["SEED", seed, "TEST.EVAL_PERIOD", max(1, iters // eval_points),
                 "MODEL.DISTILL.TEACHER.WEIGHTS", teacher["weights"]] + _schedule(iters)
                + (["MODEL.BACKBONE_WEIGHTS", backbone] if backbone else []) + _opts_str(opts))
    if teacher_opts:
        merged = base_cfg.clone()
        merged.merge_from_list(_opts_str(run_opts))
        if merged.MODEL.DISTILL.ENABLED:  # the baseline builds no teacher: its key stays
            run_opts += ["MODEL.DISTILL.TEACHER.OPTS",
                         repr(list(merged.MODEL.DISTILL.TEACHER.OPTS) + _opts_str(teacher_opts))]
    material = student_material(base_cfg, run_opts, opts, seed, iters, eval_points, teacher, code)
    key = cache_key(material)
    rdir = os.path.join(out, "runs", _folder(label), f"seed{seed}-{key}")
    with run_lock(rdir, wait, _waiting(progress, f"seed {seed} {label}")):
        return _student_result(rdir, material, key, label, seed, iters, eval_points, config,
                               run_opts)


def _student_result(rdir: str, material: dict, key: str, label: str, seed: int, iters: int,
                    eval_points: int, config: str, run_opts: List) -> dict:
    """:func:`run_student`'s work once it holds the run's folder: cached, or trained now."""
    result = _load_cached(rdir, material)
    if result is not None:
        # the final point of runs stored before curve_point was at iters + 1
        curve = [(curve_point(it - 1, iters), c) for it, c in result["curve"]]
        return dict(result, curve=curve, cached=True,
                    resumed_from=result.get("resumed_from", []),
                    weights=os.path.join(rdir, "model_final.pth"))
    resumed = _train_resumable(config, run_opts, rdir, iters)
    curve = _read_curve(os.path.join(rdir, "metrics.json"), iters)
    if resumed:
        period = max(1, iters // eval_points)
        curve = _fill_curve(curve, eval_points_of(iters, period), rdir, config, run_opts)
    _remove_periodic_checkpoints(rdir)
    result = {"final": curve[-1][1], "curve": curve, "seed": seed, "label": label,
              "iters": iters, "key": key, "resumed_from": resumed}
    _store(rdir, material, result)
    return dict(result, cached=False, weights=os.path.join(rdir, "model_final.pth"))


def _mean_std(xs: List[float]) -> Tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def detected_nothing(metrics: Dict[str, float]) -> bool:
    """Whether an evaluation's AP is NaN: detectron2's COCOEvaluator reports NaN for every metric
    when the model made no detection at all ("No predictions from the model!")."""
    return math.isnan(metrics["AP"])


def ap_value(metrics: Dict[str, float], m: str) -> float:
    """Metric ``m`` of an evaluation, 0 for a model that detected nothing (no recall: AP 0 by
    COCO's definition; detectron2 reports NaN, which would make every mean over seeds NaN)."""
    return 0.0 if detected_nothing(metrics) else metrics[m]


def summarize(teacher: dict, runs: Dict[str, List[dict]]) -> List[dict]:
    """One row per label: AP/AP50/AP75 mean and sample std over seeds, gain over the baseline,
    share of the teacher-baseline gap closed, whether the gain exceeds 2 std, and
    ``no_detection_seeds`` (seeds whose final model detected nothing: counted as AP 0)."""
    base_ap = [ap_value(r["final"], "AP") for r in runs[BASELINE]]
    base_mean, base_std = _mean_std(base_ap)
    gap = teacher["AP"] - base_mean
    rows = []
    for label, rs in runs.items():
        row = {"method": label, "seeds": len(rs),
               "no_detection_seeds": [r["seed"] for r in rs if detected_nothing(r["final"])]}
        for m in METRICS:
            row[m], row[m + "_std"] = _mean_std([ap_value(r["final"], m) for r in rs])
        row["gain_AP"] = row["AP"] - base_mean
        row["gap_closed_percent"] = 100.0 * row["gain_AP"] / gap if gap > 0 else float("nan")
        row["gain_over_2std"] = row["gain_AP"] > 2 * max(row["AP_std"], base_std)
        rows.append(row)
    return rows


def plot(out_dir: str, teacher: dict, rows: List[dict], runs: Dict[str, List[dict]],
         test_set: str = "shapes_val", suffix: str = "") -> None:
    """``gain_ap<suffix>.png`` (AP per method) and ``gain_curves<suffix>.png`` (AP vs iteration,
    seeds' mean +- std) in ``out_dir``."""
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
    ax.set_ylabel(f"AP on {test_set} (mean ± std over seeds)")
    # bars start at 0: a raised floor would stretch the differences between methods
    ax.set_ylim(0, max(teacher["AP"], max(r["AP"] + (r["AP_std"] or 0) for r in rows)) + 2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"gain_ap{suffix}.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, rs) in enumerate(runs.items()):
        # the points every seed has (a killed run's lost evaluation may be missing)
        iters = sorted(set.intersection(*({it for it, _ in r["curve"]} for r in rs)))
        aps = np.array([[ap_value(dict(r["curve"])[it], "AP") for it in iters] for r in rs])
        mean, std = aps.mean(0), aps.std(0)
        color = "#777777" if label == BASELINE else f"C{i - 1}"
        ax.plot(iters, mean, marker="o", label=label, color=color)
        ax.fill_between(iters, mean - std, mean + std, alpha=0.15, color=color)
    ax.axhline(teacher["AP"], color="k", ls="--", lw=1, label="teacher")
    ax.set_xlabel("student iteration")
    ax.set_ylabel(f"AP on {test_set}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"gain_curves{suffix}.png"), dpi=120)
    plt.close(fig)


def mean_std_cell(mean, std) -> str:
    """``7.68 ± 0.61``; ``7.68 ± —`` for a std over one seed; :data:`NO_VALUE` without a mean."""
    if missing(mean):
        return NO_VALUE
    return f"{mean:.2f} ± {number_cell(std, '.2f')}"


def table_note(rows: List[dict]) -> str:
    """What a :data:`NO_VALUE` in the table means (an empty string when there is none), followed
    by a blank line."""
    notes = []
    if any(missing(r[m + "_std"]) and not missing(r[m]) for r in rows for m in METRICS):
        notes.append(f"{NO_VALUE} after ±: one seed, no standard deviation")
    if any(missing(r[m]) for r in rows for m in METRICS):
        notes.append(f"{NO_VALUE} : no value (no objects of that size in the validation set)")
    if any(missing(r["gap_closed_percent"]) for r in rows):
        notes.append(f"{NO_VALUE} in gap closed: the teacher does not beat the baseline student")
    for r in rows:
        if r.get("no_detection_seeds"):
            seeds = ",".join(str(k) for k in r["no_detection_seeds"])
            notes.append(f"{r['method']} seed{'s' if len(r['no_detection_seeds']) > 1 else ''} "
                         f"{seeds}: no detections at the end of training (detectron2 reports "
                         "NaN), counted as AP 0")
    return "".join(n + "\n" for n in notes) + ("\n" if notes else "")


def cached_note(runs: Dict[str, List[dict]]) -> str:
    """One markdown line naming the runs read from the cache, e.g. ``cached runs: CSGR seeds 0,1
    (trained by an earlier or a concurrent invocation with the same key: ...)``, or saying that
    none were."""
    parts = [f"{label} seeds {','.join(str(r['seed']) for r in rs if r['cached'])}"
             for label, rs in runs.items() if any(r["cached"] for r in rs)]
    if not parts:
        return "cached runs: none (every student run was trained in this invocation)"
    return ("cached runs: " + "; ".join(parts) + " (trained by an earlier or a concurrent "
            "invocation with the same key: iterations, seed, eval points, overrides, merged "
            "config, data, teacher, code, libraries, OMP_NUM_THREADS)")


def resumed_text(resumed: List[int]) -> str:
    """``resumed at iteration 400`` / ``resumed at iterations 400, 1200``; '' for none."""
    if not resumed:
        return ""
    return (f"resumed at iteration{'s' if len(resumed) > 1 else ''} "
            + ", ".join(str(i) for i in resumed))


def resumed_note(runs: Dict[str, List[dict]]) -> str:
    """One markdown line naming the student runs that were resumed from a checkpoint (an empty
    string when none was)."""
    parts = [f"{label} seed {r['seed']} ({resumed_text(r['resumed_from'])})"
             for label, rs in runs.items() for r in rs if r.get("resumed_from")]
    if not parts:
        return ""
    return ("resumed runs: " + "; ".join(parts) + " (killed, then continued from a checkpoint: "
            "not bit-identical to an uninterrupted run, whose data order and random states do "
            "not restart)")


def teacher_note(teacher: dict) -> str:
    """How the teacher was obtained, e.g. ``trained 2000 iterations (cached)``."""
    if teacher["given"]:
        how = f"given ({os.path.basename(teacher['weights'])}, sha1 {teacher['weights_sha1'][:12]})"
    else:
        how = f"trained {teacher['iters']} iterations"
        how += " (cached" if teacher["train_cached"] else " (in this invocation"
        resumed = resumed_text(teacher.get("resumed_from", []))
        how += (", " + resumed if resumed else "") + ")"
    return how + ", evaluation " + ("cached" if teacher["eval_cached"] else "run now")


def opts_tag(opts: Sequence[str]) -> str:
    """A file-name tag for ``--opts``: each key's last part and its value, lower case
    (``MODEL.DETR.WITH_BOX_REFINE True`` -> ``opts-with-box-refine-true``); the sha1's first 8
    digits instead when that is over 40 characters."""
    words = []
    for key, value in zip(opts[::2], opts[1::2]):
        words += [str(key).split(".")[-1], str(value)]
    tag = re.sub(r"[^a-z0-9.]+", "-", " ".join(words).lower()).strip("-")
    if len(tag) > 40:
        tag = hashlib.sha1(" ".join(map(str, opts)).encode()).hexdigest()[:8]
    return "opts-" + tag


def results_name(train_set: str, detector: str, iters: int, default_iters: int, teacher: dict,
                 t_config: str, data_opts: Sequence[str] = (),
                 opts: Sequence[str] = (), threads: Optional[str] = None) -> Tuple[str, str]:
    """The section of ``gain.json``/``gain.md`` and the suffix of the plot files of one setting,
    so that settings live side by side instead of replacing each other: the training set, the
    detector pair when it is not the default RetinaNet, the student iterations when they are not
    the student config's, the teacher's when a trained teacher's are not its config's, the
    ``--opts`` overrides of every run (:func:`opts_tag`), the runs' ``OMP_NUM_THREADS`` when set
    (``threads``: "1" -> "one torch thread", "4" -> "4 torch threads").

    ``("shapes_train", "rcnn", 2000, 600, {"iters": 6000, ...}, <2000-iteration config>)`` ->
    ``("shapes, rcnn, 2000 iterations, teacher 6000 iterations", "_rcnn_2000it_teacher6000it")``;
    the defaults -> ``("shapes", "")``."""
    parts, tags = [], []
    if detector != "retinanet":
        parts.append(detector)
        tags.append(detector)
    if iters != default_iters:
        parts.append(f"{iters} iterations")
        tags.append(f"{iters}it")
    if teacher["iters"] is not None:  # None: given weights
        if teacher["iters"] != int(teacher_cfg(list(data_opts), t_config).SOLVER.MAX_ITER):
            parts.append(f"teacher {teacher['iters']} iterations")
            tags.append(f"teacher{teacher['iters']}it")
    if opts:
        parts.append("--opts " + " ".join(map(str, opts)))
        tags.append(opts_tag(opts))
    if threads is not None:
        parts.append("one torch thread" if threads == "1" else f"{threads} torch threads")
        tags.append("one_thread" if threads == "1" else f"{threads}_threads")
    section = ", ".join(["shapes" if train_set == "shapes_train" else train_set] + parts)
    return section, "".join("_" + t for t in tags)


def pretrained_backbones(detector: str, work_dir: str, code: str, data_opts: Sequence[str],
                         eval_points: int, progress=print) -> Optional[Dict[str, str]]:
    """``{"teacher": checkpoint, "student": checkpoint}`` whose ResNets start the ``detector``
    pair's teacher and students (:data:`BACKBONES_FROM`): the source pair's teacher and its
    seed-0 baseline student at their configs' iterations, trained now or read from the cache
    like every other run (the same runs as that pair's own table, so they are shared). None for
    a pair trained from its configs' own initialisation."""
    source = BACKBONES_FROM.get(detector)
    if source is None:
        return None
    t_config, s_config, _ = DETECTORS[source]
    progress(f"[gain] backbones from the {source} pair: its teacher ({t_config}) and seed-0 "
             "baseline student")
    teacher = train_teacher(work_dir, None, None, code, data_opts, t_config, progress=progress)
    base = student_cfg(data_opts, s_config)
    student = run_student(work_dir, BASELINE, ["MODEL.DISTILL.ENABLED", False], 0, teacher,
                          int(base.SOLVER.MAX_ITER), eval_points, code, base, data_opts,
                          s_config, progress=progress)
    progress(f"[gain] backbones: teacher AP {teacher['AP']:.2f}"
             + (" (cached)" if teacher["cached"] else "") + f", baseline student AP "
             f"{student['final']['AP']:.2f}" + (" (cached)" if student["cached"] else ""))
    return {"teacher": teacher["weights"], "student": student["weights"]}


def run(out_dir: str, work_dir: str, seeds: int = 3, iters: Optional[int] = None,
        teacher_iters: Optional[int] = None, teacher_weights: Optional[str] = None,
        methods: Optional[List[str]] = None, variants: Optional[Dict[str, List]] = None,
        eval_points: int = 3, command: str = "", progress=print,
        data_opts: Sequence[str] = (), check_teacher: bool = True,
        detector: str = "retinanet", first_seed: int = 0, opts: Sequence[str] = ()) -> dict:
    """Train (or read from the cache) the teacher and every planned student run on seeds
    ``first_seed .. first_seed + seeds - 1``, write ``gain.json``/``gain.md`` and the plots to
    ``out_dir``; returns the payload {"machine", "setting", "teacher" (:func:`train_teacher`),
    "rows" (:func:`summarize`), "runs" (label -> [:func:`run_student` result per seed])}.

    ``data_opts``: overrides that move every run onto other data
    (:func:`csgr_distill.data.pipeline_overrides`; the results section is then named after the
    training set). ``opts``: overrides of every run besides the data (``--opts``; the results
    section and plots are named after them, :func:`results_name`; the distilled students build
    their teacher with them too). ``check_teacher``: after the first baseline run, warn loudly
    when the teacher does not beat it
    (:func:`csgr_distill.evaluation.teacher_check.teacher_check`). ``detector``: a key of
    :data:`DETECTORS` (the teacher and student configs)."""

    if seeds < 1 or first_seed < 0:
        raise SystemExit(f"--seeds {seeds} --first-seed {first_seed}: give at least one seed and "
                         "a first seed >= 0")
    if detector not in DETECTORS:
        raise SystemExit(f"--detector {detector!r}: use one of {list(DETECTORS)}")
    t_config, s_config, description = DETECTORS[detector]
    data_opts = list(data_opts) + list(opts)
    if detector == "retinanet":  # the module constants (tests point them elsewhere)
        t_config, s_config = TEACHER_CFG, STUDENT_CFG
    base = student_cfg(data_opts, s_config)
    plan = method_runs(methods, variants, detector, base)
    check_overrides(plan, base)
    train_set, test_set = base.DATASETS.TRAIN[0], base.DATASETS.TEST[0]
    work_dir = os.path.abspath(work_dir)
    code = code_version()
    backbones = pretrained_backbones(detector, work_dir, code, data_opts, eval_points, progress)
    progress(f"[gain] teacher ({t_config})")
    teacher = train_teacher(work_dir, teacher_iters, teacher_weights, code, data_opts, t_config,
                            backbones["teacher"] if backbones else None, progress)
    progress(f"[gain] teacher AP {teacher['AP']:.2f}" + (" (cached)" if teacher["cached"] else "")
             + f": {teacher_note(teacher)}")
    iters = iters or int(base.SOLVER.MAX_ITER)
    done: Dict[Tuple[int, str], dict] = {}
    todo = [(seed, label) for seed in range(first_seed, first_seed + seeds) for label in plan]
    for wait in (False, True):  # runs another invocation is training: skipped, then waited for
        later = []
        for seed, label in todo:
            try:
                r = run_student(work_dir, label, plan[label], seed, teacher, iters, eval_points,
                                code, base, data_opts, s_config,
                                backbones["student"] if backbones else None, wait, progress,
                                teacher_opts=opts)
            except RunBusy as busy:
                progress(f"[gain] seed {seed} {label}: {busy}; back to it after the others")
                later.append((seed, label))
                continue
            done[seed, label] = r
            progress(f"[gain] seed {seed} {label}: AP {r['final']['AP']:.2f}"
                     + (" (no detections: AP 0 in the table)" if detected_nothing(r["final"])
                        else "")
                     + (" (cached)" if r["cached"] else "")
                     + (f" ({resumed_text(r['resumed_from'])})" if r["resumed_from"] else ""))
            if check_teacher and seed == first_seed and label == BASELINE:
                named = base.clone()  # the message names the teacher these runs use
                named.MODEL.DISTILL.TEACHER.WEIGHTS = teacher["weights"]
                checked = teacher_check(named, baseline_ap=r["final"]["AP"],
                                        teacher_ap=teacher["AP"], dataset_name=test_set)
                progress(f"[gain] teacher check: teacher AP {teacher['AP']:.2f}, baseline "
                         f"{r['final']['AP']:.2f}: " + ("the teacher beats the baseline"
                                                       if checked["teacher_beats_baseline"] else
                                                       "THE TEACHER DOES NOT BEAT THE BASELINE"))
        todo = later
    runs = {label: [done[seed, label] for seed in range(first_seed, first_seed + seeds)]
            for label in plan}
    rows = summarize(teacher, runs)
    info = machine_info(str(base.MODEL.DEVICE))  # where train_net.py ran (--opts MODEL.DEVICE)
    setting = (f"{train_set} -> {test_set}; {description} ({t_config}, {s_config}), students "
               f"trained {iters} iterations each, seeds {first_seed}..{first_seed + seeds - 1}; "
               f"teacher AP {teacher['AP']:.2f} / AP50 {teacher['AP50']:.2f} / AP75 "
               f"{teacher['AP75']:.2f} (teacher {teacher_note(teacher)})")
    table = markdown_table(
        ["method", "AP", "AP50", "AP75", "gain AP", "gap closed (%)", "gain > 2 std"],
        [[r["method"]] + [mean_std_cell(r[m], r[m + "_std"]) for m in METRICS]
         + [number_cell(r["gain_AP"], "+.2f"), number_cell(r["gap_closed_percent"], ".0f"),
            "yes" if r["gain_over_2std"] else "no"]
         for r in rows])
    section, suffix = results_name(train_set, detector, iters, int(base.SOLVER.MAX_ITER),
                                   teacher, t_config, data_opts, opts, omp_threads())
    md = (header_lines(f"gain ({section})", info, command) + "\n" + setting + "\n\n" + table
          + "\n\n" + table_note(rows) + cached_note(runs)
          + ("\n" + resumed_note(runs) if resumed_note(runs) else "")
          + f"\n\n![AP per method](gain_ap{suffix}.png) "
          f"![AP vs iteration](gain_curves{suffix}.png)")
    payload = {"machine": info, "setting": setting, "teacher": teacher, "rows": rows,
               "runs": runs}
    os.makedirs(out_dir, exist_ok=True)
    plot(out_dir, teacher, rows, runs, test_set, suffix)
    write_results(out_dir, "gain", section, payload, md)
    return payload
