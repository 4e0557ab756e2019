"""Root pytest configuration: where the Triton kernels run.

TRITON_INTERPRET is read when triton is first imported (and
``import torch_geometric`` imports triton), so it is decided here, before any
test module is collected. ``import torch`` does not import triton.

* No CUDA device: TRITON_INTERPRET=1, so the Triton kernels run on CPU tensors
  through the interpreter and are checked against the PyTorch reference.
* A CUDA device: the interpreter stays off, the CUDA tests run the compiled
  kernels (and assert that they did), and the interpreter's CPU variants skip.
* An explicit TRITON_INTERPRET in the environment is left as it is; on a GPU
  machine TRITON_INTERPRET=1 makes the CUDA kernel tests fail, not pass
  through the interpreter. BLOCKQUANT_TEST_INTERPRET=1 or 0 forces the choice.
"""
import os


def _interpreter_wanted() -> bool:
    forced = os.environ.get("BLOCKQUANT_TEST_INTERPRET")
    if forced is not None:
        return forced == "1"
    import torch

    return not torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and _interpreter_wanted():
    os.environ["TRITON_INTERPRET"] = "1"

# torch_geometric's own import scripts a few helpers with torch.jit.script, which PyTorch now deprecates: two
# warnings in every test run that neither blockquant nor its user can act on (outside pytest, Python hides a
# DeprecationWarning raised inside a library). Import it here, after TRITON_INTERPRET is decided, without them.
import warnings  # noqa: E402

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
    import torch_geometric  # noqa: E402, F401
