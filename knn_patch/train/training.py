"""Fine-tuning under kNN attention with Accelerate, on one process or many (DDP, FSDP), CPU or GPU.

`finetune(config)` runs a whole recipe: load and patch the model (optionally LoRA), tokenise and
pack the data, train with AdamW and warmup + cosine, evaluate kNN and dense validation perplexity
of the same weights before, during and after, checkpoint, and save a model that
`knn_patch.from_pretrained` brings back patched.

    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/finetune.py --config CONFIG
    torchrun --standalone --nproc_per_node 2 recipes/finetune.py --config CONFIG   # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, get_cosine_schedule_with_warmup
from transformers.pytorch_utils import Conv1D

from ..config import KNNConfig
from ..eval.evaluation import ensure_writable, environment, evaluate_perplexity, setting_name
from ..extras import pyplot, require
from ..io import atomic_dir, atomic_write, write_json_atomic
from ..loading import load_model, load_tokenizer
from ..patcher import attention_modules, patch
from .checkpoints import STATE_FILE, complete_checkpoints, latest_checkpoint, read_state, save_checkpoint
from .data import TrainingData, prepare_data
from .loss import causal_lm_nll
from .recipe_config import ModelSection, RecipeConfig, load_recipe

Console = require("rich.console", "fine-tuning").Console
Table = require("rich.table", "fine-tuning").Table

# ---------------------------------------------------------------- setup


def check_device(config: RecipeConfig) -> bool:
    """Whether the run is on CPU; refuses fp16 there, which Accelerate would silently run as fp32."""
    cpu = config.train.cpu or not torch.cuda.is_available()
    if cpu and config.train.mixed_precision == "fp16":
        raise ValueError(
            "train.mixed_precision='fp16' needs a GPU: on CPU Accelerate silently ignores it and trains in "
            "fp32. Use 'bf16' (autocast works on CPU) or 'no'."
        )
    return cpu


def build_model(section: ModelSection, tokenizer) -> PreTrainedModel:
    """A pretrained model by name, or a random one from `from_config` sized to the tokenizer."""
    dtype = getattr(torch, section.dtype)
    if section.from_config is None:
        return load_model(section.name, dtype=dtype)
    fields = dict(section.from_config)
    fields.setdefault("vocab_size", len(tokenizer))
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def check_positions(model: PreTrainedModel, config: RecipeConfig) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    for key, length in (
        ("data.block_size", config.data.block_size),
        ("eval.max_length", config.eval_max_length),
    ):
        if positions is not None and length > positions:
            raise ValueError(f"{key}={length} exceeds the model's {positions} positions; lower it.")


def lora_targets(model: PreTrainedModel) -> tuple[list[str], bool]:
    """The linear projections inside the model's attention modules (full module names, so GPT-2's MLP
    `c_proj` is not caught with its attention `c_proj`), and whether they are GPT-2 style Conv1D
    layers, which store weights transposed and need peft's `fan_in_fan_out=True`."""
    attention = {id(m) for _, m in attention_modules(model)}
    names, conv1d = [], False
    for name, module in model.named_modules():
        if id(module) not in attention:
            continue
        for child_name, child in module.named_children():
            if isinstance(child, (torch.nn.Linear, Conv1D)):
                names.append(f"{name}.{child_name}")
                conv1d = conv1d or isinstance(child, Conv1D)
    return names, conv1d


def apply_lora(model: PreTrainedModel, config: RecipeConfig) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft); only the adapters train. Patch state stays on the base."""
    peft = require("peft", "LoRA fine-tuning")
    lora = config.lora
    if lora.target_modules is None:
        targets, fan_in_fan_out = lora_targets(model)
    else:
        targets = lora.target_modules
        fan_in_fan_out = any(
            isinstance(m, Conv1D) and name.split(".")[-1] in targets for name, m in model.named_modules()
        )
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, peft_config)


def validation_perplexity(
    model: torch.nn.Module, validation: list, knn: KNNConfig, config: RecipeConfig
) -> dict[str, float]:
    """kNN and dense perplexity of the same weights on the same held-out tokens (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        result = evaluate_perplexity(
            model,
            validation,
            [knn],
            max_length=config.eval_max_length,
            stride=config.eval.stride or config.eval_max_length,
            progress=False,
            state=PartialState(),
        )
    finally:
        model.train(was_training)
    totals = result["totals"]
    return {
        "knn_perplexity": totals[setting_name(knn)]["perplexity"],
        "dense_perplexity": totals["dense"]["perplexity"],
        "tokens": totals["dense"]["tokens"],
    }


# ---------------------------------------------------------------- logs and outputs


class JsonlLog:
    """One JSON record per line (train steps and evaluations), written by the main process only.

    On resume, records after the checkpoint's step (written before the crash) are dropped, so the
    log is the history of the run that made the final model.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def start(self, keep_until_step: int | None) -> None:
        if not self.enabled:
            return
        kept = []
        if keep_until_step is not None and self.path.exists():
            records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in records if r["step"] <= keep_until_step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted scalar keys, as TensorBoard's hparams need."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def save_final(accelerator: Accelerator, model: torch.nn.Module, tokenizer, config: RecipeConfig) -> dict:
    """Save the trained model with its kNN config (`knn_attention` in config.json). For LoRA: the adapter
    in `adapter/` and, if `lora.merge`, the merged model in `model/`; else the full model in `model/`."""
    out = Path(config.output.dir)
    unwrapped = accelerator.unwrap_model(model)
    state_dict = None if config.lora.enabled else accelerator.get_state_dict(model)  # gathers under FSDP
    paths = {}
    if accelerator.is_main_process:

        def save(folder_model: torch.nn.Module, **kwargs) -> Callable[[Path], None]:
            return lambda tmp: (folder_model.save_pretrained(tmp, **kwargs), tokenizer.save_pretrained(tmp))

        if config.lora.enabled:
            paths["adapter"] = atomic_dir(out / "adapter", save(unwrapped))
            if config.lora.merge:
                paths["model"] = atomic_dir(out / "model", save(unwrapped.merge_and_unload()))
        else:
            paths["model"] = atomic_dir(out / "model", save(unwrapped, state_dict=state_dict))
    accelerator.wait_for_everyone()
    return {k: str(v) for k, v in paths.items()}


def print_summary(result: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title=f"validation perplexity, {result['validation_tokens']} held-out tokens")
    for col in ("when", "step", "kNN", "dense", "kNN / dense"):
        table.add_column(col, justify="left" if col == "when" else "right")
    for when in ("before", "after"):
        r = result[when]
        ratio = r["knn_perplexity"] / r["dense_perplexity"]
        table.add_row(
            when,
            str(r["step"]),
            f"{r['knn_perplexity']:.3f}",
            f"{r['dense_perplexity']:.3f}",
            f"{ratio:.3f}x",
        )
    (console or Console()).print(table)
    print(f"kNN-dense gap closed: {100 * result['gap_closed']:.1f}% (of the gap before training)")


def plot_history(log_path: Path, png: Path) -> None:
    plt = pyplot("fine-tuning")
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in train], [r["loss"] for r in train])
    a.set(xlabel="step", ylabel="training loss (kNN attention)")
    for key, label in (("knn_perplexity", "kNN"), ("dense_perplexity", "dense")):
        b.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=label)
    b.set(xlabel="step", ylabel="validation perplexity")
    b.legend()
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


# ---------------------------------------------------------------- the run


def finetune(config: RecipeConfig, *, resume: bool | str = False, progress: bool = True) -> dict[str, Any]:
    """Run a recipe; `resume=True` continues from the newest complete checkpoint of `output.dir`
    (a path: from that checkpoint or checkpoints folder). Returns the results also written to
    `output.dir/results.json`."""
    out = Path(config.output.dir)
    resume_from = _resume_point(out, resume)
    cpu = check_device(config)
    ensure_writable(out)
    if config.output.tensorboard:  # Accelerate's tracker needs it; fail before loading anything
        require("tensorboard", "fine-tuning with output.tensorboard")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the process count
        log_with="tensorboard" if config.output.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.train.seed),
    )
    try:
        return _train(accelerator, config, resume_from, progress)
    finally:
        accelerator.end_training()
        # Accelerator state is a per-process singleton; reset it so a later run may use other settings.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _resume_point(out: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), refusing to start afresh over an earlier run's."""
    checkpoints = out / "checkpoints"
    if resume:
        given = checkpoints if resume is True else Path(resume)
        return given if (given / STATE_FILE).is_file() else latest_checkpoint(given)
    if complete_checkpoints(checkpoints):
        raise FileExistsError(
            f"{str(out)!r} already holds checkpoints of a run: pass --resume to continue it, or set "
            "output.dir to a new folder."
        )
    return None


def _train(
    accelerator: Accelerator, config: RecipeConfig, resume_from: Path | None, progress: bool
) -> dict[str, Any]:
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name)
    with accelerator.main_process_first():  # the first process tokenises; the others read its cache
        data = prepare_data(
            config.data, tokenizer, seed=config.train.seed, eval_max_tokens=config.eval.max_tokens
        )
    run = _prepare_run(accelerator, config, _patched_model(config, tokenizer), data)
    _start(run, resume_from)
    if run.state["step"] == 0:
        _evaluate(run, 0)
    _train_loop(run, progress)
    _evaluate(run, run.state["step"])
    outputs = save_final(accelerator, run.model, tokenizer, config)
    result = _results(run, resume_from, outputs)
    if accelerator.is_main_process:
        _write_results(Path(config.output.dir), result)
    return result


@dataclass
class _Run:
    """What the training loop reads and updates. `state` is what a checkpoint saves besides the
    weights, optimizer, scheduler and RNG states: the step, the data position and the evaluations."""

    accelerator: Accelerator
    config: RecipeConfig
    model: torch.nn.Module  # as prepared by Accelerate (wrapped under DDP or FSDP)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader
    data: TrainingData
    log: JsonlLog
    state: dict[str, Any] = field(
        default_factory=lambda: {"step": 0, "epoch": 0, "batches_in_epoch": 0, "evaluations": []}
    )
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step


def _patched_model(config: RecipeConfig, tokenizer) -> torch.nn.Module:
    """The model to train: built, checked against the lengths it will see, patched, optionally with
    activation checkpointing and LoRA adapters, in train mode."""
    model = build_model(config.model, tokenizer)
    check_positions(model, config)
    patch(model, config.knn)
    if config.model.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.lora.enabled:
        model = apply_lora(model, config)
    model.train()
    return model


def _prepare_run(
    accelerator: Accelerator, config: RecipeConfig, model: torch.nn.Module, data: TrainingData
) -> _Run:
    """AdamW over the trainable parameters, warmup + cosine, shuffled full batches, all prepared by
    Accelerate; refuses data that cannot fill one batch."""
    train = config.train
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=train.lr, weight_decay=train.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, train.warmup_steps, train.max_steps)
    loader = torch.utils.data.DataLoader(
        data.blocks, batch_size=train.batch_size, shuffle=True, drop_last=True
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if len(loader) == 0:
        raise ValueError(
            f"{len(data.blocks)} training blocks cannot fill one batch of "
            f"train.batch_size={train.batch_size} on {accelerator.num_processes} processes; lower the "
            "batch size or block size, or add documents."
        )
    log = JsonlLog(Path(config.output.dir) / "log.jsonl", accelerator.is_main_process)
    return _Run(accelerator, config, model, optimizer, scheduler, loader, data, log)


def _start(run: _Run, resume_from: Path | None) -> None:
    """Load the checkpoint to resume from (if any), trim the log to it, save the config, start trackers."""
    accelerator, config, out = run.accelerator, run.config, Path(run.config.output.dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))  # weights, optimizer, scheduler, RNG of every process
        run.state = read_state(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {run.state['step']}")
    run.log.start(run.state["step"] if resume_from is not None else None)
    if accelerator.is_main_process:
        write_json_atomic(out / "config.json", config.to_dict())
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(config.to_dict())))
    accelerator.init_trackers("finetune", config=_flat(config.to_dict()))


def _evaluate(run: _Run, step: int) -> None:
    """Validation perplexity, kNN and dense, at `step`: into the state, the log, the trackers, the console."""
    model = run.accelerator.unwrap_model(run.model)
    record = {
        "kind": "eval",
        "step": step,
        **validation_perplexity(model, run.data.validation, run.config.knn, run.config),
    }
    run.state["evaluations"].append(record)
    run.log.write(record)
    run.accelerator.log({f"eval/{k}": record[k] for k in ("knn_perplexity", "dense_perplexity")}, step=step)
    run.accelerator.print(
        f"step {step}: validation perplexity kNN {record['knn_perplexity']:.3f}, "
        f"dense {record['dense_perplexity']:.3f}"
    )


# ---------------------------------------------------------------- the loop


def _train_loop(run: _Run, progress: bool) -> None:
    """Optimizer steps up to train.max_steps, from the state's step, epoch and batch: a resumed run
    goes on exactly where its checkpoint stopped."""
    train, state = run.config.train, run.state
    bar = tqdm(
        total=train.max_steps,
        initial=state["step"],
        desc="training",
        unit="step",
        disable=not (run.accelerator.is_main_process and progress),
    )
    losses: list[torch.Tensor] = []
    started = time.perf_counter()
    while state["step"] < train.max_steps:
        for batch in _rest_of_epoch(run):
            ids = batch["input_ids"]  # (B, block_size)
            loss, lr, grad_norm = _micro_step(run, ids)
            losses.append(loss)
            state["batches_in_epoch"] += 1
            if not run.accelerator.sync_gradients:
                continue  # accumulating: no optimizer step yet
            state["step"] += 1
            record = _step_record(run, losses, lr, grad_norm, ids.numel(), started)
            losses = []
            _after_step(run, record, bar)
            started = time.perf_counter()
            if state["step"] >= train.max_steps:
                break
    bar.close()


def _rest_of_epoch(run: _Run) -> Iterable[dict[str, torch.Tensor]]:
    """The batches of the current epoch not yet trained on (a new epoch once one is done), in the
    seeded order of seed + epoch."""
    state = run.state
    if state["batches_in_epoch"] >= len(run.loader):
        state["epoch"], state["batches_in_epoch"] = state["epoch"] + 1, 0
    run.loader.set_epoch(state["epoch"])
    skip = state["batches_in_epoch"]
    return run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader


def _micro_step(run: _Run, ids: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """Forward and backward of one batch; the optimizer and scheduler step when gradients sync (the
    last of `grad_accum` batches). Returns the loss, the learning rate used and the clipped norm."""
    accelerator, optimizer, max_norm = run.accelerator, run.optimizer, run.config.train.max_grad_norm
    with accelerator.accumulate(run.model):
        # transformers' mean token loss, from the hidden states in chunks: the (B, block, V)
        # logits and their gradient would outgrow the model at long blocks and large vocabularies
        nll, count = causal_lm_nll(run.model, ids)
        loss = nll / count
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients and max_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if accelerator.sync_gradients:
            run.scheduler.step()
        optimizer.zero_grad()
    return loss.detach(), lr, grad_norm


def _step_record(
    run: _Run,
    losses: list[torch.Tensor],
    lr: float,
    grad_norm: torch.Tensor | None,
    batch_tokens: int,
    started: float,
) -> dict[str, Any]:
    """The log record of the optimizer step just taken; its loss is the mean over its batches and
    processes."""
    accelerator = run.accelerator
    mean_loss = accelerator.reduce(torch.stack(losses).float().mean(), "mean").item()
    seconds = time.perf_counter() - started
    run.step_seconds.append(seconds)
    return {
        "kind": "train",
        "step": run.state["step"],
        "loss": mean_loss,
        "lr": lr,
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_second": len(losses) * batch_tokens * accelerator.num_processes / seconds,
        "seconds": seconds,
        "epoch": run.state["epoch"],
    }


def _after_step(run: _Run, record: dict[str, Any], bar: tqdm) -> None:
    """Log the step (every train.log_every and the last), advance the bar, evaluate and checkpoint
    when due."""
    config, step = run.config, record["step"]
    if step % config.train.log_every == 0 or step == config.train.max_steps:
        run.log.write(record)
        run.accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, float)}, step=step)
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    if config.eval.every and step % config.eval.every == 0 and step < config.train.max_steps:
        _evaluate(run, step)
    if config.checkpoint.every and step % config.checkpoint.every == 0:
        checkpoints = Path(config.output.dir) / "checkpoints"
        save_checkpoint(run.accelerator, checkpoints, step, run.state, config.checkpoint.keep)


# ---------------------------------------------------------------- results


def _results(run: _Run, resume_from: Path | None, outputs: dict[str, str]) -> dict[str, Any]:
    """The run's results: validation perplexity before and after, the share of the kNN-dense gap that
    training closed, speed, sizes, the config and the environment."""
    state, train, processes = run.state, run.config.train, run.accelerator.num_processes
    before, after = state["evaluations"][0], state["evaluations"][-1]
    gap = before["knn_perplexity"] - before["dense_perplexity"]
    return {
        "before": before,
        "after": after,
        "gap_closed": (before["knn_perplexity"] - after["knn_perplexity"]) / gap if gap > 0 else math.nan,
        "evaluations": state["evaluations"],
        "steps": state["step"],
        "resumed_from": None if resume_from is None else str(resume_from),
        "seconds_per_step": sum(run.step_seconds) / len(run.step_seconds) if run.step_seconds else None,
        "processes": processes,
        "effective_batch_blocks": train.batch_size * train.grad_accum * processes,
        "train_blocks": len(run.data.blocks),
        "train_documents": len(run.data.train_documents),
        "validation_documents": [name for name, _ in run.data.validation],
        "validation_tokens": after["tokens"],
        "outputs": outputs,
        "config": run.config.to_dict(),
        "environment": environment(),
    }


def _write_results(out: Path, result: dict[str, Any]) -> None:
    """results.json, history.png and the summary table (main process only)."""
    write_json_atomic(out / "results.json", result)
    plot_history(out / "log.jsonl", out / "history.png")
    print_summary(result)
    print(f"wrote {out / 'results.json'}, {out / 'history.png'} and {', '.join(result['outputs'].values())}")


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/configs/tiny_debug.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. train.lr=1e-4"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint of output.dir (or from the one given)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return finetune(load_recipe(args.config, args.set), resume=args.resume, progress=not args.no_progress)
