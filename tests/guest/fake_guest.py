"""Misbehaving and minimal guests for the host-handle tests, speaking the guest protocol
directly with the socket module (no trimig import): ``python fake_guest.py MODE``.

Modes:
  minimal            a complete minimal guest: answers ping/query/stop/cont/quit, fails
                     everything else with "ok": false (what a C guest would do)
  exit-on-request    says hello, then on the first request writes to stderr and exits 3
  silent             says hello, then reads requests and never answers (exits at EOF)
  wedged             says hello, then never reads again (a guest stuck in its work)
  slow               like minimal, but answers each request only after 0.4 s
  slower             the same after 2 s
  no-hello           never says anything
  exit-before-hello  writes to stderr and exits 7
  bad-hello          says {"hello": 99}
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def main() -> int:
    mode = sys.argv[1]
    if mode == "exit-before-hello":
        print("fake guest: cannot start", file=sys.stderr)
        return 7
    sock = socket.socket(fileno=int(os.environ["TRIMIG_GUEST_FD"]))
    if mode == "no-hello":
        time.sleep(3600)
    if mode == "bad-hello":
        sock.send(json.dumps({"hello": 99, "pid": os.getpid()}).encode())
        time.sleep(3600)
    sock.send(json.dumps({"hello": 1, "pid": os.getpid()}).encode())
    if mode == "wedged":
        time.sleep(3600)
    running = False
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 65536, 253)
        for fd in fds:
            os.close(fd)
        if not data:
            return 0
        request = json.loads(data)
        if mode == "exit-on-request":
            print(f"fake guest: dying on purpose at {request['cmd']}", file=sys.stderr)
            return 3
        if mode == "silent":
            continue
        if mode == "slow":
            time.sleep(0.4)
        elif mode == "slower":
            time.sleep(2.0)
        command = request["cmd"]
        reply: dict[str, object] = {"reply": request["id"], "ok": True}
        if command in ("ping", "quit"):
            pass
        elif command == "query":
            reply["running"] = running
            reply["blocks"] = []
        elif command in ("stop", "cont"):
            running = command == "cont"
            reply["running"] = running
        else:
            reply = {"reply": request["id"], "ok": False, "error": f"{command}: not supported"}
        sock.send(json.dumps(reply).encode())
        if command == "quit":
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
