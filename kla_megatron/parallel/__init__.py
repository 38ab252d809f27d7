"""Context parallelism for KLA models: carry exchange for the scan, conv halos, a TE-free CP
attention core, and the sequence-sharding helpers the data path uses; ``local_ranks`` runs
a function on N local gloo processes (offline conversion, CPU tests).

Helpers only: nothing here owns parameters or is checkpointed."""
from .context_parallel import cp_kla_scan
from .conv_halo import cp_causal_conv, cp_position_in_doc
from .sharding import LAYOUTS, MODEL_CP_LAYOUT, chunk_ids, get_cp_shard, shard, unshard

__all__ = [
    "LAYOUTS", "MODEL_CP_LAYOUT", "chunk_ids", "cp_causal_conv", "cp_kla_scan", "cp_position_in_doc",
    "get_cp_shard", "shard", "unshard",
]
