"""Many log lines as a few templates with counts (Drain, through ``drain3``).

A thousand "connection to 10.0.0.7 refused" lines are one fact for a model and for a
person: the template ``connection to <IP> refused`` seen 1000 times between two
moments. Variable parts (numbers, UUIDs, IP addresses, hex ids) are masked before
mining so they never split a template. The miner lives in memory for one call: no
state is kept between questions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from drain3 import TemplateMiner  # type: ignore[import-untyped]
from drain3.masking import MaskingInstruction  # type: ignore[import-untyped]
from drain3.template_miner_config import TemplateMinerConfig  # type: ignore[import-untyped]

from chat_svc.logsources import LogRecord, level_rank

# Order matters: a UUID or an address must be masked before its digits are.
_MASKS = (
    (r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b", "UUID"),
    (r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b", "IP"),
    (r"\b0[xX][0-9a-fA-F]+\b", "HEX"),
    (r"\b(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{12,}\b", "HEX"),
    (r"(?<![A-Za-z_])[-+]?\d+(?:\.\d+)?(?:ms|s|m|h|d)?\b", "NUM"),
)
_MAX_EXAMPLE_CHARS = 500


@dataclass(frozen=True, kw_only=True)
class LogPattern:
    template: str
    count: int
    level: str
    """The most severe level among its lines."""
    first_seen: datetime
    last_seen: datetime
    example: str
    """One real line of it (the newest), bounded."""
    services: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "template": self.template,
            "count": self.count,
            "level": self.level,
            "first_seen": self.first_seen.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "example": self.example,
            "services": list(self.services),
        }


def _miner() -> TemplateMiner:
    config = TemplateMinerConfig()
    config.masking_instructions = [MaskingInstruction(regex, name) for regex, name in _MASKS]
    config.drain_sim_th = 0.5
    config.drain_depth = 4
    config.drain_max_clusters = 1000  # bounded memory whatever the input
    config.profiling_enabled = False
    return TemplateMiner(persistence_handler=None, config=config)


@dataclass
class _Tally:
    count: int
    level: str
    first_seen: datetime
    last_seen: datetime
    example: str
    services: set[str]


def mine_patterns(records: Iterable[LogRecord], *, top: int) -> list[LogPattern]:
    """The ``top`` most frequent templates of the records' messages, most frequent first."""
    if top < 1:
        raise ValueError(f"top must be at least 1, not {top}")
    miner = _miner()
    tallies: dict[int, _Tally] = {}
    for record in records:
        message = " ".join(record.message.split())  # one line: Drain tokenizes on spaces
        if not message:
            continue
        cluster_id = int(miner.add_log_message(message)["cluster_id"])
        tally = tallies.get(cluster_id)
        if tally is None:
            tallies[cluster_id] = _Tally(
                1, record.level, record.time, record.time, message, {record.service}
            )
            continue
        tally.count += 1
        tally.services.add(record.service)
        if level_rank(record.level) > level_rank(tally.level):
            tally.level = record.level
        tally.first_seen = min(tally.first_seen, record.time)
        if record.time >= tally.last_seen:
            tally.last_seen = record.time
            tally.example = message
    # Templates are read at the end: a cluster's template generalizes as lines arrive.
    templates = {cluster.cluster_id: cluster.get_template() for cluster in miner.drain.clusters}
    patterns = [
        LogPattern(
            template=templates.get(cluster_id, tally.example),
            count=tally.count,
            level=tally.level,
            first_seen=tally.first_seen,
            last_seen=tally.last_seen,
            example=tally.example[:_MAX_EXAMPLE_CHARS],
            services=tuple(sorted(service for service in tally.services if service)),
        )
        for cluster_id, tally in tallies.items()
    ]
    patterns.sort(key=lambda pattern: (-pattern.count, -level_rank(pattern.level)))
    return patterns[:top]
