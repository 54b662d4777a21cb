"""tinylora: LoRA fine-tuning of Qwen2-family models in NumPy and Numba.

The public surface (SPEC §3.10); everything else is free to change:

    model, tok = tinylora.load("weights/SmolLM2-135M-Instruct")     # folder or hub repo id
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    logits = model(np.array([ids]))                                # Tensor (B, T, V)
    out = tinylora.generate(model, tok, ids, max_tokens=20)        # new token ids
    tinylora.apply_lora(model, tinylora.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), seed=0)
    print(tinylora.parameter_report(model))                        # trainable params: … || all params: …
    loss = model.loss(input_ids, labels, attention_mask); loss.backward()
    tinylora.save_adapter(model, "adapters/")                      # PEFT format

Shapes in comments use one alphabet throughout the package:
B batch, T new tokens, S keys (cached + new), C hidden size, H query heads,
K key/value heads (G = H/K queries per kv head), D head size, F MLP
intermediate size, V vocabulary, R LoRA rank, L layers, N rows of a product
(all leading axes flattened), I and O a linear's input and output features
(`in`, `out` in the LoRA math).
"""

# The engine first: tensor.py closes the one import cycle (Tensor <-> ops) itself.
from .tensor import Function, Tensor, is_grad_enabled, no_grad  # isort: skip
from .errors import TinyloraError
from .generate import generate, stream_generate
from .gradcheck import gradcheck        # the function; the package tinylora.gradcheck holds the checker
from .loading import load, load_model
from .lora import (LoraConfig, apply_lora, fuse, load_adapter, lora_parameters, merge, parameter_report,
                   save_adapter, save_model)

__version__ = "0.1.0"

__all__ = ["Function", "LoraConfig", "Tensor", "TinyloraError", "apply_lora", "fuse", "generate", "gradcheck",
           "is_grad_enabled", "load", "load_adapter", "load_model", "lora_parameters", "merge", "no_grad",
           "parameter_report", "save_adapter", "save_model", "stream_generate", "__version__"]
