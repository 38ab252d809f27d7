"""kla-megatron: distributed pretraining of Kalman Linear Attention language models.

``build_model`` / ``load_model`` / ``init_parallel`` (``kla_megatron/api.py``) build or load a model
in one process; they are imported on first use so that the command lines start fast.
"""
__version__ = "0.1.0"

_API = ("build_model", "load_model", "init_parallel")
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        from kla_megatron import api

        return getattr(api, name)
    raise AttributeError(f"module 'kla_megatron' has no attribute {name!r}")
