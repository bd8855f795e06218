"""Numbers of the migration stream and the return path.

Values follow QEMU's migration stream (see ``docs/wire-format.md``); names keep
QEMU's spelling so that traces and the reference can be compared directly.
"""

from __future__ import annotations

import enum
from typing import Final

# --- File header ------------------------------------------------------------------

QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION: Final = 3
QEMU_VM_FILE_VERSION_COMPAT: Final = 2  # recognised and rejected as obsolete

#: The machine type trimig writes into the configuration section. A destination
#: rejects a stream whose machine type differs from its own.
MACHINE_TYPE: Final = "trimig"


# --- Top-level record types (first byte of each record) ---------------------------


class SectionType(enum.IntEnum):
    """The first byte of every top-level record (``QEMU_VM_*``)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


# --- RAM section -------------------------------------------------------------------

TARGET_PAGE_BITS: Final = 12
TARGET_PAGE_SIZE: Final = 1 << TARGET_PAGE_BITS  # 4096
#: Low bits of a record's be64 word that hold the flags (TARGET_PAGE_SIZE - 1).
RAM_FLAGS_MASK: Final = TARGET_PAGE_SIZE - 1

RAM_IDSTR: Final = "ram"
RAM_INSTANCE_ID: Final = 0
RAM_VERSION_ID: Final = 4

RAM_SAVE_FLAG_FULL: Final = 0x001  # obsolete, never sent
RAM_SAVE_FLAG_ZERO: Final = 0x002
RAM_SAVE_FLAG_MEM_SIZE: Final = 0x004
RAM_SAVE_FLAG_PAGE: Final = 0x008
RAM_SAVE_FLAG_EOS: Final = 0x010
RAM_SAVE_FLAG_CONTINUE: Final = 0x020
RAM_SAVE_FLAG_XBZRLE: Final = 0x040
RAM_SAVE_FLAG_HOOK: Final = 0x080
RAM_SAVE_FLAG_COMPRESS_PAGE: Final = 0x100  # removed in QEMU 9.1
RAM_SAVE_FLAG_MULTIFD_FLUSH: Final = 0x200

RAM_FLAG_NAMES: Final = {
    RAM_SAVE_FLAG_FULL: "FULL",
    RAM_SAVE_FLAG_ZERO: "ZERO",
    RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_SAVE_FLAG_PAGE: "PAGE",
    RAM_SAVE_FLAG_EOS: "EOS",
    RAM_SAVE_FLAG_CONTINUE: "CONTINUE",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}

#: Size of one ``PAGE|CONTINUE`` record (be64 word + page).
PAGE_RECORD_SIZE: Final = 8 + TARGET_PAGE_SIZE
#: Size of one ``ZERO|CONTINUE`` record (be64 word + fill byte).
ZERO_RECORD_SIZE: Final = 8 + 1


def describe_ram_flags(flags: int) -> str:
    """``0x28`` -> ``"PAGE|CONTINUE"``; unknown bits are shown in hex."""
    names = [name for bit, name in RAM_FLAG_NAMES.items() if flags & bit]
    rest = flags & ~sum(RAM_FLAG_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) if names else "0"


# --- Migration commands (QEMU_VM_COMMAND) -----------------------------------------


class MigCmd(enum.IntEnum):
    """``MIG_CMD_*``: the be16 command number after a ``0x08`` byte."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    DEPRECATED_0 = 8  # was ENABLE_COLO; reserved and rejected
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


MIG_CMD_MAX: Final = 12

#: Payload length of commands whose length is fixed. The others are checked
#: against their own payload (ADVISE: 16 in trimig; DISCARD; RECV_BITMAP).
MIG_CMD_FIXED_LENGTH: Final = {
    MigCmd.OPEN_RETURN_PATH: 0,
    MigCmd.PING: 4,
    MigCmd.POSTCOPY_LISTEN: 0,
    MigCmd.POSTCOPY_RUN: 0,
    MigCmd.PACKAGED: 4,
    MigCmd.POSTCOPY_RESUME: 0,
    MigCmd.SWITCHOVER_START: 0,
}

#: trimig always sends the 16-byte ADVISE (postcopy-ram); the empty form is for
#: dirty-bitmap-only postcopy, which trimig does not have.
POSTCOPY_ADVISE_LENGTH: Final = 16

MAX_DISCARDS_PER_COMMAND: Final = 12
POSTCOPY_RAM_DISCARD_VERSION: Final = 0
MAX_PACKAGED_SIZE: Final = 0xFFFFFFFF

#: PING values the source uses (only 1 and PACKAGE_LOADED carry meaning).
PING_RETURN_PATH_OPEN: Final = 1
PING_AFTER_DISCARD: Final = 2
PING_DEVICES_LOADED: Final = 3
PING_AFTER_PACKAGE: Final = 4
QEMU_VM_PING_PACKAGED_LOADED: Final = 0x42


# --- Return path (MIG_RP_MSG_*) ----------------------------------------------------


class RpMsg(enum.IntEnum):
    """``MIG_RP_MSG_*``: the be16 type of a return-path frame."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


MIG_RP_MSG_MAX: Final = 8
#: Largest return-path frame payload the source accepts.
MAX_RP_MESSAGE_LENGTH: Final = 512

MIG_RP_FIXED_LENGTH: Final = {
    RpMsg.SHUT: 4,
    RpMsg.PONG: 4,
    RpMsg.REQ_PAGES: 12,
    RpMsg.RESUME_ACK: 4,
    RpMsg.SWITCHOVER_ACK: 0,
}

RECV_BITMAP_ENDING: Final = 0x0123456789ABCDEF
#: trimig refuses a received bitmap larger than this (16 TiB of 4 KiB pages).
MAX_RECV_BITMAP_SIZE: Final = 1 << 29
RESUME_ACK_VALUE: Final = 1
