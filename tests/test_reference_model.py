"""Parity with transformers: tiny random Qwen2 and Llama checkpoints, logits and loss.

Each test builds a random model with transformers (torch), saves it to tmp_path
in safetensors, loads it with tinylora and compares in float32. Skipped when
the reference extra (torch, transformers) is not installed.
"""

import numpy as np
import pytest
from helpers import assert_abs_close, assert_close

torch = pytest.importorskip("torch", reason="reference extra not installed (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="reference extra not installed")

import tinylora as tl  # noqa: E402
from tinylora.loading import load_model  # noqa: E402

LOGIT_TOL = 1e-4     # SPEC §3.3: logits equal transformers' within 1e-4 absolute in float32

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def make(kind: str, tmp_path, **extra):
    torch.manual_seed(0)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**SMALL, **extra)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**SMALL, **extra)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():   # random init leaves biases at 0 and norms at 1: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path)
    return model


def compare(ref, ours, ids, mask=None):
    with torch.no_grad():
        expected = ref(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)).logits.numpy()
    with tl.no_grad():
        got = ours(ids, mask).data
    real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    assert_abs_close(got[real], expected[real], LOGIT_TOL, "logits at real positions (absolute)")


IDS = np.array([[5, 17, 3, 88, 42, 9, 61], [7, 1, 30, 30, 2, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_logits_match(tmp_path, tied):
    ref = make("qwen2", tmp_path, tie_word_embeddings=tied)
    ours = load_model(tmp_path)
    assert ours.config.tie_word_embeddings == tied and ours.config.qkv_bias
    compare(ref, ours, IDS)
    compare(ref, ours, IDS, MASK)


@pytest.mark.parametrize("bias", [False, True])
def test_llama_logits_match(tmp_path, bias):
    ref = make("llama", tmp_path, attention_bias=bias, mlp_bias=bias, head_dim=16, tie_word_embeddings=True)
    ours = load_model(tmp_path)
    assert ours.config.head_dim == 16 and ours.config.o_bias == bias
    compare(ref, ours, IDS, MASK)


def test_loss_matches_on_padded_batch_with_ignored_labels(tmp_path):
    ref = make("qwen2", tmp_path)
    ours = load_model(tmp_path)
    labels = np.where(MASK == 1, IDS, -100)
    labels[:, :2] = -100
    with torch.no_grad():
        expected = ref(torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(labels)).loss.item()
    with tl.no_grad():
        got = ours.loss(IDS, labels, MASK).item()
    assert_close(got, expected, 1e-5, "loss")


def test_greedy_generation_matches_transformers(tmp_path):
    ref = make("qwen2", tmp_path)
    ours = load_model(tmp_path)
    prompt = [5, 17, 3, 88]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    from tinylora.generate import stream_generate
    assert list(stream_generate(ours, prompt, max_tokens=10)) == expected


@pytest.mark.parametrize("rope", [{"rope_theta": 1e6, "rope_type": "default"},
                                  {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}],
                         ids=["theta 1e6 (Qwen2.5)", "linear scaling x2"])
def test_long_sequence_rope_matches(tmp_path, rope):
    # ~1000 positions: float32 angle errors grow with the position, so this is where RoPE details show.
    ref = make("qwen2", tmp_path, rope_parameters=rope)
    ours = load_model(tmp_path)
    ids = np.random.default_rng(0).integers(0, 96, (1, 1000))
    compare(ref, ours, ids)
