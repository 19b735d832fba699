"""backplane: ``LocalBackplane``, one worker alone, and the ``Host`` protocol a backplane sees.

No sockets: the backplane is driven through its own methods, with real sessions from a
``SessionHost`` and a real in-memory store. How a whole transport uses it is in
test_transport.py and the scenario tests; the Redis backplane is in test_cluster*.py.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import anyio
import pytest
from starlette.requests import Request
from starlette.types import Message

from mcp_sse_transport.backplane import Backplane, Host, LocalBackplane
from mcp_sse_transport.claims import LocalClaimSequence
from mcp_sse_transport.host import SessionHost
from mcp_sse_transport.ids import EventId, session_tag
from mcp_sse_transport.ledger import MemoryRequestLedger
from mcp_sse_transport.session import NOT_FOUND
from mcp_sse_transport.store import InMemoryEventStore

from ._handlers import quiet_config

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def post_request(session_id: str = SESSION) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/messages/",
        "query_string": f"session_id={session_id}".encode(),
        "headers": [],
    }
    return Request(scope)


async def never_receive() -> Message:
    raise AssertionError("the local backplane reads nothing of a resume it does not serve")


async def never_send(message: Message) -> None:
    raise AssertionError("the local backplane answers nothing of a resume it does not serve")


def local() -> tuple[LocalBackplane, InMemoryEventStore]:
    store = InMemoryEventStore()
    return LocalBackplane(store), store


def test_it_keeps_its_store_a_memory_ledger_and_a_local_claim_sequence() -> None:
    backplane, store = local()
    assert backplane.store is store
    assert isinstance(backplane.ledger, MemoryRequestLedger)
    assert isinstance(backplane.claims, LocalClaimSequence)
    # Each backplane has its own ledger and sequence, never one shared between transports.
    other, _ = local()
    assert other.ledger is not backplane.ledger and other.claims is not backplane.claims


async def test_its_claim_sequence_draws_increasing_nonzero_numbers_for_any_session() -> None:
    backplane, _ = local()
    with anyio.fail_after(5):
        drawn = [await backplane.claims.next(session) for session in (SESSION, OTHER, SESSION, "never-opened")]
    # Never 0 ("unknown session"): one worker alone knows every session it could resume.
    assert drawn == sorted(drawn) and len(set(drawn)) == len(drawn) and drawn[0] >= 1


def test_it_serves_every_session_it_is_asked_about() -> None:
    backplane, _ = local()
    assert backplane.serves(SESSION) is True
    assert backplane.serves("not-even-a-session-id") is True


async def test_register_and_hand_off_change_nothing() -> None:
    backplane, store = local()
    host = SessionHost(quiet_config(), backplane)
    session, _ = host.create(SESSION, owner="")
    await store.append(SESSION, None, b"kept")
    with anyio.fail_after(5):
        await backplane.register(session)
        await backplane.hand_off(SESSION)
    assert len(store) == 1
    replay = await store.replay(SESSION, "0")
    assert replay is not None and [event.data for event in replay.events] == [b"kept"]
    assert not session.handed_off and not session.handler.ended
    assert len(host.sessions) == 0, "registering with the backplane is not the host's registry"


async def test_forget_drops_the_sessions_events_from_its_store_and_no_others() -> None:
    backplane, store = local()
    host = SessionHost(quiet_config(), backplane)
    session, _ = host.create(SESSION, owner="")
    await store.append(SESSION, "message", b"one")
    await store.append(SESSION, "message", b"two")
    await store.append(OTHER, "message", b"someone else's")
    assert len(store) == 2
    with anyio.fail_after(5):
        await backplane.forget(session)
    assert len(store) == 1
    assert await store.replay(SESSION, "1") is None, "the session's log is gone"
    kept = await store.replay(OTHER, "0")
    assert kept is not None and [event.data for event in kept.events] == [b"someone else's"]


async def test_forget_of_a_session_that_stored_nothing_is_harmless() -> None:
    backplane, store = local()
    session, _ = SessionHost(quiet_config(), backplane).create(SESSION, owner="")
    with anyio.fail_after(5):
        await backplane.forget(session)
        await backplane.forget(session)
    assert len(store) == 0


async def test_resume_elsewhere_is_none_no_other_worker_holds_sessions() -> None:
    backplane, _ = local()
    parsed = EventId(session_id=SESSION, token="3", secret="00" * 16)
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/sse", "headers": []}
    with anyio.fail_after(5):
        resume = await backplane.resume_elsewhere(parsed, 1, scope, never_receive, never_send, b"preface")
    assert resume is None


async def test_post_elsewhere_answers_not_found_and_logs_only_the_session_tag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backplane, _ = local()
    caplog.set_level(logging.DEBUG, logger="mcp_sse_transport")
    with anyio.fail_after(5):
        outcome = await backplane.post_elsewhere(SESSION, post_request())
    assert outcome == NOT_FOUND
    assert (outcome.status, outcome.text) == (404, "Could not find session")
    messages = [record.getMessage() for record in caplog.records if record.name == "mcp_sse_transport"]
    assert messages == [f"POST for unknown session {session_tag(SESSION)}"]
    assert len(session_tag(SESSION)) == 8
    assert not [message for message in messages if SESSION in message], "the whole id is a capability"


async def test_it_enters_and_leaves_as_an_async_context_manager() -> None:
    backplane, store = local()
    with anyio.fail_after(5):
        async with backplane as entered:
            assert entered is backplane
            entered.check_running()  # entered: requests are served
            assert entered.store is store
        backplane.check_running()  # one worker alone never refuses for not being entered
        async with backplane:  # and again: there is nothing to join or leave
            pass


async def test_leaving_it_on_an_error_does_not_swallow_the_error() -> None:
    backplane, _ = local()
    with anyio.fail_after(5), pytest.raises(LookupError, match="the body's"):
        async with backplane:
            raise LookupError("the body's")


def test_it_is_a_backplane_and_bind_accepts_a_host() -> None:
    backplane, _ = local()
    typed: Backplane = backplane  # mypy checks LocalBackplane against the protocol
    host = SessionHost(quiet_config(), typed)  # SessionHost binds itself
    typed.bind(host)
    assert host.serving(SESSION) is None


def test_session_host_satisfies_the_host_protocol() -> None:
    backplane, _ = local()
    config = quiet_config()
    host: Host = SessionHost(config, backplane)  # mypy checks SessionHost against the protocol
    members = sorted(name for name in vars(Host) if not name.startswith("_"))
    assert members == [
        "config",
        "create",
        "deliver",
        "release_slot",
        "reserve_slot",
        "run",
        "serving",
        "sessions",
    ]
    for name in members:
        assert hasattr(host, name), name
        protocol_member = vars(Host)[name]
        if isinstance(protocol_member, property):
            assert isinstance(inspect.getattr_static(type(host), name), property), name
            continue
        implementation = getattr(host, name)
        assert callable(implementation), name
        assert inspect.iscoroutinefunction(implementation) == inspect.iscoroutinefunction(protocol_member), name
        expected = list(inspect.signature(protocol_member).parameters)[1:]  # without self
        assert list(inspect.signature(implementation).parameters) == expected, name
    assert host.config is config
    assert len(host.sessions) == 0
