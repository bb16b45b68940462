import pandas as pd

from recsys_assets.warehouse import PreconditionFailed, Warehouse


def test_parquet_round_trip_and_conditional_write(warehouse: Warehouse) -> None:
    frame = pd.DataFrame({"user_id": [1, 2, 3], "region": ["na", "eu", "na"]})
    warehouse.write_parquet("raw/users/part-00000.parquet", frame)
    pd.testing.assert_frame_equal(warehouse.read_parquet("raw/users"), frame)

    warehouse.write_bytes_if("m.json", b"{}", expected_etag=None)
    tag = warehouse.etag("m.json")
    try:
        warehouse.write_bytes_if("m.json", b"{}", expected_etag=None)
    except PreconditionFailed:
        pass
    else:
        raise AssertionError("second create-if-absent must fail")
    warehouse.write_bytes_if("m.json", b'{"v": 2}', expected_etag=tag)
    assert warehouse.read_json("m.json") == {"v": 2}
