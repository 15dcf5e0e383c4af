"""Checks of the machine a run starts on, before any model or data is built: the device, AMP, the
number of processes, a writable ``OUTPUT_DIR``. Each failure is one ValueError naming the key or
flag and the fix."""
import os
import tempfile

import torch

__all__ = ["check_device", "check_output_dir", "check_processes"]


def check_device(cfg, training: bool = True, world_size: int = 1) -> None:
    """``MODEL.DEVICE`` exists on this machine; with ``training``, ``SOLVER.AMP.ENABLED`` only on
    CUDA (detectron2's ``AMPTrainer`` is CUDA-only) and more than one process only on CUDA
    (one GPU each)."""
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except RuntimeError as e:
        raise ValueError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} is not a device torch knows ({e}); "
                         "use cuda or cpu") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but torch finds no CUDA GPU on "
                             "this machine (torch.cuda.is_available() is False): set MODEL.DEVICE "
                             "cpu to run on the CPU")
        if device.index is not None and device.index >= count:
            raise ValueError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but this machine has {count} "
                             f"CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    if not training:
        return
    if cfg.SOLVER.AMP.ENABLED and device.type != "cuda":
        raise ValueError(f"SOLVER.AMP.ENABLED is True but MODEL.DEVICE is {cfg.MODEL.DEVICE!r}: "
                         "detectron2's mixed-precision training (AMPTrainer) runs on CUDA only; "
                         "set SOLVER.AMP.ENABLED False")
    if world_size > 1 and device.type != "cuda":
        raise ValueError(f"{world_size} training processes (--num-gpus) need one CUDA GPU each, "
                         f"and MODEL.DEVICE is {cfg.MODEL.DEVICE!r}: set MODEL.DEVICE cuda, or "
                         "train in one process (--num-gpus 1)")


def check_processes(num_gpus: int) -> None:
    """``--num-gpus N`` (N > 1) starts N processes, one per GPU: this machine must have N GPUs.
    Checked before any process starts."""
    if num_gpus <= 1:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < num_gpus:
        found = f"has {count} CUDA GPU(s)" if count else "has no CUDA GPU"
        raise ValueError(f"--num-gpus {num_gpus} starts {num_gpus} training processes, one per "
                         f"GPU, and this machine {found}: use --num-gpus {max(count, 1)}"
                         + ("" if count else " (with MODEL.DEVICE cpu)"))


def check_output_dir(path: str, key: str = "OUTPUT_DIR") -> None:
    """``path`` exists or can be made, and a file can be written in it (a test file, removed);
    else a ValueError naming ``key`` (a read-only disk, no permission, a file of that name)."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise ValueError(f"{key} {path!r} cannot be written ({e.strerror or e}): set {key} to a "
                         "folder you can write to") from e
