"""Needle-in-a-haystack retrieval (RULER's NIAH tasks), dense against kNN settings on the same prompts.

Perplexity averages over every token; a needle task asks whether the model still finds one fact far
back in its context, which is what sparse attention most often breaks. Prompts follow RULER
(Hsieh et al. 2024): needles "One of the special magic {numbers} for {key} is: {value}." hidden in
natural text, then the question "What are all the special magic {numbers} for {key} ...?" and
RULER's answer prefix; greedy generation; a value counts as found when it appears in the answer.

Tasks: `single` (one needle), `multikey` (the asked needle among distractors of the same form),
`multivalue` (one key with several values, all asked) and `multiquery` (several keys asked at once).
Every prompt is exactly `length` tokens, its first asked needle at the grid's depth (the share of
the haystack before it, snapped back to a sentence start), the others at seeded random depths. A
prompt depends only on (seed, length, depth, trial), so every setting and every rerun sees the same.
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..config import KNNConfig
from ..extras import pyplot, require
from ..io import atomic_write, write_json_atomic
from ..patcher import get_config
from .evaluation import DENSE, _label, _use, keys_read, prefill, setting_name

box = require("rich.box", "needle")
Console = require("rich.console", "needle").Console
Table = require("rich.table", "needle").Table

TASKS = ("single", "multikey", "multivalue", "multiquery")
KINDS = ("words", "numbers", "uuids")
# RULER's synthetic NIAH template (scripts/data/synthetic/constants.py), its needle and answer prefix
INSTRUCTION = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
QUESTION = "\nWhat are all the special magic {kind} for {keys} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic {kind} for {keys} mentioned in the provided text are"
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
# word keys and values are adjective-noun pairs, as RULER draws them (2,500 here)
ADJECTIVES = (  # noqa: SIM905 (a word list reads better as text)
    "able ancient angry bold brave bright broad calm clever cold cool crisp curly dark eager "
    "early empty fair fancy fast fierce flat fresh gentle giant glad golden grand green happy "
    "heavy hollow huge jolly kind late lazy little lively loud lucky mighty narrow noisy odd "
    "plain proud quick quiet rapid"
).split()
NOUNS = (  # noqa: SIM905
    "apple arrow badge basket beacon bell blanket bottle bridge brush button cabin candle "
    "canyon carpet castle cello cliff cloud comet cradle crystal desert dragon drum eagle "
    "falcon feather forest fountain garden glacier harbor helmet island jacket kettle ladder "
    "lantern meadow mirror orchard pebble piano pillow rocket saddle tiger violin walnut"
).split()
SNAP_TOKENS = 96  # how far (either way) a needle or the haystack start may move to a sentence start
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$|\n\s*$")


@dataclass(frozen=True)
class NeedleTask:
    """One RULER NIAH task. `needles`: all needles for multikey (1 asked, the rest distractors),
    values for multivalue, keys asked for multiquery; 1 for single (default 4 otherwise)."""

    task: str = "multikey"
    needles: int | None = None
    key_type: str = "words"
    value_type: str = "numbers"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Unknown needle task {self.task!r}; use one of {', '.join(TASKS)}.")
        for name in ("key_type", "value_type"):
            if getattr(self, name) not in KINDS:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; use one of {', '.join(KINDS)}.")
        count = self.count
        if count < 1 or (self.task == "single" and count != 1) or (self.task == "multikey" and count < 2):
            least = (
                "exactly 1" if self.task == "single" else "at least 2" if self.task == "multikey" else ">= 1"
            )
            raise ValueError(f"needles={count} is invalid for task {self.task!r}: use {least}.")

    @property
    def count(self) -> int:
        return self.needles if self.needles is not None else 1 if self.task == "single" else 4

    def expected_values(self) -> int:
        """How many values an answer must hold."""
        return 1 if self.task in ("single", "multikey") else self.count


def draw(kind: str, rng: random.Random) -> str:
    """One random key or value of `kind`: an adjective-noun word, a 7-digit number or a UUID."""
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(kind: str, count: int, rng: random.Random, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        value = draw(kind, rng)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


@dataclass(frozen=True)
class PromptTemplate:
    """How the haystack is wrapped: RULER's instruction before it, the question and answer prefix
    after it, inside the tokenizer's chat template when it has one (instruct models)."""

    head: str
    tail: str
    chat: bool

    @classmethod
    def for_tokenizer(
        cls, tokenizer, kind: str, keys: Sequence[str], use_chat: bool = True
    ) -> PromptTemplate:
        marker = "\x00HAYSTACK\x00"
        question = QUESTION.format(kind=kind, keys=_join_keys(keys))
        answer = ANSWER_PREFIX.format(kind=kind, keys=_join_keys(keys))
        user = INSTRUCTION.format(kind=kind) + marker + question
        if use_chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            head, tail = text.split(marker)
            return cls(head, tail + answer, chat=True)
        head, tail = user.split(marker)
        return cls(head, tail + " " + answer, chat=False)

    def ids(self, tokenizer) -> tuple[list[int], list[int]]:
        """Token ids of the head (with the tokenizer's BOS outside a chat template, whose text holds
        its own special tokens) and of the tail."""
        head = tokenizer(self.head, add_special_tokens=not self.chat)["input_ids"]
        return head, tokenizer(self.tail, add_special_tokens=False)["input_ids"]


def _sentence_start(tokenizer, ids: Sequence[int], position: int) -> int:
    """The index nearest `position` (within SNAP_TOKENS, in 1..len(ids)-1) whose previous token ends a
    sentence or line, so that a needle does not cut a sentence; `position` itself when none is that
    close."""
    for step in range(SNAP_TOKENS + 1):
        for i in (position - step, position + step):
            if 0 < i < len(ids) and _SENTENCE_END.search(tokenizer.decode([ids[i - 1]])):
                return i
    return position


def build_prompt(
    tokenizer,
    haystack: Sequence[int],
    length: int,
    depth: float,
    task: NeedleTask,
    rng: random.Random,
    *,
    use_chat: bool = True,
) -> dict[str, Any]:
    """A prompt of exactly `length` tokens from a token stream `haystack` (long enough for any start
    drawn from `rng`): RULER's instruction, haystack with needles, question and answer prefix.

    Returns {"input_ids", "needles": [{"key", "value", "asked", "start", "end", "depth"}],
    "keys" (asked), "expected" (values the answer must hold), "haystack_start", "haystack_tokens",
    "template"}. A
    needle's `start`/`end` index it in `input_ids`; `depth` is the share of the haystack before it.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    taken: set[str] = set()
    count = task.count
    n_keys = 1 if task.task == "multivalue" else count
    keys = _distinct(task.key_type, n_keys, rng, taken)
    values = _distinct(task.value_type, count, rng, taken)
    pairs = (
        [(keys[0], v) for v in values] if task.task == "multivalue" else list(zip(keys, values, strict=True))
    )
    asked = keys[:1] if task.task in ("single", "multikey", "multivalue") else keys
    expected = values if task.task in ("multivalue", "multiquery") else values[:1]
    kind = task.value_type
    template = PromptTemplate.for_tokenizer(tokenizer, kind, asked, use_chat)
    head, tail = template.ids(tokenizer)
    needle_ids = [
        tokenizer(" " + NEEDLE.format(kind=kind, key=k, value=v), add_special_tokens=False)["input_ids"]
        for k, v in pairs
    ]
    hay_len = length - len(head) - len(tail) - sum(len(n) for n in needle_ids)
    if hay_len < 1:
        raise ValueError(
            f"length={length} is too short for task {task.task!r}: its instruction, needles and question "
            f"alone take {length - hay_len} tokens; use a longer length."
        )
    if len(haystack) < hay_len + SNAP_TOKENS:
        raise ValueError(f"The haystack has {len(haystack)} tokens; {hay_len + SNAP_TOKENS} are needed.")
    start = rng.randrange(0, len(haystack) - hay_len - SNAP_TOKENS + 1)
    start = _sentence_start(tokenizer, haystack, start)
    hay = list(haystack[start : start + hay_len])
    # the first needle sits at the grid's depth, the others at random depths; 0 and 1 are the ends
    wanted = [depth] + [rng.random() for _ in pairs[1:]]
    spots = [
        p if p in (0, hay_len) else _sentence_start(tokenizer, hay, p)
        for p in (round(d * hay_len) for d in wanted)
    ]
    order = sorted(range(len(pairs)), key=lambda i: (spots[i], i))
    ids = list(head)
    placed: dict[int, tuple[int, int]] = {}
    previous = 0
    for i in order:
        ids += hay[previous : spots[i]]
        placed[i] = (len(ids), len(ids) + len(needle_ids[i]))
        ids += needle_ids[i]
        previous = spots[i]
    ids += hay[previous:] + tail
    assert len(ids) == length, (len(ids), length)  # by construction; a failure is a bug here
    needles = [
        {
            "key": k,
            "value": v,
            "asked": k in asked,
            "start": placed[i][0],
            "end": placed[i][1],
            "depth": spots[i] / hay_len,
        }
        for i, (k, v) in enumerate(pairs)
    ]
    return {
        "input_ids": ids,
        "needles": needles,
        "keys": list(asked),
        "expected": list(expected),
        "haystack_start": start,
        "haystack_tokens": hay_len,
        "template": {"chat": template.chat, "head": template.head, "tail": template.tail},
    }


def score(answer: str, expected: Sequence[str], distractors: Sequence[str] = ()) -> dict[str, Any]:
    """RULER's string match: each expected value found (case-insensitive substring) in `answer`;
    `correct` when all are, `score` the share found. `strict` also needs no distractor's value in
    the answer: a small model that lists every number it saw is `correct` on multikey by RULER's
    rule, but has not told the keys apart."""
    text = answer.lower()
    found = [value.lower() in text for value in expected]
    strict = all(found) and not any(value.lower() in text for value in distractors)
    return {"found": found, "correct": all(found), "strict": strict, "score": sum(found) / len(found)}


def wilson(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default): unlike p +- z*se it stays
    in [0, 1] and is not zero-width at 0 or n successes, which needle accuracies often are."""
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def new_tokens_budget(task: NeedleTask) -> int:
    """Decode steps per answer: each value with its separator, and room for a list's numbering or a
    restated key; a model that stops early (EOS) costs less."""
    per_value = {"numbers": 16, "words": 16, "uuids": 40}[task.value_type]
    return 8 + per_value * task.expected_values()


def _cache(configs: Sequence[KNNConfig | None], model: torch.nn.Module) -> Any:
    """A KV cache that serves every config given: `KNNCache` when one of them uses faiss (its decode
    steps search the cache's index; dense and topk read it as a plain dynamic cache), else
    transformers' `DynamicCache` for the model (sliding-window layers keep only their window)."""
    if any(c is not None and c.backend == "faiss" for c in configs):
        from ..cache import KNNCache

        return KNNCache()
    return DynamicCache(config=model.config)


@torch.no_grad()
def answer(
    model: torch.nn.Module,
    tokenizer,
    ids: Sequence[int],
    config: KNNConfig | None,
    max_new_tokens: int,
    *,
    prefilled: Any = None,
) -> str:
    """Greedy answer to prompt `ids` with `config` (None: dense), up to `max_new_tokens` or EOS.
    `prefilled`, a cache holding all prompt tokens but the last, skips the prefill (its attention is
    whatever filled it); it is used up."""
    _use(model, config)
    device = next(model.parameters()).device
    prompt = torch.tensor([list(ids)], device=device)
    cache = prefilled if prefilled is not None else _cache([config], model)
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        cache=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


def prefill_dense(model: torch.nn.Module, ids: Sequence[int], configs: Sequence[KNNConfig | None]) -> Any:
    """A cache holding prompt `ids` but its last token, filled by the dense model: `answer` then
    decodes from it, so only reading the context back is kNN."""
    prompt = torch.tensor([list(ids)], device=next(model.parameters()).device)
    return prefill(model, prompt, len(ids) - 1, None, cache=_cache(configs, model))[1]


@dataclass(frozen=True)
class Grid:
    """Context lengths x needle depths x trials per cell; a prompt's seed is (seed, length, depth, trial)."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")

    def prompts(self) -> list[tuple[int, float, int, str]]:
        """(length, depth, trial, seed string) of every prompt, shortest lengths first."""
        return [
            (n, d, t, f"{self.seed}/{n}/{d}/{t}")
            for n in sorted(self.lengths)
            for d in self.depths
            for t in range(self.trials)
        ]


def check_lengths(model: torch.nn.Module, grid: Grid) -> None:
    """Fail, naming the fix, when the grid's longest prompt exceeds the model's positions."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max(grid.lengths) > positions:
        raise ValueError(
            f"length {max(grid.lengths)} exceeds the model's {positions} positions; lower --lengths."
        )


def run_needle(
    model: torch.nn.Module,
    tokenizer,
    haystacks: Sequence[tuple[str, Sequence[int]]],
    configs: Sequence[KNNConfig],
    grid: Grid,
    task: NeedleTask,
    *,
    dense_prefill: bool = False,
    max_new_tokens: int | None = None,
    use_chat: bool = True,
    progress: bool = True,
    on_prompt: Callable[[dict[str, Any]], None] | None = None,
    resume_from: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Answer every prompt of `grid` with dense and with each config, on the same prompts.

    `haystacks`: (name, token ids) documents, each long enough for the longest length; a prompt takes
    its haystack from one drawn by its seed. With `dense_prefill`, each prompt is prefilled once
    by the dense model and every setting decodes from a copy of that cache; otherwise each setting
    prefills with its own attention (faiss through a `KNNCache`). `on_prompt(partial_result)` is
    called after each prompt; `resume_from`, such a partial result of the same run, skips its
    prompts. The model is left as it was found (patched or not).
    """
    check_lengths(model, grid)
    longest = max(len(ids) for _, ids in haystacks) if haystacks else 0
    if longest < max(grid.lengths) + SNAP_TOKENS:
        raise ValueError(
            f"The longest haystack document has {longest} tokens; the longest length needs "
            f"{max(grid.lengths) + SNAP_TOKENS}. Use a longer corpus (--dataset) or lower --lengths."
        )
    names = [DENSE] + [setting_name(c) for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"Settings must differ: {names}")
    budget = max_new_tokens or new_tokens_budget(task)
    run = {
        "task": asdict(task),
        "grid": {
            "lengths": list(grid.lengths),
            "depths": list(grid.depths),
            "trials": grid.trials,
            "seed": grid.seed,
        },
        "settings": names,
        "dense_prefill": dense_prefill,
        "max_new_tokens": budget,
        "chat_template": use_chat,
    }
    records = _check_resume(resume_from, run)
    done = {(r["length"], r["depth"], r["trial"]) for r in records}
    seconds = dict.fromkeys(names, 0.0)
    if resume_from is not None:
        seconds.update(resume_from.get("seconds", {}))
    prefill_seconds = resume_from.get("shared_prefill_seconds", 0.0) if resume_from else 0.0
    todo = [p for p in grid.prompts() if p[:3] not in done]
    template = _template(tokenizer, task, use_chat)
    before = get_config(model)
    all_configs: list[KNNConfig | None] = [None, *configs]
    try:
        with tqdm(
            total=len(todo) * len(names), desc="needle answers", unit="ans", disable=not progress
        ) as bar:
            for length, depth, trial, seed in todo:
                rng = random.Random(seed)
                hay_name, hay = haystacks[rng.randrange(len(haystacks))]
                prompt = build_prompt(tokenizer, hay, length, depth, task, rng, use_chat=use_chat)
                shared = None
                if dense_prefill:
                    start = time.perf_counter()
                    shared = prefill_dense(model, prompt["input_ids"], all_configs)
                    prefill_seconds += time.perf_counter() - start
                distractors = [n["value"] for n in prompt["needles"] if not n["asked"]]
                answers = {}
                for name, config in zip(names, all_configs, strict=True):
                    bar.set_postfix_str(f"{length} tokens, {name}")
                    start = time.perf_counter()
                    text = answer(
                        model,
                        tokenizer,
                        prompt["input_ids"],
                        config,
                        budget,
                        prefilled=copy.deepcopy(shared) if shared is not None else None,
                    )
                    took = time.perf_counter() - start
                    seconds[name] += took
                    answers[name] = {
                        "text": text,
                        **score(text, prompt["expected"], distractors),
                        "seconds": took,
                    }
                    bar.update(1)
                records.append(
                    {
                        "length": length,
                        "depth": depth,
                        "trial": trial,
                        "seed": seed,
                        "haystack": hay_name,
                        "haystack_start": prompt["haystack_start"],
                        "haystack_tokens": prompt["haystack_tokens"],
                        "needles": prompt["needles"],
                        "keys": prompt["keys"],
                        "expected": prompt["expected"],
                        "answers": answers,
                    }
                )
                if on_prompt is not None:
                    on_prompt(_result(records, run, configs, seconds, prefill_seconds, template))
    finally:
        _use(model, before)
    return _result(records, run, configs, seconds, prefill_seconds, template)


def _template(tokenizer, task: NeedleTask, use_chat: bool) -> dict[str, Any]:
    """The wrapping every prompt of the run shares (its keys vary): say which template was used."""
    t = PromptTemplate.for_tokenizer(tokenizer, task.value_type, ["{key}"], use_chat)
    return {"chat": t.chat, "head": t.head, "tail": t.tail}


def _check_resume(partial: dict[str, Any] | None, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished prompts of `partial`, after checking it is this same run."""
    if partial is None:
        return []
    changed = [
        f"{key}: saved {partial.get(key)}, now {value}"
        for key, value in run.items()
        if partial.get(key) != value
    ]
    if changed:
        raise ValueError(
            f"Cannot resume, the saved run differs ({'; '.join(changed)}); use the same arguments."
        )
    return list(partial["prompts"])


def _summary(
    records: Sequence[dict[str, Any]], name: str, key: Callable[[dict], Any]
) -> dict[Any, dict[str, Any]]:
    """Accuracy of setting `name` per group of prompts (`key`), with its Wilson 95% interval, the
    strict accuracy (no distractor's value in the answer) and RULER's partial score (the share of
    values found)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r["answers"][name])
    out = {}
    for group, answers in sorted(groups.items()):
        correct = sum(a["correct"] for a in answers)
        low, high = wilson(correct, len(answers))
        out[group] = {
            "prompts": len(answers),
            "correct": correct,
            "accuracy": correct / len(answers),
            "ci95": [low, high],
            "strict_accuracy": sum(a.get("strict", a["correct"]) for a in answers) / len(answers),
            "score": sum(a["score"] for a in answers) / len(answers),
        }
    return out


def _result(
    records: list[dict[str, Any]],
    run: dict[str, Any],
    configs: Sequence[KNNConfig],
    seconds: Mapping[str, float],
    prefill_seconds: float,
    template: dict[str, Any],
) -> dict[str, Any]:
    lengths = run["grid"]["lengths"]
    settings = [{"name": DENSE, "config": None}] + [
        {"name": setting_name(c), "config": c.to_dict()} for c in configs
    ]
    for s, c in zip(settings, [None, *configs], strict=True):
        s["keys_read"] = {str(n): keys_read(c, n) for n in lengths}
        s["keys_percent"] = {str(n): 100 * keys_read(c, n) / n for n in lengths}
    dense = _summary(records, DENSE, lambda r: r["length"])
    summary = {}
    for s in settings:
        name = s["name"]
        overall = _summary(records, name, lambda r: "all").get("all")
        summary[name] = {
            "by_length": {str(n): v for n, v in _summary(records, name, lambda r: r["length"]).items()},
            "by_length_depth": {
                f"{n}/{d}": v
                for (n, d), v in _summary(records, name, lambda r: (r["length"], r["depth"])).items()
            },
            "all": overall,
            # accuracy kept, per length: the "share of dense accuracy"
            "of_dense": {
                str(n): (v["accuracy"] / dense[n]["accuracy"] if dense[n]["accuracy"] else None)
                for n, v in _summary(records, name, lambda r: r["length"]).items()
            },
            "seconds": seconds[name],
        }
    records = sorted(records, key=lambda r: (r["length"], r["depth"], r["trial"]))
    return {
        **run,
        "template": template,
        "settings_detail": settings,
        "summary": summary,
        "shared_prefill_seconds": prefill_seconds,
        "seconds": dict(seconds),
        "prompts": records,
    }


def _cell(v: Mapping[str, Any] | None) -> str:
    if v is None:
        return "-"
    low, high = v["ci95"]
    return f"{100 * v['accuracy']:.0f}% [{100 * low:.0f}-{100 * high:.0f}]"


def print_report(result: dict[str, Any], title: str, console: Console | None = None) -> None:
    """Accuracy (all values found) per length per setting, with Wilson 95% intervals in brackets, the
    keys read at the longest length, the strict accuracy over all prompts (no distractor's value in
    the answer either), and seconds."""
    lengths = [str(n) for n in sorted(result["grid"]["lengths"])]
    longest = lengths[-1]
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    table.add_column("setting", no_wrap=True)
    table.add_column(f"keys % at {longest}", justify="right", no_wrap=True)
    for n in lengths:
        table.add_column(f"{n} tokens", justify="right", no_wrap=True)
    table.add_column("all", justify="right", no_wrap=True)
    table.add_column("strict", justify="right", no_wrap=True)
    table.add_column("seconds", justify="right", no_wrap=True)
    for s in result["settings_detail"]:
        summary = result["summary"][s["name"]]
        table.add_row(
            s["name"],
            f"{s['keys_percent'][longest]:.1f}",
            *(_cell(summary["by_length"].get(n)) for n in lengths),
            _cell(summary["all"]),
            f"{100 * summary['all']['strict_accuracy']:.0f}%" if summary["all"] else "-",
            f"{summary['seconds']:.0f}",
        )
    (console or Console(width=max(Console().width, 160))).print(table)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.,-]+", "_", name).strip("_")


def write_report(result: dict[str, Any], out_dir: str | Path, name: str = "needle") -> dict[str, Path]:
    """`<name>.json`, a heatmap per setting (`<name>_<setting>.png`: accuracy by depth and length)
    and `<name>_keys.png` (accuracy against the share of keys read, one marker per length), each
    written atomically."""
    plt = pyplot("needle")

    out = Path(out_dir)
    paths = {"json": write_json_atomic(out / f"{name}.json", result)}
    lengths = sorted(result["grid"]["lengths"])
    depths = sorted(result["grid"]["depths"])
    for s in result["settings_detail"]:
        cells = result["summary"][s["name"]]["by_length_depth"]
        grid = [[cells.get(f"{n}/{d}", {}).get("accuracy", math.nan) for n in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.5 * len(depths)))
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(s["name"], fontsize=9)
        fig.colorbar(image, ax=ax, label="accuracy")
        key = f"heatmap {s['name']}"
        paths[key] = atomic_write(
            out / f"{name}_{_slug(s['name'])}.png",
            lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"),
        )
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = "os^Dvp*h"
    curves: dict[str, list[tuple[float, float, int]]] = {}
    for s in result["settings_detail"]:
        label = DENSE if s["config"] is None else _label(s["config"], with_k=False)
        for n in lengths:
            v = result["summary"][s["name"]]["by_length"].get(str(n))
            if v is not None:
                curves.setdefault(label, []).append((s["keys_percent"][str(n)], v["accuracy"], n))
    for c, (label, points) in enumerate(sorted(curves.items())):
        color = f"C{c}"
        for j, n in enumerate(lengths):
            line = sorted((x, y) for x, y, m in points if m == n)
            ax.plot(
                [x for x, _ in line],
                [y for _, y in line],
                marker=markers[j % len(markers)],
                color=color,
                label=label if j == 0 else None,
            )
    for j, n in enumerate(lengths):
        ax.plot([], [], markers[j % len(markers)], color="gray", label=f"{n} tokens")
    ax.set_xscale("log")
    ax.set_xlabel("keys read per query (% of the context)")
    ax.set_ylabel("accuracy (all values found)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    paths["keys plot"] = atomic_write(
        out / f"{name}_keys.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    )
    plt.close(fig)
    return paths
