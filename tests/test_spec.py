"""The spec format: round trip, and every malformed input gives one BakeError naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bake.errors import BakeError
from bake.maps import Map
from bake.spec import Spec, read, write


def sample_spec() -> Spec:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(8, 2, generator=g))
    inner = Map("affine", 1.0, {"a": torch.rand(8, generator=g), "b": torch.rand(8, generator=g)})
    return Spec([
        ("m.layers.0.norm:output", [Map("affine", 0.5, {"a": torch.rand(8, generator=g), "b": torch.rand(8, generator=g)}),
                                    Map("projection", 1.0, {"U": U})]),
        ("m.layers.0.proj:input", [Map("affine", 1.0, {"a": torch.ones(8), "b": torch.zeros(8),
                                                       "lo": -torch.ones(8), "hi": torch.ones(8)})]),
        ("m.layers.1:output", [Map("additive", 2.0, {"v": torch.rand(8, generator=g)})]),
        ("m.layers.1.x:output", [Map("monotone-pwl", 1.0, {"xs": torch.arange(16.0).reshape(8, 2),
                                                           "ys": torch.arange(16.0).reshape(8, 2) * 2})]),
        ("m.layers.1.y:output", [Map("gated", 0.7, {"w": torch.rand(8, generator=g), "c": torch.tensor([0.1])}, inner)]),
    ], method="manual", params={"k": 1}, provenance={"note": "test"}, model={"model_type": "llama"})


def test_round_trip_every_kind(tmp_path):
    spec = sample_spec()
    write(spec, tmp_path / "s.json")
    back = read(tmp_path / "s.json")
    assert back.site_names == spec.site_names and back.method == "manual" and back.params == {"k": 1}
    for (_, m1), (_, m2) in zip(spec.sites, back.sites):
        for a, b in zip(m1, m2):
            assert a.kind == b.kind and a.strength == b.strength
            assert a.tensors.keys() == b.tensors.keys()
            assert all(torch.equal(a.tensors[k].float(), b.tensors[k]) for k in a.tensors)
    gated = back.sites[4][1][0]
    assert gated.inner.kind == "affine"
    assert len(back.sha256()) == 64


def edit(tmp_path, fn_json=None, fn_tensors=None):
    write(sample_spec(), tmp_path / "s.json")
    if fn_json:
        doc = json.loads((tmp_path / "s.json").read_text())
        fn_json(doc)
        (tmp_path / "s.json").write_text(json.dumps(doc))
    if fn_tensors:
        t = load_file(str(tmp_path / "s.safetensors"))
        fn_tensors(t)
        save_file(t, str(tmp_path / "s.safetensors"))
    return tmp_path / "s.json"


def nan_b(t):
    t["s0.m0.b"][2] = float("nan")


def inf_v(t):
    t["s2.m0.v"][0] = float("inf")


CASES = [
    (lambda d: d.update(format="other"), None, "spec.format"),
    (lambda d: d.update(version=9), None, "spec.version"),
    (lambda d: d.update(extra=1), None, "unknown field"),
    (lambda d: d.update(tensors="../elsewhere.safetensors"), None, "spec.tensors"),
    (lambda d: d.update(tensors="/etc/passwd"), None, "spec.tensors"),
    (lambda d: d.update(sites=[]), None, "spec.sites"),
    (lambda d: d["sites"][0].update(site="no-side"), None, r"spec.sites\[0\].site"),
    (lambda d: d["sites"].append(d["sites"][0]), None, "appears twice"),
    (lambda d: d["sites"][0]["maps"][0].update(kind="rotate"), None, r"spec.sites\[0\].maps\[0\].kind"),
    (lambda d: d["sites"][0]["maps"][0].update(strength="big"), None, r"maps\[0\].strength"),
    (lambda d: d["sites"][0]["maps"][0]["tensors"].update(b="nope"), None, "not in the tensor file"),
    (lambda d: d["sites"][2]["maps"][0]["tensors"].pop("v"), None, "missing tensor 'v'"),
    (None, nan_b, "NaN or Inf"),
    (None, inf_v, "NaN or Inf"),
    (None, lambda t: t.update(stray=torch.zeros(1)), "unreferenced"),
    (None, lambda t: t.update({"s0.m0.a": torch.ones(5)}), "shape"),
]


@pytest.mark.parametrize("fj,ft,msg", CASES)
def test_bad_specs_are_refused_with_the_field(tmp_path, fj, ft, msg):
    path = edit(tmp_path, fj, ft)
    with pytest.raises(BakeError, match=msg):
        read(path)


def test_truncated_files(tmp_path):
    path = edit(tmp_path)
    full = path.read_text()
    path.write_text(full[: len(full) // 2])
    with pytest.raises(BakeError, match="not valid JSON"):
        read(path)
    path.write_text(full)
    tpath = tmp_path / "s.safetensors"
    tpath.write_bytes(tpath.read_bytes()[:100])
    with pytest.raises(BakeError, match="not a readable safetensors"):
        read(path)
    tpath.unlink()
    with pytest.raises(BakeError, match="not found"):
        read(path)
    with pytest.raises(BakeError, match="no such file"):
        read(tmp_path / "absent.json")


def test_write_is_atomic_and_json_only(tmp_path):
    with pytest.raises(BakeError, match=".json"):
        write(sample_spec(), tmp_path / "s.txt")
    write(sample_spec(), tmp_path / "s.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
