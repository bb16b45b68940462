"""A disabled surface × region pair launched anyway (the UI offers the whole grid) stops at
`subjects` with the config key, before anything is written or published."""

from __future__ import annotations

import dagster as dg

from recsys_assets.pipeline.assets import subjects
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.warehouse import Warehouse


def test_subjects_of_a_disabled_pair_fails_fast_naming_the_key(
    local_warehouse: Warehouse,
) -> None:
    partition = SurfaceRegion("enterprise_action_queue", "latam")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [subjects],
            partition_key=str(partition.to_key()),
            resources={"recsys": RecsysResource(warehouse_url=local_warehouse.url)},
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data.description == (
        "surface enterprise_action_queue is not enabled in region latam "
        "(surfaces.enterprise_action_queue.regions)"
    )
    assert local_warehouse.list("pipeline") == [], "nothing was written"
