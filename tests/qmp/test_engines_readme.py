"""The README's two-engine section, run as written (paths, port and size swapped)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile

import trio
from engine_processes import (
    RAM,
)

# --- the README's two-engine section, run as written (paths, port and size swapped) ---------


README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def _readme_snippets() -> tuple[str, str]:
    """The shell and the Python snippet of the README's "Two engines driven over QMP"."""
    with open(README) as file:
        text = file.read()
    section = text[text.index("## Two engines driven over QMP") :]
    shell = section[section.index("```sh\n") + 6 :]
    python = section[section.index("```python\n") + 10 :]
    return shell[: shell.index("```")], python[: python.index("```")]


async def _run_script(script: str, directory: str) -> str:
    """Run a bash script in its own process group (killed whole if it hangs); its output."""
    path = os.path.join(directory, "script.sh")
    with open(path, "w") as file:
        file.write("set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script)
    output = os.path.join(directory, "script.out")
    with open(output, "wb") as out:
        process = await trio.lowlevel.open_process(
            ["bash", path], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            with trio.fail_after(60):
                code = await process.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    with open(output, errors="replace") as file:
        text = file.read()
    assert code == 0, text
    return text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_readme_two_engine_snippets_work() -> None:
    shell, python = _readme_snippets()
    with tempfile.TemporaryDirectory(prefix="tmrd") as directory:

        def adapt(text: str) -> str:
            return (
                text.replace("/tmp/src.sock", f"{directory}/src.sock")
                .replace("/tmp/dst.sock", f"{directory}/dst.sock")
                .replace("--ram 256M", f"--ram {RAM}")
            )

        shell = adapt(shell).replace(":4444", f":{_free_port()}")
        output = await _run_script(shell + "wait\n", directory)
        assert "migration to tcp:127.0.0.1:" in output and '"status": "running"' in output
        assert "completed" in output and "dirty syncs (passes)" in output

        script = os.path.join(directory, "migrate.py")
        with open(script, "w") as file:
            file.write(adapt(python))
        start = "".join(
            line + "\n" for line in shell.splitlines() if "--wait" in line or " & " in line
        )
        output = await _run_script(f"{start}{sys.executable} {script}\nwait\n", directory)
        assert "setup\nactive\ndevice\ncompleted\n" in output, output
        assert "'status': 'running'" in output
        assert not os.path.exists(f"{directory}/src.sock")
        assert not os.path.exists(f"{directory}/dst.sock")
