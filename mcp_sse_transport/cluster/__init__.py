"""Scale-out on Redis: the backplane that shares sessions between workers.

Modules, bottom up (imports point down only): :mod:`.messages` (what workers send each other)
and :mod:`.connect` (clients, Redis faults); :mod:`.bus` (the worker's channel) and
:mod:`.directory` (sessions and their leases); :mod:`.ledger` (requests), :mod:`.relay`
(relayed streams); :mod:`.takeover`; :mod:`.forwarding` (POSTs) and :mod:`.resume`;
:mod:`.backplane` (:class:`RedisBackplane`, wiring them).
"""

from __future__ import annotations

try:
    import redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is installed in development
    raise ImportError("redis_url needs the redis extra: pip install 'mcp-sse-transport[redis]'") from exc

from .backplane import RedisBackplane
from .bus import Bus, OwnerUnreachable
from .directory import Directory, DirectoryEntry
from .ledger import RedisRequestLedger
from .relay import Relay, Relays
from .takeover import Takeovers

__all__ = [
    "Bus",
    "Directory",
    "DirectoryEntry",
    "OwnerUnreachable",
    "RedisBackplane",
    "RedisRequestLedger",
    "Relay",
    "Relays",
    "Takeovers",
]
