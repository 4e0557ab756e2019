"""blockquant.convert / blockquant.summary: module swapping that keeps the user's Parameters."""
import copy
import warnings

import pytest
import torch
from torch import nn

import blockquant
from blockquant import QuantConfig
from blockquant.conversion import ConversionWarning, conversion_info
from blockquant.nn import WRAPPERS, CompressedModule

# ---------------------------------------------------------------------------
# test-local module types with wrappers registered only for these tests, so the
# mechanics are tested independently of the real wrappers


class Scale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return x * self.weight


class Picky(nn.Module):
    def __init__(self, ok=True):
        super().__init__()
        self.ok = ok
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.weight


class QScale(CompressedModule, Scale):
    def forward(self, x):
        return x * self.weight  # the mechanics tests need no compression


class QPicky(CompressedModule, Picky):
    @classmethod
    def unsupported_reason(cls, module):
        return None if module.ok else "ok=False is not supported"


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x + self.w


class SubScale(Scale):
    pass


@pytest.fixture
def toy_wrappers():
    added = {Scale: QScale, Picky: QPicky}
    for orig, wrap in added.items():
        wrap.wraps = orig
    WRAPPERS.update(added)
    yield
    for orig in added:
        WRAPPERS.pop(orig, None)


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(Scale(3), nn.Sequential(Scale(3), nn.Identity()), Picky(ok=True))


# ---------------------------------------------------------------------------


def test_swaps_exact_types_and_reuses_parameters(toy_wrappers):
    model = toy_model()
    params_before = {n: p for n, p in model.named_parameters()}
    buffers_before = {n: b for n, b in model.named_buffers()}
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    out = blockquant.convert(model, QuantConfig.preset("int4"))
    assert out is model
    assert type(model[0]) is QScale and type(model[1][0]) is QScale and type(model[2]) is QPicky
    assert isinstance(model[0], Scale)  # wrappers subclass the original
    assert type(model[1][1]) is nn.Identity
    assert model[0].bq_config == QuantConfig.preset("int4")
    for n, p in model.named_parameters():
        assert p is params_before[n]
    for n, b in model.named_buffers():
        assert b is buffers_before[n]
    sd_after = model.state_dict()
    assert list(sd_after) == list(sd_before)
    for k in sd_before:
        assert torch.equal(sd_after[k], sd_before[k])


def test_checkpoints_load_both_ways(toy_wrappers):
    plain = toy_model()
    ckpt_plain = copy.deepcopy(plain.state_dict())
    converted = blockquant.convert(toy_model())
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1.0)
    converted.load_state_dict(ckpt_plain)  # strict: same keys
    for k, v in converted.state_dict().items():
        assert torch.equal(v, ckpt_plain[k])
    with torch.no_grad():
        converted[0].weight.mul_(3.0)
    fresh = toy_model()
    fresh.load_state_dict(converted.state_dict())
    assert torch.equal(fresh[0].weight, converted[0].weight)


def test_optimizer_built_before_conversion_keeps_working(toy_wrappers):
    model = toy_model()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    blockquant.convert(model)
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (reference, ref_opt)):
        m(x).sum().backward()
        o.step()
    assert not torch.equal(model[0].weight.detach(), before)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q)


def test_per_module_config_by_name_and_type(toy_wrappers):
    model = toy_model()
    int8, int1 = QuantConfig.preset("int8"), QuantConfig.preset("int1")
    blockquant.convert(model, {"1": int8, Picky: int1, "0": None})
    assert type(model[0]) is Scale  # None: left alone
    assert model[1][0].bq_config == int8  # ancestor name applies to the subtree
    assert model[2].bq_config == int1
    info = conversion_info(model)
    assert ("0", "Scale", "excluded by config") in info.skipped


def test_name_beats_type_and_preset_names_work(toy_wrappers):
    model = toy_model()
    blockquant.convert(model, {Scale: "int4", "1.0": "int8"})
    assert model[0].bq_config == QuantConfig.preset("int4")
    assert model[1][0].bq_config == QuantConfig.preset("int8")
    assert model[2].bq_config == QuantConfig.preset("default")


def test_bad_config_arguments_raise_clear_errors(toy_wrappers):
    with pytest.raises(ValueError, match=r"match no submodule.*'1\.0'"):
        blockquant.convert(toy_model(), {"convs.7": QuantConfig()})
    with pytest.raises(TypeError, match="QuantConfig"):
        blockquant.convert(toy_model(), 3)
    with pytest.raises(TypeError, match="mapping keys"):
        blockquant.convert(toy_model(), {3: QuantConfig()})
    with pytest.raises(ValueError, match="unknown QuantConfig preset"):
        blockquant.convert(toy_model(), "int3")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        blockquant.convert("model")
    with pytest.raises(TypeError, match="filter_fn"):
        blockquant.convert(toy_model(), filter_fn=5)


def test_filter_fn_excludes_modules(toy_wrappers):
    model = toy_model()
    seen = []

    def keep(module, name):
        seen.append(name)
        return name != "1.0"

    blockquant.convert(model, filter_fn=keep)
    assert type(model[0]) is QScale and type(model[1][0]) is Scale
    assert "1.0" in seen and "0" in seen
    assert ("1.0", "Scale", "excluded by filter_fn") in conversion_info(model).skipped


def test_unknown_and_refused_modules_are_reported_in_one_warning(toy_wrappers):
    model = nn.Sequential(Scale(3), Unknown(), SubScale(3), Picky(ok=False), nn.Sequential(nn.Identity()))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        blockquant.convert(model)
    ours = [w for w in rec if issubclass(w.category, ConversionWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "1 (Unknown: no blockquant wrapper)" in msg
    assert "2 (SubScale: subclass of Scale" in msg
    assert "3 (Picky: ok=False is not supported)" in msg
    assert "Sequential" not in msg and "Identity" not in msg  # containers are not compute
    assert type(model[3]) is Picky and type(model[1]) is Unknown and type(model[2]) is SubScale
    text = blockquant.summary(model, print_it=False)
    assert "ok=False is not supported" in text and "Unknown" in text


def test_no_warning_when_everything_is_covered(toy_wrappers):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        blockquant.convert(toy_model())


def test_converting_twice_is_harmless(toy_wrappers):
    model = toy_model()
    blockquant.convert(model)
    first = [type(m) for m in model.modules()]
    params = list(model.parameters())
    sd = copy.deepcopy(model.state_dict())
    blockquant.convert(model)
    assert [type(m) for m in model.modules()] == first
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # an explicit new config rebuilds the wrapper around the same parameters
    blockquant.convert(model, "int8")
    assert model[0].bq_config == QuantConfig.preset("int8")
    assert model[0].weight is params[0]
    assert type(model[0]) is QScale  # rebuilt, not wrapped twice


def test_root_module_itself_is_swapped(toy_wrappers):
    root = Scale(3)
    w = root.weight
    out = blockquant.convert(root)
    assert type(out) is QScale and out.weight is w
    assert "QScale" in blockquant.summary(out, print_it=False)


def test_summary_lists_modules_and_configs(toy_wrappers, capsys):
    model = blockquant.convert(toy_model(), {"2": "int8"})
    text = blockquant.summary(model)
    assert text in capsys.readouterr().out
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("1.0 "))
    assert "Scale" in row and "QScale" in row and QuantConfig.preset("default").short() in row
    row2 = next(line for line in lines if line.startswith("2 "))
    assert "int8/G1024" in row2
    assert "3 compressed module(s)" in lines[0]
    assert "has not been called" in blockquant.summary(nn.Linear(2, 2), print_it=False)


def test_gin_mlp_is_converted_inside_the_wrapper():
    from torch_geometric.nn import GINConv

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    model = torch.nn.ModuleDict({"conv": GINConv(mlp)})
    blockquant.convert(model, QuantConfig(bits=2))
    conv = model["conv"]
    assert type(conv).__name__ == "QGINConv"
    assert [type(m).__name__ for m in conv.nn] == ["QLinear", "QReLU", "QLinear"]
    assert conv.nn[0].weight is mlp[0].weight


def _configs(model):
    return {n: (type(m).__name__, m.bq_config if isinstance(m, CompressedModule) else None)
            for n, m in model.named_modules()}


@pytest.mark.parametrize("spec", [{"": "iexact", "norms.0": None}, {"": "iexact", "norms.0.module": "int8"},
                                  {nn.BatchNorm1d: None}, {"": "iexact", "convs.1": None}], ids=str)
def test_converting_a_converted_model_equals_converting_a_fresh_one(spec):
    """Converting again with new configs gives what converting the unconverted model gives, PyG's
    BatchNorm (a wrapper around a BatchNorm1d) included: its inner module follows names and types."""
    from torch_geometric.nn.models import GraphSAGE

    def fresh():
        torch.manual_seed(0)
        return GraphSAGE(8, 8, num_layers=2, out_channels=3, norm="batch_norm")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        again = blockquant.convert(blockquant.convert(fresh(), "int4"), spec)
        direct = blockquant.convert(fresh(), spec)
    assert _configs(again) == _configs(direct)
    inner = dict(direct.named_modules())["norms.0.module"]
    expect = {"norms.0": None, "norms.0.module": QuantConfig.preset("int8")}
    name = next((k for k in spec if isinstance(k, str) and k.startswith("norms")), None)
    if name is not None or nn.BatchNorm1d in spec:
        want = expect.get(name)
        assert (inner.bq_config if isinstance(inner, CompressedModule) else None) == want
    # to_original of the PyG wrapper gives the plain module back, inner BatchNorm1d included
    pyg_bn = dict(blockquant.convert(fresh(), "int4").named_modules())["norms.0"]
    assert type(pyg_bn.to_original().module) is nn.BatchNorm1d


@pytest.mark.parametrize("config,warns", [("iexact", True), ("exact", True), ("int2", False), ("default", False),
                                           ({"": "int2", "convs.1": "iexact"}, True)], ids=str)
def test_random_projection_is_announced(config, warns):
    """A config that projects linear inputs (rp_ratio > 1) costs accuracy at every layer width: convert says so,
    with the way to measure it (noise_report) and the way around it (tune, int2)."""
    from torch_geometric.nn.models import GraphSAGE

    model = GraphSAGE(8, 16, num_layers=2, out_channels=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blockquant.convert(model, config)
    projection = [w for w in caught if issubclass(w.category, blockquant.ProjectionWarning)]
    assert bool(projection) == warns, [str(w.message) for w in caught]
    if warns:
        text = str(projection[0].message)
        assert "noise_report" in text and "blockquant.tune" in text and "'int2'" in text
        assert projection[0].filename == __file__  # points at the caller's convert line


def test_model_inputs_saved_by_reference_fresh_intermediates_compressed():
    """convert() marks the tensors passed to forward as resident: a Linear fed data.x keeps a
    reference (no copy), while dropout(data.x), a fresh tensor without grad_fn, is compressed."""
    import blockquant.nn  # noqa: F401

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 32)
            self.drop = torch.nn.Dropout(0.5)
            self.b = torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.a(x) + self.b(self.drop(x))

    net = blockquant.convert(Net(), QuantConfig(bits=2, block_size=64))
    x = torch.randn(256, 32)
    out = net(x)
    a_node, b_node = out.grad_fn.next_functions[0][0], out.grad_fn.next_functions[1][0]
    assert a_node.bq_state == () and a_node.saved_tensors[0].data_ptr() == x.data_ptr()
    (packed,) = b_node.bq_state
    assert packed.nbytes < x.numel() * 4 / 8
