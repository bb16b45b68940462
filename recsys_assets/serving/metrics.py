"""Prometheus metrics of the serving layer, one registry per service instance.

Every series carries surface, region and model_version, so a bad model or a stale
partition shows up on its own. Rates are ratios of counters (see docs/SERVING.md):
store hit rate = store_lookups{result="hit"} / store_lookups, fallback and empty rates
from requests{served_from=...}, rejection rate = rejections / items_checked.
Labelled children are cached: `labels()` takes a lock and a dict lookup per call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from recsys_assets.channels.attribution import TrackingIndex
    from recsys_assets.serving.decision_log import DecisionLog

_PARTITION = ["surface", "region", "model_version"]
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


class ServingMetrics:
    """Counters and a latency histogram for recommendation requests."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "recsys_serving_requests",
            "Recommendation responses by where they were served from",
            [*_PARTITION, "served_from"],
            registry=r,
        )
        self.store_lookups = Counter(
            "recsys_serving_store_lookups",
            "Requests by whether the subject's precomputed list was served (hit) or not (miss)",
            [*_PARTITION, "result"],
            registry=r,
        )
        self.stale_lists = Counter(
            "recsys_serving_stale_lists",
            "Expired lists met, by what the surface's stale policy did with them",
            [*_PARTITION, "outcome"],
            registry=r,
        )
        self.fallbacks = Counter(
            "recsys_serving_fallbacks",
            "Requests that needed a fallback list or came back empty, by cause",
            [*_PARTITION, "cause"],
            registry=r,
        )
        self.rejections = Counter(
            "recsys_serving_rejections",
            "Items refused by the final check, by reason",
            [*_PARTITION, "reason"],
            registry=r,
        )
        self.items_checked = Counter(
            "recsys_serving_items_checked",
            "Items put through the final check (denominator of the rejection rate)",
            _PARTITION,
            registry=r,
        )
        self.latency = Histogram(
            "recsys_serving_latency_seconds",
            "Time to answer one recommendation request in-process",
            _PARTITION,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_refresh_errors = Counter(
            "recsys_serving_store_refresh_errors",
            "Manifest or version reads that failed (the previous version keeps serving)",
            registry=r,
        )
        self.active_versions = Gauge(
            "recsys_serving_active_version",
            "1 for the version each partition serves now (kind: lists or fallback)",
            ["surface", "region", "kind", "version"],
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    def observe(
        self,
        *,
        surface: str,
        region: str,
        model_version: str,
        served_from: str,
        store_hit: bool,
        stale_outcome: str | None,
        fallback_cause: str | None,
        rejections: dict[str, int],
        items_checked: int,
        latency_s: float,
    ) -> None:
        labels = (surface, region, model_version)
        self._child(self.requests, *labels, served_from).inc()
        self._child(self.store_lookups, *labels, "hit" if store_hit else "miss").inc()
        if stale_outcome is not None:
            self._child(self.stale_lists, *labels, stale_outcome).inc()
        if fallback_cause is not None:
            self._child(self.fallbacks, *labels, fallback_cause).inc()
        for reason, count in rejections.items():
            self._child(self.rejections, *labels, reason).inc(count)
        if items_checked:
            self._child(self.items_checked, *labels).inc(items_checked)
        self._child(self.latency, *labels).observe(latency_s)

    def set_active_versions(self, versions: dict[tuple[str, str, str], str]) -> None:
        """Replace the active-version series with (surface, region, kind) -> version."""
        self.active_versions.clear()
        for (surface, region, kind), version in versions.items():
            self.active_versions.labels(surface, region, kind, version).set(1)

    def watch_decision_log(self, decision_log: DecisionLog) -> None:
        """Export the decision log's own counts (it keeps plain ints: no lock on append)."""
        self.registry.register(_DecisionLogCollector(decision_log))

    def watch_channels(self, index: TrackingIndex) -> None:
        """Export channel sends, plan skips, opens, clicks and attributed CTR (read at scrape
        time from the tracking index, which follows the sends ledger and engagement events)."""
        self.registry.register(_ChannelCollector(index))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _DecisionLogCollector(Collector):
    """Decision-log counts read at scrape time: written, failed, dropped, waiting."""

    def __init__(self, decision_log: DecisionLog) -> None:
        self.decision_log = decision_log

    def collect(self) -> Iterator[Metric]:
        log = self.decision_log
        failures = CounterMetricFamily(
            "recsys_serving_decision_log_write_failures",
            "Decision-log writes that failed: storage (file not written, rows kept and "
            "retried) or bad_record (a record that cannot be written, isolated and dropped)",
            labels=["cause"],
        )
        failures.add_metric(["storage"], log.write_failures)
        failures.add_metric(["bad_record"], log.rejected)
        yield failures
        yield CounterMetricFamily(
            "recsys_serving_decision_log_rows_written",
            "Decision-log rows written to the warehouse",
            value=log.written,
        )
        yield CounterMetricFamily(
            "recsys_serving_decision_log_rows_dropped",
            "Decision-log rows dropped because more than max_pending were waiting",
            value=log.dropped,
        )
        yield GaugeMetricFamily(
            "recsys_serving_decision_log_pending",
            "Decision-log rows waiting for the next flush",
            value=log.pending,
        )


class _ChannelCollector(Collector):
    """Email/push/digest attribution by surface, region and model version."""

    def __init__(self, index: TrackingIndex) -> None:
        self.index = index

    def collect(self) -> Iterator[Metric]:
        sends, events, ctr = self.index.snapshot()
        sent = CounterMetricFamily(
            "recsys_channel_sends", "Messages handed to a sender (sends ledger)", labels=_PARTITION
        )
        for labels, count in sorted(sends.items()):
            sent.add_metric(list(labels), count)
        yield sent
        for event_type in ("open", "click"):
            family = CounterMetricFamily(
                f"recsys_channel_{event_type}s",
                f"Attributed {event_type}s (tracking token verified against its send)",
                labels=_PARTITION,
            )
            for (labels, kind), count in sorted(events.items()):
                if kind == event_type:
                    family.add_metric(list(labels), count)
            yield family
        rate = GaugeMetricFamily(
            "recsys_channel_attributed_ctr",
            "Sends with at least one attributed click / sends",
            labels=_PARTITION,
        )
        for labels, value in sorted(ctr.items()):
            rate.add_metric(list(labels), value)
        yield rate
        skips = GaugeMetricFamily(
            "recsys_channel_plan_skips",
            "Subjects the partition's current send plan skipped, by reason",
            labels=["surface", "region", "reason"],
        )
        for labels, count in sorted(self.index.skips.items()):
            skips.add_metric(list(labels), count)
        yield skips
        unsubscribes = CounterMetricFamily(
            "recsys_channel_unsubscribes_after_send",
            "Sends whose subject opted out (consent_revoked) within the unsubscribe window "
            "after the send",
            labels=_PARTITION,
        )
        for labels, count in sorted(self.index.unsubscribes.items()):
            unsubscribes.add_metric(list(labels), count)
        yield unsubscribes
