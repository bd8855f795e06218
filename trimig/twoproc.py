"""The two-process flow: ``trimig incoming URI`` on one side, ``trimig migrate URI`` on
the other."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import trio

from ._trio import open_nursery

log = logging.getLogger("trimig.twoproc")

OptionAdder = Callable[[argparse.ArgumentParser], None]


def add_two_process_commands(
    sub: Any, add_guest_options: OptionAdder, add_migration_options: OptionAdder
) -> None:
    """Register ``incoming`` and ``migrate`` on the main CLI's sub-parsers."""
    incoming = sub.add_parser(
        "incoming",
        help="receive one migration on URI, run the guest, verify it",
        description="Receive a migration. Give the guest command after '--' "
        "(default: the built-in workload guest).",
    )
    incoming.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, exec:COMMAND or rdma:PATH")
    incoming.add_argument(
        "--run-after", type=float, default=0.3, help="seconds the guest runs before the check"
    )
    add_guest_options(incoming)
    add_migration_options(incoming)
    incoming.set_defaults(handler=_cmd_incoming)

    migrate = sub.add_parser(
        "migrate",
        help="start a guest here and migrate it to URI (or, with --qmp, ask an engine to)",
        description="Start the guest (after '--', default: the built-in workload guest), let it "
        "run, then migrate it to URI where `trimig incoming` listens.",
    )
    migrate.add_argument("uri")
    migrate.add_argument("--warmup", type=float, default=0.5, help="seconds the guest runs first")
    migrate.add_argument(
        "--qmp", metavar="PATH", help="drive the engine serving QMP at PATH instead"
    )
    add_guest_options(migrate)
    add_migration_options(migrate)
    migrate.set_defaults(handler=_cmd_migrate)


def _cmd_incoming(args: argparse.Namespace) -> int:
    from .cli import _migration_settings, guest_setup, report, report_error, unverified
    from .demo import receive, verify_destination
    from .loadvm.incoming import IncomingMigration

    specs, command = guest_setup(args)
    capabilities, _parameters = _migration_settings(args)

    async def main() -> dict[str, Any]:
        incoming = IncomingMigration(specs, guest_command=command, capabilities=capabilities)
        try:
            async with open_nursery() as nursery:
                address = await nursery.start(receive, incoming, args.uri)
                print(f"trimig: listening on {address}", file=sys.stderr, flush=True)
            verdict = await verify_destination(incoming, args.run_after)
            info = incoming.query()
            info["verified"] = bool(verdict and verdict.verified)
            info["verdict"] = verdict.raw if verdict else None
            return info
        finally:
            await incoming.aclose()

    info = trio.run(main)
    report(info, args.json)
    if info["verified"]:
        return 0
    if info.get("error-desc"):
        report_error(f"incoming migration failed: {info['error-desc']}")
    else:
        report_error(unverified((info.get("verdict") or {}).get("detail")))
    return 1


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .cli import _migration_settings, guest_setup, one_line, report, report_error

    if args.qmp:
        from .qmp.cli import run_control_command

        return run_control_command(
            ["migrate", args.qmp, args.uri, *(["--json"] if args.json else [])]
        )
    from .demo import running_guest
    from .errors import MigrationFailed, MigrationPaused, TrimigError
    from .progress import progress_shown
    from .savevm.outgoing import OutgoingMigration
    from .transports import parse_uri

    parse_uri(args.uri)  # a bad URI is an error before any guest starts

    specs, command = guest_setup(args)
    capabilities, parameters = _migration_settings(args)

    async def main() -> tuple[dict[str, Any], Exception | None]:
        async with running_guest(specs, command) as (guest, blocks):
            await trio.sleep(args.warmup)
            outgoing = OutgoingMigration(
                guest, blocks, capabilities=capabilities, parameters=parameters
            )
            error: Exception | None = None
            async with progress_shown(outgoing.query):
                try:
                    await outgoing.run(args.uri)
                except (MigrationFailed, MigrationPaused) as exc:
                    error = exc
            info = outgoing.query()
            # The guest itself says how the migration left it: stopped once it moved,
            # running (and no longer dirty-tracked) after a failure.
            try:
                status = await guest.query()
            except TrimigError as exc:  # a guest that died: the migration's error says so
                log.info("could not query the source guest: %s", exc)
            else:
                info["guest"] = {
                    "running": status.get("running"),
                    "dirty-tracked": status.get("dirty_tracked"),
                }
            return info, error

    info, error = trio.run(main)
    report(info, args.json)
    if error is not None:
        report_error(one_line(error))
        return 1
    return 0
