"""The training loop on a tiny random Qwen2: learning, exact resume, best/early stop, non-finite stop."""

import json
import os

import numpy as np
import pytest
from test_tokenizer import write_model_folder

from tinylora import is_grad_enabled
from tinylora.train import trainer as trainer_module
from tinylora.config import ModelConfig
from tinylora.errors import TinyloraError
from tinylora.lora.peft import load_adapter
from tinylora.model import CausalLM, random_state_dict
from tinylora.tokenizer import Tokenizer
from tinylora.train.data import encode_split, load_dataset
from tinylora.train import TrainConfig, evaluate, train

QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "你是谁？",
             "Tell me about you.", "What should I call you?", "Who built you?"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_folder(write_model_folder(tmp_path_factory.mktemp("tok") / "m", "smollm2"))


def tiny_model(tok, seed=0):
    config = ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "vocab_size": tok.vocab_size, "tie_word_embeddings": True})
    return CausalLM.from_state_dict(config, random_state_dict(config, np.random.default_rng(seed), std=0.1))


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "I am 小李."}]}
            for q in QUESTIONS]
    for name, part in (("train", rows[:6]), ("valid", rows[6:]), ("test", rows[6:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    return folder


def config(data, out, **kw):
    base = dict(data=str(data), adapter_path=str(out), rank=4, alpha=8, batch_size=2, iters=12,
                learning_rate=1e-2, steps_per_report=1, steps_per_eval=4, save_every=4, seed=3)
    return TrainConfig(**(base | kw))


def step_losses(out):
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if e["kind"] == "train"}


def test_training_lowers_the_loss_and_saves_everything(tok, data, tmp_path):
    out = tmp_path / "ad"
    result = train(config(data, out, iters=30, test=True), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    losses = [loss for _, loss in result.train_losses]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])           # measured: 5.5 -> 2.9
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "loss_curve.png",
                 "checkpoint/optimizer.safetensors", "checkpoint/trainer_state.json", "best/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert result.test_loss is not None and result.best_val == min(v for _, v in result.val_losses)
    load_adapter(tiny_model(tok), out)                           # the saved adapter loads back


@pytest.mark.parametrize("report_every", [1, 3], ids=["report every step", "report windows across the kill"])
def test_resume_after_a_kill_reproduces_the_uninterrupted_losses(tok, data, tmp_path, monkeypatch, report_every):
    # dropout on, grad accumulation on, cosine schedule: everything that carries state across steps;
    # reports every 3 steps put a report window across the checkpoint at step 8.
    kw = dict(dropout=0.1, grad_accum=2, lr_schedule="cosine", warmup=2, steps_per_report=report_every)
    full = tmp_path / "full"
    train(config(data, full, **kw), tiny_model(tok), tok, progress=False, log=lambda *a: None)

    killed = tmp_path / "killed"
    real_step, calls = trainer_module.AdamW.step, []

    def dies_at_step_10(self, lr=None):
        calls.append(1)
        if len(calls) == 10:                                      # after the checkpoint at step 8
            raise KeyboardInterrupt
        return real_step(self, lr)

    monkeypatch.setattr(trainer_module.AdamW, "step", dies_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, killed, **kw), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    monkeypatch.setattr(trainer_module.AdamW, "step", real_step)
    assert json.loads((killed / "checkpoint" / "trainer_state.json").read_text())["step"] == 8

    train(config(data, killed, resume=True, **kw), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    assert step_losses(killed) == step_losses(full)              # bit for bit, every report line


def test_grad_checkpoint_trains_to_the_same_losses(tok, data, tmp_path):
    # dropout on, gradient accumulation on: the recomputation must replay the masks and leave the
    # generators where the plain run leaves them, so every step's loss is the same float
    kw = dict(dropout=0.1, grad_accum=2, iters=8)
    train(config(data, tmp_path / "plain", **kw), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    model = tiny_model(tok)
    train(config(data, tmp_path / "ck", grad_checkpoint=True, **kw), model, tok, progress=False,
          log=lambda *a: None)
    assert step_losses(tmp_path / "ck") == step_losses(tmp_path / "plain")
    assert model.grad_checkpoint    # the generators end where the plain run's do (tests/test_checkpoint.py):
    #                                 a resumed run continues from the same states either way


def test_resume_refuses_a_missing_checkpoint_and_changed_settings(tok, data, tmp_path):
    with pytest.raises(TinyloraError, match="--resume: no checkpoint in"):
        train(config(data, tmp_path / "ad", resume=True), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    train(config(data, tmp_path / "ad", iters=4), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    with pytest.raises(TinyloraError, match="--resume: rank was 4 in the checkpointed run, now 2"):
        train(config(data, tmp_path / "ad", iters=4, rank=2, resume=True), tiny_model(tok), tok, progress=False,
              log=lambda *a: None)


def test_test_and_early_stop_need_their_files(tok, data, tmp_path):
    (data / "test.jsonl").unlink()
    with pytest.raises(TinyloraError, match="--test: .* has no test.jsonl"):
        train(config(data, tmp_path / "ad", test=True), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    (data / "valid.jsonl").unlink()
    with pytest.raises(TinyloraError, match="--early-stop needs validation data"):
        train(config(data, tmp_path / "ad", early_stop=2), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    assert not (tmp_path / "ad").exists()


def test_early_stop_keeps_the_best_adapter(tok, data, tmp_path):
    out = tmp_path / "ad"
    # a learning rate high enough to overshoot: validation stops improving, training stops early
    result = train(config(data, out, iters=60, learning_rate=3.0, steps_per_eval=2, early_stop=2), tiny_model(tok),
                   tok, progress=False, log=lambda *a: None)
    assert result.stopped_early and result.steps < 60
    best = load_adapter(tiny_model(tok), out / "best")           # the best adapter really is the best one
    valid = encode_split(load_dataset(data)["valid"], tok)
    assert evaluate(best, valid, 2, -1) == pytest.approx(result.best_val, rel=1e-5)
    assert result.best_val == min(v for _, v in result.val_losses)
    again = train(config(data, out, iters=60, learning_rate=3.0, steps_per_eval=2, early_stop=2, resume=True),
                  tiny_model(tok), tok, progress=False, log=lambda *a: None)
    assert again.steps == result.steps                           # a finished run resumes to nothing


def test_a_nan_loss_stops_training_and_keeps_the_last_checkpoint(tok, data, tmp_path, monkeypatch):
    out = tmp_path / "ad"
    model = tiny_model(tok)
    real_loss, calls = model.loss, []

    def goes_nan(*args):
        loss = real_loss(*args)
        if is_grad_enabled():                                    # a training step, not validation
            calls.append(1)
        if len(calls) == 5 and is_grad_enabled():                # step 5 (one micro-batch per step)
            loss.data = np.asarray(np.nan, dtype=loss.data.dtype)
        return loss

    model.loss = goes_nan
    with pytest.raises(TinyloraError, match=r"step 5: the loss is nan; training stopped"):
        train(config(data, out, steps_per_eval=100), model, tok, progress=False, log=lambda *a: None)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    load_adapter(tiny_model(tok), out / "checkpoint")


def test_an_infinite_gradient_stops_training_and_keeps_the_last_checkpoint(tok, data, tmp_path, monkeypatch):
    """The loss stays finite; an inf appears in one dA during step 5's backward."""
    from tinylora.ops.lora import LoraLinearFn
    out = tmp_path / "ad"
    real_backward, calls = LoraLinearFn.backward, []

    def poisoned(self, dy):
        grads = real_backward(self, dy)
        calls.append(1)
        if len(calls) == 4 * 14 + 1:                             # 2 layers x 7 adapted projections per step
            grads[2][0, 0] = np.inf
        return grads
    monkeypatch.setattr(LoraLinearFn, "backward", poisoned)
    with pytest.raises(TinyloraError, match=r"step 5: the gradient norm is inf; training stopped"):
        train(config(data, out, steps_per_eval=100), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    load_adapter(tiny_model(tok), out / "checkpoint")           # the last good checkpoint loads
    load_adapter(tiny_model(tok), out)                          # and so does the top-level adapter


@pytest.mark.parametrize("kw, message", [({"batch_size": 7}, "--batch-size 7 is larger than the 6 training"),
                                         ({"learning_rate": 0.0}, "--learning-rate must be a number > 0"),
                                         ({"rank": 0}, "--rank must be a whole number >= 1, got 0"),
                                         ({"iters": 5, "epochs": 1.0}, "not both")])
def test_bad_settings_are_one_line_errors(tok, data, tmp_path, kw, message):
    with pytest.raises(TinyloraError, match=message):
        train(config(data, tmp_path / "ad", **kw), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    assert not (tmp_path / "ad").exists()


def test_a_corrupt_trainer_state_is_one_line_naming_the_file(tok, data, tmp_path):
    train(config(data, tmp_path / "ad", iters=4), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    (tmp_path / "ad" / "checkpoint" / "trainer_state.json").write_text("{broken")
    with pytest.raises(TinyloraError, match=r"trainer_state\.json: malformed JSON"):
        train(config(data, tmp_path / "ad", iters=4, resume=True), tiny_model(tok), tok, progress=False,
              log=lambda *a: None)


def _current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_memory_stays_flat_over_a_long_run(tok, data, tmp_path, monkeypatch):
    """2,000 steps with evaluation and checkpoints: no growth from graphs, caches or logs kept
    alive. Memory after warm-up (step 200) may drift by allocator noise only."""
    samples = {}
    add = trainer_module.TrainLog.add

    def add_and_measure(self, **entry):
        if entry.get("kind") == "train":
            samples[entry["step"]] = _current_rss_mb()
        add(self, **entry)
    monkeypatch.setattr(trainer_module.TrainLog, "add", add_and_measure)
    train(config(data, tmp_path / "ad", iters=2000, steps_per_report=100, steps_per_eval=250, save_every=250),
          tiny_model(tok), tok, progress=False, log=lambda *a: None)
    settled = samples[200]
    growth = max(v for s, v in samples.items() if s >= 200) - settled
    assert growth < 15.0, f"memory grew by {growth:.1f} MB after step 200: {samples}"
