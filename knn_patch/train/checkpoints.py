"""Training checkpoints that a crash can never leave half-written.

Each checkpoint is written by `accelerator.save_state` (weights, optimizer, scheduler, every
process's RNG states) into a temporary folder; the main process then adds `trainer_state.json`
(step, data position, evaluation history) and renames the folder to `step_NNNNNNNN`. Resume trusts
only folders with that name and that file, so a kill at any moment leaves a usable latest one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..io import discard, publish, write_json_atomic

STATE_FILE = "trainer_state.json"
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()
        and (p / STATE_FILE).is_file()
    ]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(root: str | Path) -> Path:
    """The newest complete checkpoint under `root`, or a clear error when there is none."""
    found = complete_checkpoints(root)
    if not found:
        raise FileNotFoundError(
            f"No complete checkpoint in {str(root)!r} (a complete one is a {_PREFIX}N folder holding "
            f"{STATE_FILE}); run without --resume to start from scratch."
        )
    return found[-1]


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_checkpoint(
    accelerator: Accelerator, root: str | Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    """Save the training state as `root/step_<step>` (all processes call this), keep the newest `keep`."""
    root = Path(root)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG file is written
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, {**state, "step": step})
        publish(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            discard(old)  # out of resume's sight before the slow delete
    accelerator.wait_for_everyone()
    return final
