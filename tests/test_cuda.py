"""On a CUDA GPU the kernels and a patched model give what they give on CPU; skipped without one.

Nothing else in the suite runs on a GPU. `make gpu-check` (scripts/gpu_check.py) runs this file on a
lent GPU machine; test_kernel.py, test_tail.py and test_families.py hold the same properties on CPU.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from test_families import batch, logits_and_grads
from test_kernel import CASES, inputs, padding_mask, reference
from tiny_models import tiny_model

import knn_patch
from knn_patch.kernels.tail import tail_attention
from knn_patch.kernels.topk import topk_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
]

# Allowed error beyond twice SDPA's own: fp32 as test_kernel.py allows on CPU, bf16 one rounding step
# at the tensor's scale (relative, times max |reference|).
SLACK = {torch.float32: (1e-5, 0.0), torch.bfloat16: (0.0, torch.finfo(torch.bfloat16).eps)}


def on_cuda(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Leaf copies on the GPU that require gradients."""
    return tuple(t.detach().cuda().requires_grad_() for t in tensors)


def right_padded(b: int, n: int, pad: int) -> torch.Tensor:
    """Causal (B, 1, n, n) mask whose last batch row ends in `pad` padding keys, as in a right-padded
    training batch: every query still sees a key, so no SDPA kernel meets a fully masked row."""
    mask = torch.ones(n, n, dtype=torch.bool).tril().expand(b, 1, n, n).clone()
    mask[-1, :, :, n - pad :] = False
    return mask


def out_and_grads(fn, q, k, v, cotangent: torch.Tensor) -> list[torch.Tensor]:
    """[out, dq, dk, dv] in float64, for the loss sum(out * cotangent)."""
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), cotangent.to(out.dtype))
    return [out.detach().double(), *(g.double() for g in grads)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "right_padded"])
def test_topk_at_k_at_least_n_equals_sdpa_output_and_gradients(dtype, padded):
    """flash-attention's rule: against float64 SDPA on the same rounded inputs, topk's error stays
    within twice that of SDPA in the same dtype (plus `SLACK`)."""
    n, chunk = 300, 64  # several query chunks, the last one partial
    base = [t.to(dtype) for t in inputs(b=2, hq=4, hkv=2, lq=n, lk=n, d=64, dtype=torch.float32)]
    mask = right_padded(2, n, 37).cuda() if padded else None
    cotangent = torch.randn(2, 4, n, 64, generator=torch.Generator().manual_seed(1)).cuda()

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None, enable_gqa=True)

    def topk(q, k, v):
        return topk_attention(q, k, v, mask, k=n, chunk_size=chunk)[0]

    ref = out_and_grads(sdpa, *on_cuda(*(t.double() for t in base)), cotangent)
    same_dtype = out_and_grads(sdpa, *on_cuda(*base), cotangent)
    got = out_and_grads(topk, *on_cuda(*base), cotangent)
    atol, rel = SLACK[dtype]
    for name, r, s, g in zip(("out", "dq", "dk", "dv"), ref, same_dtype, got, strict=True):
        err = (g - r).abs().max().item()
        bound = 2 * (s - r).abs().max().item() + atol + rel * r.abs().max().item()
        assert err <= bound, f"{name}: topk error {err:.3g} > {bound:.3g}, twice SDPA's {dtype} error + slack"


@pytest.mark.parametrize("case", ["two_stage_select", "decode_step", "cached_prefix"])
@pytest.mark.parametrize("masking", ["causal", "padded"])
def test_topk_below_n_matches_the_brute_force_reference(case, masking):
    """float64, so that the GPU's scores and the CPU reference's rank every key alike (in fp32 a
    near-tie could flip one key and fail the test for no fault of the kernel)."""
    c = CASES[case]
    q, k, v = inputs(lq=c["lq"], lk=c["lk"])
    mask = padding_mask(2, c["lq"], c["lk"], [0, 7]) if masking == "padded" else None
    qc, kc, vc = on_cuda(q, k, v)
    out, _ = topk_attention(
        qc, kc, vc, None if mask is None else mask.cuda(), k=c["kk"], scale=0.4, chunk_size=c["chunk"]
    )
    ref = reference(q, k, v, mask, kk=c["kk"], scale=0.4)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-10)
    weight = torch.randn_like(ref)
    got = torch.autograd.grad((out * weight.cuda()).sum(), (qc, kc, vc))
    want = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True])
def test_tail_on_cuda_is_exact_when_the_tail_fits_and_seeded_otherwise(masked):
    """`knn-patch bench` times `tail` on the GPU, where its torch sampler (not the compiled one) draws.
    The reference is float64 SDPA with the bottom-right causal mask (Lq < Lk)."""
    q, k, v = (t.detach().cuda() for t in inputs(lq=25, lk=40))
    mask = padding_mask(2, 25, 40, [0, 9] if masked else [0, 0]).cuda()
    exact = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)

    def tail(m: int) -> torch.Tensor:
        gen = torch.Generator(device="cuda").manual_seed(0)
        return tail_attention(q, k, v, mask if masked else None, k=3, m=m, generator=gen)

    torch.testing.assert_close(tail(40), exact, atol=1e-10, rtol=0)
    sampled = tail(4)
    assert torch.isfinite(sampled).all() and not torch.allclose(sampled, exact)
    assert torch.equal(sampled, tail(4))


def test_patched_tiny_model_equals_dense_on_cuda_logits_gradients_and_generate():
    model = tiny_model("llama").cuda()
    ids, mask = (t.cuda() for t in batch(length=10, pad=3))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    dense = model.generate(input_ids=ids, attention_mask=mask, **settings)
    dense_logits, dense_grads = logits_and_grads(model, ids, mask)
    with knn_patch.patched(model, k=64):
        assert model.config._attn_implementation == "knn_topk"
        logits, grads = logits_and_grads(model, ids, mask)
        generated = model.generate(input_ids=ids, attention_mask=mask, **settings)
    torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-5)
    assert grads.keys() == dense_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=0, atol=1e-5, msg=name)
    assert generated.device.type == "cuda" and torch.equal(generated, dense)
    with knn_patch.patched(model, k=2), torch.no_grad():
        small = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert not torch.allclose(small, dense_logits, atol=1e-3), "k=2 must really cut attention"


def test_faiss_gpu_index_equals_topk(caplog):
    """Only where faiss has GPU support: the device image has no faiss, and faiss-cpu runs its
    indexes on CPU (tests/test_faiss.py::test_cuda_tensors_match_topk covers that fallback)."""
    try:
        import faiss
    except ImportError:
        pytest.skip("faiss is not installed (faiss-gpu would have to travel as a wheel)")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss is installed without GPU support (faiss-cpu), or sees no GPU")
    from knn_patch.kernels.index import validate_index_options
    from knn_patch.kernels.retrieval import retrieval_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 300, 16, device="cuda") for h in (4, 2, 2))
    with caplog.at_level(logging.WARNING, logger="knn_patch"):
        for index in ("flat", "ivf"):
            opts = validate_index_options({"index": index, "block_size": 32})
            out = retrieval_attention(q, k, v, k=400, options=opts)[0]
            assert out.device.type == "cuda"
            torch.testing.assert_close(out, topk_attention(q, k, v, k=400)[0], rtol=1e-4, atol=1e-5)
    assert "runs on CPU" not in caplog.text, "the GPU index must not fall back to CPU"
