"""Text generation: prefill the prompt once, then decode one token at a time with a KV cache.

    prefill:  run all prompt tokens, filling the cache; the logits of the last one give token 1
    decode:   run the newest token alone against the cache; its logits give the next token
              (decode.py: the same forward on plain arrays, without the autograd bookkeeping)

Choosing a token from the logits z (V,):
    greedy (temperature 0):  argmax z
    sampled:                 p = softmax(z / temperature), restricted to the top_k most likely
                             tokens and then to the smallest set whose probability reaches
                             top_p (nucleus sampling; Holtzman et al., 2019), renormalised.
The random draws come from an `np.random.Generator` seeded by `seed`, so a
sampled answer is reproducible. Generation stops at `max_tokens` or at a stop
token (end of sequence / end of turn), which is not included in the output.
Everything runs under `no_grad`: nothing is kept for a backward pass.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .cache import KVCache
from .decode import decode_step
from .errors import TinyloraError
from .ops.reference import FUSED
from .tensor import no_grad


def peak_memory_gb() -> float:
    """Peak resident memory of this process so far, in GB (GiB): Linux's VmHWM, the peak of this program's
    own memory. Not getrusage's ru_maxrss where VmHWM exists: Linux carries that across fork and exec, so a
    process started by a large one (a benchmark's worker) would report at least its parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024 ** 2              # "VmHWM:   28692 kB"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2   # KiB on Linux


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds else 0.0

    def report(self) -> str:
        return (f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.3f} tokens-per-sec\n"
                f"Generation: {self.generation_tokens} tokens, {self.generation_tps:.3f} tokens-per-sec\n"
                f"Peak memory: {peak_memory_gb():.3f} GB")


def sample_next(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                rng: np.random.Generator | None = None) -> int:
    """logits (V,) -> the chosen token id"""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)                 # keep the top_k largest (ties kept)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)                             # most likely first
        before = np.cumsum(p[order]) - p[order]            # probability of the tokens ranked above
        drop = order[before >= top_p]                      # keep until top_p is reached ...
        p[drop[drop != order[0]]] = 0.0                    # ... and always the most likely token
        p /= p.sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(p.size, p=p))


def check_request(model, prompt_ids: list[int], max_tokens: int, allow_long_context: bool = False) -> None:
    """Refuse, in one line, what generation cannot honour: max_tokens below 1, and a prompt (or prompt +
    max_tokens) beyond the model's context, max_position_embeddings, unless allow_long_context (llama.cpp
    also refuses a prompt longer than its context; past the trained length quality falls apart)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise TinyloraError(f"generate: max_tokens must be a whole number >= 1, got {max_tokens!r}")
    context = model.config.max_position_embeddings
    if allow_long_context:
        return
    if len(prompt_ids) > context:
        raise TinyloraError(f"generate: the prompt has {len(prompt_ids)} tokens, more than the model's context of "
                            f"{context} (max_position_embeddings); shorten it, or allow_long_context / "
                            "--allow-long-context to go beyond")
    if len(prompt_ids) + max_tokens > context:
        raise TinyloraError(f"generate: the prompt's {len(prompt_ids)} tokens plus max_tokens {max_tokens} make "
                            f"{len(prompt_ids) + max_tokens}, more than the model's context of {context} "
                            "(max_position_embeddings); lower max_tokens, or allow_long_context / "
                            "--allow-long-context to go beyond")


def stream_generate(model, prompt_ids: list[int], max_tokens: int = 100, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Iterable[int] = (),
                    stats: GenerationStats | None = None, allow_long_context: bool = False) -> Iterator[int]:
    """Yield new token ids one at a time (the stop token itself is not yielded). The request is checked
    when this is called, before the first token is asked for (check_request)."""
    _check(model, prompt_ids, max_tokens, temperature, top_k, top_p, allow_long_context)
    return _stream(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed, stop_ids, stats)


def _check(model, prompt_ids, max_tokens, temperature, top_k, top_p, allow_long_context) -> None:
    if not prompt_ids:
        raise TinyloraError("generate: the prompt is empty")
    if not temperature >= 0.0:                             # also catches NaN
        raise TinyloraError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise TinyloraError(f"generate: top_p must be in [0, 1], got {top_p}")
    if top_k < 0:
        raise TinyloraError(f"generate: top_k must be >= 0, got {top_k}")
    check_request(model, prompt_ids, max_tokens, allow_long_context)


def _stream(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed, stop_ids, stats) -> Iterator[int]:
    stop = set(stop_ids)
    rng = np.random.default_rng(seed)
    stats = stats if stats is not None else GenerationStats()
    cache = KVCache.for_model(model, batch=1, max_length=len(prompt_ids) + max_tokens)
    was_training = model.training
    model.train(False)                                     # no dropout while generating
    try:
        yield from _decode(model, prompt_ids, max_tokens, temperature, top_k, top_p, rng, stop, stats, cache)
    finally:
        model.train(was_training)


def _decode(model, prompt_ids, max_tokens, temperature, top_k, top_p, rng, stop, stats, cache) -> Iterator[int]:
    """stream_generate's loop: prefill, then one token at a time (see the module docstring)."""
    with no_grad():
        start = time.perf_counter()
        h = model.hidden_states(np.array([prompt_ids]), cache=cache)           # prefill (1, T, C)
        logits = model.lm_head(h[:, -1:]).data[0, -1]                          # (V,) last position only
        token = sample_next(logits, temperature, top_k, top_p, rng)
        stats.prompt_tokens, stats.prompt_seconds = len(prompt_ids), time.perf_counter() - start
        start = time.perf_counter()
        for n in range(max_tokens):
            if token in stop:
                break
            stats.generation_tokens = n + 1
            yield token
            if n + 1 == max_tokens:
                break
            token = sample_next(_next_logits(model, token, cache), temperature, top_k, top_p, rng)
            stats.generation_seconds = time.perf_counter() - start
        stats.generation_seconds = time.perf_counter() - start


def _next_logits(model, token: int, cache: KVCache) -> np.ndarray:
    """One decoding step -> logits (V,): decode.py's array path for a model of the fused ops, the
    modules themselves for one built from the reference ops (ops/reference.py), which it tests."""
    if model.ops is FUSED:
        return decode_step(model, token, cache)
    h = model.hidden_states(np.array([[token]]), cache=cache)                  # (1, 1, C)
    return model.lm_head(h).data[0, -1]


def generate(model, tokenizer, prompt_ids: list[int], max_tokens: int = 100, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None,
             stats: GenerationStats | None = None, allow_long_context: bool = False) -> list[int]:
    """prompt ids -> new token ids, stopping at the tokenizer's end-of-sequence/turn tokens.

    on_text: called with each newly decoded piece of text (for streaming to a terminal).
    """
    stop = tokenizer.eos_token_ids if tokenizer is not None else set()
    decoder = tokenizer.decode_stream() if (on_text is not None and tokenizer is not None) else None
    out = []
    for token in stream_generate(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed, stop, stats,
                                 allow_long_context):
        out.append(token)
        if decoder is not None:
            piece = decoder.step(token)
            if piece:
                on_text(piece)
    return out
