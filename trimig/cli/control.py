"""The control commands: ``trimig ctl``, ``info``, ``start-postcopy``, ``cancel``,
``watch`` and ``migrate --qmp`` drive a running engine over its QMP socket.

* ``ctl PATH COMMAND [ARG ...]``: any QMP command; ARGs are ``key=value`` pairs or one JSON
  object. A value is kept as text where the command's schema wants a string, else read as
  JSON when it parses (``state=true``, ``downtime-limit=300``) and as text otherwise.
* ``info {migrate,status,capabilities,parameters} PATH``: readable tables; ``info bitmaps
  PATH``: the migration's page bitmaps as text (x-dump-bitmaps).
* ``info verify PATH``: the guest checks its memory (x-guest-verify).
* ``pause PATH`` (migrate-pause), ``recover PATH URI`` (migrate-recover, on the
  destination) and ``migrate --qmp PATH URI --resume`` (migrate resume=true, on the
  source): postcopy recovery.
* ``start-postcopy PATH``, ``cancel PATH``, and ``trimig migrate --qmp PATH URI`` (standalone,
  ``python -m trimig.cli.control migrate PATH URI``).
* ``--wait SECONDS`` on every command: retry connecting while the engine is still starting.
* ``watch PATH``: live progress from MIGRATION/MIGRATION_PASS events plus periodic
  query-migrate, on stderr; exits 0 when the migration completes, 1 if it fails or is
  cancelled (naming why on stderr).

Every command takes ``--json``: machine-readable output on stdout. Each sub-parser sets
``handler`` to a callable ``(argparse.Namespace) -> int`` (the exit status), so the main CLI runs
``args.handler(args)``; :func:`run_control_command` parses and runs one on its own.
Errors (a QMP error reply, no server at PATH) print ``trimig: error: ...`` (one line) on
stderr and return 1; with ``--json`` stdout carries them too, as a QMP error reply.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

import trio

from .._trio import open_nursery
from ..errors import ConfigError, TransportError, TrimigError
from ..qmp import commands
from ..qmp.client import QmpClient, connect_unix
from ..qmp.protocol import Event, QmpError
from ..qmp.schema import String
from .options import add_json_option
from .output import (
    ProgressLine,
    describe,
    format_bitmaps,
    format_capabilities,
    format_migrate_info,
    format_parameters,
    format_status,
    print_json,
    report_error,
)

#: Seconds ``watch`` waits, after a query reported the end, for the final MIGRATION event.
FINAL_EVENT_GRACE = 1.0

#: Statuses after which a migration will not change any more.
FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})

ClientAction = Callable[[QmpClient, argparse.Namespace], Awaitable[int]]


# --- argument parsing -------------------------------------------------------------------------


def parse_command_arguments(command: str, words: Sequence[str]) -> dict[str, Any]:
    """Turn ``key=value`` words, or a single JSON object, into QMP arguments.

    Raises ConfigError naming the bad word.
    """
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        try:
            value = json.loads(words[0])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"arguments are not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError("JSON arguments must be an object")
        return value
    spec = commands.COMMANDS.get(command)
    members = spec.arguments.members if spec is not None else {}
    arguments: dict[str, Any] = {}
    for word in words:
        key, separator, text = word.partition("=")
        if not separator or not key:
            raise ConfigError(f"argument {word!r} is not key=value (or give one JSON object)")
        if key in arguments:
            raise ConfigError(f"argument {key!r} given twice")
        member = members.get(key)
        if member is not None and isinstance(member.type, String):
            arguments[key] = text
            continue
        try:
            arguments[key] = json.loads(text)
        except json.JSONDecodeError:
            arguments[key] = text
    return arguments


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--wait``, which every control command takes."""
    add_json_option(parser, "print machine-readable JSON")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep trying to connect for up to SECONDS while the socket is missing or refuses "
        "(an engine still starting); default: fail at once",
    )


def add_control_commands(subparsers: Any, *, include_migrate: bool = False) -> None:
    """Register ctl, info, start-postcopy, cancel and watch on ``subparsers`` (the object
    ``ArgumentParser.add_subparsers()`` returns), and ``migrate PATH URI`` if
    ``include_migrate``: trimig's main CLI owns ``migrate`` (``trimig migrate --qmp PATH URI``
    comes here through :func:`migrate_over_qmp`)."""
    ctl = subparsers.add_parser("ctl", help="run any QMP command on a running engine")
    ctl.add_argument("path", help="QMP socket of the engine")
    ctl.add_argument("qmp_command", metavar="COMMAND", help="QMP command name, e.g. query-migrate")
    ctl.add_argument("arguments", nargs="*", help="key=value pairs or one JSON object")
    _add_common_flags(ctl)
    ctl.set_defaults(handler=_client_command(_ctl))

    info = subparsers.add_parser("info", help="show migration state as a table")
    info.add_argument("what", choices=sorted(_INFO_COMMANDS), help="what to show")
    info.add_argument("path", help="QMP socket of the engine")
    _add_common_flags(info)
    info.set_defaults(handler=_client_command(_info))

    if include_migrate:
        migrate = subparsers.add_parser("migrate", help="start an outgoing migration")
        migrate.add_argument("path", help="QMP socket of the source engine")
        migrate.add_argument("uri", help="destination, e.g. tcp:HOST:PORT, unix:PATH, exec:CMD")
        add_resume_option(migrate)
        _add_common_flags(migrate)
        migrate.set_defaults(handler=_client_command(_migrate))

    postcopy = subparsers.add_parser("start-postcopy", help="switch a migration to postcopy")
    postcopy.add_argument("path", help="QMP socket of the source engine")
    _add_common_flags(postcopy)
    postcopy.set_defaults(handler=_client_command(_simple("migrate-start-postcopy")))

    pause = subparsers.add_parser(
        "pause", help="break a running postcopy's channels on purpose (migrate-pause)"
    )
    pause.add_argument("path", help="QMP socket of the engine (source or destination)")
    _add_common_flags(pause)
    pause.set_defaults(handler=_client_command(_simple("migrate-pause")))

    recover = subparsers.add_parser(
        "recover",
        help="listen for the source's recovery of a paused postcopy (migrate-recover)",
    )
    recover.add_argument("path", help="QMP socket of the destination engine")
    recover.add_argument("uri", help="where to listen, e.g. tcp:HOST:PORT or unix:PATH")
    _add_common_flags(recover)
    recover.set_defaults(handler=_client_command(_recover))

    cancel = subparsers.add_parser("cancel", help="cancel the running migration")
    cancel.add_argument("path", help="QMP socket of the source engine")
    _add_common_flags(cancel)
    cancel.set_defaults(handler=_client_command(_simple("migrate_cancel")))

    watch = subparsers.add_parser("watch", help="follow a migration until it ends")
    watch.add_argument("path", help="QMP socket of the engine")
    watch.add_argument(
        "--interval", type=float, default=0.5, help="seconds between query-migrate polls"
    )
    _add_common_flags(watch)
    watch.set_defaults(handler=_client_command(_watch))


def run_control_command(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (without the program name) as one control command and run it."""
    parser = argparse.ArgumentParser(prog="trimig", description="control a trimig engine")
    add_control_commands(
        parser.add_subparsers(dest="control_command", required=True), include_migrate=True
    )
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


def add_resume_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        action="store_true",
        help="recover a paused postcopy over a new connection to URI (migrate resume=true)",
    )


def migrate_over_qmp(path: str, uri: str, *, as_json: bool = False, resume: bool = False) -> int:
    """``trimig migrate --qmp PATH URI [--resume]``: have the engine at ``path`` migrate to
    ``uri`` (or, with ``resume``, recover its paused postcopy over it)."""
    args = argparse.Namespace(path=path, uri=uri, json=as_json, wait=0.0, resume=resume)
    return _client_command(_migrate)(args)


def main() -> None:
    sys.exit(run_control_command())


# --- running ------------------------------------------------------------------------------------


def _client_command(action: ClientAction) -> Callable[[argparse.Namespace], int]:
    """Wrap an async action on a connected client as ``func(args) -> exit status``."""

    def run(args: argparse.Namespace) -> int:
        async def connect_and_run() -> int:
            async with connect_unix(args.path, retry_for=getattr(args, "wait", 0.0)) as client:
                return await action(client, args)

        try:
            return trio.run(connect_and_run)
        except KeyboardInterrupt:
            report_error("interrupted")
        except QmpError as exc:
            _fail(
                args, exc.desc if exc.error_class == "GenericError" else str(exc), exc.error_class
            )
        except Exception as exc:  # every failure is named in one line (and in --json)
            _fail(args, describe(exc), type(exc).__name__)
        return 1

    return run


def _fail(args: argparse.Namespace, message: str, error_class: str) -> None:
    """Name a failed command on stderr, and with --json on stdout too, shaped as a QMP
    error reply: ``{"error": {"class": ..., "desc": ...}}`` (the class of a QMP error, or
    of trimig's own, such as TransportError when there is no engine at PATH)."""
    report_error(message)
    if getattr(args, "json", False):
        print_json({"error": {"class": error_class, "desc": message}})


async def _ctl(client: QmpClient, args: argparse.Namespace) -> int:
    arguments = parse_command_arguments(args.qmp_command, args.arguments)
    result = await client.execute(args.qmp_command, arguments)
    if args.json:
        print_json(result)
    elif result != {}:
        print_json(result, indent=2)
    return 0


def _simple(command: str) -> ClientAction:
    async def action(client: QmpClient, args: argparse.Namespace) -> int:
        result = await client.execute(command)
        if args.json:
            print_json(result)
        return 0

    return action


async def _migrate(client: QmpClient, args: argparse.Namespace) -> int:
    resume = bool(getattr(args, "resume", False))
    arguments: dict[str, Any] = {"uri": args.uri, **({"resume": True} if resume else {})}
    result = await client.execute("migrate", arguments)
    if args.json:
        print_json(result)
    elif resume:
        print(f"recovery of the paused postcopy over {args.uri} started")
    else:
        print(f"migration to {args.uri} started")
    return 0


async def _recover(client: QmpClient, args: argparse.Namespace) -> int:
    result = await client.execute("migrate-recover", {"uri": args.uri})
    if args.json:
        print_json(result)
    else:
        print(f"listening for the recovery on {args.uri}")
    return 0


def _format_verify(result: Any) -> str:
    verdict = "yes" if result.get("verified") else "NO"
    return f"verified: {verdict}\ndetail:   {result.get('detail', '')}"


# --- info ------------------------------------------------------------------------------------


_INFO_COMMANDS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "migrate": ("query-migrate", format_migrate_info),
    "status": ("query-status", format_status),
    "capabilities": ("query-migrate-capabilities", format_capabilities),
    "parameters": ("query-migrate-parameters", format_parameters),
    "bitmaps": ("x-dump-bitmaps", format_bitmaps),
    "verify": ("x-guest-verify", _format_verify),
}


async def _info(client: QmpClient, args: argparse.Namespace) -> int:
    command, formatter = _INFO_COMMANDS[args.what]
    result = await client.execute(command)
    if args.json:
        print_json(result)
    else:
        print(formatter(result))
    return 0


# --- watch ------------------------------------------------------------------------------------


async def _watch(client: QmpClient, args: argparse.Namespace) -> int:
    return await watch_migration(client, interval=args.interval, json_output=args.json)


async def watch_migration(
    client: QmpClient,
    *,
    interval: float = 0.5,
    json_output: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Follow the migration until it reaches completed, failed or cancelled.

    Progress goes to ``err`` (stderr); with ``json_output`` every event and query-migrate
    reply goes to ``out`` (stdout) as one JSON line each: ``{"event": ..., "data": ...,
    "timestamp": ...}`` or ``{"query-migrate": {...}}``. Returns 0 for completed, else 1.
    """
    out = out or sys.stdout
    progress = ProgressLine(err or sys.stderr)
    passes: int | None = None
    info: dict[str, Any] = {}
    finished = trio.Event()
    final_event = trio.Event()  # the MIGRATION event with a finished status

    async def poll() -> dict[str, Any]:
        nonlocal info
        info = await client.execute("query-migrate")
        if json_output:
            print_json({"query-migrate": info}, out=out)
        else:
            progress.show(info, passes)
        if info.get("status") in FINISHED_STATUSES:
            finished.set()
        return info

    async def follow_events(events: Any) -> None:
        nonlocal passes
        event: Event
        async for event in events:
            if json_output:
                print_json(
                    {"event": event.name, "data": event.data, "timestamp": event.timestamp},
                    out=out,
                )
            if event.name == "MIGRATION_PASS":
                passes = event.data.get("pass", passes)
            if event.name in ("MIGRATION", "MIGRATION_PASS"):
                await poll()
            if event.name == "MIGRATION" and event.data.get("status") in FINISHED_STATUSES:
                final_event.set()  # after its poll: the output ends with the final statistics
        if not finished.is_set():
            raise TrimigError(f"QMP connection ended: {client.closed_reason}")

    async def poll_periodically() -> None:
        try:
            while True:
                await poll()
                await trio.sleep(interval)
        except TransportError:
            return  # follow_events sees the subscription end and reports it

    async with client.events() as events, open_nursery() as nursery:
        nursery.start_soon(follow_events, events)
        nursery.start_soon(poll_periodically)
        await finished.wait()
        # A query can report the end before its MIGRATION event has reached us: give the
        # event a moment, so the event stream ends with it (it never comes with events off).
        with trio.move_on_after(FINAL_EVENT_GRACE):
            await final_event.wait()
        nursery.cancel_scope.cancel()
    if not json_output:
        progress.finish(info, passes)
    status = info.get("status")
    if status == "completed":
        return 0
    # With --json the last line on stdout is the final query-migrate, error-desc included.
    if info.get("error-desc"):
        report_error(f"migration {status}: {info['error-desc']}")
    else:
        report_error(f"migration {status}")
    return 1


if __name__ == "__main__":
    main()
