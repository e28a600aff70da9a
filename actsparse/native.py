"""Small C loops compiled on first use with the system C compiler, for the few hot paths where
PyTorch's per-op passes over memory cost more than the work (sparse decoding, store statistics).

Each caller names its source; ``load`` compiles it once per source version into a per-user
folder of the node's temp dir (``-march=native`` binaries must not travel between machines) and
returns None when no compiler works, so every caller keeps a PyTorch fallback.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from actsparse.provenance import stable_hash

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")


def load(name: str, source: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """``source`` compiled (``$CC`` or ``cc``, with ``flags`` added) and loaded; None, with a
    warning, if that fails."""
    compiler = os.environ.get("CC", "cc")
    folder = Path(tempfile.gettempdir()) / f"actsparse-kernels-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to another user; refusing to load code from it")
    digest = stable_hash([source, compiler, *FLAGS, *flags, platform.machine()])
    library = folder / f"{name.replace(' ', '-')}-{digest}.so"
    if not library.is_file() and not _compile(name, [compiler, *FLAGS, *flags], source, library):
        return None
    return ctypes.CDLL(str(library))


def _compile(name: str, command: list[str], source: str, library: Path) -> bool:
    """Build under a per-process name and rename, so concurrent jobs never load a partial file."""
    staging = library.with_name(f"{library.stem}.{os.getpid()}")
    source_file, built = staging.with_suffix(".c"), staging.with_suffix(".so")
    source_file.write_text(source)
    try:
        subprocess.run([*command, str(source_file), "-o", str(built)], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as error:
        reason = getattr(error, "stderr", None) or error
        log.warning("compiling the C %s failed (%s): %s", name, " ".join(command), reason)
        return False
    finally:
        source_file.unlink()
    os.replace(built, library)
    return True
