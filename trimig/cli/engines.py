"""The commands that run an engine in this process: ``trimig demo`` (the source here, the
destination in a child ``trimig incoming``), the two-process flow (``trimig incoming URI``
on one side, ``trimig migrate URI`` on the other), ``trimig run`` (an engine served over
QMP) and ``trimig probe``.

The engine's modules (numpy, the kernel bindings, the guest handle) are imported inside
the commands, so that registering these does not slow the control commands down.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import trio

from .._trio import open_nursery
from ..errors import ConfigError
from ..migration import TRANSPORT_NAMES
from . import control
from .options import (
    add_guest_options,
    add_migration_options,
    add_tls_options,
    add_warmup_option,
    guest_setup,
    migration_settings,
    tls_settings,
)
from .output import (
    note,
    one_line,
    print_json,
    progress_shown,
    report,
    report_error,
    report_outcome,
)

log = logging.getLogger("trimig.cli")
T = TypeVar("T")

#: Signals that shut a ``trimig run`` engine down cleanly (as ``quit`` does).
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: What :func:`until_signalled` records for the exit of the parent (not a signal number).
PARENT_EXITED = 0


def add_engine_commands(sub: Any) -> None:
    """Register demo, run, incoming, migrate and probe on the main CLI's sub-parsers."""
    demo = sub.add_parser(
        "demo",
        help="migrate a running built-in guest on this machine",
        description="Start a guest (after '--'; default the built-in workload guest), let it "
        "run, migrate it to a child `trimig incoming` over --transport, and have the moved "
        "guest verify its memory. With rdma (an in-process fabric) or --one-process the "
        "destination engine runs in this process.",
    )
    demo.add_argument(
        "--transport",
        choices=TRANSPORT_NAMES,
        default="unix",
        help="the stream's transport (default unix); rdma is an in-process fabric",
    )
    demo.add_argument(
        "--one-process",
        action="store_true",
        help="run the destination engine in this process too (both engines share one "
        "interpreter, as with rdma)",
    )
    add_warmup_option(demo)

    run = sub.add_parser(
        "run",
        help="run an engine with its guest, controlled over a QMP socket",
        description="Start an engine and its guest (after '--'; default the built-in workload "
        "guest) and serve QMP on a unix socket. A destination adds --incoming.",
    )
    run.add_argument("--qmp", required=True, metavar="unix:PATH", help="QMP control socket")
    run.add_argument(
        "--incoming",
        metavar="URI|defer",
        help="wait for a migration (on URI, or after migrate-incoming)",
    )

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
    incoming.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop, as on SIGHUP, once the process that started this one exits (trimig demo "
        "runs its destination so: a demo killed outright leaves nothing behind)",
    )

    migrate = sub.add_parser(
        "migrate",
        help="start a guest here and migrate it to URI (or, with --qmp, ask an engine to)",
        description="Start the guest (after '--', default: the built-in workload guest), let it "
        "run, then migrate it to URI where `trimig incoming` listens.",
    )
    migrate.add_argument("uri")
    add_warmup_option(migrate)
    migrate.add_argument(
        "--qmp", metavar="PATH", help="drive the engine serving QMP at PATH instead"
    )
    control.add_resume_option(migrate)

    # Each starts a guest; all but `run` (set over QMP) take the migration options.
    for parser, handler in (
        (demo, _cmd_demo),
        (run, _cmd_run),
        (incoming, _cmd_incoming),
        (migrate, _cmd_migrate),
    ):
        add_guest_options(parser)
        add_tls_options(parser)
        if parser is not run:
            add_migration_options(parser)
        parser.set_defaults(handler=handler)

    probe = sub.add_parser("probe", help="report the kernel features trimig uses")
    probe.set_defaults(handler=_cmd_probe)


def unverified(detail: str | None) -> str:
    """The failure of a moved guest that did not verify its memory."""
    if detail is None:
        return "the moved guest did not verify its memory"
    return f"the moved guest did not verify its memory: {detail}"


# --- demo ---------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import migrate_locally

    specs, command = guest_setup(args)
    capabilities, parameters = migration_settings(args)
    if args.tls_creds and not args.tls_hostname:
        args.tls_hostname = "localhost"  # both ends are on this machine
    source_tls, destination_tls = tls_settings(args, "client"), tls_settings(args, "server")
    tls = (source_tls, destination_tls) if source_tls and destination_tls else None
    received: list[int] = []
    result = trio.run(
        until_signalled,
        lambda: migrate_locally(
            specs,
            transport=args.transport,
            guest_command=command,
            capabilities=capabilities,
            parameters=parameters,
            warmup=args.warmup,
            progress=progress_shown,
            postcopy_after_first_pass=args.postcopy,
            keep_failure=True,
            tls=tls,
            destination_process=not args.one_process and args.transport != "rdma",
        ),
        received,
    )
    if result is None:  # a signal cancelled it: its guests and processes are gone
        return report_cancelled(received, args.json)
    report(result.to_json(), args.json)
    if result.ok:
        return 0
    if result.error is not None:
        failure = one_line(result.error)
        destination = result.destination.get("error-desc")
        if destination and destination not in failure:
            failure += f"; the destination: {destination}"
    elif result.destination.get("error-desc"):
        failure = f"the destination failed: {result.destination['error-desc']}"
    else:
        failure = unverified(result.verdict.detail if result.verdict else None)
    report_error(failure)
    return 1


# --- the two-process flow -----------------------------------------------------------------------


def _cmd_incoming(args: argparse.Namespace) -> int:
    from ..demo import receive, verify_destination
    from ..loadvm.incoming import IncomingMigration

    specs, command = guest_setup(args)
    capabilities, parameters = migration_settings(args)
    tls = tls_settings(args, "server")

    async def main() -> dict[str, Any]:
        incoming = IncomingMigration(
            specs,
            guest_command=command,
            capabilities=capabilities,
            parameters=parameters,
            listen_options={"tls": tls} if tls else None,
        )
        try:
            async with open_nursery() as nursery:
                address = await nursery.start(receive, incoming, args.uri)
                note(f"listening on {address}")
            verdict = await verify_destination(incoming, args.run_after)
            info = incoming.query()
            info["verified"] = bool(verdict and verdict.verified)
            info["verdict"] = verdict.raw if verdict else None
            return info
        finally:
            await incoming.aclose()

    received: list[int] = []
    with _parent_watch(args.exit_with_parent) as parent:
        info = trio.run(functools.partial(until_signalled, main, received, parent=parent))
    if info is None:
        return report_cancelled(received, args.json)
    report(info, args.json)
    if info["verified"]:
        return 0
    if info.get("error-desc"):
        report_error(f"incoming migration failed: {info['error-desc']}")
    else:
        report_error(unverified((info.get("verdict") or {}).get("detail")))
    return 1


def _cmd_migrate(args: argparse.Namespace) -> int:
    if args.qmp:
        if args.tls_creds:
            raise ConfigError(
                "--tls-creds with --qmp: the engine's TLS is its own (trimig run --tls-creds, "
                "or object-add and migrate-set-parameters tls-creds)"
            )
        return control.migrate_over_qmp(args.qmp, args.uri, as_json=args.json, resume=args.resume)
    if args.resume:
        raise ConfigError("--resume recovers a paused postcopy of an engine: give --qmp PATH")
    from ..demo import running_guest
    from ..errors import MigrationFailed, MigrationPaused, TrimigError
    from ..savevm.outgoing import OutgoingMigration
    from ..savevm.recovery import survive
    from ..transports import parse_uri

    address = parse_uri(args.uri)  # a bad URI is an error before any guest starts

    specs, command = guest_setup(args)
    capabilities, parameters = migration_settings(args)
    tls = tls_settings(args, "client")
    if tls is not None:
        from ..transports.tls import check_client_settings

        check_client_settings(tls, address)  # before any guest starts

    async def main() -> tuple[dict[str, Any], Exception | None]:
        async with running_guest(specs, command) as (guest, blocks):
            await trio.sleep(args.warmup)
            outgoing = OutgoingMigration(
                guest,
                blocks,
                capabilities=capabilities,
                parameters=parameters,
                connect_options={"tls": tls} if tls else None,
            )
            error: Exception | None = None
            async with progress_shown(outgoing.query):
                try:
                    # With --postcopy, survive network breaks (x-postcopy-auto-recover).
                    await survive(
                        outgoing,
                        args.uri,
                        attempts=parameters.x_postcopy_auto_recover,
                        backoff=parameters.x_postcopy_recover_backoff / 1000,
                    )
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

    received: list[int] = []
    outcome = trio.run(until_signalled, main, received)
    if outcome is None:  # a signal cancelled it: the guest is stopped and gone
        return report_cancelled(received, args.json)
    info, error = outcome
    return report_outcome(info, error, args.json)


# --- an engine served over QMP ------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    """Serve an engine over QMP until ``quit`` or a shutdown signal; 0 after a clean shutdown.

    Either way the migration (if any) is cancelled, the guest quit and reaped, and the QMP
    socket file removed.
    """
    from ..engine import open_engine
    from ..qmp.server import QmpServer, check_socket_path
    from ..transports import parse_uri

    path = args.qmp[len("unix:") :] if args.qmp.startswith("unix:") else args.qmp
    if not path or (path is args.qmp and ":" in path.split("/", 1)[0]):
        raise ConfigError(f"--qmp {args.qmp!r}: expected unix:PATH (QMP is served on unix sockets)")
    check_socket_path(path)  # before the guest starts: a socket in use is an error at once
    specs, command = guest_setup(args)
    if args.incoming and args.incoming != "defer":
        parse_uri(args.incoming)  # before starting anything
    tls_object = None
    if args.tls_creds:
        # The engine's object tls0, as `-object tls-creds-x509,id=tls0,...` would make it.
        endpoint = "server" if args.incoming else "client"
        tls_object = {"qom-type": "tls-creds-x509", "id": "tls0", "dir": args.tls_creds}
        tls_object["endpoint"] = endpoint
        tls_settings(args, endpoint)  # files checked before starting anything
    received: list[int] = []

    async def serve() -> None:
        async with (
            open_engine(specs, command, incoming=args.incoming is not None) as engine,
            open_nursery() as nursery,
        ):
            if tls_object is not None:
                engine.object_add(tls_object)
                engine.set_parameters({"tls-creds": "tls0", "tls-hostname": args.tls_hostname})
            await nursery.start(QmpServer(engine).serve_unix, path)
            if args.incoming and args.incoming != "defer":
                await engine.migrate_incoming(args.incoming)
                note(f"waiting for a migration on {engine.incoming_address}")
            note(f"engine ready, QMP on unix:{path}")
            await engine.quit_requested.wait()
            nursery.cancel_scope.cancel()

    trio.run(until_signalled, serve, received)
    if received:
        note(f"terminating on signal {signal.Signals(received[0]).name}")
    return 0


async def until_signalled(
    body: Callable[[], Awaitable[T]], received: list[int], *, parent: int | None = None
) -> T | None:
    """``body()``, cancelled (its cleanup running as for any cancellation) if one of
    SHUTDOWN_SIGNALS arrives first: its number is appended to ``received``, None returned.
    With ``parent`` (a pidfd, :func:`_parent_watch`), that process's exit cancels it too,
    recorded as PARENT_EXITED."""
    result = None
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        async with open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    received.append(signum)
                    nursery.cancel_scope.cancel()
                    return

            async def stop_on_parent_exit(pidfd: int) -> None:
                await trio.lowlevel.wait_readable(pidfd)
                received.append(PARENT_EXITED)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            if parent is not None:
                nursery.start_soon(stop_on_parent_exit, parent)
            result = await body()
            nursery.cancel_scope.cancel()
    return result


def report_cancelled(received: list[int], as_json: bool) -> int:
    """Say why :func:`until_signalled` cancelled a command (stderr, and ``--json``'s status
    ``cancelled``); its exit status, 128 + the signal (SIGHUP for PARENT_EXITED: the
    process it ran under hung up)."""
    if received[0] == PARENT_EXITED:
        signum, message = int(signal.SIGHUP), "the process that started it exited"
    else:
        signum = received[0]
        message = f"terminated by signal {signal.Signals(signum).name}"
    report_error(message)
    if as_json:
        print_json({"status": "cancelled", "error-desc": message})
    return 128 + signum


@contextlib.contextmanager
def _parent_watch(wanted: bool) -> Iterator[int | None]:
    """A pidfd of our parent while the block runs (None unless ``wanted``); a parent that
    has exited already is a ConfigError, before any guest starts."""
    if not wanted:
        yield None
        return
    from ..errors import KernelError
    from ..kernel.process import open_parent_pidfd

    try:
        pidfd = open_parent_pidfd()
    except KernelError as exc:
        raise ConfigError(f"--exit-with-parent: {exc}") from exc
    try:
        yield pidfd
    finally:
        os.close(pidfd)


def _cmd_probe(args: argparse.Namespace) -> int:
    from ..kernel.probe import probe

    print(probe().describe())
    return 0
