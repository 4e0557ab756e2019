"""Fixtures shared by the test modules (the root conftest.py sets TRITON_INTERPRET)."""
import pytest
import torch


@pytest.fixture
def torch_backend_one_thread(monkeypatch):
    """The PyTorch codec backend and one intra-op thread, for training loops.

    The Triton interpreter is correct but far too slow for loops of many
    quantize calls (the kernel tests cover it). The graphs in tests are small:
    one thread is as fast, and far faster when the 2-core machine is busy.
    """
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
