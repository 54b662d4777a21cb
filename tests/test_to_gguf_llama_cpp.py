"""GGUF adapters with llama.cpp itself (slow; the reference extra): its converter and its runtime.

1. llama.cpp's own convert_lora_to_gguf.py (from the source archive of the
   installed llama-cpp-python, fetched with pip: its wheel does not carry the
   script) writes, from tinylora's PEFT adapter, the same bytes as
   `export_gguf`, for every outtype, for a Llama base (SmolLM2, q/k permuted)
   and a Qwen2 one.
2. llama-cpp-python runs the base GGUF with tinylora's adapter file
   (`lora_path`): on the quick-start's identity adapter, trained on the Q4_1
   file itself, its greedy answers to held-out questions are tinylora's,
   token for token; on an F32 copy of the base, its last-position logits are
   tinylora's to 2e-3 of the largest (both compute in float32, summing in
   different orders over 30 layers; measured 5.5e-4 of a largest logit of 28
   with a random adapter whose own effect on the logits was 1.1).
3. A merged GGUF (`fuse --save-path FILE.gguf`) runs in llama-cpp-python on its
   own: written f32 from the float32 folder, its tokenizer splits text as
   tinylora's and its greedy answers are tinylora's token for token; written
   Q8_0 from the Q4_1 file (whose keys and tokenizer it carries over), the
   answers start with the same 6 tokens.
"""

import math
import subprocess
import sys
import tarfile
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pytest

from tinylora.lora.to_gguf import export_gguf

pytestmark = pytest.mark.slow
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
         "tie_word_embeddings": True, "max_position_embeddings": 128, "rms_norm_eps": 1e-6}


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory):
    """The folder holding llama.cpp's convert_lora_to_gguf.py (with its conversion/ and gguf-py/)."""
    pytest.importorskip("torch", reason="the converter needs torch (reference extra)")
    pytest.importorskip("transformers", reason="the converter needs transformers (reference extra)")
    try:
        wanted = version("llama-cpp-python")
    except PackageNotFoundError:
        pytest.skip("llama-cpp-python (reference extra) not installed")
    where = tmp_path_factory.mktemp("llama_cpp_src")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                          f"llama-cpp-python=={wanted}", "-d", str(where)], capture_output=True, text=True)
    archives = list(where.glob("llama_cpp_python-*.tar.gz"))
    if got.returncode or not archives:
        pytest.skip(f"could not fetch the llama-cpp-python {wanted} source archive with pip: {got.stderr[-200:]}")
    prefix = archives[0].name[:-len(".tar.gz")] + "/vendor/llama.cpp/"
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
            m.name == prefix + "convert_lora_to_gguf.py" or m.name.startswith(prefix + "conversion/")
            or m.name.startswith(prefix + "gguf-py/"))]
        tar.extractall(where, members=members, filter="data")
    return where / prefix


def convert(converter, adapter, base, outtype, out):
    done = subprocess.run([sys.executable, str(converter / "convert_lora_to_gguf.py"), "--base", str(base),
                           "--outtype", outtype, "--outfile", str(out), str(adapter)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def random_adapter(base, folder, seed=1):
    from tinylora.loading import load_model
    from tinylora.lora import LoraConfig, apply_lora, lora_layers, save_adapter
    model = apply_lora(load_model(base), LoraConfig(r=8, alpha=16, target_modules=ALL_SEVEN))
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = (0.02 * rng.standard_normal(layer.lora_B.weight.shape)).astype(np.float32)
    return save_adapter(model, folder)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    from tinylora.config import ModelConfig
    from tinylora.formats.files import write_json
    from tinylora.formats.safetensors import write_safetensors
    from tinylora.model import random_state_dict
    folder = tmp_path_factory.mktemp("qwen2")
    write_safetensors(folder / "model.safetensors",
                      random_state_dict(ModelConfig.from_dict(QWEN2), np.random.default_rng(0), std=0.2))
    write_json(folder / "config.json", QWEN2)
    return folder


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("which", ["smollm2", "qwen2"])
def test_export_writes_the_bytes_llama_cpps_converter_writes(llama_cpp_converter, smollm2_dir, qwen2_dir,
                                                             tmp_path, outtype, which):
    base = smollm2_dir if which == "smollm2" else qwen2_dir
    adapter = random_adapter(base, tmp_path / "adapter")
    theirs = convert(llama_cpp_converter, adapter, base, outtype, tmp_path / "theirs.gguf").read_bytes()
    ours = export_gguf(adapter, tmp_path / "ours.gguf", base=base, outtype=outtype).read_bytes()
    assert ours == theirs


@pytest.fixture(scope="session")
def identity_adapter(smollm2_gguf, tmp_path_factory):
    """The quick-start's identity adapter, trained on the Q4_1 GGUF itself (30 steps), and its GGUF file."""
    from importlib.resources import files

    from tinylora.loading import load
    from tinylora.train import TrainConfig, train
    folder = tmp_path_factory.mktemp("identity") / "adapter"
    model, tok = load(smollm2_gguf)
    config = TrainConfig(data=str(files("tinylora.cli") / "demo_data" / "identity"), adapter_path=str(folder),
                         iters=30, batch_size=4, learning_rate=5e-4, steps_per_eval=30, val_batches=-1,
                         test=False, seed=0)
    train(config, model, tok, progress=False, log=lambda *a: None)
    return folder, export_gguf(folder, folder.parent / "identity.gguf", base=smollm2_gguf)


def llama_cpp(model_path, lora_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (reference extra) not installed")
    from tinylora.bench.workers import llama_cpp_model             # with AMX repacking off where it crashes
    return llama_cpp_model(model_path, lora_path=str(lora_path), n_ctx=512, n_threads=2, logits_all=True, seed=0)


def llama_cpp_model_without_adapter(model_path):
    from tinylora.bench.workers import llama_cpp_model
    return llama_cpp_model(model_path, n_ctx=512, n_threads=2, logits_all=True, seed=0)


def test_llama_cpp_answers_as_tinylora_with_the_trained_adapter(smollm2_gguf, identity_adapter):
    from tinylora.cli.demo import held_out_questions
    from tinylora.loading import load
    from tinylora.lora import load_adapter
    folder, gguf_adapter = identity_adapter
    model, tok = load(smollm2_gguf)
    load_adapter(model, folder)
    llm = llama_cpp(smollm2_gguf, gguf_adapter)
    pairs = greedy_pairs(model, tok, llm, held_out_questions()[:4])
    for ours, theirs in pairs:
        assert theirs == ours, (tok.decode(theirs), tok.decode(ours))
    assert sum("小李" in tok.decode(ours) for ours, _ in pairs) >= 3     # the adapter's answer, not the base's


def test_llama_cpp_logits_with_the_adapter_on_a_float32_base(smollm2_gguf, identity_adapter, tmp_path):
    import tinylora as tl
    from tinylora.bench.quantised import llama_cpp_quantize
    from tinylora.loading import load
    from tinylora.lora import load_adapter
    folder, gguf_adapter = identity_adapter
    f32 = llama_cpp_quantize(smollm2_gguf, tmp_path / "SmolLM2-135M-Instruct.F32.gguf", "F32")
    model, tok = load(f32)
    with pytest.warns(UserWarning, match="trained on a base held as q4_1"):
        load_adapter(model, folder)
    llm = llama_cpp(f32, gguf_adapter)
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True)
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    with tl.no_grad():
        ours = model(np.array([ids])).data[0, -1].astype(np.float64)
    tolerance = 2e-3 * max(1.0, np.abs(ours).max())
    assert np.abs(ours - theirs).max() <= tolerance, np.abs(ours - theirs).max()
    assert int(np.argmax(ours)) == int(np.argmax(theirs))
    assert math.isfinite(float(theirs.sum()))
    plain = llama_cpp_model_without_adapter(f32)                # the adapter's effect is far above the tolerance
    plain.eval(ids)
    assert np.abs(np.asarray(plain.scores[len(ids) - 1]) - theirs).max() > 10 * tolerance


# --------------------------------------------------------------------------
# A merged GGUF (`fuse --save-path FILE.gguf`) in llama-cpp-python
# --------------------------------------------------------------------------

def greedy_pairs(model, tok, llm, questions, max_tokens=20):
    """[(tinylora's greedy ids, llama.cpp's greedy ids)] per question, both stopped at the end of turn
    (tinylora's stream includes <|im_end|>; llama.cpp stops at it)."""
    from tinylora.generate import stream_generate
    pairs = []
    for question in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        ours = list(stream_generate(model, ids, max_tokens=max_tokens))
        if llm.token_eos() in ours:
            ours = ours[:ours.index(llm.token_eos())]
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or len(theirs) == len(ours):
                break
            theirs.append(token)
        pairs.append((ours, theirs))
    return pairs


def test_a_merged_f32_gguf_from_the_folder_answers_as_tinylora_in_llama_cpp(smollm2_dir, identity_adapter, tmp_path):
    """The float32 folder holds exactly the Q4_1 file's dequantised weights, so the adapter trained on the
    file applies to it; the merged file carries the folder's tokenizer and chat template."""
    from tinylora.cli.demo import held_out_questions
    from tinylora.loading import load
    from tinylora.lora import fuse, load_adapter
    folder, _ = identity_adapter
    with pytest.warns(UserWarning, match="trained on a base held as q4_1"):
        merged = fuse(smollm2_dir, folder, tmp_path / "merged-f32.gguf", outtype="f32")
    model, tok = load(smollm2_dir)
    with pytest.warns(UserWarning, match="trained on a base held as q4_1"):
        load_adapter(model, folder)
    llm = llama_cpp_model_without_adapter(merged)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    text = "<|im_start|>user\nWho made you?  12345 café 你好<|im_end|>\n<|im_start|>assistant\n"
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tok.encode(text)
    pairs = greedy_pairs(model, tok, llm, held_out_questions()[:4])
    for ours, theirs in pairs:
        assert theirs == ours, (tok.decode(theirs), tok.decode(ours))
    assert sum("小李" in tok.decode(ours) for ours, _ in pairs) >= 3


def test_a_merged_q8_0_gguf_from_the_q4_1_file_starts_as_tinylora_in_llama_cpp(smollm2_gguf, identity_adapter,
                                                                                tmp_path):
    """From the GGUF base: its own metadata and tokenizer carried over; requantised to Q8_0 the merged weights
    round differently from tinylora's float merge, so the answers must agree in their first 6 tokens."""
    from tinylora.cli.demo import held_out_questions
    from tinylora.loading import load
    from tinylora.lora import fuse, load_adapter
    folder, _ = identity_adapter
    with pytest.warns(UserWarning, match="held as q4_1: the merged weights are its dequantised values plus the update, written as q8_0"):
        merged = fuse(smollm2_gguf, folder, tmp_path / "merged-q8_0.gguf", outtype="q8_0")
    model, tok = load(smollm2_gguf)
    load_adapter(model, folder)
    llm = llama_cpp_model_without_adapter(merged)
    pairs = greedy_pairs(model, tok, llm, held_out_questions()[:4])
    for ours, theirs in pairs:
        assert theirs[:6] == ours[:6], (tok.decode(theirs), tok.decode(ours))
    assert sum("小李" in tok.decode(theirs) for _, theirs in pairs) >= 3
