"""TLS against plaintext in the same run (not part of the test suite).

Run: python bench/tls.py [--stream-mib 512] [--ram 256M] [--repeats 3] [--postcopy]
[--stream-only]

* stream: ``--stream-mib`` MiB of 4 KiB page views sent with send_buffers over tcp
  loopback and read back with receive_into, plaintext and TLS (stdlib ssl's SSLObject,
  trustme certificates) alternately, ``--repeats`` times each;
* migration: a precopy of a ``--ram`` built-in guest dirtying 64 MiB/s over tcp, plaintext
  and TLS alternately (and postcopy with preempt with ``--postcopy``), total time and
  throughput (postcopy: and the destination's fault latency p50/p99 and blocktime).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import trio
import trustme

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tls_certs import write_creds

from trimig.demo import migrate_locally
from trimig.guest.host import workload_command
from trimig.migration import MigrationCapabilities, MigrationParameters
from trimig.ram_blocks import default_block_specs
from trimig.transports import connect, listen
from trimig.transports.tls_credentials import TlsCredentials, TlsSettings
from trimig.units import parse_size

PAGE = 4096


def tls_pair(directory: str) -> tuple[TlsSettings, TlsSettings]:
    creds = write_creds(os.path.join(directory, "creds"), trustme.CA())
    return (
        TlsSettings(TlsCredentials("c", creds, endpoint="client"), hostname="localhost"),
        TlsSettings(TlsCredentials("s", creds, endpoint="server")),
    )


async def stream_once(
    total: int, tls: tuple[TlsSettings, TlsSettings] | None
) -> tuple[float, float]:
    """Seconds (wall clock, and CPU of this process) to move ``total`` bytes of page views
    from one end to the other. Both ends share one thread, so the CPU time is the cost
    of both ends, and on a loaded machine it is the steadier figure."""
    memory = memoryview(os.urandom(4 << 20))
    batch = [memory[i : i + PAGE] for i in range(0, len(memory), PAGE)]
    async with await listen("tcp:127.0.0.1:0", tls=tls[1] if tls else None) as listener:
        accepted = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _accept(listener, accepted))
            client = await connect(listener.address, tls=tls[0] if tls else None)
        server = accepted[0]
        buffer = memoryview(bytearray(1 << 20))
        start, cpu = time.perf_counter(), time.process_time()

        async def send() -> None:
            for _ in range(total // len(memory)):
                await client.send_buffers(batch)
            await client.send_eof()

        async def receive() -> None:
            while await server.receive_into(buffer):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
        elapsed = time.perf_counter() - start, time.process_time() - cpu
        await client.aclose()
        await server.aclose()
    return elapsed


async def _accept(listener, accepted) -> None:  # type: ignore[no-untyped-def]
    accepted.append(await listener.accept())


async def migration_once(ram: int, tls, postcopy: bool) -> dict:  # type: ignore[no-untyped-def]
    capabilities = MigrationCapabilities()
    if postcopy:
        capabilities.set("postcopy-ram", True)
        capabilities.set("postcopy-preempt", True)
    cpu = time.process_time()
    result = await migrate_locally(
        default_block_specs(ram),
        transport="tcp",
        guest_command=workload_command(dirty_rate="64M"),
        capabilities=capabilities,
        parameters=MigrationParameters(),
        postcopy_after_first_pass=postcopy,
        tls=tls,
    )
    assert result.ok, result.to_json()
    faults = {
        key: result.destination[key]
        for key in ("x-postcopy-latency-p50", "x-postcopy-latency-p99", "postcopy-blocktime")
        if key in result.destination
    }
    return result.source | faults | {"cpu": time.process_time() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stream-mib", type=int, default=512)
    parser.add_argument("--ram", default="256M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postcopy", action="store_true")
    parser.add_argument("--stream-only", action="store_true", help="skip the migrations")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tls = tls_pair(directory)
        total = args.stream_mib << 20
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "tls": []}
        for _ in range(args.repeats):
            times["plain"].append(trio.run(stream_once, total, None))
            times["tls"].append(trio.run(stream_once, total, tls))
        for name, values in times.items():
            wall = statistics.median(value[0] for value in values)
            cpu = statistics.median(value[1] for value in values)
            print(
                f"stream {name:5}  median {wall:.2f} s ({total / wall / 2**20:.0f} MiB/s), "
                f"CPU {cpu:.2f} s ({total / cpu / 2**20:.0f} MiB per CPU second)"
            )
        ram = parse_size(args.ram, what="--ram")
        modes = [] if args.stream_only else [False, True] if args.postcopy else [False]
        for postcopy in modes:
            runs: dict[str, list[dict]] = {"plain": [], "tls": []}
            for _ in range(args.repeats):
                runs["plain"].append(trio.run(migration_once, ram, None, postcopy))
                runs["tls"].append(trio.run(migration_once, ram, tls, postcopy))
            kind = "postcopy" if postcopy else "precopy"
            for name, infos in runs.items():
                total_ms = statistics.median(info["total-time"] for info in infos)
                mbps = statistics.median(info["ram"]["mbps"] for info in infos)
                downtime = statistics.median(info["downtime"] for info in infos)
                cpu = statistics.median(info["cpu"] for info in infos)
                sent = statistics.median(info["ram"]["transferred"] for info in infos) / 2**20
                faults = ""
                if postcopy:
                    p50, p99, blocktime = (
                        statistics.median(info.get(key, 0) for info in infos)
                        for key in (
                            "x-postcopy-latency-p50",
                            "x-postcopy-latency-p99",
                            "postcopy-blocktime",
                        )
                    )
                    faults = (
                        f"  fault latency p50/p99 {p50 / 1000:.0f}/{p99 / 1000:.0f} us, "
                        f"blocktime {blocktime:.0f} ms"
                        if p50
                        else "  no page request completed (no fault latency)"
                    )
                print(
                    f"{kind} {name:5}  total {total_ms:.0f} ms  {mbps:.0f} Mbit/s  "
                    f"downtime {downtime:.0f} ms  {sent:.0f} MiB sent, engines' CPU "
                    f"{cpu:.2f} s ({sent / cpu:.0f} MiB per CPU second){faults}"
                )


if __name__ == "__main__":
    main()
