"""TLS end to end: two ``trimig run`` engines driven by QEMU's own ``qemu.qmp`` client,
set up the way a QEMU user sets up TLS (object-add tls-creds-x509 and authz-list,
migrate-set-parameters tls-creds/tls-hostname/tls-authz). The refusals come first, each
named on the side that saw it, the source guest running on after each; then a postcopy
with preempt through a loopback proxy that records every byte of both channels: no
plaintext stream header (QEVM, 0x5145564d) crosses the wire."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import subprocess
import tempfile
import time
from typing import Any

import pytest
import trio
import trustme
from adversarial_harness import _connect, _Engine, _until_done
from precopy_harness import TRIMIG, one_json_object, run_trimig
from qemu.qmp import QMPClient
from tls_certs import CLIENT_NAME, write_creds

from trimig.demo import migrate_locally
from trimig.guest.host import workload_command
from trimig.migration import MigrationCapabilities
from trimig.ram_blocks import default_block_specs
from trimig.transports.tls_credentials import TlsCredentials, TlsSettings

DEADLINE = 120.0


class RecordingProxy:
    """Forwards each connection to ``port`` and keeps the bytes each way."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections: list[tuple[bytearray, bytearray]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        record = (bytearray(), bytearray())
        self.connections.append(record)

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, kept: bytearray
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(1 << 16):
                    kept += data
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(OSError):
                sink.close()

        await asyncio.gather(
            pump(reader, upstream_writer, record[0]), pump(upstream_reader, writer, record[1])
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def tls_creds(client: QMPClient, name: str, directory: str, endpoint: str) -> None:
    await client.execute(
        "object-add",
        {
            "qom-type": "tls-creds-x509",
            "id": name,
            "dir": directory,
            "endpoint": endpoint,
            "verify-peer": True,
        },
    )


async def attempt(
    src: QMPClient, dst: QMPClient, *, via: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One migration attempt to the destination (listening afresh); both sides' end."""
    deadline = time.monotonic() + DEADLINE
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = int((await dst.execute("query-migrate"))["socket-address"][0]["port"])
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{via or port}"})
    return await _until_done(src, deadline), await _until_done(dst, deadline)


async def run_scenario(directory: str) -> None:
    ca = trustme.CA()
    good = write_creds(f"{directory}/good", ca)
    foreign = write_creds(f"{directory}/foreign", trustme.CA())
    dst_engine = _Engine(directory, "dst", ["--ram", "32M", "--incoming", "defer"], [])
    src_engine = _Engine(directory, "src", ["--ram", "32M", "--dirty-rate", "64M"], [])
    deadline = time.monotonic() + DEADLINE
    proxy: RecordingProxy | None = None
    try:
        dst = await _connect(dst_engine, deadline)
        src = await _connect(src_engine, deadline)
        await tls_creds(dst, "tls0", good, "server")
        await tls_creds(src, "tls0", good, "client")
        await tls_creds(src, "foreign", foreign, "client")
        await dst.execute(
            "object-add",
            {"qom-type": "authz-list", "id": "nobody", "policy": "deny", "rules": []},
        )
        await dst.execute(
            "object-add",
            {
                "qom-type": "authz-list",
                "id": "auth0",
                "policy": "deny",
                "rules": [{"match": f"CN={CLIENT_NAME},*", "policy": "allow", "format": "glob"}],
            },
        )
        await dst.execute("migrate-set-parameters", {"tls-creds": "tls0", "tls-authz": "auth0"})

        async def refused(source_says: str, destination_says: str) -> None:
            source, destination = await attempt(src, dst)
            print("refused:", source.get("error-desc"), "|", destination.get("error-desc"))
            assert source["status"] == "failed", source
            assert source_says in source.get("error-desc", ""), source
            assert destination["status"] == "failed", destination
            assert destination_says in destination.get("error-desc", ""), destination
            assert (await src.execute("query-status"))["status"] == "running"

        # A foreign CA signed the destination's certificate (the source refuses it).
        await src.execute("migrate-set-parameters", {"tls-creds": "foreign"})
        await refused(
            "not signed by our CA (a foreign CA", "the source refused our certificate: it is not"
        )
        # The destination's certificate is not for the name the source checks.
        await src.execute(
            "migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "elsewhere.example"}
        )
        await refused("does not match the host name", "the source refused our certificate")
        # A plaintext source.
        await src.execute("migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
        await refused("", "the source does not speak TLS")
        # A source whose certificate subject is not on the allow-list.
        await src.execute("migrate-set-parameters", {"tls-creds": "tls0"})
        await dst.execute("migrate-set-parameters", {"tls-authz": "nobody"})
        # In TLS 1.3 the destination checks the source's certificate after the source's
        # handshake is done: the source waits for the session ticket that the destination
        # sends only to a source it lets in.
        await refused(
            "it refused this connection (is this side's certificate subject on its "
            "tls-authz allow-list?)",
            "is not on the allow-list 'nobody'",
        )

        # Now a good one: postcopy with preempt, so two TLS channels, through the proxy.
        await dst.execute("migrate-set-parameters", {"tls-authz": "auth0"})
        caps = [
            {"capability": "postcopy-ram", "state": True},
            {"capability": "postcopy-preempt", "state": True},
        ]
        for client in (src, dst):
            await client.execute("migrate-set-capabilities", {"capabilities": caps})
        await src.execute("migrate-set-parameters", {"x-postcopy-after-passes": 1})
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = int((await dst.execute("query-migrate"))["socket-address"][0]["port"])
        proxy = RecordingProxy(port)
        via = await proxy.start()
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{via}"})
        source = await _until_done(src, deadline)
        destination = await _until_done(dst, deadline)
        assert source["status"] == "completed", source
        assert destination["status"] == "completed", destination
        verdict = await dst.execute("x-guest-verify")
        assert verdict["verified"], verdict
        assert len(proxy.connections) == 2  # the main channel and the preempt channel
        for sent, answered in proxy.connections:
            assert sent[:2] == b"\x16\x03" and answered[:2] == b"\x16\x03"  # TLS handshakes
            assert len(sent) > 1 << 20 or len(answered) > 0
            assert b"QEVM" not in sent and b"QEVM" not in answered
        assert sum(len(sent) for sent, _ in proxy.connections) > 32 << 20  # the RAM went by
        for client in (src, dst):
            with contextlib.suppress(Exception):
                await client.execute("quit")
            with contextlib.suppress(Exception):
                await client.disconnect()
    finally:
        if proxy is not None:
            proxy.close()
        dst_engine.kill()
        src_engine.kill()


def test_tls_between_two_engines_through_qmp() -> None:
    with tempfile.TemporaryDirectory(prefix="tmtls") as directory:
        asyncio.run(run_scenario(directory))


def _incoming(*options: str) -> tuple[subprocess.Popen[str], str]:
    """``trimig incoming tcp:127.0.0.1:0 OPTIONS`` as a process, and the URI it listens on."""
    process = subprocess.Popen(
        [*TRIMIG, "incoming", "tcp:127.0.0.1:0", "--json", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    ready, _, _ = select.select([process.stderr], [], [], 30)
    assert ready, "trimig incoming said nothing"
    line = process.stderr.readline().strip()
    assert line.startswith("trimig: listening on "), line
    return process, line.rpartition(" ")[2]


def test_the_cli_migrates_with_tls_creds_and_names_a_refusal() -> None:
    """``trimig incoming`` / ``trimig migrate`` with --tls-creds: a source whose certificate
    a foreign CA signed is refused, each side naming why; then a good one completes."""
    guest = ("--ram", "16M", "--dirty-rate", "16M")
    with tempfile.TemporaryDirectory(prefix="tmtls") as directory:
        good = write_creds(f"{directory}/good", trustme.CA())
        foreign = write_creds(f"{directory}/foreign", trustme.CA())
        for creds, ok in ((foreign, False), (good, True)):
            incoming, uri = _incoming(*guest, "--tls-creds", good)
            try:
                migrate = run_trimig(
                    "migrate", uri, "--json", "--warmup", "0.1", *guest, "--tls-creds", creds
                )
                out, err = incoming.communicate(timeout=30)
            finally:
                if incoming.poll() is None:
                    incoming.kill()
                incoming.communicate()
            source = one_json_object(migrate.stdout)
            destination = one_json_object(out)
            if ok:
                assert migrate.returncode == 0, migrate.stderr
                assert incoming.returncode == 0, err
                assert destination["verified"] is True, destination
                continue
            assert migrate.returncode != 0 and incoming.returncode != 0
            assert "not signed by our CA (a foreign CA" in source["error-desc"], source
            assert "not signed by our CA (a foreign CA" in migrate.stderr
            assert (
                "the source refused our certificate: it is not signed by a CA it trusts"
                in (destination["error-desc"])
            ), destination


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy-preempt"])
def test_tls_takes_the_thread_paths(
    postcopy: bool, caplog: pytest.LogCaptureFixture, tmp_path: object
) -> None:
    """A TLS migration over tcp is served by the OS-thread fast paths, through the TLS
    thread driver (``TlsThreadStream``): the source's return-path reader, and in postcopy
    the urgent sender, the destination's main listener, urgent reader and fault handler
    (the trace says which loops ran where). The guest verifies its memory after."""
    caplog.set_level(logging.DEBUG, logger="trimig.trace")
    creds = write_creds(f"{tmp_path}/creds", trustme.CA())
    tls = (
        TlsSettings(TlsCredentials("c", creds, endpoint="client"), hostname="localhost"),
        TlsSettings(TlsCredentials("s", creds, endpoint="server")),
    )
    capabilities = MigrationCapabilities()
    if postcopy:
        capabilities.set("postcopy-ram", True)
        capabilities.set("postcopy-preempt", True)
    result = trio.run(
        functools.partial(
            migrate_locally,
            default_block_specs(32 << 20),
            transport="tcp",
            guest_command=workload_command(dirty_rate="32M"),
            capabilities=capabilities,
            postcopy_after_first_pass=postcopy,
            tls=tls,
        )
    )
    assert result.ok, result.to_json()
    traced = {r.getMessage() for r in caplog.records if r.name == "trimig.trace"}
    threads = {m for m in traced if "_thread" in m.split()[0]}
    expected = {"return_path_thread stream=TlsThreadStream"}
    if postcopy:
        expected |= {
            f"postcopy_thread loop={loop} stream=TlsThreadStream"
            for loop in ("urgent sender", "urgent reader", "main listener")
        } | {"postcopy_thread loop=fault handler"}
    assert threads == expected, traced
