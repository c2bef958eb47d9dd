"""Test setup shared by every test file.

The Triton interpreter must be switched on before `triton` is first imported, so it happens here, at
the top of the first file pytest loads. On a machine with a CUDA GPU the kernels run for real.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: run every Triton kernel in the interpreter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat top-level files
torch.use_deterministic_algorithms(False)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than a few seconds; run with -m slow")
