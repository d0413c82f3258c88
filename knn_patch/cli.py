"""`knn-patch` command line: `demo` (dense against kNN perplexity), `bench` (kernel speed), `prepare`."""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from . import __version__
from .assets import bundled_corpus_dir
from .config import KNNConfig
from .io import write_json_atomic
from .kernels.select import extension_available
from .loading import load_default
from .patcher import patched
from .perplexity import document_nll, windows


def _long_document(tokenizer, n_tokens: int) -> tuple[str, torch.Tensor]:
    """The first bundled speech (by file name) with at least `n_tokens` tokens, cut to that length."""
    for path in sorted(bundled_corpus_dir().glob("*.txt")):
        ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        if len(ids) >= n_tokens:
            return path.name, ids[:n_tokens]
    raise ValueError(f"No bundled document has {n_tokens} tokens; lower --tokens.")


def demo(args: argparse.Namespace) -> dict:
    """Perplexity of the embedded model on one long bundled document, dense against kNN at several k."""
    console = Console()
    model, tokenizer = load_default()
    name, ids = _long_document(tokenizer, args.tokens)
    configs = [None] + [KNNConfig(k=k.strip(), chunk_size=args.chunk_size) for k in args.k.split(",")]
    n_windows = len(list(windows(len(ids), args.max_length, args.stride)))
    console.print(f"{name}: {len(ids)} tokens, windows of {args.max_length} moved by {args.stride}")
    rows = []
    with tqdm(total=n_windows * len(configs), desc="windows", unit="win") as bar:
        for config in configs:
            start = time.perf_counter()
            if config is None:
                nll, count = document_nll(model, ids, args.max_length, args.stride, progress=bar)
            else:
                with patched(model, config):
                    nll, count = document_nll(model, ids, args.max_length, args.stride, progress=bar)
            rows.append(
                {
                    "setting": "dense" if config is None else f"knn k={config.k}",
                    "k": None if config is None else config.resolve_k(args.max_length),
                    "nll": nll,
                    "tokens": count,
                    "perplexity": math.exp(nll / count),
                    "seconds": time.perf_counter() - start,
                }
            )
    dense = rows[0]["perplexity"]
    table = Table(title=f"SmolLM2-135M-Instruct on {name} ({len(ids)} tokens, max_length {args.max_length})")
    for col in ("setting", "k", "keys % of window", "perplexity", "ratio to dense", "tokens", "seconds"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in rows:
        keys = "100" if r["k"] is None else f"{100 * min(r['k'], args.max_length) / args.max_length:.1f}"
        table.add_row(
            r["setting"],
            "all" if r["k"] is None else str(r["k"]),
            keys,
            f"{r['perplexity']:.3f}",
            f"{r['perplexity'] / dense:.3f}x",
            str(r["tokens"]),
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    result = {
        "document": name,
        "args": vars(args),
        "rows": rows,
        "environment": {
            "knn_patch": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    path = write_json_atomic(Path(args.out) / "demo.json", result)
    console.print(f"wrote {path}")
    return result


def prepare(_: argparse.Namespace) -> None:
    """Fetch and convert the embedded model and corpus, and build the compiled selection, once."""
    load_default()
    compiled = "built" if extension_available() else "NOT built (torch.topk fallback)"
    print(f"model ready; corpus at {bundled_corpus_dir()}; compiled top-k selection {compiled}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are its own: `knn-patch bench --help`
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="knn-patch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help=demo.__doc__)
    p.add_argument("--k", default="16,32,64,128,sqrt", help="comma-separated k values or rules of n")
    p.add_argument("--tokens", type=int, default=8192, help="document length used")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--stride", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--out", default="outputs/demo")
    p.set_defaults(func=demo)
    p = sub.add_parser("prepare", help=prepare.__doc__)
    p.set_defaults(func=prepare)
    sub.add_parser("bench", help="attention kernel speed and memory against SDPA and eager")
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
