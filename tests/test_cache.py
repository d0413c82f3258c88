"""KNNCache: generate() with retrieval over the KV cache equals dense at k >= length, beams, memory."""

import pytest
import torch
from tiny_models import tiny_model

import knn_patch
from knn_patch import KNNCache

pytest.importorskip("faiss")


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def prompts():
    ids = (torch.arange(60).view(2, 30) * 7) % 120 + 3
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    return ids, mask


def generate(model, cache=None, **kwargs):
    ids, mask = prompts()
    kwargs = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0, **kwargs}
    if cache is not None:
        kwargs["cache"] = cache  # transformers 5 name; `past_key_values=` works too, with a warning
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_greedy_generate_at_k_at_least_length_equals_dense(index):
    model = tiny_model("llama")
    dense = generate(model)
    options = {"index": index, "block_size": 8, "sync_every": 4}
    with knn_patch.patched(model, k=64, backend="faiss", backend_options=options):
        cache = KNNCache()
        knn = generate(model, cache)
        assert cache.index_memory_bytes() > 0, "the decode steps searched the cache's index"
    assert torch.equal(knn, dense)


def test_decode_through_the_cache_index_equals_exact_top_k_decoding():
    """A flat index at small k, sinks and window: the same tokens as the exact topk backend."""
    model = tiny_model("llama")
    settings = dict(k=3, sink_tokens=1, local_window=2)
    with knn_patch.patched(model, **settings):
        exact = generate(model, output_logits=True, return_dict_in_generate=True)
    options = {"index": "flat", "sync_every": 3}
    with knn_patch.patched(model, backend="faiss", backend_options=options, **settings):
        cache = KNNCache()
        knn = generate(model, cache, output_logits=True, return_dict_in_generate=True)
    assert cache.layers[0].indexes.rows[0][0].ntotal >= 40
    assert torch.equal(knn.sequences, exact.sequences)
    torch.testing.assert_close(torch.stack(knn.logits), torch.stack(exact.logits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_small_k_generates_with_finite_logits_and_indexes_every_cached_key(index):
    model = tiny_model("llama")
    options = {"index": index, "sync_every": 1}  # every key joins the index as soon as it may
    with knn_patch.patched(model, k=2, local_window=2, backend="faiss", backend_options=options):
        cache = KNNCache()
        out = generate(model, cache, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 50)
    assert all(torch.isfinite(step).all() for step in out.logits)
    layer = cache.layers[0]
    # the last step queried position 48 (the 50th token is never fed back) with a 2-key window
    # (48 and 47): positions 0..46 are indexed, less row 1's 6 padding positions
    assert layer.indexes.seen == 47
    assert [index.ntotal for index in layer.indexes.rows[0]] == [47, 47]
    assert [index.ntotal for index in layer.indexes.rows[1]] == [41, 41]


def test_beam_search_reorders_the_indexes(monkeypatch):
    """Beams reorder (and duplicate) cache rows every step: at small k a flat index still gives
    exactly the topk backend's beams, which it would not if a row searched another row's keys."""
    model = tiny_model("llama")
    settings = dict(k=3, local_window=1)
    with knn_patch.patched(model, **settings):
        exact = generate(model, num_beams=3, max_new_tokens=8)
    reorders = []
    original = knn_patch.cache.KNNLayer.reorder_cache
    monkeypatch.setattr(
        knn_patch.cache.KNNLayer,
        "reorder_cache",
        lambda self, idx: reorders.append(idx) or original(self, idx),
    )
    with knn_patch.patched(
        model, backend="faiss", backend_options={"index": "flat", "sync_every": 2}, **settings
    ):
        knn = generate(model, KNNCache(), num_beams=3, max_new_tokens=8)
    assert reorders, "generate reordered the cache"
    assert torch.equal(knn, exact)


def test_crop_rebuilds_the_index_from_the_kept_keys():
    model = tiny_model("llama")
    ids, _ = prompts()
    options = {"index": "flat", "sync_every": 1}
    with torch.no_grad(), knn_patch.patched(model, k=2, backend="faiss", backend_options=options):
        cache = KNNCache()
        model(input_ids=ids[:, :20], cache=cache)
        model(input_ids=ids[:, 20:21], cache=cache)
        assert cache.layers[0].indexes is not None
        cache.crop(-5)
        assert cache.layers[0].indexes is None and cache.get_seq_length() == 16
        step = model(input_ids=ids[:, 16:17], cache=cache).logits
        fresh = KNNCache()
        model(input_ids=ids[:, :16], cache=fresh)
        again = model(input_ids=ids[:, 16:17], cache=fresh).logits
    torch.testing.assert_close(step, again)


def test_knn_cache_stores_what_the_dense_cache_stores_through_growth_crop_and_reorder():
    from transformers import DynamicCache

    torch.manual_seed(0)
    knn, dense = KNNCache(), DynamicCache()
    for step, length in enumerate([5, 1, 300, 1, 1]):  # 300 outgrows the first buffer
        kv = torch.randn(2, 2, length, 4), torch.randn(2, 2, length, 4)
        out_knn, out_dense = knn.update(*kv, 0), dense.update(*kv, 0)
        for a, b in zip(out_knn, out_dense, strict=True):
            assert torch.equal(a, b), step
        if step == 2:
            knn.crop(-3), dense.crop(-3)
        if step == 3:
            beams = torch.tensor([1, 1])
            knn.reorder_cache(beams), dense.reorder_cache(beams)
    assert knn.get_seq_length() == dense.get_seq_length() == 305
    assert torch.equal(knn.layers[0].keys, dense.layers[0].keys)
