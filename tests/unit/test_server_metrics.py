"""`server.metrics.Metrics.forget_head`: a deleted head's series go, everyone else's stay."""

from __future__ import annotations

from server.metrics import Metrics
from server.schemas import BASE_LABEL


def labelled_heads(metrics: Metrics) -> set[str]:
    return {sample.labels["head"] for family in metrics.registry.collect() for sample in family.samples
            if "head" in sample.labels}


def test_forget_head_drops_every_series_of_that_head_only() -> None:
    metrics = Metrics()
    for head in ("gone", "kept", BASE_LABEL):
        metrics.observe_request("/generate", head, 200, 0.1)
        metrics.observe_request("/generate", head, 422, 0.1)
        metrics.time_to_first_token.labels(head=head).observe(0.01)
        metrics.inter_token_latency.labels(head=head).observe(0.01)
        metrics.queue_wait.labels(head=head).observe(0.01)
        metrics.generated_tokens.labels(head=head, decoder="greedy").inc(3)
        metrics.head_loads_total.labels(head=head).inc()
    assert labelled_heads(metrics) == {"gone", "kept", BASE_LABEL}
    kept_lines = [line for line in metrics.render().decode().splitlines() if 'head="kept"' in line]
    metrics.forget_head("gone")
    assert labelled_heads(metrics) == {"kept", BASE_LABEL}
    assert [line for line in metrics.render().decode().splitlines() if 'head="kept"' in line] == kept_lines
    metrics.forget_head("never-seen")  # a no-op, not an error
    assert labelled_heads(metrics) == {"kept", BASE_LABEL}
