"""pytest plugin: run the MCP SDK's own SSE tests against ``mcp_sse_transport.SseServerTransport``.

Loaded by ``.ci/sdk-tests`` with ``-p mcp_sse_swap`` (this directory on ``PYTHONPATH``), from inside
the extracted ``mcp`` sdist. It is not a test module of ours: it lives outside ``testpaths`` and its
name does not match ``test_*.py``.

At import time, before pytest imports any SDK test module, it rebinds the public name
``mcp.server.sse.SseServerTransport`` (and the copy the framework's ``sse_app`` uses:
``mcp.server.mcpserver.server.SseServerTransport`` on mcp 2.x, ``mcp.server.fastmcp.server``'s on
1.x) to our class. Every later
``from mcp.server.sse import SseServerTransport`` -- the SDK test modules and
``tests.interaction._connect`` -- therefore binds ours.

What is bound is a thin subclass of ours that changes nothing unless ``--sse-session-grace`` is
given: then a transport the tests build without a ``config`` gets
``SseConfig(session_grace=<value>)``. ``.ci/sdk-tests`` passes ``0``, the stock session lifecycle
(a session ends with its GET), because with our default of 30 s every stock-client disconnect keeps
the GET's ASGI task (and ``Server.run``) alive for 30 s, and the SDK's in-process bridge waits for
it on close: each SSE test would take 30 s or hit its own 5 s ``fail_after``. See docs/sdk-tests.md.

The swap is verified, loudly:
- the stock class is made uninstantiable for the run, so a test that still reaches it fails
  with a clear message instead of silently testing the SDK;
- after collection every loaded module that holds a ``SseServerTransport`` global is checked,
  and the SDK modules the selected tests build their apps through must be among them;
- the report header names the class under test.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import mcp.server.sse as _stock_module
import pytest
from mcp.server.lowlevel.server import Server
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE, TransportSecuritySettings

import mcp_sse_transport
from mcp_sse_transport import EventStore, SseConfig
from mcp_sse_transport._sdk._major import MAJOR

_FRAMEWORK_MODULE = "mcp.server.mcpserver.server" if MAJOR >= 2 else "mcp.server.fastmcp.server"
_mcpserver_module = importlib.import_module(_FRAMEWORK_MODULE)

OURS = mcp_sse_transport.SseServerTransport
STOCK = _stock_module.SseServerTransport

if issubclass(OURS, STOCK):  # pragma: no cover - the swap would prove nothing
    raise RuntimeError("mcp_sse_transport.SseServerTransport is (a subclass of) the stock class")

# --sse-session-grace, set in pytest_configure (after this module's import-time swap, before any test runs).
_session_grace: float | None = None


class SseServerTransport(mcp_sse_transport.SseServerTransport):
    """Our class, unchanged, except that with ``--sse-session-grace`` a transport built without a
    ``config`` gets ``SseConfig(session_grace=<value>)`` (``0`` is the stock session lifecycle)."""

    def __init__(
        self,
        endpoint: str,
        security_settings: TransportSecuritySettings | None = None,
        max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
        *,
        config: SseConfig | None = None,
        event_store: EventStore | None = None,
        server: Server[Any] | None = None,
    ) -> None:
        if config is None and _session_grace is not None:
            config = SseConfig(session_grace=_session_grace)
        super().__init__(
            endpoint, security_settings, max_request_body_size, config=config, event_store=event_store, server=server
        )


SWAPPED = SseServerTransport

# Modules that build the SSE apps of the selected tests; each must end up holding our class.
_EXPECTED_USERS = ("tests.interaction._connect", "tests.shared.test_sse", "tests.server.test_sse_security")

_stock_init = STOCK.__dict__["__init__"]


def _refuse_stock(self: Any, *args: Any, **kwargs: Any) -> None:
    raise AssertionError(
        "mcp_sse_swap: the stock mcp.server.sse.SseServerTransport was instantiated; "
        "the substitution of mcp_sse_transport.SseServerTransport did not reach this caller"
    )


_stock_module.SseServerTransport = SWAPPED  # type: ignore[misc,assignment]
_mcpserver_module.SseServerTransport = SWAPPED  # type: ignore[attr-defined,assignment]
STOCK.__init__ = _refuse_stock  # type: ignore[method-assign]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sse-session-grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="mcp_sse_swap: build transports that get no config with SseConfig(session_grace=SECONDS); "
        "default: the class's own default config",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _session_grace
    _session_grace = config.getoption("--sse-session-grace")
    if _session_grace is not None:
        SseConfig(session_grace=_session_grace)  # validate now, not in the first test


def _describe(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    return f"{cls.__module__}.{cls.__qualname__} ({getattr(module, '__file__', '?')})"


def pytest_report_header(config: pytest.Config) -> list[str]:
    grace = config.getoption("--sse-session-grace")
    config_note = "the class default SseConfig()" if grace is None else f"SseConfig(session_grace={grace:g})"
    return [
        f"mcp_sse_swap: SseServerTransport under test = {_describe(OURS)}, bound as {SWAPPED.__module__}."
        f"{SWAPPED.__qualname__}, a subclass that only fills in a missing config",
        f"mcp_sse_swap: transports built without a config get {config_note}",
        f"mcp_sse_swap: stock class replaced (and made uninstantiable) = {_describe(STOCK)}",
    ]


def _holders() -> dict[str, type]:
    """Every loaded SDK or SDK-test module with a module-level ``SseServerTransport`` global."""
    found: dict[str, type] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "tests" or name.startswith(("tests.", "mcp."))):
            continue
        value = getattr(module, "SseServerTransport", None)
        if isinstance(value, type):
            found[name] = value
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    holders = _holders()
    wrong = sorted(name for name, cls in holders.items() if cls is not SWAPPED)
    if wrong:
        pytest.exit(f"mcp_sse_swap: these modules do not hold our SseServerTransport: {wrong}", returncode=3)
    selected = {module.__name__ for item in session.items if (module := getattr(item, "module", None))}
    # The SSE test modules bind the class themselves; the interaction suite builds its apps in _connect.
    needed = {name for name in _EXPECTED_USERS if name in selected}
    if any(name.startswith("tests.interaction.") for name in selected):
        needed.add("tests.interaction._connect")
    missing = sorted(needed - holders.keys())
    if missing:
        pytest.exit(f"mcp_sse_swap: these modules do not hold our SseServerTransport: {missing}", returncode=3)


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    verified = sorted(name for name, cls in _holders().items() if cls is SWAPPED)
    return [f"mcp_sse_swap: verified our SseServerTransport in {len(verified)} modules: {', '.join(verified)}"]


def pytest_unconfigure(config: pytest.Config) -> None:
    STOCK.__init__ = _stock_init  # type: ignore[method-assign]
