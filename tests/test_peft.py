"""PEFT-format adapters without torch: round trip, every bad adapter's one-line error, atomic saves.

The model is a tiny random Qwen2 (2 layers, GQA, q/k/v biases) written to
tmp_path as a Hugging Face folder and loaded with load_model, so it has the
`name_or_path` and `folder` a real model has. Parity with PEFT itself is in
test_reference_peft.py.
"""

import json
import re

import numpy as np
import pytest

import tinylora as tl
from tinylora.config import ModelConfig
from tinylora.errors import TinyloraError
from tinylora.lora import peft
from tinylora.formats.files import write_json
from tinylora.lora.peft import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from tinylora.formats.safetensors import read_metadata, read_safetensors, write_safetensors
from tinylora.loading import load_model
from tinylora.lora import LoraConfig, apply_lora, lora_layers, lora_parameters
from tinylora.model import random_state_dict

TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
        "tie_word_embeddings": True}
IDS = np.array([[3, 17, 5, 29, 8, 1], [7, 2, 30, 11, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
PREFIX = "base_model.model.model.layers"


@pytest.fixture
def base_dir(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    tensors = random_state_dict(ModelConfig.from_dict(TINY), np.random.default_rng(0), std=0.2)
    write_safetensors(folder / "model.safetensors", tensors)
    write_json(folder / "config.json", TINY)
    return folder


def with_lora(base_dir, seed=1, **kwargs):
    """A model with LoRA applied and B set non-zero (with B = 0 an adapter would change nothing)."""
    model = apply_lora(load_model(base_dir), LoraConfig(**kwargs), seed=seed)
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = (0.3 * rng.standard_normal(layer.lora_B.weight.shape)).astype(np.float32)
    return model


def logits(model):
    with tl.no_grad():
        return model(IDS, MASK).data


@pytest.fixture
def adapter(base_dir, tmp_path):
    """(the model that saved it, the adapter folder): r=4 on q_proj and v_proj of both layers."""
    model = with_lora(base_dir, r=4, alpha=8, target_modules=["v_proj", "q_proj"])
    return model, save_adapter(model, tmp_path / "adapter")


# ---- round trip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(r=4, alpha=8, target_modules=["v_proj", "q_proj"]),
    dict(r=2, alpha=3.5, dropout=0.1, target_modules="all-linear", use_rslora=True, layers=[1]),
])
def test_round_trip(base_dir, tmp_path, kwargs):
    model = with_lora(base_dir, **kwargs)
    save_adapter(model, tmp_path / "adapter")

    saved = read_safetensors(tmp_path / "adapter" / WEIGHTS_FILE)
    assert read_metadata(tmp_path / "adapter" / WEIGHTS_FILE) == {"format": "pt", "tinylora.base_weights": "float32"}
    params = dict(lora_parameters(model))
    assert sorted(saved) == sorted(params)
    for name, t in params.items():
        np.testing.assert_array_equal(saved[name], t.data, err_msg=name)
    r = kwargs["r"]
    assert saved[f"{PREFIX}.1.self_attn.v_proj.lora_A.weight"].shape == (r, 16)      # A (R, in)
    assert saved[f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"].shape == (8, r)       # B (out, R): 2 kv heads × 4

    text = (tmp_path / "adapter" / CONFIG_FILE).read_text()
    config = json.loads(text)
    assert list(config) == sorted(config)                      # PEFT writes its keys sorted
    targets = sorted(model.lora_config.targets)
    assert {k: config[k] for k in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                   "bias", "use_rslora", "layers_to_transform", "base_model_name_or_path",
                                   "inference_mode", "fan_in_fan_out", "use_dora", "modules_to_save"]} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": kwargs["alpha"],
        "lora_dropout": kwargs.get("dropout", 0.0), "target_modules": targets, "bias": "none",
        "use_rslora": kwargs.get("use_rslora", False), "layers_to_transform": kwargs.get("layers"),
        "base_model_name_or_path": str(base_dir), "inference_mode": True, "fan_in_fan_out": False,
        "use_dora": False, "modules_to_save": None}
    assert '"lora_alpha": 8,' in text or kwargs["alpha"] != 8   # an integral alpha is written as an int, as PEFT does

    model2 = load_adapter(load_model(base_dir), tmp_path / "adapter")
    fields = lambda c: (c.r, c.alpha, c.dropout, c.targets, c.use_rslora, c.layers, c.scale)   # noqa: E731
    assert fields(model2.lora_config) == fields(model.lora_config)
    for (n1, t1), (n2, t2) in zip(lora_parameters(model), lora_parameters(model2)):
        assert n1 == n2 and t2.requires_grad
        np.testing.assert_array_equal(t1.data, t2.data)
    np.testing.assert_array_equal(logits(model2.train(False)), logits(model.train(False)))
    assert np.abs(logits(model2) - logits(load_model(base_dir))).max() > 1e-3      # the adapter does something


def test_saving_again_replaces_the_adapter(base_dir, adapter):
    model, folder = adapter
    for _, t in lora_parameters(model):
        t.data = t.data * 2
    save_adapter(model, folder)
    np.testing.assert_array_equal(logits(load_adapter(load_model(base_dir), folder)), logits(model))


def test_keys_with_peft_adapter_name_load(base_dir, adapter):
    """Some tools save PEFT's in-memory names, lora_A.default.weight; PEFT loads both spellings, so do we."""
    model, folder = adapter
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    write_safetensors(folder / WEIGHTS_FILE, {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()})
    np.testing.assert_array_equal(logits(load_adapter(load_model(base_dir), folder)), logits(model))


def test_minimal_config_as_other_tools_write_it(base_dir, adapter):
    """Only the fields that matter; target_modules in any order; layers_to_transform as a bare int."""
    model, folder = adapter
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    write_safetensors(folder / WEIGHTS_FILE, {k: v for k, v in tensors.items() if ".layers.1." in k})
    write_json(folder / CONFIG_FILE, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "layers_to_transform": 1,
                                      "target_modules": ["v_proj", "q_proj"], "peft_version": "0.99.0"})
    loaded = load_adapter(load_model(base_dir), folder)
    assert [name for name, _ in lora_layers(loaded)] == ["model.layers.1.self_attn.q_proj",
                                                         "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("targets, layers", [
    (["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
      "model.layers.1.self_attn.v_proj"], None),           # how PEFT writes "all-linear" in a small model
    (["self_attn.q_proj", "self_attn.v_proj"], None),       # dotted suffixes, matched as PEFT matches them
    (["q_proj", "v_proj"], [0, 1]),                         # every layer listed: the same as null
])
def test_target_spellings_peft_accepts(base_dir, adapter, targets, layers):
    model, folder = adapter
    edit_config(target_modules=targets, layers_to_transform=layers)(folder)
    loaded = load_adapter(load_model(base_dir), folder)
    assert loaded.lora_config.targets == ["q_proj", "v_proj"] and loaded.lora_config.layers is None
    np.testing.assert_array_equal(logits(loaded), logits(model))


def test_full_paths_ignore_layers_to_transform(base_dir, adapter):
    """PEFT's rule: a full path is adapted whatever layers_to_transform says; a bare name only in those layers."""
    model, folder = adapter
    edit_config(target_modules=["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "q_proj",
                                "v_proj"], layers_to_transform=[1])(folder)
    loaded = load_adapter(load_model(base_dir), folder)
    assert loaded.lora_config.targets == ["q_proj", "v_proj"] and loaded.lora_config.layers is None
    np.testing.assert_array_equal(logits(loaded), logits(model))


# ---- refusals: one line, naming the field or tensor; the model untouched -------------------------------
def edit_config(**change):
    def edit(folder):
        config = json.loads((folder / CONFIG_FILE).read_text())
        write_json(folder / CONFIG_FILE, config | change)
    return edit


def edit_tensors(fn):
    def edit(folder):
        write_safetensors(folder / WEIGHTS_FILE, fn(read_safetensors(folder / WEIGHTS_FILE)))
    return edit


Q_A = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
Q_B = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"

BAD = {
    "rank in config": (edit_config(r=8), re.escape(f"{WEIGHTS_FILE}: tensor {Q_A} has shape (4, 16), expected (8, 16)")),
    "transposed B": (edit_tensors(lambda t: t | {Q_B: t[Q_B].T.copy()}),
                     rf"{Q_B} has shape \(4, 16\), expected \(16, 4\)"),
    "missing tensor": (edit_tensors(lambda t: {k: v for k, v in t.items() if k != Q_B}),
                       rf"missing tensor {Q_B} \(expected shape \(16, 4\)\)"),
    "extra module": (edit_tensors(lambda t: t | {Q_A.replace("q_proj", "k_proj"): t[Q_A]}),
                     "unexpected tensor .*k_proj.lora_A.weight: adapter_config.json does not adapt this module"),
    "more layers than the model": (edit_tensors(lambda t: t | {Q_A.replace(".0.", ".5."): t[Q_A]}),
                                   r"unexpected tensor .*layers\.5\..*the model has 2 layers \(0-1\)"),
    "integer tensor": (edit_tensors(lambda t: t | {Q_A: t[Q_A].astype(np.int32)}), f"{Q_A} has dtype int32"),
    "NaN": (edit_tensors(lambda t: t | {Q_A: np.full_like(t[Q_A], np.nan)}), f"{Q_A} holds NaN"),
    "lm_head target": (edit_config(target_modules=["q_proj", "lm_head"]),
                       "target_modules = .*'lm_head' names none of the projections"),
    "embed_tokens target": (edit_config(target_modules=["embed_tokens"]), "'embed_tokens' names none of"),
    "layer path the model lacks": (edit_config(target_modules=["model.layers.7.self_attn.q_proj"]),
                                   r"names none of the projections .* in model.layers.0-1\)"),
    "not a rectangle": (edit_config(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"]),
                        "selects different projections in different layers"),
    "regex target": (edit_config(target_modules=r".*\.(q|v)_proj"), "a regular expression is not supported"),
    "empty target": (edit_config(target_modules=[]), "target_modules = \\[\\]: expected a non-empty list"),
    "DoRA": (edit_config(use_dora=True), "use_dora = true: DoRA .* is not supported"),
    "modules_to_save": (edit_config(modules_to_save=["lm_head"]), "modules_to_save = .*not supported"),
    "bias": (edit_config(bias="lora_only"), 'bias = "lora_only": only bias "none"'),
    "lora_bias": (edit_config(lora_bias=True), "lora_bias = true"),
    "fan_in_fan_out": (edit_config(fan_in_fan_out=True), "fan_in_fan_out = true"),
    "rank_pattern": (edit_config(rank_pattern={"q_proj": 8}), "rank_pattern = .*per-module ranks"),
    "alpha_pattern": (edit_config(alpha_pattern={"q_proj": 8}), "alpha_pattern = "),
    "not LoRA": (edit_config(peft_type="IA3"), 'peft_type = "IA3": only LoRA'),
    "PiSSA": (edit_config(init_lora_weights="pissa"), "init_lora_weights = \"pissa\": .*rewrites the base weights"),
    "unknown switch": (edit_config(use_future_trick=True), "use_future_trick = true: .*not understood"),
    "layer out of range": (edit_config(layers_to_transform=[0, 2]), r"layers_to_transform = \[0, 2\]: out of range"),
    "bad r": (edit_config(r=0), "r must be a positive integer"),
    "missing r": (lambda f: write_json(f / CONFIG_FILE, {"peft_type": "LORA", "lora_alpha": 8,
                                                         "target_modules": ["q_proj"]}), "missing field 'r'"),
    "malformed JSON": (lambda f: (f / CONFIG_FILE).write_text('{"peft_type": "LORA",\n "r": 4,,}'),
                       f"{CONFIG_FILE}: malformed JSON at line 2"),
    "no config": (lambda f: (f / CONFIG_FILE).unlink(), f"{CONFIG_FILE}: file not found"),
    "no weights": (lambda f: (f / WEIGHTS_FILE).unlink(), f"{WEIGHTS_FILE}: file not found"),
    "pickled weights": (lambda f: ((f / WEIGHTS_FILE).rename(f / "adapter_model.bin")), "is a pickle"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_refused_and_model_untouched(base_dir, adapter, case):
    _, folder = adapter
    edit, message = BAD[case]
    edit(folder)
    model = load_model(base_dir)
    before = logits(model)
    with pytest.raises(TinyloraError, match=message) as err:
        load_adapter(model, folder)
    assert "\n" not in str(err.value)
    assert not lora_layers(model) and not hasattr(model, "lora_config")
    assert not any(t.requires_grad for t in model.parameters())
    np.testing.assert_array_equal(logits(model), before)


def test_missing_folder(base_dir, tmp_path):
    with pytest.raises(TinyloraError, match="adapter folder not found"):
        load_adapter(load_model(base_dir), tmp_path / "nowhere")


def test_model_that_already_has_lora(base_dir, adapter):
    _, folder = adapter
    with pytest.raises(TinyloraError, match="already has LoRA layers"):
        load_adapter(with_lora(base_dir), folder)


def test_saving_a_model_without_lora(base_dir, tmp_path):
    with pytest.raises(TinyloraError, match="no LoRA layers to save"):
        save_adapter(load_model(base_dir), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ---- atomic saves ------------------------------------------------------------------------------------
def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_non_finite_adapter_is_not_saved_over_a_good_one(adapter):
    model, folder = adapter
    before = snapshot(folder)
    _, layer = lora_layers(model)[0]
    layer.lora_B.weight.data[0, 0] = np.inf
    with pytest.raises(TinyloraError, match=r"not saved: .*q_proj.lora_B.weight holds NaN or inf"):
        save_adapter(model, folder)
    assert snapshot(folder) == before


def test_failed_write_leaves_the_earlier_adapter_whole(adapter, monkeypatch):
    """A save that dies while writing (disk full, Ctrl-C) leaves the old pair of files, and no temporary files."""
    model, folder = adapter
    before = snapshot(folder)
    for _, t in lora_parameters(model):
        t.data = t.data + 1

    def dying_write(path, tensors, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(peft, "write_safetensors", dying_write)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, folder)
    assert snapshot(folder) == before


def test_saving_onto_a_file_is_one_clear_error(base_dir, tmp_path):
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(TinyloraError, match="is a file; an adapter is saved into a folder"):
        save_adapter(with_lora(base_dir), tmp_path / "adapter")


def test_use_rslora_must_be_a_json_bool(base_dir, adapter):
    _, adapter = adapter
    config = json.loads((adapter / CONFIG_FILE).read_text())
    write_json(adapter / CONFIG_FILE, config | {"use_rslora": "false"})
    with pytest.raises(TinyloraError, match="use_rslora must be true or false"):
        load_adapter(load_model(base_dir), adapter)


def test_empty_layers_to_transform_means_every_layer_as_in_peft(base_dir, adapter):
    _, adapter = adapter
    config = json.loads((adapter / CONFIG_FILE).read_text())
    write_json(adapter / CONFIG_FILE, config | {"layers_to_transform": []})
    assert load_adapter(load_model(base_dir), adapter).lora_config.layers is None


def test_loaded_adapter_with_dropout_is_ready_for_inference(base_dir, tmp_path):
    # load_adapter leaves the model in inference mode (as PEFT does): no dropout, repeatable outputs.
    model = with_lora(base_dir, dropout=0.3)
    save_adapter(model, tmp_path / "drop")
    loaded = load_adapter(load_model(base_dir), tmp_path / "drop")
    assert not loaded.training
    np.testing.assert_array_equal(logits(loaded), logits(loaded))
    ids = [1, 2, 3]
    loaded.train(True)                                  # even a model left in training mode generates without dropout
    assert tl.generate(loaded, None, ids, max_tokens=6) == tl.generate(loaded, None, ids, max_tokens=6)
    assert loaded.training                              # and is given back in the mode it was in
