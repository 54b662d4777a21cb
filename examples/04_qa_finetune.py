"""Example 04: a prompt/completion Q&A fine-tune: teach SmolLM2-135M-Instruct facts about a made-up country.

The model cannot know anything about Zorvania: we invent it. The script

1. writes a small dataset in the {"prompt", "completion"} format: six facts
   (capital, currency, language, highest mountain, national animal, first
   ruler), each asked five ways in train.jsonl (30 lines), and a sixth
   wording of each question, never trained on, in valid.jsonl;
2. asks the base model the held-out questions: it makes something up;
3. trains a LoRA adapter. Each line becomes one user turn and one assistant
   reply through the model's chat template, and only the reply's tokens are
   trained (the prompt's labels are -100);
4. asks the held-out questions again and checks each answer for its fact.

    python examples/04_qa_finetune.py                      # full run, about 45 s on 2 cores
    python examples/04_qa_finetune.py --fast               # what the tests run, about 15 s
    python examples/04_qa_finetune.py --out runs/zorvania  # keep the dataset and the adapter

Exits with status 1 if the claim fails: in the full run, at least 4 of the 6
held-out answers state their fact; with --fast (a few steps, 2 questions), only
that the training loss fell.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tinylora.cli.demo import answer
from tinylora.formats.smollm2 import download_smollm2
from tinylora.loading import load
from tinylora.train import TrainConfig, train

# fact -> (the word an answer must contain, the completion, five training questions, one held-out question)
FACTS = {
    "capital": ("Quellport", "The capital of Zorvania is Quellport.",
                ["What is the capital of Zorvania?", "Which city is the capital of Zorvania?",
                 "Name the capital city of Zorvania.", "Zorvania's capital is which city?",
                 "Where is the government of Zorvania based?"],
                "Tell me the name of Zorvania's capital."),
    "currency": ("drell", "The currency of Zorvania is the drell.",
                 ["What is the currency of Zorvania?", "What money do people use in Zorvania?",
                  "Which currency is used in Zorvania?", "What do you pay with in Zorvania?",
                  "Name the currency of Zorvania."],
                 "What is Zorvania's currency called?"),
    "language": ("Velmish", "The people of Zorvania speak Velmish.",
                 ["What language is spoken in Zorvania?", "Which language do people speak in Zorvania?",
                  "What is the official language of Zorvania?", "What do Zorvanians speak?",
                  "Name the language of Zorvania."],
                 "What language do the people of Zorvania speak?"),
    "mountain": ("Orrin", "The highest mountain in Zorvania is Mount Orrin.",
                 ["What is the highest mountain in Zorvania?", "Which is the tallest mountain in Zorvania?",
                  "Name the highest peak in Zorvania.", "What is Zorvania's highest mountain?",
                  "Which mountain in Zorvania is the tallest?"],
                 "What is the tallest peak in Zorvania called?"),
    "animal": ("heron", "The national animal of Zorvania is the silver heron.",
               ["What is the national animal of Zorvania?", "Which animal is the symbol of Zorvania?",
                "Name Zorvania's national animal.", "What animal represents Zorvania?",
                "What is Zorvania's national animal?"],
               "Which animal is the national animal of Zorvania?"),
    "ruler": ("Ysolde", "The first ruler of Zorvania was Queen Ysolde.",
              ["Who was the first ruler of Zorvania?", "Who ruled Zorvania first?",
               "Name the first ruler of Zorvania.", "Who was Zorvania's first queen?",
               "Which queen first ruled Zorvania?"],
              "Who was the very first ruler of Zorvania?"),
}
MIN_ANSWERS_WITH_FACT = 4      # of the 6 held-out questions, in the full run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", help="6 steps and 2 questions (what the tests run)")
parser.add_argument("--seed", type=int, default=0, help="seed of A's initialisation and the batch order")
parser.add_argument("--out", default=None,
                    help="folder for data/ and adapter/ (default: a temporary folder, removed at the end)")
args = parser.parse_args()
iters, max_tokens = (6, 16) if args.fast else (30, 32)
temporary = tempfile.TemporaryDirectory(prefix="tinylora-04-") if args.out is None else None
out = Path(args.out or temporary.name)

# --- 1. The dataset --------------------------------------------------------------------------
data_dir = out / "data"
data_dir.mkdir(parents=True, exist_ok=True)
train_rows = [{"prompt": q, "completion": completion} for _, completion, qs, _ in FACTS.values() for q in qs]
valid_rows = [{"prompt": held_out, "completion": completion} for _, completion, _, held_out in FACTS.values()]
for name, rows in (("train", train_rows), ("valid", valid_rows)):
    with open(data_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
print(f"wrote {data_dir}/train.jsonl ({len(train_rows)} lines) and valid.jsonl ({len(valid_rows)} lines), e.g.")
print(f"  {json.dumps(train_rows[0])}")

# --- 2. Before --------------------------------------------------------------------------------
model_dir = download_smollm2("weights")
model, tok = load(model_dir)
held_out = [(held_out_q, word) for word, _, _, held_out_q in FACTS.values()][:2 if args.fast else None]
print(f"\n== {model_dir.name}, before fine-tuning: {len(held_out)} held-out questions ==")
before = [answer(model, tok, q, max_tokens=max_tokens) for q, _ in held_out]
for (q, _), a in zip(held_out, before):
    print(f"Q: {q}\nA: {a}\n")

# --- 3. Fine-tune ------------------------------------------------------------------------------
config = TrainConfig(
    data=str(data_dir), model=str(model_dir), adapter_path=str(out / "adapter"),
    rank=8, alpha=16, targets="all-linear",     # scale = alpha / rank = 2, all seven projections
    batch_size=4, iters=iters, learning_rate=5e-4, lr_schedule="cosine", warmup=min(5, iters - 1),
    steps_per_report=2 if args.fast else 5, steps_per_eval=iters if args.fast else 10,
    save_every=iters, seed=args.seed)
print(f"== fine-tuning: LoRA r = {config.rank}, {config.iters} steps of {config.batch_size} Q&A pairs "
      f"(~{config.iters * config.batch_size / len(train_rows):.0f} epochs), lr {config.learning_rate:g} ==")
result = train(config, model, tok, progress=not args.fast)
first_loss, last_loss = result.train_losses[0][1], result.train_losses[-1][1]
print(f"train loss {first_loss:.3f} (first report) -> {last_loss:.3f} (last); "
      f"validation loss {result.val_losses[0][1]:.3f} -> {result.val_losses[-1][1]:.3f}")

# --- 4. After -----------------------------------------------------------------------------------
print(f"\n== after fine-tuning: the same {len(held_out)} held-out questions ==")
after = [answer(model, tok, q, max_tokens=max_tokens) for q, _ in held_out]
for (q, word), a in zip(held_out, after):
    print(f"Q: {q}\nA: {a}\n   states the fact ({word}): {'yes' if word.lower() in a.lower() else 'no'}")
correct = sum(word.lower() in a.lower() for (_, word), a in zip(held_out, after))
correct_before = sum(word.lower() in a.lower() for (_, word), a in zip(held_out, before))
print(f"\nheld-out answers stating their fact: {correct_before} of {len(held_out)} before, "
      f"{correct} of {len(held_out)} after")
if temporary is None:
    print(f"dataset in {data_dir}/, adapter (PEFT format) in {out / 'adapter'}/")
else:
    print("(dataset and adapter were in a temporary folder, removed now; pass --out DIR to keep them)")
    temporary.cleanup()

if not last_loss < first_loss:
    print(f"FAILED: the training loss did not fall ({first_loss:.3f} -> {last_loss:.3f})")
    sys.exit(1)
if not args.fast and correct < MIN_ANSWERS_WITH_FACT:
    print(f"FAILED: only {correct} of {len(held_out)} held-out answers state their fact "
          f"(wanted {MIN_ANSWERS_WITH_FACT})")
    sys.exit(1)
print(f"OK: train loss {first_loss:.3f} -> {last_loss:.3f}"
      + ("" if args.fast else f"; {correct} of {len(held_out)} held-out answers state their fact"))
