"""bitsandbytes 4-bit checkpoints and `quantize=`: loaded as NF4 weights, checked against bitsandbytes itself.

The checkpoints are real: transformers + bitsandbytes on the CPU quantise a tiny random Llama and
`save_pretrained` writes it (skipped without the reference extra). The bad-input tests build their
checkpoints by hand (tinylora's own NF4 quantiser), so they run everywhere.
"""

import json

import numpy as np
import pytest

import tinylora as tl
from tinylora.errors import TinyloraError
from tinylora.formats.files import write_json
from tinylora.formats.safetensors import read_safetensors, write_safetensors
from tinylora.kernels import nf4
from tinylora.kernels.quantized import GGMLWeight, NF4Weight

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 128}
BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32"}
IDS = np.array([[1, 5, 9, 33, 70, 2, 90, 7]])


def float_folder(tmp_path):
    """A float32 Llama checkpoint written by transformers (random weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in LLAMA.items()
                                                                      if k != "architectures"}))
    model.save_pretrained(tmp_path / "f32")
    return tmp_path / "f32"


def bnb_folder(tmp_path, double_quant: bool):
    """-> (float folder, the bnb-4bit folder transformers + bitsandbytes write from it)"""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (reference extra) not installed")
    import torch
    import transformers
    source = float_folder(tmp_path)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=q, dtype=torch.float32)
    model.save_pretrained(tmp_path / "bnb")
    return source, tmp_path / "bnb"


def dequantised_reference(folder):
    """transformers' float32 Llama holding bitsandbytes' own dequantisation of every 4-bit weight."""
    import bitsandbytes as bnb
    import torch
    import transformers
    quantised = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = transformers.LlamaForCausalLM(quantised.config).eval()
    state = {k: v for k, v in quantised.state_dict().items() if k in reference.state_dict() and v.is_floating_point()}
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_checkpoint_loads_as_nf4_with_the_logits_of_its_dequantised_weights(tmp_path, double_quant):
    import torch
    _, folder = bnb_folder(tmp_path, double_quant)
    model = tl.load_model(folder)
    nf4 = {n: p.data for n, p in model.named_parameters() if isinstance(p.data, NF4Weight)}
    assert len(nf4) == 2 * 7 and all(w.nested == double_quant for w in nf4.values())
    assert isinstance(model.lm_head.weight.data, type(model.model.embed_tokens.weight.data))   # kept float
    stored = read_safetensors(folder / "model.safetensors")
    w = nf4["model.layers.1.mlp.down_proj.weight"]
    assert np.array_equal(w.packed, stored["model.layers.1.mlp.down_proj.weight"].reshape(-1))   # bytes as stored
    reference = dequantised_reference(folder)
    with tl.no_grad(), torch.no_grad():
        ours, theirs = model(IDS).data, reference(torch.from_numpy(IDS)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-5, np.abs(ours - theirs).max()


def test_quantize_nf4_gives_the_bytes_transformers_and_bitsandbytes_write(tmp_path):
    source, folder = bnb_folder(tmp_path, double_quant=False)
    ours = tl.load_model(source, quantize="nf4")
    stored = read_safetensors(folder / "model.safetensors")
    for name, p in ours.named_parameters():
        if name.endswith("_proj.weight"):
            assert np.array_equal(p.data.packed, stored[name].reshape(-1)), name
            assert np.array_equal(p.data.absmax, stored[name + ".absmax"]), name


@pytest.mark.parametrize("kind, storage", [("nf4", "nf4"), ("q8_0", "q8_0"), ("q4_0", "q4_0")])
def test_quantize_holds_projections_quantised_and_stays_close(tmp_path, kind, storage):
    source = hand_made(tmp_path, quantized=False)
    dense, quantised = tl.load_model(source), tl.load_model(source, quantize=kind)
    originals = dict(dense.named_parameters())
    widened = {}
    for name, p in quantised.named_parameters():
        kept = isinstance(p.data, (NF4Weight, GGMLWeight))
        assert kept == name.endswith("_proj.weight"), name
        widened[name] = p.data.to_float() if kept else np.asarray(p.data.array if hasattr(p.data, "array") else p.data)
        if kept:
            assert p.data.storage == storage and p.data.nbytes < p.data.size * (1.2 if kind == "q8_0" else 0.6)
            w = originals[name].data.array
            noise = np.abs(widened[name] - w).max() / np.abs(w).max()
            assert noise < (0.01 if kind == "q8_0" else 0.2), (name, noise)     # half a step of 127 or of ~8
    # the quantised model computes exactly what a float model of its dequantised weights computes
    from tinylora.model import CausalLM
    reference = CausalLM.from_state_dict(dense.config, widened)
    with tl.no_grad():
        a, b = reference(IDS).data, quantised(IDS).data
    assert np.abs(a - b).max() < 1e-5, np.abs(a - b).max()


# -- bad input: one line naming what is wrong ---------------------------------------------------

def hand_made(tmp_path, quantized=True, config=None, drop=(), state_shape=None, blocksize=64):
    """A tiny Llama checkpoint in bitsandbytes' layout, quantised by tinylora (or float32, quantized=False)."""
    rng = np.random.default_rng(0)
    C, F, V = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    kv = C // 2
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,), "lm_head.weight": (V, C)}
    for i in range(LLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                   p + "self_attn.q_proj.weight": (C, C), p + "self_attn.k_proj.weight": (kv, C),
                   p + "self_attn.v_proj.weight": (kv, C), p + "self_attn.o_proj.weight": (C, C),
                   p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                   p + "mlp.down_proj.weight": (C, F)}
    tensors = {}
    for name, shape in shapes.items():
        a = (rng.standard_normal(shape) * 0.1 + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
        if quantized and name.endswith("_proj.weight"):
            w = NF4Weight.quantize(a)
            state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(shape)}
            if name == W0 and state_shape:
                state["shape"] = state_shape
            if name == W0:
                state["blocksize"] = blocksize
            tensors |= {name: w.packed.reshape(-1, 1), name + ".absmax": w.absmax,
                        name + ".quant_map": nf4.NF4.copy(),
                        name + ".quant_state.bitsandbytes__nf4": np.frombuffer(json.dumps(state).encode(), np.uint8)}
        else:
            tensors[name] = a
    for name in drop:
        del tensors[name]
    folder = tmp_path / "hand"
    folder.mkdir(exist_ok=True)
    write_safetensors(folder / "model.safetensors", tensors)
    write_json(folder / "config.json", LLAMA | ({"quantization_config": config or BNB} if quantized else {}))
    return folder


def test_hand_made_checkpoint_loads(tmp_path):
    model = tl.load_model(hand_made(tmp_path))
    assert sum(isinstance(p.data, NF4Weight) for _, p in model.named_parameters()) == 14


W0 = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("kwargs, message", [
    ({"drop": [W0 + ".absmax"]}, f"{W0}.absmax is missing \\(part of the bitsandbytes quant state of {W0}\\)"),
    ({"drop": [W0 + ".quant_state.bitsandbytes__nf4"]},
     f"{W0} holds packed 4-bit bytes, but its quant state tensor {W0}.quant_state.bitsandbytes__nf4 is missing"),
    ({"drop": [W0]}, f"{W0} is missing, but its bitsandbytes quant state tensors are there"),
    ({"drop": [W0, W0 + ".quant_state.bitsandbytes__nf4"]},
     f"{W0}.absmax belongs to {W0}, which has no quant_state.bitsandbytes__nf4 tensor"),
    ({"drop": [W0 + s for s in (".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4")]},
     f"{W0} holds packed 4-bit bytes, but its quant state tensor {W0}.quant_state.bitsandbytes__nf4 is missing"),
    ({"state_shape": [64, 64]}, "holds 4096 uint8 values, but its quant state says shape \\[64, 64\\]"),
    ({"blocksize": 0}, "expected quant_type nf4, an even blocksize and a 2-d shape"),
    ({"config": BNB | {"bnb_4bit_quant_type": "fp4"}}, "bnb_4bit_quant_type = 'fp4'; only nf4 is supported"),
    ({"config": BNB | {"load_in_4bit": False, "load_in_8bit": True}}, "a bitsandbytes 8-bit \\(load_in_8bit\\)"),
    ({"config": {"quant_method": "gptq", "bits": 4}}, "quant_method = 'gptq'; tinylora reads bitsandbytes"),
])
def test_broken_bnb_checkpoints_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(TinyloraError, match=message):
        tl.load_model(hand_made(tmp_path, **kwargs))


def test_a_quant_state_shape_the_model_does_not_expect_is_named(tmp_path):
    # a consistent NF4 group whose shape is not what config.json gives that projection
    folder = hand_made(tmp_path, state_shape=[128, 64])       # down_proj is (64, 128): the same byte count
    with pytest.raises(TinyloraError, match="model.layers.0.mlp.down_proj.weight"):
        tl.load_model(folder)


def test_quantize_on_a_quantised_checkpoint_is_one_line(tmp_path):
    with pytest.raises(TinyloraError, match="already quantised \\(bitsandbytes nf4\\); --quantize applies to "
                                            "float checkpoints"):
        tl.load_model(hand_made(tmp_path), quantize="q8_0")
    with pytest.raises(TinyloraError, match="--quantize must be one of nf4, q8_0, q4_0, got 'int8'"):
        tl.load_model(hand_made(tmp_path, quantized=False), quantize="int8")


def test_adapter_records_its_base_and_fuse_onto_a_quantised_base_warns(tmp_path):
    source = hand_made(tmp_path, quantized=False)
    (tmp_path / "hand" / "tokenizer.json").write_text("{}")        # fuse copies tokenizer files it finds
    model = tl.load_model(source, quantize="nf4")
    tl.apply_lora(model, tl.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    for _, p in tl.lora_parameters(model):
        p.data[...] = np.random.default_rng(1).standard_normal(p.data.shape) * 0.01
    tl.save_adapter(model, tmp_path / "adapter")
    from tinylora.formats.safetensors import read_metadata
    assert read_metadata(tmp_path / "adapter" / "adapter_model.safetensors")["tinylora.base_weights"] == "nf4"
    with pytest.warns(UserWarning, match="trained on a base held as nf4; this base is float32"):
        tl.load_adapter(tl.load_model(source), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="the base's projections are held as nf4: the merged weights are its "
                                         "dequantised values plus the update"):
        out = tl.fuse(source, tmp_path / "adapter", tmp_path / "fused", quantize="nf4")
    fused = tl.load_model(out)                               # a float checkpoint, no quantization_config left
    model = tl.load_model(source, quantize="nf4")
    tl.load_adapter(model, tmp_path / "adapter")
    with tl.no_grad():
        assert np.abs(fused(IDS).data - model(IDS).data).max() < 1e-5
