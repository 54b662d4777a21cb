"""mlx-lm adapters with mlx-lm itself (slow; the interop extra: MLX's CPU build on Linux).

1. The quick-start's identity adapter, trained here on the SmolLM2 folder and
   exported with `tinylora export --to mlx`: `mlx_lm.generate --adapter-path`
   answers with tinylora's greedy text (the command as a user runs it), and
   mlx-lm's Python API gives tinylora's greedy tokens on further held-out questions.
2. An adapter written by `mlx_lm.lora` itself (2 steps on the identity data, the
   last 4 layers, mlx-lm's own defaults for everything else: rank 8, scale 20, no keys)
   loads here, and tinylora's logits over a whole prompt are mlx-lm's with that adapter
   to 5e-5 of the largest logit (both float32 on the same weights, summing in different
   orders; measured 1.3e-4 of a largest logit of 57, where the adapter itself moves the
   logits by ~40); training goes on from it here with --resume-adapter-file.
"""

import json
import subprocess
import sys
from importlib.resources import files

import numpy as np
import pytest

import tinylora as tl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlx_lm():
    pytest.importorskip("mlx.core", reason="mlx (interop extra) not installed")
    return pytest.importorskip("mlx_lm", reason="mlx-lm (interop extra) not installed")


IDENTITY = files("tinylora.cli") / "demo_data" / "identity"


@pytest.fixture(scope="module")
def identity_mlx(smollm2_dir, tmp_path_factory):
    """The identity adapter trained on the float32 SmolLM2 folder (30 steps), and its mlx-lm export."""
    from tinylora.loading import load
    from tinylora.lora.to_mlx import export_mlx
    from tinylora.train import TrainConfig, train
    folder = tmp_path_factory.mktemp("identity") / "adapter"
    model, tok = load(smollm2_dir)
    config = TrainConfig(data=str(IDENTITY), adapter_path=str(folder), iters=30, batch_size=4, learning_rate=5e-4,
                         steps_per_eval=30, val_batches=-1, seed=0)
    train(config, model, tok, progress=False, log=lambda *a: None)
    return folder, export_mlx(folder, folder.parent / "mlx")


def tinylora_answer(model, tok, question, max_tokens=24):
    from tinylora.generate import stream_generate
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    out = list(stream_generate(model, ids, max_tokens=max_tokens))
    eos = tok.eos_token_id
    return ids, out[:out.index(eos)] if eos in out else out


def test_mlx_lm_generate_answers_with_the_exported_adapter(mlx_lm, smollm2_dir, identity_mlx):
    from tinylora.cli.demo import held_out_questions
    from tinylora.loading import load
    from tinylora.lora import load_adapter
    folder, exported = identity_mlx
    model, tok = load(smollm2_dir)
    load_adapter(model, folder)
    questions = held_out_questions()[:4]

    _, ours = tinylora_answer(model, tok, questions[0])
    done = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(smollm2_dir),
                           "--adapter-path", str(exported), "--prompt", questions[0], "--max-tokens", "24",
                           "--temp", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout.split("==========")[1].strip()                  # mlx_lm.generate prints it between rules
    assert text == tok.decode(ours).strip() and "小李" in text

    from mlx_lm import generate as mlx_generate
    from mlx_lm import load as mlx_load
    theirs_model, theirs_tok = mlx_load(str(smollm2_dir), adapter_path=str(exported))
    trained = 0
    for question in questions[1:]:
        ids, ours = tinylora_answer(model, tok, question)
        theirs = mlx_generate(theirs_model, theirs_tok, prompt=ids, max_tokens=24, verbose=False)
        assert theirs.strip() == tok.decode(ours).strip(), question
        trained += "小李" in theirs
    assert trained >= 2                                                  # the adapter's answer, not the base's


def test_an_adapter_mlx_lm_trained_gives_mlx_lms_logits_here(mlx_lm, smollm2_dir, tmp_path):
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    from tinylora.loading import load
    from tinylora.lora import load_adapter
    from tinylora.train import TrainConfig, train
    theirs_path = tmp_path / "mlx-trained"
    done = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--model", str(smollm2_dir), "--train",
                           "--data", str(IDENTITY), "--iters", "2", "--batch-size", "2", "--num-layers", "4",
                           "--learning-rate", "1e-3", "--val-batches", "1", "--steps-per-eval", "100",
                           "--adapter-path", str(theirs_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((theirs_path / "adapter_config.json").read_text())["fine_tune_type"] == "lora"

    model, tok = load(smollm2_dir)
    load_adapter(model, theirs_path)
    c = model.lora_config
    assert (c.r, c.scale, c.layers) == (8, 20.0, [26, 27, 28, 29])
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    with tl.no_grad():
        ours = model(np.array([ids])).data[0].astype(np.float64)
    theirs_model, _ = mlx_load(str(smollm2_dir), adapter_path=str(theirs_path))
    theirs = np.array(theirs_model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    tolerance = 5e-5 * np.abs(ours).max()
    assert np.abs(ours - theirs).max() <= tolerance, np.abs(ours - theirs).max()
    plain_model, _ = mlx_load(str(smollm2_dir))
    plain = np.array(plain_model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    assert np.abs(plain - theirs).max() > 100 * tolerance                 # the adapter moves the logits

    out = tmp_path / "continued"                                          # and training goes on from it here
    model, tok = load(smollm2_dir)
    result = train(TrainConfig(data=str(IDENTITY), adapter_path=str(out), iters=2, batch_size=2, learning_rate=1e-4,
                               resume_adapter_file=str(theirs_path / "adapters.safetensors"), val_batches=1,
                               steps_per_eval=100), model, tok, progress=False, log=lambda *a: None)
    assert result.steps == 2
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["layers_to_transform"]) == (8, 160, [26, 27, 28, 29])
