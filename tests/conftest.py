"""Fixtures shared by the test modules (the root conftest.py sets TRITON_INTERPRET).

Tolerance helpers shared by the test modules live in ``tests/tolerances.py`` (``from tolerances import rel_err``):
a module, because ``import conftest`` would be ambiguous with the root conftest.py beside this one.
"""
import pytest
import torch


@pytest.fixture
def torch_backend_one_thread(torch_backend):
    """The PyTorch codec backend and one intra-op thread, for training loops.

    The Triton interpreter is correct but far too slow for loops of many
    quantize calls (the kernel tests cover it). The graphs in tests are small:
    one thread is as fast, and far faster when the 2-core machine is busy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def torch_backend(request, monkeypatch):
    """The PyTorch codec backend (the Triton interpreter is correct but slow on CPU; the kernel tests cover it).

    A test marked ``@pytest.mark.default_backend`` keeps the default choice instead. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("torch_backend")``.
    """
    if request.node.get_closest_marker("default_backend") is None:
        monkeypatch.setenv("BLOCKQUANT_BACKEND", "torch")
