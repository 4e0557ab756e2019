"""Converted models under DistributedDataParallel: 2 CPU ranks (gloo, loopback) launched with torchrun,
and the per-rank rounding seeds."""
import os

import pytest
import torch
import torch.distributed as dist

import blockquant
from blockquant.bench.datasets import load_dataset
from blockquant.bench.ddp import launch, shard_dataset, shard_nodes
from blockquant.bench.models import build_model
from blockquant.distributed import process_rank, rank_seed
from blockquant.packed import draw_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 6
HIDDEN = 32


def _single_process_held(shard, config):
    """The bytes held after forward for one shard, computed here without any process group."""
    torch.manual_seed(0)
    model = build_model("sage", shard.num_features, HIDDEN, shard.out_dim, num_layers=3, dropout=0.5)
    model = blockquant.convert(model, config)
    model.train()
    with blockquant.track_saved(model, exclude=(shard.x, shard.edge_index, shard.y)) as mem:
        out = model(shard.x, shard.edge_index)
    del out
    return mem.total_bytes


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch built without gloo")
def test_two_gloo_ranks_train_in_lockstep(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    recs = launch(2, ["--dataset", "synthetic:tiny", "--configs", "iexact", "--epochs", str(EPOCHS),
                      "--hidden", str(HIDDEN), "--seed", "0"], str(tmp_path), timeout_s=180)
    assert [r["rank"] for r in recs] == [0, 1] and all(r["backend"] == "gloo" for r in recs)
    data = load_dataset("synthetic:tiny")
    for r in recs:
        (c,) = r["configs"]
        assert c["params_identical_at_start"]
        assert len(c["params_identical_after_step"]) == EPOCHS and all(c["params_identical_after_step"])
        assert c["loss"][-1] < 0.85 * c["loss"][0], c["loss"]
        shard = shard_dataset(data, r["rank"], 2, seed=0)
        assert c["shard_nodes"] == shard.num_nodes
        expected = _single_process_held(shard, "iexact")
        assert c["held_bytes_ddp"] == c["held_bytes_single_process"] == expected
    # the global loss is all-reduced: every rank reports the same curve
    assert recs[0]["configs"][0]["loss"] == recs[1]["configs"][0]["loss"]
    # one user seed: rank 0 draws the single-process seeds, rank 1 different ones
    torch.manual_seed(0)
    alone = [draw_seed() for _ in range(3)]
    assert recs[0]["seed_draws"] == alone
    assert not set(recs[1]["seed_draws"]) & set(alone)
    assert recs[1]["seed_draws"] == [rank_seed(s, 1) for s in alone]


def test_rank_seed_is_pure_distinct_and_rank0_identity():
    seeds = [0, 1, 12345, (1 << 62) - 1]
    for s in seeds:
        assert rank_seed(s, 0) == s
        per_rank = [rank_seed(s, r) for r in range(64)]
        assert len(set(per_rank)) == 64
        assert per_rank == [rank_seed(s, r) for r in range(64)]
        assert all(0 <= v < (1 << 62) for v in per_rank)
    with pytest.raises(ValueError, match="non-negative int"):
        rank_seed(1, -1)


def test_draw_seed_mixes_the_process_rank(monkeypatch):
    import blockquant.packed as packed

    assert process_rank() == 0  # no process group in the test process
    torch.manual_seed(7)
    base = [draw_seed() for _ in range(4)]
    monkeypatch.setattr(packed, "process_rank", lambda: 3)
    torch.manual_seed(7)
    r3 = [draw_seed() for _ in range(4)]
    torch.manual_seed(7)
    assert [draw_seed() for _ in range(4)] == r3  # reproducible from the one seed
    assert r3 == [rank_seed(s, 3) for s in base] and not set(r3) & set(base)


def test_rank_rounding_noise_is_independent(monkeypatch):
    """Two ranks seeded alike round the same tensor with uncorrelated errors."""
    import blockquant.packed as packed

    x = torch.rand(1 << 16)
    cfg = blockquant.QuantConfig(bits=2, block_size=1024)
    errs = []
    for rank in (0, 1):
        monkeypatch.setattr(packed, "process_rank", lambda rank=rank: rank)
        torch.manual_seed(0)
        errs.append(blockquant.quantize(x, cfg).dequantize() - x)
    corr = torch.corrcoef(torch.stack(errs))[0, 1]
    assert abs(float(corr)) < 0.03, float(corr)  # identical seeds would give corr == 1


def test_shards_partition_the_nodes():
    parts = [shard_nodes(601, r, 3, seed=5) for r in range(3)]
    allp = torch.cat(parts)
    assert allp.numel() == 601 and allp.unique().numel() == 601
    assert all(bool((p[1:] > p[:-1]).all()) for p in parts)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_nodes(10, 2, 2)
