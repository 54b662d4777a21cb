"""The `tinylora` command: a thin argparse front end over the library.

Each subcommand parses its flags and calls one library function; there is no
logic here that the Python API lacks. Errors the user can fix are printed as
one line on stderr with exit status 2; `--debug` shows the traceback instead.

Subcommands that exist so far: `gradcheck`, `bench kernels`, and `demo`
(which says honestly that the quick-start has not landed yet). `download`,
`import-gguf`, `train`, `generate`, `fuse` and `info` arrive with the model,
LoRA and training work.
"""

from __future__ import annotations

import argparse
import sys

from .errors import TinyloraError


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    from .gradcheck_ops import run_all
    print("Gradient check of every op: analytic backward vs central finite differences (float64),\n"
          "random upstream gradient, sampled entries plus one random direction.\n")
    return 0 if run_all(seed=args.seed, verbose=args.verbose) else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    if args.what == "kernels":
        print(bench.blas_info())
        print(bench.format_kernel_table(bench.run_kernel_bench(repeats=args.repeats)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    print("tinylora demo: not yet available. The quick-start fine-tune (SmolLM2-135M-Instruct, identity "
          "dataset) lands with the training issue; today the engine, kernels and gradient checks exist "
          "(try `tinylora gradcheck` and `tinylora bench kernels`).", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylora", description="LoRA fine-tuning of Qwen2-family models "
                                     "in NumPy and Numba, on a CPU.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("gradcheck", help="check every op's backward against finite differences, as a table",
                       description="Check every op's analytic backward against central finite differences "
                       "in float64 and print the errors. Exits 1 if any check fails.")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs, upstream gradients and samples (default 0)")
    p.add_argument("--verbose", action="store_true", help="print every compared number, not one line per op")
    p.set_defaults(func=_cmd_gradcheck)

    p = sub.add_parser("bench", help="benchmarks (kernels: matmul paths vs numpy on the model's shapes)",
                       description="Time tinylora's kernels. `kernels`: GFLOP/s of each matmul path and "
                       "its ratio to np.matmul (BLAS) on SmolLM2/Qwen2.5 shapes, and which path the "
                       "engine picks.")
    p.add_argument("what", choices=["kernels"], help="which benchmark to run")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per path, interleaved (default 5)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="the quick-start fine-tune (not yet available)",
                       description="The quick-start: fine-tune SmolLM2-135M-Instruct on an identity dataset. "
                       "Not yet available.")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TinyloraError, OSError) as e:
        if args.debug:
            raise
        print(f"tinylora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
