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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, get_cosine_schedule_with_warmup
from transformers.pytorch_utils import Conv1D

from .checkpoints import STATE_FILE, complete_checkpoints, latest_checkpoint, read_state, save_checkpoint
from .config import KNNConfig
from .evaluation import ensure_writable, environment, evaluate_perplexity, setting_name
from .io import atomic_dir, atomic_write, write_json_atomic
from .loading import load_model, load_tokenizer
from .loss import causal_lm_nll
from .patcher import attention_modules, patch
from .recipe_config import ModelSection, RecipeConfig, load_recipe
from .training_data import prepare_data

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
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    if lora.target_modules is None:
        targets, fan_in_fan_out = lora_targets(model)
    else:
        targets = lora.target_modules
        fan_in_fan_out = any(
            isinstance(m, Conv1D) and name.split(".")[-1] in targets for name, m in model.named_modules()
        )
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    checkpoints = out / "checkpoints"
    resume_from = None
    if resume:
        given = checkpoints if resume is True else Path(resume)
        resume_from = given if (given / STATE_FILE).is_file() else latest_checkpoint(given)
    elif complete_checkpoints(checkpoints):
        raise FileExistsError(
            f"{str(out)!r} already holds checkpoints of a run: pass --resume to continue it, or set "
            "output.dir to a new folder."
        )
    cpu = check_device(config)
    ensure_writable(out)
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


def _train(
    accelerator: Accelerator, config: RecipeConfig, resume_from: Path | None, progress: bool
) -> dict[str, Any]:
    out, train = Path(config.output.dir), config.train
    main = accelerator.is_main_process
    set_seed(train.seed)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name)
    with accelerator.main_process_first():  # the first process tokenises; the others read its cache
        data = prepare_data(config.data, tokenizer, seed=train.seed, eval_max_tokens=config.eval.max_tokens)
    model = build_model(config.model, tokenizer)
    check_positions(model, config)
    patch(model, config.knn)
    if config.model.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.lora.enabled:
        model = apply_lora(model, config)
    model.train()
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

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "evaluations": []}
    log = JsonlLog(out / "log.jsonl", main)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))  # weights, optimizer, scheduler, RNG of every process
        state = read_state(resume_from)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    log.start(state["step"] if resume_from is not None else None)
    if main:
        write_json_atomic(out / "config.json", config.to_dict())
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(config.to_dict())))
    accelerator.init_trackers("finetune", config=_flat(config.to_dict()))
    unwrapped = accelerator.unwrap_model(model)

    def evaluate(step: int) -> None:
        record = {
            "kind": "eval",
            "step": step,
            **validation_perplexity(unwrapped, data.validation, config.knn, config),
        }
        state["evaluations"].append(record)
        log.write(record)
        accelerator.log({f"eval/{k}": record[k] for k in ("knn_perplexity", "dense_perplexity")}, step=step)
        accelerator.print(
            f"step {step}: validation perplexity kNN {record['knn_perplexity']:.3f}, "
            f"dense {record['dense_perplexity']:.3f}"
        )

    if state["step"] == 0:
        evaluate(0)
    step_seconds: list[float] = []
    losses: list[torch.Tensor] = []
    bar = tqdm(
        total=train.max_steps,
        initial=state["step"],
        desc="training",
        unit="step",
        disable=not (main and progress),
    )
    started = time.perf_counter()
    while state["step"] < train.max_steps:
        if state["batches_in_epoch"] >= len(loader):
            state["epoch"], state["batches_in_epoch"] = state["epoch"] + 1, 0
        loader.set_epoch(state["epoch"])  # seeded order: seed + epoch
        skip = state["batches_in_epoch"]
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            ids = batch["input_ids"]  # (B, block_size)
            with accelerator.accumulate(model):
                # transformers' mean token loss, from the hidden states in chunks: the (B, block, V)
                # logits and their gradient would outgrow the model at long blocks and large vocabularies
                nll, count = causal_lm_nll(model, ids)
                loss = nll / count
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and train.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
            state["batches_in_epoch"] += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            mean_loss = accelerator.reduce(torch.stack(losses).float().mean(), "mean").item()
            seconds = time.perf_counter() - started
            step_seconds.append(seconds)
            record = {
                "kind": "train",
                "step": step,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_second": len(losses) * ids.numel() * accelerator.num_processes / seconds,
                "seconds": seconds,
                "epoch": state["epoch"],
            }
            losses = []
            if step % train.log_every == 0 or step == train.max_steps:
                log.write(record)
                accelerator.log(
                    {f"train/{k}": v for k, v in record.items() if isinstance(v, float)}, step=step
                )
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if config.eval.every and step % config.eval.every == 0 and step < train.max_steps:
                evaluate(step)
            if config.checkpoint.every and step % config.checkpoint.every == 0:
                save_checkpoint(accelerator, out / "checkpoints", step, state, config.checkpoint.keep)
            started = time.perf_counter()
            if step >= train.max_steps:
                break
    bar.close()
    evaluate(state["step"])
    outputs = save_final(accelerator, model, tokenizer, config)
    before, after = state["evaluations"][0], state["evaluations"][-1]
    gap = before["knn_perplexity"] - before["dense_perplexity"]
    result = {
        "before": before,
        "after": after,
        "gap_closed": (before["knn_perplexity"] - after["knn_perplexity"]) / gap if gap > 0 else math.nan,
        "evaluations": state["evaluations"],
        "steps": state["step"],
        "resumed_from": None if resume_from is None else str(resume_from),
        "seconds_per_step": sum(step_seconds) / len(step_seconds) if step_seconds else None,
        "processes": accelerator.num_processes,
        "effective_batch_blocks": train.batch_size * train.grad_accum * accelerator.num_processes,
        "train_blocks": len(data.blocks),
        "train_documents": len(data.train_documents),
        "validation_documents": [name for name, _ in data.validation],
        "validation_tokens": after["tokens"],
        "outputs": outputs,
        "config": config.to_dict(),
        "environment": environment(),
    }
    if main:
        write_json_atomic(out / "results.json", result)
        plot_history(out / "log.jsonl", out / "history.png")
        print_summary(result)
        print(f"wrote {out / 'results.json'}, {out / 'history.png'} and {', '.join(outputs.values())}")
    return result


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
