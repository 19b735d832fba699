"""The package's layout: imports point down the layers only, with no cycle; only the adapter
imports the SDK; no module is much over 400 lines. Read from the source, every import counted
(``TYPE_CHECKING`` and function-level ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

import mcp_sse_transport

PACKAGE = Path(mcp_sse_transport.__file__).parent
MAX_LINES = 420
"""About 400: one concept per module."""

LAYERS: dict[str, int] = {
    # the sans-I/O core, and the SDK adapter
    "errors": 0,
    "ids": 0,
    "config": 0,
    "cluster.messages": 0,
    "_sdk": 0,
    "events": 1,
    "flow": 1,
    "stream_state": 1,
    "redis_errors": 1,
    "client": 1,  # the resuming client stands apart
    # the stores
    "store": 2,
    "fencing": 2,
    "claims": 2,
    "replay": 3,
    "sdk_event_store": 3,  # our store as the SDK's, for its own session manager
    "redis_store": 3,
    # one stream's anyio driver, and its ASGI sink
    "writer": 4,
    "handler": 5,
    "_asgi": 6,
    "registry": 6,
    "bounded_response": 7,  # a response of the SDK's own through one stream
    # sessions, the session host, and the backplane protocol it calls
    "session": 7,
    "ledger": 8,
    "request_streams": 8,  # a Streamable HTTP session's routing
    "outbound": 9,
    "backplane": 9,
    "host": 10,
    "cluster": 10,
    # the front ends
    "transport": 11,
    "streamable_session": 11,
    "streamable": 12,
    "serving": 13,
    "": 14,  # __init__: the public surface
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """The package modules ``name`` imports, and the other top-level packages it imports."""
    parts = name.split(".") if name else []
    package = parts if path.name == "__init__.py" else parts[:-1]
    ours: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            others.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                others.add(node.module.split(".")[0])
                continue
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:  # ``from . import x`` may name a module
                candidate = ".".join([*target, alias.name])
                ours.add(candidate if candidate in _MODULES else ".".join(target))
    ours.discard(name)
    return ours, others


_MODULES = _modules()
_GRAPH = {name: _imports(name, path) for name, path in _MODULES.items()}


def _layer(name: str) -> int:
    while name not in LAYERS and "." in name:  # a package's modules share its layer
        name = name.rpartition(".")[0]
    return LAYERS[name]


def test_every_module_has_a_layer() -> None:
    assert {name for name in _MODULES if name.split(".")[0] not in LAYERS} == set()


def test_only_the_adapter_imports_the_sdk() -> None:
    """The SDK of either major, its HTTP client, and the frameworks on it are the adapter's alone."""
    sdk = {"mcp", "mcp_types", "httpx", "httpx2", "fastmcp"}
    importers = {name for name, (_, others) in _GRAPH.items() if others & sdk}
    assert {name.split(".")[0] for name in importers} == {"_sdk"}
    assert {"_sdk._v1", "_sdk._v2"} <= importers


def test_imports_point_down_the_layers() -> None:
    upward = {
        (name, target)
        for name, (ours, _) in _GRAPH.items()
        for target in ours
        if _layer(target) > _layer(name)
        or (_layer(target) == _layer(name) and name.split(".")[0] != target.split(".")[0])
    }
    assert not upward, "imports that do not point down a layer"


def test_no_import_cycle() -> None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        assert name not in visiting, f"import cycle: {' -> '.join([*visiting[visiting.index(name) :], name])}"
        if name in done:
            return
        visiting.append(name)
        for target in sorted(_GRAPH[name][0]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in _GRAPH:
        visit(name)


def test_the_front_ends_know_no_cluster() -> None:
    """A front end calls the backplane; it never asks whether Redis is there."""
    for front_end in ("transport", "streamable", "streamable_session"):
        source = (PACKAGE / f"{front_end}.py").read_text()
        assert "cluster is None" not in source and "cluster is not None" not in source
        assert {target for target in _GRAPH[front_end][0] if target.startswith("cluster")} <= {"cluster"}


def test_no_module_is_much_over_400_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _MODULES.items()}
    assert {name: size for name, size in sizes.items() if size > MAX_LINES} == {}
