"""Datasets for ``blockquant bench``: a built-in synthetic graph generator, the
Planetoid citation graphs and three OGB node-property datasets, all loaded
offline from a prepared ``--root``.

Every loader returns a :class:`GraphDataset`: one full graph with features,
targets, fixed train/valid/test indices and a metric function. Loaders never
download and never read stdin; anything missing raises :class:`DatasetError`
with a one-line message that says what to do.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import io
import math
import os
import os.path as osp
from typing import Callable, Dict, Optional, Tuple

import torch

from .._optional import require
from .errors import BenchError


class DatasetError(BenchError):
    """A dataset could not be loaded; the message says how to fix it."""


@dataclasses.dataclass
class GraphDataset:
    """One full-batch node-classification graph.

    ``y`` is ``[N]`` int64 class ids (``task="multiclass"``) or ``[N, T]``
    float 0/1 targets (``task="multilabel"``, scored by ROC-AUC).
    """

    name: str
    x: torch.Tensor
    edge_index: torch.Tensor
    y: torch.Tensor
    split: Dict[str, torch.Tensor]
    num_classes: int
    task: str = "multiclass"
    metric: str = "acc"
    evaluator: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None
    info: Dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return int(self.x.size(0))

    @property
    def num_features(self) -> int:
        return int(self.x.size(1))

    @property
    def num_edges(self) -> int:
        """Directed edge count of ``edge_index`` (both directions of an undirected pair count)."""
        return int(self.edge_index.size(1))

    @property
    def out_dim(self) -> int:
        return int(self.y.size(1)) if self.task == "multilabel" else int(self.num_classes)

    def score(self, logits: torch.Tensor, idx: torch.Tensor) -> float:
        """The dataset's metric (accuracy or ROC-AUC) of ``logits`` on nodes ``idx``."""
        if self.evaluator is not None:
            return float(self.evaluator(logits[idx], self.y[idx]))
        pred = logits[idx].argmax(dim=-1)
        return float((pred == self.y[idx]).float().mean().item()) if idx.numel() else float("nan")

    def to_pyg(self):
        """The graph as a PyG ``Data``: ``x``, ``edge_index``, ``y`` and boolean ``train_mask``, ``val_mask``,
        ``test_mask`` from the split (the tensors are shared, not copied)."""
        from torch_geometric.data import Data

        masks = {}
        for split, key in (("train", "train_mask"), ("valid", "val_mask"), ("test", "test_mask")):
            masks[key] = torch.zeros(self.num_nodes, dtype=torch.bool, device=self.x.device)
            masks[key][self.split[split]] = True
        return Data(x=self.x, edge_index=self.edge_index, y=self.y, num_nodes=self.num_nodes, **masks)

    def to(self, device) -> "GraphDataset":
        self.x = self.x.to(device)
        self.edge_index = self.edge_index.to(device)
        self.y = self.y.to(device)
        self.split = {k: v.to(device) for k, v in self.split.items()}
        return self

    def describe(self) -> Dict[str, object]:
        d = {
            "name": self.name,
            "num_nodes": self.num_nodes,
            "num_edges": self.num_edges,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "task": self.task,
            "metric": self.metric,
            "split_sizes": {k: int(v.numel()) for k, v in self.split.items()},
        }
        d.update(self.info)
        return d


# --------------------------------------------------------------------------- synthetic


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Shape and difficulty of a generated graph.

    The graph is a degree-corrected stochastic block model: ``num_edges``
    undirected pairs; each pair's first end is drawn with probability
    proportional to a heavy-tailed degree weight, its second end from the same
    class with probability ``p_intra`` (again by degree weight), otherwise from
    the whole graph. Features are a class mean plus Gaussian noise, weak
    enough (``feature_signal``) that neighbourhood aggregation is needed for
    good accuracy.
    """

    num_nodes: int
    num_edges: int
    num_features: int
    num_classes: int
    p_intra: float = 0.75
    feature_signal: float = 0.35
    degree_sigma: float = 1.0
    train_frac: float = 0.5
    valid_frac: float = 0.25

    def scaled(self, scale: float) -> "SyntheticSpec":
        return dataclasses.replace(
            self,
            num_nodes=max(int(round(self.num_nodes * scale)), 4 * self.num_classes),
            num_edges=max(int(round(self.num_edges * scale)), 1),
        )


SYNTHETIC_PRESETS: Dict[str, SyntheticSpec] = {
    # a few hundred nodes: unit tests
    "tiny": SyntheticSpec(num_nodes=600, num_edges=3_000, num_features=32, num_classes=4),
    # the bare `blockquant bench`: seconds per configuration on two CPU cores
    "small": SyntheticSpec(num_nodes=3_000, num_edges=18_000, num_features=64, num_classes=8),
    # ogbn-arxiv's shape (169,343 nodes, 1,166,243 edges, 128 features, 40 classes)
    "arxiv-like": SyntheticSpec(num_nodes=169_343, num_edges=1_166_243, num_features=128, num_classes=40,
                                train_frac=0.54, valid_frac=0.18),
    # ogbn-products' shape (2,449,029 nodes, 61,859,140 edges, 100 features, 47 classes)
    "products-like": SyntheticSpec(num_nodes=2_449_029, num_edges=61_859_140, num_features=100, num_classes=47,
                                   train_frac=0.08, valid_frac=0.02),
}
DEFAULT_SYNTHETIC = "small"


# Edges are drawn this many at a time, so generating a products-sized graph holds
# the finished edge list plus one chunk's temporaries instead of a dozen
# edge-sized arrays. A graph with at most this many edges is drawn in one chunk,
# exactly as before chunking existed (same random stream, same graph).
EDGE_CHUNK = 1 << 22
FEATURE_ROW_CHUNK = 1 << 18


def generate_synthetic(spec: SyntheticSpec, seed: int = 0, *, edge_chunk: int = EDGE_CHUNK) -> GraphDataset:
    """Generate a graph deterministically from ``spec`` and ``seed``.

    Vectorised and streamed: arxiv-like takes seconds; products-like (2.45M
    nodes, 61.9M undirected edges) about two minutes on one core, with a peak
    of the finished graph (edge list 2 GiB, features 1 GiB) plus about 1 GiB of
    kept edge chunks (see ``bench/results/products_like_generation.md``).
    """
    if edge_chunk < 1:
        raise ValueError(f"edge_chunk must be a positive int; got {edge_chunk}")
    g = torch.Generator().manual_seed(int(seed))
    n, m, c, f = spec.num_nodes, spec.num_edges, spec.num_classes, spec.num_features

    # unequal class sizes, as in real data
    probs = (torch.rand(c, generator=g) + 0.5)
    probs = probs / probs.sum()
    y = torch.multinomial(probs, n, replacement=True, generator=g)

    # heavy-tailed degree propensity
    theta = torch.exp(spec.degree_sigma * torch.randn(n, generator=g))

    # nodes sorted by class; cumulative theta over that order lets us sample
    # "a node of class k, proportional to theta" with one searchsorted
    order = torch.argsort(y * n + torch.arange(n), stable=True)
    cum = torch.cumsum(theta[order].double(), 0)
    del theta
    counts = torch.bincount(y, minlength=c)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    cum0 = torch.cat([cum.new_zeros(1), cum])
    lo, hi = cum0[starts], cum0[ends]  # class k covers (lo[k], hi[k]] of the cumulative mass
    total = cum[-1]

    def pick(u_lo: torch.Tensor, u_hi: torch.Tensor) -> torch.Tensor:
        u = u_lo + (u_hi - u_lo) * torch.rand(u_lo.shape, generator=g, dtype=torch.float64)
        pos = torch.searchsorted(cum, u).clamp_(max=n - 1)
        return order[pos]

    src_parts, dst_parts = [], []
    for first in range(0, m, edge_chunk):
        k = min(edge_chunk, m - first)
        src = pick(torch.zeros(k, dtype=torch.float64), total.expand(k))
        intra = torch.rand(k, generator=g) < spec.p_intra
        ysrc = y[src]
        dst = torch.where(
            intra,
            pick(lo[ysrc], hi[ysrc]),
            pick(torch.zeros(k, dtype=torch.float64), total.expand(k)),
        )
        del intra, ysrc
        keep = src != dst
        src_parts.append(src[keep])
        dst_parts.append(dst[keep])
        del src, dst, keep
    undirected = sum(int(s.numel()) for s in src_parts)
    # [src | dst] over [dst | src], written in place: no edge-sized temporaries
    edge_index = torch.empty(2, 2 * undirected, dtype=torch.int64)
    torch.cat(src_parts, out=edge_index[0, :undirected])
    torch.cat(dst_parts, out=edge_index[1, :undirected])
    del src_parts, dst_parts
    edge_index[0, undirected:] = edge_index[1, :undirected]
    edge_index[1, undirected:] = edge_index[0, :undirected]

    # same draws as ``signal * means[y] + randn(n, f)``, added in row chunks
    means = torch.randn(c, f, generator=g)
    x = torch.randn(n, f, generator=g)
    for first in range(0, n, FEATURE_ROW_CHUNK):
        rows = slice(first, min(first + FEATURE_ROW_CHUNK, n))
        x[rows] += spec.feature_signal * means[y[rows]]

    perm = torch.randperm(n, generator=g)
    n_train = int(spec.train_frac * n)
    n_valid = int(spec.valid_frac * n)
    split = {
        "train": perm[:n_train].sort().values,
        "valid": perm[n_train:n_train + n_valid].sort().values,
        "test": perm[n_train + n_valid:].sort().values,
    }
    return GraphDataset(
        name="synthetic", x=x, edge_index=edge_index, y=y, split=split, num_classes=c,
        info={"generator": dataclasses.asdict(spec), "seed": int(seed), "undirected_edges": undirected},
    )


def parse_synthetic(name: str) -> Tuple[str, SyntheticSpec]:
    preset = name.split(":", 1)[1] if ":" in name else DEFAULT_SYNTHETIC
    if preset not in SYNTHETIC_PRESETS:
        raise DatasetError(
            f"unknown synthetic preset {preset!r}; expected one of {', '.join(SYNTHETIC_PRESETS)} "
            f"(e.g. --dataset synthetic:arxiv-like)"
        )
    return preset, SYNTHETIC_PRESETS[preset]


# --------------------------------------------------------------------------- Planetoid

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
_PLANETOID_RAW = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


def load_planetoid(name: str, root: str) -> GraphDataset:
    pretty = PLANETOID[name]
    raw_dir = osp.join(root, pretty, "raw")
    missing = [f"ind.{name}.{s}" for s in _PLANETOID_RAW if not osp.isfile(osp.join(raw_dir, f"ind.{name}.{s}"))]
    if missing:
        raise DatasetError(
            f"{pretty} raw files not found in {raw_dir} (missing {', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}); pass --root DIR where DIR/{pretty}/raw/ holds the "
            f"Planetoid files (no download is attempted)"
        )
    from torch_geometric.datasets import Planetoid

    try:
        with _quiet_stdout():
            ds = Planetoid(root, pretty)
    except PermissionError as e:
        raise DatasetError(f"cannot write processed files under {root} ({e.strerror}); copy the data to a "
                           f"writable folder and pass it as --root") from None
    data = ds[0]
    split = {
        "train": data.train_mask.nonzero().view(-1),
        "valid": data.val_mask.nonzero().view(-1),
        "test": data.test_mask.nonzero().view(-1),
    }
    return GraphDataset(name=name, x=data.x, edge_index=data.edge_index, y=data.y, split=split,
                        num_classes=int(ds.num_classes), info={"root": osp.abspath(root), "split_scheme": "public"})


# --------------------------------------------------------------------------- OGB

OGB = ("ogbn-arxiv", "ogbn-products", "ogbn-proteins")


def _ogb_meta(name: str) -> Dict[str, str]:
    pd = require("pandas", f"the {name} dataset")
    onp = require("ogb.nodeproppred", f"the {name} dataset")

    master = pd.read_csv(osp.join(osp.dirname(onp.__file__), "master.csv"), index_col=0, keep_default_na=False)
    return dict(master[name])


def ogb_dataset_dir(name: str, root: str) -> str:
    """The folder ``PygNodePropPredDataset`` would use under ``root`` (``ogbn_arxiv_pyg`` wins if present)."""
    base = name.replace("-", "_")
    pyg = osp.join(root, base + "_pyg")
    return pyg if osp.exists(pyg) else osp.join(root, base)


def ogb_required_files(name: str, meta: Optional[Dict[str, str]] = None) -> list:
    """Paths (relative to the dataset folder) that must exist for an offline load."""
    meta = meta or _ogb_meta(name)
    raw = ["edge.csv.gz", "num-node-list.csv.gz", "num-edge-list.csv.gz", "node-label.csv.gz"]
    if meta["has_node_attr"] == "True":
        raw.append("node-feat.csv.gz")
    if meta["has_edge_attr"] == "True":
        raw.append("edge-feat.csv.gz")
    if meta["additional node files"] != "None":
        raw += [f + ".csv.gz" for f in meta["additional node files"].split(",")]
    files = [f"RELEASE_v{meta['version']}.txt"] + [osp.join("raw", r) for r in raw]
    files += [osp.join("split", meta["split"], s + ".csv.gz") for s in ("train", "valid", "test")]
    return files


def _no_stdin(prompt: str = "") -> str:
    raise DatasetError(f"ogb asked a question on stdin ({prompt.strip()!r}); refusing to wait for an answer: "
                       f"prepare the dataset folder completely (see --help) and rerun")


@contextlib.contextmanager
def _quiet_stdout():
    """Library chatter ("Processing...", tqdm bars, numpy warnings) goes to a buffer: stdout is for
    the table and stderr for our own progress bars and errors."""
    import warnings

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield buf


def _allow_pyg_pickles() -> None:
    """torch>=2.6 loads with weights_only=True; ogb's processed file is a pickled PyG Data.

    Register exactly the PyG storage classes it contains instead of turning weights_only off.
    """
    from torch_geometric.data.data import Data, DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import BaseStorage, EdgeStorage, GlobalStorage, NodeStorage

    safe = [Data, DataEdgeAttr, DataTensorAttr, BaseStorage, EdgeStorage, GlobalStorage, NodeStorage]
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(safe)


def load_ogb(name: str, root: str) -> GraphDataset:
    meta = _ogb_meta(name)
    folder = ogb_dataset_dir(name, root)
    hint = (f"prepare it on a machine with network access (python -c \"from ogb.nodeproppred import "
            f"PygNodePropPredDataset as D; D('{name}', root='ROOT')\") and pass --root ROOT")
    if not osp.isdir(folder):
        raise DatasetError(f"{name} not found: no folder {folder}; {hint} (no download is attempted)")
    release = osp.join(folder, f"RELEASE_v{meta['version']}.txt")
    if not osp.isfile(release):
        # ogb would print "has been updated" and wait for a y/N answer on stdin here
        raise DatasetError(f"{folder} exists but has no {osp.basename(release)} (incomplete or outdated copy); "
                           f"re-download it into an empty --root, or create the release file if the copy is current")
    missing = [f for f in ogb_required_files(name, meta) if not osp.isfile(osp.join(folder, f))]
    if missing:
        raise DatasetError(f"{name} at {folder} is incomplete (missing {', '.join(missing[:3])}"
                           f"{'...' if len(missing) > 3 else ''}); {hint}")

    _allow_pyg_pickles()
    from ogb.nodeproppred import Evaluator, PygNodePropPredDataset

    saved_input = builtins.input
    builtins.input = _no_stdin  # belt and braces: ogb must never block on stdin
    try:
        with _quiet_stdout():
            ds = PygNodePropPredDataset(name, root=root)
            split = ds.get_idx_split()
    except PermissionError as e:
        raise DatasetError(f"cannot write processed files under {folder} ({e.strerror}); copy the data to a "
                           f"writable folder and pass it as --root") from None
    finally:
        builtins.input = saved_input
    data = ds[0]
    evaluator = Evaluator(name)
    num_tasks = int(meta["num tasks"])

    if name == "ogbn-proteins":
        # no node features: average each node's incoming edge features (OGB's own example does this)
        ea = data.edge_attr.float()
        dst = data.edge_index[1]
        x = torch.zeros(data.num_nodes, ea.size(1)).index_add_(0, dst, ea)
        deg = torch.bincount(dst, minlength=data.num_nodes).clamp_(min=1).unsqueeze(1)
        x = x / deg
        y = data.y.float()
        task, num_classes = "multilabel", num_tasks

        def score(logits, target):
            return evaluator.eval({"y_true": target.cpu(), "y_pred": logits.detach().cpu()})["rocauc"]
    else:
        x = data.x.float()
        y = data.y.view(-1).long()
        task, num_classes = "multiclass", int(meta["num classes"])

        def score(logits, target):
            pred = logits.argmax(dim=-1, keepdim=True)
            return evaluator.eval({"y_true": target.view(-1, 1).cpu(), "y_pred": pred.cpu()})["acc"]

    edge_index = data.edge_index
    if meta["add_inverse_edge"] != "True":
        from torch_geometric.utils import to_undirected

        edge_index = to_undirected(edge_index, num_nodes=data.num_nodes)
    return GraphDataset(
        name=name, x=x, edge_index=edge_index, y=y,
        split={k: split[k].view(-1).long() for k in ("train", "valid", "test")},
        num_classes=num_classes, task=task, metric=meta["eval metric"], evaluator=score,
        info={"root": osp.abspath(root), "split_scheme": meta["split"],
              "node_features": "mean of incoming edge features" if name == "ogbn-proteins" else "given"},
    )


# --------------------------------------------------------------------------- entry point

DATASET_NAMES = ("synthetic", "synthetic:<preset>") + tuple(PLANETOID) + OGB


def default_root() -> str:
    return os.environ.get("BLOCKQUANT_DATA", osp.join(os.getcwd(), "data"))


def synthetic_data(preset: str = "small", *, seed: int = 0):
    """A built-in synthetic graph (see :data:`SYNTHETIC_PRESETS`) as a PyG ``Data`` with ``train_mask``,
    ``val_mask`` and ``test_mask``: data to try blockquant on without downloading anything (the README's
    examples run on it). ``"small"``: 3,000 nodes, 64 features, 8 classes; ``"tiny"``: 600 nodes, 32 features."""
    return load_dataset(f"synthetic:{preset}", seed=seed).to_pyg()


def load_dataset(name: str, root: Optional[str] = None, *, scale: float = 1.0, seed: int = 0) -> GraphDataset:
    """Load ``name`` (see :data:`DATASET_NAMES`) from ``root``; ``scale``/``seed`` apply to synthetic graphs only."""
    key = name.strip().lower()
    root = default_root() if root is None else root
    if key == "synthetic" or key.startswith("synthetic:"):
        if not (scale > 0 and math.isfinite(scale)):
            raise DatasetError(f"--scale must be a positive number; got {scale}")
        preset, spec = parse_synthetic(key)
        ds = generate_synthetic(spec.scaled(scale) if scale != 1.0 else spec, seed=seed)
        ds.name = f"synthetic:{preset}" + (f"x{scale:g}" if scale != 1.0 else "")
        return ds
    if key in PLANETOID:
        return load_planetoid(key, root)
    if key in OGB:
        return load_ogb(key, root)
    raise DatasetError(f"unknown dataset {name!r}; expected one of: synthetic, "
                       f"synthetic:{{{','.join(SYNTHETIC_PRESETS)}}}, {', '.join(PLANETOID)}, {', '.join(OGB)}")
