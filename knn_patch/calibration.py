"""Per-layer k for a key budget: spend the keys where the attention output needs them.

Layers differ a lot. At 2% of 4,096 keys, `topk` with the rest's mean leaves Gemma-3-270m's
layer 0 an 11% output error and its layer 8 0.2% (docs/REPORT.md), so one k for every layer
wastes keys on the easy layers. `calibrate` runs the model densely over calibration text once,
measures each layer's relative output error ||o_hat - o|| / ||o|| of the `topk` backend at
k = 1, 2, 4, ... for the text's last queries, and allots k greedily: each step doubles the k
of the layer whose squared error falls most per extra key read, while the mean keys read over
the layers (`keys_read`, the frontier's budget) stays within the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .backends.topk import kernel_options
from .bench.activations import capture_activations
from .config import KNNConfig, is_global_layer, layer_keys_read
from .io import atomic_write, write_json_atomic
from .kernels.topk import topk_attention

# The estimator calibrated by default: 4 sinks, an 8-key window and the rest's exact softmax
# mass on its values' mean. An 8-key window left less output error than 16 or 32 at 2% on
# Gemma-3-270m (docs/REPORT.md): the top-k finds the recent keys that matter.
BASE = KNNConfig(k=1, sink_tokens=4, local_window=8, backend_options={"rest": "mean"})


def _k_rule(k: int, n: int, is_global: bool) -> int | str:
    """k as saved: a global layer's as the rule n^p that gives k at n keys (so it grows with the
    context), a sliding layer's as an int (it never sees more than its window)."""
    if not is_global or k < 2 or n < 2:
        return k
    power = math.floor(math.log(k) / math.log(n) * 1e6) / 1e6  # down: ceil(n^p) is then exactly k
    return f"n^{power}"


def layer_errors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    config: KNNConfig,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    layer: int | None = None,
) -> list[float]:
    """The `topk` backend's relative output error against exact attention at each k of `grid`,
    for one layer's queries q (B, Hq, Lq, D), the last Lq of the keys k, v (B, Hkv, Lk, D) (sinks,
    window, rest and samples as in `config` for layer `layer`; `window`: the layer's sliding
    window, if it has one)."""
    lq, lk = q.shape[2], k.shape[2]
    mask = None
    if window is not None:
        rows = torch.arange(lk - lq, lk).unsqueeze(1)
        dist = rows - torch.arange(lk)
        mask = ((dist >= 0) & (dist < window)).view(1, 1, lq, lk)
    common = {"scale": scale, "softcap": softcap, "chunk_size": config.chunk_size}
    exact = topk_attention(q, k, v, mask, k=lk, **common)[0]
    norm = exact.norm()
    errors = []
    for kk in grid:
        out = topk_attention(q, k, v, mask, k=kk, **kernel_options(config, layer, q.device), **common)[0]
        errors.append(float((out - exact).norm() / norm))
    return errors


def allocate(errors: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float) -> list[int]:
    """Grid index per layer minimising the sum of squared errors with sum of costs <= budget.

    errors[l][i], costs[l][i]: layer l's error and keys read at its i-th grid point (costs
    increasing). Greedy from every layer's first point: the step with the largest fall in squared
    error per unit of cost that still fits, until none fits or none lowers the error."""
    choice = [0] * len(errors)
    spent = sum(c[0] for c in costs)
    if spent > budget + 1e-9:
        raise ValueError(
            f"The budget ({budget:g} keys over all layers) is below the least the layers read "
            f"({spent:g}: sinks, window, the rest's mean and k = 1); raise it."
        )
    while True:
        best, step = 0.0, None
        for layer, (err, cost) in enumerate(zip(errors, costs, strict=True)):
            i = choice[layer]
            if i + 1 == len(err) or spent + cost[i + 1] - cost[i] > budget + 1e-9:
                continue
            gain = (err[i] ** 2 - err[i + 1] ** 2) / max(cost[i + 1] - cost[i], 1e-9)
            if gain > best:  # a step that removes no error is not worth its keys
                best, step = gain, layer
        if step is None:
            return choice
        spent += costs[step][choice[step] + 1] - costs[step][choice[step]]
        choice[step] += 1


def _grid(free: int) -> list[int]:
    """k = 1, 2, 4, ... below `free` (the keys a layer may select beyond its forced ones), then free:
    exact attention."""
    grid = [1]
    while grid[-1] * 2 < free:
        grid.append(grid[-1] * 2)
    return [*grid, max(free, 1)] if free > 1 else grid


def measure(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    *,
    base: KNNConfig = BASE,
    queries: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """Each layer's error curve on `input_ids`, for `fit` to spend a budget on (one dense pass and
    the curves serve any number of budgets). `input_ids`: one text, or a batch (B, n) of texts of
    one length, whose errors are pooled (each layer's error over all of them) so that no one text
    decides the fit.

    `base` gives the sinks, window, rest and layers (the `topk` backend only); its `layer_k` entries
    are floors, the least k those layers get. The last `queries` positions are measured. Returns
    {"n", "queries", "base", "seen": the keys each layer sees, "layers": per calibrated layer its
    index, whether it is global, and its grid of k with the keys read and the error at each}.
    """
    if base.backend != "topk":
        raise ValueError(f"calibrate measures the 'topk' backend; base has backend={base.backend!r}.")
    ids = torch.as_tensor(input_ids)
    if ids.dim() not in (1, 2):
        raise ValueError(
            f"calibrate takes one text (n,) or a batch (B, n) of token ids; got shape {tuple(ids.shape)}."
        )
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    n = ids.shape[1]
    if n < 2:
        raise ValueError("calibrate needs a text of at least 2 tokens.")
    model_config = model.config.get_text_config()
    n_layers = model_config.num_hidden_layers
    windows = [
        None if is_global_layer(model_config, i) else model_config.sliding_window for i in range(n_layers)
    ]
    seen = [n if w is None else min(n, w) for w in windows]
    layers = [i for i in range(n_layers) if base.uses_layer(i, model_config)]
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    acts = capture_activations(inner, ids, layers=layers)
    saved = base.to_dict()
    rows = []
    for layer in tqdm(layers, desc="calibrating", disable=not progress):
        act = acts.pop(layer)  # freed once measured
        free = seen[layer] - base.sink_tokens - base.local_window
        grid = _grid(free)
        if layer in base.layer_k:  # a floor: the layer's grid starts there
            floor = min(base.resolve_k(n, layer), max(free, 1))
            grid = [floor, *(kk for kk in grid if kk > floor)]
        q = act["q"][:, :, -min(queries, n) :]
        kwargs = {"scale": act["scale"], "window": windows[layer], "softcap": act.get("softcap")}
        sparse = [kk for kk in grid if kk < free]  # k >= free keeps every key: exact, error 0
        errors = layer_errors(q, act["k"], act["v"], sparse, base, **kwargs, layer=layer) if sparse else []
        rows.append(
            {
                "layer": layer,
                "global": windows[layer] is None,
                "grid": grid,
                "keys_read": [layer_keys_read(saved, kk, seen[layer], layer) for kk in grid],
                "errors": errors + [0.0] * (len(grid) - len(sparse)),
            }
        )
    return {"n": n, "queries": min(queries, n), "base": base, "seen": seen, "layers": rows}


def check_budget(budget: float) -> None:
    """A budget is a share of the keys in %, in (0, 100]."""
    if not 0 < budget <= 100:
        raise ValueError(f"The budget is a share of the keys in %, in (0, 100]; got {budget}.")


def fit(measured: dict[str, Any], budget: float) -> dict[str, Any]:
    """The k per layer that reads `budget`% of n keys on average over all layers (those `base`
    leaves dense count all they see) with the least sum of squared errors, from `measure`'s curves.

    Returns {"config": the KNNConfig, "n", "budget", "keys_read", "queries", "rows": per layer its
    k, keys read, error and error curve}."""
    check_budget(budget)
    n, seen, layers = measured["n"], measured["seen"], measured["layers"]
    dense = sum(seen) - sum(seen[row["layer"]] for row in layers)
    choice = allocate(
        [row["errors"] for row in layers],
        [row["keys_read"] for row in layers],
        budget / 100 * n * len(seen) - dense,
    )
    rules = [_k_rule(row["grid"][i], n, row["global"]) for row, i in zip(layers, choice, strict=True)]
    common = max(set(rules), key=lambda rule: (rules.count(rule), str(rule)))
    layer_k = {row["layer"]: rule for row, rule in zip(layers, rules, strict=True) if rule != common}
    rows = [
        {
            "layer": row["layer"],
            "global": row["global"],
            "k": row["grid"][i],
            "keys_read": row["keys_read"][i],
            "error": row["errors"][i],
            "curve": dict(zip(row["grid"], row["errors"], strict=True)),
        }
        for row, i in zip(layers, choice, strict=True)
    ]
    return {
        "config": measured["base"].replace(k=common, layer_k=layer_k),
        "n": n,
        "budget": budget,
        "keys_read": (dense + sum(row["keys_read"] for row in rows)) / len(seen),
        "queries": measured["queries"],
        "rows": rows,
    }


def calibrate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    *,
    budget: float = 2.0,
    base: KNNConfig = BASE,
    queries: int = 1024,
    progress: bool = True,
) -> dict[str, Any]:
    """A `KNNConfig` with a k per layer that reads `budget`% of the text's n keys on average over
    the layers, fitted on `input_ids` (one text, or a batch of texts of one length, as long as the
    contexts it is meant for): `fit` on `measure`. Save the config with the model or pass it to `patch`."""
    check_budget(budget)  # before the long work
    return fit(measure(model, input_ids, base=base, queries=queries, progress=progress), budget)


def print_calibration(result: dict[str, Any], console: Any = None) -> None:
    """One row per calibrated layer: its kind, k, keys read and output error at that k."""
    from .extras import require

    table = require("rich.table", "calibrate").Table(
        title="k per layer",
        caption=f"{result['keys_read']:.1f} of {result['n']} keys read on average over the layers "
        f"({100 * result['keys_read'] / result['n']:.2f}%; budget {result['budget']:g}%)",
    )
    for col in ("layer", "attention", "k", "keys read", "output error"):
        table.add_column(col, justify="left" if col == "attention" else "right")
    for row in result["rows"]:
        kind = "global" if row["global"] else "sliding"
        table.add_row(str(row["layer"]), kind, str(row["k"]), str(row["keys_read"]), f"{row['error']:.4f}")
    (console or require("rich.console", "calibrate").Console()).print(table)


def write_calibration(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """calibration.json (the config's saved form, the per-layer rows and curves) and settings.yaml
    (a one-entry list, for `knn-patch eval --settings` and `needle --settings`)."""
    out = Path(out_dir)
    saved = result["config"].to_dict()
    return {
        "json": write_json_atomic(out / "calibration.json", {**result, "config": saved}),
        "settings": atomic_write(
            out / "settings.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump([saved]))
        ),
    }
