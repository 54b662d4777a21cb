"""GGUF import: tiny synthetic files with known weights, and the real SmolLM2 against transformers.

The synthetic files are written here with `gguf.GGUFWriter` from Hugging Face-layout
weights, exactly as llama.cpp's converter would: q/k rows permuted for Llama
(not for Qwen2), some tensors quantised to Q8_0 and some kept F32, a small
byte-level vocabulary with merges, control and user-defined tokens. The import
must give the original weights back (exactly for F32; for Q8_0, exactly what
gguf dequantises, within quantisation error of the original).

Oracles for the tokenizer: llama.cpp's pre-tokenizer regexes (llama-vocab.cpp,
applied one after another as llama.cpp does, with the `regex` package) and
transformers' own GGUF tokenizer. Reference tests skip cleanly without transformers.
"""

import json

import numpy as np
import pytest

from tinylora.errors import TinyloraError
from tinylora.formats import gguf as G
from tinylora.formats.gguf_tokenizer import bytes_to_unicode
from tinylora.formats.safetensors import read_safetensors

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

Q8_0 = gguf.GGMLQuantizationType.Q8_0
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 96, 2   # rows of 32 for Q8_0
QUANTISED = ("token_embd", "attn_q", "ffn_down")                       # the rest stay F32

# A small byte-level vocabulary: three control tokens, the 256 byte characters,
# one token per merge, and one user-defined token.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ Ġ", "ĠĠ ĠĠ", "o n", "e r", "Ġ w", "Ġw or", "o r", "l d",
          "Ġwor ld", "1 2", "Ċ Ċ", "' s", "Ġ 1", "ä ½", "Ġ (", "( )"]
USER_DEFINED = "<think>"


def tiny_vocab():
    alphabet = list(bytes_to_unicode().values())
    merged = ["".join(m.split(" ")) for m in MERGES]
    tokens = SPECIALS + alphabet + [t for t in dict.fromkeys(merged) if t not in alphabet] + [USER_DEFINED]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    return tokens, types


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in NumPy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(rng, arch, tied, vocab):
    """Random weights in Hugging Face layout: {hf name: (out, in) array}."""
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
                  "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
                  "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN)}
        for name, shape in shapes.items():
            w[p + name + ".weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN)
        if arch == "qwen2":
            for name in ("q_proj", "k_proj", "v_proj"):
                w[p + f"self_attn.{name}.bias"] = rng.standard_normal(shapes[f"self_attn.{name}"][0])
    return {k: v.astype(np.float32) for k, v in w.items()}


def gguf_name(hf: str) -> str:
    inverse = {v: k for k, v in {**G.GLOBAL_NAMES, **{f"L.{k}": v for k, v in G.LAYER_NAMES.items()}}.items()}
    base, kind = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        i, rest = base[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{inverse[rest][2:]}.{kind}"
    return f"{inverse[base]}.{kind}"


def write_gguf(path, arch="llama", tied=True, pre="smollm", model="gpt2", add_bos=False, seed=0,
               extra_tensors=(), extra_meta=None, bf16=(), f16=(), quantised=None):
    """A tiny GGUF as llama.cpp would write it -> the original HF weights."""
    rng = np.random.default_rng(seed)
    tokens, types = tiny_vocab()
    weights = hf_weights(rng, arch if arch in ("llama", "qwen2") else "llama", tied, len(tokens))
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6 if arch == "qwen2" else 1e4)
    if arch == "llama":
        w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for key, value in (extra_meta or {}).items():
        w.add_string(key, value)
    for hf, array in weights.items():
        name = gguf_name(hf)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            array = llama_cpp_permute(array, HEADS if "attn_q" in name else KV_HEADS)
        if name.split(".")[-2] in (QUANTISED if quantised is None else quantised) and name.endswith(".weight"):
            w.add_tensor(name, quantize(array, Q8_0), raw_dtype=Q8_0)
        elif name.split(".")[-2] in bf16 and name.endswith(".weight"):          # stored as BF16, rounded
            bits = quantize(array, gguf.GGMLQuantizationType.BF16)
            w.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif name.split(".")[-2] in f16 and name.endswith(".weight"):
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, array)
    for name, array in extra_tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def is_quantised(hf: str) -> bool:
    return gguf_name(hf).split(".")[-2] in QUANTISED and hf.endswith(".weight")


# -- the permutation and the names ---------------------------------------------------------

@pytest.mark.parametrize("n_head", [1, 3, 4])
def test_unpermute_inverts_llama_cpp(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 8, 5))
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(G.unpermute(permuted, n_head), w)


def test_hf_names():
    assert G.hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert G.hf_name("output.weight", "llama") == "lm_head.weight"
    assert G.hf_name("output_norm.weight", "qwen2") == "model.norm.weight"
    assert G.hf_name("blk.11.attn_output.weight", "llama") == "model.layers.11.self_attn.o_proj.weight"
    assert G.hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert G.hf_name("blk.3.attn_k.bias", "qwen2") == "model.layers.3.self_attn.k_proj.bias"
    assert G.hf_name("blk.3.attn_k.bias", "llama") is None
    assert G.hf_name("blk.3.attn_output.bias", "qwen2") is None
    assert G.hf_name("rope_freqs.weight", "llama") is None


# -- imports of synthetic files -------------------------------------------------------------

def check_weights(out, original, arch):
    ours = read_safetensors(out / "model.safetensors")
    assert set(ours) == set(original), set(ours) ^ set(original)
    for hf, w in original.items():
        got = ours[hf]
        assert got.dtype == np.float32 and got.shape == w.shape, hf
        if is_quantised(hf):
            # exactly gguf's own dequantisation (after undoing the permutation) ...
            expected = dequantize(quantize(w, Q8_0), Q8_0)
            np.testing.assert_array_equal(got, expected, err_msg=hf)
            # ... and within Q8_0's error of the original: half a step (step = max|block| / 127), plus
            # the scale's rounding to float16 (relative 2^-11), which moves the largest code by 127 * 2^-11 steps
            step = np.abs(w.reshape(w.shape[0], -1, 32)).max(axis=-1, keepdims=True) / 127
            err = np.abs(got - w).reshape(step.shape[0], -1, 32)
            bound = (0.5 + 127 * 2.0 ** -11) * step
            assert (err <= bound).all(), f"{hf}: max error {(err / step).max():.3f} steps"
        else:
            np.testing.assert_array_equal(got, w, err_msg=hf)


@pytest.mark.parametrize("tied", [True, False])
def test_import_llama(tmp_path, tied):
    original = write_gguf(tmp_path / "tiny.gguf", arch="llama", tied=tied)
    out = G.import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    check_weights(out, original, "llama")

    config = json.loads((out / "config.json").read_text())
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": len(tiny_vocab()[0]),
        "tie_word_embeddings": tied, "hidden_act": "silu", "torch_dtype": "float32",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    assert json.loads((out / "generation_config.json").read_text()) == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<|im_start|>" and tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["pad_token"] == "<|endoftext|>" and tok_config["unk_token"] is None
    assert tok_config["add_bos_token"] is False and tok_config["model_max_length"] == 256
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["chat_template"].startswith("{% for m in messages %}")


def test_import_qwen2_biases_not_permuted(tmp_path):
    original = write_gguf(tmp_path / "q.gguf", arch="qwen2", tied=True, pre="qwen2")
    out = G.import_gguf(tmp_path / "q.gguf", tmp_path / "out")
    check_weights(out, original, "qwen2")
    assert "model.layers.1.self_attn.v_proj.bias" in original
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["use_sliding_window"] is False and "attention_bias" not in config
    assert config["rope_theta"] == 1e6 and config["head_dim"] == HEAD_DIM and config["tie_word_embeddings"]


def test_transformers_loads_imported_llama(tmp_path):
    """The imported folder is a valid transformers checkpoint: same weights, HF row order."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    original = write_gguf(tmp_path / "tiny.gguf", arch="llama", tied=False)
    out = G.import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.head_dim == HEAD_DIM
    state = model.state_dict()
    for hf in original:
        if not is_quantised(hf):
            np.testing.assert_array_equal(state[hf].numpy(), original[hf], err_msg=hf)


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"arch": "phi3"}, "general.architecture = 'phi3'"),
    ({"model": "llama"}, "tokenizer.ggml.model = 'llama'"),
    ({"pre": "falcon"}, "tokenizer.ggml.pre = 'falcon'"),
    ({"extra_tensors": [("rope_freqs.weight", np.ones(8, np.float32))]}, "'rope_freqs.weight'"),
    ({"extra_meta": {"llama.rope.scaling.type": "linear"}}, "rope.scaling.type = 'linear'"),
])
def test_unsupported_files_are_one_clear_error(tmp_path, kwargs, words):
    write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(TinyloraError) as info:
        G.import_gguf(tmp_path / "bad.gguf", tmp_path / "out")
    message = str(info.value)
    assert str(tmp_path / "bad.gguf") in message and words in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGML not really" * 10)
    with pytest.raises(TinyloraError, match="x.gguf: not a readable GGUF file"):
        G.import_gguf(tmp_path / "x.gguf", tmp_path / "out")
    with pytest.raises(TinyloraError, match="missing.gguf: no such GGUF file"):
        G.import_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_refuses_non_empty_out_dir_and_overwrites_on_request(tmp_path):
    write_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(TinyloraError, match="out: already exists and is not empty"):
        G.import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").exists()
    G.import_gguf(tmp_path / "tiny.gguf", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "notes.txt").exists()


def test_crash_mid_import_leaves_no_folder(tmp_path, monkeypatch):
    write_gguf(tmp_path / "tiny.gguf")

    def crash(path, obj):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(G, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        G.import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


# -- the tokenizer ----------------------------------------------------------------------------

def imported_tokenizer(tmp_path, pre="smollm", add_bos=False):
    from tokenizers import Tokenizer
    write_gguf(tmp_path / f"{pre}.gguf", pre=pre, add_bos=add_bos)
    out = G.import_gguf(tmp_path / f"{pre}.gguf", tmp_path / f"out-{pre}")
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def test_tokenizer_specials_merges_and_bos(tmp_path):
    tok = imported_tokenizer(tmp_path)
    tokens, _ = tiny_vocab()
    enc = tok.encode("<|im_start|>the world<think>\n\n<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "t", "he", "Ġworld", "<think>", "ĊĊ", "<|im_end|>"]
    assert [tokens[i] for i in enc.ids] == enc.tokens and enc.ids[0] == 1 and enc.ids[-1] == 2
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>the world<think>\n\n<|im_end|>"
    assert tok.decode(enc.ids) == "the world<think>\n\n"                  # control tokens are special
    assert tok.encode("12").tokens == ["1", "2"]                          # smollm: digits one by one
    spell = bytes_to_unicode()                                            # 你 is E4 BD A0 in UTF-8
    assert tok.encode("你").tokens == [spell[0xE4] + spell[0xBD], spell[0xA0]]
    with_bos = imported_tokenizer(tmp_path, pre="gpt2", add_bos=True)
    assert with_bos.encode("12").tokens == ["<|im_start|>", "12"]         # gpt2 regex keeps "12" whole


# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), in its own spelling, applied in sequence.
LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_REGEXES = {
    "gpt2": [LLAMA_CPP_GPT2],
    "smollm": [r"\p{N}", LLAMA_CPP_GPT2],
    "qwen2": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
TRICKY = ["x =  1; y   =\t22 and 3.14159 ''' ", "I'M sure they'll've DON'T\r\n\r\n  ok", "你好，世界！123456７８",
          "def f(x):\n    return x**2  # 平方\n\n\tprint('done')  ", "emoji 🙂👍🏽 café naïve ½ ²", "   \n\n 9"]


def llama_cpp_split(text, regexes):
    regex = pytest.importorskip("regex")
    pieces = [text]
    for rx in regexes:
        split = []
        for piece in pieces:               # each regex splits the pieces the previous one left
            pos = 0
            for m in regex.finditer(rx, piece):
                if m.start() > pos:
                    split.append(piece[pos:m.start()])
                if m.end() > m.start():
                    split.append(m.group())
                pos = m.end()
            if pos < len(piece):
                split.append(piece[pos:])
        pieces = split
    return pieces


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_REGEXES))
def test_pre_tokenizer_matches_llama_cpp(tmp_path, pre):
    tok = imported_tokenizer(tmp_path, pre=pre)
    for text in TRICKY:
        ours = [text[a:b] for _, (a, b) in tok.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == llama_cpp_split(text, LLAMA_CPP_REGEXES[pre]), text


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "qwen2"])
def test_tokenizer_ids_equal_transformers_gguf_tokenizer(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    tok = imported_tokenizer(tmp_path, pre=pre)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"{pre}.gguf")
    texts = ["<|im_start|>the world<think>\n\n<|im_end|>", "Hello world! It's the  world.",
             "你好，世界！ 🙂 café", "def f():\n    return (a, b)\n\n"]
    if pre != "smollm":
        # transformers' GGUF loader has no "smollm" rule and splits digits with GPT-2's regex alone;
        # this vocabulary has the merges "1 2" and "Ġ 1" that show it. See gguf_tokenizer.py.
        texts += ["It's 12 o'clock, 1 2 3 or 123.", "def f():\n    return (1, 2)\n"]
    for text in texts:
        assert tok.encode(text).ids == reference(text)["input_ids"], text
