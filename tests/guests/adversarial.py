"""An adversarial guest, written from docs/guest-protocol.md alone (no trimig import).

It is what a new user would write, and it is built to catch lost pages:

* **Memory starts uneven.** At ``attach`` (role ``new``) each block is laid out in runs of
  never-touched holes, random data, allocated zero pages and data punched out again,
  the runs' kinds and lengths drawn from the seed (hugetlb blocks by whole 2 MiB pages).
* **It writes at random.** While running, each *step* writes ``--words`` 64-bit words at
  pseudo-random offsets anywhere in RAM (some of the values zero), and one step in
  eight also does a page operation: fill a page, zero it, or discard its host page
  (``fallocate(PUNCH_HOLE)``, every other one then read back without a write; while
  discards are inhibited it writes zeros over the host page instead, which leaves
  memory the same).
* **The journal is the device state.** Every step is a pure function of (seed, step
  number), so ``{"seed", "steps", ...}`` is enough to recompute the exact memory the
  guest must hold: ``expected_memory`` replays the layout and every step. ``load-state``
  checks every page against that before replying (reading missing pages on a postcopy
  destination), ``verify`` does again, and after ``cont`` on a destination the guest goes
  on with the next step, so a page lost there is found too.

Run by the engine as ``python3 tests/guests/adversarial.py [--seed N] [--rate STEPS/S]
[--words K] [--lazy]``; ``--rate 0`` steps as fast as it can. The memory model (the layout,
the steps, ``expected_memory``) is adversarial_model.py, beside it.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import errno
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import sys
import time
from typing import Any

import numpy as np
from adversarial_model import (
    CHUNK,
    PAGE,
    WORDS_PER_PAGE,
    Chunk,
    Layout,
    Memory,
    expected_memory,
    fill_words,
    initial_runs,
)

HUGE_PAGE = 2 << 20
FORMAT = "trimig-adversarial"

# userfaultfd ABI (linux/userfaultfd.h), x86_64.
SYS_USERFAULTFD = 323
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_WP = 2
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class Refused(Exception):
    """A request this guest refuses (becomes an error reply)."""


# -- the guest ---------------------------------------------------------------------------


class Block:
    def __init__(self, spec: dict[str, Any], fd: int) -> None:
        if os.fstat(fd).st_size < spec["size"]:
            raise Refused(f"memfd of block {spec['name']!r} is smaller than {spec['size']}")
        self.spec = spec
        self.fd = fd
        self.map = mmap.mmap(fd, spec["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.words = np.frombuffer(self.map, dtype=np.uint64)


def _userfaultfd(features: int, mode: int, blocks: list[Block]) -> int:
    fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise Refused(f"userfaultfd: {os.strerror(ctypes.get_errno())}")
    try:
        api = bytearray(struct.pack("QQQ", UFFD_API, features, 0))
        fcntl.ioctl(fd, UFFDIO_API, api)
        for block in blocks:
            reg = bytearray(struct.pack("QQQQ", block.address, block.spec["size"], mode, 0))
            fcntl.ioctl(fd, UFFDIO_REGISTER, reg)
    except OSError as exc:
        os.close(fd)
        raise Refused(f"userfaultfd setup: {exc}") from exc
    return fd


class AdversarialGuest:
    def __init__(
        self, sock: socket.socket, seed: int, rate: float, words: int, *, lazy: bool = False
    ) -> None:
        self.sock = sock
        #: load-state trusts the state without reading memory (``--lazy``): on a postcopy
        #: destination the pages then come as the running guest touches them, and verify
        #: checks every one.
        self.lazy = lazy
        self.seed = seed
        self.rate = rate
        self.words_per_step = words
        self.blocks: list[Block] = []
        self.layout: Layout | None = None
        self.memory: Memory | None = None
        self.role: str | None = None
        self.running = False
        self.has_state = False
        self.steps = 0
        self.generation = 0
        self.discard_inhibited = False
        self.missing_registered = False
        self.dirty_tracked = False
        self.tracking_fd: int | None = None
        self._chunk: Chunk | None = None
        self._next_step = 0.0

    # protocol plumbing
    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode()
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def serve_forever(self) -> int:
        self.send({"hello": 1, "pid": os.getpid(), "guest": FORMAT})
        while True:
            timeout = None
            if self.running:
                timeout = max(0.0, self._next_step - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if ready:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(
                        self.sock, 65536, 253, socket.MSG_CMSG_CLOEXEC
                    )
                except ConnectionResetError:
                    return 0
                if not data:
                    return 0
                if self.handle(data, fds):
                    return 0
            elif self.running:
                self.step()

    def handle(self, data: bytes, fds: list[int]) -> bool:
        try:
            message = json.loads(data)
            request_id = message["id"]
            if not isinstance(message, dict) or not isinstance(request_id, int):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            for fd in fds:
                os.close(fd)
            self.send({"reply": None, "ok": False, "error": "not a request"})
            return False
        command = message.get("cmd")
        handler = getattr(self, "cmd_" + str(command).replace("-", "_"), None)
        reply_fds: list[int] = []
        try:
            if handler is None:
                raise Refused(f"unknown command {command!r}")
            result = handler(message, fds)
            if isinstance(result, tuple):
                result, reply_fds = result
            fds = []
        except Refused as exc:
            self.send({"reply": request_id, "ok": False, "error": f"{command}: {exc}"})
            result = None
        finally:
            for fd in fds:
                os.close(fd)
        if result is not None:
            self.send({"reply": request_id, "ok": True, **result}, reply_fds)
            for fd in reply_fds:
                os.close(fd)  # the engine's copy is the only one now
        return command == "quit" and result is not None

    def _attached(self) -> Memory:
        if self.memory is None:
            raise Refused("send attach first")
        return self.memory

    def _paused(self) -> None:
        if self.running:
            raise Refused("refused while running")

    # commands
    def cmd_attach(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if self.memory is not None:
            raise Refused("already attached")
        specs = message.get("blocks")
        role = message.get("role")
        if role not in ("new", "incoming", "postcopy") or not isinstance(specs, list):
            raise Refused("bad blocks or role")
        if len(fds) != len(specs):
            raise Refused(f"{len(specs)} blocks but {len(fds)} memfds")
        self.blocks = [Block(spec, fd) for spec, fd in zip(specs, fds, strict=True)]
        self.layout = Layout(specs)
        self.memory = Memory(self.layout, [block.words for block in self.blocks])
        self.role = role
        if role == "new":
            self._write_layout()
        return {"addresses": [block.address for block in self.blocks]}

    def _write_layout(self) -> None:
        assert self.memory is not None and self.layout is not None
        for first, end, kind in initial_runs(self.layout, self.seed):
            if kind == 0:
                continue
            if kind == 2:
                self.memory.set_range(first, end, 0)  # touched: allocated zeros
                continue
            self.memory.set_range(first, end, fill_words(self.seed, first, end - first))
            if kind == 3:
                self._punch(first, end)

    def _punch(self, first: int, end: int) -> bool:
        assert self.layout is not None
        b = int(np.searchsorted(self.layout.starts, first, side="right")) - 1
        offset = (first - int(self.layout.starts[b])) * 8
        if _libc.fallocate(
            self.blocks[b].fd,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            offset,
            (end - first) * 8,
        ):
            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")
        return True

    def _discard(self, first: int, end: int) -> bool:
        """Punch the host page out; for every other host page, then *read* it back (a
        fresh zero page, still write-protected: no write for the dirty log to see)."""
        if self.discard_inhibited:
            return False
        self._punch(first, end)
        if (first // (end - first)) % 2:
            view, local = self.memory._block(first)  # type: ignore[union-attr]
            if view[local : local + end - first : WORDS_PER_PAGE].any():
                raise AssertionError(f"word {first}: a punched page reads as data")
        return True

    def cmd_register_missing(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        if self.role != "postcopy" or self.missing_registered:
            raise Refused("only once, for role postcopy")
        features = UFFD_FEATURE_MISSING_SHMEM
        if any(block.spec["page_size"] == HUGE_PAGE for block in self.blocks):
            features |= UFFD_FEATURE_MISSING_HUGETLBFS
        fd = _userfaultfd(features, UFFDIO_REGISTER_MODE_MISSING, self.blocks)
        self.missing_registered = True
        reply = {"addresses": [b.address for b in self.blocks], "features": features}
        return reply, [fd]

    def cmd_unregister_missing(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        self.missing_registered = False
        return {}

    def cmd_track_dirty(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        if self.missing_registered or self.dirty_tracked:
            raise Refused("already registered")
        features = (
            UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
        )
        fd = _userfaultfd(features, UFFDIO_REGISTER_MODE_WP, self.blocks)
        self.tracking_fd = os.dup(fd)
        self.dirty_tracked = True
        reply = {"addresses": [b.address for b in self.blocks], "features": features}
        return reply, [fd]

    def cmd_untrack_dirty(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        if self.tracking_fd is not None:
            for block in self.blocks:
                rng = bytearray(struct.pack("QQ", block.address, block.spec["size"]))
                fcntl.ioctl(self.tracking_fd, UFFDIO_UNREGISTER, rng)
            os.close(self.tracking_fd)
            self.tracking_fd = None
        self.dirty_tracked = False
        return {}

    def cmd_stop(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        self.running = False
        return {"running": False}

    def cmd_cont(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        if self.role != "new" and not self.has_state:
            raise Refused("an incoming guest needs load-state first")
        if not self.running:
            self.running = True
            self._next_step = time.monotonic()
        return {"running": True}

    def cmd_save_state(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        self._paused()
        self.generation += 1
        state = {
            "format": FORMAT,
            "seed": self.seed,
            "steps": self.steps,
            "words": self.words_per_step,
            "blocks": self.layout.blocks if self.layout else [],
            "generation": self.generation,
        }
        return {"state": base64.b64encode(json.dumps(state).encode()).decode()}

    def cmd_load_state(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        self._paused()
        try:
            state = json.loads(base64.b64decode(message["state"], validate=True))
        except (KeyError, ValueError, TypeError) as exc:
            raise Refused(f"not a state: {exc}") from exc
        if state.get("format") != FORMAT or state.get("blocks") != self.layout.blocks:  # type: ignore[union-attr]
            raise Refused("state of another guest or another memory layout")
        self.seed, self.steps = int(state["seed"]), int(state["steps"])
        self.words_per_step = int(state["words"])
        self.generation = int(state["generation"])
        self._chunk = None
        # Every page, before replying (faults them in on postcopy), unless lazy.
        verdict = {"verified": True} if self.lazy else self.check()
        if not verdict["verified"]:
            raise Refused(f"memory does not match the state: {verdict['detail']}")
        self.has_state = True
        return {}

    def cmd_verify(self, message: dict[str, Any], fds: list[int]) -> Any:
        self._attached()
        self._paused()
        return self.check()

    def cmd_notify(self, message: dict[str, Any], fds: list[int]) -> Any:
        event = message.get("event")
        if event == "postcopy-start":
            self.discard_inhibited = True
        elif event == "postcopy-end":
            self.discard_inhibited = False
        else:
            raise Refused(f"unknown event {event!r}")
        return {"discard_inhibited": self.discard_inhibited}

    def cmd_query(self, message: dict[str, Any], fds: list[int]) -> Any:
        return {
            "running": self.running,
            "role": self.role,
            "blocks": self.layout.blocks if self.layout else [],
            "discard_inhibited": self.discard_inhibited,
            "missing_registered": self.missing_registered,
            "dirty_tracked": self.dirty_tracked,
            "steps": self.steps,
        }

    def cmd_ping(self, message: dict[str, Any], fds: list[int]) -> Any:
        return {}

    def cmd_quit(self, message: dict[str, Any], fds: list[int]) -> Any:
        return {}

    # the work
    def step(self) -> None:
        assert self.memory is not None and self.layout is not None
        index, i = divmod(self.steps, CHUNK)
        if self._chunk is None or self._chunk_index != index:
            self._chunk = Chunk(self.layout, self.seed, index, self.words_per_step)
            self._chunk_index = index
        self.memory.apply_step(self._chunk, i, discard=self._discard)
        self.steps += 1
        now = time.monotonic()
        self._next_step = now if self.rate <= 0 else max(self._next_step + 1 / self.rate, now - 1)

    def check(self) -> dict[str, Any]:
        """Compare every page with the model; the verify reply."""
        assert self.layout is not None
        expected = expected_memory(self.layout, self.seed, self.steps, self.words_per_step)
        bad_pages = 0
        first_bad: dict[str, Any] | None = None
        for block, want in zip(self.blocks, expected, strict=True):
            have = block.words.reshape(-1, WORDS_PER_PAGE)
            bad = np.flatnonzero((have != want.reshape(-1, WORDS_PER_PAGE)).any(axis=1))
            bad_pages += len(bad)
            if len(bad) and first_bad is None:
                page = int(bad[0])
                word = int(np.flatnonzero(have[page] != want.reshape(-1, WORDS_PER_PAGE)[page])[0])
                first_bad = {
                    "block": block.spec["name"],
                    "page": page,
                    "word": word,
                    "found": int(have[page, word]),
                    "expected": int(want.reshape(-1, WORDS_PER_PAGE)[page, word]),
                    "page_is_zero": not bool(have[page].any()),
                }
        pages = sum(b.spec["size"] // PAGE for b in self.blocks)
        if first_bad is None:
            detail = f"all {pages} pages match the journal after {self.steps} steps"
        else:
            detail = (
                f"{bad_pages} of {pages} pages differ from the journal after {self.steps} "
                f"steps; first: block {first_bad['block']!r} page {first_bad['page']} word "
                f"{first_bad['word']}: found {first_bad['found']:#x}, expected "
                f"{first_bad['expected']:#x}"
                + (" (the page reads as zero)" if first_bad["page_is_zero"] else "")
            )
        return {
            "verified": first_bad is None,
            "detail": detail,
            "bad_pages": bad_pages,
            "bad_page": first_bad,
            "steps": self.steps,
            "generation": self.generation,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=2000.0, help="steps/s; 0 = flat out")
    parser.add_argument("--words", type=int, default=16, help="random words written per step")
    parser.add_argument(
        "--lazy", action="store_true", help="load-state does not read memory (verify does)"
    )
    args = parser.parse_args(argv)
    fd = int(os.environ["TRIMIG_GUEST_FD"])
    sock = socket.socket(fileno=fd)
    try:
        return AdversarialGuest(
            sock, args.seed, args.rate, args.words, lazy=args.lazy
        ).serve_forever()
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return 0
        raise


if __name__ == "__main__":
    sys.exit(main())
