"""One migration of bench/vs_qemu.py through QMP, the same sequence on either engine pair
(QEMU's or trimig's), and its figures."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from vs_qemu_engines import GIB, TIMEOUT, Engine, SampleFailed, Setup, parse_case

MAX_BANDWIDTH = 100 * GIB  # migrate-set-parameters max-bandwidth, bytes/s
POLL = 0.01  # query-migrate interval, s
TLS_CREDS_ID = "tls0"
TLS_HOSTNAME = "localhost"  # in the test certificates (tests/tls_certs.py), as 127.0.0.1


def timestamp(event: Any) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


async def set_up_tls(setup: Setup, source: Engine, destination: Engine) -> None:
    """The same tls-creds-x509 objects and parameters on either engine."""
    for engine, endpoint in ((source, "client"), (destination, "server")):
        await engine.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": TLS_CREDS_ID,
                "dir": setup.tls_dir(),
                "endpoint": endpoint,
                "verify-peer": True,
            },
        )
        parameters = {"tls-creds": TLS_CREDS_ID}
        if engine is source:
            parameters["tls-hostname"] = TLS_HOSTNAME
        await engine.execute("migrate-set-parameters", parameters)


async def wait_status(engine: Engine, what: str, memory: Any = None) -> dict[str, Any]:
    """query-migrate every POLL s until the migration ends; ``memory.sample()`` each time."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        info: dict[str, Any] = await engine.execute("query-migrate")
        if memory is not None:
            memory.sample()
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if time.monotonic() > deadline:
            raise SampleFailed(f"{what}: no end after {TIMEOUT:.0f} s: {info}")
        await asyncio.sleep(POLL)


async def qmp_migration(setup: Setup, kind: str, case: str) -> dict[str, Any]:
    postcopy, _, transport = parse_case(case)
    source = await setup.start(kind, "source", running=postcopy)
    try:
        destination = await setup.start(kind, "destination", running=postcopy)
    except BaseException:
        await source.close()
        raise
    try:
        return await _migrate(setup, kind, case, source, destination, transport, postcopy)
    finally:
        await destination.close()
        await source.close()


async def _migrate(
    setup: Setup,
    kind: str,
    case: str,
    source: Engine,
    destination: Engine,
    transport: str,
    postcopy: bool,
) -> dict[str, Any]:
    capabilities = [{"capability": "events", "state": True}]
    if postcopy:
        capabilities.append({"capability": "postcopy-ram", "state": True})
        if setup.args.preempt:
            capabilities.append({"capability": "postcopy-preempt", "state": True})
    for engine in (source, destination):
        await engine.execute("migrate-set-capabilities", {"capabilities": capabilities})
        await engine.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    if parse_case(case)[1]:
        await set_up_tls(setup, source, destination)
    if transport == "unix":
        uri = f"unix:{setup.path('migration.sock')}"
        await destination.execute("migrate-incoming", {"uri": uri})
    else:
        await destination.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        address = (await destination.execute("query-migrate"))["socket-address"][0]
        uri = f"tcp:{address['host']}:{address['port']}"
    await asyncio.sleep(setup.args.settle)
    for engine in (source, destination):
        engine.events.clear()
    cpu_before = {"source": source.cpu(), "destination": destination.cpu()}
    from engine_memory import PeakMemory  # bench/

    memory = PeakMemory({"source": source.process.pid, "destination": destination.process.pid})
    started = time.monotonic()
    await source.execute("migrate", {"uri": uri})
    if postcopy:
        await source.execute("migrate-start-postcopy")
    info = await wait_status(source, f"{kind} {case} source", memory)
    cpu_after = {"source": source.cpu()}
    source_wall = time.monotonic() - started
    if info["status"] != "completed":
        with contextlib.suppress(Exception):
            incoming = await destination.execute("query-migrate")
            info["destination-error-desc"] = incoming.get("error-desc")
        raise SampleFailed(
            f"{kind} {case}: the migration ended {info['status']}: {info.get('error-desc')}; "
            f"the destination: {info.get('destination-error-desc')}"
        )
    for _ in range(100):
        # QEMU 7.2 says completed a moment before it sets total-time and downtime (0 until
        # then: migration_calculate_complete runs after the state change)
        if info.get("total-time"):
            break
        await asyncio.sleep(POLL)
        info = await source.execute("query-migrate")
    incoming = await wait_status(destination, f"{kind} {case} destination", memory)
    cpu_after["destination"] = destination.cpu()
    destination_wall = time.monotonic() - started
    # the RESUME may follow the destination's completed by a moment
    stop = resume = None
    deadline = time.monotonic() + 5
    seen: list[Any] = []
    while time.monotonic() < deadline:
        seen += [("source", event) for event in source.events.clear()]
        seen += [("destination", event) for event in destination.events.clear()]
        stops = [e for side, e in seen if side == "source" and e["event"] == "STOP"]
        resumes = [e for side, e in seen if side == "destination" and e["event"] == "RESUME"]
        if stops and resumes:
            stop, resume = timestamp(stops[0]), timestamp(resumes[0])
            break
        await asyncio.sleep(POLL)
    verified = None
    if kind == "trimig" and setup.args.verify:
        verified = (await destination.execute("x-guest-verify"))["verified"]
        if not verified:
            raise SampleFailed(f"trimig {case}: the destination guest did not verify its memory")
    ram = info.get("ram", {})
    transferred = int(ram.get("transferred", 0))
    total_ms = float(info.get("total-time", 0))
    gib = transferred / GIB if transferred else float("nan")
    cpu = {
        f"{side}_{part}_s": round(cpu_after[side][part] - cpu_before[side][part], 3)
        for side in ("source", "destination")
        for part in ("all", "engine")
    }
    sample: dict[str, Any] = {
        "status": info["status"],
        "total_ms": total_ms,
        "setup_ms": info.get("setup-time"),
        "downtime_ms": info.get("downtime"),
        "transferred": transferred,
        "throughput_MBps": transferred / total_ms / 1000 if total_ms else float("nan"),
        "mbps": ram.get("mbps"),
        "pause_ms": (resume - stop) * 1000 if stop is not None and resume is not None else None,
        "source_wall_s": round(source_wall, 3),
        "destination_wall_s": round(destination_wall, 3),
        **cpu,
        **memory.figures(),
        **{key.replace("_s", "_s_per_gib"): value / gib for key, value in cpu.items()},
        "events": [
            (side, event["event"], timestamp(event), event.get("data", {}).get("status"))
            for side, event in seen
        ],
        "verified": verified,
        "source_query": info,
        "destination_query": incoming,
    }
    for name in ("x-postcopy-latency-p50", "x-postcopy-latency-p99", "postcopy-latency"):
        if name in incoming:
            sample[name.replace("x-", "").replace("-", "_") + "_us"] = incoming[name] / 1000
    if "postcopy-blocktime" in incoming:
        sample["blocktime_ms"] = incoming["postcopy-blocktime"]
    return sample
