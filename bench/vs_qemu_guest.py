"""The QEMU guest of bench/vs_qemu.py: bench/qemu_guest.S, assembled, as a 64 KiB -bios image."""

from __future__ import annotations

import struct

#: ``as --32 bench/qemu_guest.S`` then ``objcopy -O binary -j .text`` (see that file).
FIRMWARE_CODE = bytes.fromhex(
    "fafce4920c0224fee6922e660f0116e0000f20c06683c8010f22c066ea23000f00080066b810008ed88ec08ed08ee0"
    "8ee8bc000008000f011df0010f00c705f000e0feff010000c7055003e0fe00070000c7056003e0fe00040000b011e6"
    "20e6a0b020e621b028e6a1b004e621b002e6a1b001e621e6a1b0fee621b0ffe6a1b034e643a10c020f00e64088e0e6"
    "408b3500020f00fbf4fa8b0d08020f0085c974f3fe0681c6001000003b3504020f0072068b3500020f004975e7ebd8"
    "50b020e62058cf8d742600900000000000000000ffff0000009bcf00ffff00000093cf001700c8000f006690"
    + "00" * 256  # the IDT's first 32 gates
    + "bc000800008e0f000701e8000f008db426000000008d7600000010000000103c00000000a9040000"
)
FIRMWARE_PARAMS = 0x200  # "params" in qemu_guest.S: first, last, per_tick, divisor (u32 each)
FIRMWARE_SIZE = 0x10000
RESET_VECTOR = 0xFFF0
PIT_HZ = 1193182
PAGE = 4096


def firmware(first: int, last: int, dirty_rate: int) -> tuple[bytes, float]:
    """The 64 KiB -bios image sweeping [first, last) at ``dirty_rate`` bytes/s (0: idle),
    and the rate it actually runs at (the PIT divisor and the pages per tick are integers)."""
    if dirty_rate:
        per_tick = max(1, round(dirty_rate / PAGE / 1000))
        divisor = max(1, min(0xFFFF, round(PIT_HZ * per_tick * PAGE / dirty_rate)))
    else:
        per_tick, divisor = 0, 1193
    image = bytearray(FIRMWARE_SIZE)
    image[: len(FIRMWARE_CODE)] = FIRMWARE_CODE
    struct.pack_into("<IIII", image, FIRMWARE_PARAMS, first, last, per_tick, divisor)
    image[RESET_VECTOR : RESET_VECTOR + 5] = b"\xea" + struct.pack("<HH", 0, 0xF000)
    return bytes(image), per_tick * PAGE * PIT_HZ / divisor
