"""tinylora: LoRA fine-tuning of Qwen2-family models in NumPy and Numba.

The public surface (SPEC §3.10); everything else is free to change:

    model, tok = tinylora.load("weights/SmolLM2-135M-Instruct")     # folder or hub repo id
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    logits = model(np.array([ids]))                                # Tensor (B, T, V)
    out = tinylora.generate(model, tok, ids, max_tokens=20)        # new token ids
"""

from .errors import TinyloraError
from .generate import generate, stream_generate
from .gradcheck import gradcheck
from .loading import load, load_model
from .tensor import Function, Tensor, is_grad_enabled, no_grad

__version__ = "0.1.0"

__all__ = ["Function", "Tensor", "TinyloraError", "generate", "gradcheck", "is_grad_enabled", "load", "load_model",
           "no_grad", "stream_generate", "__version__"]
