"""Test setup shared by every test file.

The Triton interpreter must be switched on before `triton` is first imported, so it happens here, at
the top of the first file pytest loads. On a machine with a CUDA GPU the kernels run for real.

Classroom exercises (EXERCISES.md, tests/exercises.py): `python -m pytest --exercise N` runs only
exercise N's checking tests. The meta-test (tests/test_exercises.py) also passes
`--exercise-swap N:HOW` (HOW: stub, or a wrong version's name in tests/teacher.py), which replaces
the exercise's target before any test module is imported (`from infer import davis_f` sees it).
"""
import argparse
import os
import shlex
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # CPU: run every Triton kernel in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the flat top-level files
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # tests/exercises.py
torch.use_deterministic_algorithms(False)


def pytest_addoption(parser):
    parser.addoption("--exercise", type=int, metavar="N",
                     help="run only classroom exercise N's checking tests (see EXERCISES.md)")
    parser.addoption("--exercise-swap", metavar="N:HOW", help=argparse.SUPPRESS)  # the meta-test


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer than a few seconds; run with -m slow")
    swap = config.getoption("--exercise-swap")
    n = config.getoption("--exercise")
    if swap is None and n is None:
        return
    import exercises
    if swap:
        k, _, how = swap.partition(":")
        try:
            exercises.swap(int(k) if k.isdigit() else k, how)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None  # one line, no INTERNALERROR
    if n is not None:
        if n not in exercises.EXERCISES:
            known = sorted(exercises.EXERCISES)
            message = f"--exercise {n}: there are exercises {known}; see EXERCISES.md"
            raise pytest.UsageError(message)
        file, _, expr = shlex.split(exercises.EXERCISES[n].check)  # "tests/test_x.py -k expr"
        config.args[:] = [os.path.join(exercises.ROOT, file)]  # only the checking file ...
        old = config.option.keyword
        config.option.keyword = f"({expr}) and ({old})" if old else expr  # ... its checking tests
