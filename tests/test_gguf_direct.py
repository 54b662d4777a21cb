"""A GGUF file loaded directly (`tl.load("file.gguf")`): its blocks and 16-bit floats kept, refused types,
--quantize on a float file, and saving or importing such a base. The tiny files are test_gguf.py's."""

import numpy as np
import pytest
from test_gguf import gguf, is_quantised, write_gguf

import tinylora as tl
from tinylora.errors import TinyloraError
from tinylora.formats import gguf as G


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_loads_directly_with_its_blocks(tmp_path, arch):
    from tinylora.kernels.quantized import GGMLWeight
    from tinylora.kernels.weights import BF16Weight
    write_gguf(tmp_path / "tiny.gguf", arch=arch, tied=False, bf16=("attn_k", "ffn_up"))
    imported = G.import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")          # dequantised to float32
    ids = np.array([[1, 5, 9, 3, 7], [2, 4, 6, 8, 1]])
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-6)):       # float64: the blocks widened once
        direct, dense = tl.load_model(tmp_path / "tiny.gguf", dtype=dtype), tl.load_model(imported, dtype=dtype)
        with tl.no_grad():
            got, expected = direct(ids).data, dense(ids).data
        err = np.abs(got - expected).max() / np.abs(expected).max()           # relative to the largest logit
        assert got.dtype == np.dtype(dtype) and err <= tol, (dtype, err)
    blocks = {n: p.data for n, p in direct.named_parameters() if isinstance(p.data, GGMLWeight)}   # float32
    assert len(blocks) == sum(is_quantised(n) for n, _ in dense.named_parameters()) > 0
    assert all(w.storage == "q8_0" for w in blocks.values())
    kept_bits = {n for n, p in direct.named_parameters() if isinstance(p.data, BF16Weight)}
    assert kept_bits and all(n.endswith(("k_proj.weight", "up_proj.weight")) for n in kept_bits)
    assert all(w.nbytes == w.size // 32 * 34 for w in blocks.values())         # 34 bytes per 32 weights, as stored


def test_kept_blocks_are_the_files_pages_and_writing_them_never_changes_the_file(tmp_path):
    """The blocks are views of the file's copy-on-write memory map, not a second copy in the process;
    only Llama's permuted q/k rows are copies."""
    write_gguf(tmp_path / "tiny.gguf", arch="llama", tied=False)
    before = (tmp_path / "tiny.gguf").read_bytes()
    model = tl.load_model(tmp_path / "tiny.gguf")
    from tinylora.kernels.quantized import GGMLWeight

    def mapped(a):                                               # a view, at some depth, of a memory map
        while a is not None and not isinstance(a, np.memmap):
            a = a.base
        return a is not None
    weights = {n: p.data for n, p in model.named_parameters() if isinstance(p.data, GGMLWeight)}
    permuted = ("q_proj.weight", "k_proj.weight")
    assert {n.split(".")[-2] for n in weights} >= {"q_proj", "down_proj"}
    assert all(mapped(w.blocks) != n.endswith(permuted) for n, w in weights.items())
    down = weights["model.layers.0.mlp.down_proj.weight"].blocks
    assert down.flags.writeable
    down[...] = 0                                                # a private page: the file keeps its bytes
    assert (tmp_path / "tiny.gguf").read_bytes() == before


def test_a_gguf_base_saves_as_a_float_folder_and_import_can_keep_the_blocks(tmp_path):
    write_gguf(tmp_path / "tiny.gguf")
    model = tl.load_model(tmp_path / "tiny.gguf")
    ids = np.array([[1, 5, 9, 3, 7]])
    with tl.no_grad():
        expected = model(ids).data
    tl.save_model(model, tmp_path / "out")                       # a fused GGUF base: dequantised floats
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                             "tokenizer_config.json", "generation_config.json"}
    reread, _ = tl.load(tmp_path / "out")
    kept = G.import_gguf(tmp_path / "tiny.gguf", tmp_path / "kept", keep_quantization=True)
    assert (kept / "model.gguf").read_bytes() == (tmp_path / "tiny.gguf").read_bytes()
    blocks, tok = tl.load(kept)
    assert {p.data.storage for n, p in blocks.named_parameters() if n.endswith("down_proj.weight")} == {"q8_0"}
    assert blocks.folder == kept and tok.encode("hello") == tl.load(tmp_path / "tiny.gguf")[1].encode("hello")
    with tl.no_grad():
        assert np.abs(reread(ids).data - expected).max() < 1e-6 * np.abs(expected).max()   # float32 sums
        assert np.abs(blocks(ids).data - expected).max() == 0


def test_a_nan_block_scale_is_refused_at_load_naming_the_tensor(tmp_path):
    write_gguf(tmp_path / "tiny.gguf")
    data = bytearray((tmp_path / "tiny.gguf").read_bytes())
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")          # Q8_0 blocks
    start = int(t.data_offset) + 34 * 3                                                 # the 4th block's d
    data[start:start + 2] = np.array([0x7E00], dtype=np.uint16).tobytes()               # a float16 NaN
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(TinyloraError, match="bad.gguf: tensor 'blk.1.ffn_down.weight' \\(Q8_0\\) has NaN or inf "
                                            "block scales"):
        tl.load_model(tmp_path / "bad.gguf")


def test_f16_tensors_keep_their_bits_and_other_types_are_refused_by_name(tmp_path):
    from types import SimpleNamespace

    from tinylora.kernels.quantized import F16Weight
    original = write_gguf(tmp_path / "tiny.gguf", f16=("attn_v", "ffn_gate"))
    model = tl.load_model(tmp_path / "tiny.gguf")
    kept = {n: p.data for n, p in model.named_parameters() if isinstance(p.data, F16Weight)}
    assert kept and all(n.endswith(("v_proj.weight", "gate_proj.weight")) for n in kept)
    for name, w in kept.items():
        assert np.array_equal(w.to_float(), original[name].astype(np.float16).astype(np.float32)), name
    # A Q2_K (or IQ*, TQ*) tensor: one line naming the tensor and its type, before anything is dequantised
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    fake = SimpleNamespace(name=t.name, shape=t.shape, data=t.data, tensor_type=gguf.GGMLQuantizationType.Q2_K)
    config = tl.load_model(tmp_path / "tiny.gguf").config
    with pytest.raises(TinyloraError, match="tensor 'blk.0.ffn_up.weight' has type Q2_K, which tinylora does "
                                            "not read"):
        G.convert_tensors(SimpleNamespace(tensors=[fake]), tmp_path / "tiny.gguf", "llama",
                          {"num_attention_heads": config.num_attention_heads,
                           "num_key_value_heads": config.num_key_value_heads}, keep_blocks=True)


def test_quantize_applies_to_float_gguf_projections_and_refuses_blocks(tmp_path):
    from tinylora.kernels.quantized import NF4Weight
    write_gguf(tmp_path / "float.gguf", quantised=(), f16=("attn_v",))
    model = tl.load_model(tmp_path / "float.gguf", quantize="nf4")
    storages = {n: p.data.storage for n, p in model.named_parameters() if hasattr(p.data, "storage")}
    assert all(isinstance(p.data, NF4Weight) for n, p in model.named_parameters() if n.endswith("_proj.weight"))
    assert storages["model.embed_tokens.weight"] == "float32"       # embeddings stay as they are, as in QLoRA
    write_gguf(tmp_path / "q8.gguf")
    with pytest.raises(TinyloraError, match="q8.gguf: the file is already quantised \\(q8_0\\); --quantize "
                                            "applies to float checkpoints"):
        tl.load_model(tmp_path / "q8.gguf", quantize="q4_0")
