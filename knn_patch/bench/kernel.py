"""Speed and memory of one attention layer: top-k kernel vs SDPA vs transformers-style eager, and the
sampled estimators at topk's key budget k: `tail` (k/2 top + k/2 sampled) and `gumbel` (k/2 top,
k/2 samples; skipped above `max_sampled_n`, its cost grows with the tail it must sample).

The layer has SmolLM2-135M's shape (B=1, 9 query heads, 3 KV heads, D=64), causal, fp32, random
normal inputs. Forward time is measured under `torch.no_grad` (the inference cost); forward+backward
is `autograd.grad(out.sum(), (q, k, v))`. Each timing is the median of `repeats` runs after one
warm-up run, at torch's default thread count; other processes on the machine skew them.

Peak memory of forward+backward, above the inputs:
- CUDA: `torch.cuda.max_memory_allocated()` minus the allocation before the call, in-process.
- CPU (Linux): torch keeps no CPU allocator statistics, so we read the kernel's RSS high-water mark
  in a fresh process per (method, n), forked from a `forkserver` that has only imported this module
  (no torch op has run there, so forking is safe and costs milliseconds, not a re-import). The child
  resets the mark (`/proc/self/clear_refs` <- 5) once its inputs exist, runs forward+backward and
  reports VmHWM - VmRSS. `getrusage(...).ru_maxrss` is not used: a child inherits its parent's
  high-water mark through fork/exec, so it would report the largest earlier measurement.
The output and the q/k/v gradients count in the peak for every method; eager's additive causal mask
(n*n fp32, shared by all layers of a model) is built with the inputs, so it counts in neither time
nor peak.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from knn_patch.bench.peak_memory import reset_peak_rss, status_bytes
from knn_patch.extras import pyplot, require
from knn_patch.io import atomic_write, write_json_atomic
from knn_patch.kernels.gumbel import gumbel_attention
from knn_patch.kernels.tail import tail_attention
from knn_patch.kernels.topk import topk_attention

METHODS = ("topk", "sdpa", "eager", "tail", "gumbel")
RATIOS = ("topk/sdpa", "topk/eager", "tail/topk", "gumbel/topk")
METRICS = ("fwd_s", "fwd_bwd_s", "peak_bytes")
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def _topk(q, k, v, mask, *, kk: int, chunk_size: int) -> torch.Tensor:
    return topk_attention(q, k, v, k=kk, chunk_size=chunk_size)[0]


def _tail(q, k, v, mask, *, kk: int, chunk_size: int) -> torch.Tensor:
    gen = torch.Generator(device=q.device).manual_seed(0)
    return tail_attention(
        q, k, v, k=max(1, kk // 2), m=kk - max(1, kk // 2), chunk_size=chunk_size, generator=gen
    )


def _gumbel(q, k, v, mask, *, kk: int, chunk_size: int) -> torch.Tensor:
    gen = torch.Generator(device=q.device).manual_seed(0)
    half = max(1, kk // 2)
    return gumbel_attention(q, k, v, k=half, samples=max(2, kk - half), chunk_size=chunk_size, generator=gen)


def _sdpa(q, k, v, mask) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _eager(q, k, v, mask) -> torch.Tensor:
    """transformers' eager_attention_forward: repeat_kv, matmul, additive mask, fp32 softmax, matmul."""
    b, hkv, n, d = k.shape
    rep = q.shape[1] // hkv
    k = k[:, :, None].expand(b, hkv, rep, n, d).reshape(b, hkv * rep, n, d)
    v = v[:, :, None].expand(b, hkv, rep, n, d).reshape(b, hkv * rep, n, d)
    w = torch.matmul(q, k.transpose(2, 3)) * d**-0.5 + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).transpose(1, 2).contiguous()


def _method(name: str, cfg: dict) -> Callable[..., torch.Tensor]:
    if name in ("topk", "tail", "gumbel"):
        fn = {"topk": _topk, "tail": _tail, "gumbel": _gumbel}[name]
        return partial(fn, kk=cfg["k"], chunk_size=cfg["chunk_size"])
    return {"sdpa": _sdpa, "eager": _eager}[name]


def _inputs(name: str, n: int, cfg: dict, device: str) -> Inputs:
    """Random normal q (1, Hq, n, D), k and v (1, Hkv, n, D), and eager's additive mask."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    q, k, v = (
        torch.randn(1, h, n, cfg["head_dim"], generator=gen).to(device).requires_grad_()
        for h in (cfg["heads"], cfg["kv_heads"], cfg["kv_heads"])
    )
    mask = None
    if name == "eager":  # built once per model forward in transformers, not per layer
        mask = torch.full((n, n), torch.finfo(torch.float32).min, device=device).triu(1)[None, None]
    return q, k, v, mask


def eager_bytes(n: int, heads: int) -> int:
    """Eager's estimated peak: scores, probabilities and their gradient (Hq*n*n fp32 each), plus the mask."""
    return (3 * heads + 1) * n * n * 4


def _fwd(fn: Callable, x: Inputs) -> None:
    with torch.no_grad():
        fn(*x)


def _fwd_bwd(fn: Callable, x: Inputs) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(fn(*x).sum(), x[:3])


def _timed(step: Callable[[], object], device: str, repeats: int) -> float:
    """Median wall time of `repeats` runs after one warm-up run."""
    sync = partial(torch.cuda.synchronize, device) if device.startswith("cuda") else lambda: None
    times = []
    for _ in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _cpu_peak_child(name: str, n: int, cfg: dict) -> int:
    """Runs in a fresh process: RSS high-water mark of one forward+backward above its inputs, in bytes."""
    fn = _method(name, cfg)
    _fwd_bwd(fn, _inputs(name, 128, cfg, "cpu"))  # one-time lazy init, not counted
    x = _inputs(name, n, cfg, "cpu")
    reset_peak_rss()
    base = status_bytes("VmRSS")
    _fwd_bwd(fn, x)
    return status_bytes("VmHWM") - base


def _peak(name: str, n: int, cfg: dict, device: str) -> int:
    if device.startswith("cuda"):
        fn, x = _method(name, cfg), _inputs(name, n, cfg, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _fwd_bwd(fn, x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    ctx = mp.get_context("forkserver")  # children fork from a clean server: cheap, fresh, fork-safe
    ctx.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_cpu_peak_child, name, n, cfg).result()


def _measure(name: str, n: int, cfg: dict, device: str, repeats: int, memory: bool) -> dict:
    fn, x = _method(name, cfg), _inputs(name, n, cfg, device)
    res: dict = {
        "fwd_s": _timed(partial(_fwd, fn, x), device, repeats),
        "fwd_bwd_s": _timed(partial(_fwd_bwd, fn, x), device, repeats),
        "peak_bytes": None,
    }
    del x
    if memory:
        try:
            res["peak_bytes"] = _peak(name, n, cfg, device)
        except Exception as e:  # e.g. the child was OOM-killed: keep the timings
            res["error"] = f"{type(e).__name__}: {e}"
    return res


def run_speed_benchmark(
    ns: list[int],
    k: int = 32,
    chunk_size: int = 512,
    repeats: int = 3,
    device: str = "cpu",
    *,
    heads: int = 9,
    kv_heads: int = 3,
    head_dim: int = 64,
    max_eager_gb: float = 8.0,
    max_sampled_n: int = 4096,
    seed: int = 0,
    memory: bool = True,
    progress: bool = True,
) -> list[dict]:
    """One row per n: {"n", "methods": {name: {fwd_s, fwd_bwd_s, peak_bytes} | {"skipped": why}},
    "ratios": {"a/b" for a/b in RATIOS: {metric: a/b} | None}}."""
    Progress = require("rich.progress", "benchmarks").Progress

    cfg = {
        "k": k,
        "chunk_size": chunk_size,
        "seed": seed,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
    }
    rows = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("benchmark", total=len(ns) * len(METHODS))
        for n in ns:
            row: dict = {"n": n, "methods": {}, "ratios": {}}
            for name in METHODS:
                bar.update(task, description=f"n={n} {name}")
                est = eager_bytes(n, heads)
                if name == "eager" and est > max_eager_gb * 1e9:
                    row["methods"][name] = {"skipped": f"est. {est / 1e9:.1f} GB > {max_eager_gb:g} GB"}
                elif name == "gumbel" and n > max_sampled_n:
                    row["methods"][name] = {"skipped": f"n > max_sampled_n={max_sampled_n}"}
                else:
                    row["methods"][name] = _measure(name, n, cfg, device, repeats, memory)
                bar.advance(task)
            for key in RATIOS:
                a, b = (row["methods"][x] for x in key.split("/"))
                ratio = {m: a[m] / b[m] if a.get(m) is not None and b.get(m) else None for m in METRICS}
                row["ratios"][key] = None if "skipped" in a or "skipped" in b else ratio
            rows.append(row)
    return rows


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric == "peak_bytes":
        return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.1f} MiB"
    return f"{v:.2f} s" if v >= 1 else f"{v * 1e3:.1f} ms"


def print_table(rows: list[dict], title: str = "Attention layer, B=1 Hq=9 Hkv=3 D=64, causal fp32") -> None:
    """Three lines per n (forward, forward+backward, peak memory); ratios below 1 favour top-k."""
    Console = require("rich.console", "benchmarks").Console
    Table = require("rich.table", "benchmarks").Table

    table = Table(title=title)
    for col in ("n", "metric", *METHODS, *RATIOS):
        table.add_column(col, justify="left" if col == "metric" else "right")
    labels = {"fwd_s": "fwd", "fwd_bwd_s": "fwd+bwd", "peak_bytes": "peak mem"}
    for row in rows:
        for i, metric in enumerate(METRICS):
            cells = [str(row["n"]) if i == 0 else "", labels[metric]]
            for name in METHODS:
                r = row["methods"][name]
                cells.append("skipped" if "skipped" in r else _fmt(metric, r.get(metric)))
            for key in RATIOS:
                r = row["ratios"][key]
                v = None if r is None else r[metric]
                cells.append("skipped" if r is None else "-" if v is None else f"{v:.2f}×")
            table.add_row(*cells, end_section=metric == METRICS[-1])
    Console(width=max(Console().width, 170)).print(table)  # wide: never wrap the columns


def plot_forward(rows: list[dict], path: Path) -> None:
    """Log-log time vs n per method: forward solid, forward+backward dashed."""
    plt = pyplot("benchmarks")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in METHODS:
        pts = [(r["n"], r["methods"][name]) for r in rows if "skipped" not in r["methods"][name]]
        if pts:
            line = ax.loglog([n for n, _ in pts], [m["fwd_s"] for _, m in pts], "o-", label=f"{name} fwd")[0]
            ax.loglog(
                [n for n, _ in pts],
                [m["fwd_bwd_s"] for _, m in pts],
                "s--",
                color=line.get_color(),
                alpha=0.6,
                label=f"{name} fwd+bwd",
            )
    ns = [r["n"] for r in rows]
    ax.set_xticks(ns, [str(n) for n in ns], minor=False)
    ax.minorticks_off()
    ax.set(xlabel="sequence length n", ylabel="time (s)", title="One attention layer (Hq=9, Hkv=3, D=64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def write_results(rows: list[dict], out_dir: str | Path, args: dict, name: str = "speed") -> dict[str, Path]:
    """`<name>.json` (machine info, arguments, rows) and `<name>.png` in `out_dir`, both atomically."""
    from ..eval.evaluation import environment  # late: the forkserver preloads this module, kept light

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": environment(args.get("device", "cpu")),
        "args": args,
        "rows": rows,
    }
    paths = {"json": out / f"{name}.json", "png": out / f"{name}.png"}
    write_json_atomic(paths["json"], payload)
    plot_forward(rows, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="knn-patch bench",
        description=__doc__.splitlines()[0],
        epilog="Whole-model generation (prefill, decode): knn-patch bench generate --help",
    )
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="lengths")
    p.add_argument("--k", type=int, default=32, help="keys kept per query by the top-k kernel")
    p.add_argument("--chunk-size", type=int, default=512, help="query chunk of the top-k kernel")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median), after one warm-up")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--max-eager-gb", type=float, default=8.0, help="skip eager above this estimated memory")
    p.add_argument("--max-sampled-n", type=int, default=4096, help="skip gumbel above this length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--out", default="outputs/bench", help="directory for speed.json and speed.png")
    args = p.parse_args(argv)

    rows = run_speed_benchmark(
        args.n,
        k=args.k,
        chunk_size=args.chunk_size,
        repeats=args.repeats,
        device=args.device,
        max_eager_gb=args.max_eager_gb,
        max_sampled_n=args.max_sampled_n,
        seed=args.seed,
        memory=not args.no_memory,
    )
    print_table(rows)
    paths = write_results(rows, args.out, vars(args))
    print(f"wrote {paths['json']} and {paths['png']}")
