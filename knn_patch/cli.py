"""`knn-patch` command line: `demo`, `eval` (dense against kNN perplexity), `frontier` (perplexity
against the share of keys read, per method), `calibrate` (a k per layer for a key budget),
`needle` (retrieval), `report`, `finetune`, `approx`
(how well the estimators approximate attention), `bench` (`bench generate`: whole-model
generation), `faiss-bench`, `prepare`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState

from .assets import bundled_corpus_dir
from .config import KNNConfig
from .eval.data import load_documents, tokenize_documents
from .eval.evaluation import (
    ensure_writable,
    environment,
    evaluate_perplexity,
    print_report,
    setting_name,
    write_report,
)
from .io import write_json_atomic
from .kernels.select import extension_available
from .loading import load_model, load_tokenizer
from .patcher import UnsupportedModelError
from .train.training import add_arguments as add_finetune_arguments
from .train.training import run_from_args as finetune


def _partial(path: Path, resume: bool) -> tuple[Path, dict | None]:
    """A run's partial-result file (its finished work so far, if it is stopped) and, with
    `--resume`, what it holds; resuming without one is an error naming the fix."""
    if not resume:
        return path, None
    if not path.exists():
        raise FileNotFoundError(f"--resume: there is no {path} to continue; run without --resume.")
    return path, json.loads(path.read_text())


def _saver(partial: Path, args: argparse.Namespace) -> Callable[[dict], None]:
    """Save a result so far, atomically, with the run's arguments: what `--resume` continues."""
    return lambda so_far: write_json_atomic(partial, {**so_far, "args": vars(args), "complete": False})


def _finished(partial: Path, out: Path, paths: dict[str, Path]) -> None:
    """Drop the partial file once the result is written, and say where it is."""
    partial.unlink(missing_ok=True)
    print(f"results in {out}/: {', '.join(str(p.relative_to(out)) for p in paths.values())}")


def _documents(
    args: argparse.Namespace,
    tokenizer,
    *,
    min_tokens: int,
    max_tokens: int | None = None,
    join_to: int | None = None,
    max_docs: int | None = None,
):
    """The run's documents (`--dataset` and its options), tokenized and cut, the first `max_docs`
    of them, and the count of those skipped as short."""
    docs = load_documents(
        args.dataset,
        config=args.dataset_config,
        split=args.split,
        column=args.column,
        name_column=args.name_column,
    )
    docs, skipped = tokenize_documents(
        docs, tokenizer, min_tokens=min_tokens, max_tokens=max_tokens, join_to=join_to
    )
    if max_docs is not None:
        docs = docs.select(range(min(max_docs, len(docs))))
    return docs, skipped


def eval_(args: argparse.Namespace) -> dict:
    """Long-context perplexity of a model on a corpus, dense against kNN settings on the same windows.

    `demo` is this command with defaults for the embedded model on bundled speeches."""
    out = ensure_writable(args.out)  # fail before the long work, not after it
    if args.max_length < 1:
        raise ValueError(f"--max-length must be >= 1, got {args.max_length}.")
    stride = args.max_length if args.stride is None else args.stride  # 0 is an error, not "not given"
    if not 0 < stride <= args.max_length:
        raise ValueError(f"--stride must be in [1, --max-length={args.max_length}], got {stride}.")
    if args.join_to is not None and args.join_to < 2:
        raise ValueError(f"--join-to must be >= 2 tokens, got {args.join_to}.")
    configs = _settings(args)  # bad settings fail here, before the model loads
    state = PartialState(cpu=not torch.cuda.is_available())  # one process, or one of torchrun's
    model, tokenizer = load_model(args.model).to(state.device), load_tokenizer(args.model)
    docs, skipped = _documents(
        args,
        tokenizer,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        join_to=args.join_to,
        max_docs=args.max_docs,
    )
    partial, resume_from = _partial(out / "perplexity.partial.json", args.resume)
    result = evaluate_perplexity(
        model,
        list(zip(docs["name"], docs["input_ids"], strict=True)),
        configs,
        max_length=args.max_length,
        stride=stride,
        mode=args.mode,
        dense_prefill=args.dense_prefill,
        score_from=args.score_from,
        state=state,
        resume_from=resume_from,
        on_document=_saver(partial, args) if state.is_main_process else None,
    )
    result.update(skipped_documents=skipped, processes=state.num_processes, args=vars(args))
    result.update(environment=environment())
    if not state.is_main_process:  # only the main process reports and writes
        return result
    model_name = "embedded SmolLM2-135M-Instruct" if args.model == "default" else args.model
    print_report(
        result,
        f"{model_name} on {args.dataset}: {len(docs)} documents, {result['totals']['dense']['tokens']} "
        f"tokens scored, {args.mode}, max_length {args.max_length}",
    )
    paths = write_report(result, out)
    _finished(partial, out, paths)
    return result


def report(args: argparse.Namespace) -> None:
    """Print the table of a saved result (`perplexity.json`, `needle.json`, or the `.partial.json`
    of a stopped run)."""
    result = json.loads(Path(args.result).read_text())
    partial = not result.get("complete", True)
    if "prompts" in result:  # a needle run
        from .eval.needle import print_report as print_needles

        done = " (partial: the prompts finished so far)" if partial else ""
        print_needles(
            result, f"{args.result}: {result['task']['task']}, {len(result['prompts'])} prompts{done}"
        )
        return
    done = " (partial: the documents finished so far)" if partial else ""
    if "rows" in result:  # a frontier run
        from .eval.frontier import print_frontier

        print_frontier(
            result, f"{args.result}: {len(result['documents'])} windows of {result['max_length']}{done}"
        )
        return
    print_report(result, f"{args.result}: {len(result['documents'])} documents, {result['mode']}{done}")


def frontier(args: argparse.Namespace) -> dict:
    """Perplexity relative to dense against the share of keys read, for each method at each budget,
    beside dense on the same windows: a table, frontier.json and frontier.png."""
    from .eval.frontier import CALIBRATED, METHODS, print_frontier, run_frontier, write_frontier

    out = ensure_writable(args.out)  # fail before the long work, not after it
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown --methods {unknown}; choose from {', '.join(METHODS)}.")
    if args.calibration_docs < 1:
        raise ValueError(f"--calibration-docs is a count of documents >= 1; got {args.calibration_docs}.")
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    # documents after the scored ones, never scored, to calibrate on
    held_out = args.calibration_docs if set(CALIBRATED) & set(args.methods) else 0
    docs, skipped = _documents(
        args,
        tokenizer,
        min_tokens=args.max_length,
        max_tokens=args.max_length,
        join_to=args.join_to,
        max_docs=args.max_docs + held_out,
    )
    calibration = None
    if held_out:
        if len(docs) <= held_out:
            raise ValueError(
                f"--methods {', '.join(CALIBRATED)} hold out --calibration-docs {held_out} documents of "
                f"{args.max_length} tokens to calibrate on, and {len(docs)} were found in all: add "
                "documents, lower --calibration-docs or lower --max-length."
            )
        calibration = docs.select(range(len(docs) - held_out, len(docs)))
        docs = docs.select(range(len(docs) - held_out))
    partial, resume_from = _partial(out / "frontier.partial.json", args.resume)
    result = run_frontier(
        model,
        list(zip(docs["name"], docs["input_ids"], strict=True)),
        max_length=args.max_length,
        budgets=args.budgets,
        methods=args.methods,
        on_document=_saver(partial, args),
        resume_from=resume_from,
        calibration_texts=None if calibration is None else calibration["input_ids"],
    )
    result.update(skipped_documents=skipped, args=vars(args), environment=environment())
    if calibration is not None:
        result["calibration_documents"] = list(calibration["name"])
    model_name = "embedded SmolLM2-135M-Instruct" if args.model == "default" else args.model
    title = f"{model_name} on {args.dataset}: {len(docs)} windows of {args.max_length} tokens"
    print_frontier(result, title)
    paths = write_frontier(result, out, title)
    _finished(partial, out, paths)
    return result


def calibrate(args: argparse.Namespace) -> dict:
    """Fit a k per layer to a key budget on one calibration text: a table, calibration.json and a
    settings.yaml for `eval --settings` and `needle --settings`."""
    from . import calibration

    calibration.check_budget(args.budget)
    if args.tokens < 2 or args.document < 0 or args.documents < 1 or args.queries < 1:
        raise ValueError(
            f"--tokens >= 2, --document >= 0, --documents >= 1 and --queries >= 1; got {args.tokens}, "
            f"{args.document}, {args.documents} and {args.queries}."
        )
    samples = {"samples": args.samples} if args.samples else {}  # none: the base's options unchanged
    base = calibration.BASE.replace(
        sink_tokens=args.sink_tokens,
        local_window=args.local_window,
        layer_k=args.layer_k,
        backend_options={**calibration.BASE.backend_options, **samples},
    )
    out = ensure_writable(args.out)  # fail before the long work, not after it
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    last = args.document + args.documents
    docs, _ = _documents(args, tokenizer, min_tokens=args.tokens, max_tokens=args.tokens, max_docs=last)
    if len(docs) < last:
        raise ValueError(
            f"--document {args.document} --documents {args.documents} ask for documents up to number {last} "
            f"of at least {args.tokens} tokens, and {len(docs)} were found: lower --tokens, --document or "
            "--documents."
        )
    docs = docs.select(range(args.document, last))
    ids = torch.tensor(list(docs["input_ids"]))
    result = calibration.calibrate(model, ids, budget=args.budget, base=base, queries=args.queries)
    result.update(documents=list(docs["name"]), args=vars(args), environment=environment())
    calibration.print_calibration(result)
    paths = calibration.write_calibration(result, out)
    print(f"config: {result['config']}\nwrote {', '.join(str(p) for p in paths.values())}")
    return result


def needle(args: argparse.Namespace) -> dict:
    """Needle-in-a-haystack retrieval (RULER's NIAH tasks), dense against kNN settings on the same prompts."""
    from .eval.needle import SNAP_TOKENS, Grid, NeedleTask, check_lengths, run_needle
    from .eval.needle import print_report as print_needles
    from .eval.needle import write_report as write_needles

    out = ensure_writable(args.out)  # fail before the long work, not after it
    task = NeedleTask(args.task, args.needles, args.key_type, args.value_type)  # bad input fails here
    grid = Grid(tuple(args.lengths), tuple(args.depths), args.trials, args.seed)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    configs = _settings(args)
    partial, resume_from = _partial(out / "needle.partial.json", args.resume)
    model = load_model(args.model).to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model)
    check_lengths(model, grid)  # before tokenizing the haystacks
    need = max(grid.lengths) + 2 * SNAP_TOKENS
    docs, _ = _documents(args, tokenizer, min_tokens=need, join_to=need)
    if len(docs) == 0:
        raise ValueError(f"{args.dataset!r} holds fewer than {need} tokens, even joined; lower --lengths.")
    result = run_needle(
        model,
        tokenizer,
        list(zip(docs["name"], docs["input_ids"], strict=True)),
        configs,
        grid,
        task,
        dense_prefill=args.dense_prefill,
        max_new_tokens=args.max_new_tokens,
        use_chat=not args.no_chat_template,
        resume_from=resume_from,
        on_prompt=_saver(partial, args),
    )
    result.update(model=args.model, dataset=args.dataset, args=vars(args), environment=environment())
    prefill = "dense prefill, kNN decode" if args.dense_prefill else "kNN prefill and decode"
    print_needles(
        result,
        f"{args.model} needles: {args.task}, {len(result['prompts'])} prompts ({grid.trials} per length and "
        f"depth), {prefill}; accuracy [Wilson 95%]",
    )
    paths = write_needles(result, out)
    _finished(partial, out, paths)
    return result


def _long_document(tokenizer, n_tokens: int) -> tuple[str, list[int]]:
    """The first bundled speech (by file name) with at least `n_tokens` tokens, cut to that length."""
    docs, _ = tokenize_documents(load_documents(), tokenizer, min_tokens=n_tokens, max_tokens=n_tokens)
    if len(docs) == 0:
        raise ValueError(f"No bundled document has {n_tokens} tokens.")
    return docs[0]["name"], docs[0]["input_ids"]


def approx(args: argparse.Namespace) -> dict:
    """The approximation report: synthetic (paper), real activations, sampled gradients, quality."""
    from .bench import approximation

    out = ensure_writable(args.out)  # fail before the long work, not after it
    parts = [p.strip() for p in args.parts.split(",")]
    model = document = None
    if {"activations", "quality"} & set(parts):
        model, tokenizer = load_model(args.model), load_tokenizer(args.model)
        tokens = max(approximation.SIZES[args.size][p]["tokens"] for p in ("activations", "quality"))
        document = _long_document(tokenizer, max(tokens, args.tokens or 0))
    report = approximation.run_report(model, document, parts=parts, size=args.size, tokens=args.tokens)
    report.update(command="knn-patch " + " ".join(sys.argv[1:]), args=vars(args), environment=environment())
    approximation.print_tables(report)
    paths = approximation.write_outputs(report, out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return report


def prepare(_: argparse.Namespace) -> None:
    """Fetch and convert the embedded models and corpus, and build the compiled selection, once."""
    from .loading import EMBEDDED_MODELS, embedded_model_dir

    folders = [embedded_model_dir(name) for name in EMBEDDED_MODELS]
    compiled = "built" if extension_available() else "NOT built (torch.topk fallback)"
    print(
        f"models {', '.join(EMBEDDED_MODELS)} ready in {folders[0].parent}; "
        f"corpus at {bundled_corpus_dir()}; compiled top-k selection {compiled}"
    )


def _json_object(text: str) -> dict:
    """`--backend-options`: a JSON object; anything else fails with the expected form."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}); use an object like '{{\"m\": 16}}'") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; use an object like '{{\"m\": 16}}'")
    return value


def _layers(text: str) -> tuple[int, ...] | str:
    """`--layers`: comma-separated indices, or a rule KNNConfig knows ("all", "global")."""
    parts = [p.strip() for p in text.split(",")]
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else text.strip()


# What a --setting looks like, quoted in every error about one.
SETTING_EXAMPLE = "--setting 'faiss k=32 sink_tokens=4 local_window=64'"
# The KNNConfig fields that flags of their own set for every --k value and every --setting.
_SHARED_FIELDS = ("backend", "backend_options", "layers", "sink_tokens", "local_window", "chunk_size")


def _bad_setting(text: str, what: str) -> ValueError:
    return ValueError(f"--setting {text!r}: {what} (e.g. {SETTING_EXAMPLE})")


def _parse_setting(text: str) -> dict[str, Any]:
    """One `--setting`: an optional backend name, then `field=value` pairs of KNNConfig fields, each
    value a YAML scalar or flow collection ("k=sqrt", "layers=global", "layer_k={0: 256}",
    "backend_options={rest: mean}"); `layers` also takes comma-separated indices, as --layers does.
    Only the form is checked here; KNNConfig checks the values."""
    if not text.strip():
        raise _bad_setting(text, "it is empty")
    names = [f.name for f in dataclasses.fields(KNNConfig)]
    parts = re.split(r"\s+(?=\w+\s*=)", text.strip())  # a value may hold spaces: "layer_k={0: 256, 1: 64}"
    entry: dict[str, Any] = {}
    if "=" not in parts[0]:  # the backend's name
        if not re.fullmatch(r"[\w.+-]+", parts[0]):
            raise _bad_setting(text, f"{parts[0]!r} is neither a backend name nor field=value pairs")
        entry["backend"] = parts.pop(0)
    for part in parts:
        key, _, value = (x.strip() for x in part.partition("="))
        if key not in names:
            raise _bad_setting(text, f"{key!r} is not a KNNConfig field ({', '.join(names)})")
        if key in entry:
            raise _bad_setting(text, f"{key} is given twice")
        if not value:
            raise _bad_setting(text, f"{key}= has no value")
        try:
            entry[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "malformed"
            raise _bad_setting(text, f"{key}={value} is not a YAML value ({problem})") from err
        if key == "layers" and isinstance(entry[key], (str, int)) and not isinstance(entry[key], bool):
            entry[key] = _layers(str(entry[key]))
    return entry


def _settings(args: argparse.Namespace) -> list[KNNConfig]:
    """The kNN settings of an eval or a needle run, each validated (a bad one names itself) before
    anything loads, and distinct. From one of three sources:

    - the `--k` list: one setting per value, with the shared flags (--backend, --backend-options,
      --layers, --sink-tokens, --local-window, --chunk-size);
    - `--setting`, repeated: each starts from the shared flags and changes the fields it names; it
      replaces the --k list;
    - a `--settings` YAML file: each entry a whole KNNConfig (fields not given take KNNConfig's
      defaults); only --chunk-size applies to them. With --setting too, it is an error."""
    shared = {name: getattr(args, name) for name in _SHARED_FIELDS}
    if args.setting and args.settings is not None:
        raise ValueError(f"--setting and --settings both give the settings; use one, e.g. {SETTING_EXAMPLE}")
    if args.setting:
        configs = []
        for text in args.setting:
            fields = {**shared, **_parse_setting(text)}
            try:
                configs.append(KNNConfig(**fields))
            except ValueError as err:
                raise _bad_setting(text, str(err).rstrip(".")) from err
    elif args.settings is None:
        configs = [KNNConfig(**{**shared, "k": k.strip()}) for k in args.k.split(",")]
    else:
        configs = _settings_file(Path(args.settings), args.chunk_size)
    names = [setting_name(c) for c in configs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"The kNN settings must differ; given more than once: {', '.join(twice)}.")
    return configs


def _settings_file(path: Path, chunk_size: int) -> list[KNNConfig]:
    """The entries of a `--settings` YAML list, each a KNNConfig; unknown keys and bad values name
    the entry."""
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--settings {str(path)!r} cannot be read as YAML: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"--settings {str(path)!r} must hold a non-empty YAML list of KNNConfig fields, e.g. "
            "'- {k: 32, sink_tokens: 4, local_window: 64}'."
        )
    configs = []
    for i, entry in enumerate(entries):
        try:
            configs.append(KNNConfig.from_dict({"chunk_size": chunk_size, **entry}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"--settings {str(path)!r}, entry {i}: {err}") from err
    return configs


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """--model and the document source, shared by `eval` and `needle` (its haystacks)."""
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded SmolLM2-135M), 'gemma3-270m' (embedded, 32k positions), a local "
        "folder, a .gguf file or a hub id",
    )
    p.add_argument(
        "--dataset",
        default="bundled",
        help="'bundled', a .txt file or folder, a .jsonl or .parquet file, 'pg19' (deepmind/pg19) or any "
        "hub dataset name",
    )
    p.add_argument("--dataset-config", default=None, help="hub dataset config, e.g. wikitext-103-raw-v1")
    p.add_argument("--split", default="test", help="split of a hub dataset")
    p.add_argument("--column", default="text", help="text column of a .jsonl, .parquet or hub dataset")
    p.add_argument(
        "--name-column",
        default=None,
        help="column naming each document (default: the row index; short_book_title for pg19)",
    )


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(KNNConfig) if f.name == name)


def _field_help(name: str) -> str:
    """A `KNNConfig` field's help, the single source of what it means."""
    return _field(name).metadata["help"].replace("%", "%%")  # argparse formats help with %


def _field_default(name: str) -> Any:
    """A `KNNConfig` field's default, the single source of a flag's default that sets it."""
    f = _field(name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _settings_arguments(p: argparse.ArgumentParser, *, k: str) -> None:
    """The kNN settings run beside dense, shared by `eval` and `needle` (see `_settings`): `--k`
    values, or repeated `--setting`s, or a `--settings` YAML file. The flags of KNNConfig fields
    take their help and defaults from its fields."""
    p.add_argument(
        "--k",
        default=k,
        help=f"comma-separated k values, one kNN setting each, with the flags below. {_field_help('k')}",
    )
    p.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="SETTING",
        help="one whole kNN setting, repeatable, replacing the --k list: a backend name (optional), then "
        "KNNConfig fields as field=value, each value YAML: 'faiss k=32 sink_tokens=4 local_window=64', "
        "'k=sqrt layers=global layer_k={0: 256}', 'k=16 backend_options={rest: mean}'. Fields not named "
        "come from --backend, --backend-options, --layers, --sink-tokens, --local-window, --chunk-size",
    )
    p.add_argument("--backend", default=_field_default("backend"), help=_field_help("backend"))
    p.add_argument(
        "--backend-options",
        type=_json_object,
        default=_field_default("backend_options"),
        help=f"{_field_help('backend_options')} A JSON object, e.g. "
        '\'{"index": "ivf", "scan_fraction": 0.2}\' for faiss, \'{"rest": "mean"}\' for topk',
    )
    p.add_argument(
        "--sink-tokens", type=int, default=_field_default("sink_tokens"), help=_field_help("sink_tokens")
    )
    p.add_argument(
        "--local-window", type=int, default=_field_default("local_window"), help=_field_help("local_window")
    )
    p.add_argument(
        "--layers",
        type=_layers,
        default="all",
        help=f"{_field_help('layers')} Here: 'all', 'global' or comma-separated indices.",
    )
    p.add_argument(
        "--settings",
        default=None,
        metavar="YAML",
        help="a YAML list of KNNConfig fields, one kNN setting each, all run beside dense on the same "
        "inputs (e.g. evals/configs/long_context.yaml); replaces --k, --backend, --backend-options, "
        "--sink-tokens, --local-window and --layers (not --chunk-size); not with --setting",
    )
    p.add_argument(
        "--chunk-size", type=int, default=_field_default("chunk_size"), help=_field_help("chunk_size")
    )


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default where it has one its help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_, default = action.help or "", action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in help_:
            return help_
        if isinstance(default, tuple):  # as it is typed: "1024,2048"
            typed = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
            return f"{help_} (default: {typed})"
        return f"{help_} (default: %(default)s)"


def _eval_arguments(
    p: argparse.ArgumentParser, *, max_docs: int | None, min_tokens: int, max_tokens: int | None, out: str
) -> None:
    _model_arguments(p)
    p.add_argument(
        "--join-to",
        type=int,
        default=None,
        metavar="N",
        help="join consecutive documents (in order) into documents of >= N tokens, before --max-tokens "
        "cuts them; each name lists its parts and their token spans",
    )
    p.add_argument(
        "--max-docs", type=int, default=max_docs, help="the first N documents that pass --min-tokens"
    )
    p.add_argument(
        "--min-tokens", type=int, default=min_tokens, help="skip shorter documents (counted in the report)"
    )
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="cut longer documents")
    p.add_argument("--max-length", type=int, default=2048, help="window length")
    p.add_argument("--stride", type=int, default=None, help="window step (default: max-length)")
    p.add_argument(
        "--score-from",
        type=int,
        default=1,
        help="score only positions >= this in each document (context before)",
    )
    p.add_argument(
        "--mode", choices=("sliding", "decode"), default="sliding", help="see knn_patch.eval.evaluation"
    )
    p.add_argument(
        "--dense-prefill", action="store_true", help="decode mode: one dense prefill shared by all settings"
    )
    _settings_arguments(p, k="16,64,sqrt,n^0.125")
    p.add_argument(
        "--resume", action="store_true", help="continue a stopped run from OUT/perplexity.partial.json"
    )
    p.add_argument(
        "--out", default=out, help="folder for perplexity.json, perplexity.png and evaluate records"
    )
    p.set_defaults(func=eval_)


def _comma_list(cast: type) -> Callable[[str], tuple]:
    """An argparse type: comma-separated values of `cast`, e.g. "1024,2048" or "0,0.5,1"."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(p.strip()) for p in text.split(",") if p.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {cast.__name__}"
            ) from err

    return parse


def _frontier_arguments(p: argparse.ArgumentParser) -> None:
    from .eval.frontier import METHODS

    _model_arguments(p)
    p.add_argument("--max-length", type=int, default=4096, help="window length n: one window per document")
    p.add_argument(
        "--max-docs",
        type=int,
        default=3,
        help="the first N documents of at least max-length tokens (`calibrated` calibrates on the next ones)",
    )
    p.add_argument(
        "--calibration-docs",
        type=int,
        default=1,
        help="the calibrated methods fit on this many documents after the scored ones, pooled",
    )
    p.add_argument(
        "--join-to",
        type=int,
        default=None,
        metavar="N",
        help="join consecutive documents into documents of >= N tokens first (for corpora of short texts)",
    )
    p.add_argument(
        "--budgets",
        type=_comma_list(float),
        default=(0.5, 1.0, 2.0, 4.0),
        help="keys read per query as a share of n, in %%, averaged over layers (comma-separated)",
    )
    p.add_argument(
        "--methods",
        type=_comma_list(str),
        default=("topk", "topk+mean", "topk+mean+first", "tail"),
        help=f"comma-separated, from {', '.join(METHODS)} (see knn_patch.eval.frontier)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue a stopped run from OUT/frontier.partial.json"
    )
    p.add_argument("--out", default="outputs/frontier", help="folder for frontier.json and frontier.png")
    p.set_defaults(func=frontier)


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    from .calibration import BASE

    _model_arguments(p)
    p.add_argument(
        "--budget", type=float, default=2.0, help="keys read per query, in %% of n, averaged over layers"
    )
    p.add_argument(
        "--tokens", type=int, default=4096, help="calibration text length n: the context length to fit"
    )
    p.add_argument(
        "--document", type=int, default=0, help="which document of at least --tokens tokens (0: the first)"
    )
    p.add_argument(
        "--documents", type=int, default=1, help="fit on this many documents from --document on, pooled"
    )
    p.add_argument("--queries", type=int, default=1024, help="the text's last N queries are measured")
    p.add_argument("--sink-tokens", type=int, default=BASE.sink_tokens, help=_field_help("sink_tokens"))
    p.add_argument("--local-window", type=int, default=BASE.local_window, help=_field_help("local_window"))
    p.add_argument(
        "--layer-k",
        type=yaml.safe_load,
        default={},
        help="floors, the least k of some layers, as YAML: '{0: n^0.67}' keeps layer 0 at n^0.67 or more",
    )
    p.add_argument(
        "--samples",
        type=yaml.safe_load,
        default=0,
        help="uniform samples of the rest per query that correct its mean, counted in the budget, as YAML: "
        "an int for every layer or '{0: 32}' for layer 0 only (it pays where attention is flat)",
    )
    p.add_argument("--out", default="outputs/calibrate", help="folder for calibration.json and settings.yaml")
    p.set_defaults(func=calibrate)


def _needle_arguments(p: argparse.ArgumentParser) -> None:
    from .eval.needle import KINDS, TASKS

    _model_arguments(p)
    p.add_argument(
        "--task", choices=TASKS, default="multikey", help="RULER's NIAH tasks (knn_patch.eval.needle)"
    )
    p.add_argument(
        "--needles",
        type=int,
        default=None,
        help="multikey: all needles, 1 asked (default 4); multivalue: values of the key; "
        "multiquery: keys asked",
    )
    p.add_argument("--key-type", choices=KINDS, default="words", help="what the needles' keys are")
    p.add_argument("--value-type", choices=KINDS, default="numbers", help="what the needles' values are")
    p.add_argument("--lengths", type=_comma_list(int), default=(1024, 2048), help="prompt lengths in tokens")
    p.add_argument(
        "--depths", type=_comma_list(float), default=(0.0, 0.25, 0.5, 0.75, 1.0), help="needle depths"
    )
    p.add_argument("--trials", type=int, default=4, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0, help="seed of the needles, their keys and values")
    p.add_argument("--max-new-tokens", type=int, default=None, help="decode budget (default: from the task)")
    p.add_argument(
        "--dense-prefill",
        action="store_true",
        help="prefill each prompt once with dense attention; the kNN settings only decode from it",
    )
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="plain prompts even where the tokenizer has a chat template",
    )
    _settings_arguments(p, k="32,128")
    p.add_argument(
        "--resume", action="store_true", help="continue a stopped run from OUT/needle.partial.json"
    )
    p.add_argument("--out", default="outputs/needle", help="folder for needle.json and the plots")
    p.set_defaults(func=needle)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input (a config, a path, a value, a model family) ends a command with one line naming the
    fix instead of a traceback; `KNN_PATCH_DEBUG=1` shows the traceback."""
    try:
        yield
    except (ValueError, OSError, UnsupportedModelError) as err:
        if os.environ.get("KNN_PATCH_DEBUG"):
            raise
        sys.exit(f"knn-patch: error: {err}")


def run() -> None:
    """The `knn-patch` console command: `main` with one-line errors for bad input."""
    with user_errors():
        main()


def build_parser() -> argparse.ArgumentParser:
    """The `knn-patch` parser; `bench` and `faiss-bench` parse their own options (`main`)."""
    parser = argparse.ArgumentParser(prog="knn-patch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, formatter_class=_HelpFormatter)

    p = add("demo", help="the eval command on the embedded model and bundled speeches")
    _eval_arguments(p, max_docs=12, min_tokens=2048, max_tokens=2048, out="outputs/demo")
    p = add("eval", help=eval_.__doc__.splitlines()[0])
    _eval_arguments(p, max_docs=None, min_tokens=2, max_tokens=None, out="outputs/eval")
    p = add("frontier", help=frontier.__doc__.splitlines()[0])
    _frontier_arguments(p)
    p = add("calibrate", help=calibrate.__doc__.splitlines()[0])
    _calibrate_arguments(p)
    p = add("needle", help=needle.__doc__)
    _needle_arguments(p)
    p = add("report", help=report.__doc__)
    p.add_argument("result", help="a perplexity.json, needle.json or their .partial.json")
    p.set_defaults(func=report)
    p = add("finetune", help="fine-tune under kNN attention from a recipe YAML (recipes/configs)")
    p.set_defaults(func=finetune)
    add_finetune_arguments(p)
    p = add("approx", help=approx.__doc__)
    p.add_argument(
        "--parts",
        default="synthetic,activations,gradients,quality",
        help="comma-separated parts: synthetic (the paper's), activations (real ones), gradients "
        "(sampled), quality",
    )
    p.add_argument("--size", choices=("default", "quick"), default="default", help="quick: a smoke run")
    p.add_argument("--model", default="default", help="the model of parts 2 and 4 (as for eval)")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="part 2's document length (longer than a sliding window to see it)",
    )
    p.add_argument("--out", default="outputs/approx", help="folder for the report's JSON, tables and plots")
    p.set_defaults(func=approx)
    p = add("prepare", help=prepare.__doc__)
    p.set_defaults(func=prepare)
    sub.add_parser(
        "bench",
        help="attention kernel speed and memory against SDPA and eager; `bench generate`: whole-model "
        "prefill and decode speed and memory, dense against faiss and topk",
    )
    sub.add_parser("faiss-bench", help="faiss backend: full-sequence growth, KNNCache decode, recall")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "generate"]:  # `knn-patch bench generate --help`
        from .bench.generate import main as generate_main

        generate_main(argv[2:])
        return None
    if argv[:1] == ["bench"]:  # its options are its own: `knn-patch bench --help`
        from .bench.kernel import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["faiss-bench"]:  # `knn-patch faiss-bench --help`
        from .bench.faiss import main as faiss_bench_main

        return faiss_bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    run()
