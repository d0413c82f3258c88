"""Sliding-window NLL: exact token counts, and equal to explicit per-token computations."""

import pytest
import torch
from tiny_models import tiny_model

import knn_patch
from knn_patch.eval.perplexity import document_nll, window_nll, windows
from knn_patch.train import loss


@pytest.mark.parametrize(
    ("n", "max_length", "stride"), [(10, 4, 4), (10, 4, 2), (10, 4, 3), (9, 4, 1), (3, 8, 8)]
)
def test_windows_score_each_token_at_most_once(n, max_length, stride):
    scored = [t for _, end, first in windows(n, max_length, stride) for t in range(first, end)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    expected = set(range(1, n)) if stride < max_length else {t for t in range(1, n) if t % max_length}
    assert set(scored) == expected


def test_stride_equal_to_max_length_sums_independent_chunks():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (23,), generator=torch.Generator().manual_seed(1))
    nll, count = document_nll(model, ids, max_length=8, stride=8)
    want, want_count = 0.0, 0
    for start in range(0, 23, 8):
        chunk = ids[start : start + 8].unsqueeze(0)
        logits = model(input_ids=chunk).logits[0, :-1]
        want += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        want_count += chunk.shape[1] - 1
    assert count == want_count == 20
    assert nll == pytest.approx(want, rel=1e-6)


def test_overlapping_windows_equal_explicit_contexts():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (13,), generator=torch.Generator().manual_seed(2))
    nll, count = document_nll(model, ids, max_length=6, stride=2)
    want = 0.0
    for begin, end, first in windows(13, 6, 2):
        for t in range(first, end):  # token t predicted from its window's context ids[begin:t]
            context = ids[begin:t].unsqueeze(0)
            log_probs = model(input_ids=context).logits[0, -1].log_softmax(-1)
            want -= log_probs[ids[t]].item()
    assert count == 12
    assert nll == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    ("n", "max_length", "stride", "score_from"), [(10, 4, 4, 6), (10, 4, 2, 3), (12, 8, 8, 7)]
)
def test_score_from_scores_only_the_tail_with_full_windows(n, max_length, stride, score_from):
    spans = list(windows(n, max_length, stride, score_from))
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert sorted(scored) == [t for _, end, first in windows(n, max_length, stride) for t in range(first, end)
                              if t >= score_from]  # fmt: skip
    assert all(first >= score_from for _, _, first in spans)


def test_bad_windows_are_rejected():
    for stride in (0, -1, 5):
        with pytest.raises(ValueError, match="stride"):
            list(windows(10, 4, stride))
    with pytest.raises(ValueError, match="score_from"):
        list(windows(10, 4, 4, score_from=0))


def test_window_nll_projects_a_chunk_at_a_time_and_equals_the_full_logits(monkeypatch):
    monkeypatch.setattr(loss, "LOGITS_BUDGET", 128 * 4)  # 4 positions of the 128-token vocabulary
    model = knn_patch.patch(tiny_model("gemma2"), k=4)  # softcapped logits, kNN attention
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    rows = []
    model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[:-1].numel())
    )
    nll, count = window_nll(model, ids, 7)
    assert count == 13 and max(rows) == 4
    full, _ = window_nll(model, ids, 7, method="full")
    assert max(rows) == 20 and nll == pytest.approx(full, rel=1e-6)  # the whole window at once
