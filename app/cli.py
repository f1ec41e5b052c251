"""The command line: `dual-vllm <command>` (also `python -m app`).

Each command lives in the module that owns the feature; this file only lists them and imports
a module when its command runs, so `dual-vllm --help` stays fast and no command pays for
another's imports. A command module provides::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from app.version import version

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("app.server", "run the OpenAI-compatible gateway"),
    "generate": ("app.batch.cli", "turn a dataset of prompts into a JSONL training set"),
    "run-batch": ("app.batch.runbatch", "run an OpenAI batch file through the gateway in process"),
    "report": ("app.batch.report", "summarise a generate output file (plots, HTML)"),
    "local": ("app.localvllm.cli", "set up and run two real CPU vLLM servers with a small model"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="dual-vllm", description="dual-vllm gateway and tools")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(command_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in args_list if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(args_list)
    module = importlib.import_module(COMMANDS[args.command][0])
    result: int = module.run(args)
    return result
