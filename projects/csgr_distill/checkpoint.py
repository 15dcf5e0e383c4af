"""Checkpoints that are read with a clear message and written whole.

Reading. :class:`CheckedCheckpointer` is detectron2's ``DetectionCheckpointer`` (every format and
key heuristic it has) whose reads fail with one :class:`CheckpointFileError` naming the file, the
config key or flag it came from, and what the file is (:func:`describe_unreadable`): empty, a
truncated or damaged zip archive (an interrupted write or copy), a zip or NumPy file that is not a
checkpoint, a text file (a config given where the weights go), a PyTorch file holding Python
objects besides tensors. Files are read as torch reads them by default, without running code
from the file (``weights_only``); the message never suggests turning that off, it says how to
re-save the weights alone. A checkpoint whose tensors hold NaN or infinite values (saved by a run
that diverged) is refused too, naming them. :func:`read_checkpoint` is the same read for a tool
that wants the dict itself (``tools/export_student.py``).

Strict loading. :func:`load_weights_strictly` loads a whole model (the teacher) and refuses any
missing, unexpected or mis-shaped key, naming them, and says when the file is a student's
checkpoint or another detector's.

Writing. :func:`atomic_open` writes to a hidden temporary file beside the target and renames it
over the target only when the write has completed: a full disk or a killed run never leaves a
truncated ``model_0000999.pth`` (or ``last_checkpoint``, ``model_final_student.pth``) behind.
:class:`CheckedCheckpointer` writes its checkpoints and ``last_checkpoint`` that way, so
``last_checkpoint`` names a file only after that file is complete.
"""
import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional
from urllib.parse import urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

__all__ = [
    "CheckedCheckpointer",
    "CheckpointFileError",
    "LoadReport",
    "RecordingCheckpointer",
    "atomic_open",
    "describe_unreadable",
    "load_weights_strictly",
    "nonfinite_tensors",
    "read_checkpoint",
]


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, what it is, the fix."""


#: how many key names a message lists before "... (N in all)"
SHOWN_NAMES = 5


def shown(names: List[str], limit: int = SHOWN_NAMES, quote: bool = True) -> str:
    """``'a', 'b', ... (12 in all)``: the first ``limit`` of ``names`` (quoted with ``quote``)."""
    names = list(names)
    text = ", ".join(repr(n) if quote else str(n) for n in names[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_RESAVE = ("; if you trust the program that wrote it, save the weights alone there: "
           "torch.save({'model': model.state_dict()}, path)")


def describe_unreadable(path: str, error: BaseException) -> str:
    """What the file at ``path`` is, given the ``error`` torch (or pickle) raised reading it, in
    words for the user: ``"it is a truncated or damaged zip archive (...)"``. Never repeats
    torch's advice to load with ``weights_only=False`` (which runs code from the file)."""
    size = os.path.getsize(path)
    if size == 0:
        return ("it is empty (0 bytes): writing or copying it was interrupted (a full disk, a "
                "killed run, an incomplete download)")
    with open(path, "rb") as f:
        head = f.read(256)
    unsupported = _UNSUPPORTED_GLOBAL.search(str(error))
    if head.startswith(b"PK\x03\x04"):  # torch's format since 1.6 is a zip archive
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            return (f"it is a truncated or damaged zip archive ({size} bytes; a PyTorch checkpoint "
                    "is a zip archive): writing or copying it was interrupted (a full disk, a "
                    "killed run, an incomplete download); write or copy it again")
        if not any(n.endswith("data.pkl") for n in names):
            return (f"it is a zip archive but not a PyTorch checkpoint (it holds "
                    f"{shown(names, 3)})")
        if unsupported and not unsupported.group(1).startswith("torch."):
            return (f"it is a PyTorch file holding Python objects besides tensors (the class "
                    f"{unsupported.group(1)}), which are not read, as running code from a file "
                    "is not safe" + _RESAVE)
        return f"it is a damaged PyTorch checkpoint ({_first_line(error)})"
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy array file (.npy), not a checkpoint"
    if head[:1] == b"\x80":  # a pickle: torch's legacy format, a detectron2 .pkl, or other data
        if isinstance(error, EOFError) or "truncated" in str(error) or (
                unsupported and unsupported.group(1).startswith("torch.")):
            return (f"it is a truncated or damaged pickle ({size} bytes): writing or copying it "
                    "was interrupted; write or copy it again")
        if unsupported:
            return (f"it is a pickle holding Python objects besides tensors (the class "
                    f"{unsupported.group(1)}), which are not read, as running code from a file "
                    "is not safe" + _RESAVE)
        return f"it is a pickle but not a readable checkpoint ({_first_line(error)})"
    text = _text_start(head)
    if text is not None:
        hint = (": a config? The weights are a .pth or .pkl file" if re.match(r"[\w_]+:", text)
                else "")
        return f"it is a text file, not a checkpoint (it begins {text!r}){hint}"
    return f"it is not a PyTorch checkpoint ({_first_line(error)})"


def _first_line(error: BaseException) -> str:
    line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "weights_only" in line:  # torch's advice to run code from the file: not repeated
        line = ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _text_start(head: bytes) -> Optional[str]:
    """The first line of ``head`` when it is printable text, else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or any(not (c.isprintable() or c in "\n\r\t") for c in text):
        return None
    return text.strip().splitlines()[0][:60] if text.strip() else None


def nonfinite_tensors(state: Mapping) -> List[str]:
    """Names of the floating-point tensors (or NumPy arrays) of ``state`` holding NaN or inf."""
    bad = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            if not np.isfinite(value).all():
                bad.append(name)
    return bad


def check_loaded(loaded: Any, path: str, what: str) -> Dict[str, Any]:
    """``loaded`` (a checkpoint dict: ``{"model": {name: tensor}}``, ...) or a
    :class:`CheckpointFileError` saying what it holds instead, or which tensors are not finite."""
    if not isinstance(loaded, Mapping):
        raise CheckpointFileError(
            f"{what} {path!r} holds a {type(loaded).__name__}, not a checkpoint (a dict with the "
            "model's weights, as torch.save({'model': model.state_dict()}, path) writes it)")
    state = loaded.get("model", loaded)
    if not isinstance(state, Mapping) or not state:
        raise CheckpointFileError(
            f"{what} {path!r} is not a checkpoint: its 'model' entry is "
            f"{'empty' if isinstance(state, Mapping) else 'a ' + type(state).__name__}, not the "
            "model's weights (a dict of tensors)")
    others = [k for k, v in state.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
    if len(others) == len(state):
        raise CheckpointFileError(
            f"{what} {path!r} is not a checkpoint: none of its entries is a tensor (it holds "
            f"{shown(sorted(map(str, state)))})")
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointFileError(
            f"{what} {path!r} holds NaN or infinite values in {len(bad)} of its {len(state)} "
            f"tensors ({shown(bad)}): it was saved by a run whose training diverged; use an "
            "earlier checkpoint of that run")
    return loaded


def read_checkpoint(path: str, what: str = "checkpoint") -> Dict[str, Any]:
    """The checkpoint dict of the ``.pth`` at ``path``, read on the CPU without running code from
    the file; :class:`CheckpointFileError` (naming ``what``, e.g. ``"--checkpoint"``) when it is
    not one, FileNotFoundError when it does not exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001  (described: what the file is)
        raise CheckpointFileError(f"{what} {path!r} cannot be read: "
                                  f"{describe_unreadable(path, e)}") from e
    return check_loaded(loaded, path, what)


class CheckedCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` with checked reads and whole writes (module
    docstring).

    ``what`` names the weights in messages, e.g. ``"MODEL.WEIGHTS"``; :meth:`resume_or_load`
    names the last checkpoint of ``save_dir`` instead when it resumes from it."""

    def __init__(self, model, save_dir: str = "", *, what: str = "checkpoint", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.what = what
        self.path_manager = _WholeWrites(self.path_manager)

    # ---- reading -------------------------------------------------------------------------
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            what, self.what = self.what, ("--resume: the last checkpoint (named by "
                                          f"{os.path.join(self.save_dir, 'last_checkpoint')})")
            try:
                if not self.path_manager.isfile(last):
                    raise FileNotFoundError(
                        f"{self.what} {last!r} does not exist: write the name of a checkpoint of "
                        f"{self.save_dir} into that file, or delete it to start from "
                        "MODEL.WEIGHTS")
                return self.load(last)
            except CheckpointFileError as e:
                raise CheckpointFileError(
                    f"{e}. To resume from an earlier checkpoint, write its file name into "
                    f"{os.path.join(self.save_dir, 'last_checkpoint')}") from e
            finally:
                self.what = what
        plain = urlparse(path)._replace(query="").geturl() if path else ""  # as load() reads it
        if "://" in plain:
            try:  # downloaded (once, cached) by detectron2's PathManager
                self.path_manager.get_local_path(plain)
            except Exception as e:  # noqa: BLE001  (no internet, unknown host, 404, scheme)
                raise FileNotFoundError(
                    f"{self.what} {path!r} could not be fetched ({type(e).__name__}: {e}); on a "
                    "machine without internet, download it elsewhere (detectron2:// is "
                    f"https://dl.fbaipublicfiles.com/detectron2/...) and set {self.what} to the "
                    "local file") from e
        elif plain and not self.path_manager.exists(plain):
            raise FileNotFoundError(f"{self.what} {path!r} does not exist")
        return self.load(path, checkpointables=[])

    def _torch_load(self, f: str):
        try:
            loaded = super()._torch_load(f)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001  (described: what the file is)
            raise CheckpointFileError(
                f"{self.what} {f!r} cannot be read: {describe_unreadable(f, e)}") from e
        if not isinstance(loaded, Mapping):  # detectron2 would test `"model" in loaded`
            check_loaded(loaded, f, self.what)
        return loaded

    def _load_file(self, filename: str):
        try:
            loaded = super()._load_file(filename)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            if not filename.endswith(".pkl"):  # detectron2 reads .pkl with pickle itself
                raise
            raise CheckpointFileError(
                f"{self.what} {filename!r} cannot be read: "
                f"{describe_unreadable(filename, e)}") from e
        return check_loaded(loaded, filename, self.what)


# ------------------------------------------------------------------------------------------------
# strict loading
# ------------------------------------------------------------------------------------------------
class _PopRecorder(dict):
    """A checkpoint dict that keeps the ``"model"`` state dict fvcore pops from it (after
    detectron2's heuristics renamed its keys, and fvcore removed mis-shaped ones)."""

    popped = None

    def pop(self, key, *default):
        value = super().pop(key, *default)
        if key == "model":
            self.popped = value
        return value


class RecordingCheckpointer(CheckedCheckpointer):
    """DetectionCheckpointer (all its formats and key heuristics; a file that is not a checkpoint
    refused in one message) that keeps, after its last load, the incompatibilities
    (``incompatible.missing_keys``, ``unexpected_keys``, ``incorrect_shapes``) and what was
    loaded: the checkpoint's own key names, the state dict as loaded, its author. Used by
    :func:`load_weights_strictly` and by ``tools/visualize.py`` (which distillers a checkpoint
    holds)."""

    incompatible = None
    original_keys: frozenset = frozenset()
    loaded_state = None
    author = None

    def _load_model(self, checkpoint):
        self.original_keys = frozenset(checkpoint.get("model", {}))
        self.author = checkpoint.get("__author__", None)
        recorder = _PopRecorder(checkpoint)
        self.incompatible = super()._load_model(recorder)
        self.loaded_state = recorder.popped
        checkpoint.pop("model", None)
        return self.incompatible


@dataclass
class LoadReport:
    """What :func:`load_weights_strictly` loaded.

    Attributes:
        path: the weights as given (a path or URL).
        tensors: state-dict entries loaded (all of the model's).
        values: their number of elements.
        renamed: model keys whose checkpoint name differed (detectron2's name-matching heuristics
            of model-zoo ``.pkl`` files, or a ``module.`` prefix).
        author: the checkpoint's ``__author__`` (e.g. ``"Detectron2 Model Zoo"``), else None.
    """

    path: str
    tensors: int
    values: int
    renamed: int
    author: Optional[str] = None


def load_weights_strictly(model: nn.Module, weights: str, what: str = "teacher") -> LoadReport:
    """Load a checkpoint through detectron2's ``DetectionCheckpointer`` and raise, listing the
    keys, on any missing/unexpected/mis-shaped key.

    ``weights``: a ``.pth`` (this project's, detectron2's), a model-zoo ``.pkl`` (numpy arrays,
    ``__author__``, keys matched by detectron2's heuristics), or a URL (``detectron2://...``,
    ``https://...``, fetched and cached by detectron2's PathManager; ``?matching_heuristics=True``
    accepted as detectron2 does).

    Returns:
        :class:`LoadReport`.
    """
    if not weights:
        raise ValueError(
            f"The {what} has no weights: set MODEL.DISTILL.TEACHER.WEIGHTS (or MODEL.WEIGHTS in the "
            "teacher yaml) to a trained checkpoint; a random teacher teaches nothing."
        )
    key = " (MODEL.DISTILL.TEACHER.WEIGHTS)" if what == "teacher" else ""
    checkpointer = RecordingCheckpointer(model, what=f"The {what} checkpoint{key}")
    plain = urlparse(weights)._replace(query="").geturl()  # as DetectionCheckpointer.load
    if "://" in plain:
        try:
            checkpointer.path_manager.get_local_path(plain)
        except Exception as e:  # no internet, unknown host, 404, unsupported scheme
            raise FileNotFoundError(
                f"The {what} checkpoint {weights!r} could not be fetched ({type(e).__name__}: "
                f"{e}). On a machine without internet, download it elsewhere (detectron2:// is "
                "https://dl.fbaipublicfiles.com/detectron2/...) and set "
                "MODEL.DISTILL.TEACHER.WEIGHTS to the local file."
            ) from e
    elif not checkpointer.path_manager.exists(plain):
        raise FileNotFoundError(
            f"The {what} checkpoint {weights!r} does not exist: train the teacher first "
            "(tools/train_net.py --config-file <teacher yaml>) and point "
            "MODEL.DISTILL.TEACHER.WEIGHTS at its model_final.pth"
        )
    checkpointer.load(weights, checkpointables=[])
    incompatible = checkpointer.incompatible
    problems: List[str] = []
    if incompatible.missing_keys:
        problems.append(f"missing keys: {shown(sorted(incompatible.missing_keys))}")
    if incompatible.unexpected_keys:
        problems.append(f"unexpected keys: {shown(sorted(incompatible.unexpected_keys))}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})"
                  for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"mis-shaped keys: {shown(shapes, quote=False)}")
    if problems:
        student = _student_checkpoint(checkpointer)
        if student:
            raise RuntimeError(
                f"The {what} checkpoint {weights!r} is {student}, not a {what}'s: point "
                "MODEL.DISTILL.TEACHER.WEIGHTS at the teacher's own checkpoint (the "
                "model_final.pth of the run of MODEL.DISTILL.TEACHER.CONFIG)")
        model_keys = set(model.state_dict())
        if checkpointer.original_keys and not (checkpointer.original_keys & model_keys) and not (
                set(checkpointer.loaded_state or {}) & model_keys):
            raise RuntimeError(
                f"The {what} checkpoint {weights!r} is not a checkpoint of this detector: none of "
                f"its {len(checkpointer.original_keys)} tensors "
                f"({shown(sorted(checkpointer.original_keys), 3)}) is one of the "
                f"{model.__class__.__name__} that MODEL.DISTILL.TEACHER.CONFIG builds")
        hint = ""
        if incompatible.incorrect_shapes:
            hint = (" A checkpoint trained on other classes (e.g. a COCO model-zoo detector, 80 "
                    "classes) cannot teach these classes as it is: fine-tune it on your data "
                    "first (docs/own_data.md, 'Model-zoo teachers').")
        raise RuntimeError(
            f"The {what} checkpoint {weights!r} does not match the {what} config: "
            + "; ".join(problems)
            + ". Check MODEL.DISTILL.TEACHER.CONFIG / OPTS against the config it was trained with."
            + hint
        )
    model_state = model.state_dict()
    loaded = [k for k in (checkpointer.loaded_state or {}) if k in model_state]
    return LoadReport(
        path=weights, tensors=len(loaded),
        values=sum(int(model_state[k].numel()) for k in loaded),
        renamed=sum(1 for k in loaded if k not in checkpointer.original_keys),
        author=checkpointer.author,
    )


def _student_checkpoint(checkpointer: RecordingCheckpointer) -> str:
    """``"a distillation run's checkpoint (...)"`` when the checkpoint just read is a student's:
    it holds distiller tensors, or :mod:`csgr_distill.export` wrote it; else ``""``."""
    distillers = [k for k in checkpointer.original_keys if k.startswith("distillers.")]
    if distillers:
        return (f"a distillation run's checkpoint (a student: it holds {len(distillers)} "
                "distillers.* tensors)")
    if checkpointer.author == "csgr_distill.export":
        return "an exported student (tools/export_student.py, model_final_student.pth)"
    return ""


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def temporary_name(path: str) -> str:
    """The hidden file beside ``path`` that :func:`atomic_open` writes first (not a ``.pth``, so
    nothing lists it as a checkpoint)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.incomplete")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", opener=open) -> Iterator[Any]:
    """``with atomic_open(path, "wb") as f: ...``: ``f`` is a temporary file beside ``path``,
    renamed to ``path`` when the block completes; on any error it is removed (``path`` keeps its
    previous content, if any) and an OSError names ``path``."""
    tmp = temporary_name(path)
    try:
        with opener(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            raise OSError(e.errno, f"{e.strerror} (writing it stopped; the incomplete file "
                                   "was removed)", path) from e
        raise


class _WholeWrites:
    """A PathManager whose ``open`` for writing a local file is :func:`atomic_open`; everything
    else is the wrapped PathManager's."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def open(self, path: str, mode: str = "r", **kwargs):
        if "w" in mode and "://" not in str(path):
            return atomic_open(path, mode, lambda p, m: self._path_manager.open(p, m, **kwargs))
        return self._path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._path_manager, name)
