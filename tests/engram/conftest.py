"""Fixtures: the tiny models of engram_models.py, freshly seeded."""
import pytest
import torch

from engram_models import TinyGPT, tiny_llama


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return TinyGPT().eval()


@pytest.fixture
def llama():
    torch.manual_seed(0)
    return tiny_llama()
