"""Command line: ``eekernels sample | bench | finetune | calibrate | info`` (also ``python -m eekernels ...``).

Each subcommand is a module of ``eekernels.jobs`` (``info``: ``eekernels.info``) and exposes ``add_arguments(parser)`` and ``run(args)``.
Bad options end the command with one line, ``eekernels <command>: error: <message>``, and exit code 2, before any
work. Under torchrun rank 0 prints that line and hands it to torchrun's error file; torchrun then adds its own
report of the failed worker and exits with 1 (:func:`_tell_torchrun` says why that cannot be avoided).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from eekernels._version import __version__

# name -> (module, one-line help)
COMMANDS = {
    "sample": ("eekernels.jobs.sample", "sample images (no arguments: the shipped glyph DiT under the ASE schedule)"),
    "bench": ("eekernels.jobs.bench", "sampling throughput: full depth vs early exit vs plain torch"),
    "finetune": ("eekernels.jobs.finetune", "ASE fine-tuning of a model under an exit schedule"),
    "calibrate": ("eekernels.jobs.calibrate", "an exit schedule chosen from measured errors under a FLOP budget"),
    "info": ("eekernels.info", "versions, _C build, device, the backend each op would use"),
}


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default
    parser = argparse.ArgumentParser(prog="eekernels", description=__doc__.splitlines()[0], formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)
    return parser


def _quiet_rank() -> bool:
    """True on torchrun ranks other than 0: rank 0 alone reports an error, so it is printed once."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and os.environ["RANK"] != "0"


def _tell_torchrun(line: str) -> None:
    """Under torchrun, hand the error line to the launcher through the error file its agent reads
    (``TORCHELASTIC_ERROR_FILE``), so that its failure report names our error instead of "To enable traceback".

    That report itself cannot be avoided: when any worker exits non-zero, torchrun's ``launch_agent`` raises
    ``ChildFailedError``, which ``torch.distributed.run.main``'s ``@record`` re-raises, so the launcher prints
    that traceback and exits with 1 whatever our exit code; a worker can only exit 0, and then torchrun reports
    success. Nothing a worker sets (environment, signals short of killing the launcher) changes that.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        import json
        import time

        try:
            with open(path, "w") as f:
                # torch.distributed.elastic's own layout (ErrorHandler.record_exception); its report prints
                # py_callstack as the root cause's "traceback"
                json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                      "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass  # the launcher then reports "error_file: <N/A>"; our line is printed already


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, TypeError) as e:
        # The project's rule: bad input raises ValueError (TypeError for a wrong type) naming the option, before
        # any device work; the subcommands check their options that way. Those are the user's errors, so they
        # get argparse's treatment: one line, exit code 2. Every other exception (RuntimeError, OSError,
        # KeyError, a CUDA error, ...) is a bug or a broken environment and keeps its traceback.
        line = f"eekernels {args.command}: error: {e}"
        if not _quiet_rank():
            print(line, file=sys.stderr, flush=True)
            _tell_torchrun(line)
        else:
            # torchrun stops every rank as soon as one exits with an error: a quiet rank that exited at once
            # could have rank 0 killed before its one line is out. Wait a moment (rank 0 exits first, and
            # torchrun then stops this rank, so this is no delay in practice).
            import time

            time.sleep(5.0)
        return 2


if __name__ == "__main__":
    sys.exit(main())
