from pathlib import Path

import pytest
import yaml

from recsys_assets.config import ConfigError, load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH, SurfaceConfig, settings_from_mapping


def _default() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def test_packaged_configuration_loads() -> None:
    settings = load_settings()
    assert set(settings.surfaces) >= {
        "home_feed",
        "email_daily",
        "push",
        "digest_weekly",
        "enterprise_action_queue",
    }
    home = settings.surface("home_feed")
    assert home.store_depth > home.display_count
    assert home.ttl.total_seconds() == 6 * 3600
    assert settings.fallback.ttl.total_seconds() == 30 * 60


def test_unknown_key_is_named_with_its_path() -> None:
    data = _default()
    data["surfaces"]["push"]["display_cuont"] = 3
    with pytest.raises(ConfigError, match=r"surfaces\.push\.display_cuont: unknown key"):
        settings_from_mapping(data, "test.yaml")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "greater than or equal to 1 or Input should be 'auto' (got 0)"),
        ("two", "a valid integer or Input should be 'auto' (got 'two')"),
        (None, "a valid integer or Input should be 'auto' (got None)"),
    ],
)
def test_a_key_of_several_kinds_is_one_finding_with_the_value_given(
    value: object, message: str
) -> None:
    """`step_threads` is a count or `auto`: one line naming the key as the file spells it,
    not one per alternative under pydantic's schema tags (`step_threads.constrained-int`)."""
    data = _default()
    data["pipeline"]["step_threads"] = value
    data["pipeline"]["scoring_precision"] = "fp8"
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(data, "test.yaml")
    assert str(raised.value).splitlines() == [
        "invalid configuration in test.yaml:",
        f"  pipeline.step_threads: Input should be {message}",
        "  pipeline.scoring_precision: Input should be 'auto', 'fp32' or 'bf16' (got 'fp8')",
    ]


def test_a_missing_key_is_named() -> None:
    data = _default()
    del data["surfaces"]["push"]["display_count"]
    with pytest.raises(ConfigError, match=r"surfaces\.push\.display_count: Field required$"):
        settings_from_mapping(data, "test.yaml")


def test_a_candidate_pool_block_on_a_final_slate_surface_is_refused() -> None:
    data = _default()
    data["surfaces"]["push"]["candidate_pool"] = {"shortlist_size": 60}
    with pytest.raises(
        ConfigError,
        match=r"surfaces\.push\.candidate_pool: only a surface with storage_mode: "
        r"candidate_pool uses this block, and its storage_mode is 'final_slate'",
    ):
        settings_from_mapping(data, "test.yaml")
    data["surfaces"]["push"]["storage_mode"] = "candidate_pool"
    assert settings_from_mapping(data).surface("push").candidate_pool.shortlist_size == 60


def test_a_validated_surface_survives_a_dump_and_validate_round_trip() -> None:
    surface = load_settings().surface("home_feed")
    assert SurfaceConfig.model_validate(surface.model_dump()) == surface


def test_store_depth_must_exceed_display_count() -> None:
    data = _default()
    data["surfaces"]["email_daily"]["store_depth"] = data["surfaces"]["email_daily"][
        "display_count"
    ]
    with pytest.raises(
        ConfigError, match=r"surfaces\.email_daily.*store_depth \(6\) must be greater"
    ):
        settings_from_mapping(data, "test.yaml")


def test_unknown_region_is_refused_with_the_known_ones() -> None:
    settings = load_settings()
    with pytest.raises(ConfigError, match=r"unknown region 'mars'.*configured regions"):
        settings.check_region("mars")
    with pytest.raises(ConfigError, match=r"unknown surface 'fax'"):
        settings.surface("fax")


def test_partition_key_characters_are_refused() -> None:
    data = _default()
    data["regions"] = ["na", "eu|west"]
    with pytest.raises(ConfigError, match="cannot be a partition key"):
        settings_from_mapping(data, "test.yaml")


def test_bad_duration_and_unknown_source(tmp_path: Path) -> None:
    data = _default()
    data["surfaces"]["push"]["ttl"] = "two hours"
    data["surfaces"]["push"]["sources"]["carrier_pigeon"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert str(path) in message
    assert "surfaces.push.ttl" in message and "not a duration" in message
    assert "carrier_pigeon" in message


def test_final_slate_serves_a_candidate_pool_surface_and_rerank_needs_one() -> None:
    """final_slate reads the stored slate either storage mode keeps, so an experiment of
    final slates against the online rerank loads on a candidate-pool surface; the rerank
    still needs candidate pools, named with the key."""
    data = _default()
    data["surfaces"]["home_feed"].update(
        storage_mode="candidate_pool",
        serving_mode="final_slate",
        experiment={
            "id": "slate_vs_rerank",
            "arms": {
                "control": {"serving_mode": "final_slate", "weight": 1},
                "rerank": {"serving_mode": "candidate_pool_rerank", "weight": 1},
            },
        },
    )
    home = settings_from_mapping(data, "test.yaml").surface("home_feed")
    assert home.storage_mode == "candidate_pool" and home.serving_mode == "final_slate"
    assert home.experiment is not None
    assert [arm.serving_mode for arm in home.experiment.arms.values()] == [
        "final_slate",
        "candidate_pool_rerank",
    ]

    data["surfaces"]["home_feed"]["storage_mode"] = "final_slate"
    with pytest.raises(
        ConfigError,
        match=r"surfaces\.home_feed: experiment\.arms\.rerank\.serving_mode "
        r"'candidate_pool_rerank' needs storage_mode 'candidate_pool', but the surface's "
        r"storage_mode is 'final_slate'",
    ):
        settings_from_mapping(data, "test.yaml")


def test_a_repeated_key_is_refused_with_its_line(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys; a duplicated experiment arm or surface would
    vanish without a word."""
    text = Path(DEFAULT_CONFIG_PATH).read_text(encoding="utf-8")
    path = tmp_path / "surfaces.yaml"
    path.write_text(text + "\nregions: [na]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"found duplicate key 'regions'[\s\S]*line \d+"):
        load_settings(path)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (float("inf"), "finite number"),
        (1e308, "less than or equal to 1000000"),
        ("1", "valid number"),
        (True, "valid number"),
        (0, "greater than 0"),
    ],
)
def test_experiment_weights_are_bounded_numbers(weight: object, message: str) -> None:
    data = _default()
    data["surfaces"]["home_feed"]["experiment"] = {
        "id": "split",
        "arms": {
            "control": {"serving_mode": "final_slate", "weight": weight},
            "fallback": {"serving_mode": "fallback_only", "weight": 1},
        },
    }
    with pytest.raises(ConfigError, match=rf"experiment\.arms\.control\.weight: .*{message}"):
        settings_from_mapping(data)


def test_a_duration_beyond_ten_years_is_a_config_error() -> None:
    data = _default()
    data["surfaces"]["home_feed"]["ttl"] = "99999999999d"
    with pytest.raises(ConfigError, match=r"surfaces\.home_feed\.ttl: .*out of range"):
        settings_from_mapping(data)


def test_the_retrieval_index_defaults_to_flat_and_takes_ivf_or_hnsw() -> None:
    assert load_settings().pipeline.retrieval.index == "flat"
    data = _default()
    data["pipeline"]["retrieval"] = {"index": "ivf", "ivf": {"nlist": 256, "nprobe": 16}}
    retrieval = settings_from_mapping(data).pipeline.retrieval
    assert (retrieval.index, retrieval.ivf.nlist, retrieval.ivf.nprobe) == ("ivf", 256, 16)
    assert retrieval.hnsw.m == 32  # the other index keeps its defaults


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"index": "annoy"}, r"pipeline\.retrieval\.index: Input should be 'flat', 'ivf' or"),
        (
            {"ivf": {"nlist": 64, "nprobe": 128}},
            r"pipeline\.retrieval\.ivf: nprobe \(128\) must be at most nlist \(64\)",
        ),
        ({"ivf": {"nlist": 1}}, r"pipeline\.retrieval\.ivf\.nlist: .*greater than or equal to 2"),
        ({"hnsw": {"m": 2}}, r"pipeline\.retrieval\.hnsw\.m: .*greater than or equal to 4"),
        ({"hnsw": {"ef_search": 0}}, r"pipeline\.retrieval\.hnsw\.ef_search: .*greater than"),
        ({"hnsw": {"efSearch": 64}}, r"pipeline\.retrieval\.hnsw\.efSearch: unknown key"),
    ],
)
def test_a_bad_retrieval_index_setting_is_refused_with_its_key(block: dict, message: str) -> None:
    data = _default()
    data["pipeline"]["retrieval"] = block
    with pytest.raises(ConfigError, match=message):
        settings_from_mapping(data)
