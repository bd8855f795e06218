"""The source's return path: the reader of the destination's messages and its state.

One ``SourceReturnPath`` per migration, owned by the OutgoingMigration, its reader
(``read``) started in ``OutgoingMigration.run``'s nursery. It keeps what the messages
said: the PONG of each PING (``pong``), the SHUT and its status, the error that ended
the path. Everything that concerns the migration itself (page requests, what a PONG
means for postcopy, cancelling the work) goes back through ``ReturnPathOwner``.

Over a thread stream (a socket, TLS over one) an OS thread reads the messages
(``read_return_path``, the
thread driver of ``trimig.loops``), answers page requests on a threaded urgent channel
itself and posts everything else to the trio task; otherwise the trio task decodes them
itself (the trio driver). Both act on each message with the one synchronous step,
``handle``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Protocol

import trio

from .. import codec
from .._trio import open_nursery, sole_error
from ..channel import MigrationChannel
from ..codec._base import DEFAULT_RECEIVE_SIZE
from ..errors import RemoteProtocolError, TransportError
from ..loops import END, End, StreamFeed, decode, decode_in_thread
from ..postcopy import PageRequest
from ..threads import StopSignal, ThreadStream, run_in_thread, thread_stream
from ..trace import trace
from .postcopy import RequestServed

#: How long to wait for the destination's SHUT, or for the PONG of a barrier PING.
SHUT_TIMEOUT = 30.0
#: After the postcopy switch, how long past twice x-channel-timeout the destination may
#: take to answer (SHUT, the recovery handshake): it may first spend its own
#: x-channel-timeout noticing a break, and it does work (the end's guest calls) first.
ANSWER_MARGIN = 5.0


def answer_timeout(channel_timeout: float | None) -> float:
    """How long the source waits for an answer of the destination after the switch:
    bounded by x-channel-timeout (``2 * timeout + ANSWER_MARGIN``), SHUT_TIMEOUT without one."""
    return 2 * channel_timeout + ANSWER_MARGIN if channel_timeout else SHUT_TIMEOUT


#: After a send fails, how long to wait for the destination's SHUT that may explain it.
VERDICT_TIMEOUT = 2.0


class ReturnPathOwner(Protocol):
    """What the return path tells the migration that owns it."""

    def page_requested(self, event: codec.ReqPages, *, send_now: bool) -> PageRequest | None:
        """Validate and count a page request (RemoteProtocolError when the destination
        may not ask yet), then queue it for the background sender and return None, or,
        when ``send_now`` and there is an urgent channel trio sends on, return it for
        ``send_request``."""

    async def send_request(self, request: PageRequest) -> None:
        """Send the pages of an accepted request now, on the urgent channel."""

    def serve_in_thread(self, event: codec.ReqPages) -> RequestServed | None:
        """In the return-path thread: answer a page request, or return None to leave
        it to trio."""

    def request_served(self, served: RequestServed) -> None:
        """The return-path thread answered a page request: count it (trio)."""

    def pong_received(self, value: int) -> None:
        """PONG ``value`` came, before its ``pong`` event is set (PONG 0x42: postcopy
        runs on the destination)."""

    def cancel_work(self) -> None:
        """The return path failed while the migration works: stop the work."""

    def received_bitmap(self, event: codec.RpRecvBitmap) -> None:
        """Postcopy recovery: the destination's received bitmap of one block
        (RemoteProtocolError outside recovery or for an unknown block)."""

    def resume_acked(self, value: int) -> None:
        """Postcopy recovery: RESUME_ACK ``value`` came (RemoteProtocolError unless 1)."""


class SourceReturnPath:
    """The source's end of the return path: its reader, the PONGs and the SHUT."""

    def __init__(self, owner: ReturnPathOwner) -> None:
        self._owner = owner
        self._shut = trio.Event()
        #: The status of the destination's SHUT (0: loaded), None before it.
        self.shut_status: int | None = None
        #: The error that ended the path (a bad message, the path closed without SHUT).
        self.error: BaseException | None = None
        #: The migration is failing and waits for the destination's verdict: an error
        #: on the path then only ends that wait.
        self._failing = False
        self._pongs: dict[int, trio.Event] = {}

    @property
    def ended(self) -> bool:
        """SHUT came, or the path failed: no message is read any more."""
        return self._shut.is_set()

    def pong(self, value: int) -> trio.Event:
        """The event set once PONG ``value`` has come."""
        return self._pongs.setdefault(value, trio.Event())

    # -- the reader ----------------------------------------------------------------------

    async def read(
        self,
        channel: MigrationChannel,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read return-path messages until SHUT or the stream ends. Lives in run()'s nursery.

        Over a thread stream an OS thread reads them (``read_return_path``): it answers
        page requests on a threaded urgent channel itself and posts the rest to this task,
        which acts on them as the trio reader would (so not once it is cancelled).
        """
        stream = thread_stream(channel.stream)
        if stream is not None:
            trace("return_path_thread", stream=type(stream).__name__)
            posted, items = trio.open_memory_channel[object](math.inf)
            token = trio.lowlevel.current_trio_token()

            def deliver(item: object) -> None:
                token.run_sync_soon(_post, posted, item)

            thread = functools.partial(
                read_return_path, stream, serve=self._owner.serve_in_thread, deliver=deliver
            )
            async with open_nursery() as nursery:
                nursery.start_soon(functools.partial(run_in_thread, thread, urgent=True))
                task_status.started()
                async for item in items:
                    self.handle(item)
                    if self.ended:
                        break
                nursery.cancel_scope.cancel()
            return
        task_status.started()
        try:
            # A request handle() accepts is answered here (send_request), not queued.
            await decode(
                codec.ReturnPathDecoder(),
                channel.return_path(),
                self._handle_in_trio,
                self._owner.send_request,
            )
        except (RemoteProtocolError, TransportError) as exc:
            self._failed(exc)

    def _handle_in_trio(self, event: object) -> PageRequest | End | None:
        """The trio reader's step: ``handle`` with the requests to send now; END once
        the path has ended."""
        request = self.handle(event, send_now=True)
        return END if self.ended else request

    def handle(self, item: object, *, send_now: bool = False) -> PageRequest | None:
        """Act on one return-path item: a message, a request the thread answered, or
        the error that ended the path (posted by the thread). Returns an accepted page
        request for the caller to send now (only with ``send_now``); ``ended`` says
        whether the path has ended (SHUT, an error)."""
        try:
            if isinstance(item, (RemoteProtocolError, TransportError)):
                raise item
            if isinstance(item, RequestServed):
                self._owner.request_served(item)
                return None
            if isinstance(item, codec.ReqPages):
                return self._owner.page_requested(item, send_now=send_now)
            self._message(item)
        except (RemoteProtocolError, TransportError) as exc:
            self._failed(exc)
        return None

    def _message(self, event: object) -> None:
        """Act on a return-path message other than a page request. Raises
        RemoteProtocolError or TransportError for one that ends the path."""
        if isinstance(event, codec.Shut):
            self.shut_status = event.status
            if event.status:
                # The destination failed to load the stream: fail now, as QEMU's source
                # does ("Sibling indicated error"), not once the rest is sent.
                raise RemoteProtocolError(refusal(event.status))
            self._shut.set()
            return
        if isinstance(event, codec.Pong):
            self._owner.pong_received(event.value)
            self.pong(event.value).set()
            return
        if isinstance(event, codec.RpRecvBitmap):
            self._owner.received_bitmap(event)
            return
        if isinstance(event, codec.ResumeAck):
            self._owner.resume_acked(event.value)
            return
        if isinstance(event, codec.ChannelClosed):
            raise TransportError("the destination closed the return path without SHUT")
        raise RemoteProtocolError(f"unexpected return-path message {event!r}")

    def _failed(self, exc: RemoteProtocolError | TransportError) -> None:
        # Fail (or, once the guest runs on the destination, pause) now: cancel the work,
        # unless it is failing already (it only waited for this).
        self.error = exc
        self._shut.set()
        if not self._failing:
            self._owner.cancel_work()

    # -- what the migration asks -----------------------------------------------------------

    def check(self) -> None:
        """Raise the error that ended the path, or for a SHUT before the end."""
        if self.error is not None:
            raise self.error
        if self._shut.is_set():
            raise RemoteProtocolError(
                f"the destination shut the migration early (SHUT status {self.shut_status})"
            )

    async def wait_for_shut(self, timeout: float = SHUT_TIMEOUT, *, why: str = "") -> None:
        """Wait for the destination's SHUT(0), which confirms it loaded the stream, at most
        ``timeout`` (``why`` names where that bound comes from)."""
        with trio.move_on_after(timeout) as scope:
            await self._shut.wait()
        if scope.cancelled_caught:
            because = f" ({why})" if why else ""
            raise TransportError(f"destination did not confirm within {timeout:g} s{because}")
        if self.error is not None:
            raise self.error

    async def await_verdict(self, exc: BaseException, *, expected: bool) -> None:
        """The work failed with ``exc``. If on the link (a send refused, reset) and a
        verdict is ``expected``: a destination that refused the stream says so with
        SHUT(1) just before it closes, so give the return path a moment to deliver it;
        the failure then names the destination's verdict."""
        self._failing = True
        if expected and not self._shut.is_set() and isinstance(sole_error(exc), TransportError):
            with trio.move_on_after(VERDICT_TIMEOUT):
                await self._shut.wait()

    def failure_reason(self, exc: BaseException) -> str:
        """Why the migration failed: the destination's own verdict (a SHUT with an error
        status) first when it sent one."""
        reason = str(exc) or type(exc).__name__
        if self.shut_status:
            verdict = refusal(self.shut_status)
            if verdict not in reason:
                return f"{verdict}; here: {reason}"
        return reason


def refusal(status: int) -> str:
    """The source's words for a SHUT with error ``status`` from the destination."""
    return f"the destination failed to load the stream (SHUT status {status})"


def _post(channel: trio.MemorySendChannel[object], item: object) -> None:
    """Hand a return-path item to its task (run by trio; dropped once that task is gone)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        channel.send_nowait(item)


def read_return_path(
    stream: ThreadStream,
    stop: StopSignal,
    *,
    serve: Callable[[codec.ReqPages], RequestServed | None],
    deliver: Callable[[object], None],
) -> None:
    """The source's return-path thread: decode the messages read from ``stream``.

    A page request that ``serve`` answers is answered right here, and its RequestServed
    goes to ``deliver``; so does every other message, and the RemoteProtocolError or
    TransportError that ends the path. ``deliver`` must be safe to call from this thread
    (trio's ``run_sync_soon`` is). Returns after SHUT, the end of the path, an error, or
    ``stop``.
    """

    def serve_or_deliver(event: object) -> End | None:
        if isinstance(event, codec.ReqPages) and (served := serve(event)) is not None:
            deliver(served)
            return None
        deliver(event)
        return END if isinstance(event, (codec.Shut, codec.ChannelClosed)) else None

    feed = StreamFeed(stream, stop, what="the return path", chunk=DEFAULT_RECEIVE_SIZE)
    try:
        decode_in_thread(codec.ReturnPathDecoder(), feed, serve_or_deliver)
    except (RemoteProtocolError, TransportError) as exc:
        deliver(exc)
