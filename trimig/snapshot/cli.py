"""``trimig snapshot FILE`` and ``trimig restore FILE [--lazy]`` (docs/snapshots.md)."""

from __future__ import annotations

import argparse
from typing import Any

import trio

from ..cli.options import add_guest_options, add_json_option, add_warmup_option, guest_setup
from ..cli.output import print_json, progress_shown, report, report_error, report_outcome


def add_snapshot_commands(sub: Any) -> None:
    """Register ``snapshot`` and ``restore`` on the main CLI's sub-parsers."""
    snapshot = sub.add_parser(
        "snapshot",
        help="start a guest here and save it, running, to FILE (mapped-ram)",
        description="Start the guest (after '--', default: the built-in workload guest), let it "
        "run, then save it live to FILE (migrate file:FILE with mapped-ram: every page at a fixed "
        "offset). The guest stops for the last pass; --keep-running resumes it after the save.",
    )
    snapshot.add_argument("file")
    snapshot.add_argument("--offset", default="0", help="where the stream starts in FILE")
    snapshot.add_argument(
        "--stream",
        action="store_true",
        help="write the plain stream (no mapped-ram): restorable eagerly only",
    )
    snapshot.add_argument(
        "--keep-running",
        action="store_true",
        help="resume the guest after the save (and check it runs on consistently)",
    )
    snapshot.add_argument(
        "--run-after", type=float, default=0.3, help="with --keep-running: seconds it runs on"
    )
    add_warmup_option(snapshot)
    restore = sub.add_parser(
        "restore",
        help="start a guest from a snapshot FILE, eagerly or --lazy, and verify it",
        description="Restore a guest saved by `trimig snapshot` (or migrate file:FILE with "
        "mapped-ram). Eager: every page is read before the guest runs. --lazy: the guest runs "
        "at once and its pages are read as it touches them (userfaultfd), the rest in order.",
    )
    restore.add_argument("file")
    restore.add_argument("--offset", default="0", help="where the stream starts in FILE")
    restore.add_argument("--lazy", action="store_true", help="run at once, fault pages in")
    restore.add_argument(
        "--run-after", type=float, default=0.3, help="seconds the guest runs before the check"
    )
    for parser, handler in ((snapshot, _cmd_snapshot), (restore, _cmd_restore)):
        add_guest_options(parser)
        add_json_option(parser, "print the result as one JSON object")
        parser.set_defaults(handler=handler)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from ..demo import running_guest
    from ..errors import MigrationFailed
    from ..migration import MigrationCapabilities
    from ..savevm.outgoing import OutgoingMigration
    from ..transports import FileAddress
    from ..units import parse_size

    address = FileAddress(args.file, parse_size(args.offset, what="--offset"))
    specs, command = guest_setup(args)
    capabilities = MigrationCapabilities()
    capabilities.set("mapped-ram", not args.stream)

    async def main() -> tuple[dict[str, Any], Exception | None]:
        async with running_guest(specs, command) as (guest, blocks):
            await trio.sleep(args.warmup)
            outgoing = OutgoingMigration(guest, blocks, capabilities=capabilities)
            error: Exception | None = None
            async with progress_shown(outgoing.query):
                try:
                    await outgoing.run(address.uri)
                except MigrationFailed as exc:
                    error = exc
            info = outgoing.query()
            info["file"] = address.path
            info["mapped-ram"] = not args.stream
            if error is None and args.keep_running:
                await guest.cont()
                await trio.sleep(args.run_after)
                await guest.stop()
                verdict = await guest.verify()
                info["verified"] = verdict.verified
                info["verdict"] = verdict.raw
            info["guest"] = {"running": bool(args.keep_running and error is None)}
            return info, error

    info, error = trio.run(main)
    if report_outcome(info, error, args.json):
        return 1
    if args.keep_running and not info.get("verified"):
        report_error(f"the guest did not run on consistently: {info['verdict'].get('detail')}")
        return 1
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from .._trio import open_nursery, sole_error
    from ..demo import verify_destination
    from ..errors import ConfigError
    from ..guest.host import GuestProcess
    from ..inspect.walker import BadStreamFile
    from ..loadvm.incoming import IncomingMigration
    from ..transports import FileAddress
    from ..units import parse_size
    from .file import BadSnapshot, NotMappedRam
    from .restore import Restore

    offset = parse_size(args.offset, what="--offset")
    specs, command = guest_setup(args)

    async def main() -> dict[str, Any]:
        guest = await GuestProcess.start(command)  # up first, as QEMU's -incoming
        restore = Restore(args.file, specs, guest, offset=offset, lazy=args.lazy)
        try:
            async with open_nursery() as nursery:
                await nursery.start(restore.run)
            await trio.sleep(args.run_after)
            info = await restore.report()
            await guest.stop()
            verdict = await guest.verify()
            info["verified"] = verdict.verified
            info["verdict"] = verdict.raw
            return info
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await guest.aclose()
            restore.close()

    async def from_stream() -> dict[str, Any]:
        """A file without mapped-ram: the plain stream, loaded as an incoming migration."""
        incoming = IncomingMigration(specs, guest_command=command)
        try:
            await incoming.listen_and_run(FileAddress(args.file, offset).uri)
            verdict = await verify_destination(incoming, args.run_after)
            info = incoming.query()
            info["mode"] = "eager (stream)"
            info["verified"] = bool(verdict and verdict.verified)
            info["verdict"] = verdict.raw if verdict else {}
            return info
        finally:
            await incoming.aclose()

    try:
        try:
            info = trio.run(main)
        except Exception as exc:
            if args.lazy or not isinstance(sole_error(exc), NotMappedRam):
                raise
            info = trio.run(from_stream)
    except Exception as exc:
        bad = sole_error(exc)
        if isinstance(bad, NotMappedRam):
            raise ConfigError(f"{bad}: --lazy needs a snapshot saved with mapped-ram") from None
        if not isinstance(bad, (BadStreamFile, BadSnapshot)):
            raise
        report_error(str(bad))  # it names the file offset
        if args.json:
            print_json({"status": "failed", "error-desc": str(bad), "error-offset": bad.offset})
        return 1
    report(info, args.json)
    if not info["verified"]:
        report_error(
            f"the restored guest did not verify its memory: {info['verdict'].get('detail')}"
        )
        return 1
    return 0
