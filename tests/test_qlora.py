"""QLoRA on the real SmolLM2-135M-Instruct: quantised bases (GGUF Q8_0, a Q4_K_M mix, NF4) load with
the logits of independent references and fine-tune until the model recalls what it was taught.

Slow. The GGUF files come from llama.cpp's own quantiser (llama-cpp-python, the conftest fixture
`requantised_gguf`); the references from transformers, `gguf` and bitsandbytes; each skips without them.
"""

import numpy as np
import pytest
from helpers import assert_abs_close

import tinylora as tl
from tinylora.cli.demo import DATA, DEMO_DEFAULTS, answer, held_out_questions
from tinylora.formats.gguf import import_gguf
from tinylora.formats.safetensors import read_metadata
from tinylora.train import TrainConfig, train

pytestmark = pytest.mark.slow

# tests/test_real_model.py explains SmolLM2's float32 noise (~1e-4 on logits reaching ~40): two float32
# programs computing the same model from the same weights agree within PAIR_TOL.
PAIR_TOL = 2e-4
# The same program (tinylora) on blocks and on their float32 dequantisation: the products differ only in
# how the weights reach BLAS (tiles widened on the fly vs a float32 array), so they agree to rounding.
SAME_TOL = 1e-4
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("kind, types", [("Q8_0", {"q8_0"}), ("Q4_K_M", {"q4_k", "q6_k", "q5_0", "q8_0"})])
def test_quantised_gguf_logits_equal_transformers_and_the_dequantised_model(requantised_gguf, tmp_path, kind, types):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = requantised_gguf(kind)
    model, tok = tl.load(path)
    assert {p.data.storage for n, p in model.named_parameters() if n.endswith("_proj.weight")} <= types
    ids = np.array([tok.apply_chat_template(PROMPT, add_generation_prompt=True)])
    with tl.no_grad():
        ours = model(ids).data
    dense = tl.load_model(import_gguf(path, tmp_path / "dense"))         # dequantised by the gguf package
    with tl.no_grad():
        assert_abs_close(ours, dense(ids).data, SAME_TOL, f"{kind} blocks vs the float32 model of their values")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        assert_abs_close(ours, reference(torch.from_numpy(ids)).logits.numpy(), PAIR_TOL,
                         f"{kind}: tinylora vs transformers' GGUF loader")


def test_nf4_logits_equal_transformers_on_bitsandbytes_dequantised_weights(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    F = pytest.importorskip("bitsandbytes.functional")
    model, tok = tl.load(smollm2_dir, quantize="nf4")
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("_proj.weight"):                 # what QLoRA (and --quantize) quantises
                packed, state = F.quantize_4bit(p.data, blocksize=64, quant_type="nf4")
                p.copy_(F.dequantize_4bit(packed, state))
    ids = np.array([tok.apply_chat_template(PROMPT, add_generation_prompt=True)])
    with tl.no_grad(), torch.no_grad():
        assert_abs_close(model(ids).data, reference(torch.from_numpy(ids)).logits.numpy(), PAIR_TOL,
                         "NF4: tinylora vs transformers on bitsandbytes' dequantised weights")


@pytest.mark.parametrize("base", ["Q8_0", "Q4_K_M", "nf4"])
def test_qlora_fine_tune_recalls_what_it_was_taught(base, requantised_gguf, smollm2_dir, tmp_path):
    """The quick-start's identity data on a quantised base: A and B train in float32 through the
    dequantised weights, and the held-out questions get the new name."""
    model_name, quantize = (str(smollm2_dir), "nf4") if base == "nf4" else (str(requantised_gguf(base)), None)
    model, tok = tl.load(model_name, quantize=quantize)
    frozen = {n: p.data for n, p in model.named_parameters()}
    config = TrainConfig(data=str(DATA), model=model_name, quantize=quantize, adapter_path=str(tmp_path / "ad"),
                         **dict(DEMO_DEFAULTS, iters=30))
    result = train(config, model, tok, progress=False, log=lambda *a: None)
    assert result.val_losses[-1][1] < 0.3 * result.val_losses[0][1], result.val_losses
    answers = [answer(model, tok, q) for q in held_out_questions()]
    assert sum("小李" in a for a in answers) >= 4, answers
    for n, p in model.named_parameters():                 # the base is untouched and never got a gradient
        if "lora_" not in n:
            assert p.grad is None and p.data is frozen[n.replace(".base_layer", "")], n
    stored = read_metadata(tmp_path / "ad" / "adapter_model.safetensors")["tinylora.base_weights"]
    assert stored == ("nf4" if base == "nf4" else ",".join(sorted(
        {p.data.storage for n, p in tl.load_model(model_name).named_parameters() if n.endswith("_proj.weight")})))
