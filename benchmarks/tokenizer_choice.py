"""Composite (item x action) tokens vs factorised (item + action + gap) tokens, measured.

    python benchmarks/tokenizer_choice.py

For each multi-action dataset: cut at the 80% time quantile, build both vocabularies on the
events before the cut, and count how many events after the cut each vocabulary cannot
represent (UNK). A composite token must have been seen as that exact (item, action) pair;
a factorised token needs only the item. Writes benchmarks/out/tokenizer_choice.json.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from provenance import write_json

from behaviorlm.data.datasets import load_dataset

OUT = Path(__file__).parent / "out"


def measure(name: str) -> dict:
    df = load_dataset(name).events.df
    cut = df["timestamp"].quantile(0.8, "nearest")
    train, test = df.filter(pl.col("timestamp") < cut), df.filter(pl.col("timestamp") >= cut)
    items = train.select("item_id").unique()
    pairs = train.select("item_id", "event_type").unique()
    item_known = test.join(items, on="item_id", how="semi").height
    pair_known = test.join(pairs, on=["item_id", "event_type"], how="semi").height
    buys = test.filter(pl.col("event_type") == "purchase")
    buy_item_known = buys.join(items, on="item_id", how="semi").height
    buy_pair_known = buys.join(pairs, on=["item_id", "event_type"], how="semi").height
    # purchases of items the buyer had touched before the cut with another action
    touched = train.select("user_id", "item_id").unique()
    buy_touched = buys.join(touched, on=["user_id", "item_id"], how="semi").height
    return {
        "dataset": name,
        "train_events": train.height,
        "test_events": test.height,
        "factorised_vocab": items.height + train["event_type"].n_unique(),
        "composite_vocab": pairs.height,
        "unk_rate_factorised": 1 - item_known / max(test.height, 1),
        "unk_rate_composite": 1 - pair_known / max(test.height, 1),
        "test_purchases": buys.height,
        "purchase_unk_factorised": 1 - buy_item_known / max(buys.height, 1),
        "purchase_unk_composite": 1 - buy_pair_known / max(buys.height, 1),
        "purchases_of_items_user_touched_before": buy_touched,
    }


def main() -> list[dict]:
    rows = [measure(n) for n in ("taobao", "rees46", "tmall")]
    cols = ("vocab fact.", "vocab comp.", "UNK fact.", "UNK comp.", "buy UNK fact.", "buy UNK comp.")
    head = f"{'dataset':<8}" + "".join(f"{c:>15}" for c in cols)
    print(head)
    for r in rows:
        print(
            f"{r['dataset']:<8}{r['factorised_vocab']:>15,}{r['composite_vocab']:>15,}"
            f"{r['unk_rate_factorised']:>15.1%}{r['unk_rate_composite']:>15.1%}"
            f"{r['purchase_unk_factorised']:>15.1%}{r['purchase_unk_composite']:>15.1%}"
        )
    OUT.mkdir(exist_ok=True)
    write_json(OUT / "tokenizer_choice.json", rows)
    return rows


if __name__ == "__main__":
    main()
