"""faiss benchmarks: full-sequence growth of one attention layer, and per-token decode with KNNCache.

    knn-patch faiss-bench growth --n 4096 8192 16384 32768 65536
    knn-patch faiss-bench decode --cache 8192 32768

Growth: one layer of SmolLM2's shape (B=1, 9 query heads, 3 KV heads, D=64), causal fp32 forward
under `no_grad`: faiss (ivf, hnsw) against the exact `topk` kernel and SDPA. Each time is the
median of `repeats` runs after a warm-up at n=1024, the methods taking turns run by run (a machine
whose speed drifts then slows all of them alike); faiss times include building the index (it is
part of every forward). The growth exponent is the least-squares slope of log(time) on log(n).
Recall@k of each faiss index is measured on the same inputs (`recall_at_k`). The inputs are random
normal q/k/v (fixed seed; `--inputs random`), a hard case for an index (no cluster structure), or
(`--inputs real`) the embedded default's q/k/v at one layer over the first n tokens of the bundled
speeches, concatenated: captured once at the largest n (a causal prefix sees the same
activations), on a dense forward pass that takes minutes at 64k tokens. Positions past 8192
extrapolate, so these activations are realistic in kind, not the model's trained regime.

Decode: the whole embedded model, its cache filled with `cache` random normal keys/values per
layer (a real prefill at 32k takes many minutes on CPU, and positions past 8192 extrapolate
anyway, so speed is what counts here). Then `steps` greedy one-token steps are timed with the
dense `DynamicCache` (SDPA) and with `KNNCache` (faiss backend), after warm-up steps that build
the index. Timings on a shared machine are noisy; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..cache import KNNCache
from ..extras import pyplot, require
from ..io import atomic_write, write_json_atomic
from ..kernels.index import faiss_module, validate_index_options
from ..kernels.retrieval import recall_at_k, retrieval_attention
from ..kernels.topk import topk_attention

GROWTH_METHODS = ("sdpa", "topk", "faiss-ivf", "faiss-hnsw")


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log(y) against log(x), so y ~ x^slope (time against n here, error
    against samples in `approximation`); None below two points."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


# The ivf options growth can sweep: option -> (method-name tag, type); "faiss-ivf-np48" is ivf at nprobe=48.
SWEEPS = {"nprobe": ("np", int), "scan_fraction": ("sf", float), "block_size": ("bs", int)}


def _index_options(method: str, options: dict) -> dict:
    """The faiss options of a growth method: "faiss-ivf", "faiss-hnsw", or "faiss-ivf-<tag><value>"
    for a swept option (`SWEEPS`)."""
    _, index, *sweep = method.split("-")
    extra = {}
    for name, (tag, kind) in SWEEPS.items():
        if sweep and sweep[0].startswith(tag):
            extra = {name: kind(sweep[0][len(tag) :])}
    return validate_index_options({**options, "index": index, **extra})


def _layer_fn(method: str, k: int, options: dict) -> Callable[..., torch.Tensor]:
    if method == "sdpa":
        return lambda q, kk, v: F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=True)
    if method == "topk":
        return lambda q, kk, v: topk_attention(q, kk, v, k=k)[0]
    opts = _index_options(method, options)
    return lambda q, kk, v: retrieval_attention(q, kk, v, k=k, options=opts)[0]


def _inputs(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, n, 64, generator=gen) for h in (9, 3, 3))  # q, k, v


def corpus_ids(tokenizer, n: int) -> torch.Tensor:
    """The first n tokens (1, n) of the bundled speeches, concatenated in file order."""
    from ..assets import bundled_corpus_dir

    ids: list[int] = []
    for path in sorted(bundled_corpus_dir().glob("*.txt")):
        ids += tokenizer(path.read_text(encoding="utf-8")).input_ids
        if len(ids) >= n:
            return torch.tensor([ids[:n]])
    raise ValueError(f"The bundled speeches hold only {len(ids)} tokens, fewer than the {n} asked for.")


def real_inputs(n: int, layer: int = 3) -> tuple[torch.Tensor, ...]:
    """q (1, 9, n, 64), k and v (1, 3, n, 64): the embedded default's post-RoPE activations at
    `layer` over `corpus_ids(n)`, from a dense forward pass (minutes on CPU at 64k tokens)."""
    from ..loading import load_default
    from .activations import capture_activations

    model, tokenizer = load_default()
    act = capture_activations(model.model, corpus_ids(tokenizer, n), [layer])[layer]
    return act["q"], act["k"], act["v"]


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_growth(
    ns: list[int],
    *,
    k: int = 32,
    methods: tuple[str, ...] = GROWTH_METHODS,
    options: dict | None = None,
    repeats: int = 1,
    recall_queries: int = 256,
    seed: int = 0,
    inputs: tuple[torch.Tensor, ...] | None = None,
    progress: bool = True,
) -> dict:
    """{"rows": [{"n", "times": {method: s}, "samples": {method: [s, ...]}, "recall": {method: r}}],
    "exponents": {method: slope}}.

    `inputs` (q, k, v) at least max(ns) long are timed on their first n positions; by default
    random normal ones (`seed`). With `repeats`, the methods take turns (one run of each, then the
    next round), so that a machine whose speed drifts slows them alike; "times" holds the medians,
    "samples" every run in round order."""
    Progress = require("rich.progress", "benchmarks").Progress

    options = options or {}
    rows = []

    def layer_inputs(n: int) -> tuple[torch.Tensor, ...]:
        return _inputs(n, seed) if inputs is None else tuple(x[:, :, :n].contiguous() for x in inputs)

    with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("growth", total=len(ns) * len(methods) * (repeats + 1))
        fns = {method: _layer_fn(method, k, options) for method in methods}
        for fn in fns.values():  # warm-up: lazy initialisation and the compiled selection
            fn(*layer_inputs(min(1024, *ns)))
        for n in ns:
            q, kk, v = layer_inputs(n)
            row: dict = {"n": n, "times": {}, "samples": {m: [] for m in methods}, "recall": {}}
            for _ in range(repeats):
                for method in methods:
                    bar.update(task, description=f"n={n} {method}")
                    row["samples"][method].append(_time(partial(fns[method], q, kk, v)))
                    bar.advance(task)
            for method in methods:
                row["times"][method] = statistics.median(row["samples"][method])
                if method.startswith("faiss"):
                    bar.update(task, description=f"n={n} {method} recall")
                    opts = _index_options(method, options)
                    try:
                        recall = recall_at_k(q, kk, k=k, options=opts, n_queries=recall_queries).plain
                    except ValueError:  # too short for ivf to have trained: no approximate search
                        recall = None
                    row["recall"][method] = recall
                bar.advance(task)
            rows.append(row)
    exponents = {m: fit_exponent([r["n"] for r in rows], [r["times"][m] for r in rows]) for m in methods}
    return {"rows": rows, "exponents": exponents}


def real_recall(
    n: int = 4096,
    layers: tuple[int, ...] = (3, 10),
    k: int = 32,
    options: dict | None = None,
    sink_tokens: int = 0,
) -> dict:
    """Recall@k of ivf and hnsw (default settings unless `options`) on post-RoPE queries/keys of the
    embedded default's `layers` over the first n tokens of the longest of the first 40 bundled
    speeches, or of the longest speech of all when that one is shorter than n tokens; also the
    attention-weighted recall (`Recall.weighted`), under "mass_recall". With `sink_tokens`, the
    first keys are sinks, as in the backend (see `recall_at_k`)."""
    from ..assets import bundled_corpus_dir
    from ..loading import load_default
    from .activations import capture_activations

    model, tokenizer = load_default()
    speeches = sorted(bundled_corpus_dir().glob("*.txt"))
    path = max(speeches[:40], key=lambda p: p.stat().st_size)
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    if ids.shape[1] < n:
        path = max(speeches, key=lambda p: p.stat().st_size)
        ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    captured = capture_activations(model.model, ids[:, :n], layers)
    out: dict = {
        "document": path.name,
        "tokens": min(n, ids.shape[1]),
        "k": k,
        "sink_tokens": sink_tokens,
        "recall": {},
        "mass_recall": {},
    }
    for index in ("ivf", "hnsw"):
        opts = validate_index_options({**(options or {}), "index": index})
        found = {
            layer: recall_at_k(act["q"], act["k"], k=k, options=opts, n_queries=256, sink_tokens=sink_tokens)
            for layer, act in captured.items()
        }
        out["recall"][index] = {layer: r.plain for layer, r in found.items()}
        out["mass_recall"][index] = {layer: r.weighted for layer, r in found.items()}
    return out


def _fill(cache, model, n: int, seed: int) -> None:
    """Put n random normal keys/values (std of real SmolLM2 keys is ~2) into every layer of `cache`."""
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    for layer in range(cfg.num_hidden_layers):
        kv = [torch.randn(1, cfg.num_key_value_heads, n, hd, generator=gen) * 2 for _ in range(2)]
        cache.update(kv[0], kv[1], layer)


def run_decode(
    cache_lengths: list[int],
    *,
    k: int = 32,
    options: dict | None = None,
    steps: int = 8,
    warmup: int = 2,
    sink_tokens: int = 4,
    local_window: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Per-token decode seconds of the embedded default: dense cache (SDPA) against KNNCache (faiss)."""
    Progress = require("rich.progress", "benchmarks").Progress

    from ..loading import load_default
    from ..patcher import patched

    model, _ = load_default()
    options = {"index": "ivf", **(options or {})}
    rows = []
    with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("decode", total=2 * len(cache_lengths))
        for n in cache_lengths:
            row: dict = {"cache": n}
            for name in ("dense", "knn"):
                bar.update(task, description=f"cache {n} {name}")
                cache = DynamicCache() if name == "dense" else KNNCache()
                _fill(cache, model, n, seed)
                token = torch.tensor([[42]])

                def step(cache=cache, token=token) -> None:
                    model(input_ids=token, cache=cache, use_cache=True)

                settings = dict(k=k, backend="faiss", backend_options=options)
                settings.update(sink_tokens=sink_tokens, local_window=local_window)
                ctx = patched(model, **settings) if name == "knn" else contextlib.nullcontext()
                with ctx:
                    t0 = time.perf_counter()
                    for _ in range(warmup):  # the first kNN step builds the indexes
                        step()
                    row[f"{name}_warmup_s"] = time.perf_counter() - t0
                    times = []
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        step()
                        times.append(time.perf_counter() - t0)
                row[f"{name}_s"] = statistics.median(times)
                if name == "knn":
                    row["index_bytes"] = cache.index_memory_bytes()
                bar.advance(task)
            row["ratio"] = row["knn_s"] / row["dense_s"]
            rows.append(row)
    return {
        "rows": rows,
        "options": options,
        "k": k,
        "sink_tokens": sink_tokens,
        "local_window": local_window,
    }


def _plot_growth(result: dict, path: Path) -> None:
    plt = pyplot("benchmarks")

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in result["rows"]]
    for m, slope in result["exponents"].items():
        label = m if slope is None else f"{m} (n^{slope:.2f})"
        ax.loglog(ns, [r["times"][m] for r in result["rows"]], "o-", label=label)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set(xlabel="sequence length n", ylabel="forward time (s)", title="One layer (Hq=9, Hkv=3, D=64), k=32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def _print_wide(table) -> None:
    """Print a rich table at least 170 columns wide, so that its columns never wrap."""
    Console = require("rich.console", "benchmarks").Console

    Console(width=max(Console().width, 170)).print(table)


def _print_growth(result: dict) -> None:
    Table = require("rich.table", "benchmarks").Table

    methods = list(result["exponents"])
    inputs = result.get("inputs", "random normal")
    table = Table(title=f"Full-sequence forward, one layer, causal fp32 (s), {inputs} q/k/v, and recall@k")
    for col in ("n", *methods, *(f"recall {m}" for m in methods if m.startswith("faiss"))):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        times = [f"{r['times'][m]:.3f}" for m in methods]
        table.add_row(str(r["n"]), *times, *("-" if v is None else f"{v:.3f}" for v in r["recall"].values()))
    table.add_row("exponent", *("-" if s is None else f"{s:.2f}" for s in result["exponents"].values()))
    _print_wide(table)


def _print_decode(result: dict) -> None:
    Table = require("rich.table", "benchmarks").Table

    table = Table(title=f"Per-token decode, embedded SmolLM2, k={result['k']}, {result['options']}")
    for col in ("cache", "dense (s)", "KNNCache (s)", "ratio", "index memory", "index build (s)"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            str(r["cache"]),
            f"{r['dense_s']:.4f}",
            f"{r['knn_s']:.4f}",
            f"{r['ratio']:.2f}×",
            f"{r['index_bytes'] / 2**20:.1f} MiB",
            f"{r['knn_warmup_s']:.1f}",
        )
    _print_wide(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="knn-patch faiss-bench", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("growth", "decode", "recall"))
    p.add_argument(
        "--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536], help="growth lengths"
    )
    p.add_argument("--cache", type=int, nargs="+", default=[8192, 32768], help="decode cache lengths")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=list(GROWTH_METHODS), choices=GROWTH_METHODS)
    p.add_argument("--index", default="ivf", help="decode: faiss index type")
    p.add_argument("--tokens", type=int, default=4096, help="recall: tokens of real text")
    p.add_argument(
        "--inputs", choices=("random", "real"), default="random", help="growth: random or SmolLM2's q/k/v"
    )
    p.add_argument("--layer", type=int, default=3, help="growth --inputs real: the layer captured")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 10], help="recall: the layers measured")
    p.add_argument("--sink-tokens", type=int, default=0, help="recall: first keys kept as sinks")
    p.add_argument("--nlist", type=int, default=None, help="growth, recall: IVF lists (default √n)")
    p.add_argument(
        "--nprobe",
        type=int,
        nargs="+",
        default=None,
        help="growth, recall: IVF lists probed at most (default 128); growth times faiss-ivf at each value",
    )
    p.add_argument(
        "--scan-fraction",
        type=float,
        nargs="+",
        default=None,
        help="growth, recall: share of the IVF's keys a query scans at most (default 0.125); growth times "
        "faiss-ivf at each value given",
    )
    p.add_argument(
        "--block-size",
        type=int,
        nargs="+",
        default=None,
        help="growth, recall: queries per causal block (default 768); growth times faiss-ivf at each value "
        "given",
    )
    p.add_argument("--repeats", type=int, default=1, help="growth: timed runs per point (median)")
    p.add_argument("--steps", type=int, default=8, help="decode: timed steps (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--faiss-threads",
        type=int,
        default=None,
        help="OpenMP threads (faiss and torch share the runtime: sets both)",
    )
    p.add_argument("--out", default="outputs/faiss_bench")
    args = p.parse_args(argv)
    if args.faiss_threads is not None:
        faiss_module().omp_set_num_threads(args.faiss_threads)
    ivf = {} if args.nlist is None else {"nlist": args.nlist}
    sweeps = {name: getattr(args, name) or [] for name in SWEEPS}
    for name, values in sweeps.items():
        flag = "--" + name.replace("_", "-")
        if len(values) > 1 and args.what != "growth":
            p.error(f"{flag} takes several values only with growth")
        if len(values) == 1:
            ivf[name] = values[0]
    swept = [name for name, values in sweeps.items() if len(values) > 1]
    if len(swept) > 1:
        p.error("give several values to one of --nprobe, --scan-fraction and --block-size, not to more")
    if args.sink_tokens < 0:
        p.error(f"--sink-tokens must be >= 0, not {args.sink_tokens}")
    several = ["faiss-ivf"]
    for name in swept:
        several = [f"faiss-ivf-{SWEEPS[name][0]}{value}" for value in sweeps[name]]
    methods = [name for m in args.methods for name in (several if m == "faiss-ivf" else [m])]
    validate_index_options({**ivf, "index": args.index})  # bad settings fail before any model loads
    for method in methods:
        if method.startswith("faiss"):
            _index_options(method, ivf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "growth":
        inputs = real_inputs(max(args.n), args.layer) if args.inputs == "real" else None
        result = run_growth(
            args.n,
            k=args.k,
            methods=tuple(methods),
            options=ivf,
            repeats=args.repeats,
            seed=args.seed,
            inputs=inputs,
        )
        result["inputs"] = f"SmolLM2 layer {args.layer}" if inputs is not None else "random normal"
        _print_growth(result)
        _plot_growth(result, out / "growth.png")
    elif args.what == "decode":
        result = run_decode(
            args.cache, k=args.k, options={"index": args.index}, steps=args.steps, seed=args.seed
        )
        _print_decode(result)
    else:
        result = real_recall(
            args.tokens, layers=tuple(args.layers), k=args.k, options=ivf, sink_tokens=args.sink_tokens
        )
        print(result)
    from ..eval.evaluation import environment  # late: worker processes import this module

    result.update(args=vars(args), machine=environment("cpu"))
    path = write_json_atomic(out / f"{args.what}.json", result)
    print(f"wrote {path}")
