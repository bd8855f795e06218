"""The README's examples run as written (only sizes, ports and paths are adapted)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _section_code(heading: str, language: str) -> str:
    text = README.read_text()
    match = re.search(rf"## {re.escape(heading)}\n.*?```{language}\n(.*?)```", text, re.S)
    assert match, f"README has no {language} block under {heading!r}"
    return match.group(1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_fresh_machine_commands_are_first() -> None:
    """The first two commands install and run the demo, then install and run the tests."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert "pip install . && trimig demo" in blocks[0]
    assert "pip install '.[test]' && python3 -m pytest" in blocks[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci


def test_trio_program_example_runs(tmp_path: Path) -> None:
    code = _section_code("From a trio program", "python").replace("256 << 20", "16 << 20")
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'status': 'completed'" in result.stdout
    assert "consistent with device state" in result.stdout


def test_two_process_example_runs(tmp_path: Path) -> None:
    code = _section_code("Two processes, one migration", "sh")
    port = _free_port()
    incoming_cmd, migrate_cmd = (
        line.split("#")[0].strip().rstrip("&").strip() for line in code.strip().splitlines()
    )

    def argv(command: str) -> list[str]:
        words = command.replace(":4444", f":{port}").replace("256M", "16M").split()
        assert words[0] == "trimig"
        return [sys.executable, "-m", "trimig.cli", *words[1:], "--json"]

    incoming = subprocess.Popen(
        argv(incoming_cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert incoming.stderr is not None
        assert "listening" in incoming.stderr.readline()
        migrate = subprocess.run(
            argv(migrate_cmd), capture_output=True, text=True, timeout=120, check=False
        )
        assert migrate.returncode == 0, migrate.stderr[-2000:]
        out, err = incoming.communicate(timeout=120)
    finally:
        if incoming.poll() is None:
            incoming.kill()
            incoming.wait()
    assert incoming.returncode == 0, err[-2000:]
    assert '"verified": true' in out
