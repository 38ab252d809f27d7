"""Corpus tools for kla-megatron: train a tokenizer (sentencepiece or byte-level BPE), turn JSONL/text into
megatron-core indexed datasets (``.bin`` + ``.idx``), merge and inspect them.

Commands (each has ``--help``; see ``data_tools/README.md``)::

    python -m data_tools.train_tokenizer   # kla-train-tokenizer
    python -m data_tools.preprocess        # kla-preprocess
    python -m data_tools.cli merge|inspect # kla-data
    python -m data_tools.sample_corpus     # English sample from pydoc_data
    python -m data_tools.prepare_sample    # sample -> tokenizer -> dataset, one shot

This package imports nothing heavy at import time: worker processes load only
numpy and sentencepiece, and megatron-core is imported where the dataset is written.
"""
