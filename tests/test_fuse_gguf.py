"""`fuse --save-path FILE.gguf`: one merged GGUF for llama.cpp and Ollama — its tensors, keys and tokenizer,
read back with tinylora's own GGUF loader and the `gguf` package; bad input.

tests/test_to_gguf_llama_cpp.py runs the merged files in llama-cpp-python.
"""

import json

import gguf
import numpy as np
import pytest
from test_gguf import write_gguf
from test_to_gguf import LLAMA, QWEN2, adapter_folder, base_folder
from test_tokenizer import write_model_folder

import tinylora as tl
from tinylora.cli import main
from tinylora.errors import TinyloraError
from tinylora.formats.gguf import hf_name
from tinylora.formats.gguf_tokenizer import detect_pre
from tinylora.formats.gguf_write import gguf_name, tensor_type
from tinylora.loading import load, load_model
from tinylora.lora import fuse, load_adapter, merge
from tinylora.tokenizer import Tokenizer

PROMPTS = ["Hello world!  It's 12345 x =  1", "<|im_start|>user\nhi<|im_end|>", "café 你好\n\n\tdon't"]


def tiny_base(tmp_path, raw, style="smollm2"):
    """A tiny Llama/Qwen2 folder with weights, config and a real byte-level BPE tokenizer."""
    tokenizer = write_model_folder(tmp_path / "tok", style)
    vocab = Tokenizer.from_folder(tokenizer).vocab_size
    base = base_folder(tmp_path, {**raw, "vocab_size": vocab + 3})         # 3 unused rows, as models often have
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (base / name).write_bytes((tokenizer / name).read_bytes())
    return base


def merged_logits(base, adapter, ids=(5, 9, 17, 3, 44, 8)):
    model = merge(load_adapter(load_model(base), adapter))
    with tl.no_grad():
        return model(np.array([ids])).data[0]


def gguf_logits(path, ids=(5, 9, 17, 3, 44, 8)):
    model, _ = load(path)
    with tl.no_grad():
        return model(np.array([ids])).data[0]


def test_gguf_name_inverts_hf_name():
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
             "model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.q_proj.bias",
             "model.layers.0.mlp.down_proj.weight", "model.layers.3.post_attention_layernorm.weight"]
    for name in names:
        assert hf_name(gguf_name(name), "qwen2") == name
    with pytest.raises(TinyloraError, match="'model.layers.0.mlp.act.weight' has no llama.cpp name"):
        gguf_name("model.layers.0.mlp.act.weight")


def test_tensor_types_follow_llama_cpps_rules():
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q8_0") == gguf.GGMLQuantizationType.F32
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q4_0") == gguf.GGMLQuantizationType.Q4_0
    assert tensor_type("token_embd.weight", (400, 64), "q4_1") == gguf.GGMLQuantizationType.Q8_0
    assert tensor_type("token_embd.weight", (400, 64), "bf16") == gguf.GGMLQuantizationType.BF16
    assert tensor_type("blk.0.ffn_down.weight", (64, 100), "q8_0") == gguf.GGMLQuantizationType.F16   # 100 % 32


@pytest.mark.parametrize("raw, style", [(LLAMA, "smollm2"), (QWEN2, "qwen2")], ids=["llama", "qwen2"])
def test_a_merged_gguf_loads_back_as_the_merged_model(tmp_path, raw, style):
    base = tiny_base(tmp_path, raw, style)
    adapter, _ = adapter_folder(tmp_path, base)
    expected = merged_logits(base, adapter)
    out = fuse(base, adapter, tmp_path / "merged.gguf", outtype="f32")
    assert np.abs(gguf_logits(out) - expected).max() < 1e-4 * np.abs(expected).max()      # q/k permuted and back
    reader = gguf.GGUFReader(out)
    keys = {f.name: f.contents() for f in reader.fields.values()}
    a = raw["model_type"]
    assert keys["general.architecture"] == a and keys["general.file_type"] == 0
    assert (keys[f"{a}.block_count"], keys[f"{a}.embedding_length"], keys[f"{a}.attention.head_count_kv"]) == (2, 64, 2)
    assert keys["tokenizer.ggml.pre"] == {"smollm2": "gpt2", "qwen2": "qwen2"}[style]
    assert keys["tokenizer.ggml.tokens"][-3:] == [f"[PAD{i}]" for i in range(len(keys["tokenizer.ggml.tokens"]) - 3,
                                                                            len(keys["tokenizer.ggml.tokens"]))]
    assert "output.weight" not in {t.name for t in reader.tensors}                # tied: token_embd only

    # the tokenizer written is the folder's: same ids, specials, template
    ours, theirs = Tokenizer.from_folder(base), load(out)[1]
    for text in PROMPTS:
        assert theirs.encode(text) == ours.encode(text), text
    assert theirs.chat_template == ours.chat_template
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == \
        (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id)


# The largest error rounding or quantising one weight can make, as a fraction of its row's largest |w|:
# f16 and bf16 half a unit in the last place (11 and 8 significant bits); Q8_0 one step max|w| / 127 (half a
# step from rounding, and the fp16-rounded scale); Q4_0 and Q5_0 a whole step, max|w| / 8 and / 16 (the
# value farthest from the block's signed maximum is clipped); Q4_1 and Q5_1 half a step of (max - min) /
# 15 or / 31. Measured on this model: bf16 0.0038, Q8_0 0.0042, Q4_0 0.124, Q4_1 0.066, Q5_0 0.061, Q5_1 0.032.
STEP = {"f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": 1 / 127, "q4_0": 1 / 8, "q5_0": 1 / 16, "q4_1": 1 / 15,
        "q5_1": 1 / 31}


def file_weights(path):
    """{llama.cpp name: (type name, float32 (out, in))} of a GGUF file, dequantised with the gguf package."""
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type))
            for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_every_outtype_holds_the_merged_weights_to_its_precision(tmp_path, outtype):
    from tinylora.formats.gguf import permute
    from tinylora.lora.fused import state_dict
    base = tiny_base(tmp_path, LLAMA)
    adapter, _ = adapter_folder(tmp_path, base)
    merged = state_dict(merge(load_adapter(load_model(base), adapter)))
    out = fuse(base, adapter, tmp_path / f"merged-{outtype}.gguf", outtype=outtype)
    written = file_weights(out)
    assert written["blk.0.attn_q.weight"][0] == outtype.upper() and written["blk.1.ffn_norm.weight"][0] == "F32"
    assert written["token_embd.weight"][0] == ("Q8_0" if outtype[1] in "45" else outtype.upper())
    for hf, w in merged.items():
        name = gguf_name(hf)
        kind, theirs = written[name]
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            w = permute(w, 4 if "attn_q" in name else 2)                    # llama.cpp's row order
        if w.ndim == 1:
            assert kind == "F32" and np.array_equal(theirs, w), name
            continue
        step = STEP[kind.lower()]
        bound = step * np.abs(w).max(axis=1, keepdims=True) * (1 + 1e-3) + 1e-30
        assert (np.abs(theirs - w) <= bound).all(), (name, kind)
    via_file = gguf_logits(out)                     # and loads back (the random model amplifies rounding: no bound)
    assert np.isfinite(via_file).all() and via_file.shape == merged_logits(base, adapter).shape


def test_a_gguf_base_keeps_its_own_keys_and_tokenizer(tmp_path):
    base = tmp_path / "base.gguf"
    write_gguf(base, extra_meta={"general.license": "apache-2.0"})
    adapter, _ = adapter_folder(tmp_path, base)
    expected = merged_logits(base, adapter)
    with pytest.warns(UserWarning, match="held as float32,q8_0: the merged weights are its dequantised values"):
        out = fuse(base, adapter, tmp_path / "merged.gguf", outtype="f32")
    source = {f.name: f.contents() for f in gguf.GGUFReader(base).fields.values() if not f.name.startswith("GGUF.")}
    written = {f.name: f.contents() for f in gguf.GGUFReader(out).fields.values() if not f.name.startswith("GGUF.")}
    assert written.pop("general.file_type") == gguf.LlamaFileType.ALL_F32
    assert written.pop("general.quantization_version") == 2
    assert written == source                                                  # tokenizer, licence, ... as they were
    assert np.abs(gguf_logits(out) - expected).max() < 1e-4 * np.abs(expected).max()


def test_detect_pre_names_each_pre_tokenizer_and_refuses_others(tmp_path):
    for style, name in (("smollm2", "gpt2"), ("qwen2", "qwen2"), ("llama3", "llama-bpe")):
        assert detect_pre(Tokenizer.from_folder(write_model_folder(tmp_path / style, style)).backend) == name
    from tokenizers import Tokenizer as Rust
    from tokenizers import models, pre_tokenizers
    odd = Rust(models.BPE())
    odd.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(TinyloraError, match="splits text unlike every one llama.cpp names here"):
        detect_pre(odd)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    base = tiny_base(tmp_path, LLAMA)
    adapter, _ = adapter_folder(tmp_path, base)
    out = tmp_path / "merged.gguf"
    out.write_bytes(b"keep me")
    assert main(["fuse", "--model", str(base), "--adapter-path", str(adapter), "--save-path", str(out)]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["fuse", "--model", str(base), "--adapter-path", str(adapter), "--save-path", str(out),
                 "--force", "--outtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert f"FROM {out}" in printed and gguf.GGUFReader(out).fields["general.file_type"].contents() == 7
    other = base_folder(tmp_path, {**LLAMA, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
                        name="other")
    assert main(["fuse", "--model", str(other), "--adapter-path", str(adapter),
                 "--save-path", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "has shape" in err and err.count("\n") == 1 and not (tmp_path / "x.gguf").exists()
    with pytest.raises(TinyloraError, match="--outtype must be one of"):
        fuse(base, adapter, tmp_path / "y.gguf", outtype="q4_k")
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4        # the adapter untouched
