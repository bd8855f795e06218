"""Postcopy across a real link that goes down: two network namespaces joined by a veth
pair, one ``trimig run`` engine in each (``ip netns exec``), driven over QMP on unix
sockets (the file system is shared, so the root namespace reaches them) by the
unmodified qemu.qmp client, the adversarial guest checking every page.

* ``ip link set down`` mid-postcopy, then up again: both sides pause (TCP_USER_TIMEOUT
  and x-channel-timeout: nothing crosses the link), then recover by themselves
  (x-postcopy-auto-recover) and the guest verifies;
* down for good: both sides paused within the bound, both engines quit promptly, no
  process is left in either namespace, and the suite's leak check holds.

The test creates and removes the namespaces; it skips, naming why, where the kernel or
the ip tool lacks them (or it is not root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from adversarial_harness import TRIMIG, _connect, guest_command
from qemu.qmp import QMPClient

CHANNEL_TIMEOUT_MS = 2000
#: How long after the link goes down both sides may take to report postcopy-paused.
PAUSE_BOUND = CHANNEL_TIMEOUT_MS / 1000 + 15.0
DEADLINE = 150.0
PORT = 4444


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True, timeout=20)


@contextlib.contextmanager
def linked_namespaces() -> Iterator[tuple[str, str, str, str]]:
    """Two fresh namespaces joined by a veth pair, 10.77.x.1 (source) and .2 (destination);
    yields (source namespace, destination namespace, the source's veth, the destination's
    address). Skips if they cannot be made; removes them at the end."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("the ip tool (iproute2) is not installed")
    tag = uuid.uuid4().hex[:6]
    src, dst = f"tmsrc{tag}", f"tmdst{tag}"
    veth_src, veth_dst = f"tms{tag}", f"tmd{tag}"
    subnet = f"10.77.{int(tag[:2], 16)}"
    made: list[str] = []
    try:
        try:
            for namespace in (src, dst):
                _ip("netns", "add", namespace)
                made.append(namespace)
            pair = ("type", "veth", "peer", veth_dst, "netns", dst)
            _ip("link", "add", veth_src, "netns", src, *pair)
        except subprocess.CalledProcessError as error:
            pytest.skip(f"cannot make namespaces joined by veth here: {error.stderr.strip()}")
        for namespace, veth, address in ((src, veth_src, "1"), (dst, veth_dst, "2")):
            _ip("-n", namespace, "addr", "add", f"{subnet}.{address}/30", "dev", veth)
            _ip("-n", namespace, "link", "set", veth, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield src, dst, veth_src, f"{subnet}.2"
    finally:
        for namespace in made:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", namespace)  # the veth pair goes with it


class NsEngine:
    """``trimig run`` in a namespace, its QMP socket in ``directory`` (as _Engine)."""

    def __init__(self, namespace: str, directory: str, name: str, args: list[str]) -> None:
        self.namespace = namespace
        self.path = os.path.join(directory, f"{name}.sock")
        self.log = os.path.join(directory, f"{name}.log")
        guest = [*guest_command(hash(name) & 0xFFFF, 100.0), "--lazy"]
        with open(self.log, "wb") as log:
            command = [*TRIMIG, "run", "--qmp", f"unix:{self.path}", *args, "--", *guest]
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, *command],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def stderr(self) -> str:
        with open(self.log, errors="replace") as file:
            return file.read()


def _pids(namespace: str) -> list[str]:
    result = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=20
    )
    return result.stdout.split()


async def _wait(client: QMPClient, wanted: set[str], timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = await client.execute("query-migrate")
        if info.get("status") in wanted:
            return dict(info)
        assert time.monotonic() < deadline, f"{what}: still {info.get('status')}: {info}"
        await asyncio.sleep(0.05)


async def _scenario(comes_back: bool, directory: str) -> None:
    with linked_namespaces() as (src_ns, dst_ns, veth, address):
        layout = ["--ram", "64M"]
        dst = NsEngine(dst_ns, directory, "dst", [*layout, "--incoming", "defer"])
        src = NsEngine(src_ns, directory, "src", layout)
        clients: list[QMPClient] = []
        deadline = time.monotonic() + DEADLINE
        try:
            d = await _connect(dst, deadline)  # type: ignore[arg-type]
            clients.append(d)
            s = await _connect(src, deadline)  # type: ignore[arg-type]
            clients.append(s)
            caps = [{"capability": "postcopy-ram", "state": True}]
            for client in (d, s):
                await client.execute("migrate-set-capabilities", {"capabilities": caps})
                await client.execute(
                    "migrate-set-parameters",
                    {
                        "x-channel-timeout": CHANNEL_TIMEOUT_MS,
                        "x-postcopy-auto-recover": 20 if comes_back else 0,
                        "x-postcopy-recover-backoff": 200,
                    },
                )
            await s.execute(
                "migrate-set-parameters",
                {"max-bandwidth": 32 << 20, "max-postcopy-bandwidth": 4 << 20},
            )
            await d.execute("migrate-incoming", {"uri": f"tcp:{address}:{PORT}"})
            await asyncio.sleep(0.3)
            await s.execute("migrate", {"uri": f"tcp:{address}:{PORT}"})
            await asyncio.sleep(0.2)
            await s.execute("migrate-start-postcopy")
            await _wait(s, {"postcopy-active"}, 60, "source switching")
            await _wait(d, {"postcopy-active"}, 60, "destination switching")
            await asyncio.sleep(0.5)
            _ip("-n", src_ns, "link", "set", veth, "down")  # the cable is pulled
            cut = time.monotonic()
            await _wait(s, {"postcopy-paused"}, PAUSE_BOUND, "source after the link went down")
            await _wait(d, {"postcopy-paused"}, PAUSE_BOUND, "destination after it")
            assert time.monotonic() - cut < PAUSE_BOUND
            if comes_back:
                await asyncio.sleep(1.0)
                _ip("-n", src_ns, "link", "set", veth, "up")
                source = await _wait(s, {"completed"}, DEADLINE / 2, "source recovering")
                destination = await _wait(d, {"completed"}, 30, "destination recovering")
                assert source.get("x-postcopy-recoveries", 0) >= 1, source
                assert destination.get("x-postcopy-recoveries", 0) >= 1, destination
                await asyncio.sleep(0.2)  # the moved guest writes on there
                verify = await d.execute("x-guest-verify")
                assert verify["verified"], verify
            else:
                await asyncio.sleep(CHANNEL_TIMEOUT_MS / 1000)  # and stay paused
                assert (await s.execute("query-migrate"))["status"] == "postcopy-paused"
                assert (await d.execute("query-migrate"))["status"] == "postcopy-paused"
        except BaseException:
            print(f"destination:\n{dst.stderr()[-3000:]}\nsource:\n{src.stderr()[-3000:]}")
            raise
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.execute("quit")
                with contextlib.suppress(Exception):
                    await client.disconnect()
            # Nothing hangs: both engines (and their guests) end promptly on quit.
            ended = [engine.process.wait(20) for engine in (src, dst)]
            left = _pids(src_ns) + _pids(dst_ns)
            for engine in (src, dst):
                if engine.process.poll() is None:
                    engine.process.kill()
                    engine.process.wait(10)
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
        assert ended == [0, 0], ended
        assert not left, f"processes left in the namespaces: {left}"


@pytest.mark.parametrize("comes_back", [True, False], ids=["down-then-up", "down-for-good"])
def test_link_down_mid_postcopy(comes_back: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="tmns") as directory:
        asyncio.run(_scenario(comes_back, directory))
