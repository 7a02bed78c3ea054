"""Test set-up: the Triton interpreter on CPU, Hypothesis profiles, seeded RNG."""
import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter; must be set before any @triton.jit
# module is imported (importing torch imports none).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=10,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
