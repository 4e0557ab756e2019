"""Measure what the autograd graph holds for backward: :func:`track_saved`.

"Activation memory" in this project means the bytes the autograd graph keeps
alive between the forward and the backward pass, excluding the model's
parameters and buffers, the input data and the output. That is what the
compression saves, so it is what we measure. ``torch.cuda.memory_allocated``
deltas mix it with everything else alive (outputs, caches, fragmentation) and
do not exist on CPU; walking the graph gives the exact number on any device,
broken down by module.

How it works:

* A global module forward pre-hook/hook pair records, for every module call in
  the block, the autograd sequence number at its start and, at its end, claims
  the graph nodes created since then that are reachable from its outputs.
  Inner modules finish first, so a node belongs to the innermost module whose
  forward created it. Nodes nobody claims belong to the top level (``""``).
* A :class:`~torch.overrides.TorchFunctionMode` and the module hooks keep weak
  references to tensors produced in the block; those still alive at the end
  are the roots the graph is walked from.
* Every reachable node created inside the block is inspected: built-in nodes
  through their ``_raw_saved_*`` slots (``SavedTensor.data`` gives what was
  stored *without* running unpack hooks, so a tensor packed by
  :func:`blockquant.compress_saved_tensors` is seen as its packed object);
  custom :class:`torch.autograd.Function` nodes through ``_raw_saved_tensors``
  and their ``ctx`` attributes (``bq_state`` included). Any object with a
  ``storages()`` method (``PackedTensor``, packed masks) counts as compressed.
* Bytes are whole storages, deduplicated by ``untyped_storage()`` (views of
  one storage are counted once, at its full size).

Storages of leaf tensors that require grad (parameters, or inputs the caller
owns) are never counted, even without ``model``.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from ._compat import CTX_INTERNAL_ATTRS, is_saved_tensor, raw_saved_slots, saved_tensor_data, sequence_nr
from .adjacency import cached_derived_weights
from .nested import flatten_tensors
from .packed import storage_bytes

__all__ = ["track_saved", "SavedMemory", "storage_key", "storage_bytes", "graph_saved_bytes"]

COMPRESSED = "compressed"
PLAIN = "plain"


def storage_key(t: torch.Tensor) -> Optional[Tuple[str, int]]:
    """Identity of a tensor's storage (device, data pointer); ``None`` for empty storage."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. sparse or meta tensors
        return None
    ptr = st.data_ptr()
    if ptr == 0 or st.nbytes() == 0:
        return None
    return (str(t.device), ptr)


def _held(obj: Any, kind: str, out: List[Tuple[torch.Tensor, str]], depth: int = 0) -> None:
    """Collect ``(tensor, kind)`` for every tensor ``obj`` keeps alive for backward."""
    if depth > 6 or obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return
    if isinstance(obj, torch.Tensor):
        out.append((obj, kind))
    elif is_saved_tensor(obj):
        # what the graph stores (a pack hook's result when hooks ran), never unpacked here
        _held(saved_tensor_data(obj), kind, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _held(v, kind, out, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            _held(v, kind, out, depth + 1)
    elif hasattr(obj, "storages") and callable(obj.storages):
        for t in obj.storages():
            _held(t, COMPRESSED, out, depth + 1)
    elif hasattr(obj, "tensors") and callable(obj.tensors):  # e.g. an Adjacency kept by aggregation
        for t in obj.tensors():
            _held(t, kind, out, depth + 1)


def _module_state_tensors(model: torch.nn.Module, out: List[torch.Tensor]) -> None:
    """Tensors modules keep as plain attributes (e.g. GCNConv's ``_cached_edge_index``):
    model state that outlives the step, like parameters and buffers, not activations."""
    for m in model.modules():
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules") or k.startswith("__"):
                continue
            if isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(
                    isinstance(i, torch.Tensor) for i in v)) or hasattr(v, "tensors"):
                flatten_tensors(v.tensors() if hasattr(v, "tensors") and callable(v.tensors) else v, out)


_CTX_SKIP = {"needs_input_grad", "materialize_grads", "non_differentiable", "dirty_tensors",
             "to_save", "saved_for_forward"}


def _node_held(node) -> List[Tuple[torch.Tensor, str]]:
    """Tensors (with kind) a graph node keeps alive for its backward."""
    out: List[Tuple[torch.Tensor, str]] = []
    for name in raw_saved_slots(node):
        try:
            _held(getattr(node, name), PLAIN, out)
        except RuntimeError:  # already freed by a backward pass
            pass
    # custom Function nodes: ctx attributes live in the node's __dict__ (bq_state among them)
    ctx_dict = getattr(node, "__dict__", None)
    if ctx_dict:
        for k, v in ctx_dict.items():
            if k not in _CTX_SKIP and k not in CTX_INTERNAL_ATTRS:
                _held(v, PLAIN, out)
    return out


def graph_saved_bytes(outputs: Any, exclude: Any = ()) -> int:
    """Bytes the autograd graph behind ``outputs`` holds for backward, found by walking it
    after the fact (unique storages; leaf tensors, ``exclude`` and the outputs themselves
    not counted).

    The same walk as :class:`track_saved`, without its module hooks and function mode:
    for a compiled model (``torch.compile``), where those hooks would add graph breaks and
    change what the compiled graphs save. Counts the whole graph reachable from
    ``outputs``, so build it from inputs that have no history of their own.
    """
    roots: List[torch.Tensor] = []
    flatten_tensors(outputs, roots)
    excluded = set()
    ex: List[torch.Tensor] = list(roots) + cached_derived_weights()
    flatten_tensors(exclude, ex)
    nodes: Dict[int, Any] = {}
    todo = [t.grad_fn for t in roots if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or id(node) in nodes:
            continue
        nodes[id(node)] = node
        if _is_leaf_node(node):
            ex.append(node.variable)
            continue
        todo.extend(n for n, _ in node.next_functions)
    for t in ex:
        k = storage_key(t)
        if k is not None:
            excluded.add(k)
    counted: Dict[Tuple[str, int], int] = {}
    for node in nodes.values():
        if _is_leaf_node(node):
            continue
        for t, _ in _node_held(node):
            k = storage_key(t)
            if k is not None and k not in excluded and k not in counted:
                counted[k] = storage_bytes(t)
    return sum(counted.values())


def _current_sequence_nr() -> Optional[int]:
    """The autograd sequence number the next graph node will get (per thread)."""
    try:
        with torch.enable_grad():
            probe = torch.zeros((), requires_grad=True)
            return sequence_nr(probe.view_as(probe).grad_fn) + 1
    except RuntimeError:  # inference mode: no graph is built at all
        return None


def _is_leaf_node(node) -> bool:
    return hasattr(node, "variable")  # AccumulateGrad


class _RootRecorder(TorchFunctionMode):
    """Remembers (weakly) tensors produced by torch functions inside the block."""

    def __init__(self, sink: List):
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            if out.grad_fn is not None:
                self.sink.append(weakref.ref(out))
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor) and o.grad_fn is not None:
                    self.sink.append(weakref.ref(o))
        return out


class SavedMemory:
    """Result of :func:`track_saved`, filled in when the ``with`` block ends.

    Attributes:
        total_bytes: bytes held by the graph for backward (unique storages).
        per_module: qualified module name -> bytes, attributed to the innermost
            module whose forward created the node holding the storage (``""``:
            code outside any module).
        per_kind: ``{"compressed": bytes, "plain": bytes}``; compressed means held
            by a blockquant packed object, plain means held at full precision.
        plain_by_call: module name (as in ``per_module``) -> ``{graph node name: bytes}``,
            the bytes held at full precision and the autograd node that holds them
            (``SoftmaxBackward0``, ``SigmoidBackward0``, a custom Function's
            ``_DropoutBackward``...): which call saved what is not compressed.
        num_nodes: graph nodes created in the block and reachable from its outputs.
        output_bytes: bytes of the outputs' storages (excluded from the total).
    """

    def __init__(self):
        self.total_bytes = 0
        self.per_module: Dict[str, int] = OrderedDict()
        self.per_kind: Dict[str, int] = {COMPRESSED: 0, PLAIN: 0}
        self.plain_by_call: Dict[str, Dict[str, int]] = OrderedDict()
        self.num_nodes = 0
        self.output_bytes = 0
        self.done = False

    def bytes_per(self, count: int) -> float:
        """``total_bytes / count`` (e.g. bytes per node of the graph)."""
        if count <= 0:
            raise ValueError(f"count must be positive; got {count}")
        return self.total_bytes / count

    def report(self, per: Optional[int] = None, per_label: str = "node") -> str:
        """A text table of bytes per module (and per ``per`` items when given)."""
        if not self.done:
            return "SavedMemory: the with-block has not finished yet"
        rows = [(name or "<top level>", b) for name, b in self.per_module.items() if b > 0]
        width = max([len(r[0]) for r in rows] + [len("module")])
        head = f"{'module':<{width}}  {'bytes':>12}  {'MiB':>9}  {'share':>6}"
        if per:
            head += f"  {'B/' + per_label:>10}"
        lines = [head, "-" * len(head)]
        total = max(self.total_bytes, 1)
        for name, b in rows:
            line = f"{name:<{width}}  {b:>12,}  {b / 2**20:>9.3f}  {100 * b / total:>5.1f}%"
            if per:
                line += f"  {b / per:>10.2f}"
            lines.append(line)
        lines.append("-" * len(head))
        line = f"{'total':<{width}}  {self.total_bytes:>12,}  {self.total_bytes / 2**20:>9.3f}  {'100.0%':>6}"
        if per:
            line += f"  {self.total_bytes / per:>10.2f}"
        lines.append(line)
        lines.append(f"compressed {self.per_kind[COMPRESSED]:,} B, plain {self.per_kind[PLAIN]:,} B, "
                     f"{self.num_nodes} graph nodes")
        calls = sorted(((name or "<top level>", node, b) for name, per_node in self.plain_by_call.items()
                        for node, b in per_node.items() if b > 0), key=lambda r: -r[2])
        if calls:
            lines.append("held at full precision, by module and the graph node holding it:")
            w1 = max(len(r[0]) for r in calls)
            w2 = max(len(r[1]) for r in calls)
            lines += [f"  {m:<{w1}}  {n:<{w2}}  {b:>12,}  {100 * b / total:>5.1f}%" for m, n, b in calls]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"SavedMemory(total_bytes={self.total_bytes}, compressed={self.per_kind[COMPRESSED]}, "
                f"plain={self.per_kind[PLAIN]}, modules={len(self.per_module)})")


class track_saved:
    """Context manager measuring the bytes the autograd graph holds for backward.

    Example::

        with blockquant.track_saved(model, exclude=(data.x, data.edge_index)) as mem:
            out = model(data.x, data.edge_index)
        print(mem.total_bytes, mem.per_module)
        print(mem.report())

    Args:
        model: optional module. Its parameters and buffers are excluded, its
            output is excluded, and ``per_module`` uses its qualified names
            (modules outside it are named ``<ClassName>``).
        exclude: tensors (or nested tuples/lists/dicts of tensors, or a PyG
            ``Data``) whose storages are held elsewhere anyway, e.g. the node
            features and ``edge_index``.

    Only graph nodes created inside the block are counted. The graph must be
    walked before ``backward`` frees it, i.e. the result is taken when the
    block exits.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, exclude: Any = ()):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"track_saved expects a torch.nn.Module or None as model; got {type(model).__name__}")
        self.model = model
        self.exclude = exclude
        self.result = SavedMemory()
        self._handles: List[Any] = []

    # ----------------------------------------------------------- bookkeeping
    def _name_of(self, module: torch.nn.Module) -> str:
        name = self._names.get(id(module))
        return name if name is not None else f"<{type(module).__name__}>"

    def _pre_hook(self, module, args):
        self._starts.setdefault(id(module), []).append(_current_sequence_nr())

    def _post_hook(self, module, args, output):
        stack = self._starts.get(id(module))
        start = stack.pop() if stack else None
        tensors: List[torch.Tensor] = []
        flatten_tensors(output, tensors)
        if self.model is not None and module is self.model:
            self._model_outputs.extend(weakref.ref(t) for t in tensors)
        if start is None:
            return
        name = self._name_of(module)
        todo = [t.grad_fn for t in tensors if t.grad_fn is not None]
        for t in tensors:
            if t.grad_fn is not None:
                self._roots.append(weakref.ref(t))
        while todo:
            node = todo.pop()
            if node is None or _is_leaf_node(node):
                continue
            if sequence_nr(node) < start or id(node) in self._owner:
                continue
            # strong reference: C++ nodes cannot be weakly referenced, and ids must stay unique
            self._owner[id(node)] = (node, name)
            todo.extend(n for n, _ in node.next_functions)

    def __enter__(self) -> SavedMemory:
        self._names = {id(m): n for n, m in self.model.named_modules()} if self.model is not None else {}
        self._starts: Dict[int, List[Optional[int]]] = {}
        self._owner: Dict[int, Tuple[Any, str]] = {}
        self._roots: List[weakref.ref] = []
        self._model_outputs: List[weakref.ref] = []
        self._start = _current_sequence_nr()
        mod = torch.nn.modules.module
        self._handles = [mod.register_module_forward_pre_hook(self._pre_hook),
                         mod.register_module_forward_hook(self._post_hook)]
        self._mode = _RootRecorder(self._roots)
        self._mode.__enter__()
        return self.result

    def __exit__(self, exc_type, exc, tb) -> None:
        self._mode.__exit__(exc_type, exc, tb)
        for h in self._handles:
            h.remove()
        self._handles = []
        try:
            if exc_type is None:
                self._measure()
        finally:
            self._owner.clear()
            self._roots = []
            self._model_outputs = []
            self._starts.clear()

    # ----------------------------------------------------------------- walk
    def _measure(self) -> None:
        res = self.result
        start = self._start
        end = _current_sequence_nr()
        if start is None or end is None:
            res.done = True
            return

        def in_block(node) -> bool:
            return start <= sequence_nr(node) < end

        roots = [r() for r in self._roots + self._model_outputs]
        roots = [t for t in roots if t is not None and t.grad_fn is not None]

        # reachable in-block nodes
        nodes: Dict[int, Any] = {}
        leaf_vars: List[torch.Tensor] = []
        todo = [t.grad_fn for t in roots]
        seen_leaf = set()
        while todo:
            node = todo.pop()
            if node is None or id(node) in nodes:
                continue
            if _is_leaf_node(node):
                if id(node) not in seen_leaf:
                    seen_leaf.add(id(node))
                    leaf_vars.append(node.variable)
                continue
            if not in_block(node):
                continue
            nodes[id(node)] = node
            todo.extend(n for n, _ in node.next_functions)

        # outputs: alive tensors whose node no other reachable node consumes
        consumed = {id(n) for node in nodes.values() for n, _ in node.next_functions if n is not None}
        outputs = [t for t in roots if id(t.grad_fn) not in consumed]
        outputs += [r() for r in self._model_outputs if r() is not None]

        excluded = set()
        ex: List[torch.Tensor] = []
        if self.model is not None:
            ex.extend(self.model.parameters())
            ex.extend(self.model.buffers())
            _module_state_tensors(self.model, ex)
        ex.extend(cached_derived_weights())  # graph state, like a cached CSR
        flatten_tensors(self.exclude, ex)
        ex.extend(leaf_vars)
        for t in ex:
            k = storage_key(t)
            if k is not None:
                excluded.add(k)
        out_keys = {}
        for t in outputs:
            k = storage_key(t)
            if k is not None and k not in excluded:
                out_keys[k] = storage_bytes(t)
        excluded.update(out_keys)
        res.output_bytes = sum(out_keys.values())

        counted: Dict[Tuple[str, int], int] = {}
        per_module: Dict[str, int] = OrderedDict()
        for node in sorted(nodes.values(), key=sequence_nr):
            owner = self._owner.get(id(node))
            name = owner[1] if owner is not None and owner[0] is node else ""
            per_module.setdefault(name, 0)
            for t, kind in _node_held(node):
                k = storage_key(t)
                if k is None or k in excluded or k in counted:
                    continue
                b = storage_bytes(t)
                counted[k] = b
                per_module[name] += b
                res.per_kind[kind] += b
                if kind == PLAIN:
                    per_node = res.plain_by_call.setdefault(name, OrderedDict())
                    per_node[node.name()] = per_node.get(node.name(), 0) + b
        res.per_module = OrderedDict((n, b) for n, b in per_module.items())
        res.total_bytes = sum(counted.values())
        res.num_nodes = len(nodes)
        res.done = True
