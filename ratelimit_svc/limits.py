"""Rate limit rules and their counting: fixed windows in Redis.

A decision costs at most one Redis call, whatever the number of descriptors: one Lua script
counts every key of the request (INCRBY, and EXPIRE for a new window), as envoyproxy/ratelimit
pipelines a request's keys. A key over its limit stays over until its window ends (a fixed
window only counts up), so such keys are remembered in-process (:class:`OverLimitCache`, like
envoyproxy/ratelimit's ``LOCAL_CACHE``): a burst past the limit is refused without asking
Redis. Why this matters for Envoy's budget: docs/ratelimits.md.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
DEFAULT_LOCAL_CACHE_SIZE = 100_000

Entries = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    keys: tuple[str, ...]
    requests_per_unit: int
    unit: str
    values: Mapping[str, str] = field(default_factory=dict)

    @property
    def period(self) -> int:
        return UNITS[self.unit]

    def matches(self, entries: Entries) -> bool:
        if tuple(key for key, _ in entries) != self.keys:
            return False
        return all(dict(entries).get(key) == value for key, value in self.values.items())


def load_rules(path: Path) -> list[Rule]:
    raw = tomllib.loads(path.read_text())
    rules = []
    for entry in raw.get("rule", []):
        unit = entry["unit"]
        if unit not in UNITS:
            raise ValueError(f"{path}: rule {entry['name']}: unknown unit {unit!r}")
        rules.append(
            Rule(
                name=entry["name"],
                keys=tuple(entry["keys"]),
                requests_per_unit=int(entry["requests_per_unit"]),
                unit=unit,
                values=dict(entry.get("value", {})),
            )
        )
    return rules


@dataclass(frozen=True, slots=True)
class Verdict:
    rule: Rule | None
    over: bool
    remaining: int
    reset_seconds: int


UNLIMITED = Verdict(rule=None, over=False, remaining=0, reset_seconds=0)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One descriptor of a request: its entries and how many hits it adds."""

    entries: Entries
    hits: int = 1


# KEYS: the counters; ARGV: (hits, seconds the window lives) for each key, in order.
_COUNT = """
local counts = {}
for i, key in ipairs(KEYS) do
  local hits = tonumber(ARGV[2 * i - 1])
  local count = redis.call('INCRBY', key, hits)
  if count == hits then redis.call('EXPIRE', key, ARGV[2 * i]) end
  counts[i] = count
end
return counts
"""


class OverLimitCache:
    """Counter keys known to be over their limit, until their window ends.

    Safe to answer from: a fixed window's count never goes down, and a key names its window.
    Bounded: past ``size`` entries the ended windows are dropped, and if none has ended the
    cache starts over (a miss only costs a Redis call).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._until: dict[str, float] = {}

    def __contains__(self, key: str) -> bool:
        until = self._until.get(key)
        return until is not None and until > time.time()

    def add(self, key: str, until: float) -> None:
        if self._size <= 0:
            return
        if len(self._until) >= self._size:
            now = time.time()
            self._until = {k: end for k, end in self._until.items() if end > now}
            if len(self._until) >= self._size:
                self._until.clear()
        self._until[key] = until

    def __len__(self) -> int:
        return len(self._until)


@dataclass(frozen=True, slots=True)
class _Counting:
    """A descriptor Redis counts: where its verdict goes, its key and when its window ends."""

    index: int
    rule: Rule
    key: str
    hits: int
    window_end: float


class Limiter:
    def __init__(
        self,
        client: aioredis.Redis,
        rules: Sequence[Rule],
        *,
        prefix: str = "opsmesh:rl:",
        local_cache_size: int = DEFAULT_LOCAL_CACHE_SIZE,
    ):
        self._by_keys: dict[tuple[str, ...], list[Rule]] = {}
        for rule in rules:
            self._by_keys.setdefault(rule.keys, []).append(rule)
        self._prefix = prefix
        self._count = client.register_script(_COUNT)
        self.over_limit = OverLimitCache(local_cache_size)

    def rule_for(self, entries: Entries) -> Rule | None:
        candidates = self._by_keys.get(tuple(key for key, _ in entries), ())
        return next((rule for rule in candidates if rule.matches(entries)), None)

    async def check_all(self, domain: str, descriptors: Sequence[Descriptor]) -> list[Verdict]:
        """One verdict per descriptor; a request's keys are counted in one Redis call."""
        now = time.time()
        verdicts: list[Verdict] = []
        counting: list[_Counting] = []
        for descriptor in descriptors:
            rule = self.rule_for(descriptor.entries)
            if rule is None:
                verdicts.append(UNLIMITED)
                continue
            window = int(now // rule.period)
            window_end = (window + 1) * rule.period
            key = self._key(domain, rule, descriptor.entries, window)
            # Over, unless Redis is asked and says otherwise; not asked for a key that went
            # over earlier in this window.
            verdicts.append(_verdict(rule, rule.requests_per_unit + 1, window_end - now))
            if key not in self.over_limit:
                counting.append(
                    _Counting(len(verdicts) - 1, rule, key, descriptor.hits, window_end)
                )
        if counting:
            await self._settle(verdicts, counting, now)
        return verdicts

    async def _settle(self, verdicts: list[Verdict], counting: list[_Counting], now: float) -> None:
        args: list[int] = []
        for counted in counting:
            args += (counted.hits, counted.rule.period)
        counts = await self._count(keys=[counted.key for counted in counting], args=args)
        for counted, count in zip(counting, counts, strict=True):
            verdict = _verdict(counted.rule, int(count), counted.window_end - now)
            verdicts[counted.index] = verdict
            if verdict.over:
                self.over_limit.add(counted.key, counted.window_end)

    def _key(self, domain: str, rule: Rule, entries: Entries, window: int) -> str:
        descriptor = "|".join(f"{k}={v}" for k, v in entries)
        return f"{self._prefix}{domain}:{rule.name}:{descriptor}:{window}"


def _verdict(rule: Rule, count: int, seconds_left: float) -> Verdict:
    return Verdict(
        rule=rule,
        over=count > rule.requests_per_unit,
        remaining=max(rule.requests_per_unit - count, 0),
        reset_seconds=int(seconds_left) + 1,
    )
