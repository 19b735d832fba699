"""The stream's state machine, driven through every transition with no event loop.

Plain synchronous tests: :class:`StreamState` does no I/O and reads no clock, so each test
builds one, calls transitions and checks the state, the connection and the buffer's accounting,
legal transitions and illegal ones (a precise :class:`StreamStateError`) alike.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mcp_sse_transport.stream_state
from mcp_sse_transport import SessionState as ExportedState
from mcp_sse_transport import SessionStatistics as ExportedStatistics
from mcp_sse_transport.flow import CreditLedger, GrantState
from mcp_sse_transport.handler import SessionState as HandlerState
from mcp_sse_transport.stream_state import (
    WRITE_CHUNK,
    Connection,
    FailureKind,
    SessionState,
    SessionStatistics,
    StreamState,
    StreamStateError,
)

FINAL = b"event: error\r\ndata: bye\r\n\r\n"


def new_stream(*, deferred: bool = False, max_events: int = 10, max_bytes: int = 1000) -> StreamState[Connection]:
    return StreamState(CreditLedger(max_events, max_bytes), deferred=deferred)


def ledger_of(stream: StreamState[Connection]) -> CreditLedger:
    """The stream's ledger, as the CreditLedger it is (the stream knows it by a protocol)."""
    assert isinstance(stream.ledger, CreditLedger)
    return stream.ledger


def buffered(stream: StreamState[Connection], *sizes: int) -> None:
    """Put events of ``sizes`` payload bytes in the buffer and the queue, as a producer would."""
    for size in sizes:
        assert ledger_of(stream).take(size)
        stream.enqueue(b"x" * (size + 10), size, f"t{ledger_of(stream).buffered_events}")


def attached(stream: StreamState[Connection]) -> Connection:
    connection = stream.attach(Connection())
    stream.start(connection)
    return connection


def test_session_state_is_one_enum_wherever_it_is_imported_from() -> None:
    assert ExportedState is HandlerState is SessionState
    assert ExportedStatistics is SessionStatistics
    assert [state.value for state in SessionState] == ["open", "closing", "closed", "broken"]


def test_the_state_machine_loads_alone_with_no_anyio() -> None:
    """Loaded by itself, from its file: it needs nothing of the package, anyio or the SDK."""
    path = Path(mcp_sse_transport.stream_state.__file__)
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('stream_state', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['stream_state'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert not {'anyio', 'mcp', 'mcp_sse_transport'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_a_new_stream_is_open_detached_and_empty() -> None:
    stream = new_stream()
    assert (stream.state, stream.failure, stream.connection, stream.last_token) == (SessionState.OPEN, None, None, None)
    assert not stream.ended
    assert stream.lingering and stream.drained
    assert stream.deferred is None
    assert new_stream(deferred=True).deferred == []
    assert StreamState(CreditLedger(1, 1), deferred=False, last_token="7").last_token == "7"
    assert "open" in repr(stream)


# -- claims: the order of resumes -----------------------------------------------------------------


def test_claims_without_a_sequence_are_ordered_as_taken() -> None:
    stream = new_stream()
    first = stream.claim()
    second = stream.claim()
    assert (first, second) == ((0, 1), (0, 2))
    assert stream.is_latest(second) and not stream.is_latest(first)
    assert stream.claims == 2


def test_the_resume_that_arrived_last_wins_whatever_order_it_claims_in() -> None:
    stream = new_stream()
    late = stream.claim(5)
    early = stream.claim(3)  # arrived before `late`, claims after it
    assert stream.is_latest(late) and not stream.is_latest(early)
    assert stream.newest == late
    after = stream.claim()  # no sequence: in line after the newest
    assert after == (5, 3) and stream.is_latest(after)


# -- attach, start, supersede, detach ------------------------------------------------------------


def test_attach_counts_connections_and_refuses_a_second_while_attached() -> None:
    stream = new_stream()
    connection = stream.attach(Connection())
    assert stream.connection is connection and stream.connections == 1
    assert not stream.lingering and not stream.drained
    with pytest.raises(StreamStateError, match="a connection is attached: supersede it first"):
        stream.attach(Connection())
    assert stream.connection is connection and stream.connections == 1
    assert issubclass(StreamStateError, RuntimeError)


def test_an_ended_stream_can_still_be_attached() -> None:
    stream = new_stream()
    assert stream.close(None)
    assert stream.state is SessionState.CLOSED
    connection = attached(stream)
    assert stream.connection is connection and stream.connections == 1


def test_start_refuses_an_attachment_that_is_not_the_attached_one() -> None:
    stream = new_stream()
    stale = Connection()
    with pytest.raises(StreamStateError, match="superseded or has already run"):
        stream.start(stale)
    connection = attached(stream)
    assert not stream.detach(connection, lingers=True)
    with pytest.raises(StreamStateError, match="superseded or has already run"):
        stream.start(connection)


def test_supersede_marks_the_attached_connection_to_end_with_its_own_final_event() -> None:
    stream = new_stream()
    assert stream.supersede(FINAL) is None  # nothing attached: nothing to do
    connection = attached(stream)
    assert stream.supersede(FINAL) is connection
    assert connection.superseded and connection.stopped and not connection.dead
    assert stream.final_event(connection) == FINAL
    assert stream.graceful(connection)  # ended by the supersede, alive: the terminator is written
    assert connection.mark_dead()
    assert not connection.mark_dead()
    assert not stream.graceful(connection)
    assert stream.final_event(connection) is None  # gone, session open: nothing more is written


def test_detach_with_grace_leaves_the_session_open_and_lingering() -> None:
    stream = new_stream()
    connection = attached(stream)
    buffered(stream, 3)
    assert not stream.detach(connection, lingers=True)
    assert (stream.state, stream.connection, stream.failure) == (SessionState.OPEN, None, None)
    assert stream.lingering and not stream.drained  # the buffered event waits for a resume
    assert ledger_of(stream).buffered_events == 1


def test_detach_without_grace_breaks_the_session() -> None:
    stream = new_stream()
    connection = attached(stream)
    buffered(stream, 3)
    assert stream.detach(connection, lingers=False)
    assert stream.state is SessionState.BROKEN
    assert stream.failure == (FailureKind.CONNECTION_LOST, "the connection dropped")
    assert (ledger_of(stream).buffered_events, stream.queue) == (0, [])


def test_detach_while_closing_breaks_the_session_grace_or_not() -> None:
    stream = new_stream()
    connection = attached(stream)
    buffered(stream, 3)
    assert stream.close(FINAL)
    assert stream.detach(connection, lingers=True)
    assert stream.failure == (FailureKind.CONNECTION_LOST, "the connection dropped while draining")
    assert stream.state is SessionState.BROKEN


def test_detach_of_an_ended_stream_changes_nothing_more() -> None:
    stream = new_stream()
    connection = attached(stream)
    assert stream.close(None)
    stream.finish_close()
    assert not stream.detach(connection, lingers=False)
    assert (stream.state, stream.failure, stream.connection) == (SessionState.CLOSED, None, None)


def test_detach_of_another_connection_leaves_the_attached_one() -> None:
    stream = new_stream()
    connection = attached(stream)
    assert not stream.detach(Connection(), lingers=True)
    assert stream.connection is connection


# -- close, finish_close -------------------------------------------------------------------------


def test_close_with_nothing_to_deliver_ends_at_once() -> None:
    stream = new_stream()
    assert stream.close(FINAL)
    assert (stream.state, stream.final, stream.failure) == (SessionState.CLOSED, FINAL, None)
    assert stream.ended and not stream.lingering


def test_close_with_events_buffered_drains_then_finishes() -> None:
    stream = new_stream(max_events=1)
    connection = attached(stream)
    buffered(stream, 4)
    woken: list[str] = []
    waiting = ledger_of(stream).request(1, on_grant=lambda: woken.append("woken"))
    assert stream.close(FINAL)
    assert stream.state is SessionState.CLOSING and not stream.ended
    assert waiting.state is GrantState.FAILED and woken == ["woken"]  # no new grants once closing
    assert stream.final_event(connection) == FINAL
    stream.written(*stream.take()[1:])
    stream.finish_close()
    stats = stream.statistics("t")  # (a fresh read of the state: mypy narrowed the attribute)
    assert (stats.state, stats.events_sent) == (SessionState.CLOSED, 1)
    assert stream.graceful(connection)


def test_close_of_a_detached_stream_with_events_buffered_waits_for_a_resume() -> None:
    stream = new_stream()
    buffered(stream, 2)
    assert stream.close(None)
    assert stream.state is SessionState.CLOSING


def test_close_again_changes_nothing() -> None:
    stream = new_stream()
    attached(stream)
    buffered(stream, 1)
    assert stream.close(FINAL)
    assert not stream.close(b"other")
    assert (stream.state, stream.final) == (SessionState.CLOSING, FINAL)
    stream.fail(FailureKind.CONNECTION_LOST, "gone")
    assert not stream.close(None)
    assert stream.state is SessionState.BROKEN


@pytest.mark.parametrize("ending", ["open", "closed", "broken"])
def test_finish_close_only_from_closing(ending: str) -> None:
    stream = new_stream()
    if ending == "closed":
        stream.close(None)
    elif ending == "broken":
        stream.fail(FailureKind.EXPIRED, "late")
    with pytest.raises(StreamStateError, match=f"only a closing session can finish closing, this one is {ending}"):
        stream.finish_close()
    assert stream.state.value == ending


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FailureKind))
def test_fail_drops_the_buffer_and_stops_the_connection(kind: FailureKind) -> None:
    stream = new_stream(max_events=2)
    connection = attached(stream)
    buffered(stream, 5)
    granted = ledger_of(stream).request(1)
    waiting = ledger_of(stream).request(1)
    assert stream.fail(kind, "why", final=FINAL)
    assert (stream.state, stream.failure) == (SessionState.BROKEN, (kind, "why"))
    assert connection.dead and connection.final == FINAL
    assert stream.final_event(connection) == FINAL  # one try at a farewell, dead or not
    assert not stream.graceful(connection)
    assert (stream.queue, ledger_of(stream).buffered_events, ledger_of(stream).buffered_bytes) == ([], 0, 0)
    assert waiting.state is GrantState.FAILED
    assert granted.state is GrantState.GRANTED  # a granted producer finds out when it sends
    assert stream.connection is connection  # still attached until its run ends


def test_fail_replaces_a_superseded_connections_final_event() -> None:
    stream = new_stream()
    connection = attached(stream)
    stream.supersede(b"superseded")
    assert stream.fail(FailureKind.MOVED, "elsewhere")
    assert connection.final is None
    assert stream.final_event(connection) is None  # moved: nothing more is written from here


def test_the_first_ending_wins() -> None:
    stream = new_stream()
    assert stream.fail(FailureKind.STORE_UNAVAILABLE, "the store failed")
    assert not stream.fail(FailureKind.CONNECTION_LOST, "later")
    assert stream.failure == (FailureKind.STORE_UNAVAILABLE, "the store failed")
    closed = new_stream()
    assert closed.close(None)
    assert not closed.fail(FailureKind.CONNECTION_LOST, "after the close")
    assert (closed.state, closed.failure) == (SessionState.CLOSED, None)


def test_evict_only_an_open_stream() -> None:
    stream = new_stream()
    connection = attached(stream)
    assert stream.evict("the buffer was full", FINAL)
    assert stream.failure == (FailureKind.SLOW_CONSUMER, "slow consumer: the buffer was full")
    assert connection.final == FINAL
    closing = new_stream()
    attached(closing)
    buffered(closing, 1)
    closing.close(None)
    assert not closing.evict("late", FINAL)
    assert (closing.state, closing.failure) == (SessionState.CLOSING, None)


def test_expire_a_detached_stream() -> None:
    stream = new_stream()
    buffered(stream, 1)
    stream.expire("no resume within 1 s")
    assert stream.failure == (FailureKind.EXPIRED, "no resume within 1 s")
    assert stream.state is SessionState.BROKEN and ledger_of(stream).buffered_events == 0
    closing = new_stream()
    buffered(closing, 1)
    closing.close(None)
    closing.expire("no resume")  # a detached close waits for a resume as long as an open session
    assert closing.state is SessionState.BROKEN


def test_expire_refuses_an_attached_or_ended_stream() -> None:
    stream = new_stream()
    attached(stream)
    with pytest.raises(StreamStateError, match="an attached session cannot expire"):
        stream.expire("no resume")
    assert stream.state is SessionState.OPEN
    ended = new_stream()
    ended.close(None)
    with pytest.raises(StreamStateError, match="an ended session cannot expire, this one is closed"):
        ended.expire("no resume")
    assert (ended.state, ended.failure) == (SessionState.CLOSED, None)


# -- the buffer: deferring, queueing, taking -----------------------------------------------------


def test_defer_and_take_the_deferred_batch() -> None:
    stream = new_stream(deferred=True)
    stream.defer("message", b"a")
    stream.defer(None, b"bc")
    assert not stream.drained
    assert stream.take_deferred() == [("message", b"a"), (None, b"bc")]
    assert stream.deferred == [] and stream.take_deferred() == []


def test_defer_refused_without_deferring_or_once_not_open() -> None:
    with pytest.raises(StreamStateError, match="stores at once"):
        new_stream().defer("message", b"a")
    stream = new_stream(deferred=True)
    attached(stream)
    stream.defer("message", b"a")
    stream.close(None)
    with pytest.raises(StreamStateError, match="a closing session takes no events"):
        stream.defer("message", b"b")
    stream.fail(FailureKind.CONNECTION_LOST, "gone")
    assert stream.deferred == []  # dropped with the buffer


def test_enqueue_notes_the_token_and_is_refused_once_ended() -> None:
    stream = new_stream()
    attached(stream)
    stream.enqueue(b"encoded", 3, "7")
    assert (stream.last_token, stream.queue) == ("7", [(b"encoded", 3)])
    stream.close(None)
    stream.enqueue(b"more", 1, "8")  # stored while closing: still delivered
    assert stream.last_token == "8"
    stream.fail(FailureKind.CONNECTION_LOST, "gone")
    with pytest.raises(StreamStateError, match="a broken session queues no events"):
        stream.enqueue(b"late", 1, "9")
    assert stream.last_token == "8"


def test_take_joins_events_up_to_the_limit_at_least_one() -> None:
    stream = new_stream()
    for n, encoded in enumerate((b"a" * 40, b"b" * 40, b"c" * 40, b"d" * 200)):
        stream.enqueue(encoded, n + 1, str(n))
    assert stream.take(limit=100) == (b"a" * 40 + b"b" * 40, 2, 3)
    assert stream.take(limit=100) == (b"c" * 40, 1, 3)
    assert stream.take(limit=100) == (b"d" * 200, 1, 4)  # over the limit alone: taken whole
    with pytest.raises(StreamStateError, match="nothing is queued"):
        stream.take()
    assert WRITE_CHUNK == 64 * 1024


def test_written_gives_room_back_until_the_stream_ends() -> None:
    stream = new_stream()
    attached(stream)
    buffered(stream, 3, 4, 5)
    _, events, size = stream.take()
    assert (events, size) == (3, 12)
    assert ledger_of(stream).buffered_events == 3  # in flight still counts until written
    stream.written(events, size)
    assert (ledger_of(stream).buffered_events, stream.events_sent) == (0, 3)
    buffered(stream, 2)
    _, events, size = stream.take()
    stream.fail(FailureKind.CONNECTION_LOST, "gone")
    stream.written(events, size)  # the buffer was already emptied: counted, not released twice
    assert (ledger_of(stream).buffered_events, stream.events_sent) == (0, 4)


def test_wrote_counts_bytes_and_the_time_of_the_last_write() -> None:
    stream = new_stream()
    stream.wrote(10, 1.5)
    stream.wrote(5, 2.5)
    stream.heartbeats_sent += 1
    stats = stream.statistics("0123abcd")
    assert (stats.bytes_sent, stats.last_write, stats.heartbeats_sent) == (15, 2.5, 1)


def test_start_replay_gives_back_the_room_of_what_was_stored_only() -> None:
    stream = new_stream(deferred=True)
    buffered(stream, 3, 4)  # stored and queued
    assert ledger_of(stream).take(6)
    stream.defer("message", b"x" * 6)  # sent, not yet stored
    assert stream.start_replay() == "t2"
    assert stream.queue == []
    assert (ledger_of(stream).buffered_events, ledger_of(stream).buffered_bytes) == (1, 6)
    assert new_stream().start_replay() is None  # nothing stored: nothing to replay


def test_statistics_snapshot() -> None:
    stream = new_stream(max_events=2)
    connection = attached(stream)
    buffered(stream, 3)
    ledger_of(stream).request(1)
    ledger_of(stream).request(1)
    assert stream.statistics("0123abcd") == SessionStatistics(
        session="0123abcd",
        state=SessionState.OPEN,
        attached=True,
        buffered_events=1,
        buffered_bytes=3,
        reserved_events=1,
        producers_waiting=1,
        events_sent=0,
        bytes_sent=0,
        heartbeats_sent=0,
        connections=1,
        last_write=None,
    )
    stream.detach(connection, lingers=True)
    assert not stream.statistics("0123abcd").attached
