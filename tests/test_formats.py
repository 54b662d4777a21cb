"""Safetensors files through the library, and single/sharded checkpoints (tinylora/formats/safetensors.py).

The `safetensors` library does the parsing and checking; these tests check
what tinylora adds: every dtype (bfloat16 as ml_dtypes' type) round-trips
bit-exactly, torch's bfloat16 files read and write the same bits, every
malformed file is one TinyloraError naming the file, tensors are converted
as they are read and never held twice, and transformers loads checkpoints we
write and writes checkpoints we load. Atomic writes are in test_files.py,
hub resolution in test_hub.py.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from tinylora.errors import TinyloraError
from tinylora.formats.files import write_json
from tinylora.formats.safetensors import (BFLOAT16, load_checkpoint, read_header, read_metadata, read_safetensors,
                                          write_safetensors)

DTYPES = [np.float32, np.float16, np.float64, BFLOAT16, np.int64, np.int32, np.int16, np.int8,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
SHAPES = [(), (0,), (1,), (3,), (2, 0, 3), (3, 5), (2, 3, 7), (1, 7, 1)]


def random_array(rng, dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if dtype == BFLOAT16:                               # every bit pattern, NaN payloads and -0.0 included
        return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(BFLOAT16)
    if dtype.kind == "f":
        return np.asarray(rng.standard_normal(shape) * 3, dtype=dtype)
    info = np.iinfo(dtype)
    return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True))


# -- round trips -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": random_array(rng, dtype, shape) for i, shape in enumerate(SHAPES)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
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


def test_metadata(tmp_path):
    write_safetensors(tmp_path / "x.safetensors", {"w": np.zeros(2, np.float32)})
    assert read_metadata(tmp_path / "x.safetensors") == {"format": "pt"}       # what transformers and PEFT expect
    write_safetensors(tmp_path / "y.safetensors", {"w": np.zeros(2, np.float32)}, metadata={"format": "pt", "n": "小"})
    assert read_header(tmp_path / "y.safetensors") == (["w"], {"format": "pt", "n": "小"})
    with pytest.raises(TinyloraError, match="metadata must map strings to strings"):
        write_safetensors(tmp_path / "z.safetensors", {"w": np.zeros(2)}, metadata={"n": 1})
    assert not (tmp_path / "z.safetensors").exists()


def test_convert_is_applied_tensor_by_tensor_in_file_order(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {name: rng.standard_normal((3, 4)).astype(np.float32) for name in ("b", "a", "c")}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    seen = []

    def convert(name, array):
        seen.append(name)
        return array.astype(np.float64) * 2
    back = read_safetensors(tmp_path / "x.safetensors", convert)
    assert seen == read_header(tmp_path / "x.safetensors")[0] and sorted(seen) == ["a", "b", "c"]
    for name, array in tensors.items():
        assert back[name].dtype == np.float64
        np.testing.assert_array_equal(back[name], array.astype(np.float64) * 2)


def test_a_checkpoint_is_never_in_memory_twice(tmp_path):
    # 8 tensors of 16 MB: read one at a time (the file re-opened for each), the process holds the
    # 128 MB it keeps plus about one tensor; read in one safe_open, the mapped pages would double it.
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {f"t{i}": np.full((4096, 1024), i, np.float32) for i in range(8)})
    code = ("import resource, sys\n"
            "from tinylora.formats.safetensors import read_safetensors\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"kept = read_safetensors({str(path)!r})\n"
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print((peak - base) / 1024)\n")
    grew_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout)
    assert grew_mb < 128 * 1.3, f"reading a 128 MB checkpoint grew the peak RSS by {grew_mb:.0f} MB"


# -- bfloat16: torch as the oracle ----------------------------------------------------

def test_bf16_against_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    x = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    ref = {"w": x.to(torch.bfloat16), "s": torch.tensor(1.5, dtype=torch.bfloat16)}
    st_torch.save_file(ref, tmp_path / "torch.safetensors")
    back = read_safetensors(tmp_path / "torch.safetensors")
    for name, t in ref.items():
        assert back[name].dtype == BFLOAT16
        np.testing.assert_array_equal(back[name].view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))

    # ours -> torch: the same bits, whichever side wrote them
    write_safetensors(tmp_path / "ours.safetensors", {"w": x.numpy().astype(BFLOAT16)})
    theirs = st_torch.load_file(tmp_path / "ours.safetensors")["w"]
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(theirs.view(torch.int16), ref["w"].view(torch.int16))


# -- malformed files ---------------------------------------------------------------------

def good_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)})
    return path


def with_header(path, header: dict, data: bytes, length: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("case", ["truncated", "trailing", "short", "empty", "json", "not_object", "absurd_length",
                                  "past_eof", "overlap", "gap", "size_mismatch", "dtype", "float8", "shape",
                                  "metadata"])
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
    elif case == "empty":
        path.write_bytes(b"")
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
        with_header(path, {"a": {"dtype": "Q4_K", "shape": [16], "data_offsets": [0, 16]}}, data)
    elif case == "float8":      # a dtype the library knows and NumPy lacks
        with_header(path, {"a": {"dtype": "F4", "shape": [32], "data_offsets": [0, 16]}}, data)
    elif case == "shape":
        with_header(path, {"a": {"dtype": "U8", "shape": [-16], "data_offsets": [0, 16]}}, data)
    elif case == "metadata":
        with_header(path, {"__metadata__": {"n": 1}, "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}},
                    data)
    with pytest.raises(TinyloraError) as info:
        read_safetensors(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message, message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(TinyloraError, match="nope.safetensors: file not found"):
        read_safetensors(tmp_path / "nope.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(TinyloraError, match="dir.safetensors: is a folder"):
        read_safetensors(tmp_path / "dir.safetensors")


# -- checkpoints: single and sharded -----------------------------------------------------

def sharded(tmp_path, rng):
    tensors = {f"model.layers.{i}.w": rng.standard_normal((3, 4)).astype(np.float32) for i in range(4)}
    tensors["lm_head.weight"] = rng.standard_normal((5, 4)).astype(np.float32)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: tensors[k].astype(BFLOAT16) for k in keys})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    write_json(tmp_path / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})
    return tensors, weight_map


def test_sharded_checkpoint(tmp_path):
    tensors, _ = sharded(tmp_path, np.random.default_rng(5))
    loaded = load_checkpoint(tmp_path)
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert loaded[name].dtype == BFLOAT16
        np.testing.assert_array_equal(loaded[name], tensors[name].astype(BFLOAT16))
    widened = load_checkpoint(tmp_path, convert=lambda name, a: a.astype(np.float32))
    assert all(a.dtype == np.float32 for a in widened.values())


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
    written = {k: v.astype(BFLOAT16) for k, v in state.items()} if bf16 else state
    write_safetensors(tmp_path / "model.safetensors", written)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    theirs = {k: v.detach().numpy() for k, v in loaded.state_dict().items()}
    assert set(theirs) == set(state)
    for name, array in written.items():
        np.testing.assert_array_equal(theirs[name], array.astype(np.float32), err_msg=name)


def test_we_load_transformers_sharded_checkpoint(tmp_path):
    torch, _, model = tiny_llama()
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_checkpoint(tmp_path)
    state = model.state_dict()
    assert set(ours) == set(state)
    for name, t in state.items():
        assert ours[name].dtype == BFLOAT16, name
        np.testing.assert_array_equal(ours[name].view(np.uint16), t.view(torch.int16).numpy().view(np.uint16),
                                      err_msg=name)


def test_transformers_bf16_model_loads_in_tinylora_as_bf16(tmp_path):
    # The whole path a user takes: transformers' own bf16 save_pretrained (sharded), tl.load_model
    # keeping every matrix as a BF16Weight with torch's bits, and the same logits as transformers.
    torch, _, model = tiny_llama()
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    from tinylora.kernels.weights import BF16Weight
    from tinylora.loading import load_model
    ours = load_model(tmp_path, dtype="bfloat16")
    state = model.state_dict()
    for name, p in ours.named_parameters():
        bits = state[name].view(torch.int16).numpy().view(np.uint16)
        if p.ndim == 2:
            assert isinstance(p.data, BF16Weight), name
            np.testing.assert_array_equal(p.data.bits, bits, err_msg=name)
        else:
            np.testing.assert_array_equal(p.data, state[name].float().numpy(), err_msg=name)
    ids = np.array([[3, 17, 5, 29, 8, 1, 60]])
    with torch.no_grad():
        theirs = model.float()(torch.tensor(ids)).logits.numpy()       # the same bf16 values, float32 compute
    import tinylora as tl
    with tl.no_grad():
        np.testing.assert_allclose(ours(ids).data, theirs, atol=1e-4)
