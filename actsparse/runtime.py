"""What every workflow job sets up the same way: logging into its Snakemake log, thread count,
seeds, deterministic kernels, device choice, and the provenance stamped on its outputs."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actsparse.devices import gpu_slot
from actsparse.provenance import provenance

log = logging.getLogger("actsparse")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config asks for device {device!r} but no CUDA GPU is visible")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def placed(device: str):
    """Pin a CUDA job to a GPU no other job on this machine holds. CPU jobs pass through, and so
    do jobs under SLURM, whose scheduler already gives each job its own GPUs."""
    if device != "cuda" or "SLURM_JOB_ID" in os.environ:
        yield device
        return
    with gpu_slot(torch.cuda.device_count()) as slot:
        torch.cuda.set_device(slot)
        yield f"cuda:{slot}"


@dataclass
class Job:
    device: str
    provenance: dict


@contextmanager
def job(snakemake, device: str | None = None):
    """Context for one workflow script: everything it prints goes to the rule's log file, and a
    failure is logged with its traceback before Snakemake marks the job failed. ``device``
    overrides the config's, for jobs that can only run on one kind."""
    log_path = Path(snakemake.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
        sys.stderr = stream
        config = snakemake.config
        torch.set_num_threads(max(1, snakemake.threads))
        seed_everything(config["seed"])
        params = dict(snakemake.params.items())
        started = time.perf_counter()
        try:
            with placed(resolve_device(device or config["device"])) as device:
                yield Job(device=device, provenance=provenance(config, params, device, config["seed"]))
        except Exception:
            log.exception("job failed")
            raise
        finally:
            # cached rules cannot have a benchmark file, so every job logs its wall time
            log.info("wall time %.1f s", time.perf_counter() - started)
            sys.stderr = sys.__stderr__
