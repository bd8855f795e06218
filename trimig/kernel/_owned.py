"""Ownership of kernel resources: closed once, by ``close()`` or by leaving a ``with`` block."""

from __future__ import annotations

import os
from typing import Self


class ClosesOnExit:
    """``with resource:`` closes the resource on exit; subclasses define ``close``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class OwnedFd(ClosesOnExit):
    """Owns one file descriptor, ``_fd`` (-1 once closed)."""

    _fd: int = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd; closing again does nothing."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
