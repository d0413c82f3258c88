"""Peak memory of one sliding-window evaluation (`window_nll`), full logits against chunked, by length.

    python evals/memory.py --model default --tokens 1024 4096 --method full chunked
    python evals/memory.py --model gemma3-270m --tokens 32768 --method chunked   # target: <= 8 GB

Each (tokens, method) runs in a fresh Python process (this script with --worker). That process loads
the model, scores a 16-token warm-up window, resets the kernel's RSS high-water mark
(`/proc/self/clear_refs` <- 5, Linux), scores one window of `tokens` random token ids (memory does not
depend on the text) and reports VmHWM. So `peak_bytes` is the whole process (weights included) during
the evaluation, and `added_bytes` is that peak minus the RSS before it; the load's own peak (a GGUF
dequantisation can be large) is reported apart. On CUDA, `torch.cuda.max_memory_allocated` is reported
as well. Writes <out>/memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

METHODS = ("full", "chunked")


def worker(
    model_name: str, tokens: int, method: str, k: str | None, dtype: str, device: str, seed: int
) -> dict:
    """One evaluation in this process; returns its measurements."""
    import torch

    import knn_patch
    from knn_patch.bench.peak_memory import reset_peak_rss, status_bytes
    from knn_patch.eval.perplexity import window_nll

    model = knn_patch.load_model(model_name, dtype=getattr(torch, dtype)).to(device).eval()
    if k is not None:
        knn_patch.patch(model, k=int(k) if k.isdigit() else k)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    load_peak = status_bytes("VmHWM")
    # a short warm-up pages in memory-mapped weights and initialises kernels, so they do not count as
    # the evaluation's; then VmHWM <- current RSS: the load's peak is not counted either
    window_nll(model, ids[:, :16], 1, method=method)
    reset_peak_rss()
    before = status_bytes("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    nll, count = window_nll(model, ids, 1, method=method)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    return {
        "tokens": tokens,
        "method": method,
        "vocab": vocab,
        "nll": nll,
        "scored": count,
        "seconds": seconds,
        "peak_bytes": peak,
        "added_bytes": peak - before,
        "rss_before_bytes": before,
        "load_peak_bytes": load_peak,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
    }


def measure(args: argparse.Namespace, tokens: int, method: str) -> dict:
    """Run `worker` in a fresh interpreter: nothing an earlier measurement allocated counts."""
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--tokens", str(tokens)]
    cmd += ["--method", method, "--dtype", args.dtype, "--device", args.device, "--seed", str(args.seed)]
    cmd += ["--k", args.k] if args.k is not None else []
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:  # e.g. killed for memory: the row says so rather than ending the run
        return {"tokens": tokens, "method": method, "error": f"exit {run.returncode}: {run.stderr[-2000:]}"}
    return json.loads(run.stdout.splitlines()[-1])


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("tokens", "method", "peak GB", "added GB", "load peak GB", "seconds", "NLL / token"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(
                str(r["tokens"]), r["method"], "failed", "", "", "", r["error"].splitlines()[0][:40]
            )
            continue
        gb = [f"{r[key] / 1e9:.2f}" for key in ("peak_bytes", "added_bytes", "load_peak_bytes")]
        table.add_row(
            str(r["tokens"]), r["method"], *gb, f"{r['seconds']:.1f}", f"{r['nll'] / r['scored']:.4f}"
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="a name for knn_patch.load_model, a folder or a hub id")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="window lengths")
    p.add_argument(
        "--method", nargs="+", choices=METHODS, default=list(METHODS), help="how logits are scored"
    )
    p.add_argument("--k", default=None, help="patch with this kNN k (e.g. 64, sqrt); default dense")
    p.add_argument("--dtype", default="float32", help="weights' dtype, e.g. float32, bfloat16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--seed", type=int, default=0, help="of the random token ids")
    p.add_argument("--out", default="outputs/memory", help="directory for memory.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(
            json.dumps(
                worker(args.model, args.tokens[0], args.method[0], args.k, args.dtype, args.device, args.seed)
            )
        )
        return

    from knn_patch.eval.evaluation import environment
    from knn_patch.io import write_json_atomic

    rows = [measure(args, tokens, method) for tokens in args.tokens for method in args.method]
    settings = {key: getattr(args, key) for key in ("model", "k", "dtype", "device", "seed")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **settings,
        "rows": rows,
        "environment": environment(),
    }
    path = write_json_atomic(out / "memory.json", payload)
    print_table(rows, f"window_nll peak memory: {args.model}, {'dense' if args.k is None else f'k={args.k}'}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
