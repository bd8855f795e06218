"""The ``trimig`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from ._trio import open_nursery
from .errors import ConfigError, TrimigError
from .migration import TRANSPORT_NAMES, MigrationCapabilities, MigrationParameters
from .units import parse_rate, parse_size

if TYPE_CHECKING:
    from .ram import RamBlockSpec

# The engine's modules (numpy, the kernel bindings, the guest handle) are imported inside
# the commands that need them, so that control commands such as `trimig ctl` start fast.


def _add_guest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ram", default="1G", help="main RAM block size (default 1G)")
    parser.add_argument(
        "--huge",
        default="0",
        help="size of an extra hugetlb (2 MiB pages) RAM block (default none)",
    )
    parser.add_argument(
        "--dirty-rate",
        default="256M",
        help="bytes/s the built-in guest dirties; 'max' for as fast as it can (default 256M)",
    )
    parser.add_argument(
        "--fill", choices=("random", "zero"), default="random", help="initial RAM contents"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random fill")


def _add_migration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-bandwidth", default="0", help="bytes/s, 0 = unlimited (default)")
    parser.add_argument("--downtime-limit", type=int, default=300, help="ms (default 300)")
    parser.add_argument(
        "--postcopy", action="store_true", help="switch to postcopy after the first pass"
    )
    parser.add_argument(
        "--no-preempt",
        action="store_true",
        help="with --postcopy: urgent pages share the main channel (no postcopy-preempt)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _migration_settings(
    args: argparse.Namespace,
) -> tuple[MigrationCapabilities, MigrationParameters]:
    capabilities = MigrationCapabilities()
    parameters = MigrationParameters()
    parameters.set("max-bandwidth", parse_rate(args.max_bandwidth, what="--max-bandwidth"))
    parameters.set("downtime-limit", args.downtime_limit)
    if args.postcopy:
        capabilities.set("postcopy-ram", True)
        capabilities.set("postcopy-preempt", not args.no_preempt)
        parameters.set("x-postcopy-after-passes", 1)
    return capabilities, parameters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimig", description="Live migration of running guests")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="migrate a running built-in guest on this machine")
    demo.add_argument("--transport", choices=TRANSPORT_NAMES, default="unix")
    demo.add_argument("--warmup", type=float, default=0.5, help="seconds the guest runs first")
    _add_guest_options(demo)
    _add_migration_options(demo)
    demo.set_defaults(handler=_cmd_demo)

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
    _add_guest_options(run)
    run.set_defaults(handler=_cmd_run)

    probe = sub.add_parser("probe", help="report the kernel features trimig uses")
    probe.set_defaults(handler=_cmd_probe)

    try:
        from .qmp.cli import add_control_commands
    except ImportError:  # the control plane is optional at import time
        pass
    else:
        add_control_commands(sub)
    try:
        from .twoproc import add_two_process_commands
    except ImportError:
        pass
    else:
        add_two_process_commands(sub, _add_guest_options, _add_migration_options)
    return parser


def guest_setup(args: argparse.Namespace) -> tuple[list[RamBlockSpec], list[str]]:
    """The RAM layout (``--ram``, ``--huge``) and the guest command: the words after ``--``,
    or the built-in workload with ``--dirty-rate``, ``--fill`` and ``--seed``."""
    from .guest.host import workload_command
    from .ram import default_block_specs

    specs = default_block_specs(
        parse_size(args.ram, what="--ram"), huge=parse_size(args.huge, what="--huge")
    )
    command = list(getattr(args, "guest_command", None) or []) or workload_command(
        dirty_rate=parse_rate(args.dirty_rate, what="--dirty-rate"), fill=args.fill, seed=args.seed
    )
    return specs, command


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import migrate_locally

    specs, command = guest_setup(args)
    capabilities, parameters = _migration_settings(args)
    result = trio.run(
        lambda: migrate_locally(
            specs,
            transport=args.transport,
            guest_command=command,
            capabilities=capabilities,
            parameters=parameters,
            warmup=args.warmup,
            progress=True,
            postcopy_after_first_pass=args.postcopy,
            keep_failure=True,
        )
    )
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


def unverified(detail: str | None) -> str:
    """The failure of a moved guest that did not verify its memory."""
    if detail is None:
        return "the moved guest did not verify its memory"
    return f"the moved guest did not verify its memory: {detail}"


def report(info: dict[str, Any], as_json: bool) -> None:
    """Print the final statistics: a table for people, one JSON object for programs."""
    from .progress import statistics_table

    if as_json:
        print(json.dumps(info, sort_keys=True), flush=True)
        return
    extra = {k: v for k, v in info.items() if k in ("verified",)}
    verdict = info.get("verdict") or {}
    if verdict.get("detail"):
        extra["verdict"] = verdict["detail"]
    for key, value in (info.get("guest") or {}).items():
        extra[f"guest.{key}"] = value
    body = {
        k: v for k, v in info.items() if k not in ("verified", "verdict", "destination", "guest")
    }
    print(statistics_table(body, extra), flush=True)


def one_line(exc: BaseException) -> str:
    """What went wrong, in one line: the error's text, with its cause when that adds to it,
    and the errors of a group (several tasks failed) joined."""
    from ._trio import sole_error

    exc = sole_error(exc)
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(one_line(inner) for inner in exc.exceptions)
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        if detail and detail not in text:
            text += f": {detail}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def report_error(message: str) -> None:
    """Name a failure on stderr: one line, ``trimig: error: ...``."""
    print(f"trimig: error: {message}", file=sys.stderr, flush=True)


#: Signals that shut a ``trimig run`` engine down cleanly (as ``quit`` does).
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _cmd_run(args: argparse.Namespace) -> int:
    """Serve an engine over QMP until ``quit`` or a shutdown signal; 0 after a clean shutdown.

    Either way the migration (if any) is cancelled, the guest quit and reaped, and the QMP
    socket file removed.
    """
    from .engine import open_engine
    from .qmp.server import QmpServer, check_socket_path
    from .transports import parse_uri

    path = args.qmp[len("unix:") :] if args.qmp.startswith("unix:") else args.qmp
    if not path or (path is args.qmp and ":" in path.split("/", 1)[0]):
        raise ConfigError(f"--qmp {args.qmp!r}: expected unix:PATH (QMP is served on unix sockets)")
    check_socket_path(path)  # before the guest starts: a socket in use is an error at once
    specs, command = guest_setup(args)
    if args.incoming and args.incoming != "defer":
        parse_uri(args.incoming)  # before starting anything
    received: list[int] = []

    async def serve() -> None:
        async with (
            open_engine(specs, command, incoming=args.incoming is not None) as engine,
            open_nursery() as nursery,
        ):
            await nursery.start(QmpServer(engine).serve_unix, path)
            if args.incoming and args.incoming != "defer":
                await engine.migrate_incoming(args.incoming)
                print(
                    f"trimig: waiting for a migration on {engine.incoming_address}",
                    file=sys.stderr,
                    flush=True,
                )
            print(f"trimig: engine ready, QMP on unix:{path}", file=sys.stderr, flush=True)
            await engine.quit_requested.wait()
            nursery.cancel_scope.cancel()

    async def main() -> None:
        with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            async with open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        received.append(signum)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                await serve()
                nursery.cancel_scope.cancel()

    trio.run(main)
    if received:
        name = signal.Signals(received[0]).name
        print(f"trimig: terminating on signal {name}", file=sys.stderr, flush=True)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from .kernel.probe import probe

    print(probe().describe())
    return 0


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
        from ._trio import sole_error

        message = one_line(exc)
        if not isinstance(sole_error(exc), TrimigError):
            # Not an error trimig raises on purpose: a bug, or an unexpected OS error.
            message = f"{type(sole_error(exc)).__name__}: {message}"
            if args.verbose:
                traceback.print_exc()
            else:
                message += " (run with -v for the traceback)"
        report_error(message)
        if getattr(args, "json", False):
            # Nothing was reported yet: the JSON names the failure as query-migrate does.
            print(json.dumps({"status": "failed", "error-desc": message}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
