"""safetensors by hand, and single/sharded checkpoints (tinylora/formats/safetensors.py).

Oracles: the `safetensors` package reads what we write and writes what we
read (byte-identical values); torch's bfloat16 for BF16; transformers loads
checkpoints we write and writes checkpoints we load. Every malformed input is
a TinyloraError whose message names the file (and the tensor, where there is one).
Atomic writes are in test_files.py, hub resolution in test_hub.py.
"""

import json

import numpy as np
import pytest

from tinylora.errors import TinyloraError
from tinylora.formats.files import write_json
from tinylora.formats.safetensors import (load_checkpoint, read_header, read_metadata, read_safetensors,
                                          write_safetensors)
from tinylora.kernels.matmul import bf16_to_f32, f32_to_bf16

DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int32, np.int16, np.int8,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
SHAPES = [(), (0,), (1,), (3,), (2, 0, 3), (3, 5), (2, 3, 7), (1, 7, 1)]


def random_array(rng, dtype, shape) -> np.ndarray:
    if np.dtype(dtype) == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if np.dtype(dtype).kind == "f":
        return np.asarray(rng.standard_normal(shape) * 3, dtype=dtype)
    info = np.iinfo(dtype)
    return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True))


# -- safetensors: round trips -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": random_array(rng, dtype, shape) for i, shape in enumerate(SHAPES)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert list(back) == sorted(back) and set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        assert back[name].tobytes() == array.tobytes(), name            # bit-exact, NaN payloads and -0.0 too
        assert back[name].flags.writeable and back[name].flags.c_contiguous


def test_non_contiguous_and_big_endian_inputs(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"fortran": np.asfortranarray(a), "strided": a[:, ::2], "big": a.astype(">f4"), "scalar": np.float64(2.5)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = read_safetensors(tmp_path / "x.safetensors")
    for name, array in tensors.items():
        np.testing.assert_array_equal(back[name], array)
    assert back["scalar"].shape == ()


def test_layout_header_padded_and_tensors_aligned(tmp_path):
    tensors = {"a_u8": np.ones(3, np.uint8), "b_f16": np.ones(5, np.float16), "c_f64": np.ones(3, np.float64),
               "d_bool": np.ones(1, bool), "e_f32": np.ones(7, np.float32)}
    write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt", "note": "小"})
    header, metadata, data_start = read_header(tmp_path / "x.safetensors")
    assert data_start % 8 == 0
    assert metadata == {"format": "pt", "note": "小"}
    for name, entry in header.items():
        itemsize = tensors[name].dtype.itemsize
        assert (data_start + entry["data_offsets"][0]) % itemsize == 0, name
    assert read_metadata(tmp_path / "x.safetensors") == metadata


def test_default_metadata_is_format_pt(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"w": np.zeros(2, np.float32)})
    assert read_metadata(tmp_path / "x.safetensors") == {"format": "pt"}


# -- safetensors: bf16 ------------------------------------------------------------

def test_bf16_write_rounds_to_nearest_even_and_reads_back(tmp_path):
    one, step = 1.0, 2.0 ** -7                        # bf16 spacing just above 1.0
    x = np.array([one, one + step / 2, one + 3 * step / 2, one + step / 2 + 2.0 ** -20, -0.0, np.inf,
                  np.nan, np.finfo(np.float32).max], dtype=np.float32)
    # ties go to the even mantissa: 1 + step/2 -> 1.0, 1 + 3 step/2 -> 1 + 2 step; just above a tie rounds
    # up; the largest float32 is above the largest bf16 by more than half a step, so it becomes inf
    expected = np.array([one, one, one + 2 * step, one + step, -0.0, np.inf, np.nan, np.inf], dtype=np.float32)
    write_safetensors(tmp_path / "b.safetensors", {"x": x, "ids": np.arange(3, dtype=np.int64)}, bf16=True)
    header, _, _ = read_header(tmp_path / "b.safetensors")
    assert header["x"]["dtype"] == "BF16" and header["ids"]["dtype"] == "I64"
    widened = read_safetensors(tmp_path / "b.safetensors")["x"]
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, expected)
    assert np.signbit(widened[4])
    bits = read_safetensors(tmp_path / "b.safetensors", keep_bf16=True)["x"]
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, f32_to_bf16(x))


def test_bf16_bits_rule(tmp_path):
    """uint16 is always U16; bf16 bits go back out as BF16 by widening (exact) + bf16=True."""
    rng = np.random.default_rng(1)
    bits = f32_to_bf16(rng.standard_normal((4, 9)).astype(np.float32))
    write_safetensors(tmp_path / "u16.safetensors", {"w": bits}, bf16=True)
    assert read_header(tmp_path / "u16.safetensors")[0]["w"]["dtype"] == "U16"

    write_safetensors(tmp_path / "bf16.safetensors", {"w": bf16_to_f32(bits)}, bf16=True)
    assert read_header(tmp_path / "bf16.safetensors")[0]["w"]["dtype"] == "BF16"
    again = read_safetensors(tmp_path / "bf16.safetensors", keep_bf16=True)["w"]
    np.testing.assert_array_equal(again, bits)


@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 7)])
def test_bf16_odd_shapes(tmp_path, shape):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    write_safetensors(tmp_path / "b.safetensors", {"x": x}, bf16=True)
    for keep in (False, True):
        y = read_safetensors(tmp_path / "b.safetensors", keep_bf16=keep)["x"]
        assert y.shape == shape
    np.testing.assert_allclose(read_safetensors(tmp_path / "b.safetensors")["x"], x, rtol=2.0 ** -8)


# -- safetensors: the `safetensors` package as oracle ---------------------------------

def test_package_writes_we_read(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    tensors = {f"{np.dtype(d).name}_{i}": random_array(rng, d, s) for d in DTYPES for i, s in enumerate(SHAPES[:6])}
    st.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "np"})
    back = read_safetensors(tmp_path / "ref.safetensors")
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].tobytes() == array.tobytes(), name
    assert read_metadata(tmp_path / "ref.safetensors") == {"format": "np"}


def test_we_write_package_reads(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(4)
    tensors = {f"{np.dtype(d).name}_{i}": random_array(rng, d, s) for d in DTYPES for i, s in enumerate(SHAPES[:6])}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    back = st.load_file(tmp_path / "ours.safetensors")
    assert set(back) == set(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].tobytes() == array.tobytes(), name


def test_bf16_against_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    x = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    ref = {"w": x.to(torch.bfloat16), "s": torch.tensor(1.5, dtype=torch.bfloat16)}
    st_torch.save_file(ref, tmp_path / "torch.safetensors")
    back = read_safetensors(tmp_path / "torch.safetensors")
    for name, t in ref.items():
        np.testing.assert_array_equal(back[name], t.float().numpy())
    bits = read_safetensors(tmp_path / "torch.safetensors", keep_bf16=True)["w"]
    np.testing.assert_array_equal(bits, ref["w"].view(torch.int16).numpy().view(np.uint16))

    # ours -> torch: our round-to-nearest-even equals torch's float32 -> bfloat16
    write_safetensors(tmp_path / "ours.safetensors", {"w": x.numpy()}, bf16=True)
    theirs = st_torch.load_file(tmp_path / "ours.safetensors")["w"]
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(theirs.view(torch.int16), ref["w"].view(torch.int16))


# -- safetensors: malformed files -------------------------------------------------------

def good_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)})
    return path


def with_header(path, header: dict, data: bytes, length: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("case", ["truncated", "trailing", "short", "json", "not_object", "absurd_length",
                                  "past_eof", "overlap", "gap", "size_mismatch", "dtype", "shape", "metadata"])
def test_malformed_files_are_one_clear_error(tmp_path, case):
    path = good_file(tmp_path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    data = b"\0" * 16
    if case == "truncated":
        path.write_bytes(raw[:-5])
    elif case == "trailing":
        path.write_bytes(raw + b"extra")
    elif case == "short":
        path.write_bytes(raw[:5])
    elif case == "json":
        path.write_bytes(raw[:8] + b"{not json" + b" " * (n - 9) + raw[8 + n:])
    elif case == "not_object":
        with_header(path, [1, 2], data)  # type: ignore[arg-type]
    elif case == "absurd_length":
        path.write_bytes((2 ** 60).to_bytes(8, "little") + raw[8:])
    elif case == "past_eof":
        with_header(path, {"a": {"dtype": "F32", "shape": [2 ** 40], "data_offsets": [0, 2 ** 42]}}, data)
    elif case == "overlap":
        with_header(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                           "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, data)
    elif case == "gap":
        with_header(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, data)
    elif case == "size_mismatch":
        with_header(path, {"a": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 16]}}, data)
    elif case == "dtype":
        with_header(path, {"a": {"dtype": "F8_E4M3", "shape": [16], "data_offsets": [0, 16]}}, data)
    elif case == "shape":
        with_header(path, {"a": {"dtype": "U8", "shape": [-16], "data_offsets": [0, 16]}}, data)
    elif case == "metadata":
        with_header(path, {"__metadata__": {"n": 1}, "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}},
                    data)
    with pytest.raises(TinyloraError) as info:
        read_safetensors(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    if case in ("past_eof", "overlap", "gap", "size_mismatch", "dtype", "shape"):
        assert "'a'" in message or "'b'" in message, message


def test_missing_file(tmp_path):
    with pytest.raises(TinyloraError, match="nope.safetensors: file not found"):
        read_safetensors(tmp_path / "nope.safetensors")


# -- checkpoints: single and sharded -----------------------------------------------------

def sharded(tmp_path, rng):
    tensors = {f"model.layers.{i}.w": rng.standard_normal((3, 4)).astype(np.float32) for i in range(4)}
    tensors["lm_head.weight"] = rng.standard_normal((5, 4)).astype(np.float32)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: tensors[k] for k in keys}, bf16=True)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    write_json(tmp_path / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})
    return tensors, weight_map


def test_sharded_checkpoint(tmp_path):
    tensors, _ = sharded(tmp_path, np.random.default_rng(5))
    loaded = load_checkpoint(tmp_path)
    assert set(loaded) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(loaded[name], bf16_to_f32(f32_to_bf16(tensors[name])))
    bits = load_checkpoint(tmp_path, keep_bf16=True)
    assert all(a.dtype == np.uint16 for a in bits.values())


def test_single_file_checkpoint(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones((2, 2), np.float32)})
    np.testing.assert_array_equal(load_checkpoint(tmp_path)["w"], np.ones((2, 2)))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(TinyloraError, match=f"{tmp_path}: no model.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TinyloraError, match="pickle"):
        load_checkpoint(tmp_path)

    missing = tmp_path / "missing_shard"
    missing.mkdir()
    sharded(missing, np.random.default_rng(6))
    (missing / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TinyloraError, match="index.json: shard 'model-00002-of-00002.safetensors' is missing"):
        load_checkpoint(missing)

    extra = tmp_path / "extra_name"
    extra.mkdir()
    _, weight_map = sharded(extra, np.random.default_rng(6))
    write_json(extra / "model.safetensors.index.json",
               {"weight_map": {**weight_map, "extra.weight": "model-00001-of-00002.safetensors"}})
    with pytest.raises(TinyloraError, match="model-00001-of-00002.safetensors: has no tensor 'extra.weight'"):
        load_checkpoint(extra)

    index = extra / "model.safetensors.index.json"
    write_json(index, {"weight_map": {"w": "../../etc/passwd"}})
    with pytest.raises(TinyloraError, match="outside"):
        load_checkpoint(extra)
    index.write_text("{oops")
    with pytest.raises(TinyloraError, match="index.json: malformed JSON"):
        load_checkpoint(extra)


# -- transformers reads what we write, and writes what we read --------------------------------

def tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return torch, transformers, transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("bf16", [False, True])
def test_transformers_loads_our_checkpoint(tmp_path, bf16):
    torch, transformers, model = tiny_llama()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    model.config.save_pretrained(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", state, bf16=bf16)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    theirs = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
    assert set(theirs) == set(state)
    for name, array in state.items():
        expected = bf16_to_f32(f32_to_bf16(array)) if bf16 else array
        np.testing.assert_array_equal(theirs[name], expected, err_msg=name)


def test_we_load_transformers_sharded_checkpoint(tmp_path):
    torch, _, model = tiny_llama()
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_checkpoint(tmp_path)
    state = model.state_dict()
    assert set(ours) == set(state)
    for name, t in state.items():
        np.testing.assert_array_equal(ours[name], t.float().numpy(), err_msg=name)
