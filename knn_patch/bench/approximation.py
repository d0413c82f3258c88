"""The approximation report: how well `topk`, `tail` and `gumbel` estimate exact attention.

1. synthetic: the paper's experiment (Q, K, V uniform in [-B, B], causal), mean absolute error
   against exact attention over seeds, for several k;
2. activations: q, k, v captured from a real model on real text; per layer, the share of softmax
   mass in the top-k and each estimator's error at equal key budgets;
3. gradients: the error of the sampled dQ, dK, dV against autograd as the sample count grows, and
   the fitted log-log slope (about -1/2 for a Monte Carlo estimator);
4. quality: perplexity relative to dense at equal key budgets (`knn_patch.eval.evaluation`).

Equal key budgets: a budget of b keys per query is `topk` with k = b (`topk+mean` with k = b - 1
and the rest's exact mass on its values' mean, `topk_attention`'s `rest_mean`), `tail` with k = m = b/2,
`gumbel` with k = samples = b/2 (the values it reads), and sinks + window + topk with 4 sinks, a
window of b/4 and k = b - 4 - b/4.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import KNNConfig, is_global_layer
from ..eval.evaluation import evaluate_perplexity
from ..extras import pyplot, require
from ..io import atomic_write, write_json_atomic
from ..kernels.gumbel import gumbel_attention
from ..kernels.sampling import exact_attention, group_mask
from ..kernels.tail import tail_attention
from ..kernels.topk import topk_attention
from .activations import capture_activations
from .faiss import fit_exponent

Console = require("rich.console", "approx").Console
Table = require("rich.table", "approx").Table

ESTIMATORS = ("topk", "topk+mean", "tail", "gumbel")


def estimate(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budget: int,
    seed: int,
    mask=None,
    scale: float | None = None,
) -> torch.Tensor:
    """One estimator at a key budget (see the module docstring): (B, Hq, L, D) -> (B, Hq, L, Dv)."""
    gen = torch.Generator().manual_seed(seed)
    half = max(1, budget // 2)
    if method == "topk":
        return topk_attention(q, k, v, mask, k=budget, scale=scale)[0]
    if method == "topk+mean":
        return topk_attention(q, k, v, mask, k=max(1, budget - 1), scale=scale, rest_mean=True)[0]
    if method == "tail":
        return tail_attention(q, k, v, mask, k=half, m=budget - half, scale=scale, generator=gen)
    if method == "gumbel":
        return gumbel_attention(
            q, k, v, mask, k=half, samples=max(2, budget - half), scale=scale, generator=gen
        )
    raise ValueError(f"unknown estimator {method!r}; use one of {ESTIMATORS}")


def exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask=None,
    softcap: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense causal softmax attention, (B, Hq, L, D) layout: the reference of every estimator."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    m = group_mask(mask, hq, hkv, lq, k.shape[2])
    scale = d**-0.5 if scale is None else scale
    out = exact_attention(
        q.view(b, hkv, hq // hkv, lq, d), k, v, m, causal=True, scale=scale, softcap=softcap
    )
    return out.reshape(b, hq, lq, -1)


# ---------------------------------------------------------------- 1. the paper's synthetic experiment
def synthetic_errors(
    *,
    n: int = 1000,
    heads: int = 10,
    head_dim: int = 64,
    bounds: Sequence[float] = (10, 30, 50),
    ks: Sequence[int] = (2, 3, 5, 6, 31, 64, 128),
    seeds: int = 4,
    methods: Sequence[str] = ("topk", "tail", "gumbel"),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Mean absolute error against exact attention, averaged over seeds: one row per (B, k, method).

    For k in the paper's sense, `topk` keeps k keys, `tail` adds m = k uniform tail samples and
    `gumbel` draws k samples over its top-k (each reads about 2k values: the paper's setting)."""
    rows = []
    jobs = [(bound, seed) for bound in bounds for seed in range(seeds)]
    errors: dict[tuple, list[float]] = {}
    for bound, seed in tqdm(jobs, desc="synthetic", disable=not progress):
        gen = torch.Generator().manual_seed(seed)
        q, k, v = ((torch.rand(1, heads, n, head_dim, generator=gen) * 2 - 1) * bound for _ in range(3))
        ref = exact(q, k, v)
        for kk in ks:
            for method in methods:
                out = estimate(method, q, k, v, 2 * kk if method != "topk" else kk, seed)
                errors.setdefault((bound, kk, method), []).append(float((out - ref).abs().mean()))
    for (bound, kk, method), errs in errors.items():
        rows.append(
            {"B": bound, "k": kk, "method": method, "mae": sum(errs) / len(errs), "mae_per_seed": errs}
        )
    return rows


# ---------------------------------------------------------------- 2. real activations
def activation_errors(
    layers: dict[int, dict[str, torch.Tensor]],
    budgets: Sequence[int] = (32, 64, 128, 256),
    methods: Sequence[str] = ESTIMATORS,
    seed: int = 0,
    layer_stride: int = 1,
    progress: bool = True,
    model_config: Any = None,
) -> list[dict[str, Any]]:
    """Per layer (every `layer_stride`-th, and the last) and budget: the top-k softmax mass share
    (mean over queries and heads) and each estimator's relative error ||o_hat - o|| / ||o||.

    Each layer uses its own score scaling and, given `model_config`, its sliding window where it
    has one; the rows say whether the layer is global."""
    rows = []
    chosen = sorted(set(range(0, len(layers), layer_stride)) | {len(layers) - 1})
    for layer in tqdm(chosen, desc="layers", disable=not progress):
        act = layers[layer]
        q, k, v = act["q"], act["k"], act["v"]
        _, hq, n, d = q.shape
        scale = act.get("scale", d**-0.5)
        visible = torch.ones(n, n, dtype=torch.bool).tril()
        is_global = model_config is None or is_global_layer(model_config, layer)
        if not is_global:
            visible &= ~torch.ones(n, n, dtype=torch.bool).tril(-model_config.sliding_window)
        mask = None if is_global else visible.view(1, 1, n, n)
        ref = exact(q, k, v, mask, scale=scale)
        # softmax probabilities, (B, Hq, n, n): small enough at the report's lengths
        g = hq // k.shape[1]
        s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scale
        s = s.masked_fill(~visible, -math.inf)
        p_sorted = torch.softmax(s, -1).sort(-1, descending=True).values.cumsum(-1)
        for budget in budgets:
            row = {
                "layer": layer,
                "global": is_global,
                "budget": budget,
                "topk_mass": float(p_sorted[..., min(budget, n) - 1].mean()),
            }
            for method in methods:
                out = estimate(method, q, k, v, budget, seed, mask, scale)
                row[f"{method}_error"] = float((out - ref).norm() / ref.norm())
            rows.append(row)
    return rows


# ---------------------------------------------------------------- 3. gradients
def gradient_errors(
    *,
    n: int = 256,
    heads: int = 2,
    head_dim: int = 64,
    k: int = 16,
    samples: Sequence[int] = (4, 16, 64, 256, 1024),
    seeds: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Relative error of the sampled dQ, dK, dV against autograd through exact attention (normal
    inputs, causal), averaged over seeds, and the least-squares slope of log error on log samples."""
    rows = []
    for t in tqdm(samples, desc="gradients", disable=not progress):
        errs = {"dq": [], "dk": [], "dv": []}
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            q, kk, v = (torch.randn(1, heads, n, head_dim, generator=gen).requires_grad_() for _ in range(3))
            d_out = torch.randn(1, heads, n, head_dim, generator=gen)
            truth = torch.autograd.grad(exact(q, kk, v), (q, kk, v), d_out)
            out = gumbel_attention(
                q, kk, v, k=k, samples=t, generator=torch.Generator().manual_seed(100 + seed)
            )
            est = torch.autograd.grad(out, (q, kk, v), d_out)
            for name, e, tr in zip(errs, est, truth, strict=True):
                errs[name].append(float((e - tr).norm() / tr.norm()))
        rows.append({"samples": t, **{name: sum(v) / len(v) for name, v in errs.items()}})
    slopes = {
        name: fit_exponent([r["samples"] for r in rows], [r[name] for r in rows])
        for name in ("dq", "dk", "dv")
    }
    return {"rows": rows, "slopes": slopes, "n": n, "heads": heads, "head_dim": head_dim, "k": k}


# ---------------------------------------------------------------- 4. quality at equal budgets
def budget_configs(budget: int, samples_seed: int = 0) -> dict[str, KNNConfig]:
    """The four settings of one key budget (module docstring), by report name."""
    half = budget // 2
    window = budget // 4
    return {
        "topk": KNNConfig(k=budget),
        "tail": KNNConfig(k=half, backend="tail", backend_options={"m": budget - half, "seed": samples_seed}),
        "gumbel": KNNConfig(
            k=half, backend="gumbel", backend_options={"samples": budget - half, "seed": samples_seed}
        ),
        "sinks+window+topk": KNNConfig(k=budget - 4 - window, sink_tokens=4, local_window=window),
    }


def quality_frontier(
    model: torch.nn.Module,
    documents: Sequence[tuple[str, Sequence[int]]],
    budgets: Sequence[int] = (32, 64, 128, 256),
    *,
    max_length: int,
    methods: Sequence[str] = ("topk", "tail", "gumbel", "sinks+window+topk"),
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity ratio to dense for each method and budget, through `evaluate_perplexity`."""
    configs, names = [], []
    for budget in budgets:
        for method, config in budget_configs(budget).items():
            if method in methods:
                configs.append(config)
                names.append((method, budget))
    result = evaluate_perplexity(
        model, documents, configs, max_length=max_length, stride=max_length, progress=progress
    )
    rows = []
    for (method, budget), setting in zip(names, result["settings"][1:], strict=True):
        total = result["totals"][setting["name"]]
        rows.append(
            {
                "method": method,
                "budget": budget,
                "ratio_to_dense": total["ratio_to_dense"],
                "perplexity": total["perplexity"],
                "seconds": total["seconds"],
                "config": setting["config"],
            }
        )
    return {"rows": rows, "dense": result["totals"]["dense"], "max_length": max_length}


# ---------------------------------------------------------------- tables, plots, files
def print_tables(report: dict[str, Any], console: Console | None = None) -> None:
    """One rich table per part that was run."""
    console = console or Console()
    if "synthetic" in report:
        rows = report["synthetic"]["rows"]
        methods = sorted({r["method"] for r in rows}, key=ESTIMATORS.index)
        table = Table(title="1. synthetic (paper): mean |error| vs exact attention, mean over seeds")
        for col in ("B", "k", *methods):
            table.add_column(col, justify="right")
        for bound in sorted({r["B"] for r in rows}):
            for kk in sorted({r["k"] for r in rows}):
                cell = {r["method"]: r["mae"] for r in rows if r["B"] == bound and r["k"] == kk}
                table.add_row(str(bound), str(kk), *(f"{cell[m]:.3g}" for m in methods))
        console.print(table)
    if "activations" in report:
        rows = report["activations"]["rows"]
        methods = [m for m in ESTIMATORS if f"{m}_error" in rows[0]]
        table = Table(title="2. real activations: top-k mass and relative error, mean over layers")
        for col in ("budget", "top-k mass", *methods, "worst layer (topk)"):
            table.add_column(col, justify="right")
        for budget in sorted({r["budget"] for r in rows}):
            rs = [r for r in rows if r["budget"] == budget]
            worst = max(rs, key=lambda r: r.get("topk_error", 0))
            table.add_row(
                str(budget),
                f"{sum(r['topk_mass'] for r in rs) / len(rs):.3f}",
                *(f"{sum(r[f'{m}_error'] for r in rs) / len(rs):.4f}" for m in methods),
                f"{worst['layer']} ({worst.get('topk_error', float('nan')):.3f})",
            )
        console.print(table)
    if "gradients" in report:
        g = report["gradients"]
        table = Table(title="3. sampled gradients: relative error vs autograd")
        for col in ("samples", "dQ", "dK", "dV"):
            table.add_column(col, justify="right")
        for r in g["rows"]:
            table.add_row(str(r["samples"]), *(f"{r[x]:.4f}" for x in ("dq", "dk", "dv")))
        table.add_row("slope", *(f"{g['slopes'][x]:+.3f}" for x in ("dq", "dk", "dv")))
        console.print(table)
    if "quality" in report:
        rows = report["quality"]["rows"]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        table = Table(title="4. quality: perplexity / dense at equal key budgets")
        for col in ("budget", *methods):
            table.add_column(col, justify="right")
        for budget in sorted({r["budget"] for r in rows}):
            cell = {r["method"]: r["ratio_to_dense"] for r in rows if r["budget"] == budget}
            table.add_row(str(budget), *(f"{cell[m]:.3f}x" if m in cell else "-" for m in methods))
        console.print(table)


def _save_plot(path: Path, draw: Callable[[Any], None], figsize=(6, 4)) -> Path:
    plt = pyplot("approx")

    fig = plt.figure(figsize=figsize)
    draw(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def write_outputs(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """approximation.json and one PNG per part, all written atomically."""
    out = Path(out_dir)
    paths = {"json": write_json_atomic(out / "approximation.json", report)}
    if "synthetic" in report:
        rows = report["synthetic"]["rows"]
        bounds = sorted({r["B"] for r in rows})

        def draw(fig):
            axes = fig.subplots(1, len(bounds), sharey=False, squeeze=False)[0]
            for ax, bound in zip(axes, bounds, strict=True):
                for method in sorted({r["method"] for r in rows}, key=ESTIMATORS.index):
                    pts = sorted(
                        (r["k"], r["mae"]) for r in rows if r["B"] == bound and r["method"] == method
                    )
                    ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], "o-", label=method)
                ax.set(xscale="log", yscale="log", title=f"B = {bound}", xlabel="k (nearest keys)")
                ax.grid(True, which="both", alpha=0.3)
            axes[0].set_ylabel("mean |error| vs exact attention")
            axes[0].legend()

        paths["synthetic"] = _save_plot(out / "synthetic.png", draw, (4 * len(bounds), 3.5))
    if "activations" in report:
        rows = report["activations"]["rows"]

        def draw(fig):
            ax1, ax2 = fig.subplots(1, 2)
            for budget in sorted({r["budget"] for r in rows}):
                rs = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["layer"])
                ax1.plot([r["layer"] for r in rs], [r["topk_mass"] for r in rs], label=f"b={budget}")
            ax1.set(xlabel="layer", ylabel="softmax mass in the top-b keys")
            ax1.legend()
            budget = max(r["budget"] for r in rows)
            for m in ESTIMATORS:
                if f"{m}_error" in rows[0]:
                    rs = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["layer"])
                    ax2.plot([r["layer"] for r in rs], [r[f"{m}_error"] for r in rs], label=m)
            ax2.set(xlabel="layer", ylabel=f"relative output error (budget {budget})", yscale="log")
            ax2.legend()

        paths["activations"] = _save_plot(out / "activations.png", draw, (10, 3.5))
    if "gradients" in report:
        g = report["gradients"]

        def draw(fig):
            ax = fig.subplots()
            xs = [r["samples"] for r in g["rows"]]
            for name in ("dq", "dk", "dv"):
                ax.plot(
                    xs, [r[name] for r in g["rows"]], "o-", label=f"{name} (slope {g['slopes'][name]:+.2f})"
                )
            ref = g["rows"][0]["dq"]
            ax.plot(xs, [ref * (x / xs[0]) ** -0.5 for x in xs], "k--", label="slope -1/2")
            ax.set(
                xscale="log", yscale="log", xlabel="samples per query", ylabel="relative error vs autograd"
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()

        paths["gradients"] = _save_plot(out / "gradients.png", draw)
    if "quality" in report:
        rows = report["quality"]["rows"]

        def draw(fig):
            ax = fig.subplots()
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r["budget"], r["ratio_to_dense"]) for r in rows if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            ax.axhline(1.0, color="gray", linestyle="--", label="dense")
            ax.set(xscale="log", xlabel="key budget per query", ylabel="perplexity / dense")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()

        paths["quality"] = _save_plot(out / "quality.png", draw)
    return paths


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# ---------------------------------------------------------------- the whole report
PARTS = ("synthetic", "activations", "gradients", "quality")

# Sizes of the default run (about the paper's synthetic setting; real parts on one long document)
# and of `quick` (seconds, for tests and smoke runs).
SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "synthetic": {"n": 1000, "heads": 10, "head_dim": 64, "bounds": (10, 30, 50),
                      "ks": (2, 3, 5, 6, 31, 128), "seeds": 4},
        "activations": {"tokens": 512, "budgets": (32, 64, 128, 256), "layer_stride": 3},
        "gradients": {"n": 256, "heads": 2, "head_dim": 64, "k": 16,
                      "samples": (4, 16, 64, 256, 1024), "seeds": 3},
        "quality": {"tokens": 512, "budgets": (32, 64, 128, 256)},
    },
    "quick": {
        "synthetic": {"n": 96, "heads": 2, "head_dim": 16, "bounds": (10,), "ks": (2, 5), "seeds": 1},
        "activations": {"tokens": 48, "budgets": (8, 16), "layer_stride": 1},
        "gradients": {"n": 48, "heads": 1, "head_dim": 16, "k": 4, "samples": (4, 16, 64), "seeds": 1},
        "quality": {"tokens": 48, "budgets": (16, 32)},
    },
}  # fmt: skip


def run_report(
    model: torch.nn.Module | None,
    document: tuple[str, Sequence[int]] | None,
    *,
    parts: Sequence[str] = PARTS,
    size: str = "default",
    tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the chosen parts at `size` ("default" or "quick"). Parts 2 and 4 need a model and one
    (name, token ids) document, cut to the size's token count (or `tokens` for part 2: longer than a
    sliding window to see it); each part records its seconds."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"Unknown report parts {unknown}; choose from {list(PARTS)}.")
    if size not in SIZES:
        raise ValueError(f"size={size!r} is invalid: use one of {sorted(SIZES)}.")
    if ({"activations", "quality"} & set(parts)) and (model is None or document is None):
        raise ValueError("Parts 'activations' and 'quality' need a model and a document.")
    cfg = SIZES[size]
    report: dict[str, Any] = {"size": size, "sizes": {p: cfg[p] for p in parts}}
    if "synthetic" in parts:
        rows, sec = timed(synthetic_errors, **cfg["synthetic"], progress=progress)
        report["synthetic"] = {"rows": rows, "seconds": sec}
    if "activations" in parts:
        name, ids = document
        ids = torch.as_tensor(list(ids)[: tokens or cfg["activations"]["tokens"]]).unsqueeze(0)
        stride = cfg["activations"]["layer_stride"]
        layers = capture_activations(model, ids)
        rows, sec = timed(
            activation_errors,
            layers,
            cfg["activations"]["budgets"],
            layer_stride=stride,
            progress=progress,
            model_config=model.config.get_text_config(),
        )
        report["activations"] = {"rows": rows, "seconds": sec, "document": name, "tokens": ids.shape[1]}
    if "gradients" in parts:
        res, sec = timed(gradient_errors, **cfg["gradients"], progress=progress)
        report["gradients"] = {**res, "seconds": sec}
    if "quality" in parts:
        name, ids = document
        ids = list(ids)[: cfg["quality"]["tokens"]]
        res, sec = timed(
            quality_frontier,
            model,
            [(name, ids)],
            cfg["quality"]["budgets"],
            max_length=len(ids),
            progress=progress,
        )
        report["quality"] = {**res, "seconds": sec, "document": name, "tokens": len(ids)}
    return report
