"""The ``trimig`` command line: :func:`main`, where every sub-command is registered.

* ``options``: the argparse pieces the commands share (guest options, migration options,
  ``--json``) and what they mean;
* ``engines``: the commands that run an engine here: ``demo``, ``incoming``, ``migrate``,
  ``run``, ``probe``;
* ``control``: the commands that drive an engine over QMP: ``ctl``, ``info``,
  ``start-postcopy``, ``cancel``, ``watch``, ``migrate --qmp``;
* ``output``: what they print: the query-migrate table, the progress line, JSON, and a
  failure named in one line on stderr.

Each sub-parser sets ``handler``, a callable ``(argparse.Namespace) -> int`` (the exit
status).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from .output import describe, is_expected, print_json, report_error


def build_parser() -> argparse.ArgumentParser:
    # The command modules are imported here, not above, so that ``python -m
    # trimig.cli.control`` does not find its module already imported by this package.
    from ..inspect.cli import add_inspect_command
    from ..snapshot.cli import add_snapshot_commands
    from .control import add_control_commands
    from .engines import add_engine_commands

    parser = argparse.ArgumentParser(prog="trimig", description="Live migration of running guests")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    add_engine_commands(sub)
    add_control_commands(sub)
    add_inspect_command(sub)
    add_snapshot_commands(sub)
    return parser


def split_guest_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``trimig ... -- GUEST COMMAND`` at the first ``--``: (trimig's words, the guest's)."""
    words = list(argv)
    if "--" in words:
        cut = words.index("--")
        return words[:cut], words[cut + 1 :]
    return words, []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    own, guest_command = split_guest_command(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    args.guest_command = guest_command
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("trimig: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # every failure is named in one line (and in --json)
        if isinstance(exc, SystemExit):
            raise
        message = describe(exc)
        if not is_expected(exc):  # a bug, or an unexpected OS error
            if args.verbose:
                traceback.print_exc()
            else:
                message += " (run with -v for the traceback)"
        report_error(message)
        if getattr(args, "json", False):
            # Nothing was reported yet: the JSON names the failure as query-migrate does.
            print_json({"status": "failed", "error-desc": message})
        return 1
