"""Device audit: no tensor in library code is created on the default device by accident.

A tensor factory without ``device=`` (``torch.tensor``, ``zeros``, ``arange``, ``rand``, ...) makes a
CPU tensor. Next to CUDA data that is a device mismatch (an error, like the CPU search value that
``AttentionGraph.target_chunks`` once passed to ``searchsorted`` over a CUDA tensor) or a silent
host-to-device copy. This test reads the package's source and fails on every such call that is not
listed below with the reason it is meant to be on the host. A new one: pass ``device=`` (the input's
device), use a ``*_like`` / ``x.new_*`` factory, or list it here with its reason.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("blockquant", "kernels")
FACTORIES = {"tensor", "as_tensor", "asarray", "zeros", "ones", "empty", "full", "arange", "linspace", "logspace",
             "eye", "rand", "randn", "randint", "randperm", "empty_strided"}

_SEED = "a seed: a host scalar by design (0-d int64 CPU tensor, read by packed.seed_value)"
_CPU_ONLY = "the compiled CPU codec: CPU tensors only (checked by _require)"
_HOST_DATA = "benchmark data generated on the host and moved with GraphDataset.to(device)"
ALLOWED = {
    ("blockquant/packed.py", "draw_seed"): _SEED,
    ("blockquant/packed.py", "draw_seed_tensor"): _SEED,
    ("blockquant/packed.py", "as_seed_tensor"): _SEED,
    ("blockquant/packed.py", "_rank_seed_op"): _SEED,
    ("blockquant/packed.py", "_"): _SEED + " (the fake implementations' seed outputs)",
    ("blockquant/functional/masked.py", "_dropout_noise"): _SEED,
    ("blockquant/seeds.py", "draw_base_seed"): _SEED,
    ("blockquant/levels.py", "optimal_levels"): "solving for the levels: host arithmetic on 2**bits values, once",
    ("blockquant/levels.py", "optimal_levels.levels_from"): "solving for the levels (see optimal_levels)",
    ("blockquant/levels.py", "variance_reduction"): "a scalar figure of the levels, computed on the host",
    ("blockquant/tune.py", "_rounding_variance"): "a scalar of the tuner's model, computed on the host",
    ("blockquant/adjacency.py", "_from_torch_sparse"): "an empty index only passed to _sizes for its shape",
    ("blockquant/memory.py", "_current_sequence_nr"): "a throwaway tensor to read autograd's sequence number",
    **{("blockquant/_compat.py", f"check.{part}"): "check() tries the private APIs on throwaway CPU tensors"
       for part in ("graph", "delayed", "bn", "tensor_attrs")},
    ("kernels/native.py", "_self_check"): _CPU_ONLY,
    ("kernels/native.py", "_quantize"): _CPU_ONLY,
    ("kernels/native.py", "_dequantize"): _CPU_ONLY,
    ("kernels/native.py", "dequantize_native"): _CPU_ONLY,
    **{("kernels/native_ops.py", f): "the compiled CPU ops: CPU tensors only (native_ops.enabled)"
       for f in ("_scale_in", "dropout", "relu_pack", "quantize_affine", "bn_backward", "heads_spmm", "heads_sddmm")},
    ("blockquant/bench/datasets.py", "generate_synthetic"): _HOST_DATA,
    ("blockquant/bench/datasets.py", "generate_synthetic.pick"): _HOST_DATA,
    ("blockquant/bench/datasets.py", "load_ogb"): _HOST_DATA,
    ("blockquant/bench/ddp.py", "shard_nodes"): "a node permutation drawn on the host from a seeded CPU generator",
}


def _scan(source: str, rel: str):
    """``(file, enclosing function, call, line)`` of every torch factory call without ``device=``."""
    found = []
    scope = []

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node):
            scope.append(node.name)
            self.generic_visit(node)
            scope.pop()

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Call(self, node):
            fn = node.func
            if (isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id == "torch"
                    and fn.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords)):
                found.append((rel, ".".join(scope), f"torch.{fn.attr}", node.lineno))
            self.generic_visit(node)

    Visitor().visit(ast.parse(source, rel))
    return found


def _factory_calls_without_device():
    found = []
    for top in SOURCES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        found += _scan(f.read(), os.path.relpath(path, ROOT).replace(os.sep, "/"))
    return found


def test_every_factory_without_device_is_listed_with_its_reason():
    unlisted = [f"{path}:{line} in {func or '<module>'}: {call}(...) without device="
                for path, func, call, line in _factory_calls_without_device() if (path, func) not in ALLOWED]
    assert not unlisted, ("tensor factories on the default device where the data's device may be at hand; pass "
                          "device=, use a *_like / x.new_* factory, or list them in ALLOWED with the reason:\n"
                          + "\n".join(unlisted))


def test_the_allow_list_has_no_stale_entries():
    used = {(path, func) for path, func, _, _ in _factory_calls_without_device()}
    assert not [k for k in ALLOWED if k not in used], [k for k in ALLOWED if k not in used]


def test_the_audit_finds_the_old_attention_chunk_bug():
    """The audit flags the kind of call it exists for: the old ``target_chunks`` search value."""
    old = ("class AttentionGraph:\n"
           "    def target_chunks(self, edges):\n"
           "        crow = self.crow.long()\n"
           "        a = int(crow[0])\n"
           "        return torch.searchsorted(crow, torch.tensor(a + edges, dtype=crow.dtype), right=True)\n")
    assert _scan(old, "blockquant/attention.py") == [("blockquant/attention.py", "target_chunks", "torch.tensor", 5)]
