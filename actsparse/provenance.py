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


CHECKSUM = "checksum"  # the metadata entry of every safetensors result file that verify_safetensors checks


class DamagedFileError(ValueError):
    """A result file whose contents are not what its writer wrote (a flipped bit, a truncation)."""


def damage_report(path: str | os.PathLike, problem: str) -> str:
    """What every damaged-file error says: which file, what is wrong, and how to regenerate it
    (Snakemake rebuilds a missing output and reruns what depends on it)."""
    remove = "rm -r" if Path(path).is_dir() else "rm"
    return (f"{path} is damaged: {problem}. Regenerate it: `{remove} {path}`, then run the workflow again "
            "(make run, or snakemake with your --configfile)")


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _digest(header: dict, data: bytes) -> str:
    """sha256 of the header (less its checksum) and the tensor bytes: a changed threshold, shape,
    offset or metadata value all change it."""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != CHECKSUM}
    return "sha256:" + hashlib.sha256(_canonical({**header, "__metadata__": metadata}) + data).hexdigest()


def write_safetensors(path: Path, raw: bytes) -> None:
    """A safetensors file (``raw``: what ``safetensors.torch.save`` or ``safetensors.numpy.save``
    returned), written reproducibly and with a checksum in its metadata (``verify_safetensors``).
    safetensors writes the header's metadata in an order that changes from process to process, so
    the same tensors and metadata would give other bytes in every run; the header is rewritten
    with sorted keys (tensor offsets are explicit, so any key order reads the same) and padded to
    8 bytes, as safetensors pads it."""
    size = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + size]), raw[8 + size :]
    header.setdefault("__metadata__", {})[CHECKSUM] = _digest(header, data)
    encoded = _canonical(header)
    encoded += b" " * (-len(encoded) % 8)
    write_bytes(path, len(encoded).to_bytes(8, "little") + encoded + data)


def verify_safetensors(path: str | os.PathLike) -> None:
    """Check a file ``write_safetensors`` wrote against its checksum; ``DamagedFileError`` naming
    the file and how to regenerate it when it differs, is cut short, or has none."""
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8 : 8 + size])
        stored = header["__metadata__"][CHECKSUM]
    except (ValueError, KeyError, TypeError):
        raise DamagedFileError(damage_report(path, "its header is unreadable or has no checksum")) from None
    if stored != _digest(header, raw[8 + size :]):
        raise DamagedFileError(damage_report(path, "its checksum does not match its contents"))


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
