"""Shared fixtures: anyio's own pytest plugin runs the async tests, on asyncio (uvicorn's loop)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
