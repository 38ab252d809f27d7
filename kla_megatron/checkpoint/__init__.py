"""Checkpoints: the directory protocol every writer and reader follows (``directory.py``), and
conversion: megatron dist checkpoints ↔ Hugging Face, offline resharding, the
paper's reference weights, verification. Command line: ``kla-convert`` (``cli.py``);
commands and examples in README.md."""
