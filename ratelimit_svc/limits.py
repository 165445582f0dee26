"""Rate limit rules and their counting: fixed windows in Redis, one INCR per descriptor."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    keys: tuple[str, ...]
    requests_per_unit: int
    unit: str
    values: Mapping[str, str] = field(default_factory=dict)

    def matches(self, entries: Sequence[tuple[str, str]]) -> bool:
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


_COUNT = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
if count == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return count
"""


class Limiter:
    def __init__(
        self, client: aioredis.Redis, rules: Sequence[Rule], *, prefix: str = "opsmesh:rl:"
    ):
        self._redis = client
        self._rules = list(rules)
        self._prefix = prefix
        self._count = client.register_script(_COUNT)

    def rule_for(self, entries: Sequence[tuple[str, str]]) -> Rule | None:
        return next((rule for rule in self._rules if rule.matches(entries)), None)

    async def check(self, domain: str, entries: Sequence[tuple[str, str]], hits: int) -> Verdict:
        rule = self.rule_for(entries)
        if rule is None:
            return Verdict(rule=None, over=False, remaining=0, reset_seconds=0)
        period = UNITS[rule.unit]
        now = time.time()
        window = int(now // period)
        descriptor = "|".join(f"{k}={v}" for k, v in entries)
        key = f"{self._prefix}{domain}:{rule.name}:{descriptor}:{window}"
        count = int(await self._count(keys=[key], args=[hits, period]))
        reset = int((window + 1) * period - now) + 1
        return Verdict(
            rule=rule,
            over=count > rule.requests_per_unit,
            remaining=max(rule.requests_per_unit - count, 0),
            reset_seconds=reset,
        )
