"""The rows of bench/vs_qemu.py without QMP: the raw socket limit (bench/raw_socket.py) and
trimig's CLI paths (``trimig incoming`` + ``trimig migrate``, ``trimig demo``)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from vs_qemu_cpu import children_cpu
from vs_qemu_engines import GIB, IDLE_TRIMIG_RATE, TIMEOUT, SampleFailed, Setup

# --- the raw socket limit ------------------------------------------------------------------------


def raw_transfer(setup: Setup, transport: str, memory: str) -> dict[str, Any]:
    region = setup.sender_region()
    import raw_socket  # bench/

    sender_before = time.thread_time()
    result = raw_socket.run_receiver("blocking", transport, region, 1 << 20, memory)
    sender_cpu = time.thread_time() - sender_before
    seconds = result["seconds"]
    gib = len(region) / GIB
    return {
        "memory": memory,
        "total_ms": seconds * 1000,
        "transferred": len(region),
        "throughput_MBps": len(region) / seconds / 1e6,
        "source_all_s": round(sender_cpu, 3),
        "destination_all_s": round(result["cpu_s"], 3),
        "source_all_s_per_gib": sender_cpu / gib,
        "destination_all_s_per_gib": result["cpu_s"] / gib,
    }


# --- the CLI paths: trimig incoming + trimig migrate, trimig demo ---------------------------------


def run_cli(command: Sequence[str], what: str, cwd: str) -> dict[str, Any]:
    """Run a trimig command with --json; its last JSON line."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd)
    output, _ = process.communicate(timeout=TIMEOUT)
    return _last_json(output, what, process.returncode)


def _last_json(output: bytes, what: str, returncode: int | None) -> dict[str, Any]:
    for line in reversed(output.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            if returncode != 0:
                raise SampleFailed(
                    f"{what} exited with {returncode}: {result.get('error', result)}"
                )
            return result
    raise SampleFailed(f"{what} exited with {returncode} and printed no JSON")


def cli_sample(info: dict[str, Any]) -> dict[str, Any]:
    ram = info.get("ram", {})
    transferred = int(ram.get("transferred", 0))
    total_ms = float(info.get("total-time", 0))
    return {
        "status": info.get("status"),
        "verified": info.get("verified"),
        "total_ms": total_ms,
        "downtime_ms": info.get("downtime"),
        "transferred": transferred,
        "throughput_MBps": transferred / total_ms / 1000 if total_ms else float("nan"),
        "mbps": ram.get("mbps"),
    }


def idle_guest_options(setup: Setup) -> list[str]:
    """The options of the CLI rows' commands: the run's idle guest, --json."""
    return [
        "--ram",
        setup.args.ram,
        "--fill",
        "random",
        "--seed",
        str(setup.args.seed),
        "--dirty-rate",
        IDLE_TRIMIG_RATE,
        "--json",
    ]


def two_process(setup: Setup) -> dict[str, Any]:
    """``trimig incoming unix:PATH`` and ``trimig migrate unix:PATH``, idle guests."""
    path = setup.path("cli.sock")
    guest = idle_guest_options(setup)
    cpu_before = children_cpu()
    incoming = subprocess.Popen(
        [*setup.trimig, "incoming", f"unix:{path}", *guest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=setup.workdir,
    )
    try:
        assert incoming.stderr is not None
        line = incoming.stderr.readline().decode(errors="replace")
        while line and "listening on" not in line:
            line = incoming.stderr.readline().decode(errors="replace")
        if not line:
            raise SampleFailed(f"trimig incoming exited with {incoming.wait()} before listening")
        sent = run_cli(
            [*setup.trimig, "migrate", f"unix:{path}", *guest], "trimig migrate", setup.workdir
        )
        output, _ = incoming.communicate(timeout=TIMEOUT)
        received = _last_json(output, "trimig incoming", incoming.returncode)
    finally:
        if incoming.poll() is None:
            incoming.kill()
        incoming.wait()
    sample = cli_sample(sent)
    sample["verified"] = received.get("verified")
    # both commands, start-up (guest start, fill) to exit (verification included)
    sample["commands_cpu_s"] = round(children_cpu() - cpu_before, 3)
    return sample


def demo(setup: Setup) -> dict[str, Any]:
    cpu_before = children_cpu()
    info = run_cli(
        [*setup.trimig, "demo", "--transport", "unix", *idle_guest_options(setup)],
        "trimig demo",
        setup.workdir,
    )
    sample = cli_sample(info)
    sample["commands_cpu_s"] = round(children_cpu() - cpu_before, 3)
    return sample
