from __future__ import annotations

import pandas as pd
import polars as pl
import pytest

from behaviorlm.data.events import ColumnMapping, EventsError, validate_events, validate_items
from tests.conftest import T0


def _frame(**overrides):
    base = {
        "user_id": [1, 1, 2, 2],
        "item_id": ["a", "b", "a", "c"],
        "event_type": ["view", "purchase", "pv", "buy"],
        "timestamp": [T0 + 100, T0 + 200, T0 + 150, T0 + 160],
    }
    base.update(overrides)
    return pl.DataFrame(base)


@pytest.mark.parametrize("kind", ["polars", "pandas", "csv", "csv.gz", "parquet"])
def test_reads_every_source_the_same(tmp_path, kind):
    df = _frame()
    if kind == "polars":
        src = df
    elif kind == "pandas":
        src = df.to_pandas()
    elif kind == "parquet":
        src = tmp_path / "e.parquet"
        df.write_parquet(src)
    else:
        src = tmp_path / f"e.{kind}"
        if kind == "csv.gz":
            import gzip

            with gzip.open(src, "wb") as f:
                df.write_csv(f)
        else:
            df.write_csv(src)
    ev = validate_events(src)
    assert ev.df.columns == ["user_id", "item_id", "event_type", "timestamp"]
    assert ev.df["event_type"].to_list() == ["view", "purchase", "view", "purchase"]  # aliases mapped
    assert ev.df.schema["timestamp"] == pl.Datetime("us", "UTC")
    assert ev.report.n_dropped == 0


def test_column_mapping_and_missing_column_named():
    df = _frame().rename({"user_id": "visitor", "timestamp": "ts"})
    ev = validate_events(df, ColumnMapping(user="visitor", timestamp="ts"))
    assert ev.n_users == 2
    with pytest.raises(EventsError, match=r"missing column\(s\) user='user_id'.*available columns"):
        validate_events(df)


def test_no_action_column_uses_default_action():
    df = _frame().drop("event_type")
    ev = validate_events(df, ColumnMapping(action=None))
    assert ev.actions == ["interaction"]


def test_null_ids_error_names_column_and_row_or_are_counted():
    df = _frame(item_id=["a", None, "a", "c"])
    with pytest.raises(EventsError, match=r"column 'item_id': null item_id: 1 row\(s\); first at row 1"):
        validate_events(df)
    ev = validate_events(df, invalid="drop")
    assert len(ev) == 3 and ev.report.dropped == {"null item_id": 1}


def test_unparseable_timestamps():
    df = _frame(timestamp=["2024-01-01T00:00:00", "yesterday", "2024-01-02 10:00:00", "2024-01-03"])
    with pytest.raises(EventsError, match=r"column 'timestamp': null or unparseable timestamp.*'yesterday'"):
        validate_events(df)
    missing = _frame(timestamp=[T0 + 100, None, T0 + 150, T0 + 160])
    with pytest.raises(EventsError, match=r"null or unparseable timestamp: 1 row\(s\); first at row 1"):
        validate_events(missing)
    ev = validate_events(df, invalid="drop")
    assert ev.report.dropped == {"unparseable timestamp": 1}
    assert str(ev.df["timestamp"][0]) == "2024-01-01 00:00:00+00:00"


def test_unknown_actions_error_map_keep_drop():
    df = _frame(event_type=["view", "teleport", "view", "view"])
    with pytest.raises(EventsError, match=r"column 'event_type': unknown action name\(s\) \['teleport'\]"):
        validate_events(df)
    assert validate_events(df, action_map={"teleport": "purchase"}).df["event_type"].to_list()[1] == "purchase"
    assert "teleport" in validate_events(df, unknown_actions="keep").actions
    dropped = validate_events(df, unknown_actions="drop")
    assert len(dropped) == 3 and dropped.report.dropped == {"unknown action": 1}


def test_duplicates_dropped_and_counted_or_raised():
    df = pl.concat([_frame(), _frame().head(1)])
    ev = validate_events(df)
    assert len(ev) == 4 and ev.report.dropped == {"exact duplicate": 1}
    assert len(validate_events(df, duplicates="keep")) == 5
    with pytest.raises(EventsError, match="duplicate event"):
        validate_events(df, duplicates="raise")


def test_unsorted_input_is_sorted_and_reported_ties_keep_input_order():
    df = pl.DataFrame(
        {
            "user_id": [1, 1, 1],
            "item_id": ["z", "y", "x"],
            "event_type": ["view"] * 3,
            "timestamp": [T0 + 300, T0 + 100, T0 + 100],
        }
    )
    ev = validate_events(df)
    assert ev.df["item_id"].to_list() == ["y", "x", "z"]  # y before x: same second, input order
    assert any("out of time order" in n for n in ev.report.notes)


def test_bad_paths_and_types():
    with pytest.raises(EventsError, match="file not found"):
        validate_events("/no/such/file.csv")
    with pytest.raises(EventsError, match="unsupported file type"):
        validate_events(__file__)
    with pytest.raises(EventsError, match="expected a path"):
        validate_events(42)


def test_millisecond_and_datetime_timestamps():
    ms = validate_events(_frame(timestamp=[(T0 + t) * 1000 for t in (100, 200, 150, 160)]), time_unit="ms")
    s = validate_events(_frame())
    assert ms.df["timestamp"].to_list() == s.df["timestamp"].to_list()
    pdf = _frame().to_pandas()
    pdf["timestamp"] = pd.to_datetime(pdf["timestamp"], unit="s")
    assert validate_events(pdf).df["timestamp"].to_list() == s.df["timestamp"].to_list()


def test_items_validation():
    items = pl.DataFrame({"item_id": ["a", "b"], "title": ["A", "B"], "price": ["1.5", "x"]})
    with pytest.raises(EventsError, match="column 'price': not a number"):
        validate_items(items)
    with pytest.raises(EventsError, match="duplicated item id"):
        validate_items(pl.DataFrame({"item_id": ["a", "a"]}))
    ok = validate_items(pl.DataFrame({"item_id": ["a"], "title": ["A"], "price": ["2"]}))
    assert ok.columns == ["item_id", "title", "price"] and ok["price"][0] == 2.0


def test_one_time_rule_for_columns_and_single_values():
    """to_utc reads a number as parse_timestamps reads a column (unit from the magnitude), and
    the plausibility window is the same one every reader applies."""
    from datetime import datetime, timezone

    from behaviorlm.data.timestamps import implausible, parse_timestamps, plausible_window, to_utc

    day = datetime(2017, 12, 3, tzinfo=timezone.utc)
    assert to_utc(1_512_259_200) == to_utc(1_512_259_200_000) == to_utc(1_512_259_200_000_000) == day
    assert to_utc(1_512_259_200_000, time_unit="ms") == parse_timestamps(pl.Series([1_512_259_200_000]))[0] == day
    first, last = plausible_window()
    column = pl.Series([first, day, last]).dt.replace_time_zone("UTC")
    assert implausible(column).to_list() == [False, False, False]
    assert implausible(pl.Series([datetime(1989, 12, 31, tzinfo=timezone.utc)])).to_list() == [True]
