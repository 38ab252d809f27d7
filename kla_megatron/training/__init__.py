"""The pretraining job (``python -m kla_megatron.train``).

- ``config``: typed run configs (YAML in ``configs/`` + ``--set`` overrides), validation.
- ``trainer``: the loop (resume, step, log, validate, checkpoint, preemption).
- ``megatron_engine`` / ``deepspeed_engine``: one optimizer step, eval, checkpoint save/load.
- ``data``: megatron-core datasets, per-rank micro-batches, packed-document boundaries.
- ``param_groups``, ``schedule``, ``metrics``, ``preemption``, ``model_factory``: the pieces.
- ``tokenizer``: megatron-core's view of any ``kla_megatron.tokenizers`` kind (the loader ``data_tools`` uses).
"""
