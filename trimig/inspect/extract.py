"""``--extract DIR``: each RAM block of a stream written to a file of the block's size.

A page record writes its page at its offset; a zero page leaves a hole unless the page
was written earlier (then it is zeroed, as a destination would); an XBZRLE page is
applied to what the file holds. So each file ends as a destination's block would.
File names follow ``scripts/analyze-migration.py``: the block name without a leading
``/``, other ``/`` replaced by ``_``, plus ``.ram`` (``/rom@etc/acpi/tables`` ->
``rom@etc_acpi_tables.ram``).
"""

from __future__ import annotations

import os
from pathlib import Path

from trimig.errors import ConfigError


def block_file_name(name: str) -> str:
    """The file name of a RAM block's extract."""
    base = name[1:] if name.startswith("/") else name
    base = base.replace("/", "_").replace("\0", "_")
    return f"{base}.ram"


class RamExtractor:
    """Writes RAM blocks into ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike[str], page_size: int) -> None:
        self.directory = Path(directory)
        self.page_size = page_size
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"--extract {directory}: not a directory") from None
        except OSError as exc:
            raise ConfigError(f"--extract {directory}: {exc.strerror}") from None
        self._fds: dict[str, int] = {}
        self._written: dict[str, bytearray] = {}
        #: block name -> path of its file
        self.files: dict[str, str] = {}

    def open_block(self, name: str, size: int) -> None:
        """A block of the MEM_SIZE list (again: the file keeps its pages, takes the size)."""
        fd = self._fds.get(name)
        pages = -(-size // self.page_size)
        if fd is None:
            file_name = block_file_name(name)
            taken = {Path(path).name for path in self.files.values()}
            stem, number = file_name[: -len(".ram")], 2
            while file_name in taken:
                file_name, number = f"{stem}~{number}.ram", number + 1
            path = self.directory / file_name
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
            self._fds[name] = fd
            self._written[name] = bytearray(pages)
            self.files[name] = str(path)
        else:
            written = self._written[name]
            del written[pages:]
            written.extend(bytes(pages - len(written)))
        os.ftruncate(fd, size)

    def page(self, name: str, offset: int, data: memoryview | bytes | bytearray) -> None:
        os.pwrite(self._fds[name], data, offset)
        self._written[name][offset // self.page_size] = 1

    def zero(self, name: str, offset: int, fill: int) -> None:
        written = self._written[name]
        index = offset // self.page_size
        if written[index] or fill:
            os.pwrite(self._fds[name], bytes((fill,)) * self.page_size, offset)
            written[index] = 1

    def read(self, name: str, offset: int) -> bytes:
        """What the block's file holds at ``offset`` (one page)."""
        data = os.pread(self._fds[name], self.page_size, offset)
        return data + bytes(self.page_size - len(data))

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
