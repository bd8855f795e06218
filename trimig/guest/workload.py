"""The built-in workload guest, in the spirit of QEMU's migration-test "A-B" guest.

Run by the engine as ``python -m trimig.guest.workload [--dirty-rate RATE]
[--fill random|zero] [--seed N]``.

Memory model. The guest's RAM is cut into 4 KiB *workload pages*, numbered globally:
blocks in the order attach gave them, pages in address order within a block. The
first 8 bytes of each page hold a little-endian u64 counter; the other 4088 bytes
hold the *fill*: zeros (``--fill zero``) or pseudo-random bytes (``--fill random``)
that depend only on the seed, the block's index and the page's position, so that
any copy can be checked against a regeneration (:func:`fill_chunk`).

The sweep adds 1 to the counters of pages ``cursor, cursor+1, ...`` in chunks; after
the last page the pass count goes up and the cursor goes back to 0. Between chunks
(the only moments a control message is handled, hence the only moments memory can
be observed by a stopped guest) every page before ``cursor`` holds ``pass + 1`` and
every page from ``cursor`` on holds ``pass``. Walking the pages in order, the
counters are therefore all equal except for one step down by exactly one, at the
cursor (none when the cursor is 0), which is QEMU's check; and the position of that
step and the values must agree with the device state.

Device state (``save-state``): JSON with seed, fill, pass, cursor, page count and a
generation number that every save increments, so that continuity can be checked.
"""

from __future__ import annotations

import argparse
import bisect
import json
import time
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from ..errors import ConfigError
from ..units import parse_rate
from .library import Guest, GuestBlock, GuestProgram, GuestRequestError, Role, VerifyResult

WORKLOAD_PAGE_SIZE = 4096
WORDS_PER_PAGE = WORKLOAD_PAGE_SIZE // 8
#: The random fill is generated per run of this many pages of a block (1 MiB).
FILL_CHUNK_PAGES = 256
#: At most this many counters are incremented per step.
SWEEP_CHUNK_PAGES = 512
STATE_FORMAT = "trimig-workload"
STATE_VERSION = 1
FILLS = ("random", "zero")


def fill_chunk(seed: int, block_index: int, chunk_index: int, pages: int) -> np.ndarray:
    """The random fill of pages ``[chunk_index * FILL_CHUNK_PAGES, + pages)`` of a block,
    as a ``(pages, 512)`` uint64 array (column 0, the counters, is garbage: ignore it).

    Defined as the raw outputs of numpy's SFC64 seeded by
    ``SeedSequence([seed, block_index, chunk_index])``, stored in native (little) endian.
    """
    bits = np.random.SFC64(np.random.SeedSequence([seed, block_index, chunk_index]))
    return bits.random_raw(pages * WORDS_PER_PAGE).reshape(pages, WORDS_PER_PAGE)


@attrs.define
class WorkloadState:
    """The workload's device state."""

    seed: int
    fill: str
    passes: int
    cursor: int
    page_count: int
    generation: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "seed": self.seed,
                "fill": self.fill,
                "pass": self.passes,
                "cursor": self.cursor,
                "page_count": self.page_count,
                "generation": self.generation,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkloadState:
        """Parse a saved state; raises GuestRequestError saying what is wrong with it."""
        try:
            raw = json.loads(data.decode())
        except (UnicodeDecodeError, ValueError) as error:
            raise GuestRequestError(f"workload state is not UTF-8 JSON: {error}") from None
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise GuestRequestError(f"not a {STATE_FORMAT} device state: {data[:80]!r}")
        if raw.get("version") != STATE_VERSION:
            raise GuestRequestError(
                f"workload state version {raw.get('version')!r}, expected {STATE_VERSION}"
            )
        fields = {}
        for key in ("seed", "pass", "cursor", "page_count", "generation"):
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GuestRequestError(
                    f"workload state: {key!r} must be a natural number, got {value!r}"
                )
            fields[key] = value
        if raw.get("fill") not in FILLS:
            raise GuestRequestError(f"workload state: unknown fill {raw.get('fill')!r}")
        if fields["cursor"] >= max(fields["page_count"], 1):
            raise GuestRequestError(
                f"workload state: cursor {fields['cursor']} is outside the "
                f"{fields['page_count']} pages"
            )
        return cls(
            seed=fields["seed"],
            fill=raw["fill"],
            passes=fields["pass"],
            cursor=fields["cursor"],
            page_count=fields["page_count"],
            generation=fields["generation"],
        )


class Workload(GuestProgram):
    """Sweeps page counters at ``dirty_rate`` bytes of pages per second (0: no limit)."""

    def __init__(self, *, dirty_rate: int = 0, fill: str = "random", seed: int = 0) -> None:
        if fill not in FILLS:
            raise ConfigError(f"unknown fill {fill!r}; expected one of {FILLS}")
        if seed < 0:
            raise ConfigError(f"the seed must not be negative, got {seed}")
        if dirty_rate < 0:
            raise ConfigError(f"the dirty rate must not be negative, got {dirty_rate}")
        self.fill = fill
        self.seed = seed
        self.state: WorkloadState | None = None
        self._blocks: tuple[GuestBlock, ...] = ()
        self._counters: list[np.ndarray] = []  # per block: strided u64 view, one per page
        self._starts: list[int] = []  # global index of each block's first page
        self._page_count = 0
        self._dirty_rate = dirty_rate
        self._dirty_limit = 0
        self._throttle_s = 0.0
        self._set_rate(dirty_rate)
        self._tokens = 0.0
        self._last_refill = 0.0

    def _set_rate(self, bytes_per_second: int) -> None:
        self._pages_per_second = bytes_per_second / WORKLOAD_PAGE_SIZE
        self._min_chunk = max(1.0, min(SWEEP_CHUNK_PAGES, self._pages_per_second * 0.01))
        self._burst = max(self._min_chunk, self._pages_per_second * 0.02)

    def set_dirty_limit(self, bytes_per_second: int) -> bool:
        """The engine's dirty limit: the sweep goes no faster than it (nor than
        ``--dirty-rate``); 0 lifts it."""
        self._dirty_limit = bytes_per_second
        rates = [rate for rate in (self._dirty_rate, bytes_per_second) if rate]
        self._set_rate(min(rates) if rates else 0)
        self._tokens = min(self._tokens, self._burst)
        self._last_refill = time.monotonic()
        return True

    def dirty_limit_throttle_us(self) -> int:
        return int(self._throttle_s * 1_000_000)

    # -- hooks ----------------------------------------------------------------------

    def on_attach(self, guest: Guest, role: Role) -> None:
        for block in guest.blocks:
            if block.size % WORKLOAD_PAGE_SIZE:
                raise GuestRequestError(f"block {block.name!r} size is not a multiple of 4 KiB")
        self._blocks = guest.blocks
        self._counters = [block.array("<u8")[::WORDS_PER_PAGE] for block in guest.blocks]
        self._starts = []
        total = 0
        for counters in self._counters:
            self._starts.append(total)
            total += len(counters)
        self._page_count = total
        if role is Role.NEW:
            self.state = WorkloadState(self.seed, self.fill, 0, 0, total)
            if self.fill == "random":
                self._initialise_random_fill()
        # INCOMING and POSTCOPY: memory is the migrated one; the state comes by load-state.

    def on_cont(self) -> None:
        if self.state is None:
            raise GuestRequestError("no device state: send load-state before cont")
        self._tokens = 0.0
        self._last_refill = time.monotonic()

    def step(self) -> float | None:
        state = self.state
        if state is None:
            return 0.1
        pages = SWEEP_CHUNK_PAGES
        if self._pages_per_second:
            now = time.monotonic()
            self._tokens = min(
                self._tokens + (now - self._last_refill) * self._pages_per_second, self._burst
            )
            self._last_refill = now
            if self._tokens < self._min_chunk:
                wait = (self._min_chunk - self._tokens) / self._pages_per_second
                if self._dirty_limit and (
                    not self._dirty_rate or self._dirty_limit < self._dirty_rate
                ):
                    self._throttle_s += wait  # waiting for the engine's limit
                return wait
            pages = min(pages, int(self._tokens))
        block_index = bisect.bisect_right(self._starts, state.cursor) - 1
        local = state.cursor - self._starts[block_index]
        counters = self._counters[block_index]
        pages = min(pages, len(counters) - local)
        counters[local : local + pages] += np.uint64(1)
        self._tokens -= pages
        state.cursor += pages
        if state.cursor == self._page_count:
            state.cursor = 0
            state.passes += 1
        return None

    def save_state(self) -> bytes:
        if self.state is None:
            raise GuestRequestError("no device state to save: the guest was never initialised")
        self.state.generation += 1
        return self.state.to_bytes()

    def load_state(self, state: bytes) -> None:
        loaded = WorkloadState.from_bytes(state)
        if self._blocks and loaded.page_count != self._page_count:
            raise GuestRequestError(
                f"device state is for {loaded.page_count} pages, but the attached memory has "
                f"{self._page_count}"
            )
        self.state = loaded

    def verify(self) -> VerifyResult:
        state = self.state
        if state is None:
            return VerifyResult(False, "no device state: nothing to verify against")
        if state.page_count != self._page_count:
            return VerifyResult(
                False,
                f"device state is for {state.page_count} pages, memory has {self._page_count}",
            )
        fields: dict[str, Any] = {
            "pass": state.passes,
            "cursor": state.cursor,
            "page_count": state.page_count,
            "generation": state.generation,
            "seed": state.seed,
            "fill": state.fill,
            "bad_page": None,
        }
        counters = np.concatenate([np.array(c) for c in self._counters])
        memory_pass, memory_cursor = _counter_pattern(counters)
        fields["memory_pass"] = memory_pass
        fields["memory_cursor"] = memory_cursor
        where = (
            f"device state pass {state.passes} cursor {state.cursor} generation {state.generation}"
        )
        expected = np.full(self._page_count, state.passes, dtype=np.uint64)
        expected[: state.cursor] += np.uint64(1)
        wrong = np.flatnonzero(counters != expected)
        if len(wrong):
            page = int(wrong[0])
            fields["bad_page"] = self._describe(
                page, "counter", found=int(counters[page]), expected=int(expected[page])
            )
            pattern = (
                f"memory shows a consistent sweep at pass {memory_pass} cursor {memory_cursor}: "
                "the device state did not continue"
                if memory_pass is not None
                else "memory breaks the one-step pattern"
            )
            return VerifyResult(
                False,
                f"{self._where(page)}: counter {int(counters[page])}, expected "
                f"{int(expected[page])} ({where}; {pattern}; {len(wrong)} bad counters)",
                fields,
            )
        bad_fill = self._check_fill(state)
        if bad_fill is not None:
            fields["bad_page"] = bad_fill
            return VerifyResult(
                False,
                f"{self._where(bad_fill['page'])}: byte {bad_fill['byte']:#x} is "
                f"{bad_fill['found']:#04x}, expected {bad_fill['expected']:#04x} "
                f"({state.fill} fill, seed {state.seed})",
                fields,
            )
        return VerifyResult(True, f"{self._page_count} pages consistent with {where}", fields)

    # -- helpers ------------------------------------------------------------------

    def _initialise_random_fill(self) -> None:
        for block_index, block in enumerate(self._blocks):
            pages = block.array("<u8").reshape(-1, WORDS_PER_PAGE)
            for chunk_index, first in enumerate(range(0, len(pages), FILL_CHUNK_PAGES)):
                rows = pages[first : first + FILL_CHUNK_PAGES]
                fill = fill_chunk(self.seed, block_index, chunk_index, len(rows))
                fill[:, 0] = 0
                rows[...] = fill

    def _check_fill(self, state: WorkloadState) -> dict[str, Any] | None:
        """The first page whose non-counter bytes differ from the fill, described; or None."""
        for block_index, block in enumerate(self._blocks):
            pages = block.array("<u8").reshape(-1, WORDS_PER_PAGE)
            for chunk_index, first in enumerate(range(0, len(pages), FILL_CHUNK_PAGES)):
                rows = pages[first : first + FILL_CHUNK_PAGES]
                if state.fill == "random":
                    expected = fill_chunk(state.seed, block_index, chunk_index, len(rows))
                else:
                    expected = np.zeros(rows.shape, dtype=np.uint64)
                expected[:, 0] = rows[:, 0]
                if np.array_equal(expected, rows):
                    continue
                row = int(np.flatnonzero((expected != rows).any(axis=1))[0])
                found_bytes = rows[row].view(np.uint8)
                expected_bytes = expected[row].view(np.uint8)
                byte = int(np.flatnonzero(found_bytes != expected_bytes)[0])
                page = self._starts[block_index] + first + row
                return self._describe(
                    page,
                    "fill",
                    found=int(found_bytes[byte]),
                    expected=int(expected_bytes[byte]),
                    byte=byte,
                )
        return None

    def _locate(self, page: int) -> tuple[GuestBlock, int]:
        block_index = bisect.bisect_right(self._starts, page) - 1
        offset = (page - self._starts[block_index]) * WORKLOAD_PAGE_SIZE
        return self._blocks[block_index], offset

    def _where(self, page: int) -> str:
        block, offset = self._locate(page)
        return f"page {page} (block {block.name!r} offset {offset:#x})"

    def _describe(self, page: int, what: str, **values: int) -> dict[str, Any]:
        block, offset = self._locate(page)
        return {"page": page, "block": block.name, "offset": offset, "what": what, **values}


def _counter_pattern(counters: np.ndarray) -> tuple[int | None, int | None]:
    """QEMU's check: (pass, cursor) if the counters are all equal except for one step down
    by exactly one, at the cursor; (None, None) otherwise."""
    steps = np.flatnonzero(counters[1:] != counters[:-1])
    if len(steps) == 0:
        return int(counters[0]), 0
    if len(steps) == 1:
        step = int(steps[0]) + 1
        if int(counters[step - 1]) == int(counters[step]) + 1:
            return int(counters[step]), step
    return None, None


def workload_arguments(
    *, dirty_rate: int | str | None = None, fill: str = "random", seed: int = 0
) -> list[str]:
    """The command-line arguments selecting these options (inverse of :func:`parse_arguments`)."""
    arguments = ["--fill", fill, "--seed", str(seed)]
    if dirty_rate is not None:
        arguments += ["--dirty-rate", str(dirty_rate)]
    return arguments


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trimig.guest.workload",
        description="trimig's built-in workload guest: sweeps page counters over its RAM.",
    )
    parser.add_argument(
        "--dirty-rate",
        default="max",
        help="bytes of pages touched per second, e.g. 100M; 0 or max: as fast as it can",
    )
    parser.add_argument(
        "--fill",
        choices=FILLS,
        default="random",
        help="what the rest of each page holds (default random)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random fill")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    workload = Workload(
        dirty_rate=parse_rate(arguments.dirty_rate, what="dirty rate"),
        fill=arguments.fill,
        seed=arguments.seed,
    )
    guest = Guest.connect()
    try:
        return guest.run(workload)
    finally:
        guest.close()


if __name__ == "__main__":
    raise SystemExit(main())
