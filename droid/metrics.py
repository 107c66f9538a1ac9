"""Prometheus metrics, one registry per application (two apps can share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("droid_socket_connections", "Live Socket.IO connections on /events "
                                 "in this process", registry=r)
        self.events_emitted = Counter("droid_events_emitted", "Task events emitted, by event",
                                      ["event"], registry=r)
        self.sockets_shed = Counter("droid_sockets_shed", "Sockets disconnected for falling more "
                                    "than 1,000 messages behind", registry=r)
        self.refusals = Counter("droid_socket_refusals", "Refused Socket.IO connections, by reason",
                                ["reason"], registry=r)
        self.tasks = Gauge("droid_tasks", "Tasks by status", ["status"], registry=r)
        self.queue_depth = Gauge("droid_queue_depth", "Pending tasks that are due", registry=r)
        self.attempts = Histogram("droid_attempt_seconds", "Duration of task attempts, by outcome",
                                  ["outcome"], registry=r,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.webhook_deliveries = Counter(
            "droid_webhook_deliveries", "Webhook delivery attempts, by outcome (succeeded, "
            "retrying, failed, gone)", ["outcome"], registry=r)
        self.webhook_attempt_seconds = Histogram(
            "droid_webhook_attempt_seconds", "Duration of webhook delivery attempts, by outcome",
            ["outcome"], registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15))
        self.http_requests = Counter("droid_http_requests", "HTTP requests, by status class",
                                     ["code"], registry=r)
