"""envoy.service.ratelimit.v3.RateLimitService: Envoy asks, Redis counts.

When Redis is unreachable the service answers by ``failure_mode``: ``open``
allows the request (availability first), ``closed`` refuses it; either way the
outage is logged, once per outage.
"""

from __future__ import annotations

import logging
from typing import TypeAlias

from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2
from grpc import aio

from mesh.errors import DependencyUnavailable
from mesh.redisconn import redis_errors
from ratelimit_svc.limits import Limiter

log = logging.getLogger("opsmesh.ratelimit")

SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
Context: TypeAlias = "aio.ServicerContext[object, object]"
_UNITS = {
    "second": rls_pb2.RateLimitResponse.RateLimit.SECOND,
    "minute": rls_pb2.RateLimitResponse.RateLimit.MINUTE,
    "hour": rls_pb2.RateLimitResponse.RateLimit.HOUR,
    "day": rls_pb2.RateLimitResponse.RateLimit.DAY,
}
OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, limiter: Limiter, *, failure_mode: str = "open") -> None:
        self._limiter = limiter
        self._failure_mode = failure_mode
        self._redis_down = False

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Context
    ) -> rls_pb2.RateLimitResponse:
        response = rls_pb2.RateLimitResponse(overall_code=OK)
        hits = request.hits_addend or 1
        try:
            for descriptor in request.descriptors:
                entries = [(entry.key, entry.value) for entry in descriptor.entries]
                with redis_errors():
                    verdict = await self._limiter.check(
                        request.domain, entries, descriptor.hits_addend.value or hits
                    )
                status = response.statuses.add(code=OVER_LIMIT if verdict.over else OK)
                if verdict.rule is not None:
                    status.current_limit.CopyFrom(
                        rls_pb2.RateLimitResponse.RateLimit(
                            name=verdict.rule.name,
                            requests_per_unit=verdict.rule.requests_per_unit,
                            unit=_UNITS[verdict.rule.unit],
                        )
                    )
                    status.limit_remaining = verdict.remaining
                    status.duration_until_reset.CopyFrom(
                        duration_pb2.Duration(seconds=verdict.reset_seconds)
                    )
                if verdict.over:
                    response.overall_code = OVER_LIMIT
        except DependencyUnavailable as error:
            if not self._redis_down:
                log.error(
                    "rate limits unavailable (%s); failing %s", error.message, self._failure_mode
                )
                self._redis_down = True
            code = OK if self._failure_mode == "open" else OVER_LIMIT
            return rls_pb2.RateLimitResponse(overall_code=code)
        if self._redis_down:
            log.info("rate limits available again")
            self._redis_down = False
        return response
