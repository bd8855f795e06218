"""Postcopy recovery through QMP: two ``trimig run`` engines (the adversarial guest, which
checks every page) driven by QEMU's own ``qemu.qmp`` client, a cutting proxy between them
(tests/cutting_proxy.py), cuts at random points after the switch and QEMU's recovery
sequence: ``migrate-recover`` on the destination, ``migrate`` with ``resume: true`` on the
source. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import tempfile
import time
from typing import Any

import attrs
from adversarial_harness import TRIMIG, _connect, _Engine, guest_command
from cutting_proxy import CuttingProxy
from qemu.qmp import QMPClient

#: x-channel-timeout of both engines in these runs (ms).
CHANNEL_TIMEOUT_MS = 2000
#: How long after a cut both sides may take to report postcopy-paused.
PAUSE_BOUND = CHANNEL_TIMEOUT_MS / 1000 + 20.0
#: Bounds one whole run.
DEADLINE = 240.0
#: How a cut is made: the proxy goes silent, resets, or migrate-pause on either side.
CUTS = ("hole", "reset", "pause-source", "pause-destination")
#: One channel only (tests/cutting_proxy.py): the main connection, or the preempt one.
CHANNEL_CUTS = ("hole main", "reset main", "hole preempt", "reset preempt")


@attrs.frozen
class RecoveryPlan:
    """One migration with cuts: ``cuts`` pairs of (seconds after postcopy-active or the
    last recovery, how)."""

    seed: int
    preempt: bool = True
    transport: str = "tcp"
    ram: str = "256M"
    huge: str = "0"
    rate: float = 100.0
    postcopy_bandwidth: int = 8 << 20
    cuts: tuple[tuple[float, str], ...] = ((0.5, "hole"),)
    #: A recovery attempt that fails first (the source resumes to a dead address).
    failed_attempt: bool = False
    #: x-postcopy-auto-recover on both engines: no QMP recovery, the proxy only comes
    #: back up (after ``outage`` seconds) and the engines re-establish the channels.
    auto: bool = False
    outage: float = 0.5
    #: Recover with the CLI (trimig recover / trimig migrate --qmp --resume / trimig
    #: info verify) instead of QMP commands.
    via_cli: bool = False
    #: Every channel over TLS (tls-creds-x509 objects on both engines, as in QEMU).
    tls: bool = False

    @classmethod
    def random(cls, seed: int, *, cuts: int | None = None) -> RecoveryPlan:
        rng = random.Random(seed)
        count = cuts if cuts is not None else rng.choice((1, 1, 2, 3))
        return cls(
            seed=seed,
            preempt=rng.random() < 0.6,
            transport=rng.choice(("tcp", "tcp", "unix")),
            huge=rng.choice(("0", "0", "4M")),
            rate=rng.choice((50.0, 100.0, 300.0)),
            postcopy_bandwidth=rng.choice((4 << 20, 8 << 20, 16 << 20)),
            cuts=tuple((round(rng.uniform(0.05, 1.5), 3), rng.choice(CUTS)) for _ in range(count)),
            failed_attempt=rng.random() < 0.2,
        )


@attrs.define
class RecoveryResult:
    plan: RecoveryPlan
    source: dict[str, Any] = attrs.field(factory=dict)
    destination: dict[str, Any] = attrs.field(factory=dict)
    verify: dict[str, Any] = attrs.field(factory=dict)
    #: Per cut: (seconds until both paused, statuses seen).
    pauses: list[float] = attrs.field(factory=list)
    recoveries: int = 0
    failed_attempts: int = 0
    error: str = ""
    stderr: str = ""
    #: The engines' QMP socket paths (source, destination), for the CLI.
    paths: tuple[str, str] = ("", "")

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.source.get("status") == "completed"
            and self.destination.get("status") == "completed"
            and bool(self.verify.get("verified"))
        )

    def describe(self) -> str:
        return (
            f"{self.plan}: error {self.error!r}; source {self.source.get('status')} "
            f"{self.source.get('error-desc', '')}; destination "
            f"{self.destination.get('status')} {self.destination.get('error-desc', '')}; "
            f"verify {self.verify}; pauses {self.pauses}; engines' stderr:\n"
            f"{self.stderr[-4000:]}"
        )


async def _status(client: QMPClient) -> str:
    return str((await client.execute("query-migrate")).get("status"))


async def _wait_status(
    client: QMPClient, wanted: set[str], timeout: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = await client.execute("query-migrate")
        if info.get("status") in wanted:
            return dict(info)
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {info.get('status')} after {timeout:g} s: {info}")
        await asyncio.sleep(0.02)


def _listen_uri(plan: RecoveryPlan, directory: str, name: str) -> str:
    if plan.transport == "unix":
        return f"unix:{directory}/{name}.sock"
    return "tcp:127.0.0.1:0"


async def _listening(d: QMPClient, listen: str) -> str:
    """The address the destination listens on (the bound port of a tcp port 0)."""
    if not listen.startswith("tcp:"):
        return listen
    port = (await d.execute("query-migrate"))["socket-address"][0]["port"]
    return f"tcp:127.0.0.1:{port}"


async def _recover(
    s: QMPClient, d: QMPClient, proxy: CuttingProxy, result: RecoveryResult, directory: str
) -> None:
    """QEMU's recovery: migrate-recover on the destination, the proxy forwarding to it
    again, migrate resume=true on the source; both back in postcopy-active (or done)."""
    listen = _listen_uri(result.plan, directory, f"recover{result.recoveries}")
    if result.plan.via_cli:
        await _trimig("recover", result.paths[1], listen)
    else:
        await d.execute("migrate-recover", {"uri": listen})
    proxy.send(f"target {await _listening(d, listen)}")
    proxy.send("up")
    if result.plan.failed_attempt and not result.failed_attempts:
        # Nothing listens there: the attempt fails and the source is paused again.
        await s.execute("migrate", {"uri": "tcp:127.0.0.1:1", "resume": True})
        await _wait_status(s, {"postcopy-paused"}, PAUSE_BOUND, "source after a failed attempt")
        result.failed_attempts += 1
    if result.plan.via_cli:
        await _trimig("migrate", proxy.uri, "--qmp", result.paths[0], "--resume")
    else:
        await s.execute("migrate", {"uri": proxy.uri, "resume": True})
    done = {"postcopy-active", "completed"}
    await _wait_status(s, done, PAUSE_BOUND, "source recovering")
    await _wait_status(d, done, PAUSE_BOUND, "destination recovering")
    result.recoveries += 1


async def _trimig(*arguments: str) -> dict[str, Any]:
    """Run ``trimig ARGUMENTS... --json`` (a control command); its JSON output."""
    process = await asyncio.create_subprocess_exec(
        *TRIMIG, *arguments, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode != 0:
        raise AssertionError(f"trimig {' '.join(arguments)} failed: {err.decode()}")
    return dict(json.loads(out.decode() or "{}"))


async def _cut(
    s: QMPClient, d: QMPClient, proxy: CuttingProxy, how: str, result: RecoveryResult
) -> bool:
    """Cut; False if the migration completed before (nothing to cut)."""
    if await _status(s) == "completed":
        return False
    if how.split()[0] in ("hole", "reset"):
        proxy.send(how)
        return True
    client = s if how == "pause-source" else d
    try:
        if result.plan.via_cli:
            await _trimig("pause", result.paths[0 if how == "pause-source" else 1])
        else:
            await client.execute("migrate-pause")
    except Exception as exc:  # it completed meanwhile
        if "completed" in str(exc):
            return False
        raise
    proxy.send("reset")  # the other side's connection goes too, as when a network dies
    return True


async def _tls_creds(s: QMPClient, d: QMPClient, directory: str) -> None:
    """Both engines use TLS on every channel (certificates for 127.0.0.1 and localhost)."""
    import trustme
    from tls_certs import write_creds

    creds = write_creds(f"{directory}/tls", trustme.CA())
    for client, endpoint in ((d, "server"), (s, "client")):
        await client.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": "tls0",
                "dir": creds,
                "endpoint": endpoint,
                "verify-peer": True,
            },
        )
        await client.execute("migrate-set-parameters", {"tls-creds": "tls0"})


async def _run(plan: RecoveryPlan, directory: str) -> RecoveryResult:
    result = RecoveryResult(plan)
    deadline = time.monotonic() + DEADLINE
    layout = ["--ram", plan.ram, "--huge", plan.huge]
    # --lazy: the destination guest faults its pages in as it writes, so postcopy lasts and
    # the cuts land while pages are missing; x-guest-verify checks every page at the end.
    guest = [*guest_command(plan.seed, plan.rate), "--lazy"]
    dst = _Engine(directory, "dst", [*layout, "--incoming", "defer"], guest)
    src = _Engine(directory, "src", layout, guest)
    proxy: CuttingProxy | None = None
    result.paths = (src.path, dst.path)
    clients: list[QMPClient] = []
    try:
        d = await _connect(dst, deadline)
        clients.append(d)
        s = await _connect(src, deadline)
        clients.append(s)
        caps = [
            {"capability": "postcopy-ram", "state": True},
            {"capability": "postcopy-preempt", "state": plan.preempt},
        ]
        if plan.tls:
            await _tls_creds(s, d, directory)
        for client in (d, s):
            await client.execute("migrate-set-capabilities", {"capabilities": caps})
            await client.execute(
                "migrate-set-parameters",
                {
                    "x-channel-timeout": CHANNEL_TIMEOUT_MS,
                    "x-postcopy-auto-recover": 20 if plan.auto else 0,
                    "x-postcopy-recover-backoff": 200,
                },
            )
        # A slow precopy, then a slow background stream: most pages are still to come
        # when the cuts land.
        await s.execute(
            "migrate-set-parameters",
            {"max-bandwidth": 32 << 20, "max-postcopy-bandwidth": plan.postcopy_bandwidth},
        )
        listen = _listen_uri(plan, directory, "incoming")
        await d.execute("migrate-incoming", {"uri": listen})
        proxy = CuttingProxy(_listen_uri(plan, directory, "proxy"), await _listening(d, listen))
        await asyncio.sleep(0.3)  # the source guest runs (and writes) a while first
        await s.execute("migrate", {"uri": proxy.uri})
        await asyncio.sleep(0.2)
        await s.execute("migrate-start-postcopy")
        await _wait_status(s, {"postcopy-active", "completed"}, 60, "source switching")
        await _wait_status(d, {"postcopy-active", "completed"}, 60, "destination switching")
        for delay, how in plan.cuts:
            await asyncio.sleep(delay)
            cut_at = time.monotonic()
            if not await _cut(s, d, proxy, how, result):
                break
            await _wait_status(s, {"postcopy-paused"}, PAUSE_BOUND, f"source after {how}")
            await _wait_status(d, {"postcopy-paused"}, PAUSE_BOUND, f"destination after {how}")
            result.pauses.append(round(time.monotonic() - cut_at, 2))
            if plan.auto:
                await asyncio.sleep(plan.outage)
                proxy.send("up")  # the network comes back: the engines recover by themselves
                done = {"postcopy-active", "completed"}
                await _wait_status(s, done, PAUSE_BOUND, "source recovering by itself")
                await _wait_status(d, done, PAUSE_BOUND, "destination recovering by itself")
                result.recoveries += 1
            else:
                await _recover(s, d, proxy, result, directory)
        remaining = max(5.0, deadline - time.monotonic())
        result.source = await _wait_status(s, {"completed"}, remaining, "source completing")
        result.destination = await _wait_status(d, {"completed"}, 30, "destination completing")
        await asyncio.sleep(0.2)  # the moved guest goes on writing there
        if plan.via_cli:
            result.verify = await _trimig("info", "verify", dst.path)
        else:
            result.verify = dict(await d.execute("x-guest-verify"))
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        for name, client in (("source", clients[1:2]), ("destination", clients[:1])):
            for c in client:
                with contextlib.suppress(Exception):
                    info = await c.execute("query-migrate")
                    setattr(result, name, dict(info))
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.execute("quit")
            with contextlib.suppress(Exception):
                await client.disconnect()
        for engine in (dst, src):
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.process.wait(15)
        result.stderr = dst.stderr() + src.stderr()
        dst.kill()
        src.kill()
        if proxy is not None:
            proxy.close()
    return result


def migrate_with_cuts(plan: RecoveryPlan) -> RecoveryResult:
    """Run ``plan`` end to end; the result says what happened (never raises for a failed run)."""
    with tempfile.TemporaryDirectory(prefix="tmrec") as directory:
        return asyncio.run(_run(plan, directory))
