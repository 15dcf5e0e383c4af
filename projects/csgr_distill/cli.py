"""What every tool in ``tools/`` shares: the config pipeline, known user errors as one message,
and the progress lines of the training subprocesses it runs.

Config. :func:`load_config` builds a tool's config in the order every tool uses: the project's
keys (:mod:`csgr_distill.config`), the yaml, the ``KEY VALUE`` overrides, ``--register-dataset``
entries, dataset registration (:mod:`csgr_distill.data.custom`), derived keys.

Errors. ``sys.exit(run_cli(main))`` runs ``main(argv)``; an exception that is a *known user
error* (:func:`user_error_message`) prints ``error: <message>`` to stderr and exits with
:data:`USER_ERROR_EXIT` (2), without a traceback. ``--debug`` anywhere on the command line (it is
taken out of ``argv`` before ``main`` sees it) or ``CSGR_DEBUG=1`` lets the exception through, with
its traceback. Every other exception is a bug and keeps its traceback. Known user errors are:

* always (:data:`ALWAYS_USER_ERRORS`): :class:`CliError` (a tool's own argument checks),
  :class:`~csgr_distill.data.errors.DatasetNotFoundError`,
  :class:`~csgr_distill.data.errors.DatasetNotRegisteredError`, ``FileNotFoundError`` (a config,
  checkpoint or image path that does not exist);
* an ``OSError`` of the disk (:data:`DISK_ERRNOS`: full, over quota, read-only, no permission),
  wherever it is raised: the file it names and what to do;
* :data:`ORIGIN_USER_ERRORS` (``ValueError``, ``KeyError``, ``AssertionError``,
  ``RuntimeError``, ``LookupError``, ``FloatingPointError``: a run that diverged, its losses and
  weight keys named) when raised in this project's own code or in the config and
  checkpoint machinery (:data:`USER_ERROR_MODULES`: ``csgr_distill``, ``yacs``,
  ``detectron2.config``, fvcore's config, registry and checkpointer): e.g. the teacher checks
  (missing/mismatched teacher yaml or weights, keys named), an unknown ``MODEL.DISTILL.METHODS``
  entry, yacs's "Non-existent config key", an unregistered ``MODEL.META_ARCHITECTURE``, fvcore's
  "Checkpoint ... not found". The same types raised inside torch or detectron2's models (a shape
  error, an out-of-memory) are bugs or resource problems and keep their traceback.

Arguments. :func:`parse_args_anywhere` parses a tool's command line with its flags (``--resume``,
``--register-dataset ...``) recognised wherever they stand, also after the trailing ``KEY VALUE``
overrides, where argparse would take them for overrides; an unknown ``--flag`` there is an
error naming the known ones.

Multi-process training (``launch`` with more than one process): :class:`ReportUserErrors` wraps
the worker's ``main`` so a worker prints the message itself and exits with code 2; the parent's
``run_cli`` then turns torch's ``ProcessExitedException`` (exit code 2) into one line pointing at
it.

Progress. :func:`run_logged` runs a command, writes its whole output to a log file and echoes the
lines :data:`PROGRESS_PATTERN` matches -- detectron2's periodic ``CommonMetricPrinter`` lines
(``eta: ... iter: N  total_loss: ...``) and its evaluation progress (``Inference done 11/300 ...
ETA=...``) -- to the console as they come.
"""
import argparse
import errno
import os
import re
import subprocess
import sys
from typing import Callable, List, Optional, Sequence

from detectron2.config import get_cfg

from .config import add_distill_config, apply_derived_keys, merge_command_line
from .data.custom import register_from_cfg, replace_entries
from .data.errors import DatasetNotFoundError, DatasetNotRegisteredError

__all__ = [
    "ALWAYS_USER_ERRORS",
    "CliError",
    "ORIGIN_USER_ERRORS",
    "PROGRESS_PATTERN",
    "ReportUserErrors",
    "USER_ERROR_EXIT",
    "USER_ERROR_MODULES",
    "add_debug_argument",
    "check_file",
    "load_config",
    "run_tool",
    "debug_enabled",
    "parse_args_anywhere",
    "progress_line",
    "run_cli",
    "run_logged",
    "user_error_message",
]

#: exit code of a known user error
USER_ERROR_EXIT = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "CSGR_DEBUG"


class CliError(Exception):
    """A tool's own check of its arguments failed; the message says what to change."""


#: user errors wherever they are raised
ALWAYS_USER_ERRORS = (CliError, DatasetNotFoundError, DatasetNotRegisteredError, FileNotFoundError)
#: user errors when raised in one of :data:`USER_ERROR_MODULES`
ORIGIN_USER_ERRORS = (ValueError, KeyError, AssertionError, RuntimeError, LookupError,
                      FloatingPointError)
#: OSError numbers that are the disk's state, not a bug: errno -> what to do
DISK_ERRNOS = {
    errno.ENOSPC: "free space on that disk or set OUTPUT_DIR to another one",
    errno.EDQUOT: "free space within your quota or set OUTPUT_DIR to another disk",
    errno.EROFS: "set OUTPUT_DIR (or that path) to a folder on a writable disk",
    errno.EACCES: "give yourself access to it, or choose another path",
}
#: modules (and their submodules) whose ORIGIN_USER_ERRORS are messages for the user
USER_ERROR_MODULES = ("csgr_distill", "yacs", "detectron2.config", "fvcore.common.config",
                      "fvcore.common.registry", "fvcore.common.checkpoint")


def _raised_in(exc: BaseException) -> str:
    """``__name__`` of the module whose code raised ``exc`` (its traceback's last frame)."""
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "") or ""


def _in_modules(module: str, prefixes: Sequence[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


#: (pattern, what to add) for messages of other libraries that do not say what to do
_HINTS = (
    (re.compile(r"^Non-existent (config )?key"),
     "; no config has that key: check its spelling (detectron2's keys: detectron2/config/"
     "defaults.py; this project's: projects/csgr_distill/config.py)"),
)


def _text(exc: BaseException) -> str:
    # KeyError's str() is the repr of its argument ('...' with quotes and escaped newlines)
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc)
    text = text.strip() or type(exc).__name__
    for pattern, hint in _HINTS:
        if pattern.search(text):
            text += hint
    return text


def user_error_message(exc: BaseException) -> Optional[str]:
    """The message to print for a known user error (module docstring), else None."""
    if isinstance(exc, ALWAYS_USER_ERRORS):
        return _text(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        where = f": {exc.filename!r}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}; {DISK_ERRNOS[exc.errno]}"
    if isinstance(exc, ORIGIN_USER_ERRORS) and _in_modules(_raised_in(exc), USER_ERROR_MODULES):
        return _text(exc)
    exited = _worker_exit(exc)
    if exited is not None:
        return exited
    return None


def _worker_exit(exc: BaseException) -> Optional[str]:
    try:
        from torch.multiprocessing import ProcessExitedException
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, ProcessExitedException) and exc.exit_code == USER_ERROR_EXIT:
        return (f"training process {exc.error_index} stopped on the error printed above "
                f"(exit code {USER_ERROR_EXIT})")
    return None


def check_file(path: str, flag: str = "--config-file", what: str = "a yaml config") -> str:
    """``path`` if it is a file, else FileNotFoundError naming ``flag``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist (working directory "
                                f"{os.getcwd()!r}); give {what}")
    return path


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    """``--debug`` in ``argv`` or ``CSGR_DEBUG`` set to a true value (1, true, yes)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def add_debug_argument(parser):
    """Document ``--debug`` in a tool's ``--help`` (``run_cli`` handles it before parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the full traceback of an error (also: CSGR_DEBUG=1)")
    return parser


_CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Za-z0-9_]+)+")


def parse_args_anywhere(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                        opts: str = "opts") -> argparse.Namespace:
    """``parser.parse_args`` where the parser's ``opts`` positional takes the trailing ``KEY
    VALUE`` overrides (``nargs=argparse.REMAINDER``), with the parser's flags recognised also
    among them: ``... OUTPUT_DIR out --resume`` is ``--resume ... OUTPUT_DIR out``. A flag counts
    where a KEY would stand; its arguments follow it as usual. An unknown ``--flag`` there is a
    :class:`CliError` listing the known ones (yacs would call it a non-existent key or an odd
    number of overrides)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if opts not in {a.dest for a in parser._actions}:
        return parser.parse_args(argv)
    actions = {s: a for a in parser._actions for s in a.option_strings}
    flags: List[str] = []
    overrides: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        at_key = len(overrides) % 2 == 0
        if token.startswith("-") and name in actions and at_key:
            action = actions[name]
            count = 0 if "=" in token else _argument_count(action, argv[i + 1:])
            if action.nargs == "?" and not count and "=" not in token and isinstance(
                    action.const, str):
                token = f"{name}={action.const}"  # else argparse takes the next KEY as its value
            flags.extend([token] + argv[i + 1:i + 1 + count])
            i += 1 + count
            continue
        if overrides and at_key and token.startswith("--") and token != "--":
            raise CliError(f"unknown option {token!r} among the KEY VALUE overrides; the options "
                           f"are {', '.join(sorted(s for s in actions if s.startswith('--')))}")
        if not overrides and token.startswith("-"):
            flags.append(token)  # argparse says what is wrong with it
        else:
            overrides.append(token)
        i += 1
    return parser.parse_args(flags + overrides)


def _argument_count(action: argparse.Action, rest: List[str]) -> int:
    """How many of the tokens ``rest`` that follow ``action``'s flag are its arguments."""
    nargs = action.nargs
    if nargs is None:
        return 1
    if isinstance(nargs, int):
        return nargs
    if nargs == "?":
        return int(bool(rest) and not rest[0].startswith("-")
                   and not _CONFIG_KEY.fullmatch(rest[0]))
    if nargs in ("*", "+"):
        count = 0
        while count < len(rest) and not rest[count].startswith("-") and not _CONFIG_KEY.fullmatch(
                rest[count]):
            count += 1
        return count
    return 0


def _print_error(message: str, hint: bool = True) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"(the traceback: run again with {DEBUG_FLAG}, or with {DEBUG_ENV}=1)",
              file=sys.stderr)
    sys.stderr.flush()


def run_cli(main: Callable[[List[str]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` (``argv`` default ``sys.argv[1:]``, without ``--debug``) and return the
    exit code: 0, or :data:`USER_ERROR_EXIT` after printing a known user error (module
    docstring). In debug mode (``--debug``, ``CSGR_DEBUG=1``) every exception propagates, and
    ``CSGR_DEBUG=1`` is set while ``main`` runs, for the processes it starts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    if debug:
        before = os.environ.get(DEBUG_ENV)
        os.environ[DEBUG_ENV] = "1"  # for the processes main starts (workers, tools)
        try:
            main(argv)
        finally:
            if before is None:
                del os.environ[DEBUG_ENV]
            else:
                os.environ[DEBUG_ENV] = before
        return 0
    try:
        main(argv)
    except Exception as e:  # noqa: BLE001  (sorted below; the rest is re-raised)
        message = user_error_message(e)
        if message is None:
            raise
        _print_error(message, hint=_worker_exit(e) is None)  # a worker printed the hint
        return USER_ERROR_EXIT
    return 0


class ReportUserErrors:
    """``fn`` for a worker process of ``launch``: a known user error is printed there (``error:
    ...``) and the worker exits with :data:`USER_ERROR_EXIT`, which the parent's ``run_cli``
    reports in one line; other exceptions propagate (torch prints their traceback). Picklable
    when ``fn`` is a module-level function."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        if debug_enabled():
            return self.fn(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            message = user_error_message(e)
            if message is None:
                raise
            _print_error(message)
            sys.stdout.flush()
            os._exit(USER_ERROR_EXIT)  # no traceback from torch's worker wrapper


# ------------------------------------------------------------------------------------------------
# progress of training subprocesses
# ------------------------------------------------------------------------------------------------
#: detectron2's periodic training line (CommonMetricPrinter: "eta: 0:01:02  iter: 19  total_loss:
#: ...", "eta:" absent while unknown) and evaluation progress ("Inference done 11/300. ... ETA=")
PROGRESS_PATTERN = re.compile(r"(\biter: \d+\s.*\btotal_loss: )|(\bInference done \d+/\d+\b)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOGGER_PREFIX = re.compile(r"^\[\d\d/\d\d \d\d:\d\d:\d\d [\w.@]+\]:\s*")


def progress_line(line: str) -> Optional[str]:
    """The console form of a log line that shows progress (:data:`PROGRESS_PATTERN`): without
    the date and logger name, runs of spaces collapsed; None for other lines."""
    line = _ANSI.sub("", line).rstrip()
    if not PROGRESS_PATTERN.search(line):
        return None
    return re.sub(r"\s{2,}", "  ", _LOGGER_PREFIX.sub("", line))


def run_logged(cmd: Sequence[str], log_path: str, cwd: Optional[str] = None,
               echo: Optional[Callable[[str], None]] = None, indent: str = "      ") -> int:
    """Run ``cmd``, write all its output (stdout and stderr) to ``log_path`` as it comes, and pass
    each progress line (:func:`progress_line`) to ``echo`` (default: print it, indented, to
    stdout) while the command runs. Returns the exit code."""
    if echo is None:
        def echo(text):
            print(indent + text, flush=True)
    log_dir = os.path.dirname(log_path)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                errors="replace")
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                shown = progress_line(line)
                if shown is not None:
                    echo(shown)
        except BaseException:
            proc.kill()
            raise
        finally:
            proc.stdout.close()
            proc.wait()
    return proc.returncode


def load_config(config_file: str, opts: Sequence[str] = (), register: Sequence[str] = (),
                check_steps: bool = True, register_datasets: bool = True):
    """The (unfrozen) config of a tool: ``get_cfg()`` with the project's keys, ``config_file``,
    the ``KEY VALUE`` overrides ``opts`` (:func:`~csgr_distill.config.merge_command_line`), the ``--register-dataset``
    values ``register`` (``NAME=FORMAT:PATH[:PATH...]``; they replace entries of the same name),
    the ``DATASETS.REGISTER`` datasets registered (``register_datasets=False``: not yet; the
    caller registers them with :func:`csgr_distill.data.register_from_cfg` once its loggers are
    set up, so their summary lines and warnings reach the console and ``log.txt``), then
    :func:`~csgr_distill.config.apply_derived_keys`.

    Raises:
        FileNotFoundError: ``config_file`` does not exist (naming ``--config-file``).
        ValueError (and the dataset errors of :mod:`csgr_distill.data.custom`): bad overrides,
            entries, steps or input size, each naming the key and the fix.
    """
    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(check_file(config_file))
    merge_command_line(cfg, opts)
    replace_entries(cfg, register)
    if register_datasets:
        register_from_cfg(cfg)
    return apply_derived_keys(cfg, check_steps=check_steps)


def run_tool(cmd: Sequence[str], log_path: str, cwd: Optional[str] = None,
             name: Optional[str] = None) -> None:
    """Run a project tool (:func:`run_logged`: its whole output to ``log_path``, its progress
    lines to the console). A failure raises :class:`CliError` with the tool's own ``error:``
    lines (else the log's last lines) and the log's path, naming the tool (``name``, default
    the first argument after the interpreter)."""
    code = run_logged(cmd, log_path, cwd=cwd)
    if code == 0:
        return
    with open(log_path) as f:
        lines = f.read().splitlines()
    errors = [ln[len("error: "):] for ln in lines if ln.startswith("error: ")]
    said = "\n".join(errors) if errors else "its log ends with:\n" + "\n".join(lines[-30:])
    tool = name or os.path.basename(str(cmd[1] if len(cmd) > 1 else cmd[0]))
    raise CliError(f"{tool} failed (exit code {code}): {said}\n(whole output: {log_path})")
