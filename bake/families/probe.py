"""Families derived from the model: for a decoder whose model_type has no table, one forward pass
with recording hooks finds what a table would say.

On a short input, every module of the first decoder layer records the tensors it reads and writes:

- **norms** (a module whose class name says Norm, with a weight over the hidden units) and the Linear
  modules that read each norm's output: the very same tensor object, so a reshape in between (q/k
  norms over heads) is not a consumer;
- **residual writers**: a Linear or norm output o with two recorded hidden-state tensors a (before it)
  and b (after it) such that b = a + o, decided numerically. The layer's last writer is the one
  whose b is the layer's output; an additive map on the layer output folds into its bias;
- the **norm convention**, numerically: a norm with its weight set to 0 that still passes x on
  scales by 1 + w (Gemma), else by w;
- **bias groups**: each boolean config flag with "bias" in its name, turned on in a copy of the
  config built on the meta device, gives the Linear modules it adds biases to.

Everything else of a table (presets) follows from these. What the probe cannot decide it leaves out:
a Linear or norm not found to write the residual stream is not a writer, a norm with no consumer
takes only a scale, so a map that would need more is refused or kept as an inserted module, never
folded wrongly; and every bake is verified against the hooked reference as for any family.
"""

from __future__ import annotations

import copy
import weakref

import torch

from ..errors import BakeError
from .table import Adapter, BiasGroup, Norm

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_norm(mod: torch.nn.Module, hidden: int) -> bool:
    w = getattr(mod, "weight", None)
    return "norm" in type(mod).__name__.lower() and isinstance(w, torch.Tensor) and tuple(w.shape) == (hidden,)


def layers_path(model: torch.nn.Module, n: int) -> str:
    """The ModuleList holding the `n` decoder layers."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name:
            return name
    raise BakeError(f"--model: {model.config.model_type}: bake's probe finds no list of {n} decoder layers")


def record(model: torch.nn.Module, layer: torch.nn.Module, hidden: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """One forward pass: [(relative name, module, input, output)] of layer 0's Linear and norm modules in
    call order, and the layer's input and output hidden states."""
    calls, ends = [], {}
    hooks = []
    for name, mod in layer.named_modules():
        if name and (isinstance(mod, torch.nn.Linear) or is_norm(mod, hidden)):
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, name=name: calls.append((name, m, a[0] if a else None, o))))
    hooks.append(layer.register_forward_hook(
        lambda m, a, kw, o: ends.update(x=a[0] if a else kw.get("hidden_states"), y=o[0] if isinstance(o, tuple)
                                        else o), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]]))
    finally:
        for h in hooks:
            h.remove()
    if "y" not in ends:
        raise BakeError(f"--model: {model.config.model_type}: the probe's forward pass never reached layer 0")
    return calls, ends["x"], ends["y"]


def writers(calls: list, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, bool]]:
    """(name, is last) of every module whose output o satisfies b = a + o for hidden states a, b."""
    states = [x] + [t for _, _, i, o in calls for t in (i, o) if isinstance(t, torch.Tensor)] + [y]
    states = [s for s in states if s.shape == y.shape]
    out = []
    for name, _, _, o in calls:
        if not isinstance(o, torch.Tensor) or o.shape != y.shape:
            continue
        for a in states:
            for b in states:
                if a is not o and b is not o and a is not b and torch.allclose(b, a + o, rtol=1e-5, atol=1e-6):
                    out.append((name, b is y))
                    break
            else:
                continue
            break
    return out


def norm_offset(norms: list[torch.nn.Module], model_type: str) -> float:
    """0 if norms scale by w, 1 if by 1 + w (decided on each norm with its weight zeroed)."""
    offsets = set()
    for mod in norms:
        twin = copy.deepcopy(mod)
        with torch.no_grad():
            twin.weight.zero_()
            if getattr(twin, "bias", None) is not None:
                twin.bias.zero_()
            out = twin(torch.randn(2, 3, mod.weight.shape[0]))
        offsets.add(0.0 if bool((out.abs() < 1e-6).all()) else 1.0)
    if len(offsets) > 1:
        raise BakeError(f"--model: {model_type}: its norms scale by w and by 1 + w both; bake's probe cannot "
                        f"name one convention")
    return offsets.pop() if offsets else 0.0


def bias_groups(model: torch.nn.Module, prefix: str, linears: list[str]) -> tuple[BiasGroup, ...]:
    """Each boolean config flag naming a bias, with the layer-0 Linear modules it gives a bias."""
    cfg = model.config
    groups = []
    for flag, value in sorted(cfg.to_dict().items()):
        if "bias" not in flag or not isinstance(value, bool) or value:
            continue
        try:
            twin_cfg = copy.deepcopy(cfg)
            setattr(twin_cfg, flag, True)
            with torch.device("meta"):
                twin = type(model)(twin_cfg)
        except Exception:  # noqa: BLE001 - a flag this class does not build with: not a bias group
            continue
        layer = twin.get_submodule(f"{prefix}.0")
        gained = tuple(n for n in linears if layer.get_submodule(n).bias is not None
                       and model.get_submodule(f"{prefix}.0.{n}").bias is None)
        if gained:
            groups.append(BiasGroup(flag, gained))
    return tuple(groups)


def final_norm(model: torch.nn.Module, prefix: str, hidden: int) -> str | None:
    """The norm module (with a weight) outside the layers that runs last, before the head; None if none."""
    order = []
    hooks = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in model.named_modules()
             if n and not n.startswith(prefix + ".") and is_norm(m, hidden)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def derive(model: torch.nn.Module) -> Adapter:
    """A family table for `model`, found by the probe (cached per model object)."""
    if model in _CACHE:
        return _CACHE[model]
    cfg = model.config
    mt = cfg.model_type
    hidden, n = getattr(cfg, "hidden_size", None), getattr(cfg, "num_hidden_layers", None)
    if not isinstance(hidden, int) or not isinstance(n, int):
        raise BakeError(f"--model: {mt}: bake's probe needs hidden_size and num_hidden_layers in the config")
    if any(p.is_meta for p in model.parameters()):
        raise BakeError(f"--model: {mt} has no family table, and bake's probe runs the model: it cannot stream "
                        f"(drop --stream; the probe needs the model loaded)")
    prefix = layers_path(model, n)
    layer = model.get_submodule(f"{prefix}.0")
    calls, x, y = record(model, layer, hidden)
    _same_layers(model, prefix, n, mt)
    adapter = _table(model, mt, prefix, calls, x, y, hidden)
    _CACHE[model] = adapter
    return adapter


def _same_layers(model: torch.nn.Module, prefix: str, n: int, mt: str) -> None:
    names0 = [k for k, _ in model.get_submodule(f"{prefix}.0").named_parameters()]
    for i in range(1, n):
        if [k for k, _ in model.get_submodule(f"{prefix}.{i}").named_parameters()] != names0:
            raise BakeError(f"--model: {mt}: layer {i} is built unlike layer 0 (a hybrid); bake's probe reads "
                            f"every layer as layer 0, so it has no table for this model yet")


def _table(model, mt: str, prefix: str, calls: list, x, y, hidden: int) -> Adapter:
    """The Adapter fields from one recorded layer."""
    order = list(dict.fromkeys(name for name, *_ in calls))  # call order, each module once
    linears = [nm for nm in order if isinstance(model.get_submodule(f"{prefix}.0.{nm}"), torch.nn.Linear)]
    reads = {}
    for name, mod, inp, _ in calls:
        if isinstance(mod, torch.nn.Linear) and inp is not None:
            reads.setdefault(id(inp), []).append(name)
    if _routed(calls, x):  # experts read gathered rows of a norm's output, not the tensor: unseen readers
        reads = {}
    graph, norms = [], []
    for name in order:
        mod = model.get_submodule(f"{prefix}.0.{name}")
        if name in linears:
            graph.append(name)
        else:
            out = next(o for nm, _, _, o in calls if nm == name)
            graph.append(Norm(name, tuple(dict.fromkeys(reads.get(id(out), [])))))
            norms.append(mod)
    found = writers(calls, x, y)
    last = next((nm for nm, is_last in found if is_last), None)
    writer = last if last in linears else None
    anchor = f"{last}.weight" if last else f"{linears[-1]}.weight"
    linear_writers = [nm for nm, _ in found if nm in linears]
    return Adapter(family=mt, model_types=(mt,), presets=_presets(prefix, graph, linear_writers, writer),
                   bias_groups=bias_groups(model, prefix, linears), norm_weight_offset=norm_offset(norms, mt),
                   final_norm=final_norm(model, prefix, hidden), layers=prefix, graph=tuple(graph),
                   residual_writer=writer, residual_anchor=anchor, onnx="not checked for probed families yet",
                   about="derived by bake's probe (no family table)")


def _routed(calls: list, x: torch.Tensor) -> bool:
    """A mixture of experts: some Linear reads fewer tokens than the layer (a router's pick). Its norm's
    other readers are then invisible to tensor identity, so no norm gets consumers (scales still fold)."""
    tokens = x.numel() // x.shape[-1]
    return any(isinstance(m, torch.nn.Linear) and isinstance(i, torch.Tensor) and i.numel() // i.shape[-1] < tokens
               for _, m, i, _ in calls)


def _presets(prefix: str, graph: list, linear_writers: list[str], writer: str | None) -> dict:
    at = lambda rel: f"{prefix}.*.{rel}"  # noqa: E731
    pre = tuple(at(f"{g.path}:output") for g in graph if isinstance(g, Norm) and g.consumers)
    out = {"post-norms": pre} if pre else {}
    if linear_writers:
        out["attn-out"] = (at(f"{linear_writers[0]}:output"),)
    if writer:
        after = [g for g in graph if isinstance(g, str)]
        start = after.index(linear_writers[0]) + 1 if linear_writers else 0
        out.update({"mlp-in": (at(f"{writer}:input"),), "mlp-out": (at(f"{writer}:output"),),
                    "mlp-linears": tuple(at(f"{g}:output") for g in after[start:])})
    out["residual"] = (f"{prefix}.*:output",)
    return out
