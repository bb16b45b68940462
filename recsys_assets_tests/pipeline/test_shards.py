"""Bounded-memory helpers that assets use across a partition's shards."""

import numpy as np

from recsys_assets.pipeline.shards import UniformSample, quantiles


def test_uniform_sample_is_exact_below_capacity() -> None:
    sample = UniformSample(capacity=100)
    for batch in np.array_split(np.arange(60.0), 4):
        sample.add(batch)
    assert sample.seen == 60
    assert sorted(sample.values) == list(np.arange(60.0))
    assert quantiles(sample.values) == quantiles(np.arange(60.0))


def test_uniform_sample_stays_bounded_and_unbiased_over_many_batches() -> None:
    stream = np.arange(200_000, dtype=np.float64)
    sample = UniformSample(capacity=5_000, seed=3)
    for batch in np.array_split(stream, 37):
        sample.add(batch)
    assert sample.seen == stream.size
    assert sample.values.size == 5_000
    assert np.unique(sample.values).size == 5_000  # without replacement
    assert np.isin(sample.values, stream).all()
    # Late batches are as likely to be kept as early ones: the median stays central.
    median = quantiles(sample.values)["p50"]
    assert abs(median - stream.size / 2) < 0.03 * stream.size
    assert (sample.values >= stream.size / 2).mean() > 0.45
