"""``fastmcp.FastMCP`` (PrefectHQ's framework; 3.x runs on mcp 1.x, 4.x on mcp 2.x), wired as its
own ``create_sse_app`` wires it: that function builds the framework's app, and ours keeps all of
it (auth routes, custom routes, mounted servers' routes, middleware, the auth wrappers around the
endpoints) but its two MCP endpoints, in whose place go ours.

Nothing here imports fastmcp unless the server given is one of its objects (so it is loaded)."""

from __future__ import annotations

import copy
import sys
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp


def is_fastmcp(server: object) -> bool:
    """Whether ``server`` is a ``fastmcp.FastMCP``, without importing fastmcp."""
    module = sys.modules.get("fastmcp.server.server")
    cls = getattr(module, "FastMCP", None) if module is not None else None
    return isinstance(cls, type) and isinstance(server, cls)


def fastmcp_wiring(
    server: Any, sse_path: str, message_path: str, sse_endpoint: ASGIApp, post_endpoint: ASGIApp
) -> tuple[ASGIApp, ASGIApp, list[BaseRoute], list[Middleware]]:
    """The framework's routes and middleware for endpoints at ``sse_path`` and ``message_path``
    (the auth metadata names ``sse_path``: for Streamable HTTP, the endpoint's), and our two
    endpoints behind its ``RequireAuthMiddleware`` when its auth provider verifies tokens."""
    import fastmcp  # loaded already: the server given is one of its objects
    from fastmcp.server.http import create_sse_app

    settings = fastmcp.settings
    built = create_sse_app(
        server,
        message_path=message_path,
        sse_path=sse_path,
        auth=server.auth,
        host_origin_protection=settings.http_host_origin_protection,
        allowed_hosts=getattr(settings, "http_allowed_hosts", None),
        allowed_origins=getattr(settings, "http_allowed_origins", None),
    )
    stock_sse = next(r for r in built.routes if isinstance(r, Route) and r.path == sse_path)
    stock_post = next(r for r in built.routes if isinstance(r, Mount) and r.path == message_path.rstrip("/"))
    routes = [r for r in built.routes if r is not stock_sse and r is not stock_post]
    return (
        _wrapped_like(stock_sse.endpoint, sse_endpoint),
        _wrapped_like(stock_post.app, post_endpoint),
        routes,
        list(built.user_middleware),
    )


def _wrapped_like(stock: Any, ours: ASGIApp) -> ASGIApp:
    """Ours behind a copy of the framework's auth wrapper (either major's signature), if it has one."""
    if hasattr(stock, "required_scopes") and hasattr(stock, "app"):
        wrapper = copy.copy(stock)
        wrapper.app = ours
        return wrapper  # type: ignore[no-any-return]
    return ours


def fastmcp_lifespan(server: Any) -> AbstractAsyncContextManager[Any]:
    """What the framework's app enters once: its user lifespan, background services (Docket),
    mounted providers' lifespans. fastmcp 3 fails every session without it."""
    return server._lifespan_manager()  # type: ignore[no-any-return]
