"""The receive/next_event shell shared by every decoder (h11 style)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from trimig.codec._wire import Incomplete, Malformed, ReceiveBuffer
from trimig.codec.events import NEED_DATA, NeedData
from trimig.errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from trimig.codec._wire import BytesLike

EventT = TypeVar("EventT")

#: Default ``min_size`` of ``get_buffer``.
DEFAULT_RECEIVE_SIZE = 1 << 20


class DecoderBase(Generic[EventT]):
    """Buffering, EOF and error handling around a subclass's ``_step``.

    ``_step`` decodes one event at the start of the buffer and consumes its
    bytes, or raises ``Incomplete`` (leaving everything untouched) or
    ``Malformed``. The first error is final: later calls raise it again.
    """

    _where_suffix = ""

    def __init__(self) -> None:
        self._buffer = ReceiveBuffer()
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet decoded."""
        return self._buffer.offset

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buffer)

    @property
    def eof_received(self) -> bool:
        return self._eof

    def _check_open(self, what: str) -> None:
        if self._eof:
            raise LocalProtocolError(f"{what} after receive_eof()")

    def receive_data(self, data: BytesLike) -> None:
        """Append bytes from the peer (copied into the decoder's buffer)."""
        self._check_open("receive_data")
        self._buffer.barrier()
        self._buffer.append(data)

    def get_buffer(self, min_size: int = DEFAULT_RECEIVE_SIZE) -> memoryview:
        """A writable region (at least ``min_size`` bytes) to ``recv_into``; then ``commit``."""
        self._check_open("get_buffer")
        return self._buffer.get_buffer(min_size)

    def commit(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the region from ``get_buffer``."""
        self._check_open("commit")
        self._buffer.barrier()
        self._buffer.commit(nbytes)

    def receive_eof(self) -> None:
        """The peer closed its direction: no more bytes will come."""
        self._eof = True

    def _where(self) -> str:
        return f"offset {self._buffer.offset}{self._where_suffix}"

    def next_event(self) -> EventT | NeedData:
        """The next event, or NEED_DATA when the buffer holds no whole event.

        Raises RemoteProtocolError on malformed input, and after
        ``receive_eof()`` when the bytes end inside a record.
        """
        self._buffer.barrier()
        if self._error is not None:
            raise RemoteProtocolError(f"decoder failed earlier: {self._error}")
        try:
            return self._step()
        except Incomplete as exc:
            if not self._eof:
                return NEED_DATA
            error = RemoteProtocolError(f"stream truncated in {exc.what} at {self._where()}")
        except Malformed as exc:
            error = RemoteProtocolError(f"{exc} at {self._where()}")
        self._error = error
        raise error

    def _step(self) -> EventT:
        raise NotImplementedError
