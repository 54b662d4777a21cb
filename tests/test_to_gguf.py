"""GGUF LoRA adapters (`tinylora export --to gguf`): the file's keys and tensors, the Llama permutation, bad input.

The fast tests read the written file back with the `gguf` package. The slow
ones compare it byte for byte with what llama.cpp's own
convert_lora_to_gguf.py writes (taken from the llama-cpp-python source
archive, fetched with pip), and run it in llama-cpp-python.
"""

import math

import gguf
import numpy as np
import pytest

from tinylora.cli import main
from tinylora.config import ModelConfig
from tinylora.errors import TinyloraError
from tinylora.formats.files import write_json
from tinylora.formats.gguf import permute, unpermute
from tinylora.formats.safetensors import write_safetensors
from tinylora.loading import load_model
from tinylora.lora import LoraConfig, apply_lora, lora_layers, save_adapter
from tinylora.lora.to_gguf import export_gguf
from tinylora.model import random_state_dict

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
         "tie_word_embeddings": True}
LLAMA = {**QWEN2, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_folder(tmp_path, raw, name="base"):
    folder = tmp_path / name
    folder.mkdir()
    write_safetensors(folder / "model.safetensors",
                      random_state_dict(ModelConfig.from_dict(raw), np.random.default_rng(0), std=0.2))
    write_json(folder / "config.json", raw)
    return folder


def adapter_folder(tmp_path, base, **lora):
    """An adapter with B non-zero, saved from `base`; -> (folder, {PEFT key: array})."""
    model = apply_lora(load_model(base), LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ALL_SEVEN, **lora}))
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = rng.standard_normal(layer.lora_B.weight.shape).astype(np.float32)
    folder = save_adapter(model, tmp_path / "adapter")
    from tinylora.formats.safetensors import read_safetensors
    return folder, read_safetensors(folder / "adapter_model.safetensors")


def read_back(path):
    reader = gguf.GGUFReader(path)
    keys = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}
    return keys, tensors


def test_permute_is_llama_cpps_and_unpermute_inverts_it():
    from test_gguf import llama_cpp_permute
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    assert np.array_equal(permute(w, 3), llama_cpp_permute(w, 3))
    assert np.array_equal(unpermute(permute(w, 3), 3), w)


@pytest.mark.parametrize("raw", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_the_adapter_file_has_llama_cpps_keys_and_tensors(tmp_path, raw):
    base = base_folder(tmp_path, raw)
    adapter, peft_tensors = adapter_folder(tmp_path, base)
    out = export_gguf(adapter, tmp_path / "adapter.gguf")              # the base from base_model_name_or_path
    keys, tensors = read_back(out)
    assert keys == {"general.architecture": raw["model_type"], "general.type": "adapter", "adapter.type": "lora",
                    "general.name": "Adapter",      # gguf.Metadata's name from the folder, as the converter
                    "adapter.lora.alpha": 8.0, "general.quantization_version": 2}
    assert len(tensors) == len(peft_tensors) == 2 * 2 * 7
    heads = {"q_proj": 4, "k_proj": 2}
    for layer in range(2):
        for parent, proj, name in [("self_attn", "q_proj", "attn_q"), ("self_attn", "k_proj", "attn_k"),
                                   ("self_attn", "v_proj", "attn_v"), ("self_attn", "o_proj", "attn_output"),
                                   ("mlp", "gate_proj", "ffn_gate"), ("mlp", "up_proj", "ffn_up"),
                                   ("mlp", "down_proj", "ffn_down")]:
            key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
            kind, a = tensors[f"blk.{layer}.{name}.weight.lora_a"]
            kind_b, b = tensors[f"blk.{layer}.{name}.weight.lora_b"]
            assert kind == kind_b == "F32"
            assert np.array_equal(a, peft_tensors[f"{key}.lora_A.weight"])        # (r, in), as PEFT's
            expected_b = peft_tensors[f"{key}.lora_B.weight"]                        # (out, r)
            if raw is LLAMA and proj in heads:
                assert not np.array_equal(b, expected_b)
                b = unpermute(b, heads[proj])                    # llama.cpp's row order, undone
            assert np.array_equal(b, expected_b)


def test_rslora_is_written_with_the_alpha_that_gives_its_scale(tmp_path):
    base = base_folder(tmp_path, QWEN2)
    adapter, _ = adapter_folder(tmp_path, base, r=4, alpha=8, use_rslora=True)
    keys, _ = read_back(export_gguf(adapter, tmp_path / "a.gguf"))
    assert math.isclose(keys["adapter.lora.alpha"] / 4, 8 / math.sqrt(4), rel_tol=1e-6)  # llama.cpp's alpha / r


@pytest.mark.parametrize("outtype, kinds", [("f16", {"F16"}), ("bf16", {"BF16"}), ("q8_0", {"Q8_0", "F16"})])
def test_outtypes(tmp_path, outtype, kinds):
    base = base_folder(tmp_path, QWEN2)
    adapter, peft_tensors = adapter_folder(tmp_path, base)
    _, tensors = read_back(export_gguf(adapter, tmp_path / "a.gguf", outtype=outtype))
    assert {kind for kind, _ in tensors.values()} == kinds
    if outtype == "q8_0":           # lora_a rows (64) are whole Q8_0 blocks; lora_b rows (r = 4) fall back to f16
        assert tensors["blk.0.attn_v.weight.lora_a"][0] == "Q8_0" and tensors["blk.0.attn_v.weight.lora_b"][0] == "F16"
    kind, b = tensors["blk.1.ffn_down.weight.lora_b"]
    if kind == "F16":
        np.testing.assert_allclose(b, peft_tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"],
                                   rtol=1e-3)


def test_refusals_are_one_line_and_keep_what_was_there(tmp_path):
    base = base_folder(tmp_path, QWEN2)
    adapter, _ = adapter_folder(tmp_path, base)
    out = tmp_path / "a.gguf"
    out.write_bytes(b"earlier work")
    with pytest.raises(TinyloraError, match="exists; pass --force"):
        export_gguf(adapter, out)
    assert out.read_bytes() == b"earlier work"
    other = base_folder(tmp_path, {**QWEN2, "hidden_size": 32}, name="other")      # another model's shapes
    with pytest.raises(TinyloraError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight.*shape"):
        export_gguf(adapter, tmp_path / "b.gguf", base=other)
    with pytest.raises(TinyloraError, match="--outtype must be one of"):
        export_gguf(adapter, tmp_path / "b.gguf", outtype="q4_0")
    assert not (tmp_path / "b.gguf").exists() and list(tmp_path.glob(".b.gguf*")) == []
    config = (adapter / "adapter_config.json")
    config.write_text(config.read_text().replace(f'"{base}"', "null"))
    with pytest.raises(TinyloraError, match="base_model_name_or_path is not set; pass --model"):
        export_gguf(adapter, tmp_path / "b.gguf")


def test_cli_export_prints_how_to_use_it(tmp_path, capsys):
    base = base_folder(tmp_path, LLAMA)
    adapter, _ = adapter_folder(tmp_path, base)
    out = tmp_path / "a.gguf"
    assert main(["export", "--to", "gguf", "--adapter-path", str(adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"--lora {out}" in printed and f"ADAPTER {out}" in printed and "FROM " in printed
    assert main(["export", "--to", "gguf", "--adapter-path", str(adapter), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", "--to", "gguf", "--adapter-path", str(adapter), "--out", str(out), "--force",
                 "--outtype", "f16"]) == 0
