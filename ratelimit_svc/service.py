"""envoy.service.ratelimit.v3.RateLimitService: Envoy asks, Redis counts.

When Redis is unreachable the service answers by ``failure_mode``: ``open``
allows the request (availability first), ``closed`` refuses it; either way the
outage is logged, once per outage.
"""

from __future__ import annotations

import logging

from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from mesh.errors import DependencyUnavailable
from mesh.redisconn import redis_errors
from mesh.servicer import Context
from ratelimit_svc.limits import Descriptor, Limiter, Rule, Verdict

log = logging.getLogger("opsmesh.ratelimit")

SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
_UNITS = {
    "second": rls_pb2.RateLimitResponse.RateLimit.SECOND,
    "minute": rls_pb2.RateLimitResponse.RateLimit.MINUTE,
    "hour": rls_pb2.RateLimitResponse.RateLimit.HOUR,
    "day": rls_pb2.RateLimitResponse.RateLimit.DAY,
}
OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT


def descriptors_of(request: rls_pb2.RateLimitRequest) -> list[Descriptor]:
    hits = request.hits_addend or 1
    return [
        Descriptor(
            entries=[(entry.key, entry.value) for entry in descriptor.entries],
            hits=descriptor.hits_addend.value or hits,
        )
        for descriptor in request.descriptors
    ]


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limiter: Limiter, *, failure_mode: str = "open") -> None:
        self._limiter = limiter
        self._failure_mode = failure_mode
        self._redis_down = False
        # Built once per rule, copied into each answer (a decision must stay cheap).
        self._limits: dict[str, rls_pb2.RateLimitResponse.RateLimit] = {}

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Context
    ) -> rls_pb2.RateLimitResponse:
        try:
            with redis_errors():
                verdicts = await self._limiter.check_all(request.domain, descriptors_of(request))
        except DependencyUnavailable as error:
            return self._without_redis(error)
        if self._redis_down:
            log.info("rate limits available again")
            self._redis_down = False
        return self._response(verdicts)

    def _response(self, verdicts: list[Verdict]) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=OK)
        for verdict in verdicts:
            status = response.statuses.add(code=OVER_LIMIT if verdict.over else OK)
            if verdict.rule is not None:
                status.current_limit.CopyFrom(self._limit_of(verdict.rule))
                status.limit_remaining = verdict.remaining
                status.duration_until_reset.seconds = verdict.reset_seconds
            if verdict.over:
                response.overall_code = OVER_LIMIT
        return response

    def _limit_of(self, rule: Rule) -> rls_pb2.RateLimitResponse.RateLimit:
        limit = self._limits.get(rule.name)
        if limit is None:
            limit = rls_pb2.RateLimitResponse.RateLimit(
                name=rule.name, requests_per_unit=rule.requests_per_unit, unit=_UNITS[rule.unit]
            )
            self._limits[rule.name] = limit
        return limit

    def _without_redis(self, error: DependencyUnavailable) -> rls_pb2.RateLimitResponse:
        if not self._redis_down:
            log.error("rate limits unavailable (%s); failing %s", error.message, self._failure_mode)
            self._redis_down = True
        code = OK if self._failure_mode == "open" else OVER_LIMIT
        return rls_pb2.RateLimitResponse(overall_code=code)
