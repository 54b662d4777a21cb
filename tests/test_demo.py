"""The quick-start on the real SmolLM2-135M-Instruct, shortened (slow: ~2 minutes on 2 cores)."""

import json

import pytest

from tinylora.cli import main

pytestmark = pytest.mark.slow


def test_demo_teaches_the_new_identity(smollm2_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(smollm2_dir), "--adapter-path", str(tmp_path / "identity"),
                 "--iters", "30"]) == 0
    out = capsys.readouterr().out
    before, after = out.split("== after fine-tuning")
    assert "小李" not in before.split("== fine-tuning")[0]             # the base model does not know the name
    answers = [line for line in after.splitlines() if line.startswith("A: ")]
    assert len(answers) == 6 and sum("小李" in a for a in answers) >= 4, answers   # held-out questions
    log = [json.loads(line) for line in (tmp_path / "identity" / "train_log.jsonl").read_text().splitlines()]
    val = [e["loss"] for e in log if e["kind"] == "val"]
    train = [e["loss"] for e in log if e["kind"] == "train"]
    assert val[-1] < 0.3 * val[0] and train[-1] < train[0]
    assert (tmp_path / "identity" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "identity" / "loss_curve.png").is_file()
