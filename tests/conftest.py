"""Shared test settings: deterministic, single-threaded-friendly, tiny sizes."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")

# Tiny Shakespeare LM fixtures (tiny_data, tiny_config, data_cache) shared by the trainer and CLI tests.
pytest_plugins = ["lm_fixtures"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
