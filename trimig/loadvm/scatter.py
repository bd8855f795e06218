"""Reading runs of RAM page records straight into place-ready rows (postcopy listener).

On the wire a page is an 8-byte word followed by its 4096 bytes, so pages read into one
buffer sit 4104 bytes apart and must be copied into a contiguous staging buffer before a
single UFFDIO_COPY can place a run of them: a second copy of every byte of RAM. A
:class:`PageScatter` reads with one ``readv`` that scatters each record's word into a
word array and its page into a row of a contiguous page array, so a run is placed from
there directly.

The decoder hands the stream over between two RAM records
(``StreamDecoder.take_ram_records``). The scatter reads as many records as arrive at
once (up to 512, 2 MiB), keeps the leading CONTINUE page records of that block, and
gives back the bytes from the first other record on (a zero page, the end of the
section, ...) for the decoder to decode. It only ever blocks to complete a record whose
word says it is a page (the sender writes records whole), so it never waits for bytes
that are not coming.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np
import numpy.typing as npt

from ..channel import READ_CHUNK
from ..codec import StreamDecoder
from ..codec.constants import (
    PAGE_RECORD_SIZE,
    RAM_FLAGS_MASK,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_PAGE,
    TARGET_PAGE_SIZE,
)
from ..kernel.iov import IOV_MAX
from ..loops import feed_from_stream
from ..threads import StopSignal, ThreadStream

WORD_SIZE = PAGE_RECORD_SIZE - TARGET_PAGE_SIZE
MAX_RECORDS = min(512, IOV_MAX // 2)
"""Records one read can take (two iovecs each)."""

_PAGE_CONTINUE = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE


PlacePages = Callable[[str, npt.NDArray[np.uint64], npt.NDArray[np.uint8]], object]
"""``place(block, offsets, pages)``: a run of pages taken off the stream (valid until the
next read)."""


def feed_decoder(
    decoder: StreamDecoder,
    stream: ThreadStream,
    scatter: PageScatter,
    stop: StopSignal,
    *,
    place: PlacePages,
) -> bool:
    """Give ``decoder`` more of the stream read from ``stream``, or, when it sits
    between two RAM records, take the page records that follow with ``scatter`` and hand
    them to ``place`` (the decoder then gets the bytes after them): the main listener's
    ``loops.Feed``, called whenever the decoder returns NEED_DATA. False once ``stop`` is set.

    After a scatter that found no page (zero pages, say), the next read is a plain one:
    a stream of other records is not scattered and gathered back again and again.
    """
    taken = None
    if decoder.buffered < PAGE_RECORD_SIZE and scatter.last_count:
        taken = decoder.take_ram_records()
    scatter.last_count = 1
    if taken is None:
        count = feed_from_stream(
            decoder,
            stream,
            stop,
            what="the main stream",
            chunk=READ_CHUNK,
            timeout=scatter.timeout,
        )
        return count is not None
    block, block_size, prefix = taken
    read = scatter.read(stream, stop, block_size=block_size, prefix=prefix)
    if read is None:
        return False
    scatter.last_count = read.count
    if read.count:
        decoder.skip(read.count * PAGE_RECORD_SIZE)
        place(block, scatter.offsets(read.count), scatter.pages[: read.count])
    if read.leftover:
        decoder.receive_data(read.leftover)
    if read.eof:
        decoder.receive_eof()
    return True


@attrs.frozen
class ScatterRead:
    """What one :meth:`PageScatter.read` took."""

    count: int
    """Page records taken: their words are ``words[:count]``, their pages ``pages[:count]``."""
    leftover: bytes
    """Every byte read after them, in stream order, for the decoder."""
    eof: bool
    """The stream ended."""


class PageScatter:
    """Scatters runs of page records from a ThreadStream into ``words`` and ``pages``.

    One per reader thread; the arrays are reused by every read (place the pages before
    the next one).
    """

    def __init__(self, records: int = MAX_RECORDS, *, timeout: float | None = None) -> None:
        if not 1 <= records <= MAX_RECORDS:
            raise ValueError(f"a scatter holds 1 to {MAX_RECORDS} records, not {records}")
        #: Seconds a read may wait for the stream's next byte (x-channel-timeout) before
        #: it raises TransportError; None: no bound.
        self.timeout = timeout
        self.words: npt.NDArray[np.uint64] = np.zeros(records, dtype=">u8")
        self.pages: npt.NDArray[np.uint8] = np.empty((records, TARGET_PAGE_SIZE), dtype=np.uint8)
        word_bytes = self.words.view(np.uint8).reshape(records, WORD_SIZE)
        #: Records the last read took (feed_decoder skips one scatter after a fruitless one).
        self.last_count = 1
        self._pieces = [
            memoryview(piece)
            for row in range(records)
            for piece in (word_bytes[row], self.pages[row])
        ]

    @property
    def capacity(self) -> int:
        return len(self.words)

    def offsets(self, count: int) -> npt.NDArray[np.uint64]:
        """Byte offsets into the block of the first ``count`` records taken."""
        return self.words[:count].astype(np.uint64) & np.uint64(~RAM_FLAGS_MASK & (2**64 - 1))

    def read(
        self, stream: ThreadStream, stop: StopSignal, *, block_size: int, prefix: bytes = b""
    ) -> ScatterRead | None:
        """Read CONTINUE page records of a block of ``block_size`` bytes from ``stream``.

        ``prefix`` holds bytes already received of the first record (fewer than one
        record). Returns what was taken once at least one read returned (a whole number
        of records, or a record that is not a page), or None once ``stop`` is set.
        Raises TransportError if reading fails.
        """
        if len(prefix) >= PAGE_RECORD_SIZE:
            raise ValueError(f"a prefix of {len(prefix)} bytes is more than one record")
        total = self._put(prefix)
        eof = False
        if total < WORD_SIZE or self._valid(0, 1, block_size):
            count = self._readv(stream, stop, total, len(self._pieces))
            if count is None:
                return None
            eof = count == 0
            total += count
        # Finish a partial record, as long as its word says it is a page: its bytes are coming.
        while not eof and total % PAGE_RECORD_SIZE:
            record, within = divmod(total, PAGE_RECORD_SIZE)
            if within >= WORD_SIZE and not self._valid(record, record + 1, block_size):
                break
            count = self._readv(stream, stop, total, 2 * record + 2)
            if count is None:
                return None
            eof = count == 0
            total += count
        whole = total // PAGE_RECORD_SIZE
        taken = self._valid_run(whole, block_size)
        return ScatterRead(taken, self._bytes(taken * PAGE_RECORD_SIZE, total), eof)

    # -- helpers ---------------------------------------------------------------------------

    def _valid(self, first: int, end: int, block_size: int) -> bool:
        return self._valid_run(end, block_size, first) == end - first

    def _valid_run(self, end: int, block_size: int, first: int = 0) -> int:
        """How many records from ``first`` on (before ``end``) are CONTINUE pages inside
        the block, counted up to the first that is not."""
        if end <= first:
            return 0
        words = self.words[first:end].astype(np.uint64)
        last = np.uint64(block_size - TARGET_PAGE_SIZE + _PAGE_CONTINUE)
        good = ((words & np.uint64(RAM_FLAGS_MASK)) == _PAGE_CONTINUE) & (words <= last)
        return end - first if good.all() else int(np.argmin(good))

    def _views_from(self, offset: int, end_piece: int) -> list[memoryview]:
        """The pieces from byte ``offset`` of the records on, up to piece ``end_piece``."""
        record, within = divmod(offset, PAGE_RECORD_SIZE)
        if within < WORD_SIZE:
            first = 2 * record
            head = self._pieces[first][within:]
        else:
            first = 2 * record + 1
            head = self._pieces[first][within - WORD_SIZE :]
        return [head, *self._pieces[first + 1 : end_piece]]

    def _put(self, data: bytes) -> int:
        """Copy ``data`` into the pieces from the start; its length."""
        offset = 0
        for piece in self._pieces:
            if offset >= len(data):
                break
            part = data[offset : offset + len(piece)]
            piece[: len(part)] = part
            offset += len(part)
        return len(data)

    def _bytes(self, start: int, end: int) -> bytes:
        """The bytes read between offsets ``start`` and ``end``, in stream order."""
        if end <= start:
            return b""
        last_piece = 2 * (-(-end // PAGE_RECORD_SIZE))
        joined = b"".join(bytes(piece) for piece in self._views_from(start, last_piece))
        return joined[: end - start]

    def _readv(
        self, stream: ThreadStream, stop: StopSignal, offset: int, end_piece: int
    ) -> int | None:
        """One readv into the pieces from byte ``offset`` (up to piece ``end_piece``),
        waiting for data; the count (0 at EOF), or None once ``stop`` is set."""
        return stream.readv_into(
            self._views_from(offset, end_piece),
            stop,
            what="the main stream",
            timeout=self.timeout,
        )
