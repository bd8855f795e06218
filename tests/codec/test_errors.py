"""Malformed main streams: each is rejected with a message naming what was wrong."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from trimig import codec
from trimig.codec import (
    NEED_DATA,
    RamBlockInfo,
    RamRecordEncoder,
    StreamDecoder,
)
from trimig.errors import LocalProtocolError, RemoteProtocolError

from .helpers import drain

PAGE = 4096
BLOCK = "pc.ram"
BLOCK_SIZE = 16 * PAGE


def be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def ram_prologue(*, advise: bool = False) -> bytes:
    """Header, configuration, (ADVISE,) RAM START of one 16-page block, PART header."""
    return (
        codec.encode_stream_start()
        + (codec.encode_postcopy_advise(PAGE) if advise else b"")
        + codec.encode_ram_setup(0, [RamBlockInfo(BLOCK, BLOCK_SIZE)], postcopy=advise)
        + codec.encode_section_part(0)
    )


def decode_error(data: bytes, *, eof: bool = True, **kwargs: object) -> str:
    decoder = StreamDecoder(**kwargs)  # type: ignore[arg-type]
    decoder.receive_data(data)
    if eof:
        decoder.receive_eof()
    with pytest.raises(RemoteProtocolError) as info:
        while decoder.next_event() is not NEED_DATA:
            pass
    # The error is final: the decoder keeps refusing.
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        decoder.next_event()
    return str(info.value)


def command(number: int, payload: bytes = b"", length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return b"\x08" + struct.pack(">HH", number, size) + payload


# --- header and configuration -----------------------------------------------------


def test_bad_magic_names_the_value() -> None:
    message = decode_error(struct.pack(">II", 0x12345678, 3), eof=False)
    assert "bad magic 0x12345678" in message and "offset 0" in message


def test_version_2_is_obsolete_and_others_unsupported() -> None:
    assert "obsolete stream version 2" in decode_error(struct.pack(">II", 0x5145564D, 2))
    assert "unsupported stream version 4" in decode_error(struct.pack(">II", 0x5145564D, 4))


def test_configuration_section_is_required_and_checked() -> None:
    header = codec.encode_file_header()
    assert "expected the configuration section" in decode_error(header + b"\x01")
    other = header + codec.encode_configuration("pc-q35-11.0")
    assert "machine type 'pc-q35-11.0' differs" in decode_error(other)
    decoder = StreamDecoder(machine=None)
    decoder.receive_data(other + codec.encode_eof())
    decoder.receive_eof()
    assert drain(decoder)[1] == codec.Configuration("pc-q35-11.0")
    assert "machine type name of 0 bytes" in decode_error(header + b"\x07" + bytes(4))


@pytest.mark.parametrize(
    ("byte", "message"),
    [
        (0x05, "subsection"),
        (0x06, "VM description before QEMU_VM_EOF"),
        (0x07, "configuration section after"),
        (0x7E, "section footer outside a section"),
        (0x09, "unknown section type 0x09"),
        (0xFF, "unknown section type 0xff"),
    ],
)
def test_bad_top_level_bytes(byte: int, message: str) -> None:
    assert message in decode_error(codec.encode_stream_start() + bytes([byte]))


def test_stream_must_end_with_eof_and_only_vm_description_may_follow() -> None:
    start = codec.encode_stream_start()
    message = decode_error(start)
    assert "stream truncated" in message and "before QEMU_VM_EOF" in message
    assert f"offset {len(start)}" in message
    message = decode_error(start + b"\x00\x00")
    assert "unexpected bytes 00 after QEMU_VM_EOF" in message
    assert "only a VM description may follow" in message
    trailer = codec.encode_eof() + codec.encode_vm_description(b"{}")
    message = decode_error(start + trailer + b"\x00\x41")
    assert "unexpected bytes 00 41 after the end of the stream" in message
    long = decode_error(start + trailer + bytes(range(20)))
    assert "00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f ... (20 bytes so far)" in long


# --- sections ----------------------------------------------------------------------


def test_part_and_end_of_unknown_sections() -> None:
    start = codec.encode_stream_start()
    assert "SECTION_PART of unknown section id 7" in decode_error(
        start + codec.encode_section_part(7)
    )
    assert "SECTION_END of unknown section id 9" in decode_error(
        start + codec.encode_section_end(9)
    )


def test_section_id_cannot_be_rebound_to_another_device() -> None:
    data = (
        codec.encode_stream_start()
        + codec.encode_device_section(3, "timer", 0, 1, b"x")
        + codec.encode_device_section(3, "serial", 0, 1, b"y")
    )
    assert "bound to 'timer'/0" in decode_error(data)


def test_footer_mark_and_id_are_checked() -> None:
    start = codec.encode_stream_start() + codec.encode_section_full(5, "dev", 0, 1)
    body = codec.encode_blob(b"abc")
    missing = decode_error(start + body + b"\x00" + struct.pack(">I", 5))
    assert "Missing section footer for section 5" in missing
    mismatched = decode_error(start + body + codec.encode_section_footer(6))
    assert "Mismatched section id 6 in footer (expected 5)" in mismatched


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (codec.encode_section_full(0, "ram", 0, 4), "RAM sent as a FULL section"),
        (codec.encode_section_start(0, "ram", 1, 4), "instance id 1"),
        (codec.encode_section_start(0, "ram", 0, 3), "unsupported RAM section version 3"),
        (codec.encode_section_start(0, "ram", 0, 5), "unsupported RAM section version 5"),
    ],
)
def test_ram_section_identity(header: bytes, message: str) -> None:
    assert message in decode_error(codec.encode_stream_start() + header)


def test_second_ram_start_is_rejected() -> None:
    setup = codec.encode_ram_setup(0, [RamBlockInfo(BLOCK, BLOCK_SIZE)], postcopy=False)
    assert "second RAM START" in decode_error(codec.encode_stream_start() + setup + setup)


# --- RAM records -------------------------------------------------------------------


def test_mem_size_checks() -> None:
    start = codec.encode_stream_start() + codec.encode_section_start(0, "ram", 0, 4)
    not_first = start + be64(0x10)
    assert "must begin with a MEM_SIZE record" in decode_error(not_first)

    def mem_size(total: int, *entries: tuple[str, int]) -> bytes:
        out = be64(total | 0x4)
        for name, size in entries:
            out += bytes([len(name)]) + name.encode() + be64(size)
        return out

    over = mem_size(2 * PAGE, ("a", PAGE), ("b", 2 * PAGE))
    assert "add up to more than the MEM_SIZE total" in decode_error(start + over)
    twice = mem_size(2 * PAGE, ("a", PAGE), ("a", PAGE))
    assert "RAM block 'a' listed twice" in decode_error(start + twice)
    odd = mem_size(PAGE, ("a", 100))
    assert "not a positive multiple of 4096" in decode_error(start + odd)
    assert "empty RAM block name" in decode_error(start + mem_size(PAGE, ("", PAGE)))
    assert "not valid UTF-8" in decode_error(start + be64(PAGE | 4) + b"\x01\xff" + be64(PAGE))


def test_mem_size_page_size_is_read_only_after_advise_for_non_4k_blocks() -> None:
    huge = 2 << 20
    blocks = [RamBlockInfo("big", 4 * huge, huge), RamBlockInfo("small", PAGE, None)]
    data = (
        codec.encode_stream_start()
        + codec.encode_postcopy_advise(huge | PAGE)
        + codec.encode_ram_setup(0, blocks, postcopy=True)
        + codec.encode_eof()
    )
    decoder = StreamDecoder(local_page_sizes={"big": huge, "small": PAGE})
    decoder.receive_data(data)
    decoder.receive_eof()
    events = drain(decoder)
    assert codec.RamMemSize(4 * huge + PAGE, tuple(blocks)) in events
    # Without ADVISE the destination does not expect the page size field.
    data_no_advise = codec.encode_stream_start() + codec.encode_ram_setup(0, blocks, postcopy=False)
    decoder = StreamDecoder(local_page_sizes={"big": huge})
    decoder.receive_data(data_no_advise)
    assert drain_until_need(decoder)[-1] == codec.SectionFooter(0)
    # A page size that is not a power of two >= 4096 is refused.
    bad = (
        codec.encode_stream_start()
        + codec.encode_postcopy_advise(PAGE)
        + codec.encode_section_start(0, "ram", 0, 4)
        + be64(PAGE | 4)
        + b"\x03big"
        + be64(PAGE)
        + be64(3000)
    )
    assert "not a power of two" in decode_error(bad, local_page_sizes={"big": huge})


def drain_until_need(decoder: StreamDecoder) -> list[object]:
    events: list[object] = []
    while (event := decoder.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def test_continue_without_a_previous_block() -> None:
    message = decode_error(ram_prologue() + be64(0x28) + bytes(PAGE))
    assert "CONTINUE but no previous block" in message


def test_unknown_block_is_named() -> None:
    record = be64(0x08) + b"\x07pc.bios" + bytes(PAGE)
    message = decode_error(ram_prologue() + record)
    assert "unknown block 'pc.bios'" in message and "'pc.ram'" in message


def test_illegal_offset_slow_and_fast_paths() -> None:
    encoder = RamRecordEncoder()
    memory = np.zeros(64 * PAGE, dtype=np.uint8)
    inside = list(range(0, 15 * PAGE, PAGE))
    # A run of 15 good CONTINUE pages then one past the end (16 pages in the block).
    gather = encoder.encode_pages(BLOCK, [*inside, 20 * PAGE], memory)
    data = ram_prologue() + b"".join(gather)
    decoder = StreamDecoder()
    decoder.receive_data(data)
    decoder.receive_eof()
    events = []
    with pytest.raises(RemoteProtocolError, match=r"Illegal RAM offset 0x14000") as info:
        while True:
            events.append(decoder.next_event())
    pages = [event for event in events if isinstance(event, codec.RamPages)]
    assert sum(len(event.offsets) for event in pages) == 15
    assert f"at offset {len(data) - PAGE - 8}" in str(info.value)
    # A single named page past the end.
    single = RamRecordEncoder().encode_pages(BLOCK, [16 * PAGE], memory)
    assert "Illegal RAM offset 0x10000" in decode_error(ram_prologue() + b"".join(single))
    # ZERO and HOOK records are checked too.
    zero = RamRecordEncoder().encode_zero_pages(BLOCK, [16 * PAGE])
    assert "Illegal RAM offset" in decode_error(ram_prologue() + zero)
    hook = RamRecordEncoder().encode_written(BLOCK, 10 * PAGE, 7)
    assert "Illegal RAM offset 0xa000 (+7 pages)" in decode_error(ram_prologue() + hook)


def test_zero_page_fill_byte_must_be_zero() -> None:
    encoder = RamRecordEncoder()
    zeros = bytearray(encoder.encode_zero_pages(BLOCK, list(range(0, 12 * PAGE, PAGE))))
    zeros[-1] = 1  # the fill byte of the last record (inside a fast-path run)
    assert "fill byte 0x1" in decode_error(ram_prologue() + bytes(zeros))


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        (0x48, "PAGE|XBZRLE"),
        (0x40, "XBZRLE"),
        (0x200, "MULTIFD_FLUSH"),
        (0x100, "COMPRESS_PAGE"),
        (0x01, "FULL"),
        (0x0A, "ZERO|PAGE"),
        (0x30, "EOS|CONTINUE"),
        (0x400, "0x400"),
        (0x00, "0"),
    ],
)
def test_unsupported_flags_are_named(flags: int, name: str) -> None:
    message = decode_error(ram_prologue() + be64(flags) + bytes(16))
    assert f"unsupported RAM record flags {flags:#x} ({name})" in message


def test_misplaced_records() -> None:
    assert "MEM_SIZE record outside" in decode_error(ram_prologue() + be64(PAGE | 0x4))
    assert "EOS record with offset bits 0x1000" in decode_error(ram_prologue() + be64(PAGE | 0x10))
    hook = be64(0x80) + b"\x06pc.ram" + bytes(4)
    assert "HOOK record with zero pages" in decode_error(ram_prologue() + hook)


# --- commands ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (command(0), "unknown command 0"),
        (command(12), "unknown command 12"),
        (command(0xFFFF), "unknown command 65535"),
        (command(8), "command 8 (formerly ENABLE_COLO) is deprecated"),
        (command(2, bytes(3)), "PING received with bad length 3 (expected 4)"),
        (command(1, bytes(1)), "OPEN_RETURN_PATH received with bad length 1"),
        (command(4, bytes(2)), "POSTCOPY_LISTEN received with bad length 2"),
        (command(5, bytes(1)), "POSTCOPY_RUN received with bad length 1"),
        (command(7, bytes(8)), "PACKAGED received with bad length 8"),
        (command(9, bytes(1)), "POSTCOPY_RESUME received with bad length 1"),
        (command(11, bytes(4)), "SWITCHOVER_START received with bad length 4"),
        (command(3), "POSTCOPY_ADVISE received with bad length 0 (expected 16)"),
        (command(3, be64(PAGE) + be64(8192)), "target page size 8192"),
        (command(3, be64(0) + be64(PAGE)), "bad page size summary 0x0"),
        (command(3, be64(PAGE | 1) + be64(PAGE)), "bad page size summary 0x1001"),
    ],
)
def test_command_framing(frame: bytes, message: str) -> None:
    assert message in decode_error(codec.encode_stream_start() + frame)


def test_fixed_length_errors_come_before_the_payload_arrives() -> None:
    # The bad length is reported without waiting for (or reading) the payload.
    message = decode_error(codec.encode_stream_start() + command(2, length=900), eof=False)
    assert "PING received with bad length 900" in message


def discard_payload(name: bytes, ranges: list[tuple[int, int]], *, version: int = 0) -> bytes:
    body = b"".join(be64(start) + be64(length) for start, length in ranges)
    return bytes([version, len(name)]) + name + b"\0" + body


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (discard_payload(b"pc.ram", [(0, PAGE)], version=1), "version 1 (expected 0)"),
        (discard_payload(b"pc.ram", [(0, PAGE)])[:-1], "bad length 24"),
        (discard_payload(b"pc.ram", []) + bytes(10), "bad length 19"),
        (discard_payload(b"pc.ram", [(0, PAGE)] * 13), "13 ranges (at most 12)"),
        (discard_payload(b"pc.rom", [(0, PAGE)]), "unknown RAM block 'pc.rom'"),
        (discard_payload(b"pc.ram", [(0, 17 * PAGE)]), "lies outside block 'pc.ram'"),
        (discard_payload(b"pc.ram", [(100, PAGE)]), "empty or not aligned"),
        (discard_payload(b"pc.ram", [(0, 0)]), "empty or not aligned"),
        (
            discard_payload(b"pc.ram", [(0, PAGE)]).replace(b"ram\0", b"ram\1"),
            "not followed by NUL",
        ),
    ],
)
def test_discard_checks(payload: bytes, message: str) -> None:
    assert message in decode_error(ram_prologue()[:-5] + command(6, payload))


def test_recv_bitmap_checks() -> None:
    base = ram_prologue()[:-5]
    assert "RECV_BITMAP received with bad length 8" in decode_error(
        base + command(10, b"\x06pc.ram\x00")
    )
    assert "RECV_BITMAP received with bad length 0" in decode_error(base + command(10))
    assert "unknown RAM block 'rom'" in decode_error(base + command(10, b"\x03rom"))


def test_package_rules() -> None:
    run = codec.encode_postcopy_run()
    decoder = StreamDecoder()
    decoder.receive_data(codec.encode_stream_start() + codec.encode_packaged(b""))
    drain_until_need(decoder)

    def package_error(blob: bytes) -> str:
        nested = decoder.package_decoder(blob)
        with pytest.raises(RemoteProtocolError) as info:
            drain(nested)
        assert "of the PACKAGED blob" in str(info.value)
        return str(info.value)

    assert "before POSTCOPY_RUN" in package_error(codec.encode_postcopy_listen())
    assert "before POSTCOPY_RUN" in package_error(b"")
    assert "QEMU_VM_EOF inside a PACKAGED blob" in package_error(codec.encode_eof())
    assert "data after POSTCOPY_RUN" in package_error(run + codec.encode_ping(4))
    inner = codec.encode_packaged(run)
    assert "PACKAGED inside a PACKAGED blob" in package_error(inner)
    assert drain(decoder.package_decoder(run)) == [codec.PostcopyRun()]


def test_truncated_package_blob_is_reported() -> None:
    data = codec.encode_stream_start() + codec.encode_packaged(bytes(100))[:-10]
    assert "stream truncated in a PACKAGED blob of 100 bytes" in decode_error(data)


# --- API misuse -----------------------------------------------------------------------


def test_feeding_after_eof_is_a_local_error() -> None:
    decoder = StreamDecoder()
    decoder.receive_eof()
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        decoder.get_buffer()


def test_commit_must_fit_the_lent_region() -> None:
    decoder = StreamDecoder()
    region = decoder.get_buffer(16)
    with pytest.raises(LocalProtocolError):
        decoder.commit(len(region) + 1)
    with pytest.raises(LocalProtocolError):
        decoder.get_buffer(0)
