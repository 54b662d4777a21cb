"""Peak memory of loading a big bf16 checkpoint: does tinylora hold it once, or twice?

    python benchmarks/load_rss.py DIR [--shape qwen2-7b]   # writes DIR once (about 15 GB for 7B), then loads it

Writes a random-init bf16 checkpoint of Qwen2-7B's shape (sharded at 2 GB, as
`save_pretrained` does) into DIR unless it is already there, then loads it in a
fresh process with `tinylora.load_model(DIR, dtype="bfloat16")` and prints the
peak RSS (getrusage) against the bytes the model keeps. The issue asked for a
peak within 10 % of the kept bytes; the interpreter and Numba add ~0.2 GB.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SHAPES = {
    # Qwen2-7B's config.json (the shapes only; weights are random)
    "qwen2-7b": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "vocab_size": 152064, "tie_word_embeddings": False, "rope_theta": 1000000.0,
                 "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "qwen2.5-1.5b": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000.0,
                     "rms_norm_eps": 1e-6},
}
SHARD_BYTES = 2 << 30


def write_checkpoint(folder: Path, config: dict) -> None:
    from tinylora.config import ModelConfig
    from tinylora.formats.files import write_json
    from tinylora.formats.safetensors import BFLOAT16, write_safetensors
    from tinylora.model import expected_shapes
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, current, size = [], {}, 0
    for name, shape in expected_shapes(ModelConfig.from_dict(config)).items():
        # bf16 bit patterns of small numbers (|x| in [2^-8, 2^-4)), drawn directly: no float32 copy
        current[name] = rng.integers(0x3B80, 0x3D80, size=shape, dtype=np.uint16).view(BFLOAT16)
        size += current[name].nbytes
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, tensors)
        weight_map.update({k: name for k in tensors})
        print(f"wrote {name}", file=sys.stderr)
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json(folder / "config.json", config)


MEASURE = """
import resource, sys
from tinylora.loading import load_model
model = load_model(sys.argv[1], dtype="bfloat16")
kept = sum(t.data.nbytes for _, t in model.named_parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"kept {kept / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB, ratio {peak / kept:.3f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="qwen2-7b")
    args = parser.parse_args()
    if not (args.folder / "config.json").exists():
        write_checkpoint(args.folder, SHAPES[args.shape])
    elif json.loads((args.folder / "config.json").read_text()) != SHAPES[args.shape]:
        sys.exit(f"{args.folder} holds another model; choose an empty folder")
    print(subprocess.run([sys.executable, "-c", MEASURE, str(args.folder)], check=True,
                         capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
