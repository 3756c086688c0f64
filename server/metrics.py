"""Prometheus metrics, one `CollectorRegistry` per app so several apps in one process never clash.

The base model's own linear head is labelled `base`; heads are labelled by their registry name,
and only once the registry has resolved it: a request naming anything else is labelled `unknown`,
so no client can add series. A deleted head's series are dropped. The request series are thus
bounded by routes x (registered heads + 3: base, unknown, none) x statuses (docs/api.md).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Why the engine failed a request: its head's output (409), its own decoding (500), or the base's forward.
FAILURE_REASONS = ("head_output", "decoding", "forward")
UNKNOWN_LABEL = "unknown"  # a head the registry did not resolve (not registered, or not a valid name)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram("headserve_request_duration_seconds", "HTTP request latency",
                                          ["route", "head", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests_total = Counter("headserve_requests_total", "HTTP requests answered",
                                      ["route", "head", "status"], registry=r)
        self.time_to_first_token = Histogram("headserve_time_to_first_token_seconds",
                                             "Request accepted -> first generated token", ["head"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("headserve_inter_token_latency_seconds",
                                             "Time between consecutive generated tokens", ["head"],
                                             buckets=STEP_BUCKETS, registry=r)
        self.queue_wait = Histogram("headserve_queue_wait_seconds", "Request accepted -> the worker starts it",
                                    ["head"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("headserve_generated_tokens_total", "Tokens generated",
                                        ["head", "decoder"], registry=r)
        self.head_load_seconds = Histogram("headserve_head_load_seconds", "Load, validate and prepare one head",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.head_loads_total = Counter("headserve_head_loads_total", "Heads loaded into the cache", ["head"],
                                        registry=r)
        self.heads_resident = Gauge("headserve_heads_resident", "Prepared heads held in the cache", registry=r)
        self.batch_size = Histogram("headserve_batch_size", "Sequences in one engine step (comparisons included)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_heads = Histogram("headserve_batch_heads", "Distinct heads in one engine step (base included)",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.active_sequences = Gauge("headserve_active_sequences",
                                      "Sequences holding a batch slot after the last engine step", registry=r)
        self.abandoned_requests = Counter("headserve_abandoned_requests_total",
                                          "Requests dropped because their client went away (closed streams)",
                                          registry=r)
        self.queue_size = Gauge("headserve_queue_size", "Requests waiting for the engine worker", registry=r)
        # A stream that fails mid-way already answered 200, so request status alone cannot show it.
        self.failed_requests = Counter("headserve_failed_requests_total",
                                       "Requests the engine ended with an error, by why (FAILURE_REASONS)",
                                       ["head", "reason"], registry=r)
        self.classifications = Counter("headserve_classifications_total", "Texts classified (POST /classify)",
                                       ["head"], registry=r)
        self.classify_latency = Histogram("headserve_classify_seconds", "Text accepted -> its label probabilities",
                                          ["head"], buckets=LATENCY_BUCKETS, registry=r)
        self._per_head = [(self.failed_requests, ("head", "reason")),
                          (self.request_duration, ("route", "head", "status")),
                          (self.requests_total, ("route", "head", "status")),
                          (self.time_to_first_token, ("head",)), (self.inter_token_latency, ("head",)),
                          (self.queue_wait, ("head",)), (self.generated_tokens, ("head", "decoder")),
                          (self.head_loads_total, ("head",)), (self.classifications, ("head",)),
                          (self.classify_latency, ("head",))]

    def observe_request(self, route: str, head: str, status: int, seconds: float) -> None:
        self.request_duration.labels(route=route, head=head, status=str(status)).observe(seconds)
        self.requests_total.labels(route=route, head=head, status=str(status)).inc()

    def forget_head(self, head: str) -> None:
        """Drop every series labelled with a deleted head, so the label values follow the registry."""
        for metric, names in self._per_head:
            stale = {tuple(sample.labels[n] for n in names) for family in metric.collect()
                     for sample in family.samples if sample.labels.get("head") == head}
            for values in stale:
                metric.remove(*values)

    def render(self) -> bytes:
        return generate_latest(self.registry)
