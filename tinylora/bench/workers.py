"""The two sides of `tinylora bench`: one workload, one library, in a fresh process.

`serve(side, workload, conn)` is the target of a spawned process (see
side_by_side.py). It builds the model and its LoRA adapters for one workload, runs
it once as a warm-up (JIT compilation, caches, allocator), says "ready",
and then runs one repetition each time the parent asks, replying with the
seconds it took and the tokens it processed. At the end it reports the
process's peak resident memory, which therefore covers exactly one
library and one workload: loading, building and running it.

    side "tinylora": CausalLM + apply_lora + AdamW from this package
    side "peft":     transformers' model + PEFT's get_peft_model + torch.optim.AdamW

Both sides run the same work: the same checkpoint (or the same config for
a random-init model), LoRA r=8, alpha=16, no dropout, on the same targets;
training repetitions are one optimizer step (forward, loss, backward,
AdamW) on the same random token batch, labels = inputs, float32; decoding
repetitions generate max_new tokens greedily after the same prompt with a
KV cache, never stopping early. torch keeps its default thread count (the
physical cores), as NumPy's BLAS and Numba do.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

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
    repeats: int | None = None         # None: the bench's --repeats
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def tokens(self) -> int:
        """tokens one repetition processes (the tokens/s numerator)"""
        return self.batch * self.seq if self.kind == "train" else self.new


MODELS = ("smollm2", "qwen2.5-0.5b")


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
def _tinylora_runner(workload: Workload, model_dir: str | None):
    from ..config import ModelConfig
    from ..generate import stream_generate
    from ..lora import LoraConfig, apply_lora, lora_parameters
    from ..loading import load_model
    from ..model import CausalLM, random_state_dict
    from ..optim import AdamW

    _check(workload)
    if workload.model == "smollm2":
        model = load_model(model_dir, dtype=workload.dtype)
    else:
        config = ModelConfig.from_dict(QWEN25_05B, source="Qwen2.5-0.5B shape")
        tensors = random_state_dict(config, np.random.default_rng(0), bf16=workload.dtype == "bfloat16")
        model = CausalLM.from_state_dict(config, tensors)
    ids = _batch(workload, model.config.vocab_size)
    if workload.kind == "decode":
        prompt = [int(t) for t in ids[0]]
        return lambda: sum(1 for _ in stream_generate(model, prompt, max_tokens=workload.new))
    apply_lora(model, LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=list(workload.targets)))
    model.train(True)
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
def _peft_runner(workload: Workload, model_dir: str | None):
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)      # deprecation notices inside transformers
    _check(workload)
    if workload.model == "smollm2":
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        config = transformers.AutoConfig.for_model(**QWEN25_05B)
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
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return ids.numel()
    return step


def library_versions(side: str) -> str:
    if side == "tinylora":
        from importlib.metadata import version
        return f"tinylora {version('tinylora')}, numpy {np.__version__}, numba {version('numba')}"
    import peft
    import torch
    import transformers
    return (f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
            f"{transformers.__version__}, peft {peft.__version__}")


def serve(side: str, workload: Workload, model_dir: str | None, conn) -> None:
    """Spawned-process entry point: build, warm up, then time repetitions on request (see the module docstring)."""
    from ..generate import peak_memory_gb
    try:
        run = (_tinylora_runner if side == "tinylora" else _peft_runner)(workload, model_dir)
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
