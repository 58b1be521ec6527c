"""RecTools' SASRec on the split that ``benchmarks/peer_rectools.py`` exports.

Runs in its own virtual environment (``.venv-rectools``, made by ``make bench-peer-rectools``):
RecTools is a peer measured beside behaviorlm, never one of its dependencies, so this file
imports nothing of behaviorlm. It reads ``interactions.csv`` (user_id, item_id, position: every
event but each user's test one, in the order behaviorlm reads them), trains SASRec with the
settings RecTools documents for ML-1M (its HSTU tutorial's SASRec/HSTU configuration: 2 blocks,
1 head, 50 factors, dropout 0.2, lr 1e-3, batch 128, 200 positions) with the full softmax loss,
validates on each user's last event (RecTools' ``leave_one_out_mask``), keeps the epoch with the
lowest validation loss, stops at the wall-clock budget, and writes the top-``k`` lists of every
user (seen items filtered) with its timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import time
from pathlib import Path

import pandas as pd
import torch
from pytorch_lightning import Callback, Trainer
from rectools import Columns
from rectools.dataset import Dataset
from rectools.models import SASRecModel
from rectools.models.nn.item_net import IdEmbeddingsItemNet
from rectools.models.nn.transformers.utils import leave_one_out_mask

#: RecTools' documented ML-1M configuration (examples/tutorials/transformers_HSTU_tutorial.ipynb),
#: with the full softmax the issue asks for instead of its 128 sampled negatives
SETTINGS = {
    "n_blocks": 2,
    "n_heads": 1,
    "n_factors": 50,
    "dropout_rate": 0.2,
    "session_max_len": 200,
    "lr": 1e-3,
    "batch_size": 128,
    "loss": "softmax",
    "use_pos_emb": True,
}


class KeepBest(Callback):
    """Remember the weights of the epoch with the lowest validation loss (in memory: no
    checkpoint file to unpickle) and each epoch's time and losses."""

    def __init__(self) -> None:
        self.best_loss, self.best_epoch, self.state = math.inf, 0, None
        self.curve: list[dict] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        loss = float(trainer.callback_metrics.get("val_loss", math.nan))
        self.curve.append(
            {"epoch": trainer.current_epoch + 1, "val_loss": loss, "seconds": time.perf_counter() - self._t0}
        )
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, trainer.current_epoch + 1
            self.state = copy.deepcopy(pl_module.state_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder with interactions.csv; results go there too")
    ap.add_argument("--minutes", type=float, default=30.0, help="training budget, validation included")
    ap.add_argument("--max-epochs", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    df = pd.read_csv(args.data / "interactions.csv")
    # the order behaviorlm reads (file order within equal timestamps) as strictly increasing times,
    # so that RecTools' sort by time cannot reorder ties
    df[Columns.Datetime] = pd.Timestamp("2000-01-01") + pd.to_timedelta(df.pop("position"), unit="s")
    df = df.rename(columns={"user_id": Columns.User, "item_id": Columns.Item})
    df[Columns.Weight] = 1.0
    dataset = Dataset.construct(df)

    keep = KeepBest()

    def trainer() -> Trainer:
        return Trainer(
            max_epochs=args.max_epochs,
            max_time={"minutes": args.minutes},
            deterministic=True,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            logger=False,
            accelerator="cpu",
            devices=1,
            callbacks=[keep],
        )

    model = SASRecModel(
        **SETTINGS,
        epochs=args.max_epochs,
        item_net_block_types=(IdEmbeddingsItemNet,),
        get_val_mask_func=leave_one_out_mask,
        get_trainer_func=trainer,
        deterministic=True,
    )
    t0 = time.perf_counter()
    model.fit(dataset)
    train_s = time.perf_counter() - t0
    # RecTools fits a deep copy of the trainer (model.fit_trainer), callbacks included: read that copy
    keep = next(c for c in model.fit_trainer.callbacks if isinstance(c, KeepBest))
    if keep.state is not None:
        model.lightning_model.load_state_dict(keep.state)
    users = df[Columns.User].unique()
    t0 = time.perf_counter()
    recos = model.recommend(users=users, dataset=dataset, k=args.k, filter_viewed=True)
    recommend_s = time.perf_counter() - t0
    recos.rename(columns={Columns.User: "user_id", Columns.Item: "item_id", Columns.Rank: "rank"})[
        ["user_id", "item_id", "rank"]
    ].to_csv(args.data / "rectools_recos.csv", index=False)
    epochs = keep.curve
    info = {
        "settings": SETTINGS,
        "train_s": train_s,
        "epochs_run": len(epochs),
        "best_epoch": keep.best_epoch,
        "best_val_loss": keep.best_loss,
        "seconds_per_epoch": sum(e["seconds"] for e in epochs) / max(len(epochs), 1),
        "recommend_s": recommend_s,
        "users": len(users),
        "curve": epochs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    (args.data / "rectools_run.json").write_text(json.dumps(info, indent=2))
    print(json.dumps({k: v for k, v in info.items() if k != "curve"}))


if __name__ == "__main__":
    main()
