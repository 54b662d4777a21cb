"""What training shows and leaves behind: the progress bar, report lines, the log and the loss curve.

The bar is tqdm's (a library, not hand-drawn); report lines follow mlx-lm's
wording. The log is JSON Lines, one object per report or evaluation, rewritten
atomically each time so a killed run never leaves half a line. The loss-curve
PNG needs matplotlib (the `plot` extra); without it the trainer says so once
and writes the log only.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..formats.files import atomic_write, write_text
from ..generate import peak_memory_gb


def progress_bar(total: int, initial: int, enabled: bool = True) -> tqdm:
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def train_line(step: int, loss: float, lr: float, steps_per_sec: float, tokens_per_sec: float,
               trained_tokens: int) -> str:
    return (f"Iter {step}: Train loss {loss:.3f}, Learning Rate {lr:.3e}, It/sec {steps_per_sec:.3f}, "
            f"Tokens/sec {tokens_per_sec:.1f}, Trained Tokens {trained_tokens:,}, "
            f"Peak mem {peak_memory_gb():.3f} GB")


def val_line(step: int, loss: float, seconds: float) -> str:
    return f"Iter {step}: Val loss {loss:.3f}, Val took {seconds:.3f}s"


class TrainLog:
    """The run's history as JSON Lines at `path`: {"step", "kind": "train"|"val"|"test", "loss", ...}."""

    def __init__(self, path: Path, entries: list[dict] | None = None):
        self.path = path
        self.entries = list(entries or [])

    def add(self, **entry) -> None:
        self.entries.append(entry)
        write_text(self.path, "".join(json.dumps(e) + "\n" for e in self.entries))

    def losses(self, kind: str) -> list[tuple[int, float]]:
        return [(e["step"], e["loss"]) for e in self.entries if e["kind"] == kind]


def plot_loss_curve(log: TrainLog, path: Path) -> str | None:
    """Draw train and validation loss against step into `path` (PNG); returns a note if it cannot."""
    try:
        import matplotlib
        matplotlib.use("Agg")                      # no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "no loss-curve picture: matplotlib is not installed (pip install -e '.[plot]'); the log has the numbers"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for kind, style in (("train", "-"), ("val", "o-")):
        points = log.losses(kind)
        if points:
            ax.plot(*zip(*points), style, label=f"{kind} loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:                  # like every file we save
        fig.savefig(f, format="png")
    plt.close(fig)
    return None
