"""`cleansweep <command>`: the parser of every command, and the one place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys

from cleansweep import __version__
from cleansweep.cli import data, measure, study, sweep, train, ui
from cleansweep.cli.parser import Parser
from cleansweep.errors import DiskFull, NodeOutOfMemory, UserError
from cleansweep.runtime import interrupts

DESCRIPTION = "Command line: `cleansweep <command>`. The only place that exits."
# A full disk: diskguard.EXIT_CODE (also 75, EX_TEMPFAIL); best model lost: delivery's.
EXIT_USER_ERROR, EXIT_TEMPFAIL, EXIT_INTERRUPTED = 2, 75, 130
# Each adds one subcommand (its flags and the function it calls), in the order `--help` lists them.
COMMANDS = [data.add_data, data.add_poison, measure.add_evaluate, measure.add_scan, train.add_pretrain,
            sweep.add_search, sweep.add_results, sweep.add_report, study.add_study, study.add_matrix, ui.add_ui]


def build_parser() -> argparse.ArgumentParser:
    """The `cleansweep` parser: every subcommand, each with `func` set to the function that runs it."""
    parser = Parser(prog="cleansweep", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cleansweep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (0 ok, 2 user error, 3 best model lost, 75 disk full or node out of
    memory (resumable), 130 interrupted).

    A `UserError` becomes one line on stderr; nothing here prints a traceback for bad input.
    """
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NodeOutOfMemory as e:  # resumable, like a full disk
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except (DiskFull, Exception) as e:  # a full disk: one line naming the path (diskguard), resumable
        from cleansweep.runtime import diskguard

        if (line := diskguard.disk_full_line(e)) is None:
            raise
        print(line, file=sys.stderr)
        return diskguard.EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: everything reported so far is saved; re-run with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def entrypoint() -> None:
    """The `cleansweep` console script: SIGTERM is treated like Ctrl-C, then `main`'s code is the exit status."""
    with interrupts.sigterm_as_sigint():
        code = main()
    sys.exit(code)
