"""What the engine records in /metrics (server/metrics.py) about each job it settles, in one place for both kinds
of job: a generation's latencies and tokens when it finishes, and why any job failed.

Recording never costs a request its answer: a failure to record is logged and the answer goes out.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from server.errors import GenerationFailedError, HeadOutputError
from server.metrics import Metrics

if TYPE_CHECKING:
    from server.sequence import JobResult

log = logging.getLogger(__name__)


def failure_reason(error: BaseException) -> str:
    """One of server.metrics.FAILURE_REASONS: its head's output (409), its own decoding (500), or the forward."""
    return ("head_output" if isinstance(error, HeadOutputError) else
            "decoding" if isinstance(error, GenerationFailedError) else "forward")


def count_failure(metrics: Metrics, head_label: str, error: BaseException) -> None:
    try:
        metrics.failed_requests.labels(head=head_label, reason=failure_reason(error)).inc()
    except Exception:  # metrics are not worth a request
        log.exception("counting a failed request failed")


def record_result(metrics: Metrics, result: JobResult) -> None:
    """A finished generation's queue wait, first-token and inter-token latencies, and tokens per decoder."""
    try:
        main, label = result.main, result.main.head_label
        metrics.queue_wait.labels(head=label).observe(result.started_at - result.accepted_at)
        if main.token_times:
            metrics.time_to_first_token.labels(head=label).observe(main.token_times[0] - result.accepted_at)
        for earlier, later in zip(main.token_times, main.token_times[1:], strict=False):
            metrics.inter_token_latency.labels(head=label).observe(later - earlier)
        for seq in [main, *result.comparisons]:
            metrics.generated_tokens.labels(head=seq.head_label, decoder=seq.decoder).inc(len(seq.token_ids))
    except Exception:  # metrics are not worth a request
        log.exception("recording a finished request's metrics failed")
