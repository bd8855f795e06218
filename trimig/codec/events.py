"""Events of the migration stream and the return path.

Every decoder turns bytes into these immutable objects, one per ``next_event()``
call; the encoder functions turn (mostly) the same values back into bytes. The
numpy arrays in :class:`RamPages` and :class:`RamZeroPages` compare by content.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


#: Returned by ``next_event()`` when the buffered bytes do not hold a whole event.
NEED_DATA: Final = NeedData.NEED_DATA


def _array_eq(a: Any, b: Any) -> bool:
    return bool(np.array_equal(a, b))


_ARRAY = attrs.cmp_using(eq=_array_eq)

U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]


# --- Stream structure ----------------------------------------------------------


@attrs.frozen
class FileHeader:
    """Magic and version (always 3) at the start of a main channel."""

    version: int


@attrs.frozen
class Configuration:
    """The configuration section: the source's machine type."""

    machine: str


@attrs.frozen
class SectionStart:
    """``QEMU_VM_SECTION_START``: first chunk of an iterable device (RAM)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@attrs.frozen
class SectionFull:
    """``QEMU_VM_SECTION_FULL``: a whole device; a :class:`DeviceState` follows."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@attrs.frozen
class SectionPart:
    """``QEMU_VM_SECTION_PART`` of a section bound earlier by START."""

    section_id: int


@attrs.frozen
class SectionEnd:
    """``QEMU_VM_SECTION_END`` of a section bound earlier by START."""

    section_id: int


@attrs.frozen
class DeviceState:
    """The blob body of a non-RAM section: the device's opaque state."""

    section_id: int
    data: bytes


@attrs.frozen
class SectionFooter:
    """The footer after a section body; the decoder checked mark and id."""

    section_id: int


@attrs.frozen
class EndOfStream:
    """``QEMU_VM_EOF``: the device-state stream is complete."""


@attrs.frozen
class VmDescription:
    """The optional JSON trailer after ``QEMU_VM_EOF``."""

    json: bytes


@attrs.frozen
class ChannelClosed:
    """The transport ended (``receive_eof``) at a point where the stream may end."""


# --- RAM section body ----------------------------------------------------------


@attrs.frozen
class RamBlockInfo:
    """One RAMBlock of the MEM_SIZE list.

    ``page_size`` is on the wire only in postcopy for a block whose page size is
    not :data:`~trimig.codec.constants.TARGET_PAGE_SIZE`; otherwise it is None.
    """

    name: str
    size: int
    page_size: int | None = None


@attrs.frozen
class RamMemSize:
    """The MEM_SIZE record (RAM START body): total bytes and the block list."""

    total: int
    blocks: tuple[RamBlockInfo, ...]


@attrs.frozen
class RamPages:
    """Full pages of ``block``: ``pages[i]`` belongs at byte ``offsets[i]``.

    From a decoder, ``pages`` is an ``(n, TARGET_PAGE_SIZE)`` uint8 view into the
    decoder's buffer: valid only until the next call of any method of that
    decoder. Copy what must outlive it.
    """

    block: str
    offsets: U64Array = attrs.field(eq=_ARRAY, hash=False)
    pages: U8Array = attrs.field(eq=_ARRAY, hash=False, repr=False)


@attrs.frozen
class RamZeroPages:
    """Pages of ``block`` at ``offsets`` that are entirely zero."""

    block: str
    offsets: U64Array = attrs.field(eq=_ARRAY, hash=False)


@attrs.frozen
class RamWritten:
    """HOOK record: ``npages`` target pages from ``offset`` were written one-sided
    into the destination's registered region of ``block``."""

    block: str
    offset: int
    npages: int


@attrs.frozen
class RamEndOfSection:
    """EOS: the end of a RAM section body (or of a raw RAM channel)."""


# --- Commands (QEMU_VM_COMMAND) ----------------------------------------------------


@attrs.frozen
class OpenReturnPath:
    """``MIG_CMD_OPEN_RETURN_PATH``."""


@attrs.frozen
class Ping:
    """``MIG_CMD_PING``: answer with ``Pong(value)`` on the return path."""

    value: int


@attrs.frozen
class PostcopyAdvise:
    """``MIG_CMD_POSTCOPY_ADVISE``: OR of all block page sizes, and the TPS."""

    page_size_summary: int
    target_page_size: int


@attrs.frozen
class PostcopyListen:
    """``MIG_CMD_POSTCOPY_LISTEN`` (first item of the package)."""


@attrs.frozen
class PostcopyRun:
    """``MIG_CMD_POSTCOPY_RUN`` (last item of the package)."""


@attrs.frozen
class PostcopyRamDiscard:
    """``MIG_CMD_POSTCOPY_RAM_DISCARD``: byte ranges ``(start, length)`` of ``block``."""

    block: str
    ranges: tuple[tuple[int, int], ...]


@attrs.frozen
class Packaged:
    """``MIG_CMD_PACKAGED``: a header-less stream to decode with
    :meth:`StreamDecoder.package_decoder`."""

    blob: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


@attrs.frozen
class PostcopyResume:
    """``MIG_CMD_POSTCOPY_RESUME`` (end of the recovery handshake)."""


@attrs.frozen
class RecvBitmap:
    """``MIG_CMD_RECV_BITMAP``: send the received bitmap of ``block``."""

    block: str


@attrs.frozen
class SwitchoverStart:
    """``MIG_CMD_SWITCHOVER_START``."""


# --- Return path -------------------------------------------------------------------


@attrs.frozen
class Shut:
    """``MIG_RP_MSG_SHUT``: 0 = ok, anything else = the destination failed."""

    status: int


@attrs.frozen
class Pong:
    """``MIG_RP_MSG_PONG``: answer to ``Ping(value)``."""

    value: int


@attrs.frozen
class ReqPages:
    """``MIG_RP_MSG_REQ_PAGES_ID`` (``block`` named) or ``REQ_PAGES`` (``block`` is
    None: the same block as the previous request). ``start``/``length`` are bytes."""

    block: str | None
    start: int
    length: int


@attrs.frozen
class RpRecvBitmap:
    """``MIG_RP_MSG_RECV_BITMAP`` with its out-of-frame bitmap.

    ``bitmap``: one bit per target page, page ``p`` is bit ``p % 8`` of byte
    ``p // 8`` (little-endian), length a multiple of 8 bytes.
    """

    block: str
    bitmap: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


@attrs.frozen
class ResumeAck:
    """``MIG_RP_MSG_RESUME_ACK`` (value 1 means ready)."""

    value: int


@attrs.frozen
class SwitchoverAck:
    """``MIG_RP_MSG_SWITCHOVER_ACK``."""


StreamEvent = (
    FileHeader
    | Configuration
    | SectionStart
    | SectionFull
    | SectionPart
    | SectionEnd
    | DeviceState
    | SectionFooter
    | EndOfStream
    | VmDescription
    | ChannelClosed
    | RamMemSize
    | RamPages
    | RamZeroPages
    | RamWritten
    | RamEndOfSection
    | OpenReturnPath
    | Ping
    | PostcopyAdvise
    | PostcopyListen
    | PostcopyRun
    | PostcopyRamDiscard
    | Packaged
    | PostcopyResume
    | RecvBitmap
    | SwitchoverStart
)
"""Anything :meth:`StreamDecoder.next_event` returns besides NEED_DATA."""

RamEvent = RamPages | RamZeroPages | RamWritten | RamEndOfSection | ChannelClosed
"""Anything :meth:`RamChannelDecoder.next_event` returns besides NEED_DATA."""

ReturnPathEvent = Shut | Pong | ReqPages | RpRecvBitmap | ResumeAck | SwitchoverAck | ChannelClosed
"""Anything :meth:`ReturnPathDecoder.next_event` returns besides NEED_DATA."""
