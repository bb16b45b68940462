"""Typed, validated configuration loaded from one YAML file.

The file is `recsys_assets/config/surfaces.yaml` unless `RECSYS_CONFIG` names another.
Unknown keys and impossible values fail at load with the dotted path of the bad entry,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import os
import re
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG_PATH = Path(__file__).with_name("surfaces.yaml")
CONFIG_ENV_VAR = "RECSYS_CONFIG"

SOURCES = (
    "two_tower",
    "collaborative",
    "item_to_item",
    "content",
    "trending",
    "editorial",
    "new_item_exploration",
    "long_tail_quality",
)
"""Candidate sources, in the order their per-source rank columns appear."""

SUBJECT_REQUIREMENTS = (
    "consent_personalization",
    "email_subscribed",
    "push_enabled",
    "tenant_actor",
)
SERVING_MODES = ("final_slate", "candidate_pool_rerank", "fallback_only")
"""How serving answers a surface's requests (docs/SERVING.md, "Serving modes")."""
STORAGE_MODES = ("final_slate", "candidate_pool")
MODE_NEEDS_STORAGE = {
    "final_slate": ("final_slate", "candidate_pool"),
    "candidate_pool_rerank": ("candidate_pool",),
}
"""The storage_modes a serving mode can read: final_slate serves the stored slate, which a
candidate pool holds too (its `in_slate` rows); fallback_only reads only the fallback lists."""
_EXPERIMENT_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"
_PARTITION_KEY_FORBIDDEN = re.compile(r"[|\[\],\s]")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION_S = 3650 * 86400
"""Ten years: longer is a typo, and beyond timedelta's range a crash."""


class ConfigError(ValueError):
    """The configuration file is invalid; the message names the file and the entry."""


def parse_duration(value: Any) -> timedelta:
    """'30m', '6h', '7d', a number of seconds, or a timedelta."""
    if isinstance(value, timedelta):
        return value
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. '30m', '6h', '7d' or seconds)")
    if not math.isfinite(seconds) or abs(seconds) > _MAX_DURATION_S:
        raise ValueError(
            f"duration {value!r} is out of range (at most {_MAX_DURATION_S // 86400}d)"
        )
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingConfig(_Strict):
    cutoff_days_before_snapshot: int = Field(7, ge=0)
    holdout: float = Field(0.2, gt=0, lt=1)
    """Share of each user's latest interactions the bundle holds out of its own window: the
    ranker's labels, the collaborative λ and the retrieval metrics come from them."""
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of the ranker's training subjects kept out to validate it and fit calibration."""
    max_training_subjects: int = Field(20_000, ge=10)
    """Subjects whose candidate pools train the ranker (a seeded sample above this)."""
    collaborative_max_items: int = Field(6000, ge=10, le=30_000)
    """Items the collaborative model (dense items × items) covers: the most engaged ones."""
    embedding_dim: int = Field(32, ge=4, le=512)
    epochs: int = Field(4, ge=1)
    seed: int = 7


class IvfConfig(_Strict):
    """faiss `IndexIVFFlat`: items split into clusters, each user searches the nearest few."""

    nlist: int = Field(1024, ge=2)
    """Clusters; capped at items / 39 (faiss wants 39 training items per cluster). A catalog
    too small for two clusters is searched exactly."""
    nprobe: int = Field(64, ge=1)
    """Clusters searched per user: recall and cost both rise with it."""

    @model_validator(mode="after")
    def _probe_within_clusters(self) -> IvfConfig:
        if self.nprobe > self.nlist:
            raise ValueError(
                f"nprobe ({self.nprobe}) must be at most nlist ({self.nlist}): a user cannot "
                f"search more clusters than there are"
            )
        return self


class HnswConfig(_Strict):
    """faiss `IndexHNSWFlat`: a neighbour graph over the items, walked from an entry point."""

    m: int = Field(32, ge=4, le=128)
    """Graph neighbours per item: memory, build time and recall rise with it."""
    ef_search: int = Field(512, ge=1)
    """Candidates kept during a search (never fewer than the items it returns, k + 16 + the
    subject's exclusions): recall and cost rise with it."""


class RetrievalConfig(_Strict):
    """How the two-tower source finds each subject's top-K items on the CPU (any other
    device always runs the exact search in torch)."""

    index: Literal["flat", "ivf", "hnsw"] = "flat"
    """flat: exact. ivf, hnsw: approximate, at a recall measured by
    benchmarks/bench_retrieval.py."""
    ivf: IvfConfig = IvfConfig()
    hnsw: HnswConfig = HnswConfig()


class PipelineConfig(_Strict):
    shards: Annotated[int, Field(ge=1, strict=True)] | Literal["auto"] = "auto"
    """Subject shards per partition, each one step of the heavy assets: a count, or `auto`
    for one shard per `shard_subjects` subjects."""
    shard_subjects: int = Field(4000, ge=1)
    """Target subjects per shard under `shards: auto` (bounds a step's memory)."""
    retrieval_item_chunk: int = Field(50000, ge=1)
    retrieval: RetrievalConfig = RetrievalConfig()
    recent_items_per_user: int = Field(20, ge=1)
    recent_history_items: int = Field(5, ge=1)
    """The subject's latest items behind the `*_recent_score` ranker inputs."""
    trending_window_days: int = Field(3, ge=1)
    """Shortest trending window; it widens until it holds trending_min_share of the events."""
    trending_min_share: float = Field(0.05, gt=0, le=1)
    partition_workers: int = Field(2, ge=1)
    """Partitions `recsys run` refreshes at a time, each in its own process."""
    step_threads: Annotated[int, Field(ge=1, strict=True)] | Literal["auto"] = "auto"
    """Threads the candidate_pools, scored_candidates (on the CPU) and slates shard steps
    spread their subjects over: a count, or `auto` for torch's thread count (the cores,
    shared between the partitions `recsys run` refreshes at a time). Never more than the
    cores the process may run on."""
    scoring_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The ranker's precision in scored_candidates: `auto` = bf16 on CUDA when the bundle
    allows it (bundle.json `inference`), else fp32 (so fp32 on the CPU); `fp32`; `bf16`
    (refused for a bundle whose measured bf16 deviation is over the tolerance)."""


class EligibilityConfig(_Strict):
    requires: tuple[Literal[SUBJECT_REQUIREMENTS], ...] = ()  # type: ignore[valid-type]
    active_within_days: int = Field(30, ge=1)


class SlatePolicyConfig(_Strict):
    version: str = "slate_v1"
    max_per_category: int = Field(ge=1)
    max_per_creator: int = Field(ge=1)
    exploration_slots: int = Field(0, ge=0)
    sponsored_cap: int = Field(0, ge=0)
    high_confidence_first: bool = False


class StalePolicyConfig(_Strict):
    mode: Literal["serve_with_check", "never", "final_check_mandatory"]
    max_stale: Duration = timedelta(0)

    @model_validator(mode="after")
    def _bound_required(self) -> StalePolicyConfig:
        if self.mode != "never" and self.max_stale <= timedelta(0):
            raise ValueError(f"stale_policy mode {self.mode!r} needs a positive max_stale")
        return self


class ChannelRulesConfig(_Strict):
    frequency_cap_per_day: int = Field(0, ge=0)
    """How many times one item may be shown to one user on this surface per day; 0 = no cap."""
    quiet_hours: bool = False
    send_hour_local: int | None = Field(None, ge=0, le=23)
    quiet_hours_mode: Literal["defer", "skip"] = "defer"
    """A send that falls in the subject's quiet hours (at send time, in their timezone) waits
    for their end (`defer`) or does not happen (`skip`). Only with `quiet_hours`."""
    max_sends: int = Field(0, ge=0)
    """Messages one subject may get on this channel within `send_cap_window`; 0 = no cap.
    Counted over the channel's sends ledger (docs/CHANNELS.md)."""
    send_cap_window: Duration = timedelta(days=1)
    min_relevance: float = Field(0.0, ge=0, le=1)
    """A sent item's calibrated probability must be at least this (push: only strong items)."""
    first_slot_min_relevance: float | None = Field(None, ge=0, le=1)
    """When set, a message opens with an item at least this confident, or is not sent."""
    blocked_risk_levels: tuple[Literal["low", "medium", "high"], ...] = ()
    """Items of these trust & safety `risk_level`s are never sent on this channel."""

    @model_validator(mode="after")
    def _window(self) -> ChannelRulesConfig:
        if self.send_cap_window <= timedelta(0):
            raise ValueError("send_cap_window must be positive")
        return self


class CandidatePoolConfig(_Strict):
    """A `storage_mode: candidate_pool` surface: what publish stores per subject and how
    serving reranks it online (docs/SERVING.md, "Candidate-pool serving")."""

    shortlist_size: int = Field(300, ge=1)
    """Candidates stored per subject: the slate's store_depth items in slate order, then the
    best of the rest by batch utility (with their features for the online model)."""
    exploration_candidates: int = Field(20, ge=0)
    """Exploration candidates (new-item / long-tail) kept beyond the top by utility, within
    shortlist_size, so online exploration has a pool to draw from."""
    latency_budget_ms: float = Field(25.0, gt=0)
    """A rerank slower than this serves the batch order instead (and is counted)."""
    overlay_share: float = Field(0.2, ge=0, lt=1)
    """Share of the displayed slots filled online from fresh sources (trending in the region,
    items created after generation, session neighbours)."""
    overlay_window: Duration = timedelta(hours=1)
    """Serving events within this window make an item trending in its region."""
    overlay_candidates: int = Field(30, ge=1)
    """Fresh candidates per source considered for the overlay slots."""
    intent_weight: float = Field(3.0, ge=0)
    """Engagement events a request's category intent counts as, in that category."""

    @model_validator(mode="after")
    def _sizes(self) -> CandidatePoolConfig:
        if self.exploration_candidates >= self.shortlist_size:
            raise ValueError(
                f"exploration_candidates ({self.exploration_candidates}) must be below "
                f"shortlist_size ({self.shortlist_size})"
            )
        if self.overlay_window <= timedelta(0):
            raise ValueError("overlay_window must be positive")
        return self


class ExperimentArmConfig(_Strict):
    serving_mode: Literal[SERVING_MODES]  # type: ignore[valid-type]
    weight: float = Field(gt=0, le=1_000_000, strict=True, allow_inf_nan=False)
    """Relative share of the subjects this arm gets (weights need not sum to 1): a number,
    not text or a boolean, and bounded so the arms' total stays exact."""


class ExperimentConfig(_Strict):
    """A deterministic split of a surface's subjects between serving modes."""

    id: str = Field(pattern=_EXPERIMENT_NAME)
    """Part of the assignment hash: a new id reshuffles every subject."""
    arms: dict[Annotated[str, Field(pattern=_EXPERIMENT_NAME)], ExperimentArmConfig]

    @model_validator(mode="after")
    def _two_arms(self) -> ExperimentConfig:
        if len(self.arms) < 2:
            raise ValueError(f"experiment {self.id!r} needs at least two arms")
        return self


class SurfaceConfig(_Strict):
    name: str = ""
    personalized: bool = True
    display_count: int = Field(ge=1)
    store_depth: int = Field(ge=1)
    ttl: Duration
    candidate_budget: int = Field(ge=1)
    sources: dict[Literal[SOURCES], int]  # type: ignore[valid-type]
    eligibility: EligibilityConfig
    slate_policy: SlatePolicyConfig
    stale_policy: StalePolicyConfig
    channel_rules: ChannelRulesConfig = ChannelRulesConfig()
    repeat_consumption: bool = False
    """True lets items the subject already engaged with back into the candidates (groceries,
    music, re-watching); False (default) never recommends an item twice to the same person."""
    storage_mode: Literal[STORAGE_MODES] = "final_slate"  # type: ignore[valid-type]
    """What publish stores per subject: final slates, or candidate pools for online rerank."""
    serving_mode: Literal[SERVING_MODES] = "final_slate"  # type: ignore[valid-type]
    """How serving answers: the stored slate, an online rerank of the pool, or the fallback
    lists only. An `experiment` overrides it per subject."""
    experiment: ExperimentConfig | None = None
    candidate_pool: CandidatePoolConfig = CandidatePoolConfig()
    regions: tuple[str, ...] | None = None
    """Regions the surface has lists in (default: every region). A surface without subjects
    somewhere (tenant queues where no tenant operates) is left out there rather than
    publishing an empty version as the first page a user of that region sees."""

    @model_validator(mode="after")
    def _depths(self) -> SurfaceConfig:
        if self.store_depth <= self.display_count:
            raise ValueError(
                f"store_depth ({self.store_depth}) must be greater than display_count "
                f"({self.display_count}): the serving layer fills from deeper in the list"
            )
        if self.candidate_budget < self.store_depth:
            raise ValueError(
                f"candidate_budget ({self.candidate_budget}) must be at least store_depth "
                f"({self.store_depth})"
            )
        if any(n < 0 for n in self.sources.values()):
            raise ValueError("per-source candidate counts must be >= 0")
        if self.ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        self._check_serving_modes()
        self._check_candidate_pool()
        return self

    def _check_candidate_pool(self) -> None:
        """A shortlist holds the stored slate and more, within the candidate budget."""
        if self.storage_mode != "candidate_pool":
            return
        size = self.candidate_pool.shortlist_size
        if not self.store_depth <= size <= self.candidate_budget:
            raise ValueError(
                f"candidate_pool.shortlist_size ({size}) must be between store_depth "
                f"({self.store_depth}) and candidate_budget ({self.candidate_budget})"
            )

    def _check_serving_modes(self) -> None:
        """Every mode the surface can serve in must find what its storage_mode publishes."""
        modes = [("serving_mode", self.serving_mode)]
        if self.experiment is not None:
            modes += [
                (f"experiment.arms.{arm}.serving_mode", config.serving_mode)
                for arm, config in self.experiment.arms.items()
            ]
        for key, mode in modes:
            needed = MODE_NEEDS_STORAGE.get(mode)
            if needed is not None and self.storage_mode not in needed:
                wanted = " or ".join(repr(storage) for storage in needed)
                raise ValueError(
                    f"{key} {mode!r} needs storage_mode {wanted}, but the surface's "
                    f"storage_mode is {self.storage_mode!r}: set storage_mode: {needed[0]} or "
                    "choose another serving mode"
                )


class FallbackConfig(_Strict):
    ttl: Duration = timedelta(minutes=30)
    list_length: int = Field(50, ge=1)


class PublishThresholds(_Strict):
    min_coverage: float = Field(0.95, ge=0, le=1)
    max_invalid_item_rate: float = Field(0.02, ge=0, le=1)
    max_duplicate_rate: float = Field(0.0, ge=0, le=1)
    max_policy_violation_rate: float = Field(0.0, ge=0, le=1)
    max_empty_list_rate: float = Field(0.05, ge=0, le=1)
    min_mean_list_length_ratio: float = Field(0.5, ge=0, le=1)
    max_age: Duration = timedelta(hours=2)


class PublishConfig(_Strict):
    retain_versions: int = Field(5, ge=1)
    thresholds: PublishThresholds = PublishThresholds()


class ServingConfig(_Strict):
    manifest_poll_interval_s: float = Field(5.0, gt=0)


_K8S_QUANTITY = r"^\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"


class StepResourcesConfig(_Strict):
    """What one step pod requests on Kubernetes (`RECSYS_DEPLOYMENT=k8s`)."""

    cpu: str = Field("1", pattern=_K8S_QUANTITY)
    """CPU request and limit, as a Kubernetes quantity ('2', '500m')."""
    memory: str = Field("2Gi", pattern=_K8S_QUANTITY)
    """Memory request and limit, as a Kubernetes quantity ('4Gi')."""
    gpus: int = Field(0, ge=0)
    """`nvidia.com/gpu` the pod requests; 0 on clusters without GPUs."""


class K8sDeploymentConfig(_Strict):
    step_resources: dict[str, StepResourcesConfig] = {"default": StepResourcesConfig()}
    """Pod resources by the `recsys/step` tag of a step (`scoring`, …); `default` for the
    steps whose tag has no entry and the steps without the tag."""
    max_concurrent_steps: int = Field(0, ge=0)
    """Step pods one run may have at a time; 0 = no limit."""

    @model_validator(mode="after")
    def _default(self) -> K8sDeploymentConfig:
        if "default" not in self.step_resources:
            raise ValueError("step_resources: a 'default' entry is required")
        return self


class DeploymentConfig(_Strict):
    """Settings that only matter past one machine (docs/SCALE.md)."""

    k8s: K8sDeploymentConfig = K8sDeploymentConfig()


class Settings(_Strict):
    regions: tuple[str, ...]
    training: TrainingConfig = TrainingConfig()
    pipeline: PipelineConfig = PipelineConfig()
    surfaces: dict[str, SurfaceConfig]
    fallback: FallbackConfig = FallbackConfig()
    publish: PublishConfig = PublishConfig()
    serving: ServingConfig = ServingConfig()
    deployment: DeploymentConfig = DeploymentConfig()

    @model_validator(mode="before")
    @classmethod
    def _name_surfaces(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("surfaces"), dict):
            data = dict(data)
            data["surfaces"] = {
                name: {**body, "name": name} if isinstance(body, dict) else body
                for name, body in data["surfaces"].items()
            }
        return data

    @model_validator(mode="after")
    def _keys(self) -> Settings:
        if not self.regions:
            raise ValueError("regions: at least one region is required")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError(f"regions: duplicates in {list(self.regions)}")
        if not self.surfaces:
            raise ValueError("surfaces: at least one surface is required")
        for key in (*self.regions, *self.surfaces):
            if not key or _PARTITION_KEY_FORBIDDEN.search(key):
                raise ValueError(
                    f"{key!r} cannot be a partition key: no '|', '[', ']', ',' or spaces"
                )
        for name, surface in self.surfaces.items():
            _check_surface_regions(name, surface.regions, self.regions)
        return self

    def surface(self, name: str) -> SurfaceConfig:
        """The surface called `name`, or a ConfigError listing the known ones."""
        try:
            return self.surfaces[name]
        except KeyError:
            raise ConfigError(
                f"unknown surface {name!r}; configured surfaces: {sorted(self.surfaces)}"
            ) from None

    def check_region(self, region: str) -> str:
        """`region` if configured, else a ConfigError listing the known ones."""
        if region not in self.regions:
            raise ConfigError(
                f"unknown region {region!r}; configured regions: {list(self.regions)}"
            )
        return region

    def surface_regions(self, name: str) -> tuple[str, ...]:
        """The regions surface `name` has lists in, in the order of `regions`."""
        enabled = self.surface(name).regions
        return self.regions if enabled is None else tuple(r for r in self.regions if r in enabled)

    def is_enabled(self, surface: str, region: str) -> bool:
        """Whether the (surface, region) partition has lists at all (False for a surface or
        region no longer configured)."""
        config = self.surfaces.get(surface)
        return (
            config is not None
            and region in self.regions
            and (config.regions is None or region in config.regions)
        )

    def check_enabled(self, surface: str, region: str) -> None:
        """A ConfigError naming the config key when the partition is switched off."""
        self.check_region(region)
        if not self.is_enabled(surface, region):
            raise ConfigError(
                f"surface {surface} is not enabled in region {region} (surfaces.{surface}.regions)"
            )

    def enabled_partitions(self) -> list[tuple[str, str]]:
        """Every enabled (surface, region) pair, region by region: what runs, schedules and
        sensors recompute. The Dagster partitions stay the full grid (a
        MultiPartitionsDefinition cannot leave pairs out)."""
        return [
            (surface, region)
            for region in self.regions
            for surface in self.surfaces
            if self.is_enabled(surface, region)
        ]


def _check_surface_regions(
    name: str, enabled: tuple[str, ...] | None, configured: tuple[str, ...]
) -> None:
    if enabled is None:
        return
    where = f"surfaces.{name}.regions"
    if not enabled:
        raise ValueError(f"{where}: lists no region; leave the key out for every region")
    for region in enabled:
        if region not in configured:
            raise ValueError(
                f"{where}: unknown region {region!r}; configured regions: {list(configured)}"
            )
    if len(set(enabled)) != len(enabled):
        raise ValueError(f"{where}: duplicates in {list(enabled)}")


def _format_validation_error(source: str, error: ValidationError, data: Any) -> str:
    """One line per bad key of `data`, the key as the file spells it: the alternatives of a
    key that takes one of several kinds (`step_threads: 4 | auto`) are joined on its line,
    with the value the file gave, instead of one line per alternative named by pydantic's
    internal schema tags (`step_threads.constrained-int`, `step_threads.literal['auto']`)."""
    findings: dict[str, list[str]] = {}
    given: dict[str, Any] = {}
    for item in error.errors():
        key = _key_in_file(data, item["loc"], missing=item["type"] == "missing")
        where = ".".join(str(part) for part in key) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        if message not in findings.setdefault(where, []):
            findings[where].append(message)
        if not isinstance(item.get("input"), dict | list) and item["type"] != "missing":
            given[where] = item.get("input")
    lines = [f"invalid configuration in {source}:"]
    for where, messages in findings.items():
        text = " or ".join(messages)
        value = repr(given[where]) if where in given else None
        if value is not None and value not in text:  # a message may quote the value itself
            text += f" (got {value})"
        lines.append(f"  {where}: {text}")
    return "\n".join(lines)


def _key_in_file(data: Any, loc: tuple[int | str, ...], *, missing: bool) -> tuple[int | str, ...]:
    """The part of a pydantic error location that names keys of `data`: what follows the
    last key the file has is a union member's tag, except the key a `missing` error names."""
    node = data
    for depth, part in enumerate(loc):
        in_mapping = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_mapping or in_list:
            node = node[part]
        else:
            return loc[: depth + 1] if missing and depth == len(loc) - 1 else loc[:depth]
    return loc


def settings_from_mapping(data: Any, source: str = "<mapping>") -> Settings:
    """Validate an already-parsed configuration mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: expected a mapping at top level")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error, data)) from None
    ignored = _ignored_candidate_pool_blocks(data)
    if ignored:
        raise ConfigError(
            f"invalid configuration in {source}:\n"
            + "\n".join(
                f"  surfaces.{name}.candidate_pool: only a surface with storage_mode: "
                f"candidate_pool uses this block, and its storage_mode is {mode!r}; remove "
                "the block or set storage_mode: candidate_pool"
                for name, mode in ignored
            )
        )
    return settings


def _ignored_candidate_pool_blocks(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(surface, storage_mode) of each surface the file gives a candidate_pool block that
    its storage_mode never reads: the operator meant something that would not happen.
    Checked on the file's own mapping, where a block is either written or not (a validated
    SurfaceConfig always has one, so a dump-and-validate round trip stays valid)."""
    surfaces = data.get("surfaces")
    if not isinstance(surfaces, dict):
        return []
    return [
        (str(name), str(surface.get("storage_mode", "final_slate")))
        for name, surface in surfaces.items()
        if isinstance(surface, dict)
        and "candidate_pool" in surface
        and surface.get("storage_mode", "final_slate") != "candidate_pool"
    ]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a repeated mapping key: PyYAML keeps the last one
    silently, so a surface or an experiment arm written twice would vanish unseen."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


@lru_cache(maxsize=8)
def _load(path: str) -> Settings:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read configuration {path}: {error}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as error:
        raise ConfigError(f"configuration {path} is not valid YAML: {error}") from None
    return settings_from_mapping(data, path)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Settings from `path`, else `$RECSYS_CONFIG`, else the packaged default."""
    chosen = path or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH
    return _load(str(Path(chosen).resolve()))
