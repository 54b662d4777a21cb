"""TrainConfig: every setting of a training run, validated before any work, and the source of `train`'s flags.

Each field carries its help text (and, where it has them, its choices) in the
field's metadata; `tinylora train` builds one flag per field from them
(cli/commands.py, `add_config_flags`), so a setting, its default and its help
live here and nowhere else. The flag names are mlx-lm's where it has one
(`--iters`, `--batch-size`, `--mask-prompt`, `--steps-per-eval`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import TinyloraError
from ..lora.config import LoraConfig

DEFAULT_MODEL = "weights/SmolLM2-135M-Instruct"


def setting(default, help: str, **flag):
    """A TrainConfig field: its default, its --help text, and extra argparse options (choices, ...)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class TrainConfig:
    """Everything a run needs; `tinylora train --FLAG` sets the field of the same name."""
    data: str = setting(None, "the data folder (train.jsonl, valid.jsonl, test.jsonl) or one .jsonl file",
                        required=True)
    model: str = setting(DEFAULT_MODEL, "model folder or hub repo id")
    dtype: str = setting("float32", "float32 (exact), or bfloat16 to store the frozen weights in bf16: half the "
                         "memory (a float32 checkpoint is rounded); computation stays float32",
                         choices=["float32", "bfloat16"])
    quantize: str | None = setting(None, "hold the frozen projections quantised, as QLoRA: nf4 (bitsandbytes' "
                                   "format), q8_0 or q4_0 (llama.cpp's); a float checkpoint is quantised as it is "
                                   "read (default: as stored)", choices=["nf4", "q8_0", "q4_0"])
    compute: str = setting("float32", "float32 (exact), or bfloat16: the products with the frozen weights in bf16 "
                           "on the CPU's bf16 dot-product instruction (AVX512-BF16: twice fp32's rate on AMD Zen 4/5, the same "
                           "on Intel's Xeons); "
                           "LoRA A, B and the optimizer stay float32 (a CPU without it says so, stays float32)",
                           choices=["float32", "bfloat16"])
    adapter_path: str = setting("adapters", "where the adapter, checkpoints and log go")
    rank: int = setting(8, "LoRA rank r")
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = setting(0.0, "dropout on the LoRA input while training")
    targets: list[str] | str = setting("all-linear", "projections to adapt (q_proj v_proj ...) or all-linear")
    rslora: bool = setting(False, "scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    layers: list[int] | None = setting(None, "only these layer indices (default: all)")
    batch_size: int = setting(4, "examples per batch")
    iters: int | None = setting(None, "optimizer steps (default: 1000 unless --epochs)")
    epochs: float | None = setting(None, "passes over the training set, instead of --iters")
    learning_rate: float = setting(1e-4, "peak learning rate")
    lr_schedule: str = setting("constant", "after warm-up: constant, or linear / cosine decay to --min-lr-ratio",
                               choices=["constant", "linear", "cosine"])
    warmup: int = setting(0, "linear warm-up steps")
    min_lr_ratio: float = setting(0.0, "floor of the decay, a fraction of the rate")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay")
    grad_clip: float | None = setting(1.0, "clip the global gradient norm; 0 = off")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    grad_checkpoint: bool = setting(False, "keep only each layer's input and recompute the layer in the backward: "
                                    "the same gradients in a fraction of the memory, ~1/3 more compute")
    max_seq_length: int = setting(2048, "cut examples to this many tokens")
    mask_prompt: bool = setting(True, "train only on the final assistant reply (--no-mask-prompt: every token)")
    group_by_length: bool = setting(False, "batch examples of similar length together (less padding)")
    pack: bool = setting(False, "pack several examples into each row, up to --max-seq-length, attention kept "
                         "inside each example and positions restarting (no padding between short examples)")
    steps_per_report: int = setting(10, "a report line every N steps")
    steps_per_eval: int = setting(200, "validation loss every N steps")
    val_batches: int = setting(25, "validation batches; -1 = all")
    save_every: int = setting(100, "checkpoint every N steps")
    resume: bool = setting(False, "continue exactly from ADAPTER_PATH/checkpoint")
    resume_adapter_file: str | None = setting(None, "start from this adapter's A and B instead of a fresh LoRA "
                                              "(a PEFT or mlx-lm adapter folder, or the weights file in one, as "
                                              "mlx_lm.lora's flag); its rank, alpha, targets and layers replace "
                                              "--rank, --alpha, --targets and --layers")
    early_stop: int | None = setting(None, "stop after N evaluations without a new best")
    test: bool = setting(False, "report test-set loss and perplexity at the end")
    seed: int = setting(0, "seed for LoRA init, dropout and batch order")

    def __post_init__(self):
        # Spellings the command line produces, normalised once so every caller sees one form.
        if self.targets == ["all-linear"]:
            self.targets = "all-linear"
        if self.grad_clip == 0:
            self.grad_clip = None
        if not isinstance(self.data, str):
            raise TinyloraError(f"--data must be a path, got {self.data!r}")
        for name in ("batch_size", "grad_accum", "steps_per_report", "steps_per_eval", "save_every"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise TinyloraError(f"{_flag(name)} must be a whole number >= 1, got {getattr(self, name)!r}")
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
        if self.dtype not in ("float32", "bfloat16"):
            raise TinyloraError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.compute not in ("float32", "bfloat16"):
            raise TinyloraError(f"--compute must be float32 or bfloat16, got {self.compute!r}")
        if self.resume and self.resume_adapter_file:
            raise TinyloraError("give --resume (this run's own checkpoint) or --resume-adapter-file, not both")
        self.lora()                              # the rest of the LoRA settings, checked before any work

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=self.targets,
                          use_rslora=self.rslora, layers=self.layers)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
