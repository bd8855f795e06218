"""The QMP command table: one implementation of each command, shared by the QMP server, the
CLI and embedded use.

:func:`execute_command` checks the arguments against the command's schema and runs its
handler against an :class:`~trimig.qmp.api.EngineControl`. Every failure is a
:class:`~trimig.qmp.protocol.QmpError`: ``CommandNotFound`` for an unknown name,
``GenericError`` for bad arguments (QEMU's wording) and for any ``TrimigError`` the engine
raises (its text as ``desc``).

``qmp_capabilities`` is a session-level command; the server handles it while negotiating.
Run here (after negotiation) it fails as QEMU's does in command mode.
"""

from __future__ import annotations

import shlex
import types
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs

from .. import __version__
from ..errors import TrimigError
from .api import EngineControl
from .protocol import COMMAND_NOT_FOUND, GENERIC_ERROR, QmpError
from .schema import AnyValue, Boolean, Enum, ListOf, Member, String, Struct, Union

Handler = Callable[[EngineControl, dict[str, Any]], Awaitable[Any]]

#: The version trimig reports (query-version and the greeting). ``qemu`` is the QEMU release
#: whose QMP shapes trimig follows; ``package`` names trimig itself.
QMP_SHAPES_VERSION: Final = (11, 0, 0)


def version_info() -> dict[str, Any]:
    """``VersionInfo``: ``{"qemu": {"major", "minor", "micro"}, "package": "trimig X.Y.Z"}``."""
    major, minor, micro = QMP_SHAPES_VERSION
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"trimig {__version__}",
    }


@attrs.frozen
class CommandSpec:
    """One QMP command. ``reply_first``: the server sends ``{"return": {}}`` before running the
    handler (``quit``, whose handler may tear the server down)."""

    name: str
    arguments: Struct
    handler: Handler
    reply_first: bool = False


# --- argument schemas -------------------------------------------------------------------------

#: Only ``oob`` exists in QEMU; trimig does not offer it (the greeting lists no capability).
QMP_CAPABILITIES = ("oob",)

_SOCKET_ADDRESS = Union(
    "type",
    {
        "inet": Struct({"host": Member(String()), "port": Member(String())}),
        "unix": Struct({"path": Member(String())}),
        "vsock": Struct({"cid": Member(String()), "port": Member(String())}),
        "fd": Struct({"str": Member(String())}),
    },
)
_MIGRATION_ADDRESS = Union(
    "transport",
    {
        "socket": _SOCKET_ADDRESS,
        "exec": Struct({"args": Member(ListOf(String()))}),
        "rdma": Struct({"host": Member(String()), "port": Member(String())}),
        "file": Struct({"filename": Member(String()), "offset": Member(AnyValue())}),
    },
)
_CHANNEL = Struct(
    {
        "channel-type": Member(Enum(("main", "cpr"))),
        "addr": Member(_MIGRATION_ADDRESS),
    }
)
_CHANNELS = Member(ListOf(_CHANNEL), optional=True)
_NO_ARGUMENTS = Struct()


def _migration_target(**extra: Member) -> Struct:
    """The arguments of ``migrate`` and ``migrate-incoming``: the other end as ``uri`` or
    ``channels`` (read with :func:`migration_uri`), and the command's ``extra`` ones."""
    return Struct({"uri": Member(String(), optional=True), "channels": _CHANNELS, **extra})


# --- URI / channels -----------------------------------------------------------------------------


def _channel_to_uri(addr: dict[str, Any]) -> str:
    """Turn a checked MigrationAddress into the equivalent URI."""
    transport = addr["transport"]
    if transport == "socket":
        kind = addr["type"]
        if kind == "inet":
            host = addr["host"]
            host = f"[{host}]" if ":" in host else host
            return f"tcp:{host}:{addr['port']}"
        if kind == "unix":
            return f"unix:{addr['path']}"
        raise QmpError(GENERIC_ERROR, f"socket address type '{kind}' is not supported by trimig")
    if transport == "exec":
        args = addr["args"]
        if not args:
            raise QmpError(GENERIC_ERROR, "Parameter 'args' must not be empty")
        if len(args) == 3 and args[:2] == ["/bin/sh", "-c"]:
            return f"exec:{args[2]}"  # the form QEMU itself makes from an exec: URI
        return "exec:" + shlex.join(args)
    if transport == "file":
        offset = addr["offset"]
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise QmpError(GENERIC_ERROR, "Parameter 'offset' expects uint64")
        return f"file:{addr['filename']}" + (f",offset={offset}" if offset else "")
    if transport == "rdma":
        host = addr["host"]
        host = f"[{host}]" if ":" in host else host
        return f"rdma:{host}:{addr['port']}"
    raise QmpError(GENERIC_ERROR, f"migration transport '{transport}' is not supported by trimig")


def migration_uri(arguments: dict[str, Any]) -> str:
    """The URI from ``uri`` or ``channels`` (exactly one of them; one ``main`` channel)."""
    uri, channels = arguments.get("uri"), arguments.get("channels")
    if uri is not None and channels is not None:
        raise QmpError(
            GENERIC_ERROR,
            "'uri' and 'channels' arguments are mutually exclusive; "
            "exactly one of the two should be present",
        )
    if uri is not None:
        return str(uri)
    if channels is None:
        raise QmpError(GENERIC_ERROR, "Either 'uri' or 'channels' argument should be present")
    mains = [channel for channel in channels if channel["channel-type"] == "main"]
    if len(channels) != 1 or len(mains) != 1:
        raise QmpError(GENERIC_ERROR, "'channels' must hold exactly one channel, of type 'main'")
    return _channel_to_uri(mains[0]["addr"])


# --- handlers -------------------------------------------------------------------------------------


async def _qmp_capabilities(engine: EngineControl, args: dict[str, Any]) -> Any:
    raise QmpError(
        COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored"
    )


async def _query_commands(engine: EngineControl, args: dict[str, Any]) -> Any:
    return [{"name": name} for name in COMMANDS]


async def _query_version(engine: EngineControl, args: dict[str, Any]) -> Any:
    return version_info()


async def _migrate(engine: EngineControl, args: dict[str, Any]) -> Any:
    await engine.migrate(migration_uri(args), resume=bool(args.get("resume")))
    return {}


async def _migrate_pause(engine: EngineControl, args: dict[str, Any]) -> Any:
    engine.migrate_pause()
    return {}


async def _migrate_recover(engine: EngineControl, args: dict[str, Any]) -> Any:
    await engine.migrate_recover(str(args["uri"]))
    return {}


async def _migrate_incoming(engine: EngineControl, args: dict[str, Any]) -> Any:
    await engine.migrate_incoming(migration_uri(args))
    return {}


async def _migrate_set_capabilities(engine: EngineControl, args: dict[str, Any]) -> Any:
    capabilities: dict[str, bool] = {}
    for entry in args["capabilities"]:
        capabilities[entry["capability"]] = entry["state"]  # later entries win, as in QEMU
    engine.set_capabilities(capabilities)
    return {}


async def _migrate_set_parameters(engine: EngineControl, args: dict[str, Any]) -> Any:
    engine.set_parameters(dict(args))
    return {}


async def _query_migrate_capabilities(engine: EngineControl, args: dict[str, Any]) -> Any:
    return engine.query_capabilities()


async def _query_migrate_parameters(engine: EngineControl, args: dict[str, Any]) -> Any:
    return engine.query_parameters()


async def _migrate_start_postcopy(engine: EngineControl, args: dict[str, Any]) -> Any:
    engine.start_postcopy()
    return {}


async def _migrate_cancel(engine: EngineControl, args: dict[str, Any]) -> Any:
    engine.cancel()
    return {}


async def _query_migrate(engine: EngineControl, args: dict[str, Any]) -> Any:
    return engine.query_migrate()


async def _query_status(engine: EngineControl, args: dict[str, Any]) -> Any:
    return engine.query_status()


async def _stop(engine: EngineControl, args: dict[str, Any]) -> Any:
    await engine.stop()
    return {}


async def _cont(engine: EngineControl, args: dict[str, Any]) -> Any:
    await engine.cont()
    return {}


async def _x_guest_verify(engine: EngineControl, args: dict[str, Any]) -> Any:
    return await engine.verify_guest()


async def _x_dump_bitmaps(engine: EngineControl, args: dict[str, Any]) -> Any:
    return engine.dump_bitmaps()


async def _object_add(engine: EngineControl, args: dict[str, Any]) -> Any:
    engine.object_add(dict(args))
    return {}


async def _object_del(engine: EngineControl, args: dict[str, Any]) -> Any:
    engine.object_del(args["id"])
    return {}


async def _quit(engine: EngineControl, args: dict[str, Any]) -> Any:
    await engine.quit()
    return {}


def _table(*specs: CommandSpec) -> Mapping[str, CommandSpec]:
    return types.MappingProxyType({spec.name: spec for spec in specs})


#: Every command trimig serves, by QEMU name (read-only).
COMMANDS: Final[Mapping[str, CommandSpec]] = _table(
    CommandSpec(
        "qmp_capabilities",
        Struct({"enable": Member(ListOf(Enum(QMP_CAPABILITIES)), optional=True)}),
        _qmp_capabilities,
    ),
    CommandSpec("query-commands", _NO_ARGUMENTS, _query_commands),
    CommandSpec("query-version", _NO_ARGUMENTS, _query_version),
    CommandSpec("migrate", _migration_target(resume=Member(Boolean(), optional=True)), _migrate),
    CommandSpec(
        "migrate-incoming",
        # exit-on-error is accepted for compatibility; trimig's engine never exits on a
        # failed load.
        _migration_target(**{"exit-on-error": Member(Boolean(), optional=True)}),
        _migrate_incoming,
    ),
    CommandSpec(
        "migrate-set-capabilities",
        Struct(
            {
                "capabilities": Member(
                    ListOf(Struct({"capability": Member(String()), "state": Member(Boolean())}))
                )
            }
        ),
        _migrate_set_capabilities,
    ),
    CommandSpec("migrate-set-parameters", Struct(open=True), _migrate_set_parameters),
    CommandSpec("query-migrate-capabilities", _NO_ARGUMENTS, _query_migrate_capabilities),
    CommandSpec("query-migrate-parameters", _NO_ARGUMENTS, _query_migrate_parameters),
    CommandSpec("migrate-start-postcopy", _NO_ARGUMENTS, _migrate_start_postcopy),
    CommandSpec("migrate_cancel", _NO_ARGUMENTS, _migrate_cancel),
    CommandSpec("migrate-pause", _NO_ARGUMENTS, _migrate_pause),
    CommandSpec("migrate-recover", Struct({"uri": Member(String())}), _migrate_recover),
    CommandSpec("query-migrate", _NO_ARGUMENTS, _query_migrate),
    CommandSpec("query-status", _NO_ARGUMENTS, _query_status),
    CommandSpec("stop", _NO_ARGUMENTS, _stop),
    CommandSpec("cont", _NO_ARGUMENTS, _cont),
    CommandSpec("x-guest-verify", _NO_ARGUMENTS, _x_guest_verify),
    CommandSpec("x-dump-bitmaps", _NO_ARGUMENTS, _x_dump_bitmaps),
    CommandSpec(
        "object-add",
        Struct({"qom-type": Member(String()), "id": Member(String())}, open=True),
        _object_add,
    ),
    CommandSpec("object-del", Struct({"id": Member(String())}), _object_del),
    CommandSpec("quit", _NO_ARGUMENTS, _quit, reply_first=True),
)


def lookup(name: str) -> CommandSpec:
    """The command called ``name``; QmpError CommandNotFound otherwise."""
    spec = COMMANDS.get(name)
    if spec is None:
        raise QmpError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
    return spec


def check_arguments(spec: CommandSpec, arguments: dict[str, Any]) -> dict[str, Any]:
    """Check ``arguments`` against the command's schema; QmpError GenericError naming the
    argument otherwise. Nothing has run yet when this fails."""
    return spec.arguments.check(arguments, "")


async def run_handler(spec: CommandSpec, engine: EngineControl, arguments: dict[str, Any]) -> Any:
    """Run a command whose arguments were checked; engine errors become GenericError."""
    try:
        return await spec.handler(engine, arguments)
    except QmpError:
        raise
    except TrimigError as exc:
        raise QmpError(GENERIC_ERROR, str(exc)) from exc


async def execute_command(
    engine: EngineControl, name: str, arguments: dict[str, Any] | None = None
) -> Any:
    """Run QMP command ``name`` against ``engine`` (the embedded-API path: no socket)."""
    spec = lookup(name)
    checked = check_arguments(spec, arguments or {})
    return await run_handler(spec, engine, checked)
