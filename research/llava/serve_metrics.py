"""The server's `GET /metrics`, in Prometheus' text format (prometheus-client).

Measured by the server as requests go (`Metrics.request`, `Metrics.timing`):
  llava_http_requests_total{endpoint,status}     every HTTP answer, by route (unknown paths are "other", so a
                                                 client cannot grow the label set) and status code
  llava_time_to_first_token_seconds              request arrival -> first text of the answer
  llava_inter_token_latency_seconds              between two consecutive pieces of streamed text (a piece is
                                                 one token, or a few when text is held back: an unfinished
                                                 UTF-8 character, a possible stop string)
  llava_e2e_request_latency_seconds              request arrival -> the answer's end
  llava_prompt_tokens_total, llava_completion_tokens_total, llava_cached_prompt_tokens_total
Read from the scheduler's and the engine's public counters at every scrape (`_Live`):
  llava_queue_depth, llava_running_rows, llava_scheduler_steps_total, llava_requests_completed_total,
  llava_requests_cancelled_total, and `Engine.cache_stats()`: prefix-cache hits / hit tokens / evictions /
  cached blocks, KV blocks free and in all, image-cache hits / misses / evictions / entries / bytes.

One registry per server (not prometheus-client's global one), so nothing else's metrics leak into it.
"""
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/limits", "/")
CONTENT_TYPE = CONTENT_TYPE_LATEST

# CPU-sized buckets: a tiny model's token takes milliseconds, the 7B's first token tens of seconds
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Engine.cache_stats() key -> (metric name, counter or gauge, help); a key not listed is exported as a gauge
_CACHE = {
    "prefix_hits": ("llava_prefix_cache_hits", "counter", "requests that took a cached prefix"),
    "prefix_cached_tokens": ("llava_prefix_cache_hit_tokens", "counter", "prompt tokens taken from the cache"),
    "prefix_evictions": ("llava_prefix_cache_evictions", "counter", "cached blocks handed out again"),
    "prefix_cached_blocks": ("llava_prefix_cache_blocks", "gauge", "KV blocks holding a cached prefix"),
    "kv_blocks_free": ("llava_kv_blocks_free", "gauge", "KV pool blocks never used or free"),
    "kv_blocks": ("llava_kv_blocks", "gauge", "KV pool blocks in all"),
    "image_cache_hits": ("llava_image_cache_hits", "counter", "images whose features were cached"),
    "image_cache_misses": ("llava_image_cache_misses", "counter", "images that ran the vision tower"),
    "image_cache_evictions": ("llava_image_cache_evictions", "counter", "image features dropped for room"),
    "image_cache_entries": ("llava_image_cache_entries", "gauge", "images in the feature cache"),
    "image_cache_bytes": ("llava_image_cache_bytes", "gauge", "bytes of cached image features"),
}


def endpoint(path):
    if path in ENDPOINTS:
        return path
    return "/static" if path.startswith("/static/") else "other"


class _Live:
    """The scheduler's and the engine's own counters, read at scrape time."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler
        yield GaugeMetricFamily("llava_queue_depth", "requests waiting to join the batch", value=s.waiting)
        yield GaugeMetricFamily("llava_running_rows", "requests in the running batch", value=s.running)
        yield CounterMetricFamily("llava_scheduler_steps", "engine steps run", value=s.steps)
        yield CounterMetricFamily("llava_requests_completed", "answers that ended (stop or length)",
                                  value=s.completed)
        yield CounterMetricFamily("llava_requests_cancelled", "answers whose client went away", value=s.cancelled)
        for key, value in s.engine.cache_stats().items():
            name, kind, about = _CACHE.get(key, (f"llava_{key}", "gauge", key.replace("_", " ")))
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, about, value=value)


class Timing:
    """One request's clock: arrival, first text, each later piece, the end."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.start = time.monotonic()
        self.last = None

    def piece(self):
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.token_gap.observe(now - self.last)
        self.last = now

    def done(self, prompt_tokens, completion_tokens, cached_tokens):
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.start)
        m.prompt_tokens.inc(prompt_tokens)
        m.completion_tokens.inc(completion_tokens)
        m.cached_tokens.inc(cached_tokens)


class Metrics:
    def __init__(self, scheduler):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llava_http_requests", "HTTP answers by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("llava_time_to_first_token_seconds", "request arrival to the first text",
                              buckets=_LATENCY, registry=r)
        self.token_gap = Histogram("llava_inter_token_latency_seconds", "between two pieces of streamed text",
                                   buckets=_TOKEN_GAP, registry=r)
        self.e2e = Histogram("llava_e2e_request_latency_seconds", "request arrival to the end of the answer",
                             buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("llava_prompt_tokens", "prompt tokens of finished answers", registry=r)
        self.completion_tokens = Counter("llava_completion_tokens", "tokens generated in finished answers",
                                         registry=r)
        self.cached_tokens = Counter("llava_cached_prompt_tokens", "prompt tokens taken from the prefix cache",
                                     registry=r)
        r.register(_Live(scheduler))

    def request(self, path, status):
        self.requests.labels(endpoint(path), str(status)).inc()

    def timing(self):
        return Timing(self)

    def render(self):
        return generate_latest(self.registry)
