"""Loaders of the shared datasets and the MovieLens conversion (without network)."""

from __future__ import annotations

import polars as pl
import pytest

from behaviorlm.data.datasets import SHARED, convert_movielens, load_dataset, shared_data_dir

needs_shared = pytest.mark.skipif(not shared_data_dir().exists(), reason="../shared/data not present")


@needs_shared
@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_datasets_load_with_canonical_actions(name):
    ds = load_dataset(name)
    assert set(ds.events.actions) <= {"view", "add_to_cart", "add_to_favorites", "purchase"}
    assert ds.events.report.n_output_rows == len(ds.events)
    if ds.items is not None:
        assert ds.items["item_id"].is_unique().all()


@needs_shared
def test_tmall_keeps_same_day_repeats():
    ds = load_dataset("tmall")
    assert len(ds.events) == 9_465 and ds.events.report.n_dropped == 0


def test_movielens_conversion_from_wheel_layout(tmp_path):
    inter = (
        b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        b'1m_1\tToy Story (1995)\t5\t978300760\n1m_1\tHeat "Remix" (1995)\t3\t978300761\n'
        b"1m_2\tToy Story (1995)\t4\t978300762\n"
    )
    item = (
        b"item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        b"Toy Story (1995)\tToy Story\t1995\tAnimation Children's\n"
        b'Heat "Remix" (1995)\tHeat\t1995\tAction\n'
    )
    convert_movielens("ml-1m", inter, item, tmp_path)
    r = pl.read_parquet(tmp_path / "ratings.parquet")
    m = pl.read_parquet(tmp_path / "movies.parquet")
    assert r["user_id"].to_list() == [1, 1, 2] and r["item_id"].to_list() == [1, 2, 1]
    assert m.filter(pl.col("item_id") == 2)["title"][0] == 'Heat "Remix" (1995)'
    assert m["genres"][0] == "Animation|Children's"


def test_unknown_dataset_is_a_clear_error():
    from behaviorlm.data.events import EventsError

    with pytest.raises(EventsError, match="unknown dataset 'nope'"):
        load_dataset("nope")
