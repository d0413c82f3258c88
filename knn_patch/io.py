"""Files and folders written atomically, so a crash never leaves a truncated file or half a folder behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON to `path`, atomically."""
    return atomic_write(
        path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str) + "\n")
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _set_aside(path: Path) -> Path:
    """Rename `path` to a hidden `.old-` name beside it, out of sight of whatever looks for `path`."""
    aside = path.parent / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, aside)
    return aside


def discard(path: str | os.PathLike) -> None:
    """Delete a file or folder that is never seen half deleted: it is renamed aside first, so a crash
    during a slow delete leaves only a hidden `.old-` leftover, never a partial `path`."""
    _remove(_set_aside(Path(path)))


@contextlib.contextmanager
def scratch_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside `target` (same file system, so `publish` is a rename), removed
    on exit with whatever is still in it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(src: str | os.PathLike, target: str | os.PathLike, *, replace: bool = True) -> Path:
    """Move the finished file or folder `src` to `target` by renames only.

    An existing `target` is first renamed aside and deleted only once `src` is in place; if moving
    `src` fails, the old copy is renamed back. So at every moment `target` is the old copy, the new
    one, or (between two renames) briefly absent, but never partial and never lost. With
    `replace=False` an existing `target` wins (another process finished first) and `src` stays
    where it is for its caller to delete.
    """
    src, target = Path(src), Path(target)
    if not target.exists():
        os.replace(src, target)
        return target
    if not replace:
        return target
    aside = _set_aside(target)
    try:
        os.replace(src, target)
    except BaseException:
        os.replace(aside, target)
        raise
    _remove(aside)
    return target


def atomic_dir(target: str | os.PathLike, write: Callable[[Path], object], *, replace: bool = True) -> Path:
    """Call `write(tmp_folder)` on an empty temporary folder beside `target`, then `publish` it there."""
    with scratch_dir(target) as tmp:
        folder = tmp / "out"
        folder.mkdir()
        write(folder)
        return publish(folder, target, replace=replace)
