"""mlx-lm adapters (`tinylora export --to mlx`, and mlx-lm folders wherever an adapter is read): the files,
the transposes, the layers mlx-lm can express, bad input.

Fast: no mlx needed (the format is JSON and safetensors). tests/test_mlx_lm.py runs mlx-lm itself.
"""

import json

import numpy as np
import pytest
from test_to_gguf import ALL_SEVEN, LLAMA, QWEN2, adapter_folder, base_folder, read_back
from test_trainer import config as train_config
from test_trainer import data, tiny_model, tok  # noqa: F401 (fixtures)

import tinylora as tl
from tinylora.cli import main
from tinylora.errors import TinyloraError
from tinylora.formats.files import write_json
from tinylora.formats.safetensors import read_metadata, read_safetensors, write_safetensors
from tinylora.loading import load_model
from tinylora.lora import load_adapter, save_adapter
from tinylora.lora.mlx import mlx_config_dict, mlx_tensors
from tinylora.lora.peft import read_adapter
from tinylora.lora.to_gguf import export_gguf
from tinylora.lora.to_mlx import export_mlx
from tinylora.train import train


def logits(model, ids=(1, 5, 7, 2, 30, 11)):
    with tl.no_grad():
        return model(np.array([ids])).data[0]


@pytest.mark.parametrize("raw", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_export_writes_mlx_lms_files_transposed(tmp_path, raw):
    base = base_folder(tmp_path, raw)
    adapter, peft = adapter_folder(tmp_path, base)                  # r 4, alpha 8, all seven, both layers
    out = export_mlx(adapter, tmp_path / "mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == {"fine_tune_type": "lora", "model": str(base), "num_layers": 2,
                      "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                          "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "mlp.down_proj"]}}
    tensors = read_safetensors(out / "adapters.safetensors")
    assert read_metadata(out / "adapters.safetensors") == {"format": "mlx"}
    assert len(tensors) == len(peft) == 28
    for layer in range(2):
        for parent, name in [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("mlp", "down_proj")]:
            path = f"model.layers.{layer}.{parent}.{name}"
            a, b = tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"]
            assert a.dtype == b.dtype == np.float32
            assert np.array_equal(a, peft[f"base_model.model.{path}.lora_A.weight"].T)     # (in, r): Aᵀ
            assert np.array_equal(b, peft[f"base_model.model.{path}.lora_B.weight"].T)     # (r, out): Bᵀ, no permute


def test_an_mlx_adapter_gives_the_peft_adapters_logits_and_converts_back(tmp_path):
    base = base_folder(tmp_path, LLAMA)
    adapter, peft = adapter_folder(tmp_path, base, use_rslora=True)
    mlx = export_mlx(adapter, tmp_path / "mlx")
    assert json.loads((mlx / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 8 / 2   # alpha/√r
    via_peft, via_mlx = load_adapter(load_model(base), adapter), load_adapter(load_model(base), mlx)
    assert via_mlx.lora_config.scale == via_peft.lora_config.scale
    assert np.array_equal(logits(via_mlx), logits(via_peft))
    assert np.abs(logits(via_peft) - logits(load_model(base))).max() > 1e-2        # the adapter does something
    again = save_adapter(via_mlx, tmp_path / "again")                              # mlx-lm's -> PEFT's
    assert all(np.array_equal(a, peft[k]) for k, a in read_safetensors(again / "adapter_model.safetensors").items())
    # and the same GGUF tensors as from the PEFT folder (mlx-examples #816: mlx-lm adapters for llama.cpp)
    ours, theirs = read_back(export_gguf(mlx, tmp_path / "m.gguf", base=base))[1], \
        read_back(export_gguf(adapter, tmp_path / "p.gguf"))[1]
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k][1], theirs[k][1]) for k in ours)


def test_only_a_run_of_last_layers_has_an_mlx_spelling(tmp_path):
    base = base_folder(tmp_path, QWEN2)
    adapter, _ = adapter_folder(tmp_path, base, layers=[1], target_modules=["q_proj", "v_proj"])
    out = export_mlx(adapter, tmp_path / "mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert sorted(read_safetensors(out / "adapters.safetensors")) == [
        f"model.layers.1.self_attn.{p}.{w}" for p in ("q_proj", "v_proj") for w in ("lora_a", "lora_b")]
    assert read_adapter(out, load_model(base).config)[0].layers == [1]
    first, _ = adapter_folder(tmp_path / "x", base, layers=[0])
    with pytest.raises(TinyloraError, match=r"layers \[0\]: mlx-lm adapts the last num_layers layers"):
        export_mlx(first, tmp_path / "mlx0")
    assert not (tmp_path / "mlx0").exists()


def write_mlx(folder, config: dict, tensors: dict):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=4))
    write_safetensors(folder / "adapters.safetensors", tensors, metadata={"format": "mlx"})
    return folder


def mlx_lm_folder(tmp_path, base, name="theirs", **config):
    """A folder as mlx_lm.lora writes it (every flag, no keys: every Linear), B non-zero, last layer only."""
    model = load_model(base)
    rng = np.random.default_rng(2)
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    kv = model.config.num_key_value_heads * model.config.head_dim
    dims = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}
    tensors = {}
    for key, (n_in, n_out) in dims.items():
        tensors[f"model.layers.1.{key}.lora_a"] = rng.uniform(-0.1, 0.1, (n_in, 8)).astype(np.float32)
        tensors[f"model.layers.1.{key}.lora_b"] = 0.05 * rng.standard_normal((8, n_out)).astype(np.float32)
    raw = {"adapter_path": "adapters", "batch_size": 4, "data": "data", "fine_tune_type": "lora", "iters": 100,
           "learning_rate": 1e-5, "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0}, "model": str(base),
           "num_layers": 1, "optimizer": "adam", "seed": 0, "train": True, **config}
    return write_mlx(tmp_path / name, raw, tensors), tensors


def test_an_adapter_mlx_lm_wrote_loads_as_mlx_lm_reads_it(tmp_path):
    base = base_folder(tmp_path, LLAMA)
    folder, tensors = mlx_lm_folder(tmp_path, base)
    model = load_adapter(load_model(base), folder)
    c = model.lora_config
    assert (c.r, c.scale, c.targets, c.layers) == (8, 20.0, ALL_SEVEN, [1])
    plain = dict(load_model(base).named_parameters())
    # y = x Wᵀ + scale · (x lora_a) lora_b, layer by layer: the merged weight is W + scale · lora_bᵀ lora_aᵀ
    tl.lora.merge(model)
    merged = dict(model.named_parameters())
    for k in ("self_attn.q_proj", "mlp.down_proj"):
        name = f"model.layers.1.{k}.weight"
        expected = plain[name].data.to_float() + \
            20.0 * tensors[f"model.layers.1.{k}.lora_b"].T @ tensors[f"model.layers.1.{k}.lora_a"].T
        np.testing.assert_allclose(merged[name].data.to_float(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_layers, layers", [(-1, None), (0, None), (2, None), (1, [1])])
def test_num_layers_counts_from_the_last_layer_as_mlx_lm_slices(tmp_path, num_layers, layers):
    base = base_folder(tmp_path, QWEN2)
    folder, tensors = mlx_lm_folder(tmp_path, base, num_layers=num_layers)
    if layers is None:                                                           # every layer: give layer 0 too
        tensors.update({k.replace("layers.1.", "layers.0."): v for k, v in tensors.items()})
        write_safetensors(folder / "adapters.safetensors", tensors)
    assert read_adapter(folder, load_model(base).config)[0].layers == layers


@pytest.mark.parametrize("change, message", [
    ({"fine_tune_type": "dora"}, r'fine_tune_type = "dora": DoRA \(weight-decomposed LoRA\) is not supported'),
    ({"fine_tune_type": "full", "lora_parameters": None}, 'fine_tune_type = "full": a full fine-tune is not a LoRA'),
    ({"use_dora": True, "fine_tune_type": None}, "DoRA"),
    ({"num_layers": 5}, r"num_layers = 5: the model has 2 layers; is this adapter for another model\?"),
    ({"lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0, "keys": ["self_attn.rope"]}},
     r'lora_parameters.keys = "self_attn.rope": names none of the projections'),
    ({"lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0, "keys": ["lm_head"]}}, '"lm_head": names none'),
    ({"lora_parameters": {"rank": 8, "dropout": 0.0}}, "lora_parameters has no 'scale'"),
    ({"lora_parameters": {"rank": 0, "dropout": 0.0, "scale": 1.0}}, "lora_parameters.rank = 0: expected a positive"),
])
def test_what_is_not_plain_lora_is_refused_in_one_line(tmp_path, change, message):
    base = base_folder(tmp_path, QWEN2)
    folder, _ = mlx_lm_folder(tmp_path, base)
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    model = load_model(base)
    with pytest.raises(TinyloraError, match=message) as e:
        load_adapter(model, folder)
    assert "\n" not in str(e.value) and str(folder / "adapter_config.json") in str(e.value)
    assert not tl.lora.lora_layers(model)                                        # nothing injected


def test_tensors_that_do_not_fit_the_base_are_named(tmp_path):
    base = base_folder(tmp_path, QWEN2)
    folder, tensors = mlx_lm_folder(tmp_path, base)
    weights = folder / "adapters.safetensors"
    bad = dict(tensors)
    bad["model.layers.1.self_attn.q_proj.lora_a"] = np.zeros((8, 64), np.float32)       # PEFT's orientation
    write_safetensors(weights, bad)
    with pytest.raises(TinyloraError, match=r"tensor model.layers.1.self_attn.q_proj.lora_a has shape \(8, 64\), "
                                            r"expected \(64, 8\)"):
        load_adapter(load_model(base), folder)
    write_safetensors(weights, {**tensors, "model.layers.1.self_attn.q_proj.m": np.ones(64, np.float32)})
    with pytest.raises(TinyloraError, match=r"unexpected tensor model.layers.1.self_attn.q_proj.m: a DoRA magnitude"):
        load_adapter(load_model(base), folder)
    write_safetensors(weights, {**tensors, "model.layers.7.mlp.up_proj.lora_a": np.ones((64, 8), np.float32)})
    with pytest.raises(TinyloraError, match=r"layers.7.mlp.up_proj.lora_a: the model has 2 layers"):
        load_adapter(load_model(base), folder)
    write_safetensors(weights, {**tensors, "model.layers.1.mlp.up_proj.lora_b": np.full((8, 96), np.nan, np.float32)})
    with pytest.raises(TinyloraError, match="up_proj.lora_b holds NaN or inf values"):
        load_adapter(load_model(base), folder)
    weights.unlink()
    with pytest.raises(TinyloraError, match="adapters.safetensors: file not found"):
        load_adapter(load_model(base), folder)


def test_the_cli_writes_an_mlx_folder_and_keeps_an_existing_one(tmp_path, capsys):
    base = base_folder(tmp_path, QWEN2)
    adapter, _ = adapter_folder(tmp_path, base)
    out = tmp_path / "mlx"
    assert main(["export", "--to", "mlx", "--adapter-path", str(adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"mlx_lm.generate --model {base} --adapter-path {out}" in printed
    before = (out / "adapters.safetensors").read_bytes()
    write_json(out / "adapter_config.json", {"keep": "me"})
    assert main(["export", "--to", "mlx", "--adapter-path", str(adapter), "--out", str(out)]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text()) == {"keep": "me"}
    assert main(["export", "--to", "mlx", "--adapter-path", str(adapter), "--out", str(out), "--force"]) == 0
    assert (out / "adapters.safetensors").read_bytes() == before
    assert json.loads((out / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    other = base_folder(tmp_path, {**QWEN2, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
                        name="other")
    assert main(["export", "--to", "mlx", "--adapter-path", str(adapter), "--model", str(other),
                 "--out", str(tmp_path / "x")]) == 2
    assert "has shape" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_training_goes_on_from_an_mlx_lm_adapter(tok, data, tmp_path):  # noqa: F811
    first = tmp_path / "first"
    done = train(train_config(data, first, iters=4), tiny_model(tok), tok, progress=False, log=lambda *a: None)
    model = load_adapter(tiny_model(tok), first)
    config, tensors = read_adapter(first, model.config)
    mlx = write_mlx(tmp_path / "mlx", mlx_config_dict(config, 2, None), mlx_tensors(tensors))
    for start in (mlx, mlx / "adapters.safetensors", first / "adapter_model.safetensors"):
        out = tmp_path / f"from-{start.name}"
        lines = []
        again = train(train_config(data, out, iters=2, rank=2, resume_adapter_file=str(start)), tiny_model(tok), tok,
                      progress=False, log=lines.append)
        assert again.val_losses[0][0] == 0
        assert again.val_losses[0][1] == pytest.approx(done.val_losses[-1][1], rel=1e-6)   # the adapter's loss
        assert any("starting from the adapter" in line and "r 4" in line for line in lines)
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4          # the adapter's rank, not --rank
    with pytest.raises(TinyloraError, match="--resume .* or --resume-adapter-file, not both"):
        train_config(data, tmp_path / "x", resume=True, resume_adapter_file=str(mlx))
