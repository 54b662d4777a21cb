"""Example 05: fuse an adapter into the model, and check the fused model answers exactly as model + adapter.

A LoRA adapter is a few MB of A and B matrices that need the base model and
a LoRA-aware loader. `fuse` folds each one into its weight,

    W' = W + scale · B A          (lora.merge; scale = alpha / r)

and writes a complete Hugging Face-format folder (config.json,
model.safetensors, tokenizer files) that any loader, transformers included,
reads as a plain model. This script

1. gets an adapter: trains a tiny one on the identity data (a few steps), or
   takes yours with --adapter-path (made for SmolLM2-135M-Instruct, e.g. by
   example 03 or 04);
2. answers a few questions greedily with the base model, then with base +
   adapter (`load_adapter`);
3. fuses them (`fuse`), lists the folder's files and sizes, loads it with
   `load` alone (no adapter anywhere), and answers the same questions.

The fused and unfused models compute x (W + s·BA)ᵀ and x Wᵀ + s·(x Aᵀ) Bᵀ: equal
in exact arithmetic, a rounding apart in float32. The script prints the
largest logit difference and requires the greedy tokens to be identical.

    python examples/05_fuse_and_generate.py                     # full run, about 50 s on 2 cores
    python examples/05_fuse_and_generate.py --fast              # what the tests run, about 15 s
    python examples/05_fuse_and_generate.py --adapter-path adapters/identity --out fused/identity

Exits with status 1 if any fused answer differs, token for token, from model + adapter.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from tinylora.cli.demo import DATA, held_out_questions
from tinylora.lora.fused import fuse
from tinylora.lora.peft import load_adapter
from tinylora.formats.smollm2 import download_smollm2
from tinylora.generate import generate
from tinylora.lora import lora_layers
from tinylora.loading import load
from tinylora.tensor import no_grad
from tinylora.train import TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", help="4 training steps, 2 questions (what the tests run)")
parser.add_argument("--seed", type=int, default=0, help="seed of the tiny adapter's training")
parser.add_argument("--adapter-path", default=None, help="fuse this adapter instead of training a tiny one")
parser.add_argument("--out", default=None, help="where to write the fused model (default: a temporary folder, "
                                                "removed at the end)")
args = parser.parse_args()
iters, max_tokens = (4, 12) if args.fast else (20, 40)
temporary = tempfile.TemporaryDirectory(prefix="tinylora-05-")
work = Path(temporary.name)
fused_dir = Path(args.out) if args.out else work / "fused"
model_dir = download_smollm2("weights")
questions = held_out_questions()[:2] if args.fast else held_out_questions()


def answers(model, tok) -> tuple[list[list[int]], np.ndarray]:
    """-> the greedy token ids for each question, and the logits (T, V) of the first question's prompt."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    with no_grad():
        logits = model(np.array([prompts[0]])).data[0]                     # (T, V)
    return [generate(model, tok, ids, max_tokens=max_tokens) for ids in prompts], logits


def show(title: str, tokens: list[list[int]], tok) -> None:
    print(f"\n== {title} ==")
    for q, ids in zip(questions, tokens):
        print(f"Q: {q}\nA: {tok.decode(ids, skip_special_tokens=True).strip()}")


# --- 1. The base model, and an adapter -----------------------------------------------------------
model, tok = load(model_dir)
base_tokens, _ = answers(model, tok)
show(f"{model_dir.name}, no adapter", base_tokens, tok)
if args.adapter_path:
    adapter_path = Path(args.adapter_path)
else:
    adapter_path = work / "adapter"
    print(f"\n== training a tiny adapter: r = 8, all seven projections, {iters} steps on the identity data ==")
    config = TrainConfig(data=str(DATA), model=str(model_dir), adapter_path=str(adapter_path), rank=8, alpha=16,
                         batch_size=4, iters=iters, learning_rate=5e-4, steps_per_report=iters,
                         steps_per_eval=iters, save_every=iters, max_seq_length=256, seed=args.seed)
    train(config, model, tok, progress=False)
del model                                        # one 135M-parameter model in memory at a time

# --- 2. Base + adapter, as a LoRA-aware loader runs it ---------------------------------------------
model, tok = load(model_dir)
load_adapter(model, adapter_path)
print(f"\nadapter {adapter_path}: {len(lora_layers(model))} LoRA layers, "
      f"r = {model.lora_config.r}, scale = {model.lora_config.scale:g}")
unfused_tokens, unfused_logits = answers(model, tok)
show("base + adapter (unfused)", unfused_tokens, tok)
del model

# --- 3. Fuse, and load the folder alone ------------------------------------------------------------
fuse(model_dir, adapter_path, fused_dir)        # refuses a non-empty folder: never overwrites
print(f"\n== fused model: {fused_dir}/ ==")
for f in sorted(fused_dir.iterdir()):
    print(f"  {f.name:24s} {f.stat().st_size:13,} bytes")
model, tok = load(fused_dir)                     # a plain model folder: no adapter files, no LoRA layers
print(f"loaded with tinylora.load alone: {len(lora_layers(model))} LoRA layers")
fused_tokens, fused_logits = answers(model, tok)
show("fused", fused_tokens, tok)

# --- 4. The comparison -----------------------------------------------------------------------------
logit_diff = float(np.abs(fused_logits - unfused_logits).max())
same = [f == u for f, u in zip(fused_tokens, unfused_tokens)]
changed = sum(b != u for b, u in zip(base_tokens, unfused_tokens))
print(f"\nlargest |logit difference|, fused vs unfused, over the first prompt's {len(fused_logits)} positions: "
      f"{logit_diff:.2e}\n(float32 rounding: W + s·BA is summed once, before the matmul, instead of after it)")
print(f"answers the adapter changed (vs the base model): {changed} of {len(questions)}")
print(f"fused answers identical to base + adapter, token for token: {sum(same)} of {len(questions)}")
temporary.cleanup()
if not args.out:
    print("(the fused folder was temporary, removed now; pass --out DIR to keep it)")

if not all(same):
    for q, f, u in zip(questions, fused_tokens, unfused_tokens):
        if f != u:
            print(f"FAILED: {q!r}: fused {f} vs unfused {u}")
    sys.exit(1)
print(f"OK: the fused model, loaded without the adapter, generates the same {sum(map(len, fused_tokens))} "
      f"tokens as base + adapter (max logit difference {logit_diff:.1e})")
