"""Optional dependencies: which pip extra installs each, and one clear line when it is missing.

`pip install knn-patch` gives patching, every backend (faiss included) and `KNNCache`. Evaluation,
benchmarks and plots need the `eval` extra; fine-tuning needs `train` (which includes `eval`):

    pip install 'knn-patch[eval]'   # knn-patch eval, needles, frontier, benchmarks
    pip install 'knn-patch[train]'  # knn-patch finetune, LoRA, TensorBoard
    pip install 'knn-patch[all]'

Modules that need one import it through `require`, so a missing package fails at once with the
command that installs it, not with a bare `No module named 'datasets'` from deep inside a run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the smallest extra of pyproject.toml that installs it
EXTRAS = {
    "datasets": "eval",
    "evaluate": "eval",
    "matplotlib": "eval",
    "rich": "eval",
    "peft": "train",
    "tensorboard": "train",
}


def require(module: str, feature: str) -> ModuleType:
    """`importlib.import_module(module)`, or an `ImportError` of one line naming the extra to install.

    `module` may be a submodule ("rich.console"); its top-level package must be a key of `EXTRAS`.
    An installed package that fails on a dependency of its own is a broken install, not a missing
    extra, and its error passes through unchanged.
    """
    top = module.partition(".")[0]
    extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name != top and not exc.name.startswith(f"{top}."):
            raise
        raise ImportError(
            f"knn-patch {feature} needs the '{extra}' extra ({top} is missing): "
            f"pip install 'knn-patch[{extra}]'",
            name=top,
        ) from None


def pyplot(feature: str) -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (files only, no display needed), imported on first use
    since it is slow to import; the one-line `ImportError` of `require` without matplotlib."""
    require("matplotlib", feature).use("Agg")
    return require("matplotlib.pyplot", feature)
