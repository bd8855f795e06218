"""Decoders of the main migration stream and of a raw RAM channel (sans-io).

Feed bytes with ``receive_data`` (copying) or ``get_buffer`` + ``commit``
(zero-copy ``recv_into``), then call ``next_event`` until it returns
:data:`~trimig.codec.events.NEED_DATA`. ``receive_eof`` marks the end of the
bytes; after it, a stream that ends inside a record (or before
``QEMU_VM_EOF``) raises :class:`~trimig.errors.RemoteProtocolError`, and a
stream that ended where it may end yields :class:`ChannelClosed`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from trimig.codec._base import DecoderBase
from trimig.codec._wire import Cursor, Incomplete, Malformed, decode_name
from trimig.codec.constants import (
    MACHINE_TYPE,
    MAX_DISCARDS_PER_COMMAND,
    MIG_CMD_FIXED_LENGTH,
    MIG_CMD_MAX,
    POSTCOPY_ADVISE_LENGTH,
    POSTCOPY_RAM_DISCARD_VERSION,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    RAM_IDSTR,
    RAM_INSTANCE_ID,
    RAM_VERSION_ID,
    TARGET_PAGE_SIZE,
    MigCmd,
    SectionType,
)
from trimig.codec.encoder import MAX_MACHINE_TYPE_LENGTH
from trimig.codec.events import (
    ChannelClosed,
    Configuration,
    DeviceState,
    EndOfStream,
    FileHeader,
    OpenReturnPath,
    Packaged,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamBlockInfo,
    RamEndOfSection,
    RamEvent,
    RecvBitmap,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamEvent,
    SwitchoverStart,
    VmDescription,
)
from trimig.codec.ram_records import RamRecordDecoder
from trimig.errors import LocalProtocolError


class _State(enum.Enum):
    HEADER = "the file header"
    CONFIGURATION = "the configuration section"
    TOP = "a top-level record"
    RAM_BODY = "a RAM section body"
    DEVICE_BODY = "a device section body"
    FOOTER = "a section footer"
    AFTER_EOF = "after QEMU_VM_EOF"
    DONE = "the end of the stream"


_COMMAND_EVENTS: dict[MigCmd, StreamEvent] = {
    MigCmd.OPEN_RETURN_PATH: OpenReturnPath(),
    MigCmd.POSTCOPY_LISTEN: PostcopyListen(),
    MigCmd.POSTCOPY_RUN: PostcopyRun(),
    MigCmd.POSTCOPY_RESUME: PostcopyResume(),
    MigCmd.SWITCHOVER_START: SwitchoverStart(),
}


class StreamDecoder(DecoderBase[StreamEvent]):
    """Decodes a main migration channel into :data:`StreamEvent` objects.

    ``expect_header``: the bytes start with the file header and the
    configuration section (a new migration); False for a PACKAGED blob or a
    channel that replaces a broken one (see :meth:`successor`).
    ``machine``: the machine type the configuration section must name (None
    accepts any). ``local_page_sizes``: the destination's page size per RAM
    block; in postcopy a MEM_SIZE entry carries a page size exactly for the
    blocks whose local page size is not TARGET_PAGE_SIZE.
    """

    def __init__(
        self,
        *,
        expect_header: bool = True,
        machine: str | None = MACHINE_TYPE,
        local_page_sizes: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self._machine = machine
        self._state = _State.HEADER if expect_header else _State.TOP
        self._package = False
        self._sections: dict[int, tuple[str, int]] = {}
        self._ram_section: int | None = None
        self._ram_started = False
        self._expect_mem_size = False
        self._current = 0  # section whose body or footer comes next
        self._ram = RamRecordDecoder(local_page_sizes=local_page_sizes)

    # --- state shared with derived decoders -----------------------------------------

    @property
    def ram_blocks(self) -> Mapping[str, int]:
        """RAM block sizes from MEM_SIZE (empty before it)."""
        return dict(self._ram.blocks)

    @property
    def postcopy_advised(self) -> bool:
        """Whether POSTCOPY_ADVISE was seen."""
        return self._ram.postcopy_advised

    def _derive(self) -> StreamDecoder:
        other = StreamDecoder(expect_header=False, machine=self._machine)
        other._sections = dict(self._sections)
        other._ram_section = self._ram_section
        other._ram_started = self._ram_started
        other._ram = self._ram.copy()
        return other

    def package_decoder(self, blob: bytes) -> StreamDecoder:
        """A decoder for the blob of a :class:`Packaged` event, already fed and closed.

        It knows this decoder's sections and RAM blocks; the blob must end with
        POSTCOPY_RUN and may hold neither QEMU_VM_EOF nor another PACKAGED.
        """
        nested = self._derive()
        nested._package = True
        nested._where_suffix = " of the PACKAGED blob"
        nested.receive_data(blob)
        nested.receive_eof()
        return nested

    def successor(self) -> StreamDecoder:
        """A decoder for a new main channel that continues this stream (postcopy
        recovery): no header, same sections and RAM blocks, no last block."""
        return self._derive()

    def ram_channel_decoder(self) -> RamChannelDecoder:
        """A decoder for a raw RAM channel (postcopy preempt) with this stream's blocks."""
        return RamChannelDecoder(self._ram.blocks)

    # --- readers that take page records off the stream themselves --------------------

    def take_ram_records(self) -> tuple[str, int, bytes] | None:
        """Let the reader take the RAM page records that follow off the stream itself
        (the postcopy listener scatters them straight into place).

        When this decoder is in a RAM section body between records and knows the last
        block: return that block's name and size, and the bytes received but not yet
        decoded, which begin the next record and leave the decoder. Otherwise None, and
        nothing changes. The reader may take CONTINUE page records of that block (an
        8-byte word and a 4096-byte page each; they change no decoder state), reports
        their bytes with ``skip``, then gives back with ``receive_data`` every byte from
        the first record it did not take.
        """
        if self._state is not _State.RAM_BODY or self._expect_mem_size or self._eof:
            return None
        block = self._ram.last_block
        if block is None:
            return None
        buffer = self._buffer
        pending = bytes(buffer.view[buffer.start : buffer.end])
        buffer.start = buffer.end  # taken, not decoded: the offset stays at their start
        return block, self._ram.blocks[block], pending

    def skip(self, nbytes: int) -> None:
        """Account ``nbytes`` of records the reader took (see ``take_ram_records``)."""
        if nbytes < 0 or self.buffered:
            raise LocalProtocolError(
                f"skip({nbytes}) with {self.buffered} bytes buffered: records are skipped "
                "right after take_ram_records, before any byte is given back"
            )
        self._buffer.offset += nbytes

    # --- decoding -----------------------------------------------------------------

    def _step(self) -> StreamEvent:
        buffer = self._buffer
        state = self._state
        if buffer.start == buffer.end:
            if state is _State.AFTER_EOF or state is _State.DONE:
                if self._eof:
                    return ChannelClosed()
                raise Incomplete(state.value)
            if self._eof:
                end = "POSTCOPY_RUN" if self._package else "QEMU_VM_EOF"
                raise Malformed(f"stream truncated in {state.value} before {end}")
            raise Incomplete(state.value)
        if state is _State.RAM_BODY:
            return self._step_ram()
        if state is _State.TOP:
            return self._step_top()
        if state is _State.FOOTER:
            return self._step_footer()
        if state is _State.DEVICE_BODY:
            return self._step_device()
        if state is _State.HEADER:
            return self._step_header()
        if state is _State.CONFIGURATION:
            return self._step_configuration()
        if state is _State.AFTER_EOF:
            return self._step_vm_description()
        if self._package:
            raise Malformed("data after POSTCOPY_RUN")
        raise Malformed(
            f"{self._trailing_bytes()} after the end of the stream (QEMU_VM_EOF and its VM "
            "description)"
        )

    def _step_header(self) -> FileHeader:
        cursor = Cursor(self._buffer, "the file header")
        magic = cursor.be32()
        if magic != QEMU_VM_FILE_MAGIC:
            hint = ""
            if magic >> 16 == 0x1603:  # a TLS handshake record: the source speaks TLS
                hint = "; it is a TLS handshake: the source uses TLS, set tls-creds here too"
            raise Malformed(
                f"bad magic {magic:#010x} (expected {QEMU_VM_FILE_MAGIC:#010x}, 'QEVM'){hint}"
            )
        version = cursor.be32()
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise Malformed(f"obsolete stream version {version} (only 3 is supported)")
        if version != QEMU_VM_FILE_VERSION:
            raise Malformed(f"unsupported stream version {version} (only 3 is supported)")
        self._buffer.consume(cursor.used)
        self._state = _State.CONFIGURATION
        return FileHeader(version)

    def _step_configuration(self) -> Configuration:
        cursor = Cursor(self._buffer, "the configuration section")
        kind = cursor.u8()
        if kind != SectionType.CONFIGURATION:
            raise Malformed(f"expected the configuration section (0x07), got byte {kind:#04x}")
        length = cursor.be32()
        if not 0 < length <= MAX_MACHINE_TYPE_LENGTH:
            raise Malformed(f"machine type name of {length} bytes")
        machine = decode_name(cursor.take(length), "machine type")
        if self._machine is not None and machine != self._machine:
            raise Malformed(f"machine type {machine!r} differs from ours ({self._machine!r})")
        self._buffer.consume(cursor.used)
        self._state = _State.TOP
        return Configuration(machine)

    def _step_top(self) -> StreamEvent:
        buffer = self._buffer
        kind = buffer.view[buffer.start]
        if kind == SectionType.COMMAND:
            return self._step_command()
        if kind == SectionType.SECTION_PART or kind == SectionType.SECTION_END:
            return self._step_part_end(kind)
        if kind == SectionType.SECTION_START or kind == SectionType.SECTION_FULL:
            return self._step_start_full(kind)
        if kind == SectionType.EOF:
            if self._package:
                raise Malformed("QEMU_VM_EOF inside a PACKAGED blob")
            buffer.consume(1)
            self._state = _State.AFTER_EOF
            return EndOfStream()
        if kind == SectionType.VMDESCRIPTION:
            raise Malformed("VM description before QEMU_VM_EOF")
        if kind == SectionType.CONFIGURATION:
            raise Malformed("configuration section after the start of the stream")
        if kind == SectionType.SUBSECTION:
            raise Malformed("subsection (0x05) at top level")
        if kind == SectionType.SECTION_FOOTER:
            raise Malformed("section footer outside a section")
        raise Malformed(f"unknown section type {kind:#04x}")

    def _step_start_full(self, kind: int) -> SectionStart | SectionFull:
        cursor = Cursor(self._buffer, "a section header")
        cursor.pos += 1
        section_id = cursor.be32()
        idstr = decode_name(cursor.counted(), "section idstr")
        instance_id = cursor.be32()
        version_id = cursor.be32()
        name = SectionType(kind).name
        bound = self._sections.get(section_id)
        if bound is not None and bound != (idstr, instance_id):
            raise Malformed(
                f"{name} binds section id {section_id} to {idstr!r}/{instance_id}, "
                f"but it is bound to {bound[0]!r}/{bound[1]}"
            )
        is_ram = idstr == RAM_IDSTR
        if is_ram:
            if kind == SectionType.SECTION_FULL:
                raise Malformed("RAM sent as a FULL section")
            if instance_id != RAM_INSTANCE_ID:
                raise Malformed(f"RAM section with instance id {instance_id} (expected 0)")
            if version_id != RAM_VERSION_ID:
                raise Malformed(f"unsupported RAM section version {version_id} (expected 4)")
            if self._ram_started:
                raise Malformed("second RAM START section")
        self._buffer.consume(cursor.used)
        self._sections[section_id] = (idstr, instance_id)
        self._current = section_id
        if is_ram:
            self._ram_section = section_id
            self._ram_started = True
            self._expect_mem_size = True
            self._state = _State.RAM_BODY
        else:
            self._state = _State.DEVICE_BODY
        if kind == SectionType.SECTION_START:
            return SectionStart(section_id, idstr, instance_id, version_id)
        return SectionFull(section_id, idstr, instance_id, version_id)

    def _step_part_end(self, kind: int) -> SectionPart | SectionEnd:
        cursor = Cursor(self._buffer, "a section header")
        cursor.pos += 1
        section_id = cursor.be32()
        if section_id not in self._sections:
            raise Malformed(f"{SectionType(kind).name} of unknown section id {section_id}")
        self._buffer.consume(cursor.used)
        self._current = section_id
        is_ram = section_id == self._ram_section
        self._state = _State.RAM_BODY if is_ram else _State.DEVICE_BODY
        if kind == SectionType.SECTION_PART:
            return SectionPart(section_id)
        return SectionEnd(section_id)

    def _step_ram(self) -> StreamEvent:
        if self._expect_mem_size:
            mem_size, used = self._ram.decode_mem_size(self._buffer)
            self._expect_mem_size = False
            self._buffer.consume(used)
            return mem_size
        event, used = self._ram.decode(self._buffer)
        self._buffer.consume(used)
        if isinstance(event, RamEndOfSection):
            self._state = _State.FOOTER
        return event

    def _step_device(self) -> DeviceState:
        cursor = Cursor(self._buffer, f"the device state of section {self._current}")
        length = cursor.be32()
        data = cursor.take(length)
        self._buffer.consume(cursor.used)
        self._state = _State.FOOTER
        return DeviceState(self._current, data)

    def _step_footer(self) -> SectionFooter:
        cursor = Cursor(self._buffer, "a section footer")
        mark = cursor.u8()
        if mark != SectionType.SECTION_FOOTER:
            raise Malformed(
                f"Missing section footer for section {self._current} (byte {mark:#04x})"
            )
        section_id = cursor.be32()
        if section_id != self._current:
            raise Malformed(
                f"Mismatched section id {section_id} in footer (expected {self._current})"
            )
        self._buffer.consume(cursor.used)
        self._state = _State.TOP
        return SectionFooter(section_id)

    def _step_vm_description(self) -> VmDescription:
        cursor = Cursor(self._buffer, "the VM description")
        kind = cursor.u8()
        if kind != SectionType.VMDESCRIPTION:
            raise Malformed(
                f"{self._trailing_bytes()} after QEMU_VM_EOF (only a VM description may follow)"
            )
        length = cursor.be32()
        json = cursor.take(length)
        self._buffer.consume(cursor.used)
        self._state = _State.DONE
        return VmDescription(json)

    def _trailing_bytes(self, shown: int = 16) -> str:
        """The bytes received past the end of the stream, named for an error message."""
        buffer = self._buffer
        data = bytes(buffer.view[buffer.start : min(buffer.end, buffer.start + shown)])
        text = f"unexpected bytes {data.hex(' ')}"
        if len(buffer) > shown:
            text += f" ... ({len(buffer)} bytes so far)"
        return text

    # --- commands -----------------------------------------------------------------

    def _step_command(self) -> StreamEvent:
        cursor = Cursor(self._buffer, "a command header")
        cursor.pos += 1
        number = cursor.be16()
        length = cursor.be16()
        if number == MigCmd.DEPRECATED_0:
            raise Malformed("command 8 (formerly ENABLE_COLO) is deprecated and rejected")
        if not 0 < number < MIG_CMD_MAX:
            raise Malformed(f"unknown command {number}")
        cmd = MigCmd(number)
        expected = MIG_CMD_FIXED_LENGTH.get(cmd)
        if cmd == MigCmd.POSTCOPY_ADVISE:
            expected = POSTCOPY_ADVISE_LENGTH
        if expected is not None and length != expected:
            raise Malformed(f"{cmd.name} received with bad length {length} (expected {expected})")
        cursor.what = f"command {cmd.name}"
        payload_start = cursor.pos
        cursor.need(length)
        event = _COMMAND_EVENTS.get(cmd)
        if event is None:
            event = self._command_payload(cmd, length, cursor)
        assert cmd == MigCmd.PACKAGED or cursor.pos == payload_start + length
        self._buffer.consume(cursor.used)
        if cmd == MigCmd.POSTCOPY_ADVISE:
            self._ram.postcopy_advised = True
        elif cmd == MigCmd.POSTCOPY_RUN and self._package:
            self._state = _State.DONE
        return event

    def _command_payload(self, cmd: MigCmd, length: int, cursor: Cursor) -> StreamEvent:
        if cmd == MigCmd.PING:
            return Ping(cursor.be32())
        if cmd == MigCmd.POSTCOPY_ADVISE:
            summary = cursor.be64()
            target_page_size = cursor.be64()
            if target_page_size != TARGET_PAGE_SIZE:
                raise Malformed(
                    f"POSTCOPY_ADVISE with target page size {target_page_size} "
                    f"(trimig uses {TARGET_PAGE_SIZE})"
                )
            if summary == 0 or summary % TARGET_PAGE_SIZE:
                raise Malformed(f"POSTCOPY_ADVISE with bad page size summary {summary:#x}")
            return PostcopyAdvise(summary, target_page_size)
        if cmd == MigCmd.POSTCOPY_RAM_DISCARD:
            return self._discard(length, cursor)
        if cmd == MigCmd.PACKAGED:
            if self._package:
                raise Malformed("PACKAGED inside a PACKAGED blob")
            size = cursor.be32()
            cursor.what = f"a PACKAGED blob of {size} bytes"
            return Packaged(cursor.take(size))
        assert cmd == MigCmd.RECV_BITMAP
        if length < 2 or length != 1 + cursor.u8():
            raise Malformed(f"RECV_BITMAP received with bad length {length}")
        block = decode_name(cursor.take(length - 1), "RAM block name")
        self._known_block(block, "RECV_BITMAP")
        return RecvBitmap(block)

    def _known_block(self, block: str, what: str) -> int:
        size = self._ram.blocks.get(block)
        if size is None:
            known = ", ".join(repr(name) for name in self._ram.blocks) or "none"
            raise Malformed(f"{what} names unknown RAM block {block!r} (known: {known})")
        return size

    def _discard(self, length: int, cursor: Cursor) -> PostcopyRamDiscard:
        if length < 20:
            raise Malformed(f"POSTCOPY_RAM_DISCARD received with bad length {length}")
        version = cursor.u8()
        if version != POSTCOPY_RAM_DISCARD_VERSION:
            raise Malformed(f"POSTCOPY_RAM_DISCARD version {version} (expected 0)")
        name_length = cursor.u8()
        rest = length - 3 - name_length
        if rest <= 0 or rest % 16:
            raise Malformed(
                f"POSTCOPY_RAM_DISCARD received with bad length {length} "
                f"for a {name_length}-byte block name"
            )
        if rest // 16 > MAX_DISCARDS_PER_COMMAND:
            raise Malformed(
                f"POSTCOPY_RAM_DISCARD with {rest // 16} ranges "
                f"(at most {MAX_DISCARDS_PER_COMMAND})"
            )
        block = decode_name(cursor.take(name_length), "RAM block name")
        if cursor.u8() != 0:
            raise Malformed("POSTCOPY_RAM_DISCARD block name is not followed by NUL")
        size = self._known_block(block, "POSTCOPY_RAM_DISCARD")
        ranges = []
        for _ in range(rest // 16):
            start = cursor.be64()
            span = cursor.be64()
            if start % TARGET_PAGE_SIZE or span % TARGET_PAGE_SIZE or span == 0:
                raise Malformed(f"discard range ({start:#x}, {span:#x}) is empty or not aligned")
            if start + span > size:
                raise Malformed(
                    f"discard range ({start:#x}, {span:#x}) lies outside block {block!r} "
                    f"of size {size:#x}"
                )
            ranges.append((start, span))
        return PostcopyRamDiscard(block, tuple(ranges))


class RamChannelDecoder(DecoderBase[RamEvent]):
    """Decodes a raw RAM channel (the postcopy preempt channel): page records only,
    no header, sections or commands; its own last block for CONTINUE. An EOS
    ends the channel; the transport may also just close at a record boundary."""

    def __init__(self, blocks: Mapping[str, int] | Iterable[RamBlockInfo]) -> None:
        super().__init__()
        if isinstance(blocks, Mapping):
            sizes = dict(blocks)
        else:
            sizes = {block.name: block.size for block in blocks}
        self._ram = RamRecordDecoder(sizes)
        self._done = False

    def _step(self) -> RamEvent:
        buffer = self._buffer
        if buffer.start == buffer.end:
            if self._eof:
                return ChannelClosed()
            raise Incomplete("a RAM record")
        if self._done:
            raise Malformed("data after EOS on the RAM channel")
        event, used = self._ram.decode(buffer)
        buffer.consume(used)
        if isinstance(event, RamEndOfSection):
            self._done = True
        return event
