"""One process at a time in a benchmark run's folder.

Two ``tools/benchmark.py gain`` invocations may share a work folder (e.g. one per core, each with
``OMP_NUM_THREADS=1``). Without a lock both would train the same run into the same folder, each
overwriting the other's checkpoints and ``metrics.json``. :func:`run_lock` takes an exclusive
``flock`` on ``<run folder>/.lock``: the kernel releases it when its holder exits, killed or not,
so a stale lock file never blocks a later invocation. The file holds the holder's pid, for the
message only.
"""
import contextlib
import fcntl
import os
from typing import Callable, Iterator, Optional

LOCK_NAME = ".lock"


class RunBusy(Exception):
    """The run's folder is locked by another process (``str()`` says which)."""


def _holder(f) -> str:
    f.seek(0)
    pid = f.read().strip()
    return f"pid {pid}" if pid else "pid unknown"


@contextlib.contextmanager
def run_lock(rdir: str, wait: bool = True,
             on_wait: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Hold ``rdir``'s lock for the ``with`` block (``rdir`` is created if needed).

    Free: taken at once. Held by another process: ``wait=False`` raises :class:`RunBusy`;
    ``wait=True`` calls ``on_wait(holder)`` (e.g. "pid 1234") once and blocks until it is free.
    """
    os.makedirs(rdir, exist_ok=True)
    with open(os.path.join(rdir, LOCK_NAME), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            if not wait:
                raise RunBusy(f"being trained by another invocation ({holder})") from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
