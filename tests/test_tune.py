"""blockquant.tune: exact byte formula, plans as JSON, budget handling, and the tuned plan
against uniform configs at equal bytes, on a small synthetic graph."""
import json

import pytest
import torch

import blockquant
from blockquant import Plan, QuantConfig, TuneError, track_saved
from blockquant.bench.datasets import load_dataset
from blockquant.bench.models import build_model
from blockquant.cli import main
from blockquant.packed import packed_nbytes
from blockquant.tune import gradient_error, tune

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

# a small grid keeps each tune() call to a few seconds; the pruning and allocation are the same
SMALL_GRID = [QuantConfig(bits=b, block_size=g, rp_ratio=r, levels=lv)
              for b in (1, 2, 4) for g in (16, 64, 256, "row") for r in (1, 4) for lv in ("uniform", "optimal")
              if not (b == 1 and lv == "optimal")]
UNIFORM = (QuantConfig.preset("int2"), QuantConfig.preset("iexact"), QuantConfig.preset("int4"),
           QuantConfig(bits=2, block_size=64, rp_ratio=4))
FAST = dict(candidates=SMALL_GRID, probe_steps=(0, 3), max_candidates_per_layer=4, uniform_grid=UNIFORM,
            refine=False, progress=False)


@pytest.fixture(scope="module")
def graph():
    return load_dataset("synthetic:tiny", seed=0)


def make_model(data, name="sage"):
    torch.manual_seed(0)
    return build_model(name, data.num_features, 24, data.out_dim, num_layers=2, dropout=0.5)


def measured_bytes(model, data, plan) -> int:
    """Bytes held for backward by a fresh converted copy of ``model`` (one training forward)."""
    m = blockquant.convert(model, plan)
    m.train()
    with track_saved(m, exclude=(data.x, data.edge_index, data.y)) as mem:
        out = m(data.x, data.edge_index)  # noqa: F841 - the graph must be alive when the block ends
    return mem.total_bytes


@pytest.fixture(scope="module")
def tuned_iexact(graph):
    # module scope runs before the function-scoped torch_backend_one_thread: set the same here
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOCKQUANT_BACKEND", "torch")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield tune(make_model(graph), graph, budget="iexact", **dict(FAST, refine=True))
        finally:
            torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- byte formula


@pytest.mark.parametrize("shape", [(37, 19), (5, 1), (1000,), (3, 4, 33), (0, 8)], ids=str)
@pytest.mark.parametrize("config", [
    QuantConfig(bits=1, block_size=16), QuantConfig(bits=2, block_size="row", rp_ratio=8),
    QuantConfig(bits=4, block_size=65536, meta_dtype=torch.float32), QuantConfig(bits=8, block_size=100, rp_ratio=3),
    QuantConfig(bits=2, block_size=1024, rp_ratio=8, levels="optimal", meta_dtype=torch.float16),
], ids=lambda c: c.short())
def test_packed_nbytes_is_what_quantize_holds(shape, config):
    x = torch.randn(shape)
    assert packed_nbytes(shape, config) == blockquant.quantize(x, config, seed=1).nbytes


# ----------------------------------------------------------------------------- plans


def test_plan_round_trips_through_json(tmp_path, graph):
    plan = Plan({"blocks.0.conv": QuantConfig(bits=2, block_size="row", rp_ratio=8, levels="optimal"),
                 "blocks.1.conv": None}, default=QuantConfig(bits=4, block_size=256, meta_dtype=torch.float16),
                info={"note": "x"})
    path = str(tmp_path / "plan.json")
    plan.to_json(path)
    back = Plan.from_json(path)
    assert back == plan and back.info == {"note": "x"}
    assert back["blocks.0.conv"].meta_dtype == torch.bfloat16 and back[""].meta_dtype == torch.float16
    assert Plan.from_dict(json.loads(plan.to_json())) == plan
    # convert reads the file directly and applies it per layer
    m = blockquant.convert(make_model(graph), path)
    assert m.blocks[0].conv.bq_config == plan.layers["blocks.0.conv"]
    assert not isinstance(m.blocks[1].conv, blockquant.nn.CompressedModule)
    assert m.blocks[0].norm.bq_config == plan.default
    with pytest.raises(ValueError, match="per-layer plan"):
        QuantConfig.from_json(path)
    with pytest.raises(ValueError, match="unsupported plan format"):
        Plan.from_dict({"format": "other/9", "layers": {}})
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        Plan.from_dict({"layers": {"a": {"bitz": 2}}})


def test_tuned_plan_holds_exactly_the_predicted_bytes(graph, tuned_iexact, tmp_path):
    res = tuned_iexact
    assert res.compressed and res.layers
    assert res.measured_bytes == res.predicted_bytes
    assert res.predicted_bytes <= res.budget_bytes
    assert res.budget_bytes == measured_bytes(make_model(graph), graph, QuantConfig.preset("iexact"))
    # the plan, written and read back, converts a fresh model to exactly those bytes
    path = str(tmp_path / "plan.json")
    res.plan.to_json(path)
    assert measured_bytes(make_model(graph), graph, Plan.from_json(path)) == res.predicted_bytes
    # per-layer bytes in the table are the formula's, and add up with the plain bytes
    assert res.plain_bytes + sum(l.chosen.nbytes for l in res.layers) == res.predicted_bytes
    for layer in res.layers:
        assert len(layer.candidates) <= 4 < layer.num_candidates  # pruned before measuring
        assert all(c.error is not None and c.error >= 0 for c in layer.candidates)
    assert "bits" in res.table() and "measured" in res.table()


def _zoo_model(name, data):
    """PyG model-zoo models with a normalisation wrapper (PyG's ``BatchNorm`` holds a ``BatchNorm1d``)."""
    from torch_geometric.nn.models import GAT, GCN, GIN, GraphSAGE

    torch.manual_seed(0)
    kind, norm = name.split("-", 1)
    cls = {"sage": GraphSAGE, "gcn": GCN, "gat": GAT, "gin": GIN}[kind]
    kw = dict(heads=2) if kind == "gat" else {}
    return cls(data.num_features, 16, num_layers=3, out_channels=data.out_dim, norm=norm, dropout=0.5, **kw)


BUDGET_MODELS = ["bench-sage", "bench-gcn", "bench-gat", "bench-gin", "bench-gcn2",
                 "zoo-sage-batch_norm", "zoo-gcn-batch_norm", "zoo-gat-batch_norm", "zoo-gin-batch_norm",
                 "zoo-sage-layer_norm"]


@pytest.mark.parametrize("name", BUDGET_MODELS)
def test_plan_at_a_preset_budget_holds_at_most_that_presets_bytes(graph, name):
    """The word tune keeps: a plan for the bytes of uniform iexact holds at most those bytes as
    the user measures them (track_saved on a fresh model, data excluded), its byte model is exact,
    and every layer it names gets the config it names (PyG's BatchNorm: the inner BatchNorm1d)."""
    def fresh():
        if name.startswith("bench-"):
            return make_model(graph, name.split("-", 1)[1])
        return _zoo_model(name.split("-", 1)[1], graph)

    res = tune(fresh(), graph, budget="iexact", **dict(FAST, candidates=SMALL_GRID[::3], max_candidates_per_layer=2))
    uniform = measured_bytes(fresh(), graph, QuantConfig.preset("iexact"))
    held = measured_bytes(fresh(), graph, res.plan)
    assert res.budget_bytes == uniform
    assert held == res.measured_bytes == res.predicted_bytes <= uniform, res.table()
    modules = dict(blockquant.convert(fresh(), res.plan).named_modules())
    ignored = {n: c.short() for n, c in res.plan.layers.items() if modules[n].bq_config != c}
    assert not ignored, f"the plan names configs that conversion does not give these modules: {ignored}"


def test_tune_is_deterministic_under_a_seed(graph, tuned_iexact):
    again = tune(make_model(graph), graph, budget="iexact", **dict(FAST, refine=True))
    assert again.plan == tuned_iexact.plan
    assert again.measured_error == tuned_iexact.measured_error
    assert [[c.error for c in l.candidates] for l in again.layers] == \
        [[c.error for c in l.candidates] for l in tuned_iexact.layers]


@pytest.mark.parametrize("preset", ["int2", "iexact", "int4"])
def test_tuned_error_never_above_uniform_at_equal_bytes(graph, preset):
    model = make_model(graph)
    res = tune(model, graph, budget=preset, **FAST)
    uniform_bytes = measured_bytes(make_model(graph), graph, QuantConfig.preset(preset))
    assert res.measured_bytes <= uniform_bytes
    tuned_err = gradient_error(model, graph, res.plan, probe_steps=(0, 3))
    uniform_err = gradient_error(model, graph, QuantConfig.preset(preset), probe_steps=(0, 3))
    assert tuned_err == pytest.approx(res.measured_error)
    assert tuned_err <= uniform_err, (res.table(), uniform_err)


def test_tune_leaves_the_callers_random_state_alone(graph, monkeypatch):
    """The probes seed the CPU generator (and those of CUDA devices in use) and restore them; they
    never call torch.manual_seed, which reseeds every CUDA generator of the process."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    models = make_model(graph), make_model(graph)
    torch.manual_seed(1234)
    reseeded.clear()
    before = torch.random.get_rng_state()
    grid = SMALL_GRID[:2] + [QuantConfig.preset("iexact")]
    tune(models[0], graph, budget="iexact", **dict(FAST, candidates=grid, uniform_grid=()))
    gradient_error(models[1], graph, "iexact", probe_steps=(0,))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert reseeded == [], "tune reseeded every CUDA generator (torch.manual_seed)"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tune_on_cuda_restores_the_cuda_generators(graph):
    data = load_dataset("synthetic:tiny", seed=0).to("cuda")
    model = make_model(data).cuda()
    torch.cuda.manual_seed_all(99)
    before = torch.cuda.get_rng_state_all()
    tune(model, data, budget="iexact", **dict(FAST, candidates=SMALL_GRID[:2], uniform_grid=()))
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), before))


def test_unreachable_budget_names_the_smallest(graph):
    with pytest.raises(TuneError, match=r"cannot be met: the smallest achievable is [\d,]+ B") as e:
        tune(make_model(graph), graph, budget=1000, **FAST)
    assert "\n" not in str(e.value)


def test_budget_above_full_precision_compresses_nothing(graph):
    res = tune(make_model(graph), graph, budget=10 ** 12, **FAST)
    assert not res.compressed and res.plan == Plan.uniform(None)
    assert "no compression" in res.message and res.measured_bytes == res.fp32_bytes
    assert "no compression" in res.table()


def test_max_grad_error_picks_fewest_bytes_meeting_it(graph, tuned_iexact):
    target = tuned_iexact.predicted_error
    res = tune(make_model(graph), graph, max_grad_error=target, **dict(FAST, refine=False, uniform_grid=()))
    assert res.predicted_error <= target
    assert res.measured_bytes == res.predicted_bytes
    with pytest.raises(TuneError, match="cannot be met"):
        tune(make_model(graph), graph, max_grad_error=1e-30, **dict(FAST, uniform_grid=()))


def test_bad_requests_are_one_line_errors(graph):
    with pytest.raises(TuneError, match="exactly one of budget"):
        tune(make_model(graph), graph)
    with pytest.raises(ValueError, match="unknown QuantConfig preset"):
        tune(make_model(graph), graph, budget="int3")


# ----------------------------------------------------------------------------- CLI


def test_cli_tune_end_to_end(tmp_path, capsys):
    out = tmp_path / "tune"
    rc = main(["tune", "--dataset", "synthetic:tiny", "--model", "gcn", "--hidden", "16", "--layers", "2",
               "--budget-config", "int2", "--probe-steps", "0", "--max-candidates", "3",
               "--uniform-configs", "int2,iexact", "--quiet", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "blocks.0" in text and "predicted" in text
    for name in ("plan.json", "tune.json", "tune_table.txt", "pareto.png"):
        assert (out / name).is_file(), name
    with open(out / "pareto.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    plan = Plan.from_json(str(out / "plan.json"))
    doc = json.loads((out / "tune.json").read_text())
    assert doc["measured_bytes"] == doc["predicted_bytes"] == plan.info["measured_bytes"]
    assert set(plan.layers) == {l["name"] for l in doc["layers"]}
    # the bench loads the plan directly
    rc = main(["bench", "--dataset", "synthetic:tiny", "--model", "gcn", "--hidden", "16", "--layers", "2",
               "--epochs", "1", "--seeds", "1", "--configs", f"fp32,{out / 'plan.json'}", "--quiet"])
    assert rc == 0
    assert "plan:" in capsys.readouterr().out


def test_cli_tune_unreachable_budget_exits_2(capsys):
    rc = main(["tune", "--dataset", "synthetic:tiny", "--model", "gcn", "--hidden", "16", "--layers", "2",
               "--budget-bytes-per-node", "0.5", "--probe-steps", "0", "--max-candidates", "2",
               "--uniform-configs", "none", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blockquant: error: budget") and "smallest achievable" in err and "\n" not in err
