"""`blockquant bench` trains its configurations in interleaved rounds: same results as one after another,
time ratios to the reference of the same round."""
import pytest
import torch

from blockquant.bench.datasets import load_dataset
from blockquant.bench.rounds import add_time_ratios, interleaved, reference_of
from blockquant.bench.runner import BenchOptions, Trainer, resolve_configs, run_benchmark

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")


def test_interleaved_training_equals_training_alone():
    data = load_dataset("synthetic:tiny")
    opts = BenchOptions(dataset="synthetic:tiny", configs=("fp32-sparse", "int2"), epochs=3, seeds=(0, 1), hidden=16,
                        quiet=True)
    records = {r["config"]: r for r in run_benchmark(data, opts, resolve_configs(opts.configs))}
    trainer = Trainer(data, opts, torch.device("cpu"))
    for cfg in resolve_configs(opts.configs):
        for i, seed in enumerate(opts.seeds):
            alone = trainer.train(trainer.build(cfg, seed), seed, opts.epochs)
            # int2 draws its rounding seeds and dropout masks from the generator: any leak between the
            # interleaved streams would change its losses
            assert records[cfg.name]["runs"][i]["loss"] == alone["loss"], (cfg.name, seed)
    for r in records.values():
        assert r["time_reference"] == "fp32-sparse"
        assert all(len(run["epoch_times_s"]) == len(run["epoch_cpu_s"]) == 3 for run in r["runs"])
        assert r["epoch_time_min_s"] <= r["epoch_time_median_s"]
    ref = records["fp32-sparse"]
    assert ref["time_ratio_ref_min"] == ref["time_ratio_ref_median"] == 1.0
    assert ref["cpu_ratio_ref_median"] == 1.0
    # the ratio is taken per round, warm-up epochs (the first of each seed) left out
    run, ref_run = records["int2"]["runs"][1], ref["runs"][1]
    assert records["int2"]["time_ratio_ref_min"] <= run["epoch_times_s"][2] / ref_run["epoch_times_s"][2]


def test_rounds_rotate_the_order_and_drop_a_failed_contender():
    calls = []

    def run(name, r):
        if name == "b" and r == 1:
            raise MemoryError("no room")
        calls.append((r, name))

    loads = interleaved(["a", "b", "c"], 3, run, lambda name, r, e: isinstance(e, MemoryError))
    assert calls == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "a"), (2, "a"), (2, "c")]
    assert [lo["order"] for lo in loads] == [["a", "b", "c"], ["b", "c", "a"], ["a", "c"]]
    with pytest.raises(ValueError):
        interleaved(["a"], 1, lambda n, r: (_ for _ in ()).throw(ValueError("bug")), lambda *a: False)


def test_time_ratios_pair_the_steps_of_one_round():
    recs = [{"config": "fp32", "runs": [{"epoch_times_s": [9.0, 2.0, 4.0], "epoch_cpu_s": [9.0, 1.0, 1.0]}]},
            {"config": "x", "runs": [{"epoch_times_s": [1.0, 3.0, 4.0], "epoch_cpu_s": [1.0, 2.0, 1.5]}]}]
    add_time_ratios(recs, [{"load_avg_before": 3.0, "load_avg_after": 5.0}])
    x = recs[1]
    assert x["time_reference"] == "fp32" == reference_of(["x", "fp32"])
    assert (x["time_ratio_ref_min"], x["time_ratio_ref_median"]) == (1.0, 1.25)
    assert (x["cpu_ratio_ref_min"], x["cpu_ratio_ref_median"]) == (1.5, 1.75)
    assert (x["epoch_time_min_s"], x["epoch_time_median_s"]) == (3.0, 3.5)
    assert x["load_avg_rounds"] == [3.0, 5.0]


def test_minibatch_runs_interleave_too_and_equal_training_alone():
    from blockquant.bench.minibatch import MiniBatchOptions, MiniBatchTrainer, run_minibatch_benchmark

    data = load_dataset("synthetic:tiny")
    opts = BenchOptions(dataset="synthetic:tiny", configs=("fp32", "int2"), epochs=2, seeds=(0,), hidden=16,
                        quiet=True)
    mb = MiniBatchOptions("random", 200)
    records = {r["config"]: r for r in run_minibatch_benchmark(data, opts, mb, resolve_configs(opts.configs))}
    trainer = MiniBatchTrainer(data, opts, mb, torch.device("cpu"))
    for cfg in resolve_configs(opts.configs):
        alone = trainer.train(trainer.build(cfg, 0), 0, opts.epochs)
        assert records[cfg.name]["runs"][0]["loss"] == alone["loss"], cfg.name
    run = records["int2"]["runs"][0]
    assert len(run["epoch_cpu_s"]) == 2 and len(run["step_times_s"]) >= 2 * 3  # 600 nodes in batches of 200
    assert records["int2"]["time_reference"] == "fp32" and records["fp32"]["time_ratio_ref_median"] == 1.0


def test_convergence_against_fp32_pairs_seeds_and_counts_the_runs_that_never_get_there():
    from blockquant.bench.runner import convergence_vs_fp32

    fp32 = {"runs": [{"seed": 0, "val": [0.5, 0.7, 0.8, 0.8], "best_val": 0.8, "best_epoch": 2},
                     {"seed": 1, "val": [0.6, 0.9, 0.7, 0.7], "best_val": 0.9, "best_epoch": 1}]}
    slower = {"runs": [{"seed": 0, "val": [0.4, 0.6, 0.7, 0.8]},   # reaches 0.8 at epoch 4: 4/3 of fp32's
                       {"seed": 1, "val": [0.5, 0.6, 0.8, 0.85]}]}  # never reaches 0.9
    got = convergence_vs_fp32(slower, fp32)
    assert got == {"epochs_to_fp32_best_ratio": 4 / 3, "reached_fp32_best": (1, 2)}
    assert convergence_vs_fp32(fp32, fp32) == {"epochs_to_fp32_best_ratio": 1.0, "reached_fp32_best": (2, 2)}
    assert convergence_vs_fp32(slower, None) == {"epochs_to_fp32_best_ratio": None, "reached_fp32_best": None}
