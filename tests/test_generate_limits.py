"""Generation limits: max_tokens below 1, and prompts (or prompt + max_tokens) beyond the model's context,
refused in one line naming the numbers, by the Python API and the CLI; --allow-long-context goes beyond."""

import numpy as np
import pytest
from test_to_gguf import QWEN2, base_folder
from test_tokenizer import write_model_folder

from tinylora.cli import main
from tinylora.config import ModelConfig
from tinylora.errors import TinyloraError
from tinylora.generate import generate, stream_generate
from tinylora.model import CausalLM, random_state_dict
from tinylora.tokenizer import Tokenizer


def model_with_context(n):
    config = ModelConfig.from_dict({**QWEN2, "max_position_embeddings": n})
    return CausalLM.from_state_dict(config, random_state_dict(config, np.random.default_rng(0), std=0.2))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_tokens_below_one_is_refused(bad):
    model = model_with_context(16)
    with pytest.raises(TinyloraError, match=f"max_tokens must be a whole number >= 1, got {bad!r}"):
        stream_generate(model, [1, 2, 3], max_tokens=bad)           # at the call, before any token
    with pytest.raises(TinyloraError, match="max_tokens must be"):
        generate(model, None, [1, 2, 3], max_tokens=bad)


def test_the_context_is_a_limit_unless_allowed():
    model = model_with_context(16)
    assert len(generate(model, None, list(range(1, 11)), max_tokens=6)) == 6          # 10 + 6 = 16: fits
    with pytest.raises(TinyloraError, match=r"the prompt's 10 tokens plus max_tokens 7 make 17, more than the "
                                            r"model's context of 16 \(max_position_embeddings\)"):
        generate(model, None, list(range(1, 11)), max_tokens=7)
    with pytest.raises(TinyloraError, match="the prompt has 17 tokens, more than the model's context of 16"):
        list(stream_generate(model, [1] * 17, max_tokens=1))
    assert len(generate(model, None, [1] * 17, max_tokens=5, allow_long_context=True)) == 5


def test_the_cli_refuses_in_one_line_before_printing(tmp_path, capsys):
    base = base_folder(tmp_path, {**QWEN2, "vocab_size": 500, "max_position_embeddings": 40})
    tokenizer = write_model_folder(tmp_path / "tok", "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((tokenizer / name).read_bytes())
    assert Tokenizer.from_folder(base).vocab_size <= 500
    argv = ["generate", "--model", str(base), "--prompt", "hi", "--ignore-chat-template"]
    assert main(argv + ["--max-tokens", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "tinylora generate: error: --max-tokens must be a whole number >= 1, got -1"
    assert main(argv + ["--max-tokens", "100"]) == 2
    captured = capsys.readouterr()
    assert "more than the model's context of 40" in captured.err and captured.err.count("\n") == 1
    assert "==========" not in captured.out
    assert main(argv + ["--max-tokens", "100", "--allow-long-context"]) == 0
    assert "==========" in capsys.readouterr().out
