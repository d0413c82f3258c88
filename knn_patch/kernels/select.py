"""Row-wise exact top-k selection: compiled, or torch.topk. The same extension also draws the `tail`
estimator's uniform sample (`sampling.tail_sample` uses it) and searches a faiss IVF index for many
queries at once (`ivf_topk`, used by `index.KeyIndex`). Its sources: select.cpp (the selection, the
tail sample and the module) and ivf.cpp (the IVF search).

The compiled path is built once with `torch.utils.cpp_extension` (about a minute, cached under
`$TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`, in a folder named by the hash of
the sources and, on x86-64 Linux, of the CPU's features); if no compiler is available, a warning is
logged once and selection falls back to torch.topk, which gives the same keys except among tied
scores.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

from ..io import atomic_write

logger = logging.getLogger("knn_patch")


def _native_cpu() -> str:
    """This CPU's feature flags on x86-64 Linux, where the extension is built for this CPU
    (`-march=native`, so that the code outside the hand-written AVX-512 and AMX parts is
    vectorised past SSE2), else "". They name the build, so that machines sharing a home
    directory never load a build made for another CPU."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


SOURCES = ("select.cpp", "ivf.cpp")  # one extension; select.cpp defines its module


def _build(sources: dict[str, bytes], native: str):
    """The module compiled from `sources` (file name -> content), for this CPU when `native` holds
    its flags."""
    from torch.utils.cpp_extension import load

    # Build from copies in a folder named by their content: checkouts of the same sources (several
    # venvs or worktrees) share one build instead of rebuilding each other's, and an edit builds anew.
    digest = hashlib.sha256(
        b"".join(name.encode() + b"\0" + text for name, text in sources.items()) + native.encode()
    ).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build = root / f"knn_patch_select_{digest}"
    build.mkdir(parents=True, exist_ok=True)
    copies = []
    for name, text in sources.items():
        copy = build / name
        if not copy.exists() or copy.read_bytes() != text:
            atomic_write(copy, lambda tmp, text=text: Path(tmp).write_bytes(text))
        copies.append(str(copy))
    return load(
        name=f"knn_patch_select_{digest}",
        sources=copies,
        build_directory=str(build),
        extra_cflags=["-O3", "-fopenmp"] + (["-march=native"] if native else []),
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.cache
def extension():
    """The compiled module (built on first call), or None when it is disabled or cannot be built.
    A build for this CPU that fails (a compiler that does not know it) is retried generic."""
    if os.environ.get("KNN_PATCH_NO_EXTENSION"):
        return None
    sources = {name: Path(__file__).with_name(name).read_bytes() for name in SOURCES}
    native = _native_cpu()
    for flags in dict.fromkeys([native, ""]):  # native first, when there is one
        try:
            return _build(sources, flags)
        except Exception as err:  # no compiler, no ninja: fall back, but say so
            logger.warning(
                "knn_patch: could not build the selection extension%s (%s); %s.",
                " for this CPU" if flags else "",
                err,
                "trying a generic build" if flags else "using torch.topk and torch sampling",
            )
    return None


def extension_available() -> bool:
    """Whether the compiled selection is in use (builds it on first call)."""
    return extension() is not None


def draw_seed(generator: torch.Generator | None) -> int:
    """One int64 seed from `generator` for the compiled sampler's per-row streams, so a seeded call
    reproduces and successive calls draw differently."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator))


def topk_rows(
    scores: torch.Tensor, k: int, row_end: torch.Tensor | None = None, sorted: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, indices) of each row of `scores` (R, L), sorted descending unless `sorted`
    is False (then in any order: the compiled pass skips the sort).

    Row r only considers columns [0, row_end[r]) when `row_end` is given. Masked (-inf) scores are
    never chosen before visible ones; slots beyond a row's visible count hold -inf.
    """
    ext = extension() if scores.device.type == "cpu" and scores.dtype == torch.float32 else None
    if ext is not None:
        ends = torch.empty(0, dtype=torch.int64) if row_end is None else row_end.to(torch.int64).contiguous()
        return ext.topk_rows(scores.contiguous(), k, ends, sorted)
    if row_end is not None:
        cols = torch.arange(scores.shape[-1], device=scores.device)
        scores = scores.masked_fill(cols >= row_end.unsqueeze(-1), -torch.inf)
    return scores.topk(k, dim=-1, sorted=sorted)


def fused_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `scores_topk` runs compiled for scores of this device and dtype (CPU float32, with
    the extension built); the `topk` kernel materialises score blocks otherwise."""
    return device.type == "cpu" and dtype == torch.float32 and extension() is not None


def scores_topk(
    query: torch.Tensor,
    key: torch.Tensor,
    k: int,
    row_end: torch.Tensor | None = None,
    tail: int = 0,
    generator: torch.Generator | None = None,
    seeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of each row of query @ key^T: query (P, R, D), key (P, L, D) -> values and indices
    (P*R, k + tail), in no particular order (the compiled path skips the final sort), and log-weights.

    With `tail` m > 0 (compiled path only, see `fused_available`) each row also gets
    `sampling.tail_sample`'s m keys (drawn from `generator`) in its last m slots (score -inf and
    index 0 where unused), with their log-weights (P*R, m) float64. The compiled path scores
    blocks of 64 rows into a per-thread buffer and selects and samples them while they are in
    cache, never writing the (R, L) scores out (faster than a matmul followed by `topk_rows`), and
    the samples cost no gather.
    With `seeds` (values, ids), each (P*R, s), row r's seeds compete with its scores (value -inf:
    an empty slot) and come back with their ids, while key j comes back as j + `offset`: the top-k
    of a row's own candidates and these keys in one selection (no tail). Compiled, a row with k
    seeds reads its scores in one pass for those at or above its k-th seed, the only ones that
    can rank.
    """
    if key.dtype == query.dtype and fused_available(query.device, query.dtype):
        ends = torch.empty(0, dtype=torch.int64) if row_end is None else row_end.to(torch.int64).contiguous()
        seed = draw_seed(generator) if tail else 0
        sv, si = (torch.empty(0), torch.empty(0, dtype=torch.int64)) if seeds is None else seeds
        return extension().scores_topk(
            query.detach().contiguous(),
            key.detach(),
            k,
            ends,
            tail,
            seed,
            sv.float().contiguous(),
            si.to(torch.int64).contiguous(),
            offset,
        )
    if tail:
        raise RuntimeError("scores_topk draws tail samples only compiled; check fused_available first.")
    scores = torch.matmul(query, key.transpose(-1, -2)).reshape(-1, key.shape[-2])  # (P*R, L)
    if seeds is None:
        values, indices = topk_rows(scores, k, row_end)
    else:  # the seeds as the first columns, then back to their ids
        sv, si = seeds
        ends = None if row_end is None else row_end + sv.shape[-1]
        values, cols = topk_rows(torch.cat([sv.to(scores.dtype), scores], -1), k, ends)
        s = sv.shape[-1]
        indices = cols - s + offset
        if s:
            indices = torch.where(cols < s, si.gather(-1, cols.clamp_max(s - 1)), indices)
    return values, indices, scores.new_zeros(scores.shape[0], 0, dtype=torch.float64)


def amx_available() -> bool:
    """Whether `ivf_topk` scores on AMX tiles here: an x86 CPU with AMX-BF16 (Sapphire Rapids or
    later) under Linux, and the compiled extension."""
    ext = extension()
    return ext is not None and ext.amx_available()


def ivf_topk(
    query: torch.Tensor,
    centroids: torch.Tensor,
    lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    k: int,
    nprobe: int,
    max_codes: int,
    amx: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products (values, faiss ids), each (R, k), of queries (R, D) over an IVF index:
    each query probes the lists of its largest inner products with `centroids` (nlist, D), at most
    `nprobe`, and scans `max_codes` of their keys at most (0: no limit; the list that crosses it
    is scanned over its first keys), as faiss's IVF search does; every list is scored once for all
    the queries probing it. `lists` holds the (nlist,) int64 tables of each list's vector pointer,
    id pointer and size (`KeyIndex`). With `amx` (and `amx_available()`) the lists are scored on
    AMX tiles in bf16x3, within ~1e-5 * |q| |k| of fp32 (see ivf.cpp): the same keys but for
    near-ties, in a fraction of the fp32 GEMMs' time (docs/benchmarks.md, "Searching many queries at once").
    Compiled only: callers check `extension_available()` first and otherwise use faiss's own search."""
    return extension().ivf_topk(query.contiguous(), centroids, *lists, k, nprobe, max_codes, amx)
