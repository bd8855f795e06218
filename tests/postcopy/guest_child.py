"""A tiny guest for the postcopy tests (run as a script, not collected).

Usage: guest_child.py SOCKET_FD

Over the SOCK_SEQPACKET socket SOCKET_FD it receives one packet
{"blocks": [{"name", "size", "hugetlb"}...], "blocking_uffd": bool} with one memfd
per block attached (SCM_RIGHTS). It maps every memfd (shared), creates its own
userfaultfd, registers every mapping for MISSING faults (MISSING_SHMEM, plus
MISSING_HUGETLBFS for hugetlb blocks) and replies {"pid", "addresses": {name: address}}
with the uffd attached, closing its own copy. Then it serves one JSON command per packet:

* {"op": "digest", "block": b, "offsets": [...], "length": n}
      -> {"sha256": [hex of bytes [o, o+n) for each offset]}   (reading may fault)
* {"op": "exit"} -> exits (so does EOF)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

from trimig.kernel import Feature, Mapping, Mode, Userfaultfd


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    packet, fds, _, _ = socket.recv_fds(sock, 65536, 16)
    setup = json.loads(packet)
    blocks = setup["blocks"]
    if len(fds) != len(blocks):
        raise SystemExit(f"got {len(fds)} memfds for {len(blocks)} blocks")
    mappings = {
        block["name"]: Mapping(fd, block["size"]) for block, fd in zip(blocks, fds, strict=True)
    }
    for fd in fds:
        os.close(fd)
    uffd = Userfaultfd.create(nonblocking=not setup.get("blocking_uffd", False))
    features = Feature.MISSING_SHMEM
    if any(block["hugetlb"] for block in blocks):
        features |= Feature.MISSING_HUGETLBFS
    uffd.api(features)
    for mapping in mappings.values():
        uffd.register(mapping.address, mapping.length, Mode.MISSING)
    hello = {"pid": os.getpid(), "addresses": {n: m.address for n, m in mappings.items()}}
    socket.send_fds(sock, [json.dumps(hello).encode()], [uffd.fileno()])
    # The engine holds the only copy now: closing it there unregisters our ranges and
    # wakes a thread blocked on a fault.
    uffd.close()
    while True:
        packet = sock.recv(65536)
        if not packet:
            return
        command = json.loads(packet)
        if command["op"] == "exit":
            return
        if command["op"] == "digest":
            buffer = mappings[command["block"]].buffer
            length = command["length"]
            digests = [
                hashlib.sha256(buffer[offset : offset + length]).hexdigest()
                for offset in command["offsets"]
            ]
            sock.send(json.dumps({"sha256": digests}).encode())
        else:
            sock.send(json.dumps({"error": f"unknown op {command['op']!r}"}).encode())


if __name__ == "__main__":
    main()
