"""The one ``main`` of every neurofed command line: parse, run the chosen handler, turn errors into
an exit code and one line on stderr (never a traceback for a mistake the user can fix)."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable


def run_command(
    parser: argparse.ArgumentParser, argv: list[str] | None, user_errors: tuple[type[BaseException], ...]
) -> int:
    """Parse ``argv`` with ``parser`` and call the handler its sub-command set (``set_defaults(handler=...)``).

    Returns the handler's exit code; 130 on Ctrl-C; 2 for any of ``user_errors``, whose message is printed
    as ``PROG COMMAND: error: MESSAGE``.
    """
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except user_errors as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


def command_parser(
    prog: str, description: str, add_commands: list[Callable[[argparse._SubParsersAction], None]]
) -> argparse.ArgumentParser:
    """A parser whose sub-commands each ``add_commands`` function adds (``args.command`` names the one given)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in add_commands:
        add(sub)
    return parser


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    defaults_in_help: bool = False,
) -> argparse.ArgumentParser:
    """A sub-command run by ``handler``, explained by its docstring: the first paragraph is the one-line
    help in the command list (lower-cased, without its full stop), the rest the description of
    ``COMMAND --help``.

    Args:
        defaults_in_help: show every option's default in ``--help``.
    """
    summary, _, details = inspect.cleandoc(handler.__doc__ or name).partition("\n\n")
    parser = sub.add_parser(
        name,
        help=summary[:1].lower() + summary[1:].rstrip("."),
        description=details or summary,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter if defaults_in_help else argparse.HelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser
