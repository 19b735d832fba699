"""The MCP SDK as the tests use it, on either major: the tests are written against mcp 2.x's
names (``httpx2``, ``mcp_types``, ``MCPServer``, ``Client``, the lowlevel ``Server`` with handler
keywords, ``MCPError``); on mcp 1.x this module gives the same names over 1.x's own API.

Type checking reads the 2.x side. ``only_on_mcp2`` (or ``needs_mcp2("what 1.x lacks")``) skips a
test of what only 2.x has: only real SDK differences, never a failure of the library on 1.x.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from examples.server import mcp as example_server
from mcp_sse_transport._sdk._major import MAJOR

only_on_mcp2 = pytest.mark.skipif(MAJOR < 2, reason="mcp 1.x lacks this 2.x feature")


def needs_mcp2(what: str) -> pytest.MarkDecorator:
    """Skip on mcp 1.x, saying what 1.x lacks."""
    return pytest.mark.skipif(MAJOR < 2, reason=f"mcp 1.x has no {what}")


_T = TypeVar("_T")


def _relates_progress() -> bool:
    """Whether the SDK's framework relates a tool's progress to its request, so that Streamable
    HTTP puts it on the request's own stream: 2.x, and 1.x from after 1.24 (1.24's ``FastMCP``
    sends it unrelated, to the standalone stream, as its own transport routes it)."""
    if MAJOR >= 2:
        return True
    import inspect

    from mcp.server.fastmcp import Context as FastMcpContext  # type: ignore[attr-defined,unused-ignore]

    return "related_request_id" in inspect.getsource(FastMcpContext.report_progress)


needs_related_progress = pytest.mark.skipif(
    not _relates_progress(),
    reason="this mcp's FastMCP sends a tool's progress unrelated to its request (mcp 1.24; fixed later in 1.x)",
)

EXAMPLE_MODULE = "examples.server"
"""The module of the example server with ``echo``, ``countdown`` and ``fail`` (either major)."""

__all__ = [
    "EXAMPLE_MODULE",
    "MAJOR",
    "Client",
    "Context",
    "EventSource",
    "MCPError",
    "MCPServer",
    "ProgressFnT",
    "Server",
    "ServerRequestContext",
    "ServerSentEvent",
    "StreamableHTTPASGIApp",
    "example_server",
    "httpx",
    "jsonrpc",
    "lowlevel_of",
    "needs_mcp2",
    "needs_related_progress",
    "only_on_mcp2",
    "snake",
    "sse_client",
    "sse_events",
    "streamable_http_client",
    "types",
]

if TYPE_CHECKING or MAJOR >= 2:
    import httpx2 as httpx
    import mcp_types as types
    from httpx2 import EventSource, ServerSentEvent
    from mcp.client.client import Client
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server import Server, ServerRequestContext
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
    from mcp.shared.dispatcher import ProgressFnT
    from mcp.shared.exceptions import MCPError
    from mcp_types import jsonrpc

    def snake(model: _T) -> _T:
        """A model read with 2.x's snake_case attribute names (on 2.x, the model itself)."""
        return model

    def lowlevel_of(server: MCPServer[Any]) -> Server[Any]:
        """The lowlevel server an ``MCPServer`` runs (1.x's ``FastMCP._mcp_server``)."""
        return server._lowlevel_server

    def sse_events(response: httpx.Response) -> list[ServerSentEvent]:
        """The events of a whole ``text/event-stream`` response, as the SDK's client parses them."""
        return list(EventSource(response))

else:  # pragma: no cover (the 1.x environment's run covers it)
    import re
    import sys
    from contextlib import AsyncExitStack
    from datetime import timedelta
    from types import ModuleType

    import httpx
    import httpx_sse
    import mcp.types as _types
    from httpx_sse import EventSource
    from mcp.client.session import ClientSession
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server.fastmcp import Context
    from mcp.server.fastmcp import FastMCP as MCPServer
    from mcp.server.fastmcp.server import StreamableHTTPASGIApp
    from mcp.server.lowlevel.server import Server as _Server
    from mcp.shared.exceptions import McpError as MCPError
    from mcp.shared.session import ProgressFnT
    from mcp.shared.version import SUPPORTED_PROTOCOL_VERSIONS
    from pydantic import BaseModel

    class ServerSentEvent(httpx_sse.ServerSentEvent):
        """httpx-sse's event, compared by value as httpx2's is."""

        def _key(self) -> tuple[Any, ...]:
            return (self.event, self.data, self.id, self.retry)

        def __eq__(self, other: object) -> bool:
            if not isinstance(other, httpx_sse.ServerSentEvent):
                return NotImplemented
            return self._key() == (other.event, other.data, other.id, other.retry)

        def __hash__(self) -> int:
            return hash(self._key())

        def __repr__(self) -> str:
            return f"ServerSentEvent(event={self.event!r}, data={self.data!r}, id={self.id!r}, retry={self.retry!r})"

    def sse_events(response: httpx.Response) -> list[ServerSentEvent]:
        """httpx-sse dispatches an empty ``message`` at each blank line once an id was seen (after
        a comment, say); mcp 1.x's client skips those, so they are left out here too."""
        events = EventSource(response).iter_sse()
        return [
            ServerSentEvent(e.event, e.data, e.id, e.retry)
            for e in events
            if e.data or e.event != "message" or e.retry is not None
        ]

    def snake(model: Any) -> Any:
        return _Snake(model)

    def lowlevel_of(server: Any) -> Any:
        return server._mcp_server

    def _camel(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(part[:1].upper() + part[1:] for part in rest)

    def _snake(name: str) -> str:
        return re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), name)

    class _SnakeModel(type):
        """A 1.x model class that takes 2.x's snake_case keywords; instances are the 1.x class's."""

        _orig: type[BaseModel]

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            fields = cls._orig.model_fields
            return cls._orig(*args, **{(k if k in fields else _camel(k)): v for k, v in kwargs.items()})

        def __instancecheck__(cls, obj: Any) -> bool:
            return isinstance(obj, cls._orig)

        def __subclasscheck__(cls, sub: Any) -> bool:
            return issubclass(sub, cls._orig)

        def __getattr__(cls, name: str) -> Any:
            return getattr(cls._orig, name)

    class _TypesModule(ModuleType):
        def __init__(self) -> None:
            super().__init__("tests._sdk_compat.types")
            self._shims: dict[str, Any] = {}

        def __getattr__(self, name: str) -> Any:
            value = getattr(_types, name)
            if isinstance(value, type) and issubclass(value, BaseModel):
                shim = self._shims.get(name)
                if shim is None:
                    shim = self._shims[name] = _SnakeModel(name, (), {"_orig": value})
                return shim
            return value

    jsonrpc = _types
    types: Any = _TypesModule()
    sys.modules["tests._sdk_compat.types"] = types

    class _Snake:
        """A 1.x result read with 2.x's snake_case attribute names."""

        def __init__(self, model: Any) -> None:
            object.__setattr__(self, "_model", model)

        def __getattr__(self, name: str) -> Any:
            model = object.__getattribute__(self, "_model")
            try:
                return getattr(model, name)
            except AttributeError:
                return getattr(model, _camel(name))

        def __eq__(self, other: object) -> bool:
            model = object.__getattribute__(self, "_model")
            return bool(model == (object.__getattribute__(other, "_model") if isinstance(other, _Snake) else other))

        def __repr__(self) -> str:
            return repr(object.__getattribute__(self, "_model"))

    class Client:
        """2.x's ``Client`` over 1.x's ``ClientSession``: initialized on enter (1.x has only the
        handshake era: ``mode`` must be "legacy" or "auto")."""

        def __init__(self, transport: Any, mode: str = "auto", **options: Any) -> None:
            if mode not in ("legacy", "auto"):
                raise ValueError(f"mcp 1.x has no mode {mode!r}")
            self._transport = transport
            self._options = options
            self._stack = AsyncExitStack()
            self._session: ClientSession | None = None
            self._initialized: Any = None

        async def __aenter__(self) -> Client:
            async with AsyncExitStack() as stack:
                streams = await stack.enter_async_context(self._transport)
                self._session = await stack.enter_async_context(ClientSession(streams[0], streams[1], **self._options))
                self._initialized = await self._session.initialize()
                self._stack = stack.pop_all()
            return self

        async def __aexit__(self, *exc: Any) -> bool | None:
            return await self._stack.__aexit__(*exc)

        @property
        def session(self) -> ClientSession:
            assert self._session is not None
            return self._session

        @property
        def protocol_version(self) -> str:
            return str(self._initialized.protocolVersion)

        @property
        def server_info(self) -> Any:
            return self._initialized.serverInfo

        async def send_ping(self) -> Any:
            return await self.session.send_ping()

        async def list_tools(self, *args: Any, **kwargs: Any) -> Any:
            return _Snake(await self.session.list_tools(*args, **kwargs))

        async def call_tool(
            self,
            name: str,
            arguments: dict[str, Any] | None = None,
            read_timeout_seconds: float | None = None,
            progress_callback: Any = None,
            *,
            meta: dict[str, Any] | None = None,
        ) -> Any:
            timeout = timedelta(seconds=read_timeout_seconds) if read_timeout_seconds is not None else None
            result = await self.session.call_tool(
                name, arguments, read_timeout_seconds=timeout, progress_callback=progress_callback, meta=meta
            )
            return _Snake(result)

    class ServerRequestContext:
        """2.x's handler context over 1.x's request context."""

        def __init__(self, context: Any) -> None:
            self.request_context = context
            self.request_id = context.request_id
            self.request = context.request
            self.session = _Session(context.session)
            self.lifespan_context = context.lifespan_context
            meta = context.meta
            self.meta: dict[str, Any] | None = (
                {_snake(k): v for k, v in meta.model_dump(exclude_none=True).items()} if meta is not None else None
            )

    class _Session:
        """1.x's ``ServerSession``, with 2.x's ``protocol_version`` and snake_case client params."""

        def __init__(self, session: Any) -> None:
            self._session = session

        def __getattr__(self, name: str) -> Any:
            return getattr(self._session, name)

        @property
        def client_params(self) -> Any:
            params = self._session.client_params
            return None if params is None else _Snake(params)

        @property
        def protocol_version(self) -> str | None:
            params = self._session.client_params
            if params is None:
                return None
            requested = str(params.protocolVersion)
            return requested if requested in SUPPORTED_PROTOCOL_VERSIONS else _types.LATEST_PROTOCOL_VERSION

    _HANDLERS = {
        "on_list_tools": _types.ListToolsRequest,
        "on_call_tool": _types.CallToolRequest,
        "on_list_resources": _types.ListResourcesRequest,
        "on_read_resource": _types.ReadResourceRequest,
        "on_list_prompts": _types.ListPromptsRequest,
        "on_get_prompt": _types.GetPromptRequest,
    }

    def Server(name: str, **handlers: Any) -> Any:
        """A 1.x lowlevel server whose requests run 2.x-style handlers ``(ctx, params)``."""
        options = {key: handlers.pop(key) for key in list(handlers) if key not in _HANDLERS}
        server = _Server(name, **options)
        for key, handler in handlers.items():
            server.request_handlers[_HANDLERS[key]] = _handler(server, handler)
        return server

    def _handler(server: Any, handler: Any) -> Any:
        async def run(request: Any) -> Any:
            result = await handler(ServerRequestContext(server.request_context), request.params)
            return _types.ServerResult(result)

        return run
