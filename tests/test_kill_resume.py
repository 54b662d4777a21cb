"""Crashes lose nothing (SPEC §5): `tinylora train` killed with SIGKILL at arbitrary moments,
including while it saves, then resumed; the resumed run reproduces the uninterrupted run's losses.

Slow: each kill costs a process start (imports, cached JIT code) and a short run of a tiny Qwen2.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_tokenizer import write_model_folder

from tinylora.config import ModelConfig
from tinylora.lora.peft import load_adapter
from tinylora.formats.safetensors import write_safetensors
from tinylora.model import CausalLM, random_state_dict
from tinylora.tokenizer import Tokenizer

QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "你是谁？",
             "Tell me about you.", "What should I call you?", "Who built you?"]
ITERS = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model_dir = write_model_folder(root / "model", "qwen2")
    vocab = Tokenizer.from_folder(model_dir).vocab_size
    config = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
              "tie_word_embeddings": True}
    config |= {k: v for k, v in json.loads((model_dir / "config.json").read_text()).items() if k.endswith("_id")}
    (model_dir / "config.json").write_text(json.dumps(config))
    write_safetensors(model_dir / "model.safetensors",
                      random_state_dict(ModelConfig.from_dict(config), np.random.default_rng(0), std=0.1))
    data = root / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "I am 小李."}]}
            for q in QUESTIONS]
    for name, part in (("train", rows[:6]), ("valid", rows[6:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return root, model_dir, data


def command(model_dir, data, out, *extra):
    return [sys.executable, "-m", "tinylora.cli", "train", "--model", str(model_dir), "--data", str(data),
            "--adapter-path", str(out), "--rank", "4", "--alpha", "8", "--batch-size", "2", "--iters", str(ITERS),
            "--learning-rate", "0.01", "--steps-per-report", "1", "--steps-per-eval", "6", "--save-every", "2",
            "--seed", "3", *extra]


def train_losses(out):
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if e["kind"] == "train"}


def start_training(argv):
    """Start `tinylora train` and return (process, moment its first training step was reported)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("Iter 1: Train"):
            return process, time.perf_counter()
    raise AssertionError(f"training never reported step 1 (exit code {process.wait()})")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_reproduces_the_run(setup):
    root, model_dir, data = setup
    reference = root / "reference"
    process, first_step = start_training(command(model_dir, data, reference))
    process.stdout.read()
    assert process.wait(timeout=600) == 0
    duration = time.perf_counter() - first_step       # the training phase, after start-up
    want = train_losses(reference)
    assert sorted(want) == list(range(1, ITERS + 1))

    rng = np.random.default_rng()                 # a different set of moments on every run
    moments = [0.1, 0.4, 0.7] + list(rng.uniform(0.0, 0.95, 3))      # fractions of the training phase
    resumed_from = []
    for i, fraction in enumerate(moments):
        out = root / f"killed{i}"
        process, _ = start_training(command(model_dir, data, out))
        time.sleep(fraction * duration)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        process.stdout.close()
        state = out / "checkpoint" / "trainer_state.json"
        if not state.exists():                    # killed before the first checkpoint: nothing to resume
            resumed_from.append(0)
            continue
        # whatever moment the kill hit, the checkpoint is complete: its adapter loads
        step = json.loads(state.read_text())["step"]
        resumed_from.append(step)
        load_adapter(CausalLM.from_state_dict(ModelConfig.from_json(model_dir / "config.json"),
                                              random_state_dict(ModelConfig.from_json(model_dir / "config.json"),
                                                                np.random.default_rng(0))), out / "checkpoint")
        result = subprocess.run(command(model_dir, data, out, "--resume"), capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr
        got = train_losses(out)
        assert sorted(got) == list(range(1, ITERS + 1)), f"kill at {fraction:.2f}: steps {sorted(got)}"
        for s in range(step + 1, ITERS + 1):
            assert got[s] == want[s], f"kill at {fraction:.2f} (checkpoint {step}): step {s} {got[s]} != {want[s]}"
    print("resumed from checkpoints at steps", resumed_from, f"(training phase {duration:.2f} s)")
    assert any(resumed_from), f"no kill landed after a checkpoint: {resumed_from} (training took {duration:.1f} s)"
