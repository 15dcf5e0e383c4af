"""Issue 30, the losses at the cost of their arithmetic: the operator count, the rewritten losses
against the implementation they replace (frozen in ``launch_bound_old.py``) and against their
straightforward references, the all-level masks against the level-by-level ones, and
``MODEL.DISTILL.COMPILE``. Nothing here is timed."""
import json

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

import launch_bound_old as old
from csgr_distill.benchmark import kernels
from csgr_distill.benchmark.dispatch import aten_ops, count_aten_ops, leaf_aten_ops, loss_step
from csgr_distill.distillers import DISTILLER_REGISTRY, build_distillers, registry
from csgr_distill.distillers.fgd import fgd_masks_levels
from csgr_distill.distillers.ld import vlr_regions
from csgr_distill.config import add_distill_config
from csgr_distill.distillers.tar import gaussian_masks_levels
from csgr_distill.outputs import DetectorOutputs
from csgr_distill.records import DetectorSpec

# the kernels benchmark's feature inputs at the size the operator count is taken at
HEIGHT, WIDTH = 512, 640
#: relative (the largest absolute difference over the largest absolute value), in float64: the
#: rewrites reorder float sums, and in float32 that reordering alone moved CSGR's gradient by
#: 1.0e-6 on one CPU and 3.7e-6 on another (Intel Xeon, AMD EPYC: other BLAS kernels), so a
#: float32 tolerance would measure the host; in float64 both stay below 1e-13
TOL = 1e-10
#: FGD's and TAR's box masks are float32 by design, whatever the features' dtype (both forms
#: build them with float32 operations, in another order): measured 2.1e-7 (TAR) and 9.5e-9
#: (FGD against its reference) in float64, so these two labels compare to this
MASK_TOL = 1e-6
FLOAT32_MASKS = ("FGD", "TAR (feature term)")

#: parameters whose exact gradient is 0 (a constant added to every logit of a softmax, or a
#: bias that cancels in a difference): the rewrite returns 0, autograd its rounding noise
ZERO_GRADIENT = {"CSGR": ("cca.key.bias", "cca.value.bias"),
                 "CSGR teacher_head": ("cca.key.bias", "cca.value.bias"),
                 "CSGR recurrence 2": ("cca.key.bias",),  # b_v acts in the first pass
                 "FGD": ("context.bias",)}

#: label -> the frozen implementation it replaces
OLD = {
    "CSGR": lambda d, s, t, g: old.csgr_losses(d, s, t),
    "CSGR teacher_head": lambda d, s, t, g: old.csgr_losses(d, s, t),
    "CSGR recurrence 2": lambda d, s, t, g: old.csgr_losses(d, s, t),
    "FGD": old.fgd_losses,
    "PKD": lambda d, s, t, g: old.pkd_losses(d, s, t),
    "MIMIC": lambda d, s, t, g: old.mimic_losses(d, s, t),
    "TAR (feature term)": old.tar_feature_losses,
    "KD": old.kd_losses,
}


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: the summation order of the float32 operator counts and masks is then
    fixed (the float32 gradient of the replaced CSGR moves by 1.2e-5, relative, from one thread
    to two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _run(case, fn):
    """Losses (a vector, sorted by name), the student's gradient and every parameter's."""
    losses = loss_step(case.distiller, fn, case.leaves)()
    grad = torch.cat([(v.grad if v.grad is not None else torch.zeros_like(v)).flatten()
                      for v in case.leaves])
    params = {n: p.grad.clone() for n, p in case.distiller.named_parameters()}
    return (torch.stack([losses[k].detach() for k in sorted(losses)]).double(), grad.double(),
            params, sorted(losses))


def _case(label, dtype=torch.float32):
    """The kernels benchmark's case of ``label`` and its records, in ``dtype``: the distiller's
    parameters, every floating tensor of the two records (the student's leaves among them) and
    the ground-truth boxes (the masks built from them)."""
    (case,) = kernels.loss_cases("cpu", HEIGHT, WIDTH, 2, 256, methods=[label])
    cells = dict(zip(case.ours.__code__.co_freevars, (c.cell_contents for c in
                                                       case.ours.__closure__)))
    if dtype != torch.float32:
        case.distiller.to(dtype)
        for rec in (cells["s_rec"], cells["t_rec"]):
            for value in vars(rec).values():
                _cast(value, dtype)
        for instances in cells["gt_rec"] or ():
            for field in instances.get_fields().values():
                _cast(getattr(field, "tensor", field), dtype)
    return case, cells["s_rec"], cells["t_rec"], cells["gt_rec"]


def _cast(value, dtype):
    """Casts the floating tensors in ``value`` (a tensor, or a dict / list / tuple of them) in
    place (``.data``: the records and the case's leaves hold the same tensor objects)."""
    if torch.is_tensor(value) and value.is_floating_point():
        value.data = value.data.to(dtype)
    elif isinstance(value, dict):
        for v in value.values():
            _cast(v, dtype)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _cast(v, dtype)


@pytest.mark.parametrize("label", sorted(OLD))
def test_rewritten_loss_equals_the_implementation_it_replaces(label):
    case, s_rec, t_rec, gt = _case(label, torch.float64)
    assert all(v.dtype == torch.float64 for v in case.leaves)
    new = _run(case, case.ours)
    before = _run(case, lambda: OLD[label](case.distiller, s_rec, t_rec, gt))
    tol = MASK_TOL if label in FLOAT32_MASKS else TOL
    assert new[3] == before[3]  # the same loss names
    assert _rel(new[0], before[0]) <= tol, label
    assert _rel(new[1], before[1]) <= tol, label
    # every parameter: all of them as one vector to TOL, each one to 10 TOL (a scalar such as
    # gamma is one long sum, reordered), those with an exact zero gradient exactly 0 now
    zero = ZERO_GRADIENT.get(label, ())
    names = [n for n in new[2] if not n.endswith(zero)]
    if names:
        assert _rel(torch.cat([new[2][n].flatten() for n in names]),
                    torch.cat([before[2][n].flatten() for n in names])) <= tol, label
    scale = max((float(g.abs().max()) for g in before[2].values()), default=0.0)
    for name, g in new[2].items():
        if zero and name.endswith(zero):
            assert torch.count_nonzero(g) == 0, name
            assert float(before[2][name].abs().max()) <= 1e-4 * scale, name  # noise
        else:
            assert _rel(g, before[2][name]) <= 10 * tol, (label, name)


@pytest.mark.parametrize("label", ["CSGR", "CSGR recurrence 2", "FGD", "PKD",
                                   "TAR (feature term)", "KD"])
def test_rewritten_loss_meets_its_straightforward_reference(label):
    """The same losses and gradients as the formula written plainly, in float64."""
    case, *_ = _case(label, torch.float64)
    tol = MASK_TOL if label in FLOAT32_MASKS else TOL
    new, ref = _run(case, case.ours), _run(case, case.reference)
    assert _rel(new[0], ref[0]) <= tol and _rel(new[1], ref[1]) <= tol


def test_rewritten_losses_dispatch_fewer_operators_than_before():
    """Not a target (tools/benchmark.py measures those): each rewritten loss dispatches fewer
    ATen operators per forward + backward than the implementation it replaces."""
    for label in ("CSGR", "FGD", "PKD", "TAR (feature term)"):
        case, s_rec, t_rec, gt = _case(label)
        ours = count_aten_ops(loss_step(case.distiller, case.ours, case.leaves))
        before = count_aten_ops(loss_step(
            case.distiller, lambda: OLD[label](case.distiller, s_rec, t_rec, gt), case.leaves))
        assert ours < 0.7 * before, (label, ours, before)


# ---------------------------------------------------------------------------------------------
# the measure
# ---------------------------------------------------------------------------------------------
def test_operator_count_counts_leaf_aten_operators_once():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert leaf_aten_ops(lambda: torch.add(a, b)) == {"aten::add": 1}
    # a composite operator is counted through the leaves it dispatches, not itself
    composite = leaf_aten_ops(lambda: torch.nn.functional.linear(a, b))
    assert "aten::linear" not in composite and "aten::matmul" not in composite
    assert sum(composite.values()) == count_aten_ops(lambda: torch.nn.functional.linear(a, b))
    # the backward's operators are counted, the autograd engine's own ranges are not
    x, y = torch.randn(3, requires_grad=True), torch.randn(3)
    counts = leaf_aten_ops(lambda: (x * y).sum().backward())
    assert not [k for k in counts if not k.startswith("aten::")]
    assert counts["aten::mul"] >= 2  # the forward's and its backward's
    # "compute": the operators that do work, whatever views they dispatch below them
    m1, m2 = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    bmm = aten_ops(lambda: torch.bmm(m1, m2.transpose(1, 2).transpose(1, 2)))
    assert dict(bmm.compute) == {"aten::bmm": 1}
    assert "aten::bmm" not in bmm.leaves and bmm.leaves["aten::resolve_conj"] == 2


def test_kernels_has_the_operator_column(tmp_path):
    kernels.run(str(tmp_path), height=64, width=96, batch=2, channels=16, num_classes=3,
                repeats=1, warmup=0, command="test", methods=["CSGR", "MIMIC"])
    data = json.loads((tmp_path / "kernels.json").read_text())["cpu"]
    rows = {r["method"]: r for r in data["rows"]}
    for label in ("CSGR", "MIMIC"):
        assert rows[label]["ours_ops"] > 0 and rows[label]["reference_ops"] > 0
    assert rows["CSGR"]["ours_ops"] < rows["CSGR"]["reference_ops"]
    md = (tmp_path / "kernels.md").read_text()
    assert "aten ops ours (fwd+bwd)" in md and "leaf aten:: operators" in md


def test_kernels_ops_command_prints_every_requested_row(capsys):
    assert kernels.main(["ops", "--height", "64", "--width", "96", "--channels", "16",
                         "--methods", "MIMIC", "TAR (feature term)"]) == 0
    out = capsys.readouterr().out
    assert "| MIMIC | p3-p7 maps |" in out and "| TAR (feature term) | p3-p7 maps |" in out


# ---------------------------------------------------------------------------------------------
# masks and regions of all levels at once, against the level-by-level code
# ---------------------------------------------------------------------------------------------
GRIDS = [(64, 80), (32, 40), (16, 20), (8, 10), (4, 5)]


def _boxes(seed, counts, size=(512, 640)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in counts:
        wh = (torch.rand(c, 2, generator=g) * 0.6 + 0.01) * torch.tensor([size[1], size[0]])
        xy = torch.rand(c, 2, generator=g) * torch.tensor([size[1], size[0]]) - wh / 4
        out.append(torch.cat([xy, xy + wh], 1))
    # a box on the right and bottom border, a degenerate one
    out[0] = torch.cat([out[0], torch.tensor([[600.0, 480, 640, 512], [100, 100, 100, 140]])])
    return out


@pytest.mark.parametrize("chunk", [None, 200])
def test_gaussian_masks_of_all_levels_are_the_level_by_level_ones(monkeypatch, chunk):
    if chunk:  # several groups of images: the same masks
        monkeypatch.setattr("csgr_distill.distillers.level_pairs.MASK_CHUNK", chunk * 6820)
    boxes = _boxes(0, [7, 0, 300])
    masks = gaussian_masks_levels(boxes, GRIDS, (512, 640), 0.4)
    for grid, mask in zip(GRIDS, masks):
        assert torch.equal(mask, old.gaussian_masks(boxes, grid, (512, 640), 0.4))


@pytest.mark.parametrize("scaling", ["padded", "unpadded"])
def test_fgd_masks_of_all_levels_are_the_level_by_level_ones(scaling):
    boxes = _boxes(1, [9, 0, 4])
    sizes = [(512, 640), (400, 640), (512, 500)]
    masks = fgd_masks_levels(boxes, GRIDS, sizes, (512, 640), scaling)
    for grid, both in zip(GRIDS, masks):
        fg, bg = old.fgd_masks(boxes, grid, sizes, (512, 640), scaling)
        assert torch.equal(both[0], fg) and torch.equal(both[1], bg)


@pytest.mark.parametrize("diou", ["paper", "released"])
def test_vlr_regions_of_all_images_are_the_image_by_image_ones(diou):
    anchors = []
    for stride, (h, w) in zip((8, 16, 32, 64, 128), GRIDS):
        ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
        centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float() + stride / 2
        sizes = stride * torch.tensor([[4.0, 4.0], [5.6, 2.8], [2.8, 5.6]])
        anchors.append(torch.cat([centres - sizes / 2, centres + sizes / 2], -1).reshape(-1, 4))
    boxes = _boxes(3, [6, 0, 11])
    region, iou = vlr_regions(anchors, boxes, 9, 0.25, diou)
    for i, b in enumerate(boxes):
        r, v = old.vlr_region(anchors, b, 9, 0.25, diou)
        assert torch.equal(region[i], r) and torch.equal(iou[i], v)
    assert region[1].sum() == 0 and region[0].any()


# ---------------------------------------------------------------------------------------------
# MODEL.DISTILL.COMPILE
# ---------------------------------------------------------------------------------------------
def _mimic_cfg(compile_mode):
    cfg = add_distill_config(get_cfg())
    cfg.MODEL.DISTILL.METHODS = ["MIMIC"]
    cfg.MODEL.DISTILL.MIMIC.IN_FEATURES = ["p3", "p4"]
    cfg.MODEL.DISTILL.COMPILE = compile_mode
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _specs(cfg):
    shapes = {k: ShapeSpec(channels=8, stride=s) for k, s in (("p3", 8), ("p4", 16))}
    return DetectorSpec.from_shapes(cfg, shapes), DetectorSpec.from_shapes(cfg, shapes)


def test_compile_is_off_by_default_and_refuses_a_machine_where_it_cannot_work(monkeypatch):
    cfg = _mimic_cfg("")
    built = build_distillers(cfg, *_specs(cfg))
    assert not hasattr(built["MIMIC"], "_compiled_call_impl") or \
        built["MIMIC"]._compiled_call_impl is None
    monkeypatch.setattr(registry, "_compile_problem",
                        lambda device: "InvalidCxxCompiler: No working C++ compiler found")
    cfg = _mimic_cfg("default")
    with pytest.raises(ValueError, match=r"^MODEL.DISTILL.COMPILE 'default': torch.compile does "
                                         r"not work on this machine \(InvalidCxxCompiler"):
        build_distillers(cfg, *_specs(cfg))
    cfg = _mimic_cfg("fast")
    with pytest.raises(ValueError, match="MODEL.DISTILL.COMPILE is 'fast'; use one of"):
        build_distillers(cfg, *_specs(cfg))


def test_compiled_distiller_gives_the_eager_losses_and_keeps_its_state_dict():
    cfg = _mimic_cfg("default")
    try:
        built = build_distillers(cfg, *_specs(cfg))
    except ValueError as e:  # a machine without a compiler: the refusal is what is tested
        pytest.skip(str(e))
    compiled = built["MIMIC"]
    eager = DISTILLER_REGISTRY.get("MIMIC")(cfg, *_specs(cfg))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for h, w in ((8, 10), (6, 10)):  # two sizes: compiled once each at most
        feats = {k: torch.randn(2, 8, h // s, w // s) for k, s in (("p3", 1), ("p4", 2))}
        teach = {k: torch.randn_like(v) for k, v in feats.items()}
        rec = [DetectorOutputs("f", [(8 * h, 8 * w)] * 2, (8 * h, 8 * w), features=f)
               for f in (feats, teach)]
        a, b = compiled(*rec, None), eager(*rec, None)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-6, atol=0)


def test_state_dict_keys_do_not_change():
    """Checkpoint compatibility: the keys of the rewritten methods' modules are those of the
    implementation they replace (bf14bdf), listed here for one level."""
    csgr = kernels._build("CSGR", ["MODEL.DISTILL.METHODS", ["CSGR"]], 16, 3, "cpu")
    assert sorted(k for k in csgr.state_dict() if ".p3." in k) == [
        "levels.p3.cca.gamma", "levels.p3.cca.key.bias", "levels.p3.cca.key.weight",
        "levels.p3.cca.query.bias", "levels.p3.cca.query.weight", "levels.p3.cca.value.bias",
        "levels.p3.cca.value.weight", "levels.p3.classifier.weight"]
    fgd = kernels._build("FGD", ["MODEL.DISTILL.METHODS", ["FGD"]], 16, 3, "cpu")
    assert sorted(k for k in fgd.state_dict() if k.startswith("student_context.p3.")) == [
        f"student_context.p3.{k}" for k in (
            "context.bias", "context.weight", "transform.0.bias", "transform.0.weight",
            "transform.1.bias", "transform.1.weight", "transform.3.bias", "transform.3.weight")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_constants_compute_what_python_numbers_compute(dtype):
    """``x op constant(v, x)`` is ``x op v`` bit for bit, result type included (the number
    rounded to the type the operation computes in, as a Python number is), one tensor per value
    and type, and with one operator less on the CPU."""
    from csgr_distill.layers.constants import constant
    torch.manual_seed(0)
    x = (torch.randn(3, 7) * 100).to(dtype)
    for v in (0.1, 1 / 3, 2.0, 1e-6, 10241, 3.4e38 if dtype != torch.float16 else 6e4):
        c = constant(v, x)
        assert c.dim() == 0 and c.device.type == "cpu"
        assert c.dtype == (dtype if dtype in (torch.float32, torch.float64) else torch.float32)
        assert constant(v, x) is c
        for op in (torch.mul, torch.div, torch.add, torch.sub):
            assert op(x, c).dtype == dtype and torch.equal(op(x, c), op(x, v)), (op, v)
    if dtype == torch.float32:
        assert (count_aten_ops(lambda: x * constant(0.5, x))
                < count_aten_ops(lambda: x * 0.5))


def test_fgd_level_makes_its_weight_tensor_once_not_every_step():
    """FGD's four loss weights are one cached tensor per (weights, dtype, device): a step after
    the first builds no tensor from Python numbers (on a GPU each would be a host-to-device
    copy per level and step); the losses are the weights times the terms either way."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from csgr_distill.layers.fgd_level import fgd_level_losses
    from csgr_distill.layers.gc_block import GlobalContextBlock

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    s = torch.randn(2, 8, 5, 6, requires_grad=True)
    t = torch.randn(2, 8, 5, 6)
    masks = torch.rand(2, 2, 5, 6)
    blocks = [GlobalContextBlock(8), GlobalContextBlock(8)]
    weights = [2e-5, 1e-6, 5e-7, 3e-4]
    sum(fgd_level_losses(s, t, masks, *blocks, 0.5, weights)).backward()  # the first makes them
    with Record() as record:
        losses = fgd_level_losses(s, t, masks, *blocks, 0.5, weights)
        sum(losses).backward()
    assert not [n for n in record.names if n.startswith("lift_fresh")], record.names
    from csgr_distill.layers.constants import constant_vector
    vector = constant_vector(weights, s)
    assert vector is constant_vector(weights, s) and vector.dtype == s.dtype
    assert torch.equal(vector, torch.tensor(weights, dtype=s.dtype))
    with torch.no_grad():
        unweighted = fgd_level_losses(s, t, masks, *blocks, 0.5, [1.0] * 4)
    for loss, term, w in zip(losses, unweighted, vector):
        assert torch.equal(loss.detach(), term * w)
