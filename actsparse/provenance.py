"""What every result file records about how it was made: config hash, code version, package
versions, device and seed; and the writers of result files, atomic and reproducible. No
timestamps, so an unchanged rerun writes identical bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = (
    "actsparse", "torch", "transformers", "numpy", "pandas", "matplotlib", "snakemake", "zarr", "h5py", "datasets",
    "safetensors",
)


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
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_safetensors(path: Path, raw: bytes) -> None:
    """A safetensors file (``raw``: what ``safetensors.torch.save`` or ``safetensors.numpy.save``
    returned), written reproducibly. safetensors writes the header's metadata in an order that
    changes from process to process, so the same tensors and metadata would give other bytes in
    every run; the header is rewritten with sorted keys (tensor offsets are explicit, so any key
    order reads the same) and padded to 8 bytes, as safetensors pads it."""
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    write_bytes(path, len(header).to_bytes(8, "little") + header + raw[8 + size :])


def figure_metadata(path: str | os.PathLike) -> dict:
    """``savefig`` metadata that leaves out the creation date and software version matplotlib
    stamps by default, so an unchanged rerun writes identical image bytes."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pdf":
        return {"Creator": None, "Producer": None, "CreationDate": None}
    return {"Software": None} if suffix == ".png" else {}


def write_bytes(path: Path, data: bytes) -> None:
    """Write atomically: a crash never leaves a half-written result that looks finished. Every
    writer of a result file ends here (write_text, write_json, write_safetensors, write_figure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_figure(figure, path: str | os.PathLike, **savefig_options) -> None:
    """A matplotlib figure in the format its suffix names, atomically and without timestamps."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".").lower(), metadata=figure_metadata(path),
                   **savefig_options)
    write_bytes(Path(path), buffer.getvalue())
