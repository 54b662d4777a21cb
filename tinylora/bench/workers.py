"""The two sides of `tinylora bench`: one workload, one library, in a fresh process.

`serve(side, workload, conn)` is the target of a spawned process (see
side_by_side.py). It builds the model and its LoRA adapters for one workload, runs
it once as a warm-up (JIT compilation, caches, allocator), says "ready",
and then runs one repetition each time the parent asks, replying with the
seconds it took and the tokens it processed. At the end it reports the
process's peak resident memory, which therefore covers exactly one
library and one workload: loading, building and running it.

    side "tinylora":      CausalLM + apply_lora + AdamW from this package (its base as the workload says:
                          bf16 or float32 weights, a quantised GGUF file, or --quantize nf4)
    side "tinylora-bf16": the same, on the bf16 base: what a quantised base is measured against
    side "peft":          transformers' model + PEFT's get_peft_model + torch.optim.AdamW
    side "peft-bf16":     the same under torch.autocast("cpu", dtype=torch.bfloat16), what TrainingArguments(bf16=True)
                          does on a CPU: oneDNN's bf16 GEMM, PyTorch's strongest setup on a CPU with avx512_bf16
    side "peft-bnb4":     the same on a bitsandbytes NF4 base (BitsAndBytesConfig, QLoRA as users run it)
    side "llama.cpp":     llama-cpp-python decoding the workload's GGUF file (decoding only)

Both sides run the same work: the same checkpoint (or the same config for
a random-init model), LoRA r=8, alpha=16, no dropout, on the same targets;
training repetitions are one optimizer step (forward, loss, backward,
AdamW) on the same random token batch, labels = inputs, float32; decoding
repetitions generate max_new tokens greedily after the same prompt with a
KV cache, never stopping early. torch keeps its default thread count (the
physical cores), as NumPy's BLAS and Numba do.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LORA_R, LORA_ALPHA = 8, 16
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Qwen2.5-0.5B's config.json (the shapes only; the weights are random): 24
# layers, hidden 896, MLP 4864, 14 query heads and 2 kv heads of 64, a
# 151936-word vocabulary tied to the embeddings, q/k/v biases.
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "vocab_size": 151936, "tie_word_embeddings": True, "hidden_act": "silu",
    "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
}


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str                          # "train" or "decode"
    model: str                         # "smollm2" (the real checkpoint) or "qwen2.5-0.5b" (random init)
    targets: tuple[str, ...] = tuple(ALL_SEVEN)
    batch: int = 2                     # train: B sequences of T tokens
    seq: int = 128
    prompt: int = 28                   # decode: prompt tokens, then new tokens
    new: int = 64
    dtype: str = "float32"             # tinylora's weight storage (load_model's dtype); the peer's is fp32
    base: str | None = None            # a quantised base: "nf4" (--quantize), or a GGUF type ("Q4_K_M", "Q8_0")
    peers: tuple[str, ...] = ("peft",)  # the other sides, each in its own process (see the module docstring)
    grad_checkpoint: bool = False      # tinylora: recompute each layer in the backward (ops/checkpoint.py)
    compute: str = "float32"           # tinylora: "bfloat16" for the bf16 dot-product GEMM (CausalLM.set_compute)
    repeats: int | None = None         # None: the bench's --repeats
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def tokens(self) -> int:
        """tokens one repetition processes (the tokens/s numerator)"""
        return self.batch * self.seq if self.kind == "train" else self.new


# Llama-2-7B's config.json (the shapes only): 32 layers, hidden 4096, MLP 11008, 32 heads of 128,
# a 32000-word vocabulary, untied embeddings.
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32000, "tie_word_embeddings": False,
}
MODELS = ("smollm2", "qwen2.5-0.5b", "llama-2-7b")
RANDOM = {"qwen2.5-0.5b": QWEN25_05B, "llama-2-7b": LLAMA2_7B}


def gguf_path(model_dir: str, kind: str) -> Path:
    """Where the SmolLM2 GGUF of type `kind` lives: beside the SmolLM2 folder (bench/quantised.py writes it)."""
    return Path(model_dir).parent / f"SmolLM2-135M-Instruct.{kind}.gguf"


def _check(workload: Workload) -> None:
    if workload.model not in MODELS or workload.kind not in ("train", "decode"):
        raise ValueError(f"unknown benchmark workload: model {workload.model!r} (one of {', '.join(MODELS)}), "
                         f"kind {workload.kind!r} (train or decode)")


def _batch(workload: Workload, vocab: int) -> np.ndarray:
    """The random token batch both sides train on (B, T), the same for a given workload."""
    rng = np.random.default_rng(1234)
    shape = (workload.batch, workload.seq) if workload.kind == "train" else (1, workload.prompt)
    return rng.integers(0, vocab, shape)


# -- tinylora ------------------------------------------------------------------------------------
def _random_quantised(config, kind: str, dtype: str, rng: np.random.Generator) -> dict:
    """A random checkpoint built one tensor at a time, each projection quantised as soon as it exists:
    a 7B model never exists in float32 (27 GB), as --quantize reads a real checkpoint."""
    from ..loading import as_read
    from ..model import expected_shapes
    convert = as_read(dtype, kind)
    return {name: convert(name, rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02) if len(shape) == 2
                          else np.ones(shape, np.float32))
            for name, shape in expected_shapes(config).items()}


def _tinylora_runner(workload: Workload, model_dir: str | None, bf16_base: bool = False):
    from ..config import ModelConfig
    from ..generate import stream_generate
    from ..lora import LoraConfig, apply_lora, lora_parameters
    from ..loading import load_model
    from ..model import CausalLM, random_state_dict
    from ..optim import AdamW

    _check(workload)
    base = None if bf16_base else workload.base
    dtype = "bfloat16" if bf16_base else workload.dtype
    if workload.model == "smollm2" and base and base != "nf4":
        model = load_model(gguf_path(model_dir, base))                    # the GGUF's blocks, as stored
    elif workload.model == "smollm2":
        model = load_model(model_dir, dtype=dtype, quantize=base)
    else:
        config = ModelConfig.from_dict(RANDOM[workload.model], source=f"{workload.model} shape")
        rng = np.random.default_rng(0)
        tensors = (_random_quantised(config, base, dtype, rng) if base
                   else random_state_dict(config, rng, bf16=dtype == "bfloat16"))
        model = CausalLM.from_state_dict(config, tensors)
        del tensors
    if model.set_compute(workload.compute):
        raise RuntimeError(f"compute {workload.compute} needs avx512_bf16, which this CPU lacks")
    ids = _batch(workload, model.config.vocab_size)
    if workload.kind == "decode":
        prompt = [int(t) for t in ids[0]]
        return lambda: sum(1 for _ in stream_generate(model, prompt, max_tokens=workload.new))
    apply_lora(model, LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=list(workload.targets)))
    model.train(True)
    model.grad_checkpoint = workload.grad_checkpoint
    params = lora_parameters(model)
    for _, p in params:
        p.requires_grad = True
    optimizer = AdamW(params, lr=1e-5)

    def step() -> int:
        loss = model.loss(ids, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return ids.size
    return step


# -- PyTorch + transformers + PEFT ---------------------------------------------------------------
def _peft_runner(workload: Workload, model_dir: str | None, nf4: bool = False, autocast: bool = False):
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)      # deprecation notices inside transformers
    _check(workload)
    if workload.model == "smollm2" and nf4:      # QLoRA as PEFT's users run it: a bitsandbytes NF4 base
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q,
                                                                  dtype=torch.float32)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif workload.model == "smollm2":
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.for_model(**RANDOM[workload.model])
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.tensor(_batch(workload, model.config.vocab_size))
    if workload.kind == "decode":
        model.eval()

        def decode() -> int:
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=workload.new,
                                     min_new_tokens=workload.new, do_sample=False, pad_token_id=0)
            return out.shape[1] - ids.shape[1]
        return decode
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                       target_modules=list(workload.targets)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> int:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return ids.numel()
    return step


def _llama_cpp_runner(workload: Workload, model_dir: str | None):
    """llama.cpp decoding the same GGUF file, greedy, all cores (llama-cpp-python's default is half)."""
    if workload.kind != "decode" or not workload.base or workload.base == "nf4":
        raise ValueError("llama.cpp is a peer for decoding a GGUF file only")
    llm = llama_cpp_model(gguf_path(model_dir, workload.base), n_ctx=256, n_threads=os.cpu_count())
    prompt = [int(t) for t in _batch(workload, llm.n_vocab())[0]]

    def decode() -> int:
        llm.reset()
        n = 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):     # never stops at EOS by itself
            n += 1
            if n == workload.new:
                break
        return n
    return decode


def llama_cpp_model(path, **kwargs):
    """llama_cpp.Llama(path, verbose=False, **kwargs), safe on a CPU with AMX.

    There ggml (llama-cpp-python 0.3.36) repacks weights for its AMX kernel, which crashes with
    SIGSEGV in ggml_backend_amx_mul_mat on these machines; llama.cpp's own switch for that,
    use_extra_bufts, is not an argument of Llama(), so its default is changed while Llama() builds
    its parameters (this process only), and library_versions says so."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level
    default = low_level.llama_model_default_params

    def without_repacking():
        params = default()
        params.use_extra_bufts = not _has_amx()
        return params
    low_level.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(str(path), verbose=False, **kwargs)
    finally:
        low_level.llama_model_default_params = default


def _cpu_flag(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _has_amx() -> bool:
    return _cpu_flag("amx_int8")


def has_bf16_cpu() -> bool:
    """True on a CPU with avx512_bf16 (or AMX): where PyTorch's bf16 autocast is its strongest setup."""
    return _cpu_flag("avx512_bf16") or _cpu_flag("amx_bf16")


RUNNERS = {"tinylora": _tinylora_runner, "peft": _peft_runner, "llama.cpp": _llama_cpp_runner,
           "tinylora-bf16": lambda w, d: _tinylora_runner(w, d, bf16_base=True),
           "peft-bnb4": lambda w, d: _peft_runner(w, d, nf4=True),
           "peft-bf16": lambda w, d: _peft_runner(w, d, autocast=True)}


def users_threading_environment() -> dict:
    """Put back the OMP_WAIT_POLICY and GOMP_SPINCOUNT this process had before tinylora's kernels set
    theirs (kernels/__init__.py); -> the values they had until now (absent ones left out). A peer must
    run as its users run it: with PASSIVE, PyTorch trains 15-30 % slower and llama.cpp decodes ~3x
    slower on these machines."""
    from ..kernels import THREADING_BEFORE
    now = {name: os.environ.pop(name) for name in THREADING_BEFORE if name in os.environ}
    os.environ.update({name: value for name, value in THREADING_BEFORE.items() if value is not None})
    return now


def library_versions(side: str) -> str:
    from importlib.metadata import version
    if side.startswith("tinylora"):
        from .kernels import blas_info
        blas = blas_info().splitlines()[0]                 # the kernel this worker's own NumPy picked
        return f"tinylora {version('tinylora')}, numpy {np.__version__}, numba {version('numba')}; {blas}"
    if side == "llama.cpp":
        repack = "; AMX repacking off: it crashes here" if _has_amx() else ""
        return f"llama-cpp-python {version('llama-cpp-python')} ({os.cpu_count()} threads{repack})"
    if side == "peft-bnb4":
        return f"bitsandbytes {version('bitsandbytes')}"
    if side == "peft-bf16":
        return "PyTorch bf16 autocast"
    import peft
    import torch
    import transformers
    return (f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
            f"{transformers.__version__}, peft {peft.__version__}")


def threading_environment() -> dict:
    """The variables a library's threads and BLAS read (OMP_*, GOMP_*, OPENBLAS_*, MKL_*, NUMBA_*), as this
    process has them."""
    return {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "OPENBLAS_", "MKL_", "NUMBA_"))}


def report_peer_environment(conn) -> None:
    """Spawned-process entry point for the bench's environment test: a peer's process as serve
    prepares it (the user's OMP_WAIT_POLICY and GOMP_SPINCOUNT back), reporting threading_environment()."""
    users_threading_environment()
    conn.send(threading_environment())


def serve(side: str, workload: Workload, model_dir: str | None, conn) -> None:
    """Spawned-process entry point: build, warm up, then time repetitions on request (see the module docstring)."""
    from ..generate import peak_memory_gb
    if not side.startswith("tinylora"):
        # Unpickling this function imported tinylora here too, and with it the kernels' OpenMP settings;
        # the user's values come back before the peer's library starts its OpenMP threads.
        users_threading_environment()
    try:
        run = RUNNERS[side](workload, model_dir)
        run()                                                     # warm-up
        conn.send(("ready", library_versions(side)))
    except Exception as e:                                        # reported in the table, not a crash
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        message = conn.recv()
        if message == "run":
            start = time.perf_counter()
            tokens = run()
            conn.send((time.perf_counter() - start, tokens))
        else:
            conn.send(peak_memory_gb())
            return
