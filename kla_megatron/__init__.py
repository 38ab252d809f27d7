"""kla-megatron: distributed pretraining of Kalman Linear Attention language models."""
__version__ = "0.1.0"
