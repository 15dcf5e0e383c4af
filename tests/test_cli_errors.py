"""Known user errors through every tool's entry point (``run_cli(main, argv)``, as the scripts'
``__main__`` does): exit code 2, one ``error: ...`` message on stderr, no traceback; ``--debug``
or ``CSGR_DEBUG=1`` lets the exception (and its traceback) through; a bug keeps its traceback.
Two cases run the scripts in a subprocess."""
import io
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from csgr_distill.cli import (USER_ERROR_EXIT, CliError, ReportUserErrors, run_cli,
                              user_error_message)
from csgr_distill.data.errors import DatasetNotFoundError, DatasetNotRegisteredError
from tiny import REPO, base_cfg, make_teacher, student_cfg, write_model

sys.path.insert(0, os.path.join(REPO, "tools"))
import benchmark  # noqa: E402
import demo  # noqa: E402
import export_student  # noqa: E402
import train_net  # noqa: E402
import visualize  # noqa: E402

MISSING_SET = "csgr_cli_missing_val"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_shapes):
    """A tiny CSGR student config, its teacher, a checkpoint of it, a teacher checkpoint of
    another width (mismatched), and a registered dataset whose files are missing."""
    tmp = tmp_path_factory.mktemp("cli")
    teacher_yaml, teacher_weights, _ = make_teacher(tmp)
    cfg = student_cfg(tmp, teacher_yaml, teacher_weights)
    yaml_path, weights, _ = write_model(tmp, cfg, "student")
    _, other_weights, _ = write_model(tmp, base_cfg(tmp / "other", fpn_channels=8), "other")
    register_coco_instances(MISSING_SET, {}, str(tmp / "absent.json"), str(tmp / "images"))
    bad_yaml = tmp / "bad_key.yaml"
    bad_yaml.write_text(f"_BASE_: {yaml_path}\nMODEL:\n  NOPE_KEY: 1\n")
    yield {"tmp": tmp, "yaml": yaml_path, "weights": weights, "other": other_weights,
           "bad_yaml": str(bad_yaml)}
    DatasetCatalog.remove(MISSING_SET)
    MetadataCatalog.remove(MISSING_SET)


def call(monkeypatch, main, argv):
    """(exit code, stderr) of ``run_cli(main, argv)``. stderr is captured with a StringIO of our
    own: capsys would hand detectron2's (cached) logger a stdout that is closed in later tests."""
    err = io.StringIO()
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", err)
        code = run_cli(main, argv)
    return code, err.getvalue()


def _assert_one_message(result, *fragments):
    code, err = result
    assert code == USER_ERROR_EXIT, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for f in fragments:
        assert f in err, (f, err)
    return err


# (id, overrides of the student config, fragments of the message)
TRAIN_CASES = [
    ("dataset files missing", ["DATASETS.TEST", f"('{MISSING_SET}',)"],
     [f"Dataset '{MISSING_SET}' (named in DATASETS.TEST) is registered but its files are missing"]),
    ("dataset not registered", ["DATASETS.TEST", "('shapes_tiny_vall',)"],
     ["DATASETS.TEST names dataset 'shapes_tiny_vall', which is not registered",
      "Closest registered names: shapes_tiny_val"]),
    ("teacher yaml missing", ["MODEL.DISTILL.TEACHER.CONFIG", "{tmp}/absent.yaml"],
     ["MODEL.DISTILL.TEACHER.CONFIG points to", "absent.yaml"]),
    ("teacher weights missing", ["MODEL.DISTILL.TEACHER.WEIGHTS", "{tmp}/absent.pth"],
     ["The teacher checkpoint", "absent.pth", "does not exist"]),
    ("teacher weights mismatched", ["MODEL.DISTILL.TEACHER.WEIGHTS", "{other}"],
     ["does not match the teacher config", "mis-shaped keys"]),
    ("unknown method", ["MODEL.DISTILL.METHODS", "['NOPE']"],
     ["error: MODEL.DISTILL.METHODS names unknown distiller 'NOPE'; registered: ["]),
    ("bad key on the command line", ["MODEL.DISTILL.NOPE", "1"],
     ["Non-existent key: MODEL.DISTILL.NOPE", "check its spelling"]),
]


@pytest.mark.parametrize("opts,fragments", [c[1:] for c in TRAIN_CASES],
                         ids=[c[0] for c in TRAIN_CASES])
def test_train_net_user_errors_are_one_message(setup, monkeypatch, opts, fragments):
    opts = [o.format(tmp=setup["tmp"], other=setup["other"]) for o in opts]
    out = str(setup["tmp"] / "run")
    result = call(monkeypatch, train_net.cli, ["--config-file", setup["yaml"], "OUTPUT_DIR", out] + opts)
    _assert_one_message(result, *fragments)
    assert not os.path.exists(os.path.join(out, "model_final.pth"))


def test_train_net_bad_key_in_yaml(setup, monkeypatch):
    result = call(monkeypatch, train_net.cli, ["--config-file", setup["bad_yaml"],
                                   "OUTPUT_DIR", str(setup["tmp"] / "run")])
    _assert_one_message(result, "Non-existent config key: MODEL.NOPE_KEY")


@pytest.mark.parametrize("exc", [DatasetNotRegisteredError, KeyError])
def test_debug_lets_the_exception_through(setup, monkeypatch, exc):
    opts = (["DATASETS.TEST", "('shapes_tiny_vall',)"] if exc is DatasetNotRegisteredError
            else ["MODEL.DISTILL.METHODS", "['NOPE']"])
    argv = ["--config-file", setup["yaml"], "OUTPUT_DIR", str(setup["tmp"] / "run")] + opts
    with pytest.raises(exc):
        run_cli(train_net.cli, argv + ["--debug"])  # anywhere, even after the KEY VALUE pairs
    monkeypatch.setenv("CSGR_DEBUG", "1")
    with pytest.raises(exc):
        run_cli(train_net.cli, argv)


def test_bugs_keep_their_traceback():
    def shape_bug(argv):
        return torch.zeros(2) @ torch.zeros(3)  # a RuntimeError raised by torch, not a check

    def value_bug(argv):
        return int("x")

    with pytest.raises(RuntimeError):
        run_cli(shape_bug, [])
    with pytest.raises(ValueError):
        run_cli(value_bug, [])
    assert user_error_message(ZeroDivisionError("x")) is None
    assert user_error_message(CliError("say it")) == "say it"
    assert user_error_message(KeyError("not raised in a checked module")) is None


def test_visualize_user_errors(setup, monkeypatch):
    base = ["--config-file", setup["yaml"], "--output", str(setup["tmp"] / "vis")]
    result = call(monkeypatch, visualize.main, base + ["--weights", str(setup["tmp"] / "absent.pth")])
    _assert_one_message(result, "--weights", "absent.pth", "does not exist")
    result = call(monkeypatch, visualize.main, base + ["--weights", setup["weights"], "--images", "nope.png"])
    _assert_one_message(result, "--images nope.png: no image of that name in shapes_tiny_val")
    result = call(monkeypatch, visualize.main, base + ["--weights", setup["weights"], "--images", "99"])
    _assert_one_message(result, "--images 99: shapes_tiny_val has 4 images")
    result = call(monkeypatch, visualize.main, base + ["--weights", setup["weights"], "--dataset", "nope"])
    _assert_one_message(result, "--dataset names dataset 'nope', which is not registered")
    result = call(monkeypatch, visualize.main, ["--config-file", setup["bad_yaml"], "--weights",
                                    setup["weights"], "--output", str(setup["tmp"] / "vis")])
    _assert_one_message(result, "Non-existent config key: MODEL.NOPE_KEY")


def test_export_student_user_errors(setup, monkeypatch):
    out = str(setup["tmp"] / "exported.pth")
    result = call(monkeypatch, export_student.main, ["--checkpoint", str(setup["tmp"] / "absent.pth"),
                                         "--output", out])
    _assert_one_message(result, "Checkpoint", "absent.pth", "does not exist")
    result = call(monkeypatch, export_student.main, ["--checkpoint", setup["weights"], "--output", out,
                                         "--config-file", str(setup["tmp"] / "absent.yaml")])
    _assert_one_message(result, "--config-file", "absent.yaml", "does not exist")


def test_benchmark_user_errors(setup, monkeypatch):
    result = call(monkeypatch, benchmark.main, ["gain", "--teacher-weights", str(setup["tmp"] / "absent.pth")])
    _assert_one_message(result, "--teacher-weights", "absent.pth", "does not exist")


def test_benchmark_gain_reports_the_failed_runs_own_message(setup, monkeypatch, tmp_path):
    from csgr_distill.benchmark import gain

    log = str(tmp_path / "train.log")

    def failing_run(argv):
        gain._train_net(["--config-file", setup["yaml"], "MODEL.DISTILL.NOPE", "1"], log)

    result = call(monkeypatch, failing_run, [])
    err = _assert_one_message(result, "train_net.py failed (exit code 2",
                              "Non-existent key: MODEL.DISTILL.NOPE", log)
    assert "Non-existent key" in open(log).read()
    assert err.count("Non-existent key") == 1


def test_demo_stage_failure_is_the_tools_message(monkeypatch, tmp_path):
    log = str(tmp_path / "stage.log")
    child = "import sys; print('loading'); print('error: the teacher yaml is missing'); sys.exit(2)"
    result = call(monkeypatch, lambda argv: demo.run_tool(["-c", child], log), [])
    _assert_one_message(result, "failed (exit code 2): the teacher yaml is missing",
                        f"(whole output: {log})")
    assert open(log).read() == "loading\nerror: the teacher yaml is missing\n"


def _worker_with_user_error():
    raise DatasetNotFoundError("shapes_x", [("the annotation file", "/absent.json")])


def test_worker_process_reports_its_user_error_and_exits_2(capfd):
    """A launch() worker (multi-process training) prints the message itself and exits with 2;
    the parent's run_cli turns torch's ProcessExitedException into one line."""
    from torch.multiprocessing import ProcessExitedException

    p = multiprocessing.get_context("fork").Process(
        target=ReportUserErrors(_worker_with_user_error))
    p.start()
    p.join(60)
    assert p.exitcode == USER_ERROR_EXIT
    err = capfd.readouterr().err
    assert "error: Dataset 'shapes_x' is registered but its files are missing" in err
    assert "Traceback" not in err

    def parent(argv):
        raise ProcessExitedException("process 1 terminated with exit code 2", error_index=1,
                                     error_pid=0, exit_code=2)

    assert run_cli(parent, []) == USER_ERROR_EXIT
    assert "error: training process 1 stopped on the error printed above" in capfd.readouterr().err


def _script(tool, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **(env or {})))


def test_scripts_exit_2_without_traceback_and_debug_shows_it(setup):
    args = ["--config-file", setup["yaml"], "OUTPUT_DIR", str(setup["tmp"] / "run"),
            "MODEL.DISTILL.NOPE", "1"]
    plain = _script("train_net.py", *args)
    assert plain.returncode == USER_ERROR_EXIT, plain.stderr[-2000:]
    assert "error: Non-existent key: MODEL.DISTILL.NOPE" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = _script("train_net.py", *args, "--debug")
    assert debug.returncode not in (0, USER_ERROR_EXIT)
    assert "Traceback" in debug.stderr and "Non-existent key: MODEL.DISTILL.NOPE" in debug.stderr

    env_debug = _script("export_student.py", "--checkpoint", str(setup["tmp"] / "absent.pth"),
                        "--output", str(setup["tmp"] / "x.pth"), env={"CSGR_DEBUG": "1"})
    assert env_debug.returncode not in (0, USER_ERROR_EXIT)
    assert "Traceback" in env_debug.stderr and "FileNotFoundError" in env_debug.stderr
