"""The training loop: LoRA on a frozen model, AdamW on A and B, checkpoints that resume exactly.

One optimiser step:

    for each of grad_accum micro-batches:   loss = model.loss(ids, labels, mask);  loss.backward()
    g ← g / grad_accum                      (the mean of the micro-batches' mean losses, as mlx-lm;
                                             each micro-batch weighs the same, whatever its token count)
    clip g to a global L2 norm of grad_clip
    AdamW update of every A and B at the scheduled learning rate;  g ← None

What lands in `adapter_path`:

    adapter_config.json, adapter_model.safetensors   the latest adapter (PEFT format), loadable any time
    checkpoint/    the latest complete checkpoint: adapter + optimizer moments + trainer_state.json
    best/          the adapter with the lowest validation loss so far
    train_log.jsonl, loss_curve.png

Every file is written atomically and a checkpoint folder appears whole or not
at all, so a run killed at any moment loses only the steps since its last
checkpoint, and `resume` continues with exactly the losses the uninterrupted
run would have had: the batch order is a pure function of (seed, step), the
dropout generators' states and the optimizer moments are saved with it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


from .data import batches_per_epoch, count_targets, encode_split, iterate_batches, load_dataset
from .errors import TinyloraError
from .formats.files import atomic_folder, read_json, write_json
from .formats.peft import load_adapter, save_adapter
from .lora import LoraConfig, apply_lora, lora_layers, lora_parameters
from .optim import AdamW, LRSchedule, clip_grad_norm, grad_norm, scale_grads
from .report import TrainLog, plot_loss_curve, progress_bar, train_line, val_line
from .tensor import no_grad

STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI's flags map one to one (see `tinylora train --help`)."""
    data: str
    model: str = "weights/SmolLM2-135M-Instruct"
    adapter_path: str = "adapters"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = "all-linear"
    rslora: bool = False
    layers: list[int] | None = None
    batch_size: int = 4
    iters: int | None = None                 # optimizer steps; or
    epochs: float | None = None              # passes over the training set (default: iters 1000)
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"            # constant, linear or cosine (after warm-up)
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    max_seq_length: int = 2048
    mask_prompt: bool = True
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25                    # -1: the whole validation set
    save_every: int = 100
    resume: bool = False
    early_stop: int | None = None            # stop after this many evaluations without a new best
    test: bool = False
    seed: int = 0
    group_by_length: bool = False

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "steps_per_report", "steps_per_eval", "save_every"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise TinyloraError(f"{flag} must be a whole number >= 1, got {getattr(self, name)!r}")
        if self.iters is not None and self.epochs is not None:
            raise TinyloraError("give --iters or --epochs, not both")
        if self.iters is not None and (type(self.iters) is not int or self.iters < 1):
            raise TinyloraError(f"--iters must be a whole number >= 1, got {self.iters!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise TinyloraError(f"--epochs must be > 0, got {self.epochs!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise TinyloraError(f"--learning-rate must be a number > 0, got {self.learning_rate!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise TinyloraError(f"--grad-clip must be > 0, got {self.grad_clip!r}")
        if self.val_batches == 0 or self.val_batches < -1:
            raise TinyloraError(f"--val-batches must be >= 1, or -1 for all, got {self.val_batches!r}")
        if type(self.rank) is not int or self.rank < 1:
            raise TinyloraError(f"--rank must be a whole number >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise TinyloraError(f"--alpha must be a number > 0, got {self.alpha!r}")
        if type(self.max_seq_length) is not int or self.max_seq_length < 2:
            raise TinyloraError(f"--max-seq-length must be a whole number >= 2, got {self.max_seq_length!r}")
        self.lora()                              # the rest of the LoRA settings, checked before any work

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=self.targets,
                          use_rslora=self.rslora, layers=self.layers)


@dataclass
class TrainResult:
    steps: int
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_val: float | None = None
    test_loss: float | None = None
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)


def evaluate(model, data, batch_size: int, max_batches: int = -1) -> float:
    """Mean loss per counted token over the first max_batches batches (all with -1), no dropout, no graph."""
    total, count = 0.0, 0
    was_training = model.training
    model.train(False)
    with no_grad():
        for i, batch in enumerate(iterate_batches(data, batch_size, shuffle=False)):
            if i == max_batches:
                break
            n = count_targets(batch.labels)
            total += model.loss(batch.input_ids, batch.labels, batch.attention_mask).item() * n
            count += n
    model.train(was_training)
    return total / count


def train(config: TrainConfig, model, tokenizer, progress: bool = True, log=print) -> TrainResult:
    """Fine-tune LoRA adapters of `model` on config.data; returns the losses. See the module docstring."""
    out = Path(config.adapter_path)
    splits = load_dataset(config.data)
    data = {name: encode_split(split, tokenizer, config.mask_prompt, config.max_seq_length)
            for name, split in splits.items()}
    for split in data.values():
        log(split.summary())
    train_data, val_data = data["train"], data.get("valid")
    if config.batch_size > len(train_data):
        raise TinyloraError(f"--batch-size {config.batch_size} is larger than the {len(train_data)} training "
                            f"examples in {train_data.source}")
    if config.epochs is not None:           # optimizer steps in that many passes over the training set
        total = max(1, round(config.epochs * batches_per_epoch(len(train_data), config.batch_size)
                             / config.grad_accum))
    else:
        total = config.iters or 1000

    if config.test and "test" not in data:
        raise TinyloraError(f"--test: {config.data} has no test.jsonl")
    if config.early_stop and val_data is None:
        raise TinyloraError(f"--early-stop needs validation data: {config.data} has no valid.jsonl")

    start, state = 0, {}
    if config.resume:
        state = _read_checkpoint_state(out, config)
        start = state["step"]
        load_adapter(model, out / "checkpoint")
        for (_, layer), rng_state in zip(lora_layers(model), state["dropout_rng"], strict=True):
            if layer.rng is not None:
                layer.rng.bit_generator.state = rng_state
        log(f"resuming from {out / 'checkpoint'} at step {start}")
        if state.get("stopped_early") or start >= total:
            log("that run had already finished; nothing to do")
            return TrainResult(steps=start, best_val=state.get("best_val"), stopped_early=state.get("stopped_early"))
    else:
        apply_lora(model, config.lora(), seed=config.seed)
    model.train(True)
    params = lora_parameters(model)
    for _, p in params:
        p.requires_grad = True
    optimizer = AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if start:
        optimizer.load(out / "checkpoint")
    schedule = LRSchedule(config.learning_rate, total, config.lr_schedule, min(config.warmup, total),
                          config.min_lr_ratio)
    log_file = TrainLog(out / "train_log.jsonl", state.get("log"))
    result = TrainResult(steps=start, best_val=state.get("best_val"))
    evals_without_best = state.get("evals_without_best", 0)
    out.mkdir(parents=True, exist_ok=True)

    def validate(step: int) -> None:
        nonlocal evals_without_best
        if val_data is None:
            return
        t0 = time.perf_counter()
        loss = evaluate(model, val_data, config.batch_size, config.val_batches)
        log_file.add(step=step, kind="val", loss=loss)
        result.val_losses.append((step, loss))
        bar.write(val_line(step, loss, time.perf_counter() - t0))
        if result.best_val is None or loss < result.best_val:
            result.best_val, evals_without_best = loss, 0
            with atomic_folder(out / "best", overwrite=True) as folder:      # at step 0: the base model (B = 0)
                save_adapter(model, folder)
        else:
            evals_without_best += 1

    def checkpoint(step: int) -> None:
        # checkpoint/ first: a kill before the top-level copy leaves them one save apart, never the other way
        with atomic_folder(out / "checkpoint", overwrite=True) as folder:
            save_adapter(model, folder)
            optimizer.save(folder)
            write_json(folder / STATE_FILE, {
                "step": step, "best_val": result.best_val, "evals_without_best": evals_without_best,
                "stopped_early": result.stopped_early, "window": window,
                "dropout_rng": [layer.rng.bit_generator.state if layer.rng is not None else None
                                for _, layer in lora_layers(model)],
                "log": log_file.entries, "config": asdict(config)})
        save_adapter(model, out)

    batches = iterate_batches(train_data, config.batch_size, seed=config.seed, start_step=start * config.grad_accum,
                              group_by_length=config.group_by_length)
    bar = progress_bar(total, start, progress)
    if start == 0:
        validate(0)
    # The report window: steps, summed loss and tokens since the last report line, and the running
    # total of trained tokens. Saved with each checkpoint, so a resumed run reports what the
    # uninterrupted one would have (only the timing starts afresh).
    window = state.get("window") or {"steps": 0, "loss": 0.0, "tokens": 0, "trained_tokens": 0}
    window_start = time.perf_counter()
    for step in range(start + 1, total + 1):
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch = next(batches)
            loss = model.loss(batch.input_ids, batch.labels, batch.attention_mask)
            value = loss.item()
            if not math.isfinite(value):
                _stop(bar, step, f"the loss is {value}", out)
            loss.backward()
            step_loss += value / config.grad_accum
            window["tokens"] += count_targets(batch.labels)
        if config.grad_accum > 1:
            scale_grads(params, 1.0 / config.grad_accum)
        norm = clip_grad_norm(params, config.grad_clip) if config.grad_clip else grad_norm(params)
        if not math.isfinite(norm):
            _stop(bar, step, f"the gradient norm is {norm}", out)
        optimizer.step(lr=schedule(step))
        optimizer.zero_grad()
        window["steps"] += 1
        window["loss"] += step_loss
        bar.update(1)
        elapsed = time.perf_counter() - window_start
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{schedule(step):.2e}",
                        tok_s=f"{window['tokens'] / elapsed:.0f}" if elapsed > 0 else "-")
        if step % config.steps_per_report == 0 or step == total:
            n, mean_loss = window["steps"], window["loss"] / window["steps"]
            window["trained_tokens"] += window["tokens"]
            log_file.add(step=step, kind="train", loss=mean_loss, lr=schedule(step),
                         tokens_per_sec=window["tokens"] / elapsed)
            result.train_losses.append((step, mean_loss))
            bar.write(train_line(step, mean_loss, schedule(step), n / elapsed, window["tokens"] / elapsed,
                                 window["trained_tokens"]))
            window.update(steps=0, loss=0.0, tokens=0)
            window_start = time.perf_counter()
        if step % config.steps_per_eval == 0 or step == total:
            validate(step)
        result.steps = step
        if step % config.save_every == 0 or step == total:
            checkpoint(step)
        if config.early_stop and evals_without_best >= config.early_stop:
            bar.write(f"Iter {step}: no better validation loss in {config.early_stop} evaluations: stopping")
            result.stopped_early = True
            checkpoint(step)            # records stopped_early: a --resume then has nothing left to do
            break
    bar.close()
    if config.test and "test" in data:
        result.test_loss = evaluate(model, data["test"], config.batch_size)
        log_file.add(step=result.steps, kind="test", loss=result.test_loss)
        log(f"Test loss {result.test_loss:.3f}, Test ppl {math.exp(result.test_loss):.3f}")
    note = plot_loss_curve(log_file, out / "loss_curve.png")
    if note:
        result.notes.append(note)
        log(note)
    model.train(False)
    return result


# The settings that shape a run's trajectory: resuming with any of them changed would not continue
# the same run, so it is refused rather than silently ignored or half-applied.
_MUST_MATCH = ("data", "rank", "alpha", "dropout", "targets", "rslora", "layers", "batch_size", "iters", "epochs",
               "learning_rate", "lr_schedule", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "grad_accum",
               "max_seq_length", "mask_prompt", "seed", "group_by_length")


def _read_checkpoint_state(out: Path, config: TrainConfig) -> dict:
    path = out / "checkpoint" / STATE_FILE
    if not path.is_file():
        raise TinyloraError(f"--resume: no checkpoint in {out / 'checkpoint'} (train without --resume to start)")
    state = read_json(path)                      # a corrupt file is one line naming it, not a traceback
    saved, now = state.get("config", {}), asdict(config)
    for key in _MUST_MATCH:
        if saved.get(key) != now[key]:
            raise TinyloraError(f"--resume: {key} was {saved.get(key)!r} in the checkpointed run, now {now[key]!r}; "
                                "resume with the same settings (or start a new --adapter-path)")
    return state


def _stop(bar, step: int, what: str, out: Path) -> None:
    bar.close()
    raise TinyloraError(f"step {step}: {what}; training stopped. The last good checkpoint in "
                        f"{out / 'checkpoint'} is untouched (lower --learning-rate, or check the data)")
