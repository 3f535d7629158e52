"""``longnet`` command line: one subcommand per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# subcommand -> (module, one-line help). Each module defines
# ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = {
    "train": ("longnet.commands.train", "train a LongNet language model (default: tiny preset, built-in corpus)"),
    "eval": ("longnet.training.evaluate", "bits-per-byte of a checkpoint on valid/test data"),
    "generate": ("longnet.training.generate", "sample text from a checkpoint"),
    "bench": ("longnet.bench.op", "time and memory of dilated vs dense attention"),
    "plan": ("longnet.commands.plan", "per-rank memory, communication and projected step time of a run at scale"),
    "viz": ("longnet.analysis.viz", "draw dilation patterns, count matrices and reach"),
    "selftest": ("longnet.selftest", "validate longnet on this machine's GPUs (--gpu; --dry-run on CPU)"),
    "experiment": ("longnet.training.experiment.command",
                   "train LongNet and baselines at equal compute and compare them (scaled-down Table 2)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="longnet", description="LongNet: dilated attention for long sequences")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "cli_main"):  # a command that routes its own argv (e.g. bench --sequence-parallel)
        return int(module.cli_main(argv[1:]) or 0)
    sub_parser = argparse.ArgumentParser(prog=f"longnet {name}", description=COMMANDS[name][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
