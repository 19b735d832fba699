"""ids: event ids (session id, resume secret, store token), session tags, secrets, request-id limits."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_sse_transport import ids
from mcp_sse_transport.ids import (
    MAX_REQUEST_ID_BYTES,
    SEEN_REQUEST_IDS,
    EventId,
    event_id_prefix,
    format_event_id,
    new_secret,
    parse_event_id,
    secret_matches,
    session_tag,
)

SESSION = "0123456789abcdef0123456789abcdef"
SECRET = "fedcba9876543210fedcba9876543210"

hex32 = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
tokens = st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz._-", min_size=1, max_size=64)


def test_documented_request_id_limits() -> None:
    assert SEEN_REQUEST_IDS == 10_000
    assert MAX_REQUEST_ID_BYTES == 256


def test_exports() -> None:
    assert set(ids.__all__) == {
        "MAX_REQUEST_ID_BYTES",
        "SEEN_REQUEST_IDS",
        "EventId",
        "event_id_prefix",
        "format_event_id",
        "new_secret",
        "parse_event_id",
        "secret_matches",
        "session_tag",
    }
    assert all(hasattr(ids, name) for name in ids.__all__)


# -- session_tag ------------------------------------------------------------------------------------


def test_session_tag_is_the_first_eight_characters() -> None:
    assert session_tag(SESSION) == "01234567"
    assert SESSION not in session_tag(SESSION)


@pytest.mark.parametrize("short", ["", "abc", "01234567"])
def test_session_tag_of_a_short_id_is_the_whole_id(short: str) -> None:
    assert session_tag(short) == short


# -- new_secret -------------------------------------------------------------------------------------


def test_new_secret_is_128_bits_of_lowercase_hex() -> None:
    secret = new_secret()
    assert re.fullmatch(r"[0-9a-f]{32}", secret), secret


def test_new_secrets_differ() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100


# -- format, prefix, parse --------------------------------------------------------------------------


def test_format_event_id_layout() -> None:
    assert format_event_id(SESSION, "42", SECRET) == f"{SESSION}.{SECRET}:42"


def test_event_id_prefix_is_what_every_formatted_id_starts_with() -> None:
    prefix = event_id_prefix(SESSION, SECRET)
    assert prefix == f"{SESSION}.{SECRET}:"
    assert format_event_id(SESSION, "1700000000000-0", SECRET) == prefix + "1700000000000-0"


def test_parse_event_id_names_its_parts() -> None:
    parsed = parse_event_id(f"{SESSION}.{SECRET}:17")
    assert parsed == EventId(session_id=SESSION, token="17", secret=SECRET)
    assert parsed is not None
    assert (parsed.session_id, parsed.token, parsed.secret) == (SESSION, "17", SECRET)


@given(session_id=hex32, secret=hex32, token=tokens)
def test_format_then_parse_round_trips(session_id: str, secret: str, token: str) -> None:
    assert parse_event_id(format_event_id(session_id, token, secret)) == EventId(session_id, token, secret)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param(f"{SESSION}:17", id="older form without a secret"),
        pytest.param(f"{SESSION}.{SECRET}:", id="no token"),
        pytest.param(f"{SESSION}.{SECRET}", id="no colon"),
        pytest.param(f"{SESSION}.{SECRET}:{'1' * 65}", id="token over 64 characters"),
        pytest.param(f"{SESSION}.{SECRET}:1 2", id="space in token"),
        pytest.param(f"{SESSION}.{SECRET}:1\n", id="line break after token"),
        pytest.param(f"{SESSION}.{SECRET}:1:2", id="colon in token"),
        pytest.param(f"{SESSION}.{SECRET}:é", id="non-ascii token"),
        pytest.param(f"{SESSION.upper()}.{SECRET}:1", id="uppercase session id"),
        pytest.param(f"{SESSION}.{SECRET.upper()}:1", id="uppercase secret"),
        pytest.param(f"{SESSION[:-1]}.{SECRET}:1", id="short session id"),
        pytest.param(f"{SESSION}0.{SECRET}:1", id="long session id"),
        pytest.param(f"{SESSION}.{SECRET[:-1]}:1", id="short secret"),
        pytest.param(f" {SESSION}.{SECRET}:1", id="leading space"),
        pytest.param(f"{SESSION}-{SECRET}:1", id="wrong separator"),
        pytest.param(f"{SESSION[:8]}-{SESSION[8:12]}-{SESSION[12:16]}-{SESSION[16:20]}-{SESSION[20:]}.{SECRET}:1"),
    ],
)
def test_malformed_ids_parse_to_none(value: str) -> None:
    assert parse_event_id(value) is None


def test_a_token_of_64_characters_is_accepted() -> None:
    token = "a." * 32
    assert parse_event_id(format_event_id(SESSION, token, SECRET)) == EventId(SESSION, token, SECRET)


@given(st.text(max_size=200))
def test_parse_never_raises_and_returns_only_well_formed_parts(value: str) -> None:
    parsed = parse_event_id(value)
    if parsed is not None:
        assert format_event_id(parsed.session_id, parsed.token, parsed.secret) == value


# -- secret_matches ---------------------------------------------------------------------------------


def test_secret_matches_its_own_secret() -> None:
    assert secret_matches(SECRET, SECRET)
    assert secret_matches(str(SECRET), SECRET)  # equal, not identical


@pytest.mark.parametrize(
    "given_secret",
    [
        pytest.param(SESSION, id="another secret"),
        pytest.param(SECRET[:-1], id="a prefix"),
        pytest.param(SECRET + "0", id="longer"),
        pytest.param("", id="empty"),
        pytest.param(SECRET.upper(), id="other case"),
        pytest.param("é" * 32, id="non-ascii"),
    ],
)
def test_secret_matches_refuses_any_other_value(given_secret: str) -> None:
    assert not secret_matches(given_secret, SECRET)
