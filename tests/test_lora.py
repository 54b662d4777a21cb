"""LoRA: config validation, injection, names, report, scale, layers, dropout, merge, gradients."""

import math

import numpy as np
import pytest
from helpers import assert_close, assert_gradcheck

import tinylora as tl
from tinylora.config import ModelConfig
from tinylora.errors import TinyloraError
from tinylora.gradcheck.model_check import TINY_QWEN2, check_lora_model, tiny_batch, tiny_lora_model
from tinylora.lora import LoraConfig, LoraLinear, apply_lora, lora_layers, lora_parameters, merge, parameter_report
from tinylora.model import CausalLM, random_state_dict
from tinylora.nn import Linear


def base_model(dtype=np.float32, seed=0) -> CausalLM:
    config = ModelConfig.from_dict(TINY_QWEN2)
    return CausalLM.from_state_dict(config, random_state_dict(config, np.random.default_rng(seed), dtype, std=0.2),
                                    dtype=dtype)


IDS, LABELS, MASK = tiny_batch()


def logits(model):
    with tl.no_grad():
        return model(IDS, MASK).data


# ---- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"alpha": -1}, "alpha must be a positive number"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"target_modules": ["q_proj", "lm_head"]}, "'lm_head' is not one of"),
    ({"target_modules": "everything"}, "list of names or 'all-linear'"),
    ({"target_modules": []}, "is not one of"),
    ({"layers": [-1]}, "indices >= 0"),
    ({"layers": []}, "non-empty list"),
    ({"init_std": 0}, "init_std must be a positive number"),
])
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(TinyloraError, match=message):
        LoraConfig(**kwargs)


def test_scale_and_rslora():
    assert LoraConfig(r=8, alpha=16).scale == 2.0
    assert LoraConfig(r=16, alpha=16, use_rslora=True).scale == 4.0        # alpha / sqrt(r)
    assert LoraConfig(target_modules="all-linear").targets == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"]
    assert LoraConfig(target_modules=["v_proj", "q_proj"]).targets == ["q_proj", "v_proj"]


# ---- injection ---------------------------------------------------------------------------------------
def test_output_equals_base_right_after_injection():
    model = base_model()
    before = logits(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=0)
    np.testing.assert_array_equal(logits(model), before)          # B = 0: exactly, not approximately


def test_only_a_and_b_train_with_peft_names_shapes_and_init():
    model = base_model()
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), seed=0)
    params = dict(lora_parameters(model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in params
    assert params["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (16, 4)   # (out, R)
    assert params["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 24)   # (R, in)
    assert len(params) == 2 * 2 * 2
    trainable = [n for n, t in model.named_parameters() if t.requires_grad]
    assert sorted("base_model.model." + n for n in trainable) == sorted(params)
    a = np.concatenate([t.data.ravel() for n, t in params.items() if "lora_A" in n])
    assert abs(a.std() - 1 / 4) < 0.02                            # PEFT's gaussian init: std 1/r
    assert all(np.all(t.data == 0) for n, t in params.items() if "lora_B" in n)


def test_same_seed_same_adapter_and_layer_subset():
    m1, m2 = base_model(), base_model()
    apply_lora(m1, LoraConfig(layers=[1]), seed=3)
    apply_lora(m2, LoraConfig(layers=[1]), seed=3)
    names = [n for n, _ in lora_layers(m1)]
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    for (_, t1), (_, t2) in zip(lora_parameters(m1), lora_parameters(m2)):
        np.testing.assert_array_equal(t1.data, t2.data)


def test_injection_refuses_out_of_range_layers_and_double_injection():
    with pytest.raises(TinyloraError, match="layer 5 out of range: the model has 2 layers"):
        apply_lora(base_model(), LoraConfig(layers=[0, 5]))
    model = apply_lora(base_model(), LoraConfig())
    with pytest.raises(TinyloraError, match="already has LoRA"):
        apply_lora(model, LoraConfig())


def test_parameter_report_counts():
    model = apply_lora(base_model(), LoraConfig(r=4, target_modules="all-linear"))
    # per layer: q (16->16), k (16->8), v (16->8), o (16->16), gate/up (16->24), down (24->16); 4 * (in + out) each
    per_layer = 4 * ((16 + 16) + (16 + 8) * 2 + (16 + 16) + (16 + 24) * 2 + (24 + 16))
    trainable = 2 * per_layer
    total = sum(t.size for t in model.parameters())
    assert parameter_report(model) == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}")


# ---- dropout and training mode ---------------------------------------------------------------------------
def test_dropout_only_in_training_mode_and_reproducible():
    model = tiny_lora_model(dtype=np.float32, lora=LoraConfig(r=4, alpha=8, dropout=0.5))
    model.train(False)
    eval_a, eval_b = logits(model), logits(model)
    np.testing.assert_array_equal(eval_a, eval_b)
    model.train(True)
    assert not np.allclose(logits(model), eval_a)                  # masks drawn while training
    m1 = tiny_lora_model(dtype=np.float32, lora=LoraConfig(r=4, alpha=8, dropout=0.5))
    m2 = tiny_lora_model(dtype=np.float32, lora=LoraConfig(r=4, alpha=8, dropout=0.5))
    np.testing.assert_array_equal(logits(m1), logits(m2))         # the same seed draws the same masks


# ---- merge ---------------------------------------------------------------------------------------------------
def test_merge_equals_unmerged_and_removes_the_bypass():
    model = tiny_lora_model(dtype=np.float32)
    before = logits(model)
    lora = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    expected_w = lora.base_layer.weight.data.to_float() + lora.scale * lora.lora_B.weight.data @ lora.lora_A.weight.data
    merge(model)
    assert not lora_layers(model) and not any(t.requires_grad for t in model.parameters())
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is Linear
    assert_close(q.weight.data.to_float(), expected_w, 1e-6, "W + scale B A")
    assert_close(logits(model), before, 1e-5, "merged vs unmerged logits")


def test_merge_widens_bf16_weights():
    from tinylora.kernels.weights import BF16Weight, DenseWeight
    config = ModelConfig.from_dict(TINY_QWEN2)
    model = CausalLM.from_state_dict(config, random_state_dict(config, np.random.default_rng(0), std=0.2, bf16=True))
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight.data, BF16Weight)
    apply_lora(model, LoraConfig(target_modules=["q_proj"]))
    for _, t in lora_parameters(model):
        t.data[...] = 0.05
    before = logits(model)
    merge(model)
    merged = model.model.layers[0].self_attn.q_proj.weight.data
    assert isinstance(merged, DenseWeight) and merged.dtype == np.float32             # widened, not rounded back
    assert isinstance(model.model.layers[0].self_attn.k_proj.weight.data, BF16Weight)   # not adapted: untouched
    assert_close(logits(model), before, 1e-5, "merged bf16 model")


# ---- gradients --------------------------------------------------------------------------------------------
def test_end_to_end_gradcheck_of_every_a_and_b():
    result, leaked = check_lora_model(seed=0, entries=3)
    assert_gradcheck(result, "LoRA end to end")
    assert len(result.checks) == 28 * 3 + 1                       # every A and B sampled, plus a direction
    assert leaked == []


def test_end_to_end_gradcheck_on_a_quantised_base():
    # QLoRA: every projection a quantised frozen weight (NF4, Q8_0, Q4_0, Q4_K, Q6_K, Q5_1), kept as blocks
    result, leaked = check_lora_model(seed=1, entries=2, quantised=True)
    assert_gradcheck(result, "LoRA on a quantised base")
    assert len(result.checks) == 28 * 2 + 1 and leaked == []
    model = tiny_lora_model(quantised=True)
    storages = {p.data.storage for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert storages == {"nf4", "q8_0", "q4_0", "q4_k", "q6_k", "q5_1"}


def test_frozen_weights_get_no_gradient_and_b_zero_gives_a_zero():
    model = base_model(np.float64)
    apply_lora(model, LoraConfig(r=2, target_modules="all-linear"))
    model.loss(IDS, LABELS, MASK).backward()
    grads = dict(lora_parameters(model))
    assert all(np.all(t.grad == 0) for n, t in grads.items() if "lora_A" in n)      # dA = duᵀ x, du = s dy B = 0
    assert any(np.any(t.grad != 0) for n, t in grads.items() if "lora_B" in n)
    assert all(t.grad is None for _, t in model.named_parameters() if not t.requires_grad)


def test_gradients_accumulate_over_two_backward_passes():
    model = tiny_lora_model(dtype=np.float64)
    model.loss(IDS, LABELS, MASK).backward()
    once = {n: t.grad.copy() for n, t in lora_parameters(model)}
    model.loss(IDS, LABELS, MASK).backward()
    for n, t in lora_parameters(model):
        assert_close(t.grad, 2 * once[n], 1e-12, n)


def test_lora_linear_bias_and_rslora_scale_in_forward():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    a, bb = rng.standard_normal((4, 5)), rng.standard_normal((3, 4))
    layer = LoraLinear(Linear(tl.Tensor(w), tl.Tensor(b)), a, bb, scale=LoraConfig(r=4, alpha=8, use_rslora=True).scale)
    x = rng.standard_normal((2, 5))
    expected = x @ w.T + b + (8 / math.sqrt(4)) * (x @ a.T) @ bb.T
    assert_close(layer(tl.Tensor(x)).data, expected, 1e-12, "LoRA linear")


def test_use_rslora_must_be_a_bool():
    with pytest.raises(TinyloraError, match="use_rslora must be true or false"):
        LoraConfig(use_rslora="false")


def test_dropout_applies_to_the_bypass_input_only():
    # B = 0: whatever dropout does to the bypass, the output must equal the base model exactly ...
    model = base_model()
    before = logits(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.5, target_modules="all-linear"), seed=0)
    model.train(True)
    np.testing.assert_array_equal(logits(model), before)
    # ... and one layer with a known mask: y = x Wᵀ + b + s (x ⊙ keep) Aᵀ Bᵀ
    rng = np.random.default_rng(1)
    w, b, a, bb, x = (rng.standard_normal(s) for s in [(3, 5), (3,), (2, 5), (3, 2), (4, 5)])
    layer = LoraLinear(Linear(tl.Tensor(w), tl.Tensor(b)), a, bb, scale=2.0, dropout=0.5,
                       rng=np.random.default_rng(7))
    keep = (np.random.default_rng(7).random(x.shape) >= 0.5) / 0.5          # the mask the layer will draw
    expected = x @ w.T + b + 2.0 * ((x * keep) @ a.T) @ bb.T
    assert_close(layer(tl.Tensor(x)).data, expected, 1e-12, "dropout on the bypass")


def test_same_seed_same_a_with_or_without_dropout():
    m1 = apply_lora(base_model(), LoraConfig(dropout=0.0), seed=4)
    m2 = apply_lora(base_model(), LoraConfig(dropout=0.3), seed=4)
    for (_, t1), (_, t2) in zip(lora_parameters(m1), lora_parameters(m2)):
        np.testing.assert_array_equal(t1.data, t2.data)
