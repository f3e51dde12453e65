"""Prometheus metrics of the queue, built with ``prometheus_client`` from one dashboard snapshot per scrape.

Served by ``slip dashboard`` at ``/metrics`` (behind its basic auth). Every figure comes from the read API
(:mod:`jobs.view` through :class:`producer.client.QueueClient`), so a scrape costs what a dashboard refresh
costs (Redis round trips and a broker connection; no store request for the jobs Redis knows)::

    slip_job_units{job_id, kind, unit, state}            gauge: units (images for segment jobs) done | failed |
                                                      unfinished (running + queued + waiting)
    slip_job_finished_units_total{job_id, kind}          counter: done + failed; flat while a job is stalled
    slip_job_active{job_id, kind}                        gauge: 1 while the job is registered and not finished
    slip_job_rate_units_per_second{job_id, kind}         gauge: units per second over the job's run (images/s)
    slip_job_eta_seconds{job_id, kind}                   gauge: seconds to the end at that rate (active jobs)
    slip_job_in_flight_chunks{job_id, kind}              gauge: chunks sent and not finished
    slip_job_age_seconds{job_id, kind}                   gauge: since the job was created
    slip_queue_depth{queue}                           gauge: messages waiting in the Celery queue (gpu, cpu)
    slip_worker_heartbeat_age_seconds{node, host}     gauge: seconds since the worker's last beat
    slip_worker_alive{node, host}                     gauge: 1 when it beat within SLIP_DEAD_AFTER
    slip_worker_busy{node, host}                      gauge: 1 while it holds a chunk
    slip_worker_rate_units_per_second{node, host}     gauge: units per second over the last minute
    slip_dashboard_read_errors{part}                  gauge: 1 when that part (jobs, workers, queues) could
                                                      not be read for this scrape

The job label is ``job_id``: Prometheus keeps ``job`` for the scrape job. A stalled job:
``slip_job_active == 1 and on(job_id, kind) increase(slip_job_finished_units_total[15m]) == 0``.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format
PARTS = ("jobs", "workers", "queues")


class QueueCollector:
    """A ``prometheus_client`` collector: ``snapshot()`` (a :class:`producer.dashboard.Snapshot`) is read
    once per scrape."""

    def __init__(self, snapshot: Callable[[], object]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from _job_metrics(snap.jobs)
        depth = GaugeMetricFamily("slip_queue_depth", "Messages waiting in the Celery queue.", labels=["queue"])
        for queue, count in sorted(snap.depths.items()):
            depth.add_metric([queue], count)
        yield depth
        yield from _worker_metrics(snap.workers)
        errors = GaugeMetricFamily("slip_dashboard_read_errors", "1 when a part could not be read for this scrape.",
                                   labels=["part"])
        for part in PARTS:
            errors.add_metric([part], int(part in snap.errors))
        yield errors


def _job_metrics(rows) -> Iterator[Metric]:
    labels = ["job_id", "kind"]
    units = GaugeMetricFamily("slip_job_units", "Units of the job by state (images for segment jobs).",
                              labels=[*labels, "unit", "state"])
    finished = CounterMetricFamily("slip_job_finished_units", "Units done or failed (flat while the job stalls).",
                                   labels=labels)
    gauges = {name: GaugeMetricFamily(f"slip_job_{name}", text, labels=labels) for name, text in (
        ("active", "1 while the job is registered and not finished."),
        ("rate_units_per_second", "Units per second over the job's run (images/s for segment jobs)."),
        ("eta_seconds", "Seconds until the job finishes at its rate (active jobs with a rate)."),
        ("in_flight_chunks", "Chunks sent and not finished."),
        ("age_seconds", "Seconds since the job was created."))}
    for row in rows:
        key = [row.job_id, row.kind]
        for state, value in (("done", row.done), ("failed", row.failed),
                             ("unfinished", row.running + row.queued + row.waiting)):
            units.add_metric([*key, row.unit, state], value)
        finished.add_metric(key, row.done + row.failed)
        gauges["active"].add_metric(key, int(row.state == "active"))
        gauges["in_flight_chunks"].add_metric(key, row.in_flight)
        gauges["age_seconds"].add_metric(key, row.age_s)
        if row.rate is not None:
            gauges["rate_units_per_second"].add_metric(key, row.rate)
        if row.eta_s is not None:
            gauges["eta_seconds"].add_metric(key, row.eta_s)
    yield units
    yield finished
    yield from gauges.values()


def _worker_metrics(rows) -> Iterator[Metric]:
    labels = ["node", "host"]
    families = {name: GaugeMetricFamily(f"slip_worker_{name}", text, labels=labels) for name, text in (
        ("heartbeat_age_seconds", "Seconds since the worker's last heartbeat."),
        ("alive", "1 when the worker beat within SLIP_DEAD_AFTER."),
        ("busy", "1 while the worker holds a chunk."),
        ("rate_units_per_second", "Units per second over the last minute."))}
    for row in rows:
        key = [row.node, row.host]
        families["heartbeat_age_seconds"].add_metric(key, row.heartbeat_age_s)
        families["alive"].add_metric(key, int(row.alive))
        families["busy"].add_metric(key, int(row.job is not None))
        families["rate_units_per_second"].add_metric(key, row.rate)
    yield from families.values()


def metrics_registry(snapshot: Callable[[], object]) -> CollectorRegistry:
    """A registry of its own (nothing global) holding one :class:`QueueCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(snapshot))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (one snapshot read)."""
    return generate_latest(registry)
