"""tggbc: zero-shot attention key pruning (tgGBC) for query-based 3D detectors.

The core (`tggbc.prune`, `tggbc.pruner`, `tggbc.attention`) imports nothing but torch. Host
decoders, data, evaluation, export and the command line live in their own modules and are
imported only when used.
"""

from .attention import AttentionRows, MultiheadAttention
from .prune import (
    gather_keys,
    importance_from_rows,
    key_importance,
    prune_schedule,
    query_confidence,
    select_keys,
    top_queries,
    training_r,
)
from .pruner import KeyPruner, PrunedKeys

__version__ = "0.1.0"

__all__ = [
    "AttentionRows",
    "KeyPruner",
    "MultiheadAttention",
    "PrunedKeys",
    "gather_keys",
    "importance_from_rows",
    "key_importance",
    "prune_schedule",
    "query_confidence",
    "select_keys",
    "top_queries",
    "training_r",
]
