"""Command line: `cleansweep <command>`. The only place that exits.

`main(argv) -> int` is a plain function (tests call it in-process). Every expected problem surfaces as a
`UserError` and becomes one line on stderr with exit code 2; nothing here prints a traceback for bad input.
The package parses arguments only: `main.py` builds the parser and maps errors to exit codes, `parser.py` holds what
the commands share, and each command module (`data`, `measure`, `train`, `sweep`, `study`, `ui`) declares its
flags with an `add_<name>(sub)` and calls the library from one `_cmd_<name>(args)`.
"""

from cleansweep.cli.main import build_parser, entrypoint, main

__all__ = ["build_parser", "entrypoint", "main"]
