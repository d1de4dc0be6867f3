"""The front door's request metrics: a latency histogram per app and responses by status class.

Made by the plugin's ``gateway_register_metrics`` on a node with ``[metrics] enabled``; until then
:data:`RECORDER` is None and the front door skips the two calls a request would cost. The labelled
children of an (app, status class) are looked up once and kept, so a request costs a clock read,
one histogram observation and one increment.
"""

from __future__ import annotations

import time
from typing import Any

# RequestMetrics on a node with metrics on, else None (read by the front door per request).
RECORDER: RequestMetrics | None = None


class RequestMetrics:
    """``gateway_http_request_duration_seconds{app,group}`` and ``gateway_http_responses{app,group,code_class}``."""

    def __init__(self, metrics: Any) -> None:
        self.duration = metrics.histogram(
            "gateway_http_request_duration_seconds", "HTTP requests through the front door, from the request"
            " head read to the response's last byte written (or the front door's own answer); app is empty"
            " for a request no app matched.", ("app", "group"))
        self.responses = metrics.counter(
            "gateway_http_responses", "HTTP responses of the front door by status class (2xx, 4xx...), the"
            " back end's or its own.", ("app", "group", "code_class"))
        # A monotonic clock: a duration must not jump with the wall clock.
        self.clock = time.perf_counter
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(self, app: Any, status: int, started: float) -> None:
        """A request to ``app`` (None: none matched) answered with ``status``, begun at ``started``
        (``clock()``; 0.0 when unknown: counted, no duration)."""
        key = (app.name if app is not None else "", status // 100)
        children = self._children.get(key)
        if children is None:
            group = app.group if app is not None else ""
            children = self._children[key] = (self.duration.labels(key[0], group),
                                              self.responses.labels(key[0], group, f"{key[1]}xx"))
        if started:
            children[0].observe(self.clock() - started)
        children[1].inc()


def register(metrics: Any) -> None:
    global RECORDER
    if "node" in metrics.roles:
        RECORDER = RequestMetrics(metrics)
