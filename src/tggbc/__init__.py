"""tggbc: zero-shot attention key pruning (tgGBC) for query-based 3D detectors.

The core (`tggbc.prune`, `tggbc.baselines`, `tggbc.pruner`, `tggbc.attention`) imports nothing
but torch. Host decoders, data, evaluation, export and the command line live in their own modules
and are imported only when used.
"""

from .attention import AttentionRows, MultiheadAttention
from .prune import (
    attention_importance,
    gather_keys,
    importance_from_rows,
    key_importance,
    parse_r,
    prune_schedule,
    query_confidence,
    select_keys,
    top_queries,
    training_r,
)
from .pruner import METHODS, KeyPruner, PrunedKeys, pruning

__version__ = "0.2.0"

__all__ = [
    "METHODS",
    "AttentionRows",
    "KeyPruner",
    "MultiheadAttention",
    "PrunedKeys",
    "attention_importance",
    "gather_keys",
    "importance_from_rows",
    "key_importance",
    "parse_r",
    "prune_schedule",
    "pruning",
    "query_confidence",
    "select_keys",
    "top_queries",
    "training_r",
]
