"""The quality frontier: perplexity relative to dense against the share of keys read, for several
ways of spending the same key budget, all beside dense on the same tokens.

A budget is a share of the window's n keys: the keys a query at position n reads, averaged over the
model's layers (`config.keys_read`). Each method turns a budget of b keys into one `KNNConfig`:

- `topk`: 4 sinks, a window of b/4 keys, the rest of b as k nearest; the other keys' softmax mass
  is dropped (the kept keys' weights renormalised);
- `topk+mean`: the same keys, and the other keys' exact softmax mass carried by their values' mean
  (the `topk` backend's `rest="mean"`, counted as one key read);
- `topk+first`, `topk+mean+first`: as `topk` and `topk+mean`, with layer 0, whose attention is
  the flattest, given k = n^0.67 and the other layers' k lowered to keep the same mean budget;
- `tail`: b/2 nearest keys and b/2 uniform samples of the others, reweighted (no sinks or window);
- `faiss`: as `topk`, with the keys found by a faiss index;
- `calibrated`: 4 sinks, an 8-key window, the rest's mean and a k per layer fitted to the budget
  by `knn_patch.calibrate` on a held-out calibration text of the same length; `calibrated+first`:
  the same with layer 0's k at least n^0.67; `calibrated+first+samples`: that, and 32 uniform
  samples of layer 0's rest correct its mean (`topk`'s `samples`);
- a preset name (`fast`, `balanced`, `accurate`): that `KNNConfig.preset`, whatever the budget
  (run once; its row's budget is the share it reads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..calibration import BASE, fit, measure
from ..config import FIRST_LAYER_K, FIRST_LAYER_SAMPLES, PRESETS, KNNConfig, resolve_k
from ..extras import pyplot, require
from ..io import atomic_write, write_json_atomic
from .evaluation import DENSE, evaluate_perplexity

box = require("rich.box", "frontier")
Console = require("rich.console", "frontier").Console
Table = require("rich.table", "frontier").Table

CALIBRATED = ("calibrated", "calibrated+first", "calibrated+first+samples")
METHODS = ("topk", "topk+first", "topk+mean", "topk+mean+first", "tail", "faiss", *CALIBRATED, *PRESETS)
SINKS = 4


def method_config(method: str, budget: int, n: int, model_config: Any) -> KNNConfig | None:
    """`method`'s setting reading `budget` keys per query on average over the layers at n keys, or
    None when the budget is too small for it (every part needs at least one key)."""
    if method not in METHODS or method in PRESETS or method in CALIBRATED:
        raise ValueError(f"Unknown frontier method {method!r}; choose from {list(METHODS)}.")
    if method == "tail":
        half = budget // 2
        if half < 1:
            return None
        return KNNConfig(k=half, backend="tail", backend_options={"m": budget - half})
    window = budget // 4
    rest = "mean" if "mean" in method else "drop"
    fixed = SINKS + window + (rest == "mean")
    k = budget - fixed
    layer_k: dict[int, int] = {}
    if method.endswith("+first"):
        layers = model_config.get_text_config().num_hidden_layers
        first = resolve_k(FIRST_LAYER_K, n)
        k = math.floor((layers * budget - layers * fixed - first) / (layers - 1)) if layers > 1 else budget
        layer_k = {0: first}
    if k < 1:
        return None
    if method == "faiss":
        return KNNConfig(k=k, backend="faiss", sink_tokens=SINKS, local_window=window)
    return KNNConfig(
        k=k, layer_k=layer_k, sink_tokens=SINKS, local_window=window, backend_options={"rest": rest}
    )


def frontier_settings(
    methods: Sequence[str],
    budgets: Sequence[float],
    n: int,
    model_config: Any,
    calibrated: Callable[[str, float], KNNConfig] | None = None,
) -> list[tuple[str, float | None, KNNConfig]]:
    """(method, budget %, config) for every method and budget (a share of n, in %) it can meet;
    `calibrated(method, budget %)` gives the calibrated methods' configs."""
    if not methods:
        raise ValueError("No frontier methods given; choose from " + ", ".join(METHODS) + ".")
    if not budgets or any(not 0 < b <= 100 for b in budgets):
        raise ValueError(f"Budgets are shares of the keys in %, each in (0, 100]; got {list(budgets)}.")
    out = []
    for method in methods:
        if method in PRESETS:
            out.append((method, None, KNNConfig.preset(method)))
            continue
        if method in CALIBRATED:
            if calibrated is None:
                raise ValueError(f"The {method!r} method needs a calibration text; pass calibration_texts.")
            out.extend((method, budget, calibrated(method, budget)) for budget in budgets)
            continue
        for budget in budgets:
            config = method_config(method, round(budget * n / 100), n, model_config)
            if config is not None:
                out.append((method, budget, config))
    if not out:
        raise ValueError(f"Budgets {list(budgets)}% of {n} keys are too small for every method; raise them.")
    return out


def run_frontier(
    model: torch.nn.Module,
    documents: Sequence[tuple[str, Sequence[int]]],
    *,
    max_length: int,
    budgets: Sequence[float] = (0.5, 1, 2, 4),
    methods: Sequence[str] = ("topk", "topk+mean", "topk+mean+first", "tail"),
    progress: bool = True,
    on_document: Callable[[dict[str, Any]], None] | None = None,
    resume_from: dict[str, Any] | None = None,
    calibration_texts: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Every method at every budget beside dense, one window of `max_length` per document (each
    document must have that many tokens); `calibrated` is fitted on `calibration_texts`, texts not
    among the documents, cut to the same length. Returns `evaluate_perplexity`'s result with `rows`: per
    setting, its method, budget, keys read, ratio to dense and the spread of per-document ratios."""
    if not documents:
        raise ValueError("The frontier needs at least one document of max_length tokens.")
    short = [name for name, ids in documents if len(ids) < max_length]
    if short:
        raise ValueError(
            f"{len(short)} documents are shorter than max_length={max_length} (first: {short[0]!r}); "
            "drop them (--min-tokens) or lower --max-length."
        )
    documents = [(name, list(ids)[:max_length]) for name, ids in documents]
    curves: dict[str, dict[str, Any]] = {}  # one dense pass per calibrated method, for all budgets

    def calibrated(method: str, budget: float) -> KNNConfig:
        if method not in curves:
            base = BASE if method == "calibrated" else BASE.replace(layer_k={0: FIRST_LAYER_K})
            if method.endswith("+samples"):
                options = {**BASE.backend_options, "samples": {0: FIRST_LAYER_SAMPLES}}
                base = base.replace(backend_options=options)
            ids = torch.tensor([list(text)[:max_length] for text in calibration_texts])
            curves[method] = measure(model, ids, base=base, progress=progress)
        return fit(curves[method], budget)["config"]

    settings = frontier_settings(
        methods, budgets, max_length, model.config, None if calibration_texts is None else calibrated
    )
    result = evaluate_perplexity(
        model,
        documents,
        [config for _, _, config in settings],
        max_length=max_length,
        stride=max_length,
        progress=progress,
        on_document=None if on_document is None else lambda r: on_document(summarize(r, settings)),
        resume_from=resume_from,
    )
    return summarize(result, settings)


def summarize(
    result: dict[str, Any], settings: Sequence[tuple[str, float | None, KNNConfig]]
) -> dict[str, Any]:
    """`result` with its `rows` and the frontier's `methods` and `budgets`."""
    rows = []
    docs = result["documents"]
    for (method, budget, _), setting in zip(settings, result["settings"][1:], strict=True):
        name = setting["name"]
        per_doc = [math.exp((d["nll"][name] - d["nll"][DENSE]) / d["tokens"]) for d in docs if d["tokens"]]
        rows.append(
            {
                "method": method,
                "budget_percent": setting["keys_percent_at_max_length"] if budget is None else budget,
                "setting": name,
                "keys_read": setting["keys_read_at_max_length"],
                "keys_percent": setting["keys_percent_at_max_length"],
                "ratio_to_dense": result["totals"][name]["ratio_to_dense"],
                "per_document_ratio": per_doc,
                "seconds": result["totals"][name]["seconds"],
            }
        )
    methods = list(dict.fromkeys(m for m, _, _ in settings))
    budgets = sorted({b for _, b, _ in settings if b is not None})
    return {**result, "rows": rows, "methods": methods, "budgets": budgets}


def print_frontier(result: dict[str, Any], title: str, console: Console | None = None) -> None:
    """One row per setting: method, budget, keys read (mean over layers) and their %, perplexity
    ratio to dense over all tokens, and the lowest and highest per-document ratio."""
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for col in ("method", "budget %", "keys", "keys %", "× dense", "per doc", "seconds"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    dense = result["totals"][DENSE]
    dense_keys = result["settings"][0]["keys_read_at_max_length"]
    dense_percent = 100 * dense_keys / result["max_length"]
    table.add_row(
        DENSE, "", f"{dense_keys:.0f}", f"{dense_percent:.1f}", "1.000x", "", f"{dense['seconds']:.1f}"
    )
    for row in sorted(result["rows"], key=lambda r: (r["budget_percent"], r["method"])):
        spread = row["per_document_ratio"]
        table.add_row(
            row["method"],
            f"{row['budget_percent']:.3g}",
            f"{row['keys_read']:.0f}",
            f"{row['keys_percent']:.2f}",
            f"{row['ratio_to_dense']:.3f}x",
            f"{min(spread):.3f}–{max(spread):.3f}" if spread else "",
            f"{row['seconds']:.1f}",
        )
    (console or Console(width=max(Console().width, 120))).print(table)


def plot_frontier(result: dict[str, Any], path: Path, title: str) -> Path:
    """Ratio to dense against keys read (% of n), one curve per method, both axes logarithmic (a
    ratio of 1.5 would flatten the region near 1 on a linear axis), and the dense line."""
    plt = pyplot("frontier")
    ticker = require("matplotlib.ticker", "frontier")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in result["methods"]:
        points = sorted(
            (r["keys_percent"], r["ratio_to_dense"]) for r in result["rows"] if r["method"] == method
        )
        ax.plot([x for x, _ in points], [y for _, y in points], "o-", label=method)
    ax.axhline(1.0, color="gray", linestyle="--", label="dense")
    ax.axhline(1.02, color="gray", linestyle=":", label="dense + 2%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(ticker.NullFormatter())  # minor labels on a log axis overlap
    ax.set_xticks(result["budgets"] or sorted({round(r["keys_percent"], 2) for r in result["rows"]}))
    top = max(r["ratio_to_dense"] for r in result["rows"])
    ax.set_yticks([t for t in (1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0) if t <= max(top, 1.05) * 1.05])
    ax.set_xlabel(f"keys read per query, % of n = {result['max_length']} (mean over layers)")
    ax.set_ylabel("perplexity / dense")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def write_frontier(result: dict[str, Any], out_dir: str | Path, title: str) -> dict[str, Path]:
    """frontier.json (everything, per document too) and frontier.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "frontier.json", "png": out / "frontier.png"}
    write_json_atomic(paths["json"], result)
    plot_frontier(result, paths["png"], title)
    return paths
