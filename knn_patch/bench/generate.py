"""Whole-model generation speed and memory: a prefill of N prompt tokens, then D greedy decode steps.

    knn-patch bench generate --tokens 32768 --decode-steps 128

Settings, all on the same prompt (the first N tokens of the first document of `--dataset` that long;
when none is, as no bundled speech reaches 64k tokens, of its documents joined in order):
`dense` (the model's own attention and transformers' `DynamicCache`), `faiss` (the faiss backend
with a `knn_patch.KNNCache`, whose index the decode steps search) and `topk` (exact top-k with a
`DynamicCache`: each decode step scores its query against the whole cache). The kNN settings share
k, sinks, local window and layers.

Each setting runs in a fresh process, spawned rather than forked, so that its memory peak is its
own and not an earlier setting's (a process keeps the memory it freed). There, once the model is
loaded and a short untimed warm-up has run (lazy initialisation, the compiled selection, faiss),
the RSS high-water mark is reset (Linux `/proc/self/clear_refs`); after the last decode step,
`peak_rss_bytes` is the high-water mark (model weights included) and `added_bytes` the part above
the RSS before prefill: KV cache, index and activations. On CUDA, torch's allocator peak is
recorded as well. The prefill projects only its last position onto the vocabulary, as `generate`
does: full logits would cost N x V floats (6.4 GB at 32k tokens for SmolLM2). Timings on a shared
machine are noisy; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import KNNCache
from ..config import KNNConfig
from ..eval.evaluation import setting_name
from ..extras import pyplot, require
from ..io import atomic_write, write_json_atomic
from .peak_memory import reset_peak_rss, status_bytes

SETTINGS = ("dense", "faiss", "topk")
DENSE = "dense"
WARMUP_TOKENS = 64  # the untimed warm-up's prompt: long enough for every code path, short enough to be free


def knn_config(
    setting: str,
    *,
    k: int | str = 32,
    sink_tokens: int = 4,
    local_window: int = 64,
    layers: Sequence[int] | str | None = None,
    backend_options: dict[str, Any] | None = None,
) -> KNNConfig | None:
    """The kNN config of a setting (None for dense). `backend_options` are the faiss index's; the
    topk backend takes none."""
    if setting not in SETTINGS:
        raise ValueError(f"Unknown setting {setting!r}; use some of {', '.join(SETTINGS)}.")
    if setting == DENSE:
        return None
    options = (backend_options or {}) if setting == "faiss" else {}
    return KNNConfig(
        k=k,
        backend=setting,
        sink_tokens=sink_tokens,
        local_window=local_window,
        layers=layers,
        backend_options=options,
    )


def prompt_ids(
    tokenizer,
    n: int,
    *,
    dataset: str = "bundled",
    config: str | None = None,
    split: str = "test",
    column: str = "text",
) -> tuple[str, list[int]]:
    """The first `n` tokens of `dataset`'s first document that long, or, when none is, of its documents
    joined in order (`data.tokenize_documents`); returns the document's name (listing any joined parts
    and their token spans) and its token ids."""
    from ..eval.data import load_documents, tokenize_documents

    docs = load_documents(dataset, config=config, split=split, column=column)
    long, _ = tokenize_documents(docs, tokenizer, min_tokens=n, max_tokens=n)
    if len(long) == 0:  # natural text where there is some, joined text only where needed
        long, _ = tokenize_documents(docs, tokenizer, min_tokens=n, max_tokens=n, join_to=n)
    if len(long) == 0:
        raise ValueError(f"{dataset!r} holds fewer than {n} tokens, even joined; lower --tokens.")
    return long[0]["name"], long[0]["input_ids"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: torch.nn.Module, prompt: torch.Tensor, steps: int, cache: Any, *, progress: bool = False
) -> dict[str, Any]:
    """Greedy generation timed by phase: one prefill forward over `prompt` (1, N), whose last logits
    give the first new token, then `steps` one-token forwards through `cache`. Returns
    {"prefill_s", "decode_s", "tokens"} (the steps + 1 new token ids)."""
    device = prompt.device
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    _sync(device)
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    # position 1: below the settings bar, which may belong to a parent process
    for _ in tqdm(range(steps), desc="decode", unit="tok", disable=not progress, leave=False, position=1):
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(token)
    _sync(device)
    decode = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_s": decode, "tokens": torch.cat(tokens, 1)[0].tolist()}


def _reset_peak(device: torch.device) -> bool:
    """Reset the RSS high-water mark (and CUDA's peak) to now; False where the kernel refuses."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return reset_peak_rss()


def measure(
    model_name: str,
    ids: Sequence[int],
    setting: str,
    config: KNNConfig | None,
    *,
    decode_steps: int = 128,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Load the model, run one untimed warm-up, then the timed generation of `setting` (with
    `config`, None for dense) on prompt `ids`; returns timings, generated tokens and memory."""
    from ..loading import load_model
    from ..patcher import patch

    dev = torch.device(device)
    model = load_model(model_name, dtype=torch.float32).to(dev).eval()
    if config is not None:
        patch(model, config)
    prompt = torch.tensor([list(ids)], device=dev)  # (1, N)

    def cache() -> Any:
        return KNNCache() if setting == "faiss" else DynamicCache()

    generate(model, prompt[:, :WARMUP_TOKENS], 2, cache())
    gc.collect()
    reset = _reset_peak(dev)
    before = status_bytes("VmRSS")
    result = generate(model, prompt, decode_steps, cache(), progress=progress)
    peak = status_bytes("VmHWM")
    result.update(
        decode_tokens_per_s=decode_steps / result["decode_s"] if result["decode_s"] else None,
        peak_rss_bytes=peak,
        # without a reset the mark may come from loading, before the generation began
        added_bytes=peak - before if reset and peak is not None and before is not None else None,
        cuda_peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        threads=torch.get_num_threads(),
        model_positions=getattr(model.config, "max_position_embeddings", None),
    )
    return result


def _child(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """`measure` in a fresh process, whose loading bars would only clutter the parent's output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    return measure(*args, **kwargs)


def _ratios(row: dict[str, Any], dense: dict[str, Any] | None) -> dict[str, float | None]:
    """A setting's measurements over dense's: below 1 is faster or smaller."""
    keys = ("prefill_s", "decode_s", "peak_rss_bytes", "added_bytes")
    if dense is None:
        return dict.fromkeys(keys)
    return {
        key: row[key] / dense[key] if row.get(key) is not None and dense.get(key) else None for key in keys
    }


def _agreement(tokens: list[int], dense: list[int]) -> int:
    """How many of the first generated tokens equal dense's: greedy outputs part at the first difference."""
    same = 0
    for a, b in zip(tokens, dense, strict=False):
        if a != b:
            break
        same += 1
    return same


def run_generation_benchmark(
    model_name: str,
    ids: Sequence[int],
    configs: dict[str, KNNConfig | None],
    *,
    decode_steps: int = 128,
    device: str = "cpu",
    isolate: bool = True,
    progress: bool = True,
    done: dict[str, dict[str, Any]] | None = None,
    on_setting: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Generation of every setting in `configs` ({name: config, None for dense}) on the same prompt
    `ids`: {"settings": {name: {"config", "prefill_s", "decode_s", "decode_tokens_per_s",
    "peak_rss_bytes", "added_bytes", "cuda_peak_bytes", "tokens", "ratio_to_dense", "agree_with_dense"}},
    "prompt_tokens", "decode_steps"}.

    `isolate` runs each setting in a fresh spawned process (honest memory peaks; costs an import of
    torch per setting); without it, memory freed by an earlier setting hides part of a later one's
    peak. `done` holds settings measured earlier (a resumed run): they are not run again.
    `on_setting(partial_result)` is called after each setting, so a long run can save its progress.
    """
    if decode_steps < 1:
        raise ValueError(f"decode_steps must be >= 1, got {decode_steps}.")
    if len(ids) < 1:
        raise ValueError("The prompt is empty: give at least one token.")
    if not configs:
        raise ValueError(f"No settings to run: name some of {', '.join(SETTINGS)}.")
    rows = dict(done or {})
    context = mp.get_context("spawn")  # a fork would share the parent's pages and peak
    with tqdm(total=len(configs), desc="settings", unit="setting", disable=not progress) as bar:
        for name, config in configs.items():
            bar.set_postfix_str(name)
            if name not in rows:
                args = (model_name, ids, name, config)
                kwargs = dict(decode_steps=decode_steps, device=device, progress=progress)
                if isolate:
                    with ProcessPoolExecutor(1, mp_context=context) as pool:
                        row = pool.submit(_child, *args, **kwargs).result()
                else:
                    row = measure(*args, **kwargs)
                rows[name] = {
                    "name": setting_name(config),
                    "config": None if config is None else config.to_dict(),
                    **row,
                }
                if on_setting is not None:
                    on_setting(_result(rows, ids, decode_steps))
            bar.update(1)
    return _result(rows, ids, decode_steps)


def _result(rows: dict[str, dict[str, Any]], ids: Sequence[int], decode_steps: int) -> dict[str, Any]:
    dense = rows.get(DENSE)
    for row in rows.values():
        row["ratio_to_dense"] = _ratios(row, dense)
        row["agree_with_dense"] = None if dense is None else _agreement(row["tokens"], dense["tokens"])
    return {"prompt_tokens": len(ids), "decode_steps": decode_steps, "settings": dict(rows)}


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(result: dict[str, Any], title: str | None = None) -> None:
    """One row per setting: seconds per phase, decode tokens/s, memory, ratios to dense (below 1 is
    better) and how many generated tokens equal dense's."""
    Console = require("rich.console", "benchmarks").Console
    Table = require("rich.table", "benchmarks").Table

    n, steps = result["prompt_tokens"], result["decode_steps"]
    table = Table(title=title or f"Generation: prefill {n} tokens, then {steps} decode steps")
    columns = ("setting", "prefill s", "decode s", "tok/s", "peak RSS", "added")
    columns += ("× prefill", "× decode", "× peak", "× added", "= dense")
    for col in columns:
        table.add_column(col, justify="left" if col == "setting" else "right", no_wrap=True)
    for row in result["settings"].values():
        ratio = row["ratio_to_dense"]
        agree = row["agree_with_dense"]
        table.add_row(
            row["name"],
            f"{row['prefill_s']:.2f}",
            f"{row['decode_s']:.2f}",
            "-" if row["decode_tokens_per_s"] is None else f"{row['decode_tokens_per_s']:.1f}",
            _size(row["peak_rss_bytes"]),
            _size(row["added_bytes"]),
            *(_times(ratio[key]) for key in ("prefill_s", "decode_s", "peak_rss_bytes", "added_bytes")),
            "-" if agree is None else f"{agree}/{len(row['tokens'])}",
        )
    Console(width=max(Console().width, 150)).print(table)  # wide: never wrap the columns


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds per phase (prefill, decode) per setting, as grouped bars."""
    plt = pyplot("benchmarks")

    names = list(result["settings"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, (key, label) in zip(axes, (("prefill_s", "prefill"), ("decode_s", "decode")), strict=True):
        ax.bar(names, [result["settings"][n][key] for n in names], color=["gray", "C0", "C1"][: len(names)])
        ax.set(title=label, ylabel="seconds")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"prefill {result['prompt_tokens']} tokens, {result['decode_steps']} decode steps")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def write_results(result: dict[str, Any], out_dir: str | Path, name: str = "generate") -> dict[str, Path]:
    """`<name>.json` (with machine facts) and `<name>.png` in `out_dir`, both atomically."""
    out = Path(out_dir)
    payload = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result,
    }
    if "machine" not in payload:  # `main` records it once, with the run's device
        from ..eval.evaluation import environment  # late: worker processes import this module

        payload["machine"] = environment(result.get("args", {}).get("device", "cpu"))
    paths = {"json": write_json_atomic(out / f"{name}.json", payload), "png": out / f"{name}.png"}
    plot(result, paths["png"])
    return paths


# Arguments that define what is measured: a resumed run must match them.
_SAME_FOR_RESUME = (
    "model", "tokens", "decode_steps", "k", "sink_tokens", "local_window", "backend_options", "layers",
    "dataset", "dataset_config", "split", "column", "device",
)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ..cli import _json_object, _layers
    from ..eval.evaluation import ensure_writable, environment
    from ..loading import load_tokenizer

    p = argparse.ArgumentParser(prog="knn-patch bench generate", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2), 'gemma3-270m', a local folder, a .gguf file or a hub id",
    )
    p.add_argument("--tokens", type=int, default=8192, help="prompt tokens prefilled")
    p.add_argument("--decode-steps", type=int, default=128, help="greedy one-token steps after the prefill")
    p.add_argument("--methods", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--k", default="32", help="keys per query of the kNN settings: an int or a rule of n")
    p.add_argument("--sink-tokens", type=int, default=4, help="first keys always kept (kNN settings)")
    p.add_argument("--local-window", type=int, default=64, help="last keys always kept (kNN settings)")
    p.add_argument(
        "--layers", type=_layers, default="all", help="kNN layers: 'all', comma-separated indices, or a rule"
    )
    p.add_argument(
        "--backend-options",
        type=_json_object,
        default={},
        help='the faiss index\'s options as a JSON object, e.g. \'{"index": "hnsw"}\'',
    )
    p.add_argument(
        "--dataset", default="bundled", help="prompt text: 'bundled', a .txt/.jsonl/.parquet file, a hub name"
    )
    p.add_argument("--dataset-config", default=None, help="hub dataset config")
    p.add_argument("--split", default="test")
    p.add_argument("--column", default="text", help="text column of a .jsonl, .parquet or hub dataset")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every setting in this process: starts faster, but memory freed by one setting hides "
        "part of the next one's peak",
    )
    p.add_argument(
        "--resume", action="store_true", help="skip the settings already in OUT/generate.partial.json"
    )
    p.add_argument(
        "--out", default="outputs/bench_generate", help="folder for generate.json and generate.png"
    )
    args = p.parse_args(argv)

    # bad input fails here, before any model loads or text is tokenized
    if args.tokens < 2 or args.decode_steps < 1:
        p.error(f"--tokens must be >= 2 and --decode-steps >= 1, got {args.tokens} and {args.decode_steps}")
    names = [s.strip() for s in args.methods.split(",") if s.strip()]
    options = dict(
        k=args.k.strip(),
        sink_tokens=args.sink_tokens,
        local_window=args.local_window,
        layers=None if args.layers == "all" else args.layers,
        backend_options=args.backend_options,
    )
    configs = {name: knn_config(name, **options) for name in names}
    out = ensure_writable(args.out)
    partial = out / "generate.partial.json"
    done = None
    if args.resume:
        if not partial.exists():
            raise FileNotFoundError(f"--resume: there is no {partial} to continue; run without --resume.")
        saved = json.loads(partial.read_text())
        changed = [
            key
            for key in _SAME_FOR_RESUME
            if saved["args"].get(key) != json.loads(json.dumps(vars(args)[key]))
        ]
        if changed:
            raise ValueError(
                f"Cannot resume: {', '.join(changed)} differ from the saved run; use the same arguments."
            )
        done = {name: row for name, row in saved["settings"].items() if name in configs}

    tokenizer = load_tokenizer(args.model)
    prompt_name, ids = prompt_ids(
        tokenizer,
        args.tokens,
        dataset=args.dataset,
        config=args.dataset_config,
        split=args.split,
        column=args.column,
    )
    extra = {"prompt": prompt_name, "args": vars(args), "machine": environment(args.device)}
    result = run_generation_benchmark(
        args.model,
        ids,
        configs,
        decode_steps=args.decode_steps,
        device=args.device,
        isolate=not args.in_process,
        done=done,
        on_setting=lambda so_far: write_json_atomic(partial, {**so_far, **extra, "complete": False}),
    )
    result.update(extra)
    positions = {row.get("model_positions") for row in result["settings"].values()} - {None}
    if positions and args.tokens + args.decode_steps > min(positions):
        print(
            f"note: positions past the model's {min(positions)} extrapolate: the speed holds, the generated "
            "text means nothing"
        )
    model_name = "embedded SmolLM2-135M-Instruct" if args.model == "default" else args.model
    print_table(result, f"{model_name}: prefill {len(ids)} tokens, then {args.decode_steps} decode steps")
    paths = write_results(result, out)
    partial.unlink(missing_ok=True)
    print(f"wrote {paths['json']} and {paths['png']}")
    return result
