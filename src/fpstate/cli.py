"""The ``fpstate`` command line.

Each subcommand lives in its own module under ``fpstate.commands`` with two functions:
``register(subparsers)`` adds its parser (with ``set_defaults(run=...)``), and the ``run(args)``
it names returns the exit status. This file only wires them together and turns every
`FpstateError` into one line on stderr with exit status 2 (argparse does the same for bad
arguments).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fpstate import __version__
from fpstate.errors import FpstateError

#: Subcommand modules, in the order ``fpstate --help`` lists them.
COMMANDS: tuple[str, ...] = (
    "fpstate.commands.layout",
    "fpstate.commands.bootlog",
    "fpstate.commands.decode",
    "fpstate.commands.sizes",
    "fpstate.commands.cost",
    "fpstate.commands.compat",
    "fpstate.commands.template",
    "fpstate.commands.conform",
    "fpstate.commands.run",
    "fpstate.commands.campaign",
    "fpstate.commands.explore",
    "fpstate.commands.variants",
    "fpstate.commands.check",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"fpstate: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fpstate",
        description="x86 and arm64 extended register state: the architecture, Linux and KVM, "
        "as a model and on the real machine.",
    )
    parser.add_argument("--version", action="version", version=f"fpstate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except FpstateError as e:
        sys.stderr.write(f"fpstate: error: {e}\n")
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:  # an output file or directory that cannot be written, ...
        what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        sys.stderr.write(f"fpstate: error: {what}\n")
        return 2


def script() -> int:
    """The ``fpstate`` command: `main` in a process of fpstate's own (the explorer may then
    tune this process's garbage collector, fpstate.check.memo.settle)."""
    from fpstate.check.memo import own_process

    own_process()
    return main()


if __name__ == "__main__":
    raise SystemExit(script())
