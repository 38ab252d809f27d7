"""Test-session setup shared by every test file.

Without a GPU, Triton kernels run through Triton's CPU interpreter. Triton reads
TRITON_INTERPRET when a kernel is defined (at import), so it is set here, before
any test module imports the kernels; a GPU machine compiles them for real.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs at least 2 CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and n_gpus == 0:
            item.add_marker(skip_gpu)
        elif "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)
