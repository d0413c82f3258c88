"""Needle-in-a-haystack prompts, scoring and runs: exact lengths and depths, RULER's string match,
k >= n equal to dense, resume, reports and bad input."""

import json
import random

import pytest
from rich.console import Console
from tiny_models import tiny_model

from knn_patch import KNNConfig, get_config
from knn_patch.eval.data import load_documents, tokenize_documents
from knn_patch.eval.needle import (
    NEEDLE,
    SNAP_TOKENS,
    Grid,
    NeedleTask,
    build_prompt,
    print_report,
    run_needle,
    score,
    wilson,
    write_report,
)
from knn_patch.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()  # the embedded SmolLM2's: real BPE, with a chat template


@pytest.fixture(scope="module")
def haystacks(tokenizer):
    docs, _ = tokenize_documents(load_documents(max_docs=20), tokenizer, min_tokens=1400, join_to=1400)
    return list(zip(docs["name"], docs["input_ids"], strict=True))


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=2048)


TASKS = [
    NeedleTask("single", key_type="words", value_type="numbers"),
    NeedleTask("multikey", 4, key_type="uuids", value_type="uuids"),
    NeedleTask("multivalue", 3, key_type="numbers", value_type="words"),
    NeedleTask("multiquery", 2),
]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.task)
@pytest.mark.parametrize("use_chat", [True, False])
@pytest.mark.parametrize("length", [600, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompts_have_the_exact_length_and_their_needles_where_asked(
    tokenizer, haystacks, task, use_chat, length, depth
):
    prompt = build_prompt(
        tokenizer, haystacks[0][1], length, depth, task, random.Random(7), use_chat=use_chat
    )
    ids = prompt["input_ids"]
    assert len(ids) == length
    needles = prompt["needles"]
    assert len(needles) == task.count
    haystack = prompt["haystack_tokens"]
    assert haystack + sum(n["end"] - n["start"] for n in needles) < length  # the rest: instruction, question
    for n in needles:  # each needle's tokens are its sentence, where the prompt says
        text = NEEDLE.format(kind=task.value_type, key=n["key"], value=n["value"])
        assert tokenizer.decode(ids[n["start"] : n["end"]]) == " " + text
    first = needles[0]  # the asked needle at the grid's depth, within the sentence snap
    assert first["asked"] and abs(first["depth"] - depth) * haystack <= SNAP_TOKENS + 0.5
    if depth in (0.0, 1.0):
        assert first["depth"] == depth
    text = tokenizer.decode(ids)
    assert all(key in text.rsplit("What are all", 1)[1] for key in prompt["keys"])
    assert text.startswith("<|im_start|>") == use_chat and text.count("Some special magic") == 1
    assert len(prompt["expected"]) == task.expected_values()
    assert len(set(prompt["expected"])) == len(prompt["expected"])


def test_tasks_ask_what_ruler_asks(tokenizer, haystacks):
    def prompt(task):
        return build_prompt(tokenizer, haystacks[0][1], 600, 0.5, task, random.Random(1))

    multikey = prompt(NeedleTask("multikey", 4))
    assert [n["asked"] for n in multikey["needles"]] == [True, False, False, False]
    assert multikey["expected"] == [multikey["needles"][0]["value"]]
    multivalue = prompt(NeedleTask("multivalue", 3))
    assert len({n["key"] for n in multivalue["needles"]}) == 1
    assert multivalue["expected"] == [n["value"] for n in multivalue["needles"]]
    multiquery = prompt(NeedleTask("multiquery", 3))
    assert (
        multiquery["keys"] == [n["key"] for n in multiquery["needles"]] and len(set(multiquery["keys"])) == 3
    )
    assert multiquery["expected"] == [n["value"] for n in multiquery["needles"]]


def test_prompts_are_seeded(tokenizer, haystacks):
    def prompt(seed):
        return build_prompt(tokenizer, haystacks[0][1], 500, 0.5, NeedleTask(), random.Random(seed))

    assert prompt("0/500/0.5/0") == prompt("0/500/0.5/0")
    assert prompt("0/500/0.5/0")["input_ids"] != prompt("0/500/0.5/1")["input_ids"]


def test_score_is_ruler_string_match():
    assert score(": 1234567.", ["1234567"]) == {
        "found": [True],
        "correct": True,
        "strict": True,
        "score": 1.0,
    }
    listed = score("1. 1234567 2. 7654321", ["1234567"], distractors=["7654321"])
    assert listed["correct"] and not listed["strict"]  # every number listed: RULER counts it, strict does not
    assert score("are 7654321 and 1234567", ["1234567", "7654321"])["correct"]
    partial = score("The numbers are 1234567, 2345678", ["1234567", "9999999"])
    assert partial["found"] == [True, False] and not partial["correct"] and partial["score"] == 0.5
    assert score("BOLD-CABIN", ["bold-cabin"])["correct"]  # case-insensitive
    assert not score("123456", ["1234567"])["correct"]


def test_wilson_interval():
    # textbook values: 5/10 -> [0.2366, 0.7634]; 0/10 -> [0, 0.2775]; 10/10 -> [0.7225, 1]
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


@pytest.mark.parametrize("dense_prefill", [False, True])
def test_k_at_least_n_answers_as_dense_on_the_same_prompts(model, tokenizer, haystacks, dense_prefill):
    configs = [KNNConfig(k=4096), KNNConfig(k=4096, sink_tokens=4, local_window=16)]
    grid = Grid((256, 320), (0.0, 1.0), trials=1, seed=3)
    result = run_needle(
        model, tokenizer, haystacks, configs, grid, NeedleTask("multivalue", 2),
        dense_prefill=dense_prefill, max_new_tokens=6, progress=False,
    )  # fmt: skip
    assert len(result["prompts"]) == 4 and result["dense_prefill"] == dense_prefill
    for record in result["prompts"]:
        texts = {name: a["text"] for name, a in record["answers"].items()}
        assert len(set(texts.values())) == 1, texts
        assert texts["dense"]  # the tiny model says something
    assert result["template"]["chat"] and "{key}" in result["template"]["tail"]
    assert result["settings_detail"][1]["keys_percent"]["256"] == 100.0
    assert get_config(model) is None and model.config._attn_implementation == "sdpa"  # restored


def test_sliding_window_model_with_a_shared_dense_prefill(tokenizer, haystacks):
    gemma = tiny_model("gemma3_text", vocab_size=len(tokenizer), max_position_embeddings=2048)
    result = run_needle(
        gemma, tokenizer, haystacks, [KNNConfig(k=4096, layers="global")], Grid((256,), (0.5,), 1),
        NeedleTask("single"), dense_prefill=True, max_new_tokens=4, progress=False,
    )  # fmt: skip
    answers = result["prompts"][0]["answers"]
    assert answers["dense"]["text"] == answers["topk k=4096 layers=global"]["text"]


def test_resume_finishes_a_stopped_run(model, tokenizer, haystacks):
    args = dict(
        model=model, tokenizer=tokenizer, haystacks=haystacks, configs=[KNNConfig(k=8)],
        grid=Grid((256,), (0.0, 0.5, 1.0), 1), task=NeedleTask("single"), max_new_tokens=4, progress=False,
    )  # fmt: skip
    partials = []
    full = run_needle(**args, on_prompt=partials.append)
    assert [len(p["prompts"]) for p in partials] == [1, 2, 3]
    resumed = run_needle(**args, resume_from=json.loads(json.dumps(partials[0])))
    assert [p["answers"]["topk k=8"]["text"] for p in resumed["prompts"]] == [
        p["answers"]["topk k=8"]["text"] for p in full["prompts"]
    ]
    assert resumed["summary"]["dense"]["all"]["prompts"] == 3
    with pytest.raises(ValueError, match=r"saved run differs.*trials"):
        run_needle(**{**args, "grid": Grid((256,), (0.0, 0.5, 1.0), 2)}, resume_from=partials[0])


def test_reports(model, tokenizer, haystacks, tmp_path):
    result = run_needle(
        model, tokenizer, haystacks, [KNNConfig(k=8), KNNConfig(k=16)], Grid((256, 300), (0.0, 1.0), 2),
        NeedleTask("single"), max_new_tokens=3, progress=False,
    )  # fmt: skip
    summary = result["summary"]["topk k=8"]
    assert summary["by_length"]["256"]["prompts"] == 4 and summary["all"]["prompts"] == 8
    assert summary["by_length_depth"]["300/1.0"]["prompts"] == 2
    low, high = summary["all"]["ci95"]
    assert 0 <= low <= summary["all"]["accuracy"] <= high <= 1
    console = Console(width=200, record=True)
    print_report(result, "needles", console=console)
    table = console.export_text()
    assert "topk k=16" in table and "256 tokens" in table and "keys % at 300" in table
    paths = write_report(result, tmp_path)
    assert json.loads(paths["json"].read_text())["prompts"][0]["expected"]
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "needle_dense.png", "needle_topk_k=8.png", "needle_topk_k=16.png", "needle_keys.png",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NeedleTask("haystack"), "Unknown needle task"),
        (lambda: NeedleTask("single", 2), "exactly 1"),
        (lambda: NeedleTask("multikey", 1), "at least 2"),
        (lambda: NeedleTask(value_type="dates"), "value_type"),
        (lambda: Grid((1024,), trials=0), "trials"),
        (lambda: Grid((1024,), depths=(0.5, 1.5)), "depths"),
        (lambda: Grid(()), "lengths"),
    ],
)
def test_bad_task_or_grid_fails_at_once(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_runs_fail_before_any_work(model, tokenizer, haystacks):
    def run(grid, docs=haystacks):
        return run_needle(model, tokenizer, docs, [], grid, NeedleTask(), progress=False)

    with pytest.raises(ValueError, match="exceeds the model's 2048 positions"):
        run(Grid((4096,)))
    with pytest.raises(ValueError, match="longest haystack document has 500 tokens"):
        run(Grid((1024,)), [("short", haystacks[0][1][:500])])
    with pytest.raises(ValueError, match="too short for task 'multikey'"):
        run(Grid((64,)))
    with pytest.raises(ValueError, match="Settings must differ"):
        run_needle(model, tokenizer, haystacks, [KNNConfig(k=8)] * 2, Grid((256,)), NeedleTask())


def test_tiny_lengths_on_a_real_tokenizer_stay_exact(tokenizer, haystacks):
    task = NeedleTask("multikey", 2)
    for trial in range(20):  # many draws: sentence snapping never changes the length
        prompt = build_prompt(tokenizer, haystacks[trial % len(haystacks)][1], 257, trial / 19, task,
                              random.Random(trial))  # fmt: skip
        assert len(prompt["input_ids"]) == 257
