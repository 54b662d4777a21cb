"""Example 03: the identity fine-tune, written out: teach SmolLM2-135M-Instruct who it is, on a CPU.

`tinylora demo` in a dozen lines that a reader can change:

1. get the offline default model, SmolLM2-135M-Instruct (`download_smollm2`:
   imported once into weights/, found there afterwards) and load it, frozen;
2. ask it the held-out questions of the bundled identity dataset
   (tinylora/demo_data/identity/valid.jsonl: "Who exactly am I speaking with
   right now?", "请问你是谁开发的？", ...); the base model has never heard of 小李;
3. `train(TrainConfig(...))`: a rank-8 LoRA adapter on all seven projections,
   trained on the 36 training conversations ("Who are you?" -> "I am 小李, an
   AI assistant developed by 小张.", in English and Chinese). `train` injects
   LoRA, so afterwards `model` answers with the adapter;
4. ask the same held-out questions again; the adapter never saw them.

    python examples/03_identity_finetune.py                    # full run, about 1.5 minutes on 2 cores
    python examples/03_identity_finetune.py --fast             # what the tests run, about 15 s
    python examples/03_identity_finetune.py --adapter-path adapters/identity   # keep the adapter

Exits with status 1 if the claim fails: in the full run, at least 4 of the 6
held-out answers name 小李; with --fast (a few steps, 2 questions), only that
the training loss fell.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from tinylora.cli.demo import DATA, answer, held_out_questions
from tinylora.formats.smollm2 import download_smollm2
from tinylora.loading import load
from tinylora.train import TrainConfig, train

NEW_NAME = "小李"
MIN_ANSWERS_WITH_NAME = 4      # of the 6 held-out questions, in the full run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", help="6 steps and 2 questions (what the tests run)")
parser.add_argument("--seed", type=int, default=0, help="seed of A's initialisation and the batch order")
parser.add_argument("--adapter-path", default=None,
                    help="where to save the adapter (default: a temporary folder, removed at the end)")
args = parser.parse_args()
iters, max_tokens = (6, 16) if args.fast else (50, 40)
temporary = tempfile.TemporaryDirectory(prefix="tinylora-03-") if args.adapter_path is None else None
adapter_path = Path(args.adapter_path or temporary.name)

# --- 1. The model ------------------------------------------------------------------------------
model_dir = download_smollm2("weights")
model, tok = load(model_dir)
print(f"{model_dir}: {sum(p.data.size for _, p in model.named_parameters()):,} parameters, all frozen")

# --- 2. Before: the held-out questions ---------------------------------------------------------
questions = held_out_questions()[:2] if args.fast else held_out_questions()
print(f"\n== before fine-tuning: {len(questions)} held-out questions (greedy, at most {max_tokens} tokens) ==")
before = [answer(model, tok, q, max_tokens=max_tokens) for q in questions]
for q, a in zip(questions, before):
    print(f"Q: {q}\nA: {a}\n")

# --- 3. Fine-tune ------------------------------------------------------------------------------
# The demo's settings (tinylora.cli.demo.DEMO_DEFAULTS), spelled out. A learning rate of 5e-4 is
# high for a full fine-tune but usual for LoRA: only A and B move, and B starts at zero.
config = TrainConfig(
    data=str(DATA),                     # train.jsonl (36 conversations) + valid.jsonl (the 6 questions above)
    model=str(model_dir),               # recorded in adapter_config.json as base_model_name_or_path
    adapter_path=str(adapter_path),
    rank=8, alpha=16, targets="all-linear",   # q, k, v, o, gate, up, down in every layer; scale = 16 / 8 = 2
    batch_size=4, iters=iters, learning_rate=5e-4, lr_schedule="cosine", warmup=min(5, iters - 1),
    steps_per_report=2 if args.fast else 5, steps_per_eval=iters if args.fast else 25,
    save_every=iters if args.fast else 25, max_seq_length=256, seed=args.seed)
print(f"== fine-tuning: LoRA r = {config.rank}, alpha = {config.alpha:g}, {config.iters} steps of "
      f"{config.batch_size} conversations, lr {config.learning_rate:g} ({config.lr_schedule}) ==")
result = train(config, model, tok, progress=not args.fast)
first_loss, last_loss = result.train_losses[0][1], result.train_losses[-1][1]
print(f"train loss {first_loss:.3f} (first report) -> {last_loss:.3f} (last); "
      f"validation loss {result.val_losses[0][1]:.3f} -> {result.val_losses[-1][1]:.3f}")

# --- 4. After: the same questions --------------------------------------------------------------
print(f"\n== after fine-tuning: the same {len(questions)} held-out questions ==")
after = [answer(model, tok, q, max_tokens=max_tokens) for q in questions]
for q, a in zip(questions, after):
    print(f"Q: {q}\nA: {a}\n")
named = sum(NEW_NAME in a for a in after)
print(f"answers naming {NEW_NAME}: {sum(NEW_NAME in a for a in before)} of {len(questions)} before, "
      f"{named} of {len(questions)} after")

files = sorted(p.name for p in adapter_path.iterdir())
print(f"\nthe adapter (PEFT format) is in {adapter_path}/: {', '.join(files)}")
if temporary is None:
    print(f"try: tinylora generate --adapter-path {adapter_path} --prompt \"Who are you?\"")
else:
    print("(a temporary folder, removed now; pass --adapter-path DIR to keep it)")
    temporary.cleanup()

if not last_loss < first_loss:
    print(f"FAILED: the training loss did not fall ({first_loss:.3f} -> {last_loss:.3f})")
    sys.exit(1)
if not args.fast and named < MIN_ANSWERS_WITH_NAME:
    print(f"FAILED: only {named} of {len(questions)} held-out answers name {NEW_NAME} "
          f"(wanted {MIN_ANSWERS_WITH_NAME})")
    sys.exit(1)
print(f"OK: train loss {first_loss:.3f} -> {last_loss:.3f}"
      + ("" if args.fast else f"; {named} of {len(questions)} held-out answers name {NEW_NAME}"))
