"""Hypothesis strategies that build whole migration streams with the encoders.

A :class:`StreamBuilder` writes a stream piece by piece and records, next to
the bytes, the (normalized, see helpers.normalize) events a decoder must
produce and the byte positions whose corruption must make decoding fail:

* ``any_change``: every other value there must raise (magic, version,
  configuration, section ids, footers, lengths of fixed-length commands, the
  PACKAGED blob length);
* ``flag_bytes``: the low byte of a RAM record word; XOR-ing in 0x40 (XBZRLE)
  or 0x01 (FULL) gives flags trimig rejects.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
from hypothesis import strategies as st

from trimig import codec
from trimig.codec import (
    Configuration,
    DeviceState,
    EndOfStream,
    FileHeader,
    OpenReturnPath,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamBlockInfo,
    RamEndOfSection,
    RamMemSize,
    RamRecordEncoder,
    RamWritten,
    RecvBitmap,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    SwitchoverStart,
    VmDescription,
)

PAGE = 4096
NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789/._:-é"

names = st.text(NAME_ALPHABET, min_size=1, max_size=24)
section_ids = st.integers(0, 2**32 - 1)


@attrs.define
class Block:
    name: str
    size: int
    page_size: int | None
    memory: np.ndarray

    @property
    def npages(self) -> int:
        return self.size // PAGE


@attrs.define
class Built:
    data: bytes
    events: list[Any]
    any_change: list[int]
    flag_bytes: list[int]
    legal_ends: list[int]
    local_page_sizes: dict[str, int]
    postcopy: bool

    def decoder(self, **kwargs: Any) -> codec.StreamDecoder:
        return codec.StreamDecoder(local_page_sizes=self.local_page_sizes, **kwargs)


class StreamBuilder:
    """Accumulates bytes, expected items and sensitive positions."""

    def __init__(self, base: int = 0) -> None:
        self.parts: list[bytes] = []
        self.pos = base
        self.events: list[Any] = []
        self.any_change: list[int] = []
        self.flag_bytes: list[int] = []
        self.legal_ends: list[int] = []

    def add(self, data: bytes | memoryview, *events: Any, sensitive: range = range(0)) -> int:
        start = self.pos
        self.parts.append(bytes(data))
        self.pos += len(data)
        self.events.extend(events)
        self.any_change.extend(start + offset for offset in sensitive)
        return start

    def data(self) -> bytes:
        return b"".join(self.parts)

    # --- stream structure ---------------------------------------------------------

    def header(self) -> None:
        start = codec.encode_stream_start()
        self.add(start, FileHeader(3), Configuration("trimig"), sensitive=range(len(start)))

    def command(self, data: bytes, event: Any, *, fixed_length: bool) -> None:
        self.add(data, event, sensitive=range(3, 5) if fixed_length else range(0))

    def section_header(self, data: bytes, event: Any) -> None:
        self.add(data, event, sensitive=range(1, 5))

    def footer(self, section_id: int) -> None:
        self.add(
            codec.encode_section_footer(section_id),
            SectionFooter(section_id),
            sensitive=range(5),
        )

    def device(self, kind: str, section_id: int, idstr: str, version: int, data: bytes) -> None:
        """A non-RAM section (``kind``: full, start, part or end) with a blob body."""
        if kind == "full":
            header = codec.encode_section_full(section_id, idstr, 0, version)
            self.section_header(header, SectionFull(section_id, idstr, 0, version))
        elif kind == "start":
            header = codec.encode_section_start(section_id, idstr, 0, version)
            self.section_header(header, SectionStart(section_id, idstr, 0, version))
        elif kind == "part":
            self.section_header(codec.encode_section_part(section_id), SectionPart(section_id))
        else:
            self.section_header(codec.encode_section_end(section_id), SectionEnd(section_id))
        self.add(codec.encode_blob(data), DeviceState(section_id, data))
        self.footer(section_id)

    def eof(self, vm_description: bytes | None) -> None:
        self.add(codec.encode_eof(), EndOfStream())
        if vm_description is not None:
            self.legal_ends.append(self.pos)
            self.add(codec.encode_vm_description(vm_description), VmDescription(vm_description))
        self.legal_ends.append(self.pos)

    # --- RAM --------------------------------------------------------------------

    def ram_word(self, at: int) -> None:
        self.flag_bytes.append(at + 7)

    def pages(self, encoder: RamRecordEncoder, block: Block, offsets: list[int]) -> None:
        gather = encoder.encode_pages(block.name, np.array(offsets, dtype=np.uint64), block.memory)
        for index, part in enumerate(gather):
            at = self.add(part)
            if index % 2 == 0:
                self.ram_word(at)
        for offset in offsets:
            page = block.memory[offset : offset + PAGE].tobytes()
            self.events.append(("page", block.name, offset, page))

    def zeros(self, encoder: RamRecordEncoder, block: Block, offsets: list[int]) -> None:
        named = encoder.last_block != block.name
        data = encoder.encode_zero_pages(block.name, offsets)
        at = self.add(data)
        first = 9 + (1 + len(block.name.encode()) if named else 0)
        for index in range(len(offsets)):
            self.ram_word(at if index == 0 else at + first + 9 * (index - 1))
        self.events.extend(("zero", block.name, offset) for offset in offsets)

    def written(self, encoder: RamRecordEncoder, block: Block, offset: int, npages: int) -> None:
        at = self.add(
            encoder.encode_written(block.name, offset, npages),
            RamWritten(block.name, offset, npages),
        )
        self.ram_word(at)

    def end_of_section(self, encoder: RamRecordEncoder) -> None:
        self.ram_word(self.add(encoder.encode_end_of_section(), RamEndOfSection()))


# --- strategies ----------------------------------------------------------------------


@st.composite
def blocks(draw: st.DrawFn, *, postcopy: bool) -> list[Block]:
    block_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    result = []
    for name in block_names:
        npages = draw(st.integers(1, 40))
        page_size = draw(st.sampled_from([None, PAGE, 2 * PAGE, 2 << 20])) if postcopy else None
        seed = draw(st.integers(0, 2**32 - 1))
        memory = np.random.default_rng(seed).integers(0, 256, npages * PAGE, dtype=np.uint8)
        result.append(Block(name, npages * PAGE, page_size, memory))
    return result


@st.composite
def ram_body(
    draw: st.DrawFn, builder: StreamBuilder, encoder: RamRecordEncoder, ram: list[Block]
) -> None:
    """Page, zero-page, HOOK records and encoder resets, then EOS."""
    for _ in range(draw(st.integers(0, 6))):
        block = draw(st.sampled_from(ram))
        kind = draw(st.sampled_from(["pages", "pages", "run", "zeros", "written", "reset"]))
        page_offsets = st.integers(0, block.npages - 1).map(lambda page: page * PAGE)
        if kind == "pages":
            builder.pages(encoder, block, draw(st.lists(page_offsets, max_size=6)))
        elif kind == "run":  # long enough for the decoder's numpy path
            first = draw(st.integers(0, block.npages - 1))
            count = draw(st.integers(1, block.npages - first))
            offsets = [PAGE * page for page in range(first, first + count)]
            builder.pages(encoder, block, offsets)
        elif kind == "zeros":
            builder.zeros(encoder, block, draw(st.lists(page_offsets, max_size=20)))
        elif kind == "written":
            first = draw(st.integers(0, block.npages - 1))
            builder.written(
                encoder, block, first * PAGE, draw(st.integers(1, block.npages - first))
            )
        else:
            encoder.reset()
    builder.end_of_section(encoder)


@st.composite
def discard(draw: st.DrawFn, block: Block) -> PostcopyRamDiscard:
    def one_range(first: int) -> st.SearchStrategy[tuple[int, int]]:
        return st.integers(1, block.npages - first).map(lambda n: (first * PAGE, n * PAGE))

    ranges = draw(
        st.lists(
            st.integers(0, block.npages - 1).flatmap(one_range),
            min_size=1,
            max_size=codec.MAX_DISCARDS_PER_COMMAND,
        )
    )
    return PostcopyRamDiscard(block.name, tuple(ranges))


@st.composite
def command(draw: st.DrawFn, builder: StreamBuilder, ram: list[Block] | None) -> None:
    choices = ["ping", "switchover", "open_rp", "listen", "resume"]
    if ram:
        choices += ["discard", "recv_bitmap"]
    kind = draw(st.sampled_from(choices))
    if kind == "ping":
        value = draw(st.integers(0, 2**32 - 1))
        builder.command(codec.encode_ping(value), Ping(value), fixed_length=True)
    elif kind == "switchover":
        builder.command(codec.encode_switchover_start(), SwitchoverStart(), fixed_length=True)
    elif kind == "open_rp":
        builder.command(codec.encode_open_return_path(), OpenReturnPath(), fixed_length=True)
    elif kind == "listen":
        builder.command(codec.encode_postcopy_listen(), PostcopyListen(), fixed_length=True)
    elif kind == "resume":
        builder.command(codec.encode_postcopy_resume(), PostcopyResume(), fixed_length=True)
    elif kind == "recv_bitmap":
        assert ram
        block = draw(st.sampled_from(ram))
        data = codec.encode_recv_bitmap(block.name)
        builder.command(data, RecvBitmap(block.name), fixed_length=True)
    else:
        assert ram
        event = draw(discard(draw(st.sampled_from(ram))))
        data = codec.encode_postcopy_ram_discard(event.block, event.ranges)
        builder.command(data, event, fixed_length=False)


@attrs.define
class Devices:
    """Device sections: section id -> idstr (unique), as a stream assigns them."""

    ids: dict[int, str]
    bound: set[int] = attrs.Factory(set)


@st.composite
def device_section(draw: st.DrawFn, builder: StreamBuilder, devices: Devices) -> None:
    section_id = draw(st.sampled_from(sorted(devices.ids)))
    kinds = ["full", "start"] + (["part", "end"] if section_id in devices.bound else [])
    kind = draw(st.sampled_from(kinds))
    devices.bound.add(section_id)
    builder.device(
        kind,
        section_id,
        devices.ids[section_id],
        draw(st.integers(0, 2**32 - 1)),
        draw(st.binary(max_size=48)),
    )


@st.composite
def package(draw: st.DrawFn, builder: StreamBuilder, devices: Devices) -> None:
    """PACKAGED: LISTEN, device FULL sections, pings, RUN (a header-less stream)."""
    nested = StreamBuilder(base=builder.pos + 5 + 4)
    nested.command(codec.encode_postcopy_listen(), PostcopyListen(), fixed_length=True)
    for _ in range(draw(st.integers(0, 3))):
        section_id = draw(st.sampled_from(sorted(devices.ids)))
        data = draw(st.binary(max_size=32))
        nested.device("full", section_id, devices.ids[section_id], 1, data)
    for value in draw(st.lists(st.sampled_from([3, 0x42]), max_size=2)):
        nested.command(codec.encode_ping(value), Ping(value), fixed_length=True)
    nested.command(codec.encode_postcopy_run(), PostcopyRun(), fixed_length=True)
    blob = nested.data()
    builder.add(
        codec.encode_packaged(blob), ("packaged", tuple(nested.events)), sensitive=range(3, 9)
    )
    builder.any_change.extend(nested.any_change)
    builder.flag_bytes.extend(nested.flag_bytes)


@st.composite
def streams(draw: st.DrawFn) -> Built:
    """A whole main stream: header, optional postcopy commands, RAM START, a mix of
    RAM PARTs, device sections, commands and at most one package, RAM END, EOF."""
    postcopy = draw(st.booleans())
    ram = draw(blocks(postcopy=postcopy))
    ram_id = draw(section_ids)
    device_ids = draw(st.lists(section_ids.filter(lambda i: i != ram_id), max_size=3, unique=True))
    devices = Devices({sid: f"dev{index}/{sid}" for index, sid in enumerate(device_ids)})
    builder = StreamBuilder()
    encoder = RamRecordEncoder()
    builder.header()
    if postcopy:
        builder.command(codec.encode_open_return_path(), OpenReturnPath(), fixed_length=True)
        builder.command(codec.encode_ping(1), Ping(1), fixed_length=True)
        summary = 0
        for block in ram:
            summary |= block.page_size or PAGE
        builder.command(
            codec.encode_postcopy_advise(summary), PostcopyAdvise(summary, PAGE), fixed_length=True
        )
    for _ in range(draw(st.integers(0, 2))):
        draw(command(builder, None))
    infos = [RamBlockInfo(block.name, block.size, block.page_size) for block in ram]
    setup = codec.encode_ram_setup(ram_id, infos, postcopy=postcopy)
    expected_infos = tuple(
        RamBlockInfo(
            block.name,
            block.size,
            block.page_size if postcopy and block.page_size not in (None, PAGE) else None,
        )
        for block in ram
    )
    start = builder.add(
        setup,
        SectionStart(ram_id, "ram", 0, 4),
        RamMemSize(sum(block.size for block in ram), expected_infos),
        RamEndOfSection(),
        SectionFooter(ram_id),
        sensitive=range(1, 5),
    )
    builder.ram_word(start + 17)  # MEM_SIZE word, after the 17-byte START header
    builder.ram_word(start + len(setup) - 5 - 8)  # EOS word, before the footer
    builder.any_change.extend(range(start + len(setup) - 5, start + len(setup)))  # footer
    packaged = False
    for _ in range(draw(st.integers(0, 6))):
        kinds = ["ram", "ram", "command"] + (["device"] if devices.ids else [])
        if devices.ids and not packaged:
            kinds.append("package")
        kind = draw(st.sampled_from(kinds))
        if kind == "ram":
            builder.section_header(codec.encode_section_part(ram_id), SectionPart(ram_id))
            draw(ram_body(builder, encoder, ram))
            builder.footer(ram_id)
        elif kind == "command":
            draw(command(builder, ram))
        elif kind == "device":
            draw(device_section(builder, devices))
        else:
            packaged = True
            draw(package(builder, devices))
    builder.section_header(codec.encode_section_end(ram_id), SectionEnd(ram_id))
    draw(ram_body(builder, encoder, ram))
    builder.footer(ram_id)
    builder.eof(draw(st.none() | st.binary(max_size=40)))
    return Built(
        data=builder.data(),
        events=builder.events,
        any_change=builder.any_change,
        flag_bytes=builder.flag_bytes,
        legal_ends=builder.legal_ends,
        local_page_sizes={block.name: block.page_size or PAGE for block in ram},
        postcopy=postcopy,
    )
