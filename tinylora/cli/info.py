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


def storage_bytes(model: CausalLM) -> dict[str, int]:
    """{storage type: bytes held}: "bfloat16" for BF16Weights, the dtype's name for float arrays."""
    held: dict[str, int] = {}
    for _, t in model.named_parameters():
        kind = t.data.storage if isinstance(t.data, FrozenWeight) else t.data.dtype.name
        held[kind] = held.get(kind, 0) + t.data.nbytes
    return held


def model_info(model: CausalLM) -> str:
    c = model.config
    counts: dict[str, int] = {}
    for name, t in model.named_parameters():
        counts[_group(name)] = counts.get(_group(name), 0) + t.size       # logical parameters, whatever the storage
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
        f"weights held:     " + ", ".join(f"{kind} {n / 2**20:,.1f} MiB" for kind, n in sorted(held.items(),
                                                                                          key=lambda kv: -kv[1]))
        + f" ({sum(held.values()) / 2**20:,.1f} MiB in all)",
        "parameters:",
    ]
    for group in ("embeddings", "attention", "mlp", "norms", "other"):
        if group in counts:
            lines.append(f"  {group:<14}  {counts[group]:>14,}  ({100 * counts[group] / total:5.2f}%)")
    lines.append(f"  {'total':<14}  {total:>14,}")
    lines.append(f"  {'trainable':<14}  {trainable:>14,}")
    return "\n".join(lines)
