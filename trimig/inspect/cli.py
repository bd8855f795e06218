"""``trimig inspect FILE [--json] [--extract DIR] [--offset N]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_inspect_command(sub: Any) -> None:
    """Register ``inspect`` on the main CLI's sub-parsers."""
    inspect = sub.add_parser(
        "inspect",
        help="describe a migration stream saved to a file (QEMU's or trimig's)",
        description="Read a stream saved with `migrate exec:cat > FILE` (or file:FILE): header, "
        "configuration, sections, commands, RAM blocks with their page counts. QEMU's device "
        "sections are skipped with the VM description QEMU writes after QEMU_VM_EOF.",
    )
    inspect.add_argument("file", help="the stream file")
    inspect.add_argument("--extract", metavar="DIR", help="write each RAM block to DIR/<block>.ram")
    inspect.add_argument(
        "--offset",
        default="0",
        metavar="N",
        help="where the stream starts in the file (file:PATH,offset=N; default 0)",
    )
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.set_defaults(handler=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from trimig.cli.output import report_error
    from trimig.inspect.walker import BadStreamFile, inspect_file
    from trimig.units import parse_size

    start = parse_size(args.offset, what="--offset")
    try:
        report = inspect_file(args.file, extract=args.extract, start=start)
    except BadStreamFile as exc:
        _print(exc.report.to_json() if args.json else exc.report.format(), args.json)
        report_error(str(exc))
        return 1
    _print(report.to_json() if args.json else report.format(), args.json)
    if report.stopped is not None:
        print(f"trimig: inspect stopped: {report.stopped.message}", file=sys.stderr, flush=True)
    return 0


def _print(output: dict[str, Any] | str, as_json: bool) -> None:
    text = json.dumps(output, sort_keys=True) if as_json else output
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `trimig inspect FILE | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
