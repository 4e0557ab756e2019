"""The private PyTorch APIs blockquant uses: all in blockquant/_compat.py, and all working on this torch."""
import pathlib
import re

import pytest

import blockquant
from blockquant import _compat

PACKAGE = pathlib.Path(blockquant.__file__).parent
KERNELS = pathlib.Path(blockquant.kernels.__file__).parent
# what reaching a private API looks like in code (comments and docstrings may name them)
PRIVATE = re.compile(r"torch\._C\b|torch\.ops\.aten\._|torch\.utils\.weak|\._raw_saved_\w*\b(?!\*)|\._sequence_nr\(|"
                     r"\._version\b|\._base\b|_is_compiled_autograd_tracing")


def _code_lines(path):
    in_doc = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.count('"""') == 1:
            in_doc = not in_doc
            continue
        if in_doc or stripped.startswith("#") or stripped.startswith('"""'):
            continue
        yield n, line.split("  #")[0]


def test_private_apis_only_in_the_compat_module():
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
                 for root in (PACKAGE, KERNELS) for p in sorted(root.rglob("*.py")) if p.name != "_compat.py"
                 for n, line in _code_lines(p) if PRIVATE.search(line)]
    assert not offenders, "private PyTorch APIs outside blockquant/_compat.py:\n" + "\n".join(offenders)


def test_every_private_api_works_on_this_torch():
    assert _compat.check() == {name: None for name in _compat.check()}
    assert len(_compat.check()) >= 7


def test_a_saved_tensor_without_data_fails_naming_the_release_it_needs():
    class SavedTensorBefore210:  # torch 2.9's SavedTensor: register_hooks only
        def register_hooks(self, pack, unpack):
            pass

    with pytest.raises(AttributeError, match=r"needs torch >= 2\.10 \(SavedTensor\.data\); got torch "):
        _compat.saved_tensor_data(SavedTensorBefore210())
