"""A small guest-like child for the kernel tests (run as a script, not collected).

Usage: uffd_child.py SOCKET_FD MEMFD SIZE MODE HUGETLB

It maps MEMFD (SIZE bytes, shared), creates its own userfaultfd, registers the
mapping in MODE ("missing" or "wp"), and sends {"address", "pid"} with the uffd
attached (SCM_RIGHTS) over the SOCK_SEQPACKET socket SOCKET_FD. Then it serves one
JSON command per packet:

* {"op": "write", "offsets": [...], "value": v}  -> {"ok": true}
* {"op": "read", "offsets": [...]}               -> {"values": [...]}
* {"op": "digest", "offset": o, "length": n}     -> {"sha256": hex}
* {"op": "exit"}                                  -> exits

Reads and writes of missing pages block until the parent resolves them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

from trimig.kernel import Feature, Mapping, Mode, Userfaultfd


def main() -> None:
    sock_fd, memfd, size = (int(value) for value in sys.argv[1:4])
    mode, hugetlb = sys.argv[4], sys.argv[5] == "1"
    sock = socket.socket(fileno=sock_fd)
    mapping = Mapping(memfd, size)
    uffd = Userfaultfd.create()
    if mode == "missing":
        features = Feature.MISSING_SHMEM | Feature.THREAD_ID
        if hugetlb:
            features |= Feature.MISSING_HUGETLBFS
        uffd.api(features)
        uffd.register(mapping.address, size, Mode.MISSING)
    elif mode == "wp":
        uffd.api(Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM)
        uffd.register(mapping.address, size, Mode.WP)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    hello = {"address": mapping.address, "pid": os.getpid()}
    socket.send_fds(sock, [json.dumps(hello).encode()], [uffd.fileno()])
    buffer = mapping.buffer
    while True:
        packet = sock.recv(65536)
        if not packet:
            return
        command = json.loads(packet)
        op = command["op"]
        reply: dict[str, object]
        if op == "write":
            for offset in command["offsets"]:
                buffer[offset] = command["value"]
            reply = {"ok": True}
        elif op == "read":
            reply = {"values": [buffer[offset] for offset in command["offsets"]]}
        elif op == "digest":
            start = command["offset"]
            data = bytes(buffer[start : start + command["length"]])
            reply = {"sha256": hashlib.sha256(data).hexdigest()}
        elif op == "exit":
            return
        else:
            reply = {"error": f"unknown op {op!r}"}
        sock.send(json.dumps(reply).encode())


if __name__ == "__main__":
    main()
