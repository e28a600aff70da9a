"""What every result file records about how it was made: config hash, code version, package
versions, device and seed. No timestamps, so an unchanged rerun writes identical bytes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("actsparse", "torch", "transformers", "numpy", "snakemake", "zarr", "h5py", "datasets", "safetensors")


def stable_hash(obj) -> str:
    """A short hash of any JSON-serialisable object, independent of key order."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def code_version(root: Path = Path(__file__).resolve().parent.parent) -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def provenance(config: dict | None = None, params: dict | None = None, device: str = "cpu", seed: int | None = None) -> dict:
    return {
        "config_hash": stable_hash(config or {}),
        "params": params or {},
        "code_version": code_version(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "device": device,
        "seed": seed,
    }


def write_json(path: Path, payload: dict) -> None:
    """Write atomically: a crash never leaves a half-written result that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
