"""Microbenchmark: PagemapScanner.take_written over a 1 GiB WP_ASYNC-tracked shmem mapping.

Run: python bench/kernel_take_written.py [--size 1G] [--rounds 20]

For each dirty-page count, every round writes that many random pages, then times one
take_written over the whole mapping (populated: every page table present, the worst
case for the kernel's walk). Prints the median and best time per scan.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from trimig.kernel import (
    MADV_POPULATE_WRITE,
    PAGE_SIZE,
    Feature,
    Mapping,
    Mode,
    PagemapScanner,
    Userfaultfd,
    memfd_create,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    size: int = args.size
    fd = memfd_create("bench")
    os.ftruncate(fd, size)
    rng = np.random.default_rng(1)
    with (
        Mapping(fd, size) as mapping,
        Userfaultfd.create() as uffd,
        PagemapScanner(os.getpid()) as scanner,
    ):
        uffd.api(Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM)
        uffd.register(mapping.address, size, Mode.WP)
        start, end = mapping.address, mapping.address + size
        for populated in (False, True):
            if populated:
                mapping.madvise(MADV_POPULATE_WRITE)
            uffd.writeprotect(start, size, protect=True)
            scanner.take_written(start, end)
            label = "populated" if populated else "unpopulated"
            pages = np.frombuffer(mapping.buffer, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            for dirty in (0, 10, 100, 10_000):
                times = []
                found = 0
                for _ in range(args.rounds):
                    chosen = rng.choice(len(pages), size=dirty, replace=False)
                    pages[chosen, 0] += 1
                    began = time.perf_counter()
                    ranges = scanner.take_written(start, end)
                    times.append(time.perf_counter() - began)
                    found = int(((ranges[:, 1] - ranges[:, 0]) // PAGE_SIZE).sum())
                    assert found == dirty, (found, dirty)
                print(
                    f"{size >> 20} MiB {label:>11}, {dirty:>6} dirty pages: "
                    f"median {statistics.median(times) * 1e3:7.3f} ms, "
                    f"best {min(times) * 1e3:7.3f} ms"
                )
            del pages
            # Python-side overhead: a scan of one page (kernel work ~nil).
            times = []
            for _ in range(1000):
                began = time.perf_counter()
                scanner.take_written(start, start + PAGE_SIZE)
                times.append(time.perf_counter() - began)
            print(f"  per-call overhead (1-page scan): {statistics.median(times) * 1e6:.1f} us")
    os.close(fd)


if __name__ == "__main__":
    main()
