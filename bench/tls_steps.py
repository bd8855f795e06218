"""The CPU floor of trimig's TLS: the session's own steps, without sockets or engines.

Run: python bench/tls_steps.py [--mib 512] [--chunks 1M,256K]

One process, one core: windows of 256 PAGE records (the saver's gather arrays: an 8-byte
header then a 4 KiB page each) go through ``TlsSession.encrypt_items`` (the kernel's gather
into a staging buffer of each ``--chunks`` size, then ``SSLObject.write`` and the memory
BIO's read), and the ciphertext through ``feed`` and ``read_into`` on the peer's session
(the BIO's write, ``SSLObject.read``), fed ``chunk`` bytes at a time as a receive brings
them. The gather alone (``GatherCopy``) is timed too. Printed as CPU seconds per GiB, the
figures that bench/vs_qemu.py's CPU columns (TLS minus plaintext) are to be set against.
"""

from __future__ import annotations

import argparse
import ssl
import time

import numpy as np
import trustme

from trimig.codec.ram_records import RamRecordEncoder
from trimig.kernel.iov import GatherCopy, IoVector
from trimig.transports.tls_session import TlsSession
from trimig.units import parse_size

PAGES = 256
PAGE = 4096


def session_pair() -> tuple[TlsSession, TlsSession]:
    """A client and a server session, handshake done over memory."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client = TlsSession(client_context, server_side=False, server_hostname="localhost")
    server = TlsSession(server_context, server_side=True, server_hostname=None)
    done = False
    while not done:
        done = client.handshake_step()
        server.feed(client.take_output())
        done = server.handshake_step() and done
        if server.output_pending:
            client.feed(server.take_output())
    return client, server


def window(encoder: RamRecordEncoder, pages: np.ndarray) -> IoVector:
    offsets = np.arange(PAGES, dtype=np.uint64) * np.uint64(PAGE)
    headers, entries = encoder.encode_pages_gather("pc.ram", offsets, pages, 0)
    return IoVector(entries, (headers, pages))


def measure(mib: int, chunk: int) -> tuple[float, float, float]:
    """CPU seconds per GiB of (gather alone, encrypt_items, feed + read_into)."""
    client, server = session_pair()
    encoder = RamRecordEncoder()
    pages = np.random.default_rng(1).integers(0, 256, size=(PAGES, PAGE), dtype=np.uint8)
    staging = memoryview(bytearray(chunk))
    plain = memoryview(bytearray(2 << 20))
    gather = encrypt = decrypt = 0.0
    for _ in range(mib):
        vector = window(encoder, pages)
        start = time.process_time()
        copy = GatherCopy([vector])
        while copy.remaining:
            copy.copy_into(staging)
        gather += time.process_time() - start
        start = time.process_time()
        ciphertext = [p for pieces in client.encrypt_items([vector], staging) for p in pieces]
        encrypt += time.process_time() - start
        start = time.process_time()
        for piece in ciphertext:
            for at in range(0, len(piece), chunk):
                server.feed(memoryview(piece)[at : at + chunk])
                while server.read_into(plain):
                    pass
        decrypt += time.process_time() - start
    per_gib = 1024 / mib
    return gather * per_gib, encrypt * per_gib, decrypt * per_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB of page records per chunk size")
    parser.add_argument("--chunks", default="1M,256K", help="staging and receive sizes")
    args = parser.parse_args()
    print(f"{session_pair()[0].ssl_object.cipher()}; CPU s/GiB of page records")
    print(f"{'chunk':>8} {'gather':>8} {'encrypt_items':>14} {'feed+read_into':>15}")
    measure(32, parse_size("1M"))  # warm-up: the first figures would pay for it
    for text in args.chunks.split(","):
        gather, encrypt, decrypt = measure(args.mib, parse_size(text))
        print(f"{text:>8} {gather:8.2f} {encrypt:14.2f} {decrypt:15.2f}")


if __name__ == "__main__":
    main()
