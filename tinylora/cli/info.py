"""`tinylora info`: a model's architecture, shapes, parameter counts and the bytes each storage type holds."""

from __future__ import annotations

from ..kernels.weights import FrozenWeight
from ..model import CausalLM


def _group(name: str) -> str:
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    return "other"


def _storage(t) -> str:
    """"nf4", "q4_k", "bfloat16", ... for a frozen weight; the dtype's name for a plain array."""
    return t.data.storage if isinstance(t.data, FrozenWeight) else t.data.dtype.name


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def storage_bytes(model: CausalLM) -> dict[str, int]:
    """{storage type: bytes held} over every tensor of the model."""
    held: dict[str, int] = {}
    for _, t in model.named_parameters():
        held[_storage(t)] = held.get(_storage(t), 0) + t.data.nbytes
    return held


def model_info(model: CausalLM) -> str:
    c = model.config
    counts: dict[str, int] = {}
    stored: dict[str, dict[str, int]] = {}          # group -> {storage type: bytes held}
    for name, t in model.named_parameters():
        counts[_group(name)] = counts.get(_group(name), 0) + t.size       # logical parameters, whatever the storage
        kinds = stored.setdefault(_group(name), {})
        kinds[_storage(t)] = kinds.get(_storage(t), 0) + t.data.nbytes
    total = sum(counts.values())
    trainable = sum(t.size for _, t in model.trainable_parameters())
    held = storage_bytes(model)
    lines = [
        f"model:            {getattr(model, 'name_or_path', '?')}",
        f"architecture:     {c.architecture} ({'q/k/v bias' if c.qkv_bias else 'no q/k/v bias'}, "
        f"{'tied' if c.tie_word_embeddings else 'untied'} embeddings)",
        f"layers:           {c.num_hidden_layers}",
        f"hidden size C:    {c.hidden_size}",
        f"heads H / kv K:   {c.num_attention_heads} / {c.num_key_value_heads} (head dim D {c.head_dim})",
        f"MLP width F:      {c.intermediate_size}",
        f"vocabulary V:     {c.vocab_size}",
        f"rope theta:       {c.rope_theta:g}" + (f" (linear scaling x{c.rope_scaling_factor:g})"
                                                 if c.rope_scaling_factor != 1 else ""),
        f"rms norm eps:     {c.rms_norm_eps:g}",
        f"weights held:     " + ", ".join(f"{kind} {_mib(n)}" for kind, n in sorted(held.items(),
                                                                                          key=lambda kv: -kv[1]))
        + f" ({_mib(sum(held.values()))} in all)",
        "parameters:",
    ]
    for group in ("embeddings", "attention", "mlp", "norms", "other"):
        if group in counts:
            held_as = ", ".join(f"{kind} {_mib(n)}" for kind, n in sorted(stored[group].items()))
            lines.append(f"  {group:<14}  {counts[group]:>14,}  ({100 * counts[group] / total:5.2f}%)  {held_as}")
    lines.append(f"  {'total':<14}  {total:>14,}")
    lines.append(f"  {'trainable':<14}  {trainable:>14,}")
    return "\n".join(lines)
