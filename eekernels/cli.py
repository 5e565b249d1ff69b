"""Command line: ``eekernels sample | bench | finetune | info`` (also ``python -m eekernels ...``).

Each subcommand lives beside the code it drives and exposes ``add_arguments(parser)`` and ``run(args)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "sample": ("eekernels.jobs.sample", "sample images (no arguments: the shipped glyph DiT under the ASE schedule)"),
    "bench": ("eekernels.samplers.bench", "sampling throughput: full depth vs early exit vs plain torch"),
    "finetune": ("eekernels.training.finetune", "ASE fine-tuning of a model under an exit schedule"),
    "info": ("eekernels.info", "versions, _C build, device, the backend each op would use"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eekernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
