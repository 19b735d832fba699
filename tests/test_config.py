"""SseConfig: documented defaults, validation of every field, immutability."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from mcp_sse_transport import SseConfig


def test_defaults() -> None:
    config = SseConfig()
    assert config.max_buffered_events == 1000
    assert config.max_buffered_bytes == 4 * 1024 * 1024
    assert config.grant_timeout == 10.0
    assert config.slow_consumer_policy == "block"
    assert config.write_timeout == 10.0
    assert config.heartbeat_interval == 15.0
    assert config.drain_timeout == 5.0
    assert config.retry_interval == 3.0
    assert config.retry_ms == 3000
    assert config.session_grace == 30.0
    assert config.replay_max_events == 2000
    assert config.replay_max_bytes == 8 * 1024 * 1024
    assert config.replay_max_age == 300.0
    assert config.socket_send_buffer == 256 * 1024
    assert config.max_event_bytes == 4 * 1024 * 1024
    assert config.max_request_id_bytes == 256
    assert config.max_session_streams == 100


def test_valid_values_accepted() -> None:
    config = SseConfig(
        max_buffered_events=1,
        max_buffered_bytes=1,
        max_event_bytes=1,
        max_request_id_bytes=1,
        grant_timeout=0.01,
        slow_consumer_policy="disconnect",
        write_timeout=1,
        heartbeat_interval=0.5,
        drain_timeout=2,
        retry_interval=0,
        session_grace=0,
        replay_max_events=1,
        replay_max_bytes=1,
        replay_max_age=0.5,
    )
    assert config.slow_consumer_policy == "disconnect"
    assert config.session_grace == 0
    assert config.retry_ms == 0
    assert config.write_timeout == 1


@pytest.mark.parametrize(("seconds", "ms"), [(0.25, 250), (1.0, 1000), (0.0004, 0), (2.5, 2500), (0.0016, 2)])
def test_retry_ms(seconds: float, ms: int) -> None:
    assert SseConfig(retry_interval=seconds).retry_ms == ms


@pytest.mark.parametrize(
    "field",
    [
        "max_buffered_events",
        "max_buffered_bytes",
        "max_event_bytes",
        "max_request_id_bytes",
        "replay_max_events",
        "replay_max_bytes",
    ],
)
@pytest.mark.parametrize("value", [0, -1, 1.5, 10.0, "10", None, True, False])
def test_invalid_counts(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be a positive integer, got {value!r}$"):
        SseConfig(**{field: value})


@pytest.mark.parametrize(
    "field", ["grant_timeout", "write_timeout", "heartbeat_interval", "drain_timeout", "replay_max_age"]
)
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, "1", None])
def test_invalid_durations(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be a positive number of seconds, got "):
        SseConfig(**{field: value})


@pytest.mark.parametrize("field", ["retry_interval", "session_grace"])
@pytest.mark.parametrize("value", [-1, -0.001, math.nan, math.inf, -math.inf, "3", None])
def test_invalid_non_negative_durations(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be a non-negative number of seconds, got "):
        SseConfig(**{field: value})


@pytest.mark.parametrize("value", ["drop", "", "BLOCK", None])
def test_invalid_policy(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^slow_consumer_policy must be 'block' or 'disconnect', got "):
        SseConfig(slow_consumer_policy=value)


@pytest.mark.parametrize("value", [1, 4096, 256 * 1024, None])
def test_socket_send_buffer_accepts_bytes_or_none(value: int | None) -> None:
    assert SseConfig(socket_send_buffer=value).socket_send_buffer == value


@pytest.mark.parametrize("field", ["max_sessions", "max_session_streams", "socket_send_buffer"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 4096.0, "4096", True, False])
def test_invalid_optional_counts(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be a positive integer or None, got {value!r}$"):
        SseConfig(**{field: value})


@pytest.mark.parametrize("value", [1, 100, 128, None])
def test_max_session_streams_accepts_a_count_or_none(value: int | None) -> None:
    assert SseConfig(max_session_streams=value).max_session_streams == value


def test_frozen() -> None:
    config = SseConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.grant_timeout = 1.0  # type: ignore[misc]
    assert config.grant_timeout == 10.0


def test_replace_revalidates() -> None:
    config = SseConfig(grant_timeout=1.0)
    assert dataclasses.replace(config, grant_timeout=2.0).grant_timeout == 2.0
    with pytest.raises(ValueError, match="grant_timeout"):
        dataclasses.replace(config, grant_timeout=-2.0)


def test_equality_and_hash() -> None:
    assert SseConfig(grant_timeout=1.0) == SseConfig(grant_timeout=1.0)
    assert SseConfig(grant_timeout=1.0) != SseConfig(grant_timeout=2.0)
    assert hash(SseConfig()) == hash(SseConfig())


@pytest.mark.parametrize(
    ("log", "least", "values"),
    [
        ("replay_max_events", "max_buffered_events", {"replay_max_events": 999}),
        ("replay_max_bytes", "max_buffered_bytes", {"replay_max_bytes": 4 * 1024 * 1024 - 1, "max_event_bytes": 1}),
        ("replay_max_bytes", "max_event_bytes", {"max_event_bytes": 8 * 1024 * 1024 + 1}),
    ],
)
def test_replay_log_smaller_than_what_it_must_keep_refused(log: str, least: str, values: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=f"{log} .* must be at least {least}"):
        SseConfig(**values)  # type: ignore[arg-type]


def test_replay_log_as_large_as_the_buffer_accepted() -> None:
    config = SseConfig(replay_max_events=1000, replay_max_bytes=4 * 1024 * 1024)
    assert (config.replay_max_events, config.replay_max_bytes) == (
        config.max_buffered_events,
        config.max_buffered_bytes,
    )
