"""Throughput of the stream codec's RAM fast paths (not part of the test suite).

Run: python bench/codec_bench.py [--gib 1] [--chunk-mib 1]

* decode: 1 GiB of PAGE|CONTINUE records fed in 1 MiB chunks, through
  get_buffer/commit (a memcpy stands in for recv_into) and through receive_data;
* decode of ZERO|CONTINUE records (9 bytes each);
* encode: RamRecordEncoder.encode_pages gather lists (no page copies) and
  encode_zero_pages.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from trimig.codec import (
    NEED_DATA,
    TARGET_PAGE_SIZE,
    RamBlockInfo,
    RamPages,
    RamRecordEncoder,
    RamZeroPages,
    StreamDecoder,
    encode_ram_setup,
    encode_section_part,
    encode_stream_start,
)

BLOCK = "pc.ram"


def _records(block_size: int, encoder: RamRecordEncoder, memory: np.ndarray) -> bytes:
    offsets = np.arange(0, block_size, TARGET_PAGE_SIZE, dtype=np.uint64)
    return b"".join(encoder.encode_pages(BLOCK, offsets, memory))


def bench_decode(total: int, chunk: int, zero_copy: bool) -> tuple[float, float, int]:
    block_size = 64 << 20
    memory = np.random.default_rng(1).integers(0, 256, block_size, dtype=np.uint8)
    encoder = RamRecordEncoder()
    prologue = (
        encode_stream_start()
        + encode_ram_setup(0, [RamBlockInfo(BLOCK, block_size)], postcopy=False)
        + encode_section_part(0)
    )
    first = _records(block_size, encoder, memory)  # names the block once
    body = _records(block_size, encoder, memory)  # all CONTINUE
    repeats = max(1, total // len(body))
    decoder = StreamDecoder()
    decoder.receive_data(prologue + first)
    pages = 0
    while (event := decoder.next_event()) is not NEED_DATA:
        if isinstance(event, RamPages):
            pages += len(event.offsets)
    source = memoryview(body)
    pages = 0
    events = 0
    decoding = 0.0
    start = time.perf_counter()
    for _ in range(repeats):
        for at in range(0, len(body), chunk):
            piece = source[at : at + chunk]
            if zero_copy:
                target = decoder.get_buffer(chunk)
                target[: len(piece)] = piece
                decoder.commit(len(piece))
            else:
                decoder.receive_data(piece)
            decode_start = time.perf_counter()
            while (event := decoder.next_event()) is not NEED_DATA:
                events += 1
                if isinstance(event, RamPages):
                    pages += len(event.offsets)
            decoding += time.perf_counter() - decode_start
    elapsed = time.perf_counter() - start
    assert pages == repeats * (block_size // TARGET_PAGE_SIZE), pages
    return repeats * len(body) / elapsed, repeats * len(body) / decoding, events


def bench_decode_zero(npages: int, chunk: int) -> float:
    encoder = RamRecordEncoder()
    block_size = npages * TARGET_PAGE_SIZE
    offsets = np.arange(0, block_size, TARGET_PAGE_SIZE, dtype=np.uint64)
    body = (
        encode_stream_start()
        + encode_ram_setup(0, [RamBlockInfo(BLOCK, block_size)], postcopy=False)
        + encode_section_part(0)
        + encoder.encode_zero_pages(BLOCK, offsets)
    )
    decoder = StreamDecoder()
    source = memoryview(body)
    seen = 0
    start = time.perf_counter()
    for at in range(0, len(body), chunk):
        piece = source[at : at + chunk]
        target = decoder.get_buffer(chunk)
        target[: len(piece)] = piece
        decoder.commit(len(piece))
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, RamZeroPages):
                seen += len(event.offsets)
    elapsed = time.perf_counter() - start
    assert seen == npages
    return npages / elapsed


def bench_mixed(run: int, chunk: int) -> tuple[float, float]:
    """Runs of ``run`` PAGE records separated by one ZERO record (worst case for batching)."""
    block_size = 16 << 20
    memory = np.random.default_rng(2).integers(0, 256, block_size, dtype=np.uint8)
    offsets = np.arange(0, block_size, TARGET_PAGE_SIZE, dtype=np.uint64)
    encoder = RamRecordEncoder()
    parts: list[bytes | memoryview] = [
        encode_stream_start(),
        encode_ram_setup(0, [RamBlockInfo(BLOCK, block_size)], postcopy=False),
        encode_section_part(0),
    ]
    at = 0
    while at < len(offsets):
        parts += encoder.encode_pages(BLOCK, offsets[at : at + run], memory)
        parts.append(encoder.encode_zero_pages(BLOCK, offsets[at + run : at + run + 1]))
        at += run + 1
    body = b"".join(parts)
    decoder = StreamDecoder()
    source = memoryview(body)
    events = 0
    start = time.perf_counter()
    for at in range(0, len(body), chunk):
        decoder.receive_data(source[at : at + chunk])
        while decoder.next_event() is not NEED_DATA:
            events += 1
    elapsed = time.perf_counter() - start
    return len(body) / elapsed, elapsed / events


def bench_encode(total: int, batch: int) -> tuple[float, float]:
    block_size = 64 << 20
    memory = np.zeros(block_size, dtype=np.uint8)
    encoder = RamRecordEncoder()
    npages = block_size // TARGET_PAGE_SIZE
    offsets = np.arange(0, block_size, TARGET_PAGE_SIZE, dtype=np.uint64)
    repeats = max(1, total // block_size)
    start = time.perf_counter()
    for _ in range(repeats):
        for at in range(0, npages, batch):
            encoder.encode_pages(BLOCK, offsets[at : at + batch], memory)
    pages_rate = repeats * npages / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeats):
        for at in range(0, npages, batch):
            encoder.encode_zero_pages(BLOCK, offsets[at : at + batch])
    zero_rate = repeats * npages / (time.perf_counter() - start)
    return pages_rate, zero_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--chunk-mib", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=256, help="pages per encode call")
    args = parser.parse_args()
    total = int(args.gib * (1 << 30))
    chunk = int(args.chunk_mib * (1 << 20))
    bench_decode(64 << 20, chunk, True)  # warm up (page faults, allocator)
    for zero_copy in (True, False):
        rate, decode_rate, events = bench_decode(total, chunk, zero_copy)
        how = "get_buffer/commit" if zero_copy else "receive_data"
        print(
            f"decode PAGE records ({how}): {rate / 1e9:.2f} GB/s including the copy into "
            f"the buffer, {decode_rate / 1e9:.1f} GB/s in next_event alone, {events} events"
        )
    zero = bench_decode_zero(1 << 20, chunk)
    print(f"decode ZERO records: {zero / 1e6:.1f} M pages/s ({zero * 9 / 1e9:.2f} GB/s of stream)")
    for run in (1, 8, 64):
        rate, per_event = bench_mixed(run, chunk)
        print(
            f"decode runs of {run} PAGE + 1 ZERO: {rate / 1e9:.2f} GB/s, "
            f"{per_event * 1e6:.1f} us per event"
        )
    pages_rate, zero_rate = bench_encode(total, args.batch)
    print(
        f"encode_pages (batch {args.batch}): {pages_rate / 1e6:.2f} M pages/s "
        f"= {pages_rate * TARGET_PAGE_SIZE / 1e9:.1f} GB/s of page data"
    )
    print(f"encode_zero_pages (batch {args.batch}): {zero_rate / 1e6:.1f} M pages/s")


if __name__ == "__main__":
    main()
