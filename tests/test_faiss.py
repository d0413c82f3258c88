"""The faiss backend: flat equals exact top-k, k >= n equals dense, real-activation recall, bad input."""

import functools
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model

import knn_patch
from knn_patch import KNNConfig
from knn_patch.bench.activations import capture_activations
from knn_patch.kernels import index as index_module
from knn_patch.kernels import retrieval as retrieval_module
from knn_patch.kernels import select as select_module
from knn_patch.kernels.index import resolve_nlist, validate_index_options
from knn_patch.kernels.retrieval import recall_at_k, retrieval_attention
from knn_patch.kernels.topk import topk_attention

pytest.importorskip("faiss")
get_invlist = pytest.importorskip("faiss.contrib.inspect_tools").get_invlist

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NO_AMX = "needs the compiled extension on a CPU with AMX-BF16 (Sapphire Rapids or later)"
SMALL_BLOCKS = {"block_size": 8, "sync_every": 8}  # so that a 40-token sequence really goes through the index


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def left_padded(batch=2, n=40, pad=(0, 7)):
    ids = torch.arange(3, 3 + batch * n).view(batch, n) % 120 + 3
    mask = torch.ones(batch, n, dtype=torch.long)
    for row, p in enumerate(pad):
        mask[row, :p] = 0
    return ids, mask


def forward_and_grads(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * mask.unsqueeze(-1)).square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("extras", [{}, {"sink_tokens": 2, "local_window": 3}])
def test_flat_index_equals_topk_backend_outputs_and_gradients(padded, extras):
    ids, mask = left_padded(pad=(0, 7) if padded else (0, 0))
    model = tiny_model("llama")
    with knn_patch.patched(model, k=3, **extras):
        ref, ref_grads = forward_and_grads(model, ids, mask)
    with knn_patch.patched(
        model, k=3, backend="faiss", backend_options={"index": "flat", **SMALL_BLOCKS}, **extras
    ):
        out, grads = forward_and_grads(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


KERNEL_KW = dict(k=5, sink_tokens=2, local_window=4)


def kernel_inputs(dtype, requires_grad):
    """GQA q, k, v with Lk > Lq (queries are the last 70 of 100 positions), seeded."""
    torch.manual_seed(0)
    b, hq, hkv, lq, lk, d = 2, 6, 2, 70, 100, 16
    q = torch.randn(b, hq, lq, d, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(b, hkv, lk, d, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def test_kernel_flat_equals_topk_in_float64_with_gqa_sinks_window_and_a_cache_offset():
    q, k, v = kernel_inputs(torch.float64, requires_grad=True)
    opts = validate_index_options({"index": "flat", "block_size": 16})
    ref = topk_attention(q, k, v, **KERNEL_KW)[0]
    out = retrieval_attention(q, k, v, options=opts, **KERNEL_KW)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads, ref_grads = torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))
    for g_out, g_ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-11)


def test_kernel_flat_without_grad_scores_retrieved_keys_by_faiss_and_equals_topk(monkeypatch):
    """No gradient in fp32: faiss's inner products score the retrieved keys, only the sinks are gathered."""
    q, k, v = kernel_inputs(torch.float32, requires_grad=False)
    widths = []
    gather = retrieval_module._gather

    def spy(x, pos):
        widths.append(pos.shape[-1])
        return gather(x, pos)

    monkeypatch.setattr(retrieval_module, "_gather", spy)
    opts = validate_index_options({"index": "flat", "block_size": 16})
    out = retrieval_attention(q, k, v, options=opts, **KERNEL_KW)[0]
    assert set(widths) == {KERNEL_KW["sink_tokens"]}
    torch.testing.assert_close(out, topk_attention(q, k, v, **KERNEL_KW)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_plain_blocks_equal_the_general_path(index, monkeypatch):
    """Without mask, forced keys or gradients a block takes the compiled explicit top-k and a
    softmax over 2k candidates (`_plain_block`); asking for the kept positions takes the general
    path, which ranks every candidate: the same outputs (GQA, ivf trained within the call)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 600, 16), torch.randn(1, 2, 600, 16), torch.randn(1, 2, 600, 16)
    opts = validate_index_options({"index": index, "block_size": 64, "nlist": 4, "nprobe": 2})
    blocks = []
    plain = retrieval_module._plain_block
    monkeypatch.setattr(retrieval_module, "_plain_block", lambda *a: blocks.append(1) or plain(*a))
    with torch.no_grad():
        out = retrieval_attention(q, k, v, k=8, options=opts)[0]
        assert len(blocks) == 600 // 64 + 1
        general = retrieval_attention(q, k, v, k=8, options=opts, return_positions=True)[0]
    assert len(blocks) == 600 // 64 + 1
    torch.testing.assert_close(out, general)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_k_at_least_n_equals_dense(index):
    ids, mask = left_padded(pad=(0, 5))
    model = tiny_model("llama")
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        with knn_patch.patched(
            model, k=64, backend="faiss", backend_options={"index": index, **SMALL_BLOCKS}
        ):
            knn = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(knn[keep], dense[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_give_finite_outputs_that_follow_top_k(index):
    """Small k through a real approximate index (keys past ivf's 39 * nlist training keys). Random
    keys have no clusters: ivf probes all 4 lists (no scan budget), so only its training loses keys."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 600, 16), torch.randn(1, 2, 600, 16)
    opts = validate_index_options({"index": index, "block_size": 64, "nlist": 4, "scan_fraction": None})
    out = retrieval_attention(q, k, k, k=8, options=opts)[0]
    assert torch.isfinite(out).all()
    recall = recall_at_k(q, k, k=8, options=opts, n_queries=64)
    assert recall.plain >= 0.8 and 0.0 < recall.weighted <= 1.0


def test_weighted_recall_counts_missed_keys_by_attention_weight():
    """A flat index misses nothing (1.0 either way); an IVF probing 1 of 8 lists misses keys, and
    the weighted recall counts them by their softmax weight, not one each."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 800, 16), torch.randn(1, 1, 800, 16) * 2
    flat = validate_index_options({"index": "flat", "block_size": 64})
    assert recall_at_k(q, k, k=8, options=flat, n_queries=64) == pytest.approx((1.0, 1.0))
    ivf = validate_index_options({"index": "ivf", "block_size": 64, "nlist": 8, "nprobe": 1})
    plain, weighted = recall_at_k(q, k, k=8, options=ivf, n_queries=64)
    assert plain < 1.0 and 0.0 < weighted < 1.0 and weighted != pytest.approx(plain)


def test_recall_with_sinks_is_over_the_indexed_keys():
    """With sinks the exact top-k is taken among the other keys, as the backend sees them: sinks
    that hold most of the attention mass count in the weights, not as kept top-k keys."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 800, 16) + 2, torch.randn(1, 1, 800, 16)
    k[:, :, :4] = 4.0  # four keys every query attends to most: sinks
    flat = validate_index_options({"index": "flat", "block_size": 64})
    assert recall_at_k(q, k, k=8, options=flat, n_queries=64, sink_tokens=4) == pytest.approx((1.0, 1.0))
    ivf = validate_index_options({"index": "ivf", "block_size": 64, "nlist": 8, "nprobe": 1})
    indexed = recall_at_k(q, k, k=8, options=ivf, n_queries=64)  # the four heavy keys are found
    sinks = recall_at_k(q, k, k=8, options=ivf, n_queries=64, sink_tokens=4)
    assert indexed.weighted > 0.99 > sinks.weighted
    assert sinks.plain < 1.0
    with pytest.raises(ValueError, match=r"sink_tokens \(-1\).*>= 0"):
        recall_at_k(q, k, k=8, options=ivf, n_queries=64, sink_tokens=-1)


def filled_index(kind, n=2000, d=16, nlist=8, nprobe=3, **extra):
    """A KeyIndex of n seeded random keys; ivf with `nlist` lists (trained once 39 * nlist are in)."""
    torch.manual_seed(0)
    keys = torch.randn(n, d)
    options = validate_index_options({"index": kind, "nlist": nlist, "nprobe": nprobe, **extra})
    index = index_module.KeyIndex(d, options=options, n_hint=n, norm_hint=1.0, device=torch.device("cpu"))
    for chunk in keys.split(300):  # grown in several adds, as the backend grows it
        index.add(chunk)
    return index


def test_ivf_keys_sit_at_their_nearest_l2_centroid_and_the_ivf_retrains_as_keys_grow():
    """Keys join the list of their nearest centroid in L2 (not faiss's largest inner product), and
    the IVF retrains whenever its keys have grown `retrain_growth` times: here last at its final
    add of 2000 keys. Every key survives the retrainings, under its own id."""
    index = filled_index("ivf")
    torch.manual_seed(0)
    keys = torch.randn(2000, 16)  # filled_index's keys
    assert index.train_at == math.ceil(index_module.DEFAULTS["retrain_growth"] * 2000)
    stored = torch.from_numpy(index._stored_vectors())
    assert torch.equal(stored, keys)
    centroids = torch.from_numpy(index._centroids())
    list_of = torch.empty(2000, dtype=torch.long)
    for i in range(index.nlist):
        list_of[torch.from_numpy(get_invlist(index.index.invlists, i)[0])] = i
    assert torch.equal(list_of, torch.cdist(keys, centroids).argmin(-1))

    once = filled_index("ivf", retrain_growth=None)  # trained once, at 39 * 8 keys (its second add)
    assert once.train_at == math.inf
    assert not torch.equal(torch.from_numpy(once._centroids()), centroids)


def amx_tolerance(x, keys):
    """How far bf16x3 scores may stray from fp32's: ~3 * 2^-18 * |q| |k| (see select.cpp), with room."""
    return 2**-15 * float(x.norm(dim=-1).max() * keys.norm(dim=-1).max())


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize(
    ("kind", "k", "nprobe", "scan_fraction"),
    [
        ("flat", 10, 3, None),
        ("ivf", 10, 3, None),
        ("ivf", 500, 2, None),
        ("ivf", 10, 8, 0.1),
        ("ivf", 5, 8, 0.3),
    ],
)
def test_compiled_search_equals_faiss_search(kind, k, nprobe, scan_fraction, amx, monkeypatch):
    """The compiled flat and grouped IVF searches return faiss's own results: the same keys and
    scores (k=500 exceeds what some queries' 2 probed lists hold: the same -1 slots). With a scan
    budget (faiss's max_codes, which `search` sets: 640 = 64 per result, or 600 = 30% of the 2000
    keys, ~250 per list) a query stops within its third list, scanning that one up to the budget.
    On AMX the IVF's scores are bf16x3's, within `amx_tolerance` of fp32's."""
    if amx and kind == "flat":
        pytest.skip("a flat index is scored in fp32 (`scores_topk`) either way")
    if amx and not select_module.amx_available():
        pytest.skip(NO_AMX)
    monkeypatch.setattr(index_module, "ivf_topk", functools.partial(select_module.ivf_topk, amx=amx))
    index = filled_index(kind, nprobe=nprobe, scan_fraction=scan_fraction)
    x = torch.randn(300, 16)  # 300 queries * 2 probes >= 8 per list * 8 lists: the grouped IVF path
    index.search(x, k)  # sets the budget
    if kind == "ivf":
        assert index.index.max_codes == (0 if scan_fraction is None else max(64 * k, 2000 * scan_fraction))
    assert index.trained
    mine = index._compiled_search(x, k)
    assert mine is not None
    dist, ids = index.index.search(x.numpy(), k)
    order = mine[1].sort(-1).values
    torch.testing.assert_close(order, torch.from_numpy(ids).sort(-1).values, rtol=0, atol=0)
    found = order >= 0
    if k == 500:
        assert not found.all() and found.any(-1).all()
    # faiss fills empty slots with -FLT_MAX, the compiled search with -inf (`search` maps both to -inf)
    filled = torch.arange(k) < found.sum(-1, keepdim=True)  # the slots holding a key, best first
    theirs = torch.from_numpy(dist).sort(-1, descending=True).values
    keys = torch.from_numpy(index._stored_vectors()) if amx else None
    tolerance = {"rtol": 0, "atol": amx_tolerance(x, keys)} if amx else {}
    torch.testing.assert_close(mine[0].sort(-1, descending=True).values[filled], theirs[filled], **tolerance)
    if scan_fraction is not None:  # the budget bites: without it faiss finds other keys
        index.index.max_codes = 0
        unbudgeted = torch.from_numpy(index.index.search(x.numpy(), k)[1]).sort(-1).values
        assert not torch.equal(order, unbudgeted)


@pytest.mark.skipif(not select_module.amx_available(), reason=NO_AMX)
@pytest.mark.parametrize("d", [40, 128])
def test_amx_scan_finds_the_fp32_scans_keys(d):
    """The AMX pass on dimensions that fill a tile partly (40 = 32 + 8) or take four tiles (128),
    over lists of ~250 keys (partial 32-key blocks) and 300 queries (partial 16-query tiles): its
    keys are the fp32 scan's up to near-ties (any key it swaps in scores within the tolerance of
    fp32's k-th), and its scores are the keys' exact inner products within the tolerance."""
    index = filled_index("ivf", d=d, nprobe=3, scan_fraction=0.3)
    torch.manual_seed(1)
    x = torch.randn(300, d)
    index.search(x, 10)  # sets the budget
    keys = torch.from_numpy(index._stored_vectors())
    centroids = index_module._flat_vectors(index._quantizer)
    args = (x, centroids, index._lists, 10, index.index.nprobe, index.index.max_codes)
    (ref_v, ref_i), (v, i) = (select_module.ivf_topk(*args, amx=amx) for amx in (False, True))
    tol = amx_tolerance(x, keys)
    exact = (x.unsqueeze(1) @ keys[i].transpose(-1, -2)).squeeze(1)  # (300, 10): the AMX keys' fp32 scores
    torch.testing.assert_close(v, exact, rtol=0, atol=tol)
    assert (exact >= ref_v.min(-1, keepdim=True).values - tol).all()
    same = (i.sort(-1).values == ref_i.sort(-1).values).all(-1)
    assert same.float().mean() > 0.95


@pytest.mark.parametrize("amx", [False, True])
def test_ivf_search_skips_an_empty_list_that_queries_probe_first(amx):
    """A retrained IVF can leave a list empty; the queries whose best centroid it is still get
    the k best keys of the lists they probe (on AMX an empty list once divided by zero)."""
    if amx and not select_module.amx_available():
        pytest.skip(NO_AMX)
    torch.manual_seed(0)
    keys = torch.randn(2, 300, 16)  # lists 1 and 2; list 0 is empty
    ids = torch.arange(600).view(2, 300)
    centroids = torch.cat([torch.ones(1, 16) * 10, keys.mean(1)])  # list 0 ranks first for these queries
    x = torch.ones(64, 16) + 0.1 * torch.randn(64, 16)
    lists = (
        torch.tensor([keys.data_ptr(), keys[0].data_ptr(), keys[1].data_ptr()]),
        torch.tensor([ids.data_ptr(), ids[0].data_ptr(), ids[1].data_ptr()]),
        torch.tensor([0, 300, 300]),
    )
    vals, found = select_module.ivf_topk(x, centroids, lists, 5, 3, 0, amx=amx)
    want = (x @ keys.reshape(600, 16).T).topk(5)
    assert torch.equal(found.sort(-1).values, want.indices.sort(-1).values)
    atol = amx_tolerance(x, keys.reshape(600, 16)) if amx else 1e-5
    torch.testing.assert_close(vals.sort(-1, descending=True).values, want.values, rtol=0, atol=atol)


def test_the_scan_budget_is_a_share_of_the_keys_and_at_least_64_per_result():
    index = filled_index("ivf", nprobe=8, scan_fraction=0.5)
    x = torch.randn(300, 16)
    index.search(x, 10)
    assert index.index.max_codes == 1000  # half of the 2000 keys
    index.search(x, 20)
    assert index.index.max_codes == 1280  # 64 keys for each of the 20 results
    small = filled_index("ivf", nprobe=8, scan_fraction=0.01)  # 20 keys: under 64 per result
    small.search(x, 10)
    assert small.index.max_codes == index_module.SCAN_PER_RESULT * 10


def test_without_the_compiled_extension_ivf_searches_by_faiss_and_flat_by_torch(monkeypatch):
    monkeypatch.setattr(select_module, "extension", lambda: None)
    x = torch.randn(300, 16)
    assert filled_index("ivf")._compiled_search(x, 10) is None
    flat = filled_index("flat")
    ids = flat._compiled_search(x, 10)[1].sort(-1).values
    torch.testing.assert_close(ids, torch.from_numpy(flat.index.search(x.numpy(), 10)[1]).sort(-1).values)


def test_compiled_search_leaves_few_queries_per_list_to_faiss():
    """A decode step's queries would leave each IVF list almost empty of queries: faiss searches.
    Under a scan budget a query probes fewer lists than nprobe: 20 queries * 8 probes would give
    each of the 8 lists 20 queries, but a budget of 640 keys (64 per result) stops them after ~3
    lists of ~250 keys, ~7 queries per list."""
    assert filled_index("ivf")._compiled_search(torch.randn(3, 16), 10) is None
    budget = filled_index("ivf", nprobe=8, scan_fraction=0.01)
    budget.search(torch.randn(300, 16), 10)  # sets the budget: 640 keys
    assert budget._compiled_search(torch.randn(20, 16), 10) is None
    assert budget._compiled_search(torch.randn(40, 16), 10) is not None


@pytest.mark.parametrize("amx", [False, True])
def test_grouped_ivf_search_gives_the_faiss_search_result_in_the_kernel(amx, monkeypatch):
    """A full-sequence forward through a trained IVF: the compiled search serves it, and replacing
    it by faiss's search changes nothing; on AMX, nothing but rare rows (at most 0.1%) whose k-th
    and (k+1)-th keys are nearly tied."""
    if amx and not select_module.amx_available():
        pytest.skip(NO_AMX)
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 1200, 16), torch.randn(1, 2, 1200, 16)
    opts = validate_index_options({"index": "ivf", "block_size": 128, "nlist": 8, "nprobe": 3})
    calls = []
    grouped = functools.partial(select_module.ivf_topk, amx=amx)
    monkeypatch.setattr(index_module, "ivf_topk", lambda *a: calls.append(1) or grouped(*a))
    with torch.no_grad():
        out = retrieval_attention(q, k, k, k=8, options=opts)[0]
        assert calls, "the grouped IVF search was not used"
        monkeypatch.setattr(index_module.KeyIndex, "_compiled_search", lambda self, x, k: None)
        reference = retrieval_attention(q, k, k, k=8, options=opts)[0]
    close = torch.isclose(out, reference, rtol=1e-5, atol=2e-5 if amx else 1e-6).all(-1)
    assert close.float().mean() >= (0.999 if amx else 1.0)


@pytest.fixture(scope="module")
def smollm_activations():
    """Post-RoPE queries and keys of layers 3 and 10 of the embedded default on 4096 real tokens."""
    from knn_patch.assets import bundled_corpus_dir

    model, tokenizer = knn_patch.load_default()
    text = max(sorted(bundled_corpus_dir().glob("*.txt"))[:40], key=lambda p: p.stat().st_size).read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :4096]
    assert ids.shape[1] == 4096
    return capture_activations(model.model, ids, layers=[3, 10])


@pytest.mark.slow
@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_recall_at_32_on_real_activations_at_default_settings(smollm_activations, index):
    options = validate_index_options({"index": index})
    for layer, act in smollm_activations.items():
        recall = recall_at_k(act["q"], act["k"], k=32, options=options, n_queries=128, seed=0).plain
        assert recall >= 0.9, f"layer {layer}: recall@32 {recall:.3f}"


def test_missing_faiss_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    index_module.faiss_module.cache_clear()
    try:
        with pytest.raises(
            ImportError, match=r"pip install faiss-cpu.*pip uninstall -y faiss-cpu && pip install faiss-gpu"
        ):
            KNNConfig(backend="faiss")
        with pytest.raises(ImportError, match="pip install faiss-cpu"):
            knn_patch.KNNCache()
    finally:
        index_module.faiss_module.cache_clear()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"index": "lsh"}, r"'index'.*unknown.*flat.*ivf.*hnsw"),
        ({"nprobe": 0}, r"'nprobe'.*>= 1"),
        ({"nprobe": -3}, r"'nprobe'.*>= 1"),
        ({"nlist": 0}, r"'nlist'.*>= 1 or None"),
        ({"block_size": 2.5}, r"'block_size'"),
        ({"retrain_growth": 1}, r"'retrain_growth'.*number > 1, or None"),
        ({"retrain_growth": "2"}, r"'retrain_growth'.*number > 1, or None"),
        ({"scan_fraction": 0}, r"'scan_fraction'.*number in \(0, 1\], or None"),
        ({"scan_fraction": 1.5}, r"'scan_fraction'.*number in \(0, 1\], or None"),
        ({"scan_fraction": True}, r"'scan_fraction'.*number in \(0, 1\], or None"),
        ({"n_probe": 4}, r"Unknown faiss backend_options \['n_probe'\]"),
    ],
)
def test_bad_options_fail_when_the_config_is_built(options, match):
    with pytest.raises(ValueError, match=match):
        KNNConfig(backend="faiss", backend_options=options)


def test_nlist_above_the_key_count_is_lowered_with_a_warning(caplog):
    assert resolve_nlist(None, 10_000) == 100  # ceil(sqrt(n))
    assert resolve_nlist(None, 100) == 2  # capped at n // 39
    assert resolve_nlist(50, 10_000) == 50
    with caplog.at_level(logging.WARNING, logger="knn_patch"):
        assert resolve_nlist(500, 400) == 10
    assert "nlist=500 is too large for 400 keys" in caplog.text
    caplog.clear()
    ids, _ = left_padded(pad=(0, 0))
    model = tiny_model("llama")
    options = {"index": "ivf", "nlist": 1000, **SMALL_BLOCKS}
    with (
        caplog.at_level(logging.WARNING, logger="knn_patch"),
        torch.no_grad(),
        knn_patch.patched(model, k=3, backend="faiss", backend_options=options),
    ):
        logits = model(input_ids=ids).logits
    assert "using nlist=1" in caplog.text
    assert torch.isfinite(logits).all()


@CUDA
def test_cuda_tensors_match_topk():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 300, 16, device="cuda") for h in (4, 2, 2))
    for index in ("flat", "ivf", "hnsw"):
        opts = validate_index_options({"index": "flat" if index == "flat" else index, "block_size": 32})
        out = retrieval_attention(q, k, v, k=400, options=opts)[0]
        assert out.device.type == "cuda"
        torch.testing.assert_close(out, topk_attention(q, k, v, k=400)[0], rtol=1e-4, atol=1e-5)


def test_validating_a_faiss_config_neither_imports_faiss_nor_changes_the_environment():
    code = (
        "import os, sys\n"
        "from knn_patch import KNNConfig\n"
        "KNNConfig(backend='faiss', backend_options={'index': 'ivf'})\n"
        "print('faiss' in sys.modules, os.environ.get('OPENBLAS_CORETYPE'))\n"
        "from knn_patch.kernels.index import faiss_module\n"
        "faiss_module()  # the first index built loads faiss\n"
        "print('faiss' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "None", "True"]


def test_two_faiss_distributions_are_named_with_the_fix(monkeypatch, caplog):
    # faiss-cpu and faiss-gpu both install the `faiss` module; the last one installed silently wins
    both = {"faiss": ["faiss-cpu", "faiss-gpu"]}
    monkeypatch.setattr(index_module.importlib.metadata, "packages_distributions", lambda: both)
    index_module.faiss_module.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="knn_patch"):
            index_module.faiss_module()
    finally:
        index_module.faiss_module.cache_clear()
    assert (
        "['faiss-cpu', 'faiss-gpu'] all provide" in caplog.text
        and "pip uninstall -y faiss-cpu" in caplog.text
    )
