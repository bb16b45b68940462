"""Prometheus metrics of the serving layer, one registry per service instance.

Every series carries surface, region and model_version, so a bad model or a stale
partition shows up on its own. Rates are ratios of counters (see docs/SERVING.md):
store hit rate = store_lookups{result="hit"} / store_lookups, fallback and empty rates
from requests{served_from=...}, rejection rate = rejections / items_checked.
Labelled children are cached: `labels()` takes a lock and a dict lookup per call.

Experiments get their own series by (surface, experiment, arm): requests by served_from
(empty rate), rejections by reason over items checked (rejection rate), latency, and the
click-through of the arm's messages (sends with an attributed click / sends, the arm
recomputed from the send's subject, as serving assigned it).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from recsys_assets.channels.attribution import TrackingIndex
    from recsys_assets.serving.decision_log import DecisionLog
    from recsys_assets.serving.experiments import Experiment
    from recsys_assets.serving.kills import KillSwitch

_PARTITION = ["surface", "region", "model_version"]
_ARM = ["surface", "experiment", "arm"]
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
        self.arm_requests = Counter(
            "recsys_experiment_requests",
            "Recommendation responses of an experiment arm, by where they were served from",
            [*_ARM, "served_from"],
            registry=r,
        )
        self.arm_rejections = Counter(
            "recsys_experiment_rejections",
            "Items refused by the final check in an experiment arm, by reason",
            [*_ARM, "reason"],
            registry=r,
        )
        self.arm_items_checked = Counter(
            "recsys_experiment_items_checked",
            "Items put through the final check in an experiment arm",
            _ARM,
            registry=r,
        )
        self.arm_latency = Histogram(
            "recsys_experiment_latency_seconds",
            "Time to answer one recommendation request of an experiment arm, in-process",
            _ARM,
            buckets=LATENCY_BUCKETS,
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

    def observe_arm(
        self,
        *,
        surface: str,
        experiment: str,
        arm: str,
        served_from: str,
        rejections: dict[str, int],
        items_checked: int,
        latency_s: float,
    ) -> None:
        """Count one response of an experiment arm (besides `observe`)."""
        labels = (surface, experiment, arm)
        self._child(self.arm_requests, *labels, served_from).inc()
        for reason, count in rejections.items():
            self._child(self.arm_rejections, *labels, reason).inc(count)
        if items_checked:
            self._child(self.arm_items_checked, *labels).inc(items_checked)
        self._child(self.arm_latency, *labels).observe(latency_s)

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

    def watch_experiment_clicks(
        self, index: TrackingIndex, experiments: dict[str, Experiment]
    ) -> None:
        """Export per-arm sends, clicks and click-through of the experimented surfaces."""
        if experiments:
            self.registry.register(_ArmClicksCollector(index, experiments))

    def watch_kills(self, kill_switch: KillSwitch) -> None:
        """Export the kills in force (read at scrape time)."""
        self.registry.register(_KillsCollector(kill_switch))

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
            "Sends whose subject opted out of their medium within the unsubscribe window after "
            "the send, by the first opt-out (consent_revoked, email_unsubscribed, push_disabled)",
            labels=[*_PARTITION, "opt_out"],
        )
        for labels, count in sorted(self.index.unsubscribes.items()):
            unsubscribes.add_metric(list(labels), count)
        yield unsubscribes


class _ArmClicksCollector(Collector):
    """Sends and attributed clicks per experiment arm, read at scrape time.

    The arm of a send is recomputed from its subject (the assignment is a pure function of
    experiment id and subject), so a click presented with its tracking token counts for the
    arm that subject was served in. Incremental: the tracking index only ever adds sends
    (in insertion order), so each scrape assigns only the sends new since the last one, and
    counts clicks by looking their sends up.
    """

    def __init__(self, index: TrackingIndex, experiments: dict[str, Experiment]) -> None:
        self.index = index
        self.experiments = experiments
        self._lock = threading.Lock()
        self._seen = 0
        self._arm_of_send: dict[str, tuple[str, str, str]] = {}
        self._sends: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def _assign_new_sends(self) -> None:
        # list(islice(...)) runs in C under the GIL: consistent against a concurrent refresh.
        new = list(islice(self.index.tokens.values(), self._seen, None))
        self._seen += len(new)
        for item in new:
            experiment = self.experiments.get(item.surface)
            if experiment is None or item.send_key in self._arm_of_send:
                continue
            arm = (item.surface, experiment.experiment_id, experiment.assign(item.subject_id).arm)
            self._arm_of_send[item.send_key] = arm
            self._sends[arm] += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._assign_new_sends()
            clicked_sends = set().union(*dict(self.index.clicked).values())
            clicks = collections.Counter(
                self._arm_of_send[key] for key in clicked_sends if key in self._arm_of_send
            )
            sends = dict(self._sends)
        sent = CounterMetricFamily(
            "recsys_experiment_sends", "Messages sent to the subjects of an arm", labels=_ARM
        )
        clicked = CounterMetricFamily(
            "recsys_experiment_clicked_sends",
            "Sends of an arm with at least one attributed click (tracking token verified)",
            labels=_ARM,
        )
        ctr = GaugeMetricFamily(
            "recsys_experiment_ctr", "Clicked sends / sends of an experiment arm", labels=_ARM
        )
        for labels, count in sorted(sends.items()):
            sent.add_metric(list(labels), count)
            clicked.add_metric(list(labels), clicks[labels])
            ctr.add_metric(list(labels), clicks[labels] / count)
        yield sent
        yield clicked
        yield ctr


class _KillsCollector(Collector):
    """1 per kill in force; `region` / `campaign` are `*` when the kill covers them all."""

    def __init__(self, kill_switch: KillSwitch) -> None:
        self.kill_switch = kill_switch

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "recsys_serving_kills_active",
            "Kill-switch entries in force (surface or region served from fallback, or a "
            "campaign's items removed)",
            labels=["surface", "region", "campaign"],
        )
        for kill in self.kill_switch.active.kills:
            active.add_metric([kill.surface, kill.region or "*", kill.campaign or "*"], 1)
        yield active
