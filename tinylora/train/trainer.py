"""The training loop: LoRA on a frozen model, `train_step` after `train_step`, checkpoints that resume exactly.

    for step in start + 1 .. total:
        train_step(...)                   micro-batches, backward, clip, AdamW (step.py)
        every steps_per_report:  a report line and a log entry
        every steps_per_eval:    validation loss; a new best is saved to best/
        every save_every:        checkpoint/ (adapter, optimizer moments, trainer state), then the adapter

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

from ..errors import TinyloraError
from ..formats.files import atomic_folder, read_json, write_json
from ..formats.lock import run_lock
from ..lora import apply_lora, load_adapter, lora_layers, lora_parameters, save_adapter
from ..optim import AdamW, LRSchedule
from .config import TrainConfig
from .data import TokenizedSplit, batches_per_epoch, encode_split, iterate_batches, load_dataset
from .packing import iterate_packed_batches, packed_steps
from .report import TrainLog, plot_loss_curve, progress_bar, train_line, val_line
from .step import NonFinite, evaluate, train_step

STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    steps: int
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_val: float | None = None
    test_loss: float | None = None
    stopped_early: bool = False
    notes: list[str] = field(default_factory=list)


def train(config: TrainConfig, model, tokenizer, progress: bool = True, log=print) -> TrainResult:
    """Fine-tune LoRA adapters of `model` on config.data; returns the losses. See the module docstring.

    The data is checked first; then the run holds its adapter folder (formats/lock.py) until it ends,
    so a second run on the same folder is refused instead of mixing its checkpoints with this one's."""
    data = _encode(config, tokenizer, log)
    total = _total_steps(config, data["train"])
    with run_lock(config.adapter_path, log):
        return _train(config, model, data, total, progress, log)


def _train(config: TrainConfig, model, data: dict, total: int, progress: bool, log) -> TrainResult:
    out = Path(config.adapter_path)
    state = {}
    if config.resume:
        state = _resume(config, model, out, log)
        if state.get("stopped_early") or state["step"] >= total:
            log("that run had already finished; nothing to do")
            return TrainResult(steps=state["step"], best_val=state.get("best_val"),
                               stopped_early=state.get("stopped_early"))
    elif config.resume_adapter_file:
        folder = Path(config.resume_adapter_file)
        load_adapter(model, folder.parent if folder.is_file() else folder, seed=config.seed)   # PEFT's or mlx-lm's
        c = model.lora_config
        log(f"starting from the adapter in {folder}: r {c.r}, scale {c.scale:g}, targets {', '.join(c.targets)}, "
            f"layers {'all' if c.layers is None else c.layers}")
    else:
        apply_lora(model, config.lora(), seed=config.seed)
    start = state.get("step", 0)
    model.train(True)
    model.grad_checkpoint = config.grad_checkpoint
    params = lora_parameters(model)
    for _, p in params:
        p.requires_grad = True
    optimizer = AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    if start:
        optimizer.load(out / "checkpoint")
    schedule = LRSchedule(config.learning_rate, total, config.lr_schedule, min(config.warmup, total),
                          config.min_lr_ratio)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(config, model, optimizer, data.get("valid"), out, state, progress_bar(total, start, progress))

    if config.pack:
        batches = iterate_packed_batches(data["train"], config.batch_size, config.max_seq_length, seed=config.seed,
                                         start_step=start * config.grad_accum)
    else:
        batches = iterate_batches(data["train"], config.batch_size, seed=config.seed,
                                  start_step=start * config.grad_accum, group_by_length=config.group_by_length)
    if start == 0:
        run.validate(0)
    for step in range(start + 1, total + 1):
        try:
            done = train_step(model, batches, params, optimizer, schedule(step), config.grad_accum, config.grad_clip)
        except NonFinite as e:
            run.bar.close()
            raise TinyloraError(f"step {step}: {e}; training stopped. The last good checkpoint in "
                                f"{out / 'checkpoint'} is untouched (lower --learning-rate, or check the data)") \
                from None
        run.report(step, done.loss, done.tokens, schedule(step), last=step == total)
        if step % config.steps_per_eval == 0 or step == total:
            run.validate(step)
        run.result.steps = step
        if step % config.save_every == 0 or step == total:
            run.checkpoint(step)
        if config.early_stop and run.evals_without_best >= config.early_stop:
            run.bar.write(f"Iter {step}: no better validation loss in {config.early_stop} evaluations: stopping")
            run.result.stopped_early = True
            run.checkpoint(step)            # records stopped_early: a --resume then has nothing left to do
            break
    run.bar.close()
    result = run.result
    if config.test:
        result.test_loss = evaluate(model, data["test"], config.batch_size)
        run.log_file.add(step=result.steps, kind="test", loss=result.test_loss)
        log(f"Test loss {result.test_loss:.3f}, Test ppl {math.exp(result.test_loss):.3f}")
    note = plot_loss_curve(run.log_file, out / "loss_curve.png")
    if note:
        result.notes.append(note)
        log(note)
    model.train(False)
    return result


class _Run:
    """What the loop keeps between steps: the log, the losses, the report window; and how it
    validates and checkpoints. All of it is saved with each checkpoint, so a resumed run
    continues with the same state."""

    def __init__(self, config: TrainConfig, model, optimizer: AdamW, val_data: TokenizedSplit | None, out: Path,
                 state: dict, bar):
        self.config, self.model, self.optimizer, self.val_data, self.out, self.bar = \
            config, model, optimizer, val_data, out, bar
        self.log_file = TrainLog(out / "train_log.jsonl", state.get("log"))
        self.result = TrainResult(steps=state.get("step", 0), best_val=state.get("best_val"))
        self.evals_without_best = state.get("evals_without_best", 0)
        # The report window: steps, summed loss and tokens since the last report line, and the
        # running total of trained tokens. A resumed run reports what the uninterrupted one would
        # have (only the timing starts afresh).
        self.window = state.get("window") or {"steps": 0, "loss": 0.0, "tokens": 0, "trained_tokens": 0}
        self.window_start = time.perf_counter()

    def report(self, step: int, loss: float, tokens: int, lr: float, last: bool) -> None:
        """Count one step into the window; every steps_per_report steps (and at the end), a report line."""
        w = self.window
        w["steps"] += 1
        w["loss"] += loss
        w["tokens"] += tokens
        self.bar.update(1)
        elapsed = time.perf_counter() - self.window_start
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                             tok_s=f"{w['tokens'] / elapsed:.0f}" if elapsed > 0 else "-")
        if step % self.config.steps_per_report and not last:
            return
        mean_loss = w["loss"] / w["steps"]
        w["trained_tokens"] += w["tokens"]
        self.log_file.add(step=step, kind="train", loss=mean_loss, lr=lr, tokens_per_sec=w["tokens"] / elapsed)
        self.result.train_losses.append((step, mean_loss))
        self.bar.write(train_line(step, mean_loss, lr, w["steps"] / elapsed, w["tokens"] / elapsed,
                                  w["trained_tokens"]))
        w.update(steps=0, loss=0.0, tokens=0)
        self.window_start = time.perf_counter()

    def validate(self, step: int) -> None:
        if self.val_data is None:
            return
        t0 = time.perf_counter()
        loss = evaluate(self.model, self.val_data, self.config.batch_size, self.config.val_batches)
        self.log_file.add(step=step, kind="val", loss=loss)
        self.result.val_losses.append((step, loss))
        self.bar.write(val_line(step, loss, time.perf_counter() - t0))
        if self.result.best_val is None or loss < self.result.best_val:
            self.result.best_val, self.evals_without_best = loss, 0
            with atomic_folder(self.out / "best", overwrite=True) as folder:    # at step 0: the base model (B = 0)
                save_adapter(self.model, folder)
        else:
            self.evals_without_best += 1

    def checkpoint(self, step: int) -> None:
        # checkpoint/ first: a kill before the top-level copy leaves them one save apart, never the other way
        with atomic_folder(self.out / "checkpoint", overwrite=True) as folder:
            save_adapter(self.model, folder)
            self.optimizer.save(folder)
            write_json(folder / STATE_FILE, {
                "step": step, "best_val": self.result.best_val, "evals_without_best": self.evals_without_best,
                "stopped_early": self.result.stopped_early, "window": self.window,
                "dropout_rng": [layer.rng.bit_generator.state if layer.rng is not None else None
                                for _, layer in lora_layers(self.model)],
                "log": self.log_file.entries, "config": asdict(self.config)})
        save_adapter(self.model, self.out)


def _encode(config: TrainConfig, tokenizer, log) -> dict[str, TokenizedSplit]:
    """Read and tokenize every split; refuse settings the data cannot serve, before any training."""
    data = {name: encode_split(split, tokenizer, config.mask_prompt, config.max_seq_length)
            for name, split in load_dataset(config.data).items()}
    for split in data.values():
        log(split.summary())
    if config.batch_size > len(data["train"]):
        raise TinyloraError(f"--batch-size {config.batch_size} is larger than the {len(data['train'])} training "
                            f"examples in {data['train'].source}")
    if config.test and "test" not in data:
        raise TinyloraError(f"--test: {config.data} has no test.jsonl")
    if config.early_stop and "valid" not in data:
        raise TinyloraError(f"--early-stop needs validation data: {config.data} has no valid.jsonl")
    return data


def _total_steps(config: TrainConfig, train_data: TokenizedSplit) -> int:
    """Optimizer steps: --iters (default 1000), or that many passes over the training set with --epochs."""
    if config.epochs is None:
        return config.iters or 1000
    if config.pack:
        per_epochs = packed_steps(train_data, config.batch_size, config.seed, config.max_seq_length, config.epochs)
        return max(1, round(per_epochs / config.grad_accum))
    return max(1, round(config.epochs * batches_per_epoch(len(train_data), config.batch_size) / config.grad_accum))


# The settings that shape a run's trajectory: resuming with any of them changed would not continue
# the same run, so it is refused rather than silently ignored or half-applied.
_MUST_MATCH = ("data", "rank", "alpha", "dropout", "targets", "rslora", "layers", "batch_size", "iters", "epochs",
               "learning_rate", "lr_schedule", "warmup", "min_lr_ratio", "weight_decay", "grad_clip", "grad_accum",
               "max_seq_length", "mask_prompt", "seed", "group_by_length", "pack")


def _resume(config: TrainConfig, model, out: Path, log) -> dict:
    """The checkpoint's trainer state, with its adapter loaded into `model` and the dropout generators restored."""
    path = out / "checkpoint" / STATE_FILE
    if not path.is_file():
        raise TinyloraError(f"--resume: no checkpoint in {out / 'checkpoint'} (train without --resume to start)")
    state = read_json(path)                      # a corrupt file is one line naming it, not a traceback
    saved, now = state.get("config", {}), asdict(config)
    saved.setdefault("pack", False)              # checkpoints from before --pack existed were unpacked
    for key in _MUST_MATCH:
        if saved.get(key) != now[key]:
            raise TinyloraError(f"--resume: {key} was {saved.get(key)!r} in the checkpointed run, now {now[key]!r}; "
                                "resume with the same settings (or start a new --adapter-path)")
    load_adapter(model, out / "checkpoint")
    for (_, layer), rng_state in zip(lora_layers(model), state["dropout_rng"], strict=True):
        if layer.rng is not None:
            layer.rng.bit_generator.state = rng_state
    log(f"resuming from {out / 'checkpoint'} at step {state['step']}")
    return state
