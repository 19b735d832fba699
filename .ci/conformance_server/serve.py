"""Serve the MCP SDK's ``examples/servers/everything-server`` for the conformance suite (``.ci/conformance``).

Not a test module: it lives outside ``tests/`` and is run as a script::

    python .ci/conformance_server/serve.py --impl stock|ours --everything-server DIR --port-file FILE

- ``DIR`` is ``examples/servers/everything-server`` of an extracted ``mcp`` sdist; its package
  ``mcp_everything_server`` is imported from there (it is not installed).
- The app is the one the everything-server's own ``main()`` builds: its ``main()`` is called with the
  SDK's ``MCPServer.run`` intercepted, so whatever it passes to ``mcp.run(transport="streamable-http",
  ...)`` -- today ``event_store=<its InMemoryEventStore>`` (the SSE polling/resumption scenarios need
  it) and ``retry_interval=100`` -- goes unchanged to ``MCPServer.streamable_http_app(...)``, with
  ``host="127.0.0.1"`` as ``run_streamable_http_async`` does (that enables the SDK's localhost DNS
  rebinding protection, which the ``dns-rebinding-protection`` scenario checks). Only the port is ours:
  uvicorn serves on a socket this process binds on 127.0.0.1 port 0, and the port is written to
  ``FILE`` once uvicorn has started.
- ``--impl ours`` (or ``CONFORMANCE_IMPL=ours``) rebinds
  ``mcp.server.lowlevel.server.StreamableHTTPSessionManager`` -- the name ``Server.streamable_http_app()``
  (and so ``MCPServer.streamable_http_app()``) instantiates -- to
  ``mcp_sse_transport.StreamableHTTPSessionManager``. With either impl the manager actually built is
  checked before serving, and the process exits with status 3 if it is not the expected class.

Exit status: 0 after a normal shutdown (SIGTERM/SIGINT), 2 if ``ours`` is not importable,
3 if the built manager is not the expected class, 1 on any other startup error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

NOT_AVAILABLE = 2
WRONG_MANAGER = 3


def log(msg: str) -> None:
    print(f"[conformance-server] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("stock", "ours"), default=os.environ.get("CONFORMANCE_IMPL", "stock"))
    parser.add_argument("--everything-server", required=True, type=Path, help="examples/servers/everything-server")
    parser.add_argument("--port-file", required=True, type=Path, help="the bound port is written here when ready")
    parser.add_argument("--log-level", default="INFO", help="the everything-server's --log-level")
    args = parser.parse_args()

    import mcp.server.lowlevel.server as lowlevel
    import mcp.server.streamable_http_manager as stock_module

    # The name Server.streamable_http_app() instantiates (looked up in the module's globals at call time).
    name = "StreamableHTTPSessionManager"
    stock_cls: type = stock_module.StreamableHTTPSessionManager
    if getattr(lowlevel, name) is not stock_cls:
        log("FAIL: mcp.server.lowlevel.server.StreamableHTTPSessionManager is not the stock class before any swap")
        return WRONG_MANAGER

    if args.impl == "ours":
        try:
            import mcp_sse_transport

            ours_cls: type = mcp_sse_transport.StreamableHTTPSessionManager
        except (ImportError, AttributeError) as e:
            log(f"ours not available: {type(e).__name__}: {e}")
            return NOT_AVAILABLE
        if ours_cls is stock_cls:
            log("FAIL: mcp_sse_transport.StreamableHTTPSessionManager IS the stock class; the run would prove nothing")
            return WRONG_MANAGER
        setattr(lowlevel, name, ours_cls)
        expected: type = ours_cls
    else:
        expected = stock_cls

    sys.path.insert(0, str(args.everything_server.resolve()))
    import mcp_everything_server.server as everything  # type: ignore[import-not-found]
    from mcp.server.mcpserver import MCPServer

    # Run the everything-server's own main() with MCPServer.run intercepted, to learn what it serves.
    captured: dict[str, Any] = {}

    def capture_run(self: MCPServer, transport: str = "stdio", **kwargs: Any) -> None:
        captured.update(server=self, transport=transport, kwargs=kwargs)

    real_run = MCPServer.run
    MCPServer.run = capture_run  # type: ignore[method-assign]
    try:
        everything.main.main(args=["--log-level", args.log_level], standalone_mode=False)
    finally:
        MCPServer.run = real_run  # type: ignore[method-assign]
    if captured.get("transport") != "streamable-http":
        log(f"FAIL: the everything-server's main() did not call mcp.run(transport='streamable-http'): {captured}")
        return 1
    server: MCPServer = captured["server"]
    kwargs = dict(captured["kwargs"])
    kwargs.pop("port", None)
    host = kwargs.pop("host", "127.0.0.1")
    if host not in ("127.0.0.1", "localhost"):
        log(f"FAIL: unexpected host {host!r} from the everything-server")
        return 1
    log(f"everything-server mcp.run kwargs (port replaced): { {k: type(v).__name__ for k, v in kwargs.items()} }")

    app = server.streamable_http_app(host="127.0.0.1", **kwargs)

    manager = server.session_manager
    built = type(manager)
    # Exactly the expected class, not merely an instance of it: a subclass of stock (or of ours) built
    # instead would mean the rebinding did not reach where the SDK builds the manager.
    if built is not expected:
        log(
            f"FAIL: the session manager built is {built.__module__}.{built.__qualname__}, "
            f"expected {expected.__module__}.{expected.__qualname__} (--impl {args.impl})"
        )
        return WRONG_MANAGER
    log(f"impl={args.impl}: serving with session manager {built.__module__}.{built.__qualname__}")

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level=server.settings.log_level.lower(), lifespan="on", timeout_graceful_shutdown=5
    )
    userver = uvicorn.Server(config)

    async def serve() -> None:
        async def announce() -> None:
            while not userver.started:
                if userver.should_exit:
                    return
                await asyncio.sleep(0.02)
            tmp = args.port_file.with_name(args.port_file.name + ".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(args.port_file)
            log(f"listening on http://127.0.0.1:{port}/mcp (pid {os.getpid()})")

        task = asyncio.create_task(announce())
        try:
            await userver.serve(sockets=[sock])
        finally:
            task.cancel()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
