"""Original ids -> positions in a list of known ids: the one reading of ids.

The tokenizer (vocabulary indices) and the evaluation (catalog positions) both map ids a user
gave -- from a file, JSON or the command line -- onto ids learned from training data. They
must agree, or a baseline and the model score different items for the same id. The rules:

* an id is cast to the known ids' type; an id that does not cast is unknown;
* for integer ids, text matches only when it is the integer written plainly: ``"7"`` (and
  ``" 7 "``) is item 7, ``"007"`` and ``"7.0"`` are not -- text ids are names, and ``"007"``
  names another thing than ``"7"``;
* lists (which may mix ``"10"`` and ``10``) are read as text first, so both rules apply.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl


def as_id_series(ids: pl.Series | list[Any], name: str = "id") -> pl.Series:
    """``ids`` as a Series; a list is read as text (its elements may mix ints and strings)."""
    if isinstance(ids, pl.Series):
        return ids
    return pl.Series(name, [None if x is None else str(x) for x in ids], dtype=pl.String)


def cast_ids(ids: pl.Series | list[Any], dtype: pl.DataType) -> pl.Series:
    """``ids`` in ``dtype`` under the rules above (null where an id does not read as one)."""
    ids = as_id_series(ids)
    cast = ids.cast(dtype, strict=False)
    if dtype.is_integer() and ids.dtype == pl.String:  # "007" is not item 7
        cast = cast.set(cast.cast(pl.String) != ids.str.strip_chars(), None)
    return cast


def index_of(ids: pl.Series | list[Any], known: pl.Series, default: int = -1, offset: int = 0) -> np.ndarray:
    """Position (plus ``offset``) of each of ``ids`` in ``known``; ``default`` where absent."""
    positions = np.arange(offset, offset + len(known))
    found = cast_ids(ids, known.dtype).replace_strict(known, positions, default=default, return_dtype=pl.Int64)
    return found.to_numpy(writable=True)
