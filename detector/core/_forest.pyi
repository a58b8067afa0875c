"""Types of the C extension detector/core/_forest.c (see there and core/model.py)."""

from typing import Any

def rows(X: list[Any], n_features: int, out: Any, /) -> None: ...
def walk(code: Any, thr: Any, nan_right: Any, to_global: Any, n_trees: int, feat_bits: int,
         max_depth: int, X: Any, n_features: int, out: Any, leaf_value: Any, depths: Any,
         /) -> None: ...
def credits(leaf_slot: Any, leaf_credit: Any, n_features: int, leaves: Any, n_trees: int,
            out: Any, /) -> None: ...
