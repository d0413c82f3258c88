"""faiss key indexes for kNN attention: one index per (batch row, KV head), grown as keys arrive.

Shared by the `faiss` backend (keys added block by block during a full-sequence forward) and by
`KNNCache` (keys added as the KV cache grows). faiss cannot delete entries, so an index only ever
grows; callers that shrink their keys (`crop`) rebuild it.

Index types (`index` option):
- "flat": exact inner product (`IndexFlatIP`); retrieval equals exact top-k.
- "ivf": `IndexIVFFlat` (inner product), `nlist` lists. A query probes its lists in decreasing
  centroid inner product, at most `nprobe`, and stops once they hold `scan_fraction` of the keys
  (faiss's `max_codes`, set before each search as the index grows, and at least
  `SCAN_PER_RESULT` keys per result; GPU indexes probe `nprobe` lists). A key budget, not a list
  count, because real keys give lists of very unequal sizes: a fixed list count scans far more keys
  for some heads than for others. It is trained on the first `39 * nlist` keys (faiss's minimum of
  39 training points per list); until that many keys exist, an exact flat index serves the
  searches. `nlist` defaults to ceil(sqrt(n)) for n keys and is capped at max(1, n // 39); an
  explicit `nlist` above the cap is lowered, with a warning.
  Two departures from faiss's IVF, both for how real keys lie (docs/benchmarks.md, "IVF lists,
  unlike faiss's"):
  * keys join the list of their nearest centroid in L2 (L2 k-means centroids), while queries still
    probe the lists of their largest centroid inner products. faiss's inner-product assignment sent
    keys to the largest-norm centroids, leaving a few huge lists that most queries probed.
  * RoPE turns keys with position, so centroids trained on the first keys fit later keys badly: the
    IVF is retrained on keys spread evenly over all those so far, and its keys reassigned, whenever
    they have grown `retrain_growth` times (None: never) since the last training.
- "hnsw": `IndexHNSWFlat` over the L2 reduction of inner-product search (each key gets an extra
  coordinate sqrt(R^2 - |k|^2), each query a 0, so the nearest in L2 are the largest in inner
  product): HNSW graphs are built for distances, and one on raw inner products searches poorly.
  R is 1.25x the largest key norm when the index is created (the whole call's keys, or the cache's
  keys at its first kNN step); a later key above R gets the coordinate 0 (it is then
  over-retrieved, never lost). `hnsw_m` links per node, `ef_search` search breadth (raised to the
  number of results when larger), `ef_construction` build breadth.

Searches on CPU with many queries (a full-sequence block) run in the compiled extension instead
of faiss's search, with the same results: a flat index is scored like the `topk` backend's keys,
and an IVF index's lists are each scored once for all the queries probing them (`ivf_topk`, on
AMX tiles in bf16x3 where the CPU has them: the same keys but for near-ties); faiss still holds
the lists and serves the other searches. See `KeyIndex._compiled_search`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .select import extension_available, ivf_topk, scores_topk

logger = logging.getLogger("knn_patch")

INDEX_TYPES = ("flat", "ivf", "hnsw")
TRAIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per IVF list
KMEANS_ITERATIONS = 10  # a first training; a retraining starts from the last centroids and runs half as many
KMEANS_SEED = 1234
NORM_MARGIN = 1.25  # HNSW's L2 reduction radius over the largest key norm seen at creation
# IVF searches whose lists get at least this many queries each, on average, score every list once
# for all of them (`KeyIndex._compiled_search`); with fewer (decode steps) the GEMMs would be a row
# or two, and faiss's own search serves.
GROUPED_MIN_QUERIES = 8
# An IVF query scans at least this many keys per result it returns, whatever `scan_fraction`: at
# short lengths a share of the keys is too few to hold the best k (docs/benchmarks.md, "IVF probing
# by a key budget").
SCAN_PER_RESULT = 64

# Default options: scan_fraction/ef_search chosen for recall@k >= 0.9 on SmolLM2 activations (see
# tests and docs/benchmarks.md).
DEFAULTS: dict[str, Any] = {
    "index": "ivf",
    "nlist": None,  # None: ceil(sqrt(n)), n the keys of the call (or of the prompt, for KNNCache)
    "nprobe": 128,  # IVF lists a query probes at most
    "hnsw_m": 32,
    "ef_search": 64,
    "ef_construction": 40,
    # queries per causal block, scored exactly against their own block: larger blocks score the
    # newest keys exactly (where most misses are) and make fewer searches and adds, up to a point
    # (docs/benchmarks.md compares 512 and 768)
    "block_size": 768,
    "sync_every": 64,  # keys join an index in batches; the newest (< sync_every) are scored exactly
    "retrain_growth": 1.25,  # an IVF retrains when its keys have grown this many times; None: never
    "scan_fraction": 0.125,  # an IVF query scans at most this share of the keys; None: all nprobe lists
}


class FaissMissingError(ImportError):
    """faiss is not installed."""


def _openblas_core() -> str | None:
    """The OpenBLAS kernel set this x86-64 Linux CPU supports, for `OPENBLAS_CORETYPE`; None elsewhere.

    faiss-cpu's wheels bundle OpenBLAS 0.3.15, which does not know CPUs released since (e.g.
    Sapphire and Emerald Rapids) and falls back to its generic SSE3 "Prescott" kernels, several
    times slower for faiss's k-means and L2 assignment (docs/benchmarks.md, faiss backend)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= set(flags):
        return "SkylakeX"
    if {"avx2", "fma"} <= set(flags):
        return "Haswell"
    return None


_INSTALL_HINT = (
    "`pip install faiss-cpu`; on CUDA, `pip uninstall -y faiss-cpu && pip install faiss-gpu` "
    "(one faiss distribution only: both provide the `faiss` module)"
)


def require_faiss() -> None:
    """Raise `FaissMissingError` naming the fix when faiss is not installed, without importing it:
    validating a config must not change process state (see `faiss_module`)."""
    if sys.modules.get("faiss") is None and importlib.util.find_spec("faiss") is None:
        raise FaissMissingError(f"The faiss backend and KNNCache need faiss: {_INSTALL_HINT}.")


@functools.cache
def faiss_module():
    """Import faiss on first use (the first index built), with an error that names the fix.

    Before the import, and only then, `OPENBLAS_CORETYPE` is set for the rest of the process to this
    CPU's kernels unless it is set already (see `_openblas_core`): faiss-cpu's OpenBLAS reads it once,
    when it loads.
    """
    require_faiss()
    providers = importlib.metadata.packages_distributions().get("faiss", [])
    if len(set(providers)) > 1:
        logger.warning(
            "knn_patch: %s all provide the `faiss` module and the last installed wins; keep one: %s.",
            sorted(set(providers)),
            _INSTALL_HINT,
        )
    if "faiss" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ:
        core = _openblas_core()
        if core is not None:
            os.environ["OPENBLAS_CORETYPE"] = core
    import faiss

    return faiss


def _positive_int(options: Mapping[str, Any], name: str, *, allow_none: bool = False) -> None:
    value = options.get(name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        none = " or None" if allow_none else ""
        raise ValueError(f"KNNConfig.backend_options[{name!r}]={value!r} is invalid: use an int >= 1{none}.")


def validate_index_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options merged over `DEFAULTS`; ValueError naming the option for unknown keys or bad values."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"Unknown faiss backend_options {unknown}; allowed: {sorted(DEFAULTS)} (defaults {DEFAULTS})."
        )
    merged = {**DEFAULTS, **options}
    if merged["index"] not in INDEX_TYPES:
        raise ValueError(
            f"KNNConfig.backend_options['index']={merged['index']!r} is unknown; use one of {INDEX_TYPES}."
        )
    for name in ("nprobe", "hnsw_m", "ef_search", "ef_construction", "block_size", "sync_every"):
        _positive_int(merged, name)
    _positive_int(merged, "nlist", allow_none=True)
    fraction = merged["scan_fraction"]
    if fraction is not None and (type(fraction) not in (int, float) or not 0 < fraction <= 1):
        raise ValueError(
            f"KNNConfig.backend_options['scan_fraction']={fraction!r} is invalid: use a number in (0, 1], or "
            "None to scan every one of the nprobe lists."
        )
    growth = merged["retrain_growth"]
    if growth is not None and (type(growth) not in (int, float) or not growth > 1):
        raise ValueError(
            f"KNNConfig.backend_options['retrain_growth']={growth!r} is invalid: use a number > 1, or None "
            "to train an IVF once."
        )
    return merged


def resolve_nlist(nlist: int | None, n: int) -> int:
    """IVF list count for n keys: ceil(sqrt(n)) by default, capped at max(1, n // 39) so that every
    list gets faiss's minimum of 39 training keys; an explicit value above the cap warns."""
    cap = max(1, n // TRAIN_POINTS_PER_LIST)
    if nlist is None:
        return min(max(1, math.ceil(math.sqrt(n))), cap)
    if nlist > cap:
        logger.warning(
            "knn_patch: nlist=%d is too large for %d keys (faiss needs %d training keys per list); "
            "using nlist=%d (= max(1, n // %d)).",
            nlist,
            n,
            TRAIN_POINTS_PER_LIST,
            cap,
            TRAIN_POINTS_PER_LIST,
        )
        return cap
    return nlist


@functools.cache
def _gpu_resources():
    faiss = faiss_module()
    return faiss.StandardGpuResources() if hasattr(faiss, "StandardGpuResources") else None


@functools.cache
def _warn_cpu_fallback(kind: str) -> None:
    logger.warning(
        "knn_patch: faiss-gpu %s; the %s faiss index runs on CPU and keys are copied there and back. "
        "For CUDA indexes: %s.",
        "does not serve HNSW" if kind == "hnsw" else "is not installed",
        kind,
        _INSTALL_HINT,
    )


def _flat_vectors(index) -> torch.Tensor:
    """The vectors (ntotal, d) of a CPU faiss IndexFlat, without a copy: valid until its next add."""
    n, d = index.ntotal, index.d
    return torch.from_numpy(faiss_module().rev_swig_ptr(index.get_xb(), n * d)).view(n, d)


class KeyIndex:
    """The keys of one (batch row, KV head): positions in the sequence map to faiss ids.

    `add` takes keys in sequence order and a validity mask (padding is never indexed); `search`
    returns sequence positions (-1 where fewer results exist).
    """

    def __init__(
        self, dim: int, *, options: Mapping[str, Any], n_hint: int, norm_hint: float, device: torch.device
    ) -> None:
        self.faiss = faiss_module()
        self.radius = NORM_MARGIN * norm_hint
        self.dim, self.kind = dim, options["index"]
        self.options = dict(options)
        self.nlist = resolve_nlist(options["nlist"], n_hint) if self.kind == "ivf" else 0
        self.gpu = _gpu_resources() if device.type == "cuda" and self.kind != "hnsw" else None
        if device.type == "cuda" and self.gpu is None:
            _warn_cpu_fallback(self.kind)
        self.device_id = (device.index or 0) if device.type == "cuda" else -1
        self.seen = 0  # sequence positions consumed by `add` (valid or not)
        self.positions = np.zeros(0, dtype=np.int64)  # faiss id -> sequence position
        self.trained = self.kind != "ivf"
        # the key count at which the IVF (re)trains next
        self.train_at = TRAIN_POINTS_PER_LIST * self.nlist if self.kind == "ivf" else math.inf
        self.index = self._new(self.kind if self.trained else "flat")
        self._lists: tuple[torch.Tensor, ...] | None = None  # the lists' pointer tables, until the next add

    def _new(self, kind: str, centroids: np.ndarray | None = None):
        faiss = self.faiss
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim + 1, self.options["hnsw_m"])  # L2 on (k, sqrt(R^2 - |k|^2))
            index.hnsw.efConstruction = self.options["ef_construction"]
        else:  # probed by inner product with the given centroids (trained: the quantizer holds nlist)
            self._quantizer = faiss.IndexFlatIP(self.dim)  # the IVF index does not own it: keep it alive
            self._quantizer.add(centroids)
            index = faiss.IndexIVFFlat(self._quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.nprobe = min(self.options["nprobe"], self.nlist)  # an attribute: CPU and GPU IVF alike
        if self.gpu is not None:
            index = faiss.index_cpu_to_gpu(self.gpu, self.device_id, index)
        return index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append keys (L, D) at positions seen..seen+L-1; `valid` (L,) bool leaves padding out."""
        pos = np.arange(self.seen, self.seen + keys.shape[0], dtype=np.int64)
        x = keys.detach().to(device="cpu", dtype=torch.float32)
        if valid is not None:
            keep = valid.detach().cpu().numpy()
            pos, x = pos[keep], x[torch.from_numpy(keep)]
        self.seen += keys.shape[0]
        if len(pos) == 0:
            return
        self._add_vectors(self._lift(x, keys=True))
        self.positions = np.concatenate([self.positions, pos])
        if self.ntotal >= self.train_at:
            self._train_ivf()

    def _add_vectors(self, xb: np.ndarray) -> None:
        """Append vectors (L, d) to the index; a CPU IVF puts each in the list of its nearest centroid
        in L2 (see the module docstring); a GPU IVF leaves that to faiss (inner product)."""
        self._lists = None  # an add may move a list's storage
        if self.kind != "ivf" or not self.trained or self.gpu is not None:
            self.index.add(xb)
            return
        _, lists = self.faiss.knn(xb, self._centroids(), 1)  # nearest centroid in L2, (L, 1)
        self.index.add_core(len(xb), self.faiss.swig_ptr(xb), None, self.faiss.swig_ptr(lists))

    def _centroids(self) -> np.ndarray:
        """The IVF's centroids (nlist, d), a view of its quantizer's vectors."""
        return _flat_vectors(self._quantizer).numpy()

    def _lift(self, x: torch.Tensor, *, keys: bool) -> np.ndarray:
        """(R, D) fp32 CPU -> the array faiss gets: HNSW adds the L2-reduction coordinate."""
        if self.kind == "hnsw":
            extra = (self.radius**2 - x.square().sum(-1)).clamp_min(0).sqrt() if keys else x.new_zeros(len(x))
            x = torch.cat([x, extra.unsqueeze(-1)], -1)  # (R, D + 1)
        return np.ascontiguousarray(x.numpy())

    def _train_ivf(self) -> None:
        """Replace the index by an IVF whose L2 k-means centroids are trained on `39 * nlist` keys
        spread evenly over those so far (starting from the last centroids, when retraining), and
        that holds them all."""
        xb = self._stored_vectors()
        sample = xb[np.linspace(0, len(xb) - 1, TRAIN_POINTS_PER_LIST * self.nlist).round().astype(np.int64)]
        niter = KMEANS_ITERATIONS // 2 if self.trained else KMEANS_ITERATIONS
        kmeans = self.faiss.Kmeans(self.dim, self.nlist, niter=niter, seed=KMEANS_SEED)
        kmeans.train(sample, init_centroids=self._centroids() if self.trained else None)
        self.index = self._new("ivf", kmeans.centroids)
        self.trained = True
        self._add_vectors(xb)
        growth = self.options["retrain_growth"]
        self.train_at = math.inf if growth is None else math.ceil(growth * len(xb))

    def _stored_vectors(self) -> np.ndarray:
        """Every vector the index holds (ntotal, d), in id order (a copy); an IVF gets faiss's
        id -> list map for it (the index is replaced right after, in `_train_ivf`)."""
        index = self.index if self.gpu is None else self.faiss.index_gpu_to_cpu(self.index)
        if self.trained:
            index.make_direct_map()
        return index.reconstruct_n(0, index.ntotal)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (R, min(k, ntotal)) of the largest inner products with queries (R, D), -1 pads,
        and those fp32 inner products (-inf at pads): None for hnsw, whose L2-reduced distances would
        lose precision, and when every key is returned unsearched (k >= ntotal)."""
        n = self.ntotal
        r = queries.shape[0]
        if k >= n:  # every indexed key is wanted: no search
            return torch.from_numpy(self.positions).expand(r, n), None
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.options["ef_search"], k)
        fraction = self.options["scan_fraction"]
        if self.kind == "ivf" and self.trained and self.gpu is None and fraction is not None:
            # the IVF grows: a share of its keys now, and never under SCAN_PER_RESULT keys per result
            self.index.max_codes = max(math.ceil(fraction * n), SCAN_PER_RESULT * k)
        x = queries.detach().to(device="cpu", dtype=torch.float32)
        compiled = self._compiled_search(x, k)
        if compiled is not None:
            dist, ids = (t.numpy() for t in compiled)
        else:
            dist, ids = self.index.search(self._lift(x, keys=False), k)
        found = ids >= 0
        pos = np.where(found, self.positions[np.maximum(ids, 0)], -1)
        scores = None if self.kind == "hnsw" else torch.from_numpy(np.where(found, dist, -np.inf))
        return torch.from_numpy(pos), scores

    def _compiled_search(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Scores and faiss ids (R, k) of queries x (R, D) by the compiled selection kernels, the
        same results as `index.search` up to float rounding; None where faiss's search serves:
        hnsw, GPU indexes, IVF lists that would get under `GROUPED_MIN_QUERIES` queries each, and
        IVF without the compiled extension.

        A flat index's vectors are scored like the `topk` backend's keys (`scores_topk`, which selects
        while the scores are in cache, faster than faiss's flat search). An IVF index picks each
        query's lists the same way from its centroids, then scores each list once for all the
        queries probing it (`ivf_topk`); faiss's IVF search scans every query's lists on their own."""
        if self.gpu is not None or self.kind == "hnsw":
            return None
        if self.kind == "flat" or not self.trained:
            vals, ids, _ = scores_topk(x[None], _flat_vectors(self.index)[None], k)
            return vals, torch.where(vals > -math.inf, ids, -1)
        nprobe, max_codes = self.index.nprobe, self.index.max_codes
        # lists a query probes: nprobe, or fewer under a scan budget (lists of ntotal / nlist keys on average)
        probed = nprobe if not max_codes else min(nprobe, math.ceil(max_codes * self.nlist / self.ntotal))
        if x.shape[0] * probed < GROUPED_MIN_QUERIES * self.nlist or not extension_available():
            return None
        if self._lists is None:
            inv, lists = self.index.invlists, range(self.nlist)
            self._lists = tuple(
                torch.tensor(v, dtype=torch.int64)
                for v in (
                    [int(inv.get_codes(i)) for i in lists],  # (size, D) float32, as IndexIVFFlat stores them
                    [int(inv.get_ids(i)) for i in lists],
                    [inv.list_size(i) for i in lists],
                )
            )
        return ivf_topk(x, _flat_vectors(self._quantizer), self._lists, k, nprobe, max_codes)

    def clone(self) -> KeyIndex:
        """An independent copy (beam search may keep one row twice)."""
        other = object.__new__(KeyIndex)
        other.__dict__.update(self.__dict__)
        other._lists = None  # they point into this index's lists
        other.positions = self.positions.copy()
        if self.gpu is None:
            other.index = self.faiss.clone_index(self.index)
        else:  # faiss clones CPU indexes only
            cpu = self.faiss.clone_index(self.faiss.index_gpu_to_cpu(self.index))
            other.index = self.faiss.index_cpu_to_gpu(self.gpu, self.device_id, cpu)
        return other

    def memory_bytes(self) -> int:
        """Bytes held by the index: stored vectors, plus HNSW links or IVF centroids and ids."""
        n = self.ntotal
        extra = self.positions.nbytes
        if self.kind == "hnsw":
            extra += n * (
                4 + 2 * self.options["hnsw_m"] * 4
            )  # the extra coordinate, ~2M int32 links per node
        elif self.trained and self.kind == "ivf":
            extra += self.nlist * self.dim * 4 + n * 8  # centroids, and an int64 id per stored vector
        return n * self.dim * 4 + extra


class KeyIndexes:
    """One `KeyIndex` per (batch row, KV head), kept in step: all have consumed the same positions."""

    def __init__(self, key: torch.Tensor, *, options: Mapping[str, Any], n_hint: int | None = None) -> None:
        """Empty indexes for keys shaped like key (B, Hkv, L, D); key also sets HNSW's norm radius."""
        b, hkv, n, d = key.shape
        norms = key.detach().float().norm(dim=-1).amax(-1).tolist() if n else [[1.0] * hkv] * b  # (B, Hkv)
        self.rows = [
            [
                KeyIndex(d, options=options, n_hint=n_hint or n, norm_hint=norms[i][h], device=key.device)
                for h in range(hkv)
            ]
            for i in range(b)
        ]

    @property
    def seen(self) -> int:
        return self.rows[0][0].seen

    def sync(self, key: torch.Tensor, upto: int, valid: torch.Tensor | None = None, first: int = 0) -> None:
        """Add key (B, Hkv, L, D) positions [seen, upto); `valid` (B|1, L) bool leaves those False out,
        and positions below `first` are left out too."""
        start = self.seen
        if upto < start:
            raise RuntimeError(f"The key index already holds {start} positions, more than the {upto} asked.")
        if upto == start:
            return
        for b, row in enumerate(self.rows):
            ok = None if valid is None else valid[b if valid.shape[0] > 1 else 0, start:upto]
            if first > start:
                above = torch.arange(start, upto) >= first
                ok = above if ok is None else ok & above
            for h, index in enumerate(row):
                index.add(key[b, h, start:upto], ok)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (B, Hkv, R, k') for queries (B, Hkv, R, D): one faiss call per KV head, all of its
        query heads together; k' = min(k, largest ntotal), -1 where an index has fewer results. Also
        their fp32 inner products (-inf at -1) when every index returned them (see `KeyIndex.search`)."""
        found = [
            [index.search(queries[b, h], k) for h, index in enumerate(row)] for b, row in enumerate(self.rows)
        ]
        width = max(p.shape[-1] for row in found for p, _ in row)
        out = torch.full((*queries.shape[:3], width), -1, dtype=torch.long)
        with_scores = all(s is not None for row in found for _, s in row)
        scores = torch.full(out.shape, -math.inf) if with_scores else None
        for b, row in enumerate(found):
            for h, (pos, s) in enumerate(row):
                out[b, h, :, : pos.shape[-1]] = pos
                if scores is not None:
                    scores[b, h, :, : s.shape[-1]] = s
        return out.to(queries.device), None if scores is None else scores.to(queries.device)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Rows follow `beam_idx`; a row chosen twice is cloned so the copies grow independently."""
        used: set[int] = set()
        new_rows = []
        for i in beam_idx.tolist():
            new_rows.append([index.clone() for index in self.rows[i]] if i in used else self.rows[i])
            used.add(i)
        self.rows = new_rows

    def memory_bytes(self) -> int:
        return sum(index.memory_bytes() for row in self.rows for index in row)
