"""Shared pytest set-up: slow tests are excluded unless asked for (`pytest -m slow`)."""

import os

# Keep the two cores of a CI machine from being oversubscribed by every rank's BLAS pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed picks its accelerator from this; the tests run on CPU ranks with gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; excluded by default, run with -m slow")
    if not config.option.markexpr:
        config.option.markexpr = "not slow"
