"""pytest plugin: run the MCP SDK's own Streamable HTTP tests against
``mcp_sse_transport.StreamableHTTPSessionManager``.

Loaded by ``.ci/sdk-tests`` (``SDK_TESTS=streamable`` or ``all``) with ``-p mcp_streamable_swap``
(this directory on ``PYTHONPATH``), from inside the extracted ``mcp`` sdist. Like
``mcp_sse_swap`` it is not a test module of ours: it lives outside ``testpaths`` and its name does
not match ``test_*.py``.

Two modes, chosen at import time by the environment variable ``MCP_STREAMABLE_SWAP``:

``ours`` (the default)
    Before pytest imports any SDK test module or conftest, the name ``StreamableHTTPSessionManager``
    is rebound to our class in every SDK module that binds it: ``mcp.server.streamable_http_manager``
    (the public name, so every later ``from mcp.server.streamable_http_manager import
    StreamableHTTPSessionManager`` -- the SDK test modules and ``tests.interaction._connect`` --
    binds ours), ``mcp.server.lowlevel.server`` (``Server.streamable_http_app()`` builds the manager
    through it, and ``MCPServer.streamable_http_app()`` delegates there) and
    ``mcp.server.mcpserver.server`` (annotations only, rebound so no SDK module holds the stock
    class). The stock class is made uninstantiable for the run.
``stock``
    Nothing is swapped: the same selection runs against the SDK's own class, for a baseline. The
    same checks run, expecting the stock class everywhere.

What is bound in ``ours`` mode is a thin subclass of ours that changes nothing unless
``--streamable-config=EXPR`` is given: then a manager the tests build without a ``config`` gets
``config=<EXPR>``, the expression evaluated in ``mcp_sse_transport``'s namespace (for example
``--streamable-config='SseConfig(session_grace=0)'``, if that is the config the class takes).

The swap is verified, loudly:
- in ``ours`` mode the stock class raises AssertionError when instantiated, so a test that still
  reaches it fails with a clear message instead of silently testing the SDK; the one exception is
  a stock manager that code of ``mcp_sse_transport`` itself builds (our class keeps one as a private
  delegate for the requests that have no session to hold), counted in the terminal summary;
- after collection every loaded ``mcp.*`` / ``tests.*`` module (and any module loaded from the
  sdist's ``tests/``) holding a ``StreamableHTTPSessionManager`` global is checked, and the SDK
  modules the selected tests build their managers through must be among them;
- the report header names the class under test;
- the terminal summary counts the managers built and lists the selected tests that built none
  (``--streamable-built-report=PATH`` writes ``nodeid<TAB>count`` for every test run), so a
  selection that stops reaching the class under test shows.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import mcp.server.lowlevel.server as _lowlevel_module
import mcp.server.mcpserver.server as _mcpserver_module
import mcp.server.streamable_http_manager as _stock_module
import pytest

MODE = os.environ.get("MCP_STREAMABLE_SWAP", "ours").strip().lower() or "ours"
if MODE not in ("ours", "stock"):
    raise RuntimeError(f"mcp_streamable_swap: MCP_STREAMABLE_SWAP must be 'ours' or 'stock', not {MODE!r}")

STOCK = _stock_module.StreamableHTTPSessionManager

# SDK modules that bind the name at module level (grep of mcp/ for StreamableHTTPSessionManager;
# pytest_collection_finish re-checks every loaded mcp.* module, so one added later is caught).
_SDK_HOLDERS = (_stock_module, _lowlevel_module, _mcpserver_module)

# SDK test modules that import the name themselves (grep of the sdist's tests/); each selected one
# must end up holding the class under test. The interaction suite builds its managers through
# Server.streamable_http_app() and annotates with the name in tests.interaction._connect.
_EXPECTED_USERS = (
    "tests.interaction._connect",
    "tests.shared.test_streamable_http",
    "tests.server.test_streamable_http_manager",
    "tests.server.test_streamable_http_security",
    "tests.client.test_streamable_http",
    "tests.client.test_http_unicode",
    # tests/issues/ has no __init__.py: pytest imports the module under its basename.
    "test_1363_race_condition_streamable_http",
)

# Managers built so far (ours through the subclass, the stock class through a counting __init__).
_built = 0
# Stock managers our class built as its own delegates (ours mode only).
_delegates = 0
_config_expr: str | None = None
_tests_dir: str | None = None  # the sdist's tests/, set in pytest_configure
_config_factory: Any = None

_stock_init = STOCK.__dict__["__init__"]

if MODE == "ours":
    import mcp_sse_transport

    _ours = getattr(mcp_sse_transport, "StreamableHTTPSessionManager", None)
    if not isinstance(_ours, type):  # pragma: no cover - reported as a startup error
        raise RuntimeError(
            "mcp_streamable_swap: mcp_sse_transport has no StreamableHTTPSessionManager "
            "(run with MCP_STREAMABLE_SWAP=stock for the stock baseline)"
        )
    OURS: type = _ours
    if issubclass(OURS, STOCK):  # pragma: no cover - the swap would prove nothing
        raise RuntimeError("mcp_sse_transport.StreamableHTTPSessionManager is (a subclass of) the stock class")

    class StreamableHTTPSessionManager(OURS):  # type: ignore[misc]
        """Our class, unchanged, except that it counts the managers built and, with
        ``--streamable-config``, a manager built without a ``config`` gets that one."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            global _built
            _built += 1
            if _config_factory is not None and kwargs.get("config") is None:
                kwargs["config"] = _config_factory()
            super().__init__(*args, **kwargs)

    SWAPPED: type = StreamableHTTPSessionManager
    UNDER_TEST: type = OURS

    def _refuse_stock(self: Any, *args: Any, **kwargs: Any) -> None:
        # Our class may build a stock manager of its own, as a private delegate (it hands the requests
        # that have no session to hold -- stateless mode, the modern protocol -- to the SDK's code);
        # that is counted, and named in the summary. Any other caller is one the swap did not reach.
        global _delegates
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.partition(".")[0] == "mcp_sse_transport":
            _delegates += 1
            _stock_init(self, *args, **kwargs)
            return
        raise AssertionError(
            "mcp_streamable_swap: the stock mcp.server.streamable_http_manager.StreamableHTTPSessionManager "
            f"was instantiated by {caller or '?'}; the substitution of "
            "mcp_sse_transport.StreamableHTTPSessionManager did not reach this caller"
        )

    for _module in _SDK_HOLDERS:
        _module.StreamableHTTPSessionManager = SWAPPED  # type: ignore[attr-defined]
    STOCK.__init__ = _refuse_stock  # type: ignore[method-assign]
else:
    SWAPPED = STOCK
    UNDER_TEST = STOCK

    def _counting_stock_init(self: Any, *args: Any, **kwargs: Any) -> None:
        global _built
        _built += 1
        _stock_init(self, *args, **kwargs)

    STOCK.__init__ = _counting_stock_init  # type: ignore[method-assign]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mcp_streamable_swap")
    group.addoption(
        "--streamable-config",
        default=None,
        metavar="EXPR",
        help="mcp_streamable_swap (ours mode): give managers built without a config config=EXPR, "
        "a Python expression evaluated in mcp_sse_transport's namespace; default: the class's own default",
    )
    group.addoption(
        "--streamable-built-report",
        default=None,
        metavar="PATH",
        help="mcp_streamable_swap: write 'nodeid<TAB>managers built' for every test run to PATH",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _config_expr, _config_factory, _tests_dir
    _tests_dir = os.path.join(str(config.rootpath), "tests") + os.sep
    _config_expr = config.getoption("--streamable-config")
    if _config_expr is not None:
        if MODE != "ours":
            raise pytest.UsageError("mcp_streamable_swap: --streamable-config needs MCP_STREAMABLE_SWAP=ours")
        namespace = vars(sys.modules["mcp_sse_transport"])
        code = compile(_config_expr, "--streamable-config", "eval")

        def _config_factory() -> Any:  # the expression is our own CI option's
            return eval(code, dict(namespace))

        _config_factory()  # validate now, not in the first test


def _describe(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    return f"{cls.__module__}.{cls.__qualname__} ({getattr(module, '__file__', '?')})"


def pytest_report_header(config: pytest.Config) -> list[str]:
    if MODE == "stock":
        return [
            f"mcp_streamable_swap: MCP_STREAMABLE_SWAP=stock: StreamableHTTPSessionManager under test = "
            f"the STOCK class {_describe(STOCK)} (baseline; nothing swapped)",
        ]
    config_note = "the class's default config" if _config_expr is None else f"config={_config_expr}"
    return [
        f"mcp_streamable_swap: StreamableHTTPSessionManager under test = {_describe(UNDER_TEST)}, bound as "
        f"{SWAPPED.__module__}.{SWAPPED.__qualname__}, a subclass that only counts and fills in a missing config",
        f"mcp_streamable_swap: managers built without a config get {config_note}",
        f"mcp_streamable_swap: stock class replaced (and made uninstantiable) = {_describe(STOCK)}",
    ]


def _is_sdk_module(name: str, module: Any) -> bool:
    if name == "tests" or name.startswith(("tests.", "mcp.")):
        return True
    path = getattr(module, "__file__", None)  # a test module imported under its basename
    return _tests_dir is not None and isinstance(path, str) and path.startswith(_tests_dir)


def _holders() -> dict[str, Any]:
    """Every loaded SDK or SDK-test module with a module-level ``StreamableHTTPSessionManager`` global."""
    found: dict[str, Any] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not _is_sdk_module(name, module):
            continue
        value = getattr(module, "StreamableHTTPSessionManager", None)
        if isinstance(value, type):
            found[name] = value
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    holders = _holders()
    wrong = sorted(name for name, cls in holders.items() if cls is not SWAPPED)
    if wrong:
        pytest.exit(
            f"mcp_streamable_swap: these modules do not hold the {MODE} StreamableHTTPSessionManager: {wrong}",
            returncode=3,
        )
    selected = {module.__name__ for item in session.items if (module := getattr(item, "module", None))}
    needed = {name for name in _EXPECTED_USERS if name in selected}
    needed.update(module.__name__ for module in _SDK_HOLDERS)
    if any(name.startswith("tests.interaction.") for name in selected):
        needed.add("tests.interaction._connect")
    missing = sorted(needed - holders.keys())
    if missing:
        pytest.exit(
            f"mcp_streamable_swap: these modules do not hold the {MODE} StreamableHTTPSessionManager: {missing}",
            returncode=3,
        )


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    verified = sorted(name for name, cls in _holders().items() if cls is SWAPPED)
    return [
        f"mcp_streamable_swap: verified the {MODE} StreamableHTTPSessionManager in {len(verified)} modules: "
        f"{', '.join(verified)}"
    ]


_per_test: dict[str, int] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    before = _built
    yield
    _per_test[item.nodeid] = _built - before


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _per_test:
        return
    none = sorted(nodeid for nodeid, count in _per_test.items() if count == 0)
    terminalreporter.write_sep("-", "mcp_streamable_swap")
    terminalreporter.write_line(
        f"mcp_streamable_swap: {_built} {MODE} StreamableHTTPSessionManager instances built by "
        f"{len(_per_test) - len(none)} of {len(_per_test)} tests run"
    )
    if MODE == "ours":
        terminalreporter.write_line(
            f"mcp_streamable_swap: our class built {_delegates} stock StreamableHTTPSessionManager instances "
            "as its private delegates"
        )
    if none:
        per_file: dict[str, int] = {}
        for nodeid in none:
            per_file[nodeid.split("::", 1)[0]] = per_file.get(nodeid.split("::", 1)[0], 0) + 1
        terminalreporter.write_line(
            f"mcp_streamable_swap: {len(none)} tests run built none (--streamable-built-report lists them): "
            + ", ".join(f"{path} {count}" for path, count in sorted(per_file.items()))
        )
    path = config.getoption("--streamable-built-report")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            for nodeid, count in _per_test.items():
                f.write(f"{nodeid}\t{count}\n")


def pytest_unconfigure(config: pytest.Config) -> None:
    STOCK.__init__ = _stock_init  # type: ignore[method-assign]
