"""POSTs for another worker's session: handed to its owner as a :class:`~.messages.Post`, answered
with a :class:`~.messages.Posted`; the session taken over here when its owner is gone."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any
from uuid import uuid4

import anyio
from starlette.requests import Request
from starlette.types import Scope

from .._sdk import auth_context, forwarded_user, owner_fingerprint, user_token
from ..backplane import Host
from ..config import SseConfig
from ..errors import StoreError
from ..ids import session_tag
from ..redis_errors import REDIS_FAILURES, redis_errors
from ..session import NOT_FOUND, NOT_HERE, STORE_UNAVAILABLE, Outcome, SessionsFull
from .bus import Bus, OwnerUnreachable
from .directory import Directory
from .messages import Post, Posted
from .takeover import Takeovers

__all__ = ["Forwarding"]

logger = logging.getLogger("mcp_sse_transport")


class _Done(Exception):
    """The outcome of a POST is decided."""


_OWNER_UNREACHABLE = Outcome(503, "Session owner unreachable", retry=True)
"""Not delivered: neither the owner took the POST nor could this worker take the session over."""
_FAILED = Outcome(500, "Internal Server Error")
"""What the owner answers a POST it failed to deliver for a reason of its own."""


class Forwarding:
    """POSTs that reach this worker for sessions it does not serve, and those other workers hand
    it for its own sessions."""

    def __init__(self, bus: Bus, directory: Directory, takeovers: Takeovers, host: Host, config: SseConfig) -> None:
        self._bus = bus
        self._directory = directory
        self._takeovers = takeovers
        self._host = host
        self._config = config
        self._replies: dict[str, tuple[anyio.Event, list[Outcome]]] = {}
        bus.on(Post, self._posted_here)
        bus.on(Posted, self._answered)

    async def post_elsewhere(self, session_id: str, request: Request) -> Outcome:
        """Hand the POST to the session's owner, or take the session over if the owner is gone;
        503 if neither happens within ``forward_timeout`` (not delivered), 504 if the owner may
        have taken it but did not say so in time."""
        directory, host, takeovers = self._directory, self._host, self._takeovers
        outcome = _OWNER_UNREACHABLE
        handed_over = False
        """A handover is under way: the owner may have the message, whatever happens now."""
        try:
            with anyio.move_on_after(self._config.forward_timeout):
                entry = await directory.lookup(session_id)
                if entry is None or entry.fingerprint != owner_fingerprint(request.scope):
                    logger.info("POST for unknown session %s", session_tag(session_id))
                    outcome = NOT_FOUND
                    raise _Done
                body = await request.body()
                while True:
                    if entry.owner is not None and entry.owner != directory.worker_id:
                        handed_over = True
                        try:
                            answer = await self.forward(entry.owner, _forwarded(request.scope, session_id, body))
                        except OwnerUnreachable:  # nobody received it: not delivered
                            handed_over = False
                            await takeovers.await_lease(session_id)
                        else:
                            handed_over = False
                            if answer.status != NOT_HERE.status:
                                outcome = answer
                                raise _Done
                            await takeovers.await_lease(session_id)  # not delivered: it serves the session no more
                    session = await takeovers.adopt(session_id)
                    if session is not None:
                        outcome = await host.deliver(session, body, request)
                        if outcome.status != NOT_HERE.status:
                            raise _Done
                        outcome = _OWNER_UNREACHABLE  # unless a next turn finds it
                    if entry.owner == directory.worker_id:  # so the next turn takes it, or waits
                        await takeovers.clear_own_lease(session_id)
                    entry = await directory.lookup(session_id)
                    if entry is None:
                        outcome = NOT_FOUND
                        raise _Done
        except _Done:
            pass
        except SessionsFull:
            outcome = Outcome(503, "Too many open sessions", retry=True)
        except TimeoutError:
            logger.warning("session %s: its owner did not take a POST in time", session_tag(session_id))
        except StoreError as exc:
            logger.warning("%s", exc)
            outcome = STORE_UNAVAILABLE
        if handed_over:
            # It may have been delivered. Safe to send again: a request id is delivered once per session.
            logger.warning("session %s: a POST handed to its owner has an unknown outcome", session_tag(session_id))
            outcome = Outcome(504, "Outcome unknown: the session's owner may have taken the message", retry=True)
        return outcome

    async def forward(self, owner: str, post: Post) -> Outcome:
        """Hand a POST to the session's owner (``post``'s reply address is filled in here);
        returns the answer it gave (status, text, and whether to retry), as it gave it.

        Raises :class:`OwnerUnreachable` when nobody listens on the owner's channel,
        TimeoutError when it did not answer within ``forward_timeout``, StoreError.
        """
        reply_id = uuid4().hex
        done = anyio.Event()
        answer: list[Outcome] = []
        self._replies[reply_id] = (done, answer)
        try:
            post = replace(post, reply_to=reply_id, sender=self._bus.worker_id)
            with redis_errors("handing over a POST", post.session_id):
                received = await self._bus.publish(owner, post)
            if not received:
                raise OwnerUnreachable(owner)
            with anyio.fail_after(self._config.forward_timeout):
                await done.wait()
            return answer[0]
        finally:
            del self._replies[reply_id]

    def _answered(self, message: Posted) -> None:
        if (reply := self._replies.get(message.reply_to)) is not None:
            reply[1].append(Outcome(message.status, message.text, json=message.json, retry=message.retry))
            reply[0].set()

    def _posted_here(self, message: Post) -> None:
        self._bus.spawn("a POST handed over by another worker", self._answer, message)

    async def _answer(self, post: Post) -> None:
        outcome = _FAILED  # unless the owner answers: the sender must not wait out its timeout
        try:
            outcome = await self._deliver(post)
        finally:
            with anyio.CancelScope(shield=True):
                await self._reply(post, outcome)

    async def _deliver(self, post: Post) -> Outcome:
        """A POST another worker handed over for a session of this worker's: its outcome."""
        session = await self._takeovers.local(post.session_id)
        if session is None:  # it moved on (taken over, or handed off) since the sender looked
            return NOT_HERE
        request = _forwarded_request(post)
        with auth_context(request.scope):
            outcome = await self._host.deliver(session, post.body, request)
        if outcome.report is not None:
            self._bus.spawn("reporting a parse error", outcome.report)
        return outcome

    async def _reply(self, post: Post, outcome: Outcome) -> None:
        answer = Posted(post.reply_to, outcome.status, outcome.text, json=outcome.json, retry=outcome.retry)
        try:
            await self._bus.publish(post.sender, answer)
        except REDIS_FAILURES as exc:
            logger.warning("cluster: could not answer a handed-over POST (%s)", exc)


def _forwarded(scope: Scope, session_id: str, body: bytes) -> Post:
    """What the owner needs of a POST to rebuild its request: path, query, headers, user, body
    (the reply address is :meth:`Forwarding.forward`'s to fill in)."""
    return Post(
        session_id=session_id,
        path=scope.get("path", ""),
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in scope.get("headers", [])),
        user=user_token(scope),
        reply_to="",
        sender="",
        body=body,
    )


def _forwarded_request(post: Post) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": post.path,
        "root_path": "",
        "query_string": post.query.encode("latin-1"),
        "headers": [(name.encode("latin-1"), value.encode("latin-1")) for name, value in post.headers],
    }
    if post.user is not None:
        scope["user"] = forwarded_user(post.user)
    return Request(scope)
