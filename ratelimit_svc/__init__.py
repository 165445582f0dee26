"""opsmesh rate limit service: Envoy's envoy.service.ratelimit.v3.RateLimitService on Redis."""
