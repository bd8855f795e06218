"""The two-process flow: ``trimig incoming URI`` on one side, ``trimig migrate URI`` on the other."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import trio

from .demo import running_guest, workload_command
from .guest.host import Verdict
from .loadvm.incoming import IncomingMigration
from .migration import MigrationStatus
from .progress import show_progress
from .ram import default_block_specs
from .savevm.outgoing import OutgoingMigration
from .units import parse_rate, parse_size

OptionAdder = Callable[[argparse.ArgumentParser], None]


def add_two_process_commands(
    sub: Any, add_guest_options: OptionAdder, add_migration_options: OptionAdder
) -> None:
    incoming = sub.add_parser(
        "incoming",
        help="receive one migration on URI, run the guest, verify it",
        description="Receive a migration. Give the guest command after '--' "
        "(default: the built-in workload guest).",
    )
    incoming.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, exec:COMMAND or rdma:PATH")
    incoming.add_argument("--run-after", type=float, default=0.3, help="seconds the guest runs before the check")
    add_guest_options(incoming)
    add_migration_options(incoming)
    incoming.add_argument("guest_command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    incoming.set_defaults(handler=_cmd_incoming)

    migrate = sub.add_parser(
        "migrate",
        help="start a guest here and migrate it to URI (or, with --qmp, ask an engine to)",
        description="Start the guest (after '--', default: the built-in workload guest), let it "
        "run, then migrate it to URI where `trimig incoming` listens.",
    )
    migrate.add_argument("uri")
    migrate.add_argument("--warmup", type=float, default=0.5, help="seconds the guest runs first")
    migrate.add_argument("--qmp", metavar="PATH", help="drive the engine serving QMP at PATH instead")
    add_guest_options(migrate)
    add_migration_options(migrate)
    migrate.add_argument("guest_command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    migrate.set_defaults(handler=_cmd_migrate)


def _guest_command(args: argparse.Namespace) -> list[str]:
    command = [part for part in args.guest_command if part != "--"] if args.guest_command else []
    if command:
        return command
    return workload_command(
        dirty_rate=parse_rate(args.dirty_rate, what="--dirty-rate"), fill=args.fill, seed=args.seed
    )


def _specs(args: argparse.Namespace) -> list[Any]:
    return default_block_specs(
        parse_size(args.ram, what="--ram"), huge=parse_size(args.huge, what="--huge")
    )


def _cmd_incoming(args: argparse.Namespace) -> int:
    from .cli import _migration_settings, report

    capabilities, _parameters = _migration_settings(args)

    async def main() -> tuple[dict[str, Any], Verdict | None]:
        incoming = IncomingMigration(
            _specs(args), guest_command=_guest_command(args), capabilities=capabilities
        )
        try:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(incoming.listen_and_run, args.uri)
                print(f"trimig: listening on {address}", file=sys.stderr, flush=True)
            verdict = None
            if incoming.status.value is MigrationStatus.COMPLETED:
                guest, blocks = incoming.take_guest()
                try:
                    await trio.sleep(args.run_after)
                    await guest.stop()
                    verdict = await guest.verify()
                finally:
                    with trio.CancelScope(shield=True):
                        await guest.aclose()
                    for block in blocks:
                        block.close()
            return incoming.query(), verdict
        finally:
            await incoming.aclose()

    info, verdict = trio.run(main)
    info["verified"] = bool(verdict and verdict.verified)
    info["verdict"] = verdict.raw if verdict else None
    report(info, args.json)
    return 0 if info["verified"] else 1


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .cli import _migration_settings, report

    if args.qmp:
        from .qmp.cli import run_control_command

        return run_control_command(
            ["migrate", args.qmp, args.uri, *(["--json"] if args.json else [])]
        )
    capabilities, parameters = _migration_settings(args)

    async def main() -> dict[str, Any]:
        async with running_guest(_specs(args), _guest_command(args)) as (guest, blocks):
            await trio.sleep(args.warmup)
            outgoing = OutgoingMigration(
                guest, blocks, capabilities=capabilities, parameters=parameters
            )
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def progress() -> None:
                    with scope:
                        await show_progress(outgoing.query)

                nursery.start_soon(progress)
                try:
                    await outgoing.run(args.uri)
                finally:
                    scope.cancel()
                nursery.cancel_scope.cancel()
            return outgoing.query()

    report(trio.run(main), args.json)
    return 0
