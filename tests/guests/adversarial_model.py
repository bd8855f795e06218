"""The adversarial guest's deterministic memory model (tests/guests/adversarial.py): the
initial layout of runs and every step are pure functions of (seed, step number), so
``expected_memory`` recomputes the exact memory the guest must hold. No trimig import."""

from __future__ import annotations

from typing import Any

import numpy as np

PAGE = 4096
WORDS_PER_PAGE = PAGE // 8
#: Steps are generated in chunks of this many from one seeded generator each.
CHUNK = 1024


class Layout:
    """Blocks as one global array of 64-bit words: block b holds words [start[b], end[b])."""

    def __init__(self, blocks: list[dict[str, Any]]) -> None:
        self.blocks = blocks
        words = [b["size"] // 8 for b in blocks]
        self.starts = np.cumsum([0, *words[:-1]]).astype(np.int64)
        self.total_words = int(sum(words))
        self.total_pages = self.total_words // WORDS_PER_PAGE

    def host_page_words(self, word: int) -> tuple[int, int]:
        """The [first, end) global words of the host page holding ``word``."""
        b = int(np.searchsorted(self.starts, word, side="right")) - 1
        host = self.blocks[b]["page_size"] // 8
        first = int(self.starts[b]) + (word - int(self.starts[b])) // host * host
        return first, first + host


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *key])))


def initial_runs(layout: Layout, seed: int) -> list[tuple[int, int, int]]:
    """The layout a new guest writes: (first word, end word, kind) runs, kind 0 hole,
    1 random data, 2 allocated zeros, 3 data then punched out (a hole again)."""
    runs = []
    for b, block in enumerate(layout.blocks):
        rng = _rng(seed, 0, b)
        unit = block["page_size"] // 8  # hugetlb blocks: whole huge pages
        units = block["size"] // block["page_size"]
        start = int(layout.starts[b])
        u = 0
        while u < units:
            length = int(min(units - u, rng.geometric(0.15 if unit == WORDS_PER_PAGE else 0.5)))
            kind = int(rng.choice(4, p=[0.35, 0.45, 0.1, 0.1]))
            runs.append((start + u * unit, start + (u + length) * unit, kind))
            u += length
    return runs


def fill_words(seed: int, first: int, count: int) -> np.ndarray:
    """The random data of initial run starting at ``first`` (depends only on seed and first)."""
    return _rng(seed, 1, first).bit_generator.random_raw(count).astype(np.uint64)


class Chunk:
    """Steps [CHUNK * index, CHUNK * (index + 1)): their word writes and page operations."""

    def __init__(self, layout: Layout, seed: int, index: int, words_per_step: int) -> None:
        rng = _rng(seed, 2, index)
        self.words = rng.integers(0, layout.total_words, size=(CHUNK, words_per_step))
        self.values = rng.bit_generator.random_raw((CHUNK, words_per_step)).astype(np.uint64)
        self.values[rng.random((CHUNK, words_per_step)) < 1 / 16] = 0
        #: 0 fill a page, 1 zero a page, 2 discard its host page, 3..7 nothing.
        self.op = rng.integers(0, 8, size=CHUNK)
        self.page = rng.integers(0, layout.total_pages, size=CHUNK)
        self.pattern = rng.bit_generator.random_raw(CHUNK).astype(np.uint64)


class Memory:
    """Applies the model to a global word space made of per-block views."""

    def __init__(self, layout: Layout, views: list[np.ndarray]) -> None:
        self.layout = layout
        self.views = views

    def _block(self, word: int) -> tuple[np.ndarray, int]:
        b = int(np.searchsorted(self.layout.starts, word, side="right")) - 1
        return self.views[b], word - int(self.layout.starts[b])

    def set_range(self, first: int, end: int, value: np.ndarray | int) -> None:
        view, local = self._block(first)
        view[local : local + end - first] = value

    def write_words(self, words: np.ndarray, values: np.ndarray) -> None:
        b = np.searchsorted(self.layout.starts, words, side="right") - 1
        for block in np.unique(b):
            mine = b == block
            # In order: a later write to the same word wins (assignment is sequential).
            self.views[block][words[mine] - self.layout.starts[block]] = values[mine]

    def apply_step(self, chunk: Chunk, i: int, discard: Any = None) -> None:
        """Step ``i`` of ``chunk``: its word writes, then its page operation. ``discard``
        (first, end) -> bool punches a host page out for real; without it (or when it
        returns False) the host page is zeroed, which is the same memory."""
        self.write_words(chunk.words[i], chunk.values[i])
        op = int(chunk.op[i])
        if op > 2:
            return
        first = int(chunk.page[i]) * WORDS_PER_PAGE
        if op == 0:
            pattern = chunk.pattern[i] ^ np.arange(WORDS_PER_PAGE, dtype=np.uint64)
            self.set_range(first, first + WORDS_PER_PAGE, pattern)
        elif op == 1:
            self.set_range(first, first + WORDS_PER_PAGE, 0)
        else:
            host_first, host_end = self.layout.host_page_words(first)
            if discard is None or not discard(host_first, host_end):
                self.set_range(host_first, host_end, 0)


def expected_memory(layout: Layout, seed: int, steps: int, words_per_step: int) -> list[np.ndarray]:
    """The exact memory after the layout and ``steps`` steps, one array per block.

    Computed a chunk at a time, not step by step as the running guest does (a second,
    independent implementation of the same model): each chunk's page operations are
    applied in order, then of its word writes the last one to each word, unless a page
    operation of a later step (or of the same step: it comes after the words) covers it."""
    views = [np.zeros(b["size"] // 8, dtype=np.uint64) for b in layout.blocks]
    memory = Memory(layout, views)
    for first, end, kind in initial_runs(layout, seed):
        if kind == 1:
            memory.set_range(first, end, fill_words(seed, first, end - first))
    for index in range(-(-steps // CHUNK)):
        chunk = Chunk(layout, seed, index, words_per_step)
        _apply_chunk(memory, layout, chunk, min(CHUNK, steps - index * CHUNK))
    return views


def _apply_chunk(memory: Memory, layout: Layout, chunk: Chunk, count: int) -> None:
    """Steps [0, count) of ``chunk``, vectorised (see expected_memory)."""
    covered_at = np.full(layout.total_pages, -1, dtype=np.int64)  # last op step per page
    for i in np.flatnonzero(chunk.op[:count] <= 2).tolist():
        op = int(chunk.op[i])
        first = int(chunk.page[i]) * WORDS_PER_PAGE
        if op == 0:
            pattern = chunk.pattern[i] ^ np.arange(WORDS_PER_PAGE, dtype=np.uint64)
            memory.set_range(first, first + WORDS_PER_PAGE, pattern)
        else:
            if op == 2:
                first, end = layout.host_page_words(first)
            else:
                end = first + WORDS_PER_PAGE
            memory.set_range(first, end, 0)
        covered_at[
            first // WORDS_PER_PAGE : -(-end // WORDS_PER_PAGE)
            if op
            else first // WORDS_PER_PAGE + 1
        ] = i
    words = chunk.words[:count].reshape(-1)
    values = chunk.values[:count].reshape(-1)
    step = np.repeat(np.arange(count), chunk.words.shape[1])
    # The last write to each word (np.unique on the reversed order finds it).
    _, first_of_reversed = np.unique(words[::-1], return_index=True)
    last = len(words) - 1 - first_of_reversed
    keep = last[step[last] > covered_at[words[last] // WORDS_PER_PAGE]]
    memory.write_words(words[keep], values[keep])
