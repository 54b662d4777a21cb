"""The examples (examples/NN_*.py): each one's `--fast` mode runs in a subprocess, exits 0, and says what it claims.

Each example exits non-zero when its own key claim fails (01: the rank-4 fit;
02: the loss, the frozen W; 06: a wrong backward passing), so exit status 0
is most of the test; the checks on the printed lines make sure the narrative
a reader sees is the one the example is about.

Every examples/NN_*.py must have an entry in EXAMPLES below
(`test_every_example_is_tested`), so a new example cannot land untested.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "examples"
TIMEOUT = 300          # seconds: a generous ceiling for a --fast run, which takes a few seconds


def run_example(name: str, *args: str) -> str:
    """Run examples/<name> with --fast (plus args); assert exit 0 and return its stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(EXAMPLES_DIR / name), "--fast", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (f"{name} --fast exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}"
                                  f"\n--- stderr ---\n{proc.stderr}")
    return proc.stdout


def check_01(out: str) -> None:
    assert "OK: rank 4 error" in out
    # step 0 of the first-steps table: B = 0, so dL/dA is exactly zero while dL/dB is not
    step0 = re.search(r"^\s+0\s+(\S+)\s+(\S+)\s+(\S+)\s+", out, re.MULTILINE)
    assert step0, "no step-0 row in the first-steps table"
    assert float(step0.group(3)) == 0.0 and float(step0.group(2)) > 0.0, step0.group(0)
    # the rank sweep: R, params, achieved, optimum, achieved/optimum
    rows = {int(m.group(1)): (float(m.group(3)), float(m.group(4)), float(m.group(5)))
            for m in re.finditer(r"^\s+(\d)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)}
    assert sorted(rows) == [1, 2, 4, 8], rows
    for r in (1, 2, 4):
        assert rows[r][2] <= 1.01, f"rank {r} is not at the Eckart-Young optimum: {rows[r]}"
    assert rows[1][0] > rows[2][0] > 10 * rows[4][0], "the plateaus of R < 4 should sit far above rank 4"


def check_02(out: str) -> None:
    assert "LoRA output equals the frozen layer's output exactly: True" in out
    assert "‖dL/dA‖ = 0," in out
    assert "W unchanged: True; W.grad is None: True" in out
    drop = float(re.search(r"\(([\d.e+]+)x lower\)", out).group(1))
    assert drop >= 100, f"loss fell only {drop}x"
    assert "OK: output = base at step 0" in out


def check_03(out: str) -> None:
    assert "== before fine-tuning: 2 held-out questions" in out                  # --fast: 2 questions
    assert out.count("\nQ: ") == 4, "2 questions, asked before and after"
    assert "answers naming 小李: 0 of 2 before" in out                            # the base model never says it
    assert re.search(r"is in \S+: adapter_config.json, adapter_model.safetensors", out)
    assert "OK: train loss" in out                                               # --fast claims only the fall


def check_04(out: str) -> None:
    assert "train.jsonl (30 lines) and valid.jsonl (6 lines)" in out
    assert '{"prompt": "What is the capital of Zorvania?", "completion":' in out
    assert out.count("\nQ: ") == 4, "2 held-out questions, asked before and after"
    assert "held-out answers stating their fact: 0 of 2 before" in out
    first, last = map(float, re.search(r"OK: train loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first


def check_05(out: str) -> None:
    assert "loaded with tinylora.load alone: 0 LoRA layers" in out
    assert re.search(r"model\.safetensors\s+[\d,]{11,} bytes", out), "a ~540 MB float32 model.safetensors"
    assert "tokenizer.json" in out and "adapter_model.safetensors" not in out
    changed = int(re.search(r"answers the adapter changed \(vs the base model\): (\d) of 2", out).group(1))
    assert changed >= 1, "the tiny adapter changed no answer: fused == unfused would prove little"
    assert "fused answers identical to base + adapter, token for token: 2 of 2" in out
    assert "OK: the fused model, loaded without the adapter, generates the same" in out


def check_06(out: str) -> None:
    assert "float64 reaches" in out and "float32 only" in out
    assert "at x" in out and ": ok" in out                                          # RMSNorm's table
    assert "checked through .sum() (upstream gradient all equal): passes" in out   # the bug .sum() hides
    assert "<-- FAIL" in out and "FAILED" in out                                   # ... and gradcheck catches
    assert "RMSNorm with rstd treated as a constant: caught" in out
    assert "frozen tensors that received a gradient: none" in out
    assert "more rows ..." in out                                                  # --fast shortens the table
    assert "both wrong backwards are caught" in out


# file name -> the check of its --fast output
EXAMPLES = {
    "01_low_rank_factorisation.py": check_01,
    "02_one_lora_layer.py": check_02,
    "03_identity_finetune.py": check_03,       # 03-05 load the real SmolLM2-135M-Instruct: slow
    "04_qa_finetune.py": check_04,             # (below), under a minute each with --fast on 2 cores
    "05_fuse_and_generate.py": check_05,
    "06_gradient_check.py": check_06,
}


# the examples that need the real model (weights/SmolLM2-135M-Instruct): run with --slow
REAL_MODEL = {"03_identity_finetune.py", "04_qa_finetune.py", "05_fuse_and_generate.py"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in REAL_MODEL else name
                                  for name in sorted(EXAMPLES)])
def test_example_fast_mode(name):
    EXAMPLES[name](run_example(name))


def test_examples_are_deterministic():
    """Same seed, same output: the examples draw all randomness from --seed."""
    assert run_example("01_low_rank_factorisation.py", "--seed", "3") == \
        run_example("01_low_rank_factorisation.py", "--seed", "3")


def test_every_example_is_tested():
    on_disk = sorted(p.name for p in EXAMPLES_DIR.glob("[0-9][0-9]_*.py"))
    missing = [name for name in on_disk if name not in EXAMPLES]
    assert not missing, f"examples without a test in tests/test_examples.py: {missing}"
