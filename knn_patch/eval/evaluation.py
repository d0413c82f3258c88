"""Long-context perplexity, dense against kNN settings, on the same token windows in one run.

Every window is scored by the dense model and by each kNN setting before moving on, so all
settings see exactly the same tokens; per-document NLL sums and token counts are kept, and the
totals are token-weighted over the whole corpus.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .. import __version__
from ..config import KNNConfig, keys_read, layer_keys_read
from ..extras import pyplot, require
from ..io import atomic_write, write_json_atomic
from ..patcher import get_config, patch, unpatch
from .perplexity import window_nll, windows

evaluate = require("evaluate", "evaluation")
evaluate_saving = require("evaluate.saving", "evaluation")
box = require("rich.box", "evaluation")
Console = require("rich.console", "evaluation").Console
Table = require("rich.table", "evaluation").Table

DENSE = "dense"


def _layers_label(layers: Sequence[int] | str) -> str:
    """A layer rule such as "global" as is; layer indices as ranges, "0-3,7", so that a long list
    stays short."""
    if isinstance(layers, str):
        return layers
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _label(config: Mapping[str, Any], with_k: bool = True) -> str:
    """`setting_name` of a config's saved form (`KNNConfig.to_dict`); without k it names a curve."""
    parts = [config["backend"], f"k={config['k']}" if with_k else ""]
    parts += [f"sinks={config['sink_tokens']}" if config.get("sink_tokens") else ""]
    parts += [f"window={config['local_window']}" if config.get("local_window") else ""]
    if config.get("layers") is not None:
        parts.append(f"layers={_layers_label(config['layers'])}")
    if config.get("layer_k"):  # saved keys are strings
        per_layer = sorted(config["layer_k"].items(), key=lambda item: int(item[0]))
        parts.append("layer_k=" + ",".join(f"{layer}:{k}" for layer, k in per_layer))
    parts += [f"{key}={value}" for key, value in sorted((config.get("backend_options") or {}).items())]
    return " ".join(p for p in parts if p)


def setting_name(config: KNNConfig | None) -> str:
    """The setting's name in tables and results: everything that changes what a query attends to
    (backend, k, sinks, window, layers when not all, backend options), so that distinct configs get
    distinct names. Zero sinks or window are left out: "topk k=32 sinks=4 window=64 layers=global"."""
    return DENSE if config is None else _label(config.to_dict())


MODES = ("sliding", "decode")


def _use(model: torch.nn.Module, config: KNNConfig | None) -> None:
    """Put the model in dense (None) or kNN attention with `config`."""
    if config is not None:
        patch(model, config)
    elif get_config(model) is not None:
        unpatch(model)


@torch.no_grad()
def prefill(
    model: torch.nn.Module, window: torch.Tensor, first: int, config: KNNConfig | None, cache: Any = None
) -> tuple[torch.Tensor, Any]:
    """Run the prefix [0, first) of a (1, L) window with `config` (None: dense) into `cache` (None:
    the model's default); returns the logits predicting token `first` and the KV cache. Only that
    position is projected onto the vocabulary: the prefix's full logits would cost first x V floats."""
    _use(model, config)
    out = model(input_ids=window[:, :first], cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.cache


@torch.no_grad()
def decode_nll(
    model: torch.nn.Module,
    window: torch.Tensor,
    first: int,
    config: KNNConfig | None,
    logits: torch.Tensor,
    cache: Any,
) -> tuple[float, int]:
    """NLL of the tokens at positions >= first of a (1, L) window, as generation sees them: each token
    goes through the prefilled `cache` alone (one query against the whole cache) with `config`."""
    _use(model, config)
    # each step's logits are scored at once, not stacked: (L - first) x V floats would grow with L
    nll = torch.nn.functional.cross_entropy(logits.float(), window[0, first])
    for t in range(first, window.shape[1] - 1):
        out = model(input_ids=window[:, t : t + 1], cache=cache, use_cache=True)
        nll += torch.nn.functional.cross_entropy(out.logits[0, -1].float(), window[0, t + 1])
    return float(nll), window.shape[1] - first


def evaluate_perplexity(
    model: torch.nn.Module,
    documents: Sequence[tuple[str, Sequence[int]]],
    configs: Sequence[KNNConfig],
    *,
    max_length: int,
    stride: int,
    mode: str = "sliding",
    dense_prefill: bool = False,
    score_from: int = 1,
    progress: bool = True,
    state: PartialState | None = None,
    on_document: Callable[[dict[str, Any]], None] | None = None,
    resume_from: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """NLL of `documents` ((name, token ids) pairs) for dense and every config, window by window.

    `mode="sliding"` scores each window in one forward pass; `mode="decode"` prefills each window's
    unscored prefix and then scores token by token through the KV cache, as in generation (the
    prefill is kNN too unless `dense_prefill`; a dense prefill is run once per window and shared by
    every setting, its time reported apart). Tokens before `score_from` are context only. The model
    is left as it was found (patched or not). Returns per-document NLL and token counts for every
    setting, and token-weighted totals with the ratio to dense.

    Under several processes (`state`, an Accelerate `PartialState`, e.g. from `torchrun` or
    `accelerate launch`), documents are dealt round-robin to the processes and the per-document
    sums are gathered, so every process returns the totals of a one-process run.

    `on_document(partial_result)` is called after each document with the result so far (of this
    process's documents): a long run can save its progress. `resume_from`, such a partial result
    of the same settings and documents, continues it: its documents are not scored again.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: use one of {MODES}.")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ValueError(f"max_length={max_length} exceeds the model's {positions} positions; lower it.")
    if not documents:
        raise ValueError("No documents to evaluate: check the dataset and --min-tokens.")
    before = get_config(model)
    names = [DENSE] + [setting_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"Settings must differ: {names}")
    seconds = dict.fromkeys(names, 0.0)
    prefill_seconds = 0.0
    settings = dict(
        max_length=max_length, stride=stride, mode=mode, dense_prefill=dense_prefill, score_from=score_from
    )
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    done = _check_resume(resume_from, names, settings, documents)
    per_doc = [done[i] for i in sorted(done)] if rank == 0 else []  # the main process carries them
    if resume_from is not None and rank == 0:
        seconds.update({name: resume_from["totals"][name]["seconds"] for name in names})
    plan = [
        (i, name, list(windows(len(ids), max_length, stride, score_from)), ids)
        for i, (name, ids) in enumerate(documents)
    ]
    if not any(doc_windows for _, _, doc_windows, _ in plan):
        raise ValueError(f"No token to score: every document is at most score_from={score_from} tokens long.")
    plan = [item for item in plan[rank::world] if item[0] not in done]
    device = next(model.parameters()).device
    try:
        total_windows = sum(len(w) for _, _, w, _ in plan)
        with tqdm(total=total_windows, desc="windows", unit="win", disable=not progress or rank != 0) as bar:
            for index, doc_name, doc_windows, ids in plan:
                nll = dict.fromkeys(names, 0.0)
                count = 0
                for begin, end, first in doc_windows:
                    window = torch.as_tensor(ids[begin:end], device=device).unsqueeze(0)
                    shared = None
                    if mode == "decode" and dense_prefill:
                        start = time.perf_counter()
                        shared = prefill(model, window, first - begin, None)
                        prefill_seconds += time.perf_counter() - start
                    for name, config in zip(names, [None, *configs], strict=True):
                        start = time.perf_counter()
                        if mode == "decode":
                            # a shared prefill is copied, not cropped: sliding-window caches cannot be cropped
                            logits, cache = (
                                (shared[0], copy.deepcopy(shared[1]))
                                if shared
                                else prefill(model, window, first - begin, config)
                            )
                            value, n = decode_nll(model, window, first - begin, config, logits, cache)
                        else:
                            _use(model, config)
                            value, n = window_nll(model, window, first - begin)
                        seconds[name] += time.perf_counter() - start
                        nll[name] += value
                    count += n
                    bar.update(1)
                per_doc.append({"index": index, "name": doc_name, "tokens": count, "nll": nll})
                if on_document is not None:
                    on_document(_result(per_doc, seconds, prefill_seconds, configs, settings, model.config))
    finally:
        _use(model, before)
    if world > 1:
        per_doc = sorted(gather_object(per_doc), key=lambda d: d["index"])
        seconds = {name: sum(s[name] for s in gather_object([seconds])) for name in names}
        prefill_seconds = sum(gather_object([prefill_seconds]))
    return _result(per_doc, seconds, prefill_seconds, configs, settings, model.config)


def _check_resume(
    partial: dict[str, Any] | None,
    names: list[str],
    settings: dict[str, Any],
    documents: Sequence[tuple[str, Sequence[int]]],
) -> dict[int, dict[str, Any]]:
    """The finished documents of `partial` by index, after checking it is this same evaluation."""
    if partial is None:
        return {}
    ours = {"settings": names, **settings}
    theirs = {"settings": [s["name"] for s in partial["settings"]], **{k: partial.get(k) for k in settings}}
    changed = [f"{key}: saved {theirs[key]}, now {ours[key]}" for key in ours if theirs[key] != ours[key]]
    if changed:
        raise ValueError(
            f"Cannot resume, the saved run differs ({'; '.join(changed)}); use the same arguments."
        )
    done = {d["index"]: d for d in partial["documents"]}
    for index, doc in done.items():
        if index >= len(documents) or documents[index][0] != doc["name"]:
            raise ValueError(
                f"Cannot resume: document {index} was {doc['name']!r}; use the same data arguments."
            )
    return done


def _result(
    per_doc: list[dict[str, Any]],
    seconds: dict[str, float],
    prefill_seconds: float,
    configs: Sequence[KNNConfig],
    settings: dict[str, Any],
    model_config: Any,
) -> dict[str, Any]:
    """The result dict of `evaluate_perplexity` over the documents in `per_doc`."""
    tokens = sum(d["tokens"] for d in per_doc)
    totals = {}
    for name in seconds:
        total = sum(d["nll"][name] for d in per_doc)
        totals[name] = {
            "nll": total,
            "tokens": tokens,
            "perplexity": math.exp(total / tokens) if tokens else math.nan,
            "seconds": seconds[name],
        }
    for name in seconds:
        totals[name]["ratio_to_dense"] = totals[name]["perplexity"] / totals[DENSE]["perplexity"]
    n = settings["max_length"]
    return {
        "settings": [
            {
                "name": setting_name(c),
                "config": None if c is None else c.to_dict(),
                **({} if c is None else {"k_at_max_length": c.resolve_k(n)}),
                # everything a query reads, averaged over layers: the attention budget
                "keys_read_at_max_length": keys_read(c, n, model_config),
                "keys_percent_at_max_length": 100 * keys_read(c, n, model_config) / n,
            }
            for c in [None, *configs]
        ],
        **settings,
        "shared_prefill_seconds": prefill_seconds,
        "documents": list(per_doc),  # a copy: the caller's list grows
        "totals": totals,
    }


def ensure_writable(out_dir: str | Path) -> Path:
    """Create `out_dir` and check it can be written, so a long run cannot fail at its very end."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OSError(
            f"Output folder {str(out)!r} is not writable ({err.strerror}); pass another --out."
        ) from err
    return out


def git_commit() -> dict[str, Any] | None:
    """{"commit", "dirty"} of the knn_patch checkout that produced a result, or None when knn_patch
    is not run from its own checkout (an installed package, even inside another repository) or git is
    missing. Silent: git's "fatal: not a git repository" is not for the user to see."""
    package = Path(__file__).resolve().parents[1]  # knn_patch/, whose parent is the checkout

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=30)

    try:
        found = git("rev-parse", "--show-toplevel", "HEAD")
        lines = found.stdout.splitlines()
        if found.returncode or len(lines) != 2 or Path(lines[0]) != package.parent:
            return None
        dirty = git("diff", "--quiet", "HEAD", "--").returncode != 0  # tracked files changed
    except (OSError, subprocess.SubprocessError):  # no git executable, or it hung
        return None
    return {"commit": lines[1], "dirty": dirty}


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions, code commit and machine facts recorded with every result, timings' too (threads,
    CPU, load average now); collected silently. `device`, the one a run used ("cpu", "cuda:1"), is
    recorded as given; `cuda` names its GPU, or the default one when there is a GPU and no device."""
    if device is None:
        gpu = "cuda" if torch.cuda.is_available() else None
    else:
        gpu = device if device.startswith("cuda") else None
    return {
        "knn_patch": __version__,
        "git": git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device,
        "cuda": torch.cuda.get_device_name(gpu) if gpu else None,
    }


def _keys(setting: dict[str, Any], n: int) -> float:
    """Keys read at `n`; results saved before keys were recorded get them from the config."""
    keys = setting.get("keys_read_at_max_length")
    if keys is None:
        config, k = setting["config"], setting.get("k_at_max_length")
        keys = n if config is None else layer_keys_read(config, k, n)
    return keys


def _keys_columns(setting: dict[str, Any], n: int) -> tuple[str, str]:
    """Keys read (a mean over layers may be fractional) and their % of `n`."""
    keys = _keys(setting, n)
    return f"{keys:.0f}" if keys >= 10 else f"{keys:.1f}", f"{100 * keys / n:.1f}"


def print_report(result: dict[str, Any], title: str, console: Console | None = None) -> None:
    """The rich table: setting, k, keys read per query at max_length (and their %), perplexity,
    ratio to dense (× dense), tokens, seconds."""
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    # the name carries the backend and every option; a long one (a calibrated layer_k) folds, so
    # the numbers stay on screen
    table.add_column("setting", overflow="fold", max_width=72)
    for col in ("k", "keys", "keys %", "perplexity", "× dense", "tokens", "seconds"):
        table.add_column(col, justify="right", no_wrap=True)
    for setting in result["settings"]:
        total = result["totals"][setting["name"]]
        k = setting.get("k_at_max_length")
        table.add_row(
            setting["name"],
            "all" if k is None else str(k),
            *_keys_columns(setting, result["max_length"]),
            f"{total['perplexity']:.3f}",
            f"{total['ratio_to_dense']:.3f}x",
            str(total["tokens"]),
            f"{total['seconds']:.1f}",
        )
    # wide enough for long setting names: a narrow terminal would crop them
    (console or Console(width=max(Console().width, 160))).print(table)


@contextlib.contextmanager
def _evaluate_commit(commit: str | None) -> Iterator[None]:
    """Make `evaluate.save` record `commit` instead of asking git itself: it asks about the working
    directory, so outside a checkout git prints "fatal: not a git repository" on our stderr, and
    without git it raises (huggingface/evaluate#808)."""
    missing = object()
    saved = getattr(evaluate_saving, "_git_commit_hash", missing)
    evaluate_saving._git_commit_hash = lambda: commit
    try:
        yield
    finally:
        if saved is missing:
            del evaluate_saving._git_commit_hash
        else:
            evaluate_saving._git_commit_hash = saved


# Candidate ratio ticks of the log y axis: fine near 1, where the settings worth reading lie.
_RATIO_TICKS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 1, 1.01, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 2, 3, 5, 10, 20)


def _spread(ticks: Sequence[float], anchor: float, span: float, share: float = 0.06) -> list[float]:
    """`ticks` and `anchor`, less those closer than `share` of the axis' log10 `span` to a kept tick,
    kept outward from `anchor`: labels of nearby ticks on a log axis overlap."""
    kept = [anchor]
    above, below = sorted(t for t in ticks if t > anchor), sorted(t for t in ticks if t < anchor)[::-1]
    for side in (above, below):
        last = anchor
        for t in side:
            if abs(math.log10(t / last)) >= share * span:
                kept.append(t)
                last = t
    return sorted(kept)


def _number(x: float) -> str:
    """A tick label: keys read are whole numbers unless averaged over layers."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _plot_ratios(result: dict[str, Any], path: Path) -> None:
    """Ratio to dense against the keys a query reads, one curve per setting apart from k, both axes
    logarithmic: x ticks at the points' keys, plainly numbered; y ticks at round ratios, so that a
    9x point does not flatten the region near 1 where the useful settings lie."""
    plt = pyplot("eval")
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    n, totals = result["max_length"], result["totals"]
    curves: dict[str, list[tuple[float, float]]] = {}
    for s in result["settings"]:
        if s["config"]:
            curves.setdefault(_label(s["config"], with_k=False), []).append(
                (_keys(s, n), totals[s["name"]]["ratio_to_dense"])
            )
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in sorted(curves.items()):
        points.sort()
        ax.plot([k for k, _ in points], [r for _, r in points], "o-", label=label)
    ax.axhline(1.0, color="gray", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.set_yscale("log")
    keys = sorted({k for points in curves.values() for k, _ in points})
    ratios = [r for points in curves.values() for _, r in points] + [1.0]
    if keys:
        xs = _spread(keys, keys[0], math.log10(keys[-1] / keys[0]), share=0.04)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_major_formatter(FixedFormatter([_number(x) for x in xs]))
    # the y axis runs from a round ratio to a round ratio, so that its end points are labelled
    lo = max((t for t in _RATIO_TICKS if t <= min(ratios)), default=min(ratios))
    hi = min((t for t in _RATIO_TICKS if t >= max(ratios)), default=max(ratios))
    pad = (hi / lo) ** 0.05 if hi > lo else 1.01  # 5% of the axis each side
    ax.set_ylim(lo / pad, hi * pad)
    ys = _spread([t for t in _RATIO_TICKS if lo <= t <= hi], 1.0, math.log10(hi / lo), share=0.05)
    ax.yaxis.set_major_locator(FixedLocator(ys))
    ax.yaxis.set_major_formatter(FixedFormatter([f"{y:g}" for y in ys]))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
    ax.set_xlabel(f"keys read per query (sinks + window + k; max_length {n})")
    ax.set_ylabel("perplexity / dense")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: str | Path, name: str = "perplexity") -> dict[str, Path]:
    """`<name>.json` and `<name>.png` (ratio to dense against the keys a query reads, log-log, one
    line per setting apart from k: `_plot_ratios`), atomically, and a timestamped `evaluate.save`
    record of the totals under `evaluate/`, one per run, whose commit is knn_patch's (`git_commit`)."""
    out = Path(out_dir)
    paths = {"json": write_json_atomic(out / f"{name}.json", result), "png": out / f"{name}.png"}
    totals = result["totals"]
    git = git_commit()
    with _evaluate_commit(git and git["commit"]):
        paths["evaluate"] = Path(
            evaluate.save(
                out / "evaluate",
                perplexity={setting: t["perplexity"] for setting, t in totals.items()},
                ratio_to_dense={setting: t["ratio_to_dense"] for setting, t in totals.items()},
                tokens=totals[DENSE]["tokens"],
                documents=len(result["documents"]),
                settings=result["settings"],
                **{
                    key: result[key]
                    for key in ("mode", "max_length", "stride", "dense_prefill", "score_from")
                },
            )
        )
    _plot_ratios(result, paths["png"])
    return paths
