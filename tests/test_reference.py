"""The fused ops against their plain versions (ops/reference.py): op by op, then a whole LoRA model both ways.

The plain versions are built from gradient-checked primitives with no hand-written backward, so
equal values and equal gradients here are a second oracle for the fused ops' backward, one that
also works at SmolLM2's size, where finite differences are too slow.
"""

import numpy as np
import pytest

import tinylora as tl
from tinylora.config import ModelConfig
from tinylora.formats.safetensors import load_checkpoint
from tinylora.gradcheck.model_check import TINY_QWEN2, tiny_batch
from tinylora.loading import as_read
from tinylora.lora import LoraConfig, apply_lora, lora_parameters
from tinylora.model import CausalLM, random_state_dict
from tinylora.ops.dropout import dropout_mask
from tinylora.ops.reference import FUSED, REFERENCE

RTOL = 1e-6        # the bar, float64; measured ~1e-15 on the tiny models, ~1e-13 on SmolLM2
TINY_LLAMA = TINY_QWEN2 | {"architectures": ["LlamaForCausalLM"], "attention_bias": True, "mlp_bias": True,
                           "head_dim": 8, "num_key_value_heads": 1, "tie_word_embeddings": False}


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error as a fraction of the tensor's scale."""
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-300))


def run(op, arrays, seed=1, **options):
    """-> (value, gradients of sum(value · R) for a fixed random R, or of the value if it is a scalar)."""
    tensors = [tl.Tensor(a, requires_grad=True) if a is not None else None for a in arrays]
    y = op(*tensors, **options)
    if y.ndim == 0:                                        # a loss: its own gradient
        y.backward()
    else:
        (y * tl.Tensor(np.random.default_rng(seed).standard_normal(y.shape))).sum().backward()
    return y.data, [t.grad for t in tensors if t is not None]


def assert_same(fused, reference, what):
    (y, grads), (y_ref, grads_ref) = fused, reference
    assert relative_error(y, y_ref) <= RTOL, f"{what}: value {relative_error(y, y_ref):.2e}"
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert relative_error(g, g_ref) <= RTOL, f"{what}: gradient of input {i} {relative_error(g, g_ref):.2e}"


# ---- op by op ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H, K, T, S, mask", [
    (4, 2, 5, 5, None),                                   # training: T = S, GQA with 2 query heads per kv head
    (4, 1, 3, 7, [[1] * 7, [1, 1, 1, 1, 1, 0, 0]]),       # after a cache of 4, a right-padded row
    (2, 2, 4, 4, [[1] * 4, [0, 0, 1, 1]]),                # left padding: queries 0-1 of row 1 see no key at all
])
def test_attention_equals_softmax_of_scores(H, K, T, S, mask):
    rng = np.random.default_rng(0)
    B, D = 2, 8
    q, k, v = rng.standard_normal((B, T, H, D)), rng.standard_normal((B, S, K, D)), rng.standard_normal((B, S, K, D))
    key_mask = None if mask is None else np.array(mask)
    assert_same(run(FUSED.attention, [q, k, v], key_mask=key_mask),
                run(REFERENCE.attention, [q, k, v], key_mask=key_mask), "attention")


def test_swiglu_equals_silu_times_up():
    rng = np.random.default_rng(0)
    g, u = 3 * rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 5, 12))
    assert_same(run(FUSED.swiglu, [g, u]), run(REFERENCE.swiglu, [g, u]), "swiglu")


def test_linear_cross_entropy_equals_cross_entropy_of_logits():
    rng = np.random.default_rng(0)
    h, w = rng.standard_normal((2, 6, 16)), rng.standard_normal((40, 16))
    labels = rng.integers(0, 40, size=(2, 6))
    labels[0, :2] = labels[1, 4:] = -100                  # prompt and padding are not counted
    assert_same(run(lambda h, w: FUSED.linear_cross_entropy(h, w, labels), [h, w]),
                run(lambda h, w: REFERENCE.linear_cross_entropy(h, w, labels), [h, w]), "lm_head + cross-entropy")
    frozen = tl.Tensor(w)                                  # a frozen lm_head: only dh flows
    assert_same(run(lambda h: FUSED.linear_cross_entropy(h, frozen, labels), [h]),
                run(lambda h: REFERENCE.linear_cross_entropy(h, frozen, labels), [h]), "frozen lm_head")


@pytest.mark.parametrize("bias, p", [(False, 0.0), (True, 0.0), (True, 0.4)])
def test_lora_linear_equals_two_linears_and_a_scale(bias, p):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 16)), tl.Tensor(rng.standard_normal((12, 16)))      # W frozen
    a, b = rng.standard_normal((4, 16)), rng.standard_normal((12, 4))
    keep = dropout_mask(x.shape, p, np.random.default_rng(1), x.dtype) if p else None
    b_vec = rng.standard_normal(12) if bias else None

    def call(fn):
        return lambda x, a, b, bias=None: fn(x, w, a, b, bias, scale=1.5, keep=keep)
    assert_same(run(call(FUSED.lora_linear), [x, a, b, b_vec]),
                run(call(REFERENCE.lora_linear), [x, a, b, b_vec]), f"lora linear (bias {bias}, p {p})")


# ---- a whole model, both ways ----------------------------------------------------------------------------
def lora_model(config: ModelConfig, tensors: dict, ops, dropout: float) -> CausalLM:
    model = CausalLM.from_state_dict(config, tensors, dtype=np.float64, ops=ops)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"), seed=3)
    rng = np.random.default_rng(4)                         # B away from zero, so every A gets a gradient
    for name, t in lora_parameters(model):
        if ".lora_B." in name:
            t.data[...] = 0.1 * rng.standard_normal(t.shape)
    return model


def logits_and_grads(model, ids, labels, mask):
    with tl.no_grad():
        model.train(False)
        logits = model(ids, mask).data
    model.train()
    loss = model.loss(ids, labels, mask)
    loss.backward()
    return logits, loss.item(), {name: t.grad for name, t in lora_parameters(model)}


def assert_models_agree(config, tensors, ids, labels, mask, dropout):
    fused = logits_and_grads(lora_model(config, tensors, FUSED, dropout), ids, labels, mask)
    plain = logits_and_grads(lora_model(config, tensors, REFERENCE, dropout), ids, labels, mask)
    assert relative_error(fused[0], plain[0]) <= RTOL, f"logits {relative_error(fused[0], plain[0]):.2e}"
    assert abs(fused[1] - plain[1]) <= RTOL * abs(plain[1]), f"loss {fused[1]!r} vs {plain[1]!r}"
    worst = max(relative_error(fused[2][n], plain[2][n]) for n in plain[2])
    assert worst <= RTOL, f"worst A/B gradient {worst:.2e}"
    return worst


@pytest.mark.parametrize("spec", [TINY_QWEN2, TINY_LLAMA], ids=["qwen2 tied", "llama biases head_dim 8 K=1"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_tiny_model_fused_equals_reference(spec, dropout):
    config = ModelConfig.from_dict(spec)
    tensors = random_state_dict(config, np.random.default_rng(0), np.float64, std=0.2)
    ids, labels, mask = tiny_batch()
    assert_models_agree(config, tensors, ids, labels, mask, dropout)


@pytest.mark.slow
def test_smollm2_fused_equals_reference(smollm2_dir):
    """SmolLM2-135M in float64: 30 layers, 9 heads over 3 kv heads, tied lm_head of 49152 rows."""
    config = ModelConfig.from_json(smollm2_dir / "config.json")
    tensors = load_checkpoint(smollm2_dir, convert=as_read("float64"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(2, 24))
    mask = np.ones_like(ids)
    mask[1, 18:] = 0                                       # a right-padded row
    labels = np.where(mask == 1, ids, -100)
    labels[:, :6] = -100                                   # a prompt that is not scored
    worst = assert_models_agree(config, tensors, ids, labels, mask, dropout=0.1)
    print(f"SmolLM2 float64, fused vs reference: worst A/B gradient relative error {worst:.2e}")
