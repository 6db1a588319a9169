import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run with one torch thread: deterministic and fair on the 2-core CI machine."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def digits():
    from ncrobust import data

    return data.load("digits", seed=0)
