"""`fuse` and `save_model`: base model + adapter -> a merged Hugging Face folder that transformers loads.

The checks against transformers (tiny random Qwen2; slow: the real SmolLM2)
skip without torch; the refusals, bf16 handling and atomicity run without it.
"""

import json

import numpy as np
import pytest
from helpers import assert_close

import tinylora as tl
from tinylora.config import ModelConfig
from tinylora.errors import TinyloraError
from tinylora.formats.files import write_json
from tinylora.formats.safetensors import BFLOAT16, read_header, read_safetensors, write_safetensors
from tinylora.kernels.weights import BF16Weight
from tinylora.loading import load_model
from tinylora.lora import LoraConfig, apply_lora, lora_layers, merge
from tinylora.lora import fused as export
from tinylora.lora.fused import TOKENIZER_FILES, fuse, save_model
from tinylora.lora.peft import save_adapter
from tinylora.model import random_state_dict

LOGIT_TOL = 1e-4     # SPEC §3.4: the fused model gives the unmerged model's logits within 1e-4 (float32)
# On SmolLM2's 30 layers float32 itself is ~1e-4 off the float64 truth, in tinylora and in transformers alike
# (measured; see test_reference_peft.py), so two float32 results may differ by up to twice that.
SMOLLM2_TOL = 3e-4
BF16_TOL = 0.1       # bf16 keeps 8 significant bits: every weight moves by up to 2^-9 of itself, which moves
                     # this random model's O(1) logits by ~0.04 (measured); the exact check is on the bits

TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
        "tie_word_embeddings": True, "torch_dtype": "float32"}
IDS = np.array([[3, 17, 5, 29, 8, 1], [7, 2, 30, 11, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
REAL = MASK.astype(bool)


def add_tokenizer_files(folder):
    """Stand-ins with recognisable bytes: fuse copies these files, it never parses them."""
    for name in TOKENIZER_FILES:
        if not (folder / name).exists():
            (folder / name).write_text(f'{{"file": "{name}"}}\n')


@pytest.fixture
def base_dir(tmp_path):
    """A tiny random Qwen2 written without torch (tied embeddings, q/k/v biases)."""
    folder = tmp_path / "base"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors",
                      random_state_dict(ModelConfig.from_dict(TINY), np.random.default_rng(0), std=0.2))
    write_json(folder / "config.json", TINY)
    add_tokenizer_files(folder)
    return folder


def adapted(base_dir, dtype="float32"):
    """The base model with LoRA on all seven projections and B set non-zero."""
    model = apply_lora(load_model(base_dir, dtype=dtype), LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=0)
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = (0.2 * rng.standard_normal(layer.lora_B.weight.shape)).astype(np.float32)
    return model


def logits(model):
    with tl.no_grad():
        return model(IDS, MASK).data


def fused(base_dir, tmp_path, dtype):
    """(logits of the unmerged LoRA model, the folder fuse wrote)"""
    model = adapted(base_dir)
    save_adapter(model, tmp_path / "adapter")
    out = fuse(base_dir, tmp_path / "adapter", tmp_path / f"fused-{dtype}", dtype=dtype)
    return logits(model.train(False)), out


# ---- the fused folder ---------------------------------------------------------------------------------
def test_fused_folder_is_complete_and_loads_without_the_adapter(base_dir, tmp_path):
    unmerged, out = fused(base_dir, tmp_path, "float32")
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "model.safetensors", *TOKENIZER_FILES])
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (base_dir / name).read_bytes()
    assert json.loads((out / "config.json").read_text()) == TINY           # float32 already
    names, metadata = read_header(out / "model.safetensors")
    assert metadata == {"format": "pt"}
    assert set(names) == set(read_safetensors(base_dir / "model.safetensors"))    # tied: no lm_head.weight
    assert {a.dtype for a in read_safetensors(out / "model.safetensors").values()} == {np.dtype(np.float32)}
    again = load_model(out)
    assert not lora_layers(again)
    assert_close(logits(again)[REAL], unmerged[REAL], LOGIT_TOL, "fused vs unmerged logits")


def test_bf16_output(base_dir, tmp_path):
    unmerged, out = fused(base_dir, tmp_path, "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {a.dtype for a in read_safetensors(out / "model.safetensors").values()} == {BFLOAT16}
    assert_close(logits(load_model(out))[REAL], unmerged[REAL], BF16_TOL, "bf16 fused vs unmerged logits")


def test_bf16_bits_in_the_model_are_written_exactly(tmp_path):
    """A bf16 checkpoint loaded with dtype="bfloat16" keeps BF16Weights; saving gives the same bits back."""
    folder = tmp_path / "bf16"
    folder.mkdir()
    state = random_state_dict(ModelConfig.from_dict(TINY), np.random.default_rng(0), std=0.2)
    write_safetensors(folder / "model.safetensors", {k: v.astype(BFLOAT16) for k, v in state.items()})
    write_json(folder / "config.json", TINY)
    bits = read_safetensors(folder / "model.safetensors")
    model = load_model(folder, dtype="bfloat16")
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight.data, BF16Weight)

    save_model(model, tmp_path / "as-bf16", dtype="bfloat16")
    again = read_safetensors(tmp_path / "as-bf16" / "model.safetensors")
    assert again.keys() == bits.keys()
    for name, b in again.items():
        assert b.dtype == BFLOAT16
        np.testing.assert_array_equal(b.view(np.uint16), bits[name].view(np.uint16), err_msg=name)
    save_model(model, tmp_path / "as-f32", dtype="float32")
    for name, w in read_safetensors(tmp_path / "as-f32" / "model.safetensors").items():
        np.testing.assert_array_equal(w, bits[name].astype(np.float32), err_msg=name)

    lora = adapted(folder, dtype="bfloat16")            # merge widens the adapted weights; the rest stay bits
    unmerged = logits(lora.train(False))
    save_model(merge(lora), tmp_path / "merged", dtype="float32")
    assert_close(logits(load_model(tmp_path / "merged"))[REAL], unmerged[REAL], LOGIT_TOL, "merged bf16 model")


# ---- refusals, atomicity --------------------------------------------------------------------------------
def test_a_float32_checkpoint_loads_as_bf16_bits(base_dir, tmp_path):
    """dtype="bfloat16" rounds a float32 checkpoint's matrices (embeddings and, tied, lm_head
    included) to bf16 bits as they are read; norms and biases stay float32; the model trains."""
    model = load_model(base_dir, dtype="bfloat16")
    f32 = read_safetensors(base_dir / "model.safetensors")
    for name, p in model.named_parameters():
        if f32[name].ndim == 2:
            assert isinstance(p.data, BF16Weight), name
            np.testing.assert_array_equal(p.data.bits, f32[name].astype(BFLOAT16).view(np.uint16), err_msg=name)
        else:
            assert p.data.dtype == np.float32, name
            np.testing.assert_array_equal(p.data, f32[name], err_msg=name)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_close(logits(model)[REAL], logits(load_model(base_dir))[REAL], BF16_TOL, "bf16 vs float32 logits")
    lora = adapted(base_dir, dtype="bfloat16").train(True)
    for _, p in tl.lora_parameters(lora):
        p.requires_grad = True
    lora.loss(IDS, np.where(REAL, IDS, -100), MASK).backward()
    assert all(np.isfinite(p.grad).all() for _, p in tl.lora_parameters(lora))


def test_refuses_a_model_with_lora_layers(base_dir, tmp_path):
    with pytest.raises(TinyloraError, match="still has LoRA layers: merge them first"):
        save_model(adapted(base_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_the_source_folder(base_dir):
    before = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    with pytest.raises(TinyloraError, match="is the folder the model was loaded from"):
        save_model(load_model(base_dir), base_dir / ".." / "base", overwrite=True)
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_refuses_non_finite_weights(base_dir, tmp_path, bad):
    model = adapted(base_dir)
    model.model.layers[1].mlp.up_proj.lora_B.weight.data[2, 1] = bad     # as a diverged training run leaves it
    merge(model)
    with pytest.raises(TinyloraError, match=r"model.layers.1.mlp.up_proj.weight holds NaN or inf"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_an_existing_folder_unless_overwrite(base_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(TinyloraError, match="already exists and is not empty"):
        save_model(load_model(base_dir), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save_model(load_model(base_dir), tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_refuses_an_unknown_dtype(base_dir, tmp_path):
    with pytest.raises(TinyloraError, match="dtype must be one of"):
        fuse(base_dir, tmp_path / "adapter", tmp_path / "out", dtype="float16")


def test_fuse_with_a_bad_adapter_writes_nothing(base_dir, tmp_path):
    with pytest.raises(TinyloraError, match="adapter folder not found"):
        fuse(base_dir, tmp_path / "no-adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_folder(base_dir, tmp_path, monkeypatch):
    def dying_write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_safetensors", dying_write)
    with pytest.raises(KeyboardInterrupt):
        save_model(load_model(base_dir), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]        # no out/, no staging folder


# ---- against transformers -------------------------------------------------------------------------------
def reference():
    """(torch, transformers), or the test is skipped: called first, before any slow work."""
    return (pytest.importorskip("torch", reason="reference extra not installed (pip install torch==2.13.0)"),
            pytest.importorskip("transformers", reason="reference extra not installed"))


def transformers_logits(folder, ids=IDS, mask=MASK, dtype="float32"):
    torch, transformers = reference()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("tied", [True, False])
def test_fp32_fused_in_transformers_matches_unmerged(tmp_path, tied):
    torch, transformers = reference()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "base")
    add_tokenizer_files(tmp_path / "base")
    unmerged, out = fused(tmp_path / "base", tmp_path, "float32")
    assert ("lm_head.weight" in read_safetensors(out / "model.safetensors")) == (not tied)
    expected = transformers_logits(out)
    assert_close(unmerged[REAL], expected[REAL], LOGIT_TOL, "unmerged tinylora vs fused in transformers")
    print(f"\nfp32 fused (tied={tied}): max |unmerged tinylora - transformers| = "
          f"{np.abs(unmerged[REAL] - expected[REAL]).max():.2e}")


def test_bf16_fused_loads_in_transformers(base_dir, tmp_path):
    torch, _ = reference()
    unmerged, out = fused(base_dir, tmp_path, "bfloat16")
    expected = transformers_logits(out)                         # bf16 weights widened to float32: exact
    assert_close(logits(load_model(out))[REAL], expected[REAL], LOGIT_TOL, "tinylora vs transformers, bf16 folder")
    assert_close(unmerged[REAL], expected[REAL], BF16_TOL, "unmerged vs bf16 fused in transformers")
    native = transformers_logits(out, dtype="bfloat16")         # and as bf16, the dtype config.json names
    assert_close(unmerged[REAL], native[REAL], 2 * BF16_TOL, "unmerged vs transformers computing in bf16")

    # The sharp check: the bits are torch's own rounding of the merged float32 weights.
    bits = {k: v.view(np.uint16) for k, v in read_safetensors(out / "model.safetensors").items()}
    for name, w in export.state_dict(merge(adapted(base_dir))).items():
        expected_bits = torch.tensor(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(bits[name], expected_bits, err_msg=name)
    print(f"\nbf16 fused: max |unmerged tinylora - transformers| = {np.abs(unmerged[REAL] - expected[REAL]).max():.2e}"
          f" (float32 compute), {np.abs(unmerged[REAL] - native[REAL]).max():.2e} (bf16 compute)")


@pytest.mark.slow
def test_smollm2_fused_in_transformers_matches_unmerged(smollm2_dir, tmp_path):
    reference()
    model, tok = tl.load(smollm2_dir)
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"), seed=0)
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(model):         # moves the logits by ~6, an adapter-sized change
        layer.lora_B.weight.data = (0.01 * rng.standard_normal(layer.lora_B.weight.shape)).astype(np.float32)
    rows = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in ["What is the capital of France?", "Who are you?"]]
    T = max(map(len, rows))
    ids = np.array([r + [0] * (T - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    real = mask.astype(bool)
    with tl.no_grad():
        unmerged = model.train(False)(ids, mask).data
    save_adapter(model, tmp_path / "adapter")
    del model
    out = fuse(smollm2_dir, tmp_path / "adapter", tmp_path / "fused")
    present = {name for name in TOKENIZER_FILES if (smollm2_dir / name).exists()}
    assert present <= {p.name for p in out.iterdir()} and "tokenizer.json" in present
    expected = transformers_logits(out, ids, mask)
    assert_close(unmerged[real], expected[real], SMOLLM2_TOL, "SmolLM2: unmerged tinylora vs fused in transformers")
    print(f"\nSmolLM2 fp32 fused: max |unmerged tinylora - transformers| = "
          f"{np.abs(unmerged[real] - expected[real]).max():.2e}")


def test_fuse_refuses_a_non_empty_save_path_before_loading_anything(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(TinyloraError, match="already exists and is not empty"):
        fuse(tmp_path / "no-such-model", tmp_path / "no-such-adapter", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
