"""What a user's files, machine or command line can do wrong ends in one ``error:`` line (or a named
warning) before training starts or at the step where it happens, with nothing half-written left:
unreadable or diverged checkpoints (teacher, MODEL.WEIGHTS, --resume, export), non-finite
gradients and losses, a full or read-only disk, --num-gpus without GPUs, AMP on a CPU, flags after
the KEY VALUE overrides, a teacher of another input format, a loss weight 1e4x too large, and a
distillation step under autocast (losses float32)."""
import errno
import io
import json
import os
import sys
import zipfile

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from csgr_distill.checkpoint import (CheckedCheckpointer, CheckpointFileError, atomic_open,
                                     read_checkpoint)
from csgr_distill.cli import USER_ERROR_EXIT, CliError, parse_args_anywhere, run_cli
from csgr_distill.cli import load_config
from csgr_distill.engine import build_optimizer
from csgr_distill.engine.optimizer import GradientCheckHook, NonFiniteGradientError
from csgr_distill.checkpoint import load_weights_strictly
from csgr_distill.teacher import build_teacher_cfg
from tiny import REPO, base_cfg, fake_batch, make_teacher, student_cfg, train_opts, write_model

sys.path.insert(0, os.path.join(REPO, "tools"))
import export_student  # noqa: E402
import train_net  # noqa: E402
import visualize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_shapes):
    """A tiny CSGR student yaml, its teacher (yaml, weights), and bad files of every kind."""
    tmp = tmp_path_factory.mktemp("failures")
    teacher_yaml, teacher_weights, teacher = make_teacher(tmp)
    cfg = student_cfg(tmp, teacher_yaml, teacher_weights)
    yaml_path = tmp / "student.yaml"
    yaml_path.write_text(cfg.dump())
    data = open(teacher_weights, "rb").read()
    bad = {"truncated": data[: len(data) // 2], "empty": b"",
           "config": yaml_path.read_bytes()}
    paths = {}
    for name, content in bad.items():
        paths[name] = tmp / f"{name}.pth"
        paths[name].write_bytes(content)
    paths["pickled_object"] = tmp / "pickled_object.pth"
    torch.save({"model": teacher.state_dict(), "meta": _Unsafe()}, paths["pickled_object"])
    paths["not_torch_zip"] = tmp / "not_torch_zip.pth"
    with zipfile.ZipFile(paths["not_torch_zip"], "w") as z:
        z.writestr("notes.txt", "hello")
    paths["tensor"] = tmp / "tensor.pth"
    torch.save(torch.zeros(3), paths["tensor"])
    nan_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    nan_state["head.cls_score.weight"][0] = float("nan")
    paths["nan"] = tmp / "nan.pth"
    torch.save({"model": nan_state}, paths["nan"])
    student = build_model(cfg)  # a distillation model: distillers.* tensors
    paths["student"] = tmp / "student_run.pth"
    torch.save({"model": student.state_dict(), "iteration": 9}, paths["student"])
    return {"tmp": tmp, "yaml": str(yaml_path), "teacher_yaml": teacher_yaml,
            "teacher_weights": teacher_weights, "paths": {k: str(v) for k, v in paths.items()}}


class _Unsafe:
    """An object torch's safe load does not read (unpickling it would run this module's code)."""


def call(monkeypatch, main, argv):
    """(exit code, stderr) of ``run_cli(main, argv)`` (stderr captured in a StringIO of our own,
    as tests/test_cli_errors.py explains)."""
    err = io.StringIO()
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", err)
        code = run_cli(main, argv)
    return code, err.getvalue()


def one_error(result, *fragments):
    """The single ``error:`` line of a run that exited with the user-error code, no traceback,
    no advice to load with ``weights_only=False``."""
    code, err = result
    assert code == USER_ERROR_EXIT, err
    assert "Traceback" not in err and "weights_only" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ---- item 4: checkpoints that are not (usable) checkpoints -------------------------------------
#: (bad file, fragment of what the message says it is)
BAD_FILES = [
    ("truncated", "truncated or damaged zip archive"),
    ("empty", "it is empty (0 bytes)"),
    ("config", "a text file, not a checkpoint (it begins 'CUDNN_BENCHMARK: false'): a config?"),
    ("pickled_object", "holding Python objects besides tensors (the class test_failures._Unsafe)"),
    ("not_torch_zip", "a zip archive but not a PyTorch checkpoint (it holds 'notes.txt')"),
    ("tensor", "holds a Tensor, not a checkpoint"),
    ("nan", "holds NaN or infinite values in 1 of its"),
    ("student", "is a distillation run's checkpoint (a student: it holds"),
]


@pytest.mark.parametrize("name,said", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_teacher_file_is_one_message_saying_what_it_is(files, tmp_path, name, said):
    path = files["paths"][name]
    cfg = student_cfg(tmp_path, files["teacher_yaml"], path)
    model = build_model(build_teacher_cfg(cfg))
    with pytest.raises((CheckpointFileError, RuntimeError)) as e:
        load_weights_strictly(model, path)
    message = str(e.value)
    assert path in message and said in message, message
    assert "weights_only" not in message and "\n" not in message
    if name != "student":
        assert "MODEL.DISTILL.TEACHER.WEIGHTS" in message


def test_bad_teacher_weights_through_train_net(files, monkeypatch, tmp_path):
    result = call(monkeypatch, train_net.cli, [
        "--config-file", files["yaml"], "OUTPUT_DIR", str(tmp_path / "run"),
        "MODEL.DISTILL.TEACHER.WEIGHTS", files["paths"]["pickled_object"]])
    one_error(result, "The teacher checkpoint (MODEL.DISTILL.TEACHER.WEIGHTS)",
              "pickled_object.pth", "save the weights alone")


@pytest.mark.parametrize("name,said", [BAD_FILES[0], BAD_FILES[2]], ids=["truncated", "config"])
def test_bad_model_weights_and_eval_only(files, monkeypatch, tmp_path, name, said):
    for extra in ([], ["--eval-only"]):
        result = call(monkeypatch, train_net.cli, [
            "--config-file", files["yaml"], *extra, "OUTPUT_DIR", str(tmp_path / "run"),
            "MODEL.WEIGHTS", files["paths"][name]])
        one_error(result, "MODEL.WEIGHTS", files["paths"][name], said)


def test_model_weights_that_cannot_be_fetched(files, monkeypatch, tmp_path):
    url = "http://127.0.0.1:9/model.pth"  # the discard port: refused at once, offline or not
    result = call(monkeypatch, train_net.cli, ["--config-file", files["yaml"], "OUTPUT_DIR",
                                               str(tmp_path / "run"), "MODEL.WEIGHTS", url])
    one_error(result, f"MODEL.WEIGHTS '{url}' could not be fetched", "download it elsewhere")


def test_a_truncated_last_checkpoint_on_resume(files, monkeypatch, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_0000004.pth").write_bytes(open(files["paths"]["truncated"], "rb").read())
    (out / "last_checkpoint").write_text("model_0000004.pth")
    result = call(monkeypatch, train_net.cli, ["--config-file", files["yaml"], "--resume",
                                               "OUTPUT_DIR", str(out)])
    one_error(result, "--resume: the last checkpoint", "model_0000004.pth",
              "truncated or damaged zip archive", "write its file name into")
    (out / "last_checkpoint").write_text("model_0000009.pth")
    result = call(monkeypatch, train_net.cli, ["--config-file", files["yaml"], "--resume",
                                               "OUTPUT_DIR", str(out)])
    one_error(result, "model_0000009.pth' does not exist")


def test_export_and_visualize_read_checkpoints_safely(files, monkeypatch, tmp_path):
    result = call(monkeypatch, export_student.main, [
        "--checkpoint", files["paths"]["pickled_object"], "--output", str(tmp_path / "s.pth")])
    one_error(result, "--checkpoint", "holding Python objects besides tensors")
    assert not os.path.exists(tmp_path / "s.pth")
    result = call(monkeypatch, visualize.main, [
        "--config-file", files["yaml"], "--weights", files["paths"]["truncated"], "--output",
        str(tmp_path / "vis"), "--no-teacher"])
    one_error(result, "--weights", "truncated or damaged zip archive")
    with pytest.raises(CheckpointFileError, match="holds a Tensor"):
        read_checkpoint(files["paths"]["tensor"])


# ---- item 5: non-finite gradients and losses ---------------------------------------------------
class _TwoParams(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(2))
        self.b = torch.nn.Parameter(torch.ones(1))


def _solver_cfg(clip_type=None):
    cfg = base_cfg("unused")
    cfg.SOLVER.MOMENTUM = 0.0
    if clip_type:
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    return cfg


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_full_model_clipping_refuses_a_non_finite_norm_before_any_weight_changes(bad):
    model = _TwoParams()
    optimizer = build_optimizer(_solver_cfg("full_model"), model)
    model.a.grad, model.b.grad = torch.tensor([1.0, bad]), torch.tensor([2.0])
    with pytest.raises(NonFiniteGradientError) as e:
        optimizer.step()
    assert str(e.value.norm) == str(bad)
    assert torch.equal(model.a.detach(), torch.ones(2)) and torch.equal(model.b.detach(),
                                                                        torch.ones(1))
    model.a.grad, model.b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0])
    optimizer.step()  # finite: clipped to norm 1 and applied
    torch.testing.assert_close(model.a.detach(), torch.tensor([1 - 0.6 * 0.01, 1 - 0.8 * 0.01]))


def test_gradient_check_hook_for_the_other_optimizers():
    model = _TwoParams()

    class Trainer:  # what the hook reads of detectron2's SimpleTrainer
        pass

    hook = GradientCheckHook()
    hook.trainer = Trainer()
    hook.trainer.model = model
    model.a.grad, model.b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0])
    hook.after_backward()
    model.b.grad = torch.tensor([float("inf")])
    with pytest.raises(NonFiniteGradientError):
        hook.after_backward()


def _ld_cli(tmp_path, *extra):
    teacher_yaml = os.path.join(REPO, "configs/demo/teacher-RetinaNet-Dist-R18-wide.yaml")
    _, weights, _ = write_model(tmp_path, load_config(teacher_yaml, check_steps=False), "t")
    return ["--config-file", os.path.join(REPO, "configs/demo/LD-RetinaNet-Dist-R18.yaml"),
            *train_opts(tmp_path / "run"), "SOLVER.MAX_ITER", "3",
            "MODEL.DISTILL.TEACHER.CONFIG", teacher_yaml,
            "MODEL.DISTILL.TEACHER.WEIGHTS", weights, *extra]


def test_finite_losses_with_non_finite_gradients_stop_naming_the_weight(
        tiny_shapes, monkeypatch, tmp_path):
    """The review's case: LD's KD_WEIGHT 1e38 gives a finite loss (~1e35) whose gradients
    overflow; before, the NaN weights died a step later in fvcore ('bad box')."""
    result = call(monkeypatch, train_net.cli, _ld_cli(tmp_path, "MODEL.DISTILL.LD.KD_WEIGHT",
                                                      "1e38"))
    one_error(result, "Gradients became infinite or NaN at iteration 0",
              "although every loss is finite", "the largest losses: loss_ld_kd = ",
              "(weight MODEL.DISTILL.LD.KD_WEIGHT = 1e+38)", "This step was not applied")
    assert not os.path.exists(tmp_path / "run" / "model_final.pth")


@pytest.mark.parametrize("clip", [[], ["SOLVER.CLIP_GRADIENTS.ENABLED", "True",
                                       "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                                       "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1e38"]],
                         ids=["gradient_check_hook", "detectron2_loss_check"])
def test_a_non_finite_detection_loss_is_one_line_with_the_largest_weight(
        files, monkeypatch, tmp_path, clip):
    """A learning rate that blows the weights up. Without full-model clipping the gradient check
    after the backward pass sees it first; with it, detectron2's own loss check (a multi-line
    FloatingPointError with a traceback) does: both end in one line naming the losses and the
    largest weight."""
    result = call(monkeypatch, train_net.cli, [
        "--config-file", files["yaml"], "OUTPUT_DIR", str(tmp_path / "run"),
        "MODEL.DISTILL.ENABLED", "False", "SOLVER.BASE_LR", "1e30", "SOLVER.MAX_ITER", "4",
        *clip])
    one_error(result, "Loss became infinite or NaN at iteration 1: loss_cls = nan",
              "the weights are finite (the largest: ", "lower SOLVER.BASE_LR")


# ---- item 8: more processes than GPUs ----------------------------------------------------------
def test_num_gpus_without_gpus_is_one_line_before_any_process_starts(
        files, monkeypatch, tmp_path):
    import importlib

    d2_launch = importlib.import_module("detectron2.engine.launch")  # (the module, not launch())

    def no_spawn(*args, **kwargs):
        raise AssertionError("a training process was started")

    monkeypatch.setattr(d2_launch.mp, "start_processes", no_spawn)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = call(monkeypatch, train_net.cli, ["--config-file", files["yaml"], "--num-gpus", "2",
                                               "OUTPUT_DIR", str(tmp_path / "run")])
    one_error(result, "--num-gpus 2 starts 2 training processes, one per GPU",
              "this machine has no CUDA GPU", "use --num-gpus 1")


# ---- item 9: flags after the overrides; unquoted TEACHER.OPTS ----------------------------------
def test_flags_after_the_overrides_are_recognised(files, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(train_net, "launch", lambda fn, *a, args, **k: seen.update(args=args[0]))
    train_net.cli(["--config-file", files["yaml"], "OUTPUT_DIR", "out", "SOLVER.MAX_ITER", "1",
                   "--resume", "--register-dataset", "mine=coco:a.json:images",
                   "--teacher-check", "SOLVER.BASE_LR", "0.5"])
    args = seen["args"]
    assert args.resume and args.register_dataset == ["mine=coco:a.json:images"]
    assert args.teacher_check == ""
    assert args.opts == ["OUTPUT_DIR", "out", "SOLVER.MAX_ITER", "1", "SOLVER.BASE_LR", "0.5"]
    args = visualize.parse_args(["--config-file", "c.yaml", "MODEL.DEVICE", "cpu",
                                 "--weights", "w.pth", "--output", "o"])
    assert (args.weights, args.output, args.opts) == ("w.pth", "o", ["MODEL.DEVICE", "cpu"])
    with pytest.raises(CliError, match=r"unknown option '--resmue' among the KEY VALUE "
                                       r"overrides; the options are .*--resume"):
        parse_args_anywhere(train_net.default_argument_parser(), ["OUTPUT_DIR", "o", "--resmue"])
    # a negative value is a value, not a flag
    args = parse_args_anywhere(train_net.default_argument_parser(),
                               ["SOLVER.MAX_ITER", "-1", "--resume"])
    assert args.opts == ["SOLVER.MAX_ITER", "-1"] and args.resume


def test_unquoted_teacher_opts_get_their_own_list_as_the_fix(files, monkeypatch, tmp_path):
    result = call(monkeypatch, train_net.cli, [
        "--config-file", files["yaml"], "OUTPUT_DIR", str(tmp_path / "run"),
        "MODEL.DISTILL.TEACHER.OPTS", "[MODEL.RETINANET.NUM_CLASSES, 6, INPUT.FORMAT, BGR]"])
    one_error(result, "Write: MODEL.DISTILL.TEACHER.OPTS \"['MODEL.RETINANET.NUM_CLASSES', 6, "
                      "'INPUT.FORMAT', 'BGR']\"")


# ---- item 10: AMP on a CPU, an unwritable OUTPUT_DIR, a full disk ------------------------------
def test_amp_on_a_cpu_is_refused_before_anything_is_built(files, monkeypatch, tmp_path):
    from csgr_distill.engine import DistillTrainer

    def no_build(cfg):
        raise AssertionError("the model was built before the AMP check")

    monkeypatch.setattr(DistillTrainer, "build_model", classmethod(lambda cls, cfg: no_build(cfg)))
    result = call(monkeypatch, train_net.cli, ["--config-file", files["yaml"],
                                               "OUTPUT_DIR", str(tmp_path / "run"),
                                               "SOLVER.AMP.ENABLED", "True"])
    one_error(result, "SOLVER.AMP.ENABLED is True but MODEL.DEVICE is 'cpu'",
              "set SOLVER.AMP.ENABLED False")
    result = call(monkeypatch, train_net.cli, ["--config-file", files["yaml"],
                                               "OUTPUT_DIR", str(tmp_path / "run"),
                                               "MODEL.DEVICE", "cuda:7"])
    assert result[0] == USER_ERROR_EXIT and "MODEL.DEVICE is 'cuda:7'" in result[1]


def test_a_read_only_output_dir_is_one_line(files, monkeypatch, tmp_path):
    read_only = str(tmp_path / "ro")
    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):
        if str(path).startswith(read_only):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", makedirs)
    result = call(monkeypatch, train_net.cli, ["--config-file", files["yaml"],
                                               "OUTPUT_DIR", read_only + "/run"])
    one_error(result, f"OUTPUT_DIR '{read_only}/run' cannot be written (Read-only file system)")


def test_a_full_disk_leaves_no_truncated_checkpoint(files, monkeypatch, tmp_path):
    """The second checkpoint hits a full disk half-way: one error line naming it; the first
    checkpoint and last_checkpoint (naming it) are intact, no partial file is left."""
    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def save(obj, f, *args, **kwargs):
        name = getattr(f, "name", str(f))
        if "model_0" in str(name):
            saves.append(name)
            if len(saves) == 2:
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    result = call(monkeypatch, train_net.cli, [
        "--config-file", files["yaml"], "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "4",
        "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()"])
    one_error(result, "No space left on device", "model_0000001.pth", "free space")
    names = sorted(os.listdir(out))
    assert "model_0000000.pth" in names and "model_0000001.pth" not in names, names
    assert not [n for n in names if "incomplete" in n], names
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert "model" in read_checkpoint(str(out / "model_0000000.pth"))


def test_atomic_open_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "last_checkpoint"
    path.write_text("model_0000000.pth")
    with pytest.raises(OSError) as e:
        with atomic_open(str(path), "w") as f:
            f.write("model_00")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    assert path.read_text() == "model_0000000.pth" and os.listdir(tmp_path) == [path.name]
    checkpointer = CheckedCheckpointer(_TwoParams(), str(tmp_path))
    checkpointer.save("model_0000001")
    assert path.read_text() == "model_0000001.pth"


# ---- item 11: a teacher of another input format ------------------------------------------------
def test_a_grey_teacher_is_refused_when_the_student_is_built(files, tmp_path):
    tcfg = base_cfg(tmp_path / "t", fpn_channels=32)
    tcfg.INPUT.FORMAT = "L"
    tcfg.MODEL.PIXEL_MEAN, tcfg.MODEL.PIXEL_STD = [100.0], [50.0]
    yaml_path = tmp_path / "grey.yaml"
    yaml_path.write_text(tcfg.dump())
    with pytest.raises(ValueError, match=r"reads INPUT.FORMAT 'L' images, the student 'BGR'"):
        build_model(student_cfg(tmp_path, str(yaml_path), files["teacher_weights"]))


# ---- item 12: a loss weight 1e4x too large: warned, summarised, in eval_results.json -----------
def test_a_dominating_loss_weight_is_in_the_summary_and_eval_results(files, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        # clipped, as the SODA10M protocol does, so the two steps stay finite
        train_net.cli(["--config-file", files["yaml"], "OUTPUT_DIR", str(out),
                       "MODEL.DISTILL.CSGR.BETA", "1e9", "SOLVER.MAX_ITER", "2",
                       "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
                       "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                       "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0"])
    results = json.loads((out / "eval_results.json").read_text())
    assert "bbox" in results
    (warning,) = results["warnings"]
    assert "times the detection losses" in warning
    assert "weight MODEL.DISTILL.CSGR.BETA = 1000000000.0" in warning
    summary = [r.getMessage() for r in caplog.records if "Training finished with" in r.getMessage()]
    assert summary and warning in summary[-1]


# ---- AMP: a distillation step under autocast has float32, finite distillation losses -----------
@pytest.mark.parametrize("method", ["CSGR", "FGD", "KD", "MIMIC", "PKD", "TAR"])
def test_distillation_losses_are_float32_under_bf16_autocast(files, tmp_path, method):
    """What the CPU allows of detectron2's AMPTrainer: the teacher and student forward under
    bfloat16 autocast, the distillers in float32 (their losses sum whole feature maps)."""
    cfg = student_cfg(tmp_path, files["teacher_yaml"], files["teacher_weights"], methods=(method,))
    model = build_model(cfg)
    model.attach_teacher()
    model.train()
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(fake_batch(2))
        distill = {k: v for k, v in losses.items() if k.startswith(f"loss_{method.lower()}")}
    assert distill
    for k, v in distill.items():
        assert v.dtype == torch.float32, (k, v.dtype)
        assert torch.isfinite(v) and v.item() >= -1e-6, (k, v)
    sum(distill.values()).backward()
    # (only the distillation losses: torch's CPU bfloat16 backward of plain RetinaNet's p7 conv,
    # on a 1x1 map, gives a non-finite weight gradient in about 1 seed of 5, distillation or not)
    grads = [p.grad for p in model.distillers.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


def test_detectron2_amp_trainer_runs_a_distillation_on_the_cpu(files, monkeypatch, tmp_path):
    """detectron2's AMPTrainer (CUDA-only) driven on the CPU: its float16 CUDA autocast and
    GradScaler swapped for bfloat16 CPU ones, the machine check bypassed. Two steps of a CSGR run
    with full-model clipping complete: the scaler's unscale and the clipping's gradient check
    compose, the losses are finite and the student is exported."""
    import csgr_distill.engine.trainer as trainer_module
    from detectron2.engine import AMPTrainer

    from csgr_distill.engine import DistillTrainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.amp, "autocast",
                        lambda dtype=None: torch.autocast("cpu", dtype=torch.bfloat16))
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda: torch.amp.GradScaler("cpu"))
    monkeypatch.setattr(trainer_module, "check_device", lambda *a, **k: None)
    cfg = student_cfg(tmp_path, files["teacher_yaml"], files["teacher_weights"])
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 35.0
    cfg.DATASETS.TEST = ()
    trainer = DistillTrainer(cfg)
    assert isinstance(trainer._trainer, AMPTrainer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = {k: v for r in rows for k, v in r.items() if k.startswith("loss_")}
    assert any(k.startswith("loss_csgr_") for k in losses)
    assert all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in losses.values())
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final_student.pth"))
