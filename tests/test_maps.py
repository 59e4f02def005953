import pytest
import torch

from bake.errors import BakeError
from bake.maps import LinearMap, Map, pwl

g = torch.Generator().manual_seed(0)
D = 6


def rnd(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_affine_meaning_and_canonical_form():
    a, b, x = rnd(D), rnd(D), rnd(3, 5, D)
    m = Map("affine", 0.3, {"a": a, "b": b})
    want = 0.7 * x + 0.3 * (a * x + b)
    assert torch.allclose(m(x), want)
    lin = m.to_linear()
    assert torch.allclose(lin.diag, 1 + 0.3 * (a - 1)) and torch.allclose(lin.bias, 0.3 * b)
    assert torch.allclose(x * lin.diag + lin.bias, want)


def test_affine_support_is_identity_outside():
    a, b = torch.full((D,), 2.0, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
    m = Map("affine", 1.0, {"a": a, "b": b, "lo": -torch.ones(D, dtype=torch.float64), "hi": torch.ones(D, dtype=torch.float64)})
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 1.0, 3.0]], dtype=torch.float64)
    assert m(x).tolist() == [[-2.0, 0.0, 1.0, 2.0, 1.0, 3.0]]
    assert not m.foldable and "support" in m.why_not_foldable()


def test_additive_projection_meaning():
    v, x = rnd(D), rnd(4, D)
    assert torch.allclose(Map("additive", 1.5, {"v": v})(x), x + 1.5 * v)
    U, _ = torch.linalg.qr(rnd(D, 2))
    P = Map("projection", 1.0, {"U": U})
    y = P(x)
    assert torch.allclose(y @ U, torch.zeros(4, 2, dtype=torch.float64), atol=1e-12)  # direction removed
    assert torch.allclose(P.to_linear().mat @ x.T, y.T)
    half = Map("projection", 0.5, {"U": U})(x)
    assert torch.allclose(half, x - 0.5 * (x @ U) @ U.T)


def test_pwl_interpolates_and_extrapolates():
    xs = torch.tensor([[0.0, 1.0, 3.0]])
    ys = torch.tensor([[0.0, 2.0, 3.0]])
    x = torch.tensor([[-1.0], [0.5], [2.0], [5.0]])
    assert pwl(x, xs, ys).flatten().tolist() == [-2.0, 1.0, 2.5, 4.0]
    m = Map("monotone-pwl", 0.5, {"xs": xs, "ys": ys})
    assert torch.allclose(m(x), 0.5 * x + 0.5 * pwl(x, xs, ys))


def test_gated_meaning():
    w, x = rnd(D), rnd(5, D)
    c = torch.tensor([0.3], dtype=torch.float64)
    inner = Map("additive", 1.0, {"v": rnd(D)})
    m = Map("gated", 0.8, {"w": w, "c": c}, inner)
    gate = torch.sigmoid(x @ w + 0.3)[:, None]
    assert torch.allclose(m(x), x + 0.8 * gate * inner.tensors["v"])
    assert m.gate(x).shape == (5,) and torch.allclose(m.gate(x), gate[:, 0])
    with pytest.raises(ValueError, match="no gate"):
        inner.gate(x)


def test_unit_dim_for_channel_first_tensors():
    a, b = rnd(D), rnd(D)
    m = Map("affine", 1.0, {"a": a, "b": b})
    x = rnd(2, D, 3, 3)  # [batch, channels, h, w]
    y = m(x, unit_dim=1)
    assert torch.allclose(y, a[None, :, None, None] * x + b[None, :, None, None])


def test_composition_equals_sequence():
    x = rnd(7, D)
    U, _ = torch.linalg.qr(rnd(D, 1))
    maps = [Map("affine", 1.2, {"a": rnd(D), "b": rnd(D)}), Map("additive", 0.4, {"v": rnd(D)}),
            Map("projection", 0.9, {"U": U}), Map("affine", 0.5, {"a": rnd(D), "b": rnd(D)})]
    seq = x
    for m in maps:
        seq = m(seq)
    lin = maps[0].to_linear()
    for m in maps[1:]:
        lin = lin.then(m.to_linear())
    assert not lin.is_diagonal
    assert torch.allclose(x @ lin.dense().T + lin.bias, seq)
    diag_only = maps[0].to_linear().then(maps[1].to_linear())
    assert diag_only.is_diagonal


def test_identity_detection():
    ident = Map("affine", 1.0, {"a": torch.ones(D), "b": torch.zeros(D)}).to_linear()
    assert ident.is_identity
    sparse = Map("affine", 1.0, {"a": torch.tensor([1, 1, 2, 1, 1, 1.0]), "b": torch.tensor([0, 0, 0, 1, 0, 0.0])})
    assert sparse.to_linear().identity_units() == 4
    assert LinearMap(bias=torch.zeros(2, dtype=torch.float64), mat=torch.eye(2, dtype=torch.float64)).is_identity


@pytest.mark.parametrize("kind,tensors,inner,msg", [
    ("affine", {"a": torch.ones(3)}, None, "missing tensor 'b'"),
    ("affine", {"a": torch.ones(3), "b": torch.ones(4)}, None, "shape"),
    ("affine", {"a": torch.ones(3), "b": torch.tensor([0, float("nan"), 0])}, None, "NaN"),
    ("affine", {"a": torch.ones(3), "b": torch.ones(3), "lo": torch.ones(3)}, None, "both 'lo' and 'hi'"),
    ("affine", {"a": torch.ones(3), "b": torch.ones(3), "z": torch.ones(3)}, None, "unexpected"),
    ("projection", {"U": torch.ones(3, 1)}, None, "orthonormal"),
    ("monotone-pwl", {"xs": torch.tensor([[0.0, 0.0]]), "ys": torch.tensor([[0.0, 1.0]])}, None, "increase"),
    ("monotone-pwl", {"xs": torch.tensor([[0.0, 1.0]]), "ys": torch.tensor([[1.0, 0.0]])}, None, "monotone"),
    ("gated", {"w": torch.ones(3), "c": torch.zeros(1)}, None, "inner"),
    ("bogus", {}, None, "unknown map kind"),
])
def test_validation_names_the_field(kind, tensors, inner, msg):
    with pytest.raises(BakeError, match=msg) as e:
        Map(kind, 1.0, tensors, inner).validate("spec.sites[0].maps[0]")
    assert str(e.value).startswith("spec.sites[0].maps[0]")


def test_every_registered_kind_round_trips():
    """Each kind's example validates; a foldable one's fold y = M x + b, applied by hand in float64,
    is the map itself; the others say why not and become an op of the inserted module, except `units`,
    which reads the MLP's input (a Context) and folds by growing the MLP (tests/test_units.py)."""
    from bake import modules
    from bake.maps import FOLDABLE, KINDS, MAP_KINDS, Context
    from bake.templates import modeling_bake as tpl

    assert list(KINDS) == list(MAP_KINDS) == ["affine", "additive", "projection", "monotone-pwl", "gated", "units"]
    assert FOLDABLE == ("affine", "additive", "projection")
    x = rnd(4, 3, D)
    for name, kind in MAP_KINDS.items():
        m = kind.example(D, torch.Generator().manual_seed(1))
        assert m.kind == name and m.impl is kind and KINDS[name] == (kind.need, kind.optional)
        m.validate(f"example[{name}]")
        if m.needs_context:
            with pytest.raises(ValueError, match="Context"):
                m(x)
            z = rnd(4, 3, D)
            y = m(x, ctx=Context(z, torch.nn.functional.silu))
            t = m.tensors  # x + λ·D(silu(G z) ⊙ U z), by hand
            want = x + m.strength * (torch.nn.functional.silu(z @ t["gate"].double().T) * (z @ t["up"].double().T)) @ t["down"].double().T
            assert torch.allclose(y, want, rtol=0, atol=1e-12) and not torch.allclose(y, x)
            continue
        assert m.units == D and m(x).shape == x.shape and torch.isfinite(m(x)).all()
        assert m.foldable == (name in FOLDABLE) and (m.why_not_foldable() == "") == m.foldable
        if m.foldable:
            lin = m.to_linear()
            assert torch.allclose(x @ lin.dense().T + lin.bias, m(x), rtol=0, atol=1e-12)
        else:
            with pytest.raises(ValueError, match="not foldable"):
                m.to_linear()
            op, _ = modules._op(m)
            assert op["op"] in tpl.OPS


def test_unknown_kind_keeps_its_error():
    m = Map("bogus", 1.0, {})
    with pytest.raises(BakeError) as e:
        m.validate("spec.sites[0].maps[0]")
    assert str(e.value) == ("spec.sites[0].maps[0].kind: unknown map kind 'bogus' "
                            "(known: affine, additive, projection, monotone-pwl, gated, units)")
    assert not m.foldable and not m.has_support and m.why_not_foldable() == "" and m.diagonal_step() is None
    with pytest.raises(ValueError, match="bogus map is not foldable"):
        m.to_linear()
    with pytest.raises(ValueError, match="bogus map has no gate"):
        m.gate(rnd(2, D))
