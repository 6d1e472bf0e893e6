"""Entry point of ``fusedmlp`` and ``python -m fusedmlp``.

Each command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
optional extras (scikit-learn, matplotlib, tqdm) are imported inside ``run`` so ``--help``
works without them.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "train": "train an MLP with fusedmlp and the same model in torch, side by side (the main job)",
    "bench": "benchmark every op against torch eager, torch.compile and the hardware",
    "verify": "check every Triton kernel against torch on this device",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedmlp", description="Triton kernels for training MLPs in PyTorch."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f".{name}", __package__)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._module.run(args) or 0)
    except BrokenPipeError:  # `fusedmlp train | head`: the reader left; no traceback
        import os
        import sys

        # Python flushes stdout again at exit: point it at devnull so that raises nothing
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # a stdout without a file (captured)
            pass
        return 1
    except KeyboardInterrupt:
        import sys

        print(f"\nfusedmlp {args.command}: interrupted", file=sys.stderr)
        return 130
