"""One GPU per job: a slot allocator on lock files.

``snakemake --resources gpu=K`` bounds how many GPU jobs run at once, but not *which* GPU each
takes. Every job therefore claims the first free slot by holding an exclusive ``flock`` on
``gpu-{i}.lock`` for its whole life. The kernel releases the lock when the process ends, however
it ends, so a crashed job never leaks its GPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def default_lock_dir() -> Path:
    return Path(os.environ.get("ACTSPARSE_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / f"actsparse-gpu-{os.getuid()}"))


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def gpu_slot(n_slots: int, lock_dir: Path | None = None, poll_seconds: float = 0.5, timeout: float | None = None) -> Iterator[int]:
    """Hold one of ``n_slots`` GPU slots exclusively; waits while all are taken."""
    if n_slots < 1:
        raise ValueError("gpu_slot needs at least one slot")
    lock_dir = Path(lock_dir or default_lock_dir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for slot in range(n_slots):
            fd = _try_lock(lock_dir / f"gpu-{slot}.lock")
            if fd is not None:
                log.info("holding GPU slot %d of %d", slot, n_slots)
                try:
                    yield slot
                finally:
                    os.close(fd)
                return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU slot among {n_slots} in {lock_dir}")
        time.sleep(poll_seconds)
