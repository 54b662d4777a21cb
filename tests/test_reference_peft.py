"""Parity with PEFT: adapters cross between tinylora and PEFT in both directions.

(a) an adapter saved by tinylora loads with `PeftModel.from_pretrained`, without
    warnings, and PEFT's logits equal tinylora's;
(b) an adapter made and saved by PEFT loads in tinylora, and logits, the loss on
    a padded batch with -100 labels, and every A and B gradient equal PEFT's;
(c) `parameter_report` is PEFT's `print_trainable_parameters` line.

Each runs on a tiny random Qwen2 saved by transformers, and (slow) on the real
SmolLM2-135M-Instruct, whose transformers model is the shared `transformers_gguf`
fixture: it is deep-copied before PEFT injects into it. B is always set
non-zero: with B = 0 an adapter changes nothing and the gradient of A is zero.
Skipped when the reference extra (torch, transformers, peft) is not installed.
"""

import copy
import warnings

import numpy as np
import pytest
from helpers import assert_close

torch = pytest.importorskip("torch", reason="reference extra not installed (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="reference extra not installed")
hf_peft = pytest.importorskip("peft", reason="reference extra not installed (pip install peft)")

import tinylora as tl  # noqa: E402
from tinylora.lora.peft import load_adapter, save_adapter  # noqa: E402
from tinylora.loading import load_model  # noqa: E402
from tinylora.lora import LoraConfig, apply_lora, lora_layers, lora_parameters, parameter_report  # noqa: E402
from tinylora.tokenizer import Tokenizer  # noqa: E402

LOGIT_TOL = 1e-4     # SPEC §3.4: same logits within 1e-4 absolute, float32
LOSS_TOL = 1e-5      # one mean of ~10 float32 cross-entropies: a few ulps of ~5
GRAD_RTOL = 1e-4     # SPEC §3.4: relative 1e-4 in float32, as max |ours - PEFT's| / max |PEFT's| per tensor

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture
def tiny(tmp_path):
    """(transformers Qwen2 with non-trivial biases and norms, the folder it is saved in)"""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path / "base")
    return model, tmp_path / "base"


def batch(vocab: int, seed: int = 0):
    """ids (2, 9), right-padded mask, labels with -100 at padding and on a 2-token prompt."""
    ids = np.random.default_rng(seed).integers(0, vocab, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :2] = -100
    return ids, mask, labels


def max_error(got, expected, what, tol) -> str:
    """Absolute comparison within tol; returns the max error as a line for the report (pytest -s shows it)."""
    assert_close(got, expected, tol, what)
    err = float(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64)).max())
    return f"{what}: max |tinylora - PEFT| = {err:.2e}"


def peft_logits(peft_model, ids, mask):
    with torch.no_grad():
        return peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def our_logits(model, ids, mask):
    with tl.no_grad():
        return model(ids, mask).data


# ---- (a) tinylora -> PEFT -----------------------------------------------------------------------------
def check_ours_in_peft(ref_model, base_dir, tmp_path, ids, mask, b_std=0.05, tol=LOGIT_TOL, **lora):
    ours = apply_lora(load_model(base_dir), LoraConfig(**lora), seed=0)
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(ours):
        layer.lora_B.weight.data = (b_std * rng.standard_normal(layer.lora_B.weight.shape)).astype(np.float32)
    save_adapter(ours, tmp_path / "ours")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = hf_peft.PeftModel.from_pretrained(ref_model, tmp_path / "ours").eval()
    from_peft = [str(w.message) for w in caught if "/peft/" in w.filename.replace("\\", "/")]
    assert not from_peft, from_peft
    assert theirs.peft_config["default"].use_rslora == lora.get("use_rslora", False)

    real = mask.astype(bool)
    print(max_error(our_logits(ours.train(False), ids, mask)[real], peft_logits(theirs, ids, mask)[real],
                    "logits (tinylora adapter in PEFT)", tol))


@pytest.mark.parametrize("lora", [
    dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=2, alpha=6, target_modules="all-linear", use_rslora=True, layers=[1]),
])
def test_tinylora_adapter_loads_in_peft(tiny, tmp_path, lora):
    ref, base_dir = tiny
    check_ours_in_peft(ref, base_dir, tmp_path, *batch(SMALL["vocab_size"])[:2], **lora)


# ---- (b) PEFT -> tinylora, and (c) the parameter report -----------------------------------------------
def check_peft_in_ours(ref_model, base_dir, tmp_path, capsys, ids, mask, labels, b_std=0.05, tol=LOGIT_TOL,
                       grad_rtol=GRAD_RTOL, **lora):
    torch.manual_seed(0)
    theirs = hf_peft.get_peft_model(ref_model, hf_peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights="gaussian",
                                                                   **lora))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)   # (it would look for a config.json)

    ours = load_adapter(load_model(base_dir), tmp_path / "theirs").train(False)
    real = mask.astype(bool)
    report = [max_error(our_logits(ours, ids, mask)[real], peft_logits(theirs.eval(), ids, mask)[real],
                        "logits (PEFT adapter in tinylora)", tol)]

    expected = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    expected.backward()
    loss = ours.loss(ids, labels, mask)
    loss.backward()
    report.append(max_error(loss.item(), expected.item(), "loss", LOSS_TOL))

    peft_grads = {name.replace(".default.", "."): p.grad.numpy() for name, p in theirs.named_parameters()
                  if p.requires_grad}
    our_grads = {name: t.grad for name, t in lora_parameters(ours)}
    assert sorted(our_grads) == sorted(peft_grads)
    worst = 0.0
    for name, g in our_grads.items():
        ref = peft_grads[name]
        assert np.abs(ref).max() > 0, f"{name}: PEFT's gradient is zero, the check would be vacuous"
        rel = float(np.abs(g - ref).max() / np.abs(ref).max())
        assert rel <= grad_rtol, f"{name}: gradient relative error {rel:.2e} > {grad_rtol:.0e}"
        worst = max(worst, rel)
    assert not any(t.grad is not None for _, t in ours.named_parameters() if not t.requires_grad)
    report.append(f"A/B gradients over {len(our_grads)} tensors: max relative error {worst:.2e}")

    capsys.readouterr()
    theirs.print_trainable_parameters()
    assert parameter_report(ours) == capsys.readouterr().out.strip()
    with capsys.disabled():
        print("\n" + "\n".join(report + [parameter_report(ours)]))
    return parameter_report(ours)


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=2, lora_alpha=6, target_modules="all-linear", use_rslora=True),
    dict(r=3, lora_alpha=5, target_modules=["o_proj", "down_proj", "gate_proj", "k_proj", "up_proj"],
         layers_to_transform=[1]),     # PEFT refuses layers_to_transform with the string "all-linear"
])
def test_peft_adapter_loads_in_tinylora(tiny, tmp_path, capsys, lora):
    ref, base_dir = tiny
    check_peft_in_ours(ref, base_dir, tmp_path, capsys, *batch(SMALL["vocab_size"]), **lora)


# ---- the real SmolLM2 (slow) --------------------------------------------------------------------------
def smollm2_batch(folder):
    """Two chat prompts, right-padded; labels on the answers only. Real text, as SPEC §3.3's parity is
    measured on: the base model alone is ~6e-5 from transformers on it (~8e-5 on random ids)."""
    tok = Tokenizer.from_folder(folder)
    prompts = [("What is the capital of France?", "Paris."), ("Who are you?", "I am 小李, an AI assistant.")]
    rows, starts = [], []
    for question, answer in prompts:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        rows.append(prompt + tok.encode(answer))
        starts.append(len(prompt))
    T = max(map(len, rows))
    ids = np.array([r + [0] * (T - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    labels = np.where(mask == 1, ids, -100)
    for row, start in enumerate(starts):
        labels[row, :start] = -100
    return ids, mask, labels


SMOLLM2_B_STD = 0.01     # moves SmolLM2's logits by ~6: far beyond the tolerance, yet an adapter-sized change
# SPEC's 1e-4 is float32's noise floor on SmolLM2's 30 layers, so it holds on the tiny model (by ~1000x), not here.
# Measured against the float64 truth (tinylora in float64, whose gradients gradcheck verifies): tinylora's float32
# logits are up to 1.2e-4 off it and PEFT's 0.7e-4; PEFT's float32 A/B gradients are 1.2e-4 off it (relative),
# tinylora's 1.7e-5. Two float32 results may differ by the sum.
SMOLLM2_TOL = 3e-4


@pytest.mark.slow
def test_smollm2_tinylora_adapter_loads_in_peft(smollm2_dir, transformers_gguf, tmp_path):
    ref = copy.deepcopy(transformers_gguf[0])             # PeftModel injects into the model it is given
    ids, mask, _ = smollm2_batch(smollm2_dir)
    check_ours_in_peft(ref, smollm2_dir, tmp_path, ids, mask, b_std=SMOLLM2_B_STD, tol=SMOLLM2_TOL, r=8, alpha=16,
                       target_modules="all-linear")


@pytest.mark.slow
def test_smollm2_peft_adapter_loads_in_tinylora(smollm2_dir, transformers_gguf, tmp_path, capsys):
    ref = copy.deepcopy(transformers_gguf[0])
    report = check_peft_in_ours(ref, smollm2_dir, tmp_path, capsys, *smollm2_batch(smollm2_dir),
                                b_std=SMOLLM2_B_STD, tol=SMOLLM2_TOL, grad_rtol=SMOLLM2_TOL, r=8, lora_alpha=16,
                                target_modules="all-linear")
    # The figures the issue quotes for SmolLM2-135M, r=8, all-linear.
    assert report == "trainable params: 2,442,240 || all params: 136,957,248 || trainable%: 1.7832"
