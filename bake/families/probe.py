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
  config built on the meta device, gives the Linear modules it adds biases to;
- **blocks** (a mixture of experts): a module that writes the residual stream but is no Linear, whose
  weights (router, experts' 3-D tensors, shared expert) are sorted numerically into readers of its
  input (W' = W M along the hidden dimension gives block(M x)) and producers of its output (W' = M W
  gives M block(x)); a block that passes neither test is left alone (scale-only at its norm);
- **layer kinds**: layers built differently (dense then MoE, attention and state-space layers) are
  probed one kind at a time (the first layer of each kind) and each layer gets its kind's graph.

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
import itertools

from .table import Adapter, BiasGroup, Block, Layer, Norm, Slot

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
    """One forward pass: [(relative name, module, input, output)] of the layer's Linear and norm modules and
    of its direct children whose output no Linear or norm produced (blocks), in call order, and the
    layer's input and output hidden states."""
    calls, ends = [], {}
    hooks = []
    first = lambda t: t[0] if isinstance(t, tuple) and t else t  # noqa: E731
    for name, mod in layer.named_modules():
        leaf = isinstance(mod, torch.nn.Linear) or is_norm(mod, hidden)
        if name and (leaf or "." not in name):
            hooks.append(mod.register_forward_hook(
                lambda m, a, kw, o, name=name: calls.append(
                    (name, m, a[0] if a else next(iter(kw.values()), None), first(o))), with_kwargs=True))
    hooks.append(layer.register_forward_hook(
        lambda m, a, kw, o: ends.update(x=a[0] if a else kw.get("hidden_states"), y=first(o)), with_kwargs=True))
    try:
        with torch.no_grad():
            # a second sequence with a padded token (at the end: no query sees no key): a block that zeroes
            # padded tokens between a norm and its Linear (Mamba's mixer) then shows as a new tensor, so
            # that Linear is not taken for a plain reader of the norm (a shift folded into its bias would
            # reach the padded tokens the reference zeroes)
            ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
            try:
                model(input_ids=ids, attention_mask=torch.tensor([[1] * 6, [1] * 5 + [0]]))
            except Exception:  # noqa: BLE001 - a model whose padded path fails (Dory): one plain sequence
                calls.clear()
                model(input_ids=ids[:1])
    finally:
        for h in hooks:
            h.remove()
    if "y" not in ends:
        raise BakeError(f"--model: {model.config.model_type}: the probe's forward pass never reached this layer")
    leaves = [c for c in calls if _leaf(c[1], hidden)]
    blocks = [c for c in calls if not _leaf(c[1], hidden) and not any(c[3] is l[3] for l in leaves)]
    keep = {id(c) for c in leaves + blocks}
    return [c for c in calls if id(c) in keep], ends["x"], ends["y"]


def _leaf(mod: torch.nn.Module, hidden: int) -> bool:
    return isinstance(mod, torch.nn.Linear) or is_norm(mod, hidden)


def writers(calls: list, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, bool, float]]:
    """(name, is last, c) of every module whose output o satisfies b = a + c·o for hidden states a, b and
    a constant c (1, or a depth scale as MiniCPM's 1.4/√L); or, in a parallel block (GPT-J, Cohere, Phi:
    attention and MLP read one norm), b = a + o1 + o2. States are compared as [tokens, hidden], so a
    layer that flattens its tokens (OPT's MLP) is read too."""
    h = y.shape[-1]
    like = lambda t: isinstance(t, torch.Tensor) and t.shape[-1] == h and t.numel() == y.numel()  # noqa: E731
    states = [s for s in [x] + [t for _, _, i, o in calls for t in (i, o)] + [y] if like(s)]
    outs = [(name, o) for name, _, _, o in calls if like(o)]
    out = []
    for name, o in outs:
        b, c = _scaled_sum(states, o)
        if b is not None:
            out.append((name, b is y, c))
    found = {n for n, *_ in out}
    for (n1, o1), (n2, o2) in itertools.combinations([(n, o) for n, o in outs if n not in found], 2):
        b, c = _scaled_sum([s for s in states if s is not o1 and s is not o2], _flat(o1) + _flat(o2))
        if b is not None and c == 1.0:
            out += [(n1, b is y, 1.0), (n2, b is y, 1.0)]
            break
    inner = {n.rsplit(".", 1)[0] for n, *_ in out if "." in n}  # a block whose Linear writer was found
    return [w for w in out if w[0] not in inner]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _scaled_sum(states: list, o: torch.Tensor):
    """(b, c) with b = a + c·o for states a ≠ b (c by least squares, 1.0 when within 1e-5 of it), or
    (None, None)."""
    oo = _flat(o).double()
    norm = float((oo * oo).sum())
    flat = [(s, _flat(s).double()) for s in states if s is not o]
    for a, fa in flat if norm else []:
        for b, fb in flat:
            if b is a:
                continue
            c = float(((fb - fa) * oo).sum()) / norm
            c = 1.0 if abs(c - 1) < 1e-5 else c
            if abs(c) > 1e-3 and torch.allclose(fb, fa + c * oo, rtol=1e-5, atol=1e-6):
                return b, c
    return None, None


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


def bias_groups(model: torch.nn.Module, prefix: str, linears: dict[str, int]) -> tuple[BiasGroup, ...]:
    """Each boolean config flag naming a bias, with the Linear modules (layer-relative name → a layer
    that has it) it gives a bias."""
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
        gained = tuple(n for n, i in linears.items() if _bias_of(twin, f"{prefix}.{i}.{n}") is not None
                       and model.get_submodule(f"{prefix}.{i}.{n}").bias is None)
        if gained:
            groups.append(BiasGroup(flag, gained))
    return tuple(groups)


def _bias_of(model: torch.nn.Module, path: str):
    try:
        return model.get_submodule(path).bias
    except AttributeError:  # the flag builds another layer layout: no bias there
        return None


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
    kinds = layer_kinds(model, prefix, n)
    probed = {}
    for first in dict.fromkeys(kinds.values()):
        calls, x, y = record(model, model.get_submodule(f"{prefix}.{first}"), hidden)
        probed[first] = _layer(model, f"{prefix}.{first}", calls, x, y, hidden)
    adapter = _adapter(model, mt, prefix, [probed[kinds[i]] for i in range(n)], hidden)
    _CACHE[model] = adapter
    return adapter


def layer_kinds(model: torch.nn.Module, prefix: str, n: int) -> dict[int, int]:
    """Layer index → the first layer built like it (the same parameter names and shapes)."""
    seen, out = {}, {}
    for i in range(n):
        key = tuple((k, tuple(v.shape)) for k, v in model.get_submodule(f"{prefix}.{i}").named_parameters())
        out[i] = seen.setdefault(key, i)
    return out


def _layer(model, p: str, calls: list, x, y, hidden: int) -> tuple[Layer, list, list]:
    """One layer's graph from its recorded calls; with its Linear names and norm modules."""
    order = list(dict.fromkeys(name for name, *_ in calls))  # call order, each module once
    kind = {nm: m for nm, m, *_ in calls}
    linears = [nm for nm in order if isinstance(kind[nm], torch.nn.Linear)]
    found = writers(calls, x, y)
    blocks = {nm: _under(nm, _block_slots(kind[nm], next(i for n_, _, i, _ in calls if n_ == nm), hidden))
              for nm, *_ in found if nm not in linears and not is_norm(kind[nm], hidden)}
    reads = _reads(calls, x, blocks)
    graph, norms = [], []
    for name in order:
        if name in linears and not any(name.startswith(b + ".") for b, v in blocks.items() if v):
            graph.append(name)
        elif is_norm(kind[name], hidden):
            out = next(o for nm, _, _, o in calls if nm == name)
            cons, slots = reads.get(id(out), ([], []))
            graph.append(Norm(name, tuple(dict.fromkeys(cons)), tuple(slots)))
            norms.append(kind[name])
        elif blocks.get(name):
            graph.append(Block(name, blocks[name][1], blocks[name][2]))
    last, scale = ([(nm, c) for nm, is_last, c in found if is_last] or [(None, 1.0)])[-1]  # parallel: the later
    writer = last if last in linears else None
    anchor = _anchor(kind, last, blocks, linears)
    block = last if last in blocks and blocks[last] else None
    writes = _writes(calls, found, linears)
    inner = {nm for nm, m, i, _ in calls if is_norm(m, hidden)  # q/k norms over a whole projection (OLMo-2)
             and any(o is i for n2, _, _, o in calls if n2 in linears and n2 not in writes)}
    shown = [g for g in graph if not (isinstance(g, Norm) and g.path in inner)]
    return Layer(tuple(graph), writer, anchor, scale), linears, norms, _presets(p.rsplit(".", 1)[0], shown, writes, block)


def _writes(calls: list, found: list, linears: list[str]) -> list[str]:
    """The Linear modules whose output goes into the stream, directly or through a norm (the sandwich
    norms of Gemma-2, OLMo-2, EXAONE-4: the write is norm(o_proj(...))), in call order."""
    out = []
    for name, *_ in found:
        if name in linears:
            out.append(name)
            continue
        inp = next((i for nm, _, i, _ in calls if nm == name), None)
        feeder = next((nm for nm, _, _, o in calls if nm in linears and o is inp), None)
        if feeder:
            out.append(feeder)
    return list(dict.fromkeys(out))


def _anchor(kind: dict, last: str | None, blocks: dict, linears: list[str]) -> str:
    """The parameter identifying the layer's output site: its last writer's weight (a block's first
    producer, or its first parameter where unresolved); the last Linear's where none was found."""
    if last is None:
        return f"{linears[-1]}.weight"
    if blocks.get(last):
        return blocks[last][1][0].param
    first = next(iter(kind[last].named_parameters()), None)
    return f"{last}.{first[0]}" if last in blocks and first else f"{last}.weight"


def _under(name: str, found):
    """Block-relative (readers, producers, shift folds) → layer-relative."""
    if found is None:
        return None
    readers, producers, once = found
    return tuple(s.under(name) for s in readers), tuple(s.under(name) for s in producers), once


def _reads(calls: list, x: torch.Tensor, blocks: dict) -> dict[int, tuple[list, list]]:
    """id(tensor) → (Linear modules reading it, slots of the blocks reading it). In a mixture of experts
    whose block was not resolved, no tensor gets readers (its experts' reads are invisible)."""
    reads: dict[int, tuple[list, list]] = {}
    opaque = set()  # inputs of a writing block whose weights were not resolved: its reads are invisible
    inside = lambda nm: any(nm.startswith(b + ".") for b, v in blocks.items() if v)  # noqa: E731
    for name, mod, inp, _ in calls:
        if inp is None:
            continue
        if isinstance(mod, torch.nn.Linear) and not inside(name):
            reads.setdefault(id(inp), ([], []))[0].append(name)
        elif blocks.get(name):
            reads.setdefault(id(inp), ([], []))[1].extend(blocks[name][0])
        elif name in blocks:
            opaque.add(id(inp))
    if _routed([c for c in calls if not inside(c[0])], x):
        return {}
    return {k: v for k, v in reads.items() if k not in opaque}


def _adapter(model, mt: str, prefix: str, layers: list, hidden: int) -> Adapter:
    """The Adapter from every layer's probed graph (one table when all layers are alike)."""
    graphs = [g for g, *_ in layers]
    linears: dict[str, int] = {}
    for i, (_, lin, _, _) in enumerate(layers):
        for nm in lin:
            linears.setdefault(nm, i)
    norms = [m for _, _, ns, _ in layers for m in ns]
    one = all(g == graphs[0] for g in graphs)
    presets: dict[str, tuple] = {}
    for *_, pre in layers:
        for k, v in pre.items():
            presets[k] = tuple(dict.fromkeys(presets.get(k, ()) + v))
    return Adapter(family=mt, model_types=(mt,), presets=presets,
                   bias_groups=bias_groups(model, prefix, linears), norm_weight_offset=norm_offset(norms, mt),
                   final_norm=final_norm(model, prefix, hidden), layers=prefix, graph=graphs[0].graph,
                   residual_writer=graphs[0].residual_writer, residual_anchor=graphs[0].residual_anchor,
                   residual_scale=graphs[0].residual_scale,
                   per_layer=() if one else tuple(graphs),
                   about="derived by bake's probe (no family table)")


def _routed(calls: list, x: torch.Tensor) -> bool:
    """A mixture of experts: some Linear reads fewer tokens than the layer (a router's pick). Its norm's
    other readers are then invisible to tensor identity, so no norm gets consumers (scales still fold)."""
    tokens = x.numel() // x.shape[-1]
    return any(isinstance(m, torch.nn.Linear) and isinstance(i, torch.Tensor) and i.numel() // i.shape[-1] < tokens
               for _, m, i, _ in calls)


def _presets(prefix: str, graph: list, writes: list[str], block: str | None) -> dict:
    """post-norms (the norms whose output is read by projections; every norm where none is), attn-out and
    mlp-out (the first and the last write into the stream), mlp-in, mlp-linears, residual."""
    at = lambda rel: f"{prefix}.*.{rel}"  # noqa: E731
    norms = [g for g in graph if isinstance(g, Norm)]
    read = [g for g in norms if g.consumers or g.slots] or norms
    out = {"post-norms": tuple(at(f"{g.path}:output") for g in read)} if read else {}
    last = None if block else (writes[-1] if writes else None)
    if writes and writes[0] != last:
        out["attn-out"] = (at(f"{writes[0]}:output"),)
    if last:
        linears = [g for g in graph if isinstance(g, str)]
        start = linears.index(writes[0]) + 1 if writes[0] != last else 0
        out.update({"mlp-in": (at(f"{last}:input"),), "mlp-out": (at(f"{last}:output"),)})
        if linears[start:]:
            out["mlp-linears"] = tuple(at(f"{g}:output") for g in linears[start:])
    elif block:
        out["mlp-out"] = (at(f"{block}:output"),)
    out["residual"] = (f"{prefix}.*:output",)
    return out


def _block_slots(block: torch.nn.Module, x, hidden: int):
    """(readers, producers, shift folds) of a block writing the residual stream (relative to the block),
    or None if no assignment of its weights passes both tests (see `_passes`)."""
    if not isinstance(x, torch.Tensor) or x.shape[-1] != hidden:
        return None
    params = dict(block.named_parameters())
    for layout in ("linear", "matmul"):  # 3-D expert weights: [E, out, in] (F.linear) or [E, in, out] (x @ W)
        options = [_roles(name, w, layout, hidden, params) for name, w in params.items()]
        options = [o for o in options if o]
        for pick in itertools.product(*options):
            readers = tuple(s for role, s in pick if role == "reader")
            producers = tuple(s for role, s in pick if role == "producer")
            if producers and _passes(block, x, readers, producers):
                return readers, producers, _shift_once(block, x, producers)
    return None


def _roles(name: str, w: torch.Tensor, layout: str, hidden: int, params: dict) -> list[tuple[str, Slot]]:
    """The roles a weight can play: reader on the dimension holding its inputs, producer on its outputs."""
    if w.dim() not in (2, 3) or name.endswith("bias"):
        return []
    out_dim, in_dim = (w.dim() - 2, w.dim() - 1) if w.dim() == 2 or layout == "linear" else (2, 1)
    stem = name[:-len(".weight")] if name.endswith(".weight") else name
    bias = next((b for b in (f"{stem}.bias", f"{stem}_bias") if b in params), None)
    out = []
    if w.shape[in_dim] == hidden:
        out.append(("reader", Slot(name, in_dim, bias)))
    if w.shape[out_dim] == hidden:
        out.append(("producer", Slot(name, out_dim, bias)))
    if len(out) == 2:  # square: a reader, a producer, or an inner weight (the tests decide)
        out.append(("neither", None))
    return out


def _passes(block: torch.nn.Module, x: torch.Tensor, readers, producers) -> bool:
    """Readers: W' = W M (and bias' = bias + W s where every reader has a bias) gives block(M x + s);
    producers: W' = M W, bias' = M bias gives M block(x). On the recorded input, in float64 (float32 where
    the block's kernels take no float64, as grouped expert matmuls, or that compute in float32 whatever
    they are given, as Nemotron-H's router: float32's tolerance then; a wrong assignment errs by O(1))."""
    for dt, tol in ((torch.float64, 1e-9), (torch.float32, 2e-5)):
        try:
            if _passes_in(block, x, readers, producers, dt, tol):
                return True
        except RuntimeError:  # noqa: PERF203 - a kernel without this dtype: the next one
            continue
        except Exception:  # noqa: BLE001 - a block that does not run on its input alone: not resolved
            return False
    return False


def _passes_in(block, x, readers, producers, dt: torch.dtype, tol: float) -> bool:
    g = torch.Generator().manual_seed(0)
    h = x.shape[-1]
    M = (torch.eye(h, dtype=torch.float64) + 0.3 * torch.randn(h, h, generator=g, dtype=torch.float64) / h ** 0.5).to(dt)
    s = 0.1 * torch.randn(h, generator=g, dtype=torch.float64).to(dt)
    if not (readers and all(r.bias for r in readers)):
        s = 0 * s
    x = x.detach().to(dt)
    base = copy.deepcopy(block).to(dt)
    with torch.no_grad():
        want_in, want_out = _out(base(x @ M.T + s)), _out(base(x)) @ M.T
        twin = copy.deepcopy(base)
        for r in readers:
            _transform(twin, r, M, s, reader=True)
        got_in = _out(twin(x))
        twin = copy.deepcopy(base)
        for p in producers:
            _transform(twin, p, M, None, reader=False)
        got_out = _out(twin(x))
    close = lambda a, b: float((a - b).abs().max()) <= tol * float(b.abs().max()) + 1e-12  # noqa: E731
    return close(got_in, want_in) and close(got_out, want_out)


def _shift_once(block: torch.nn.Module, x: torch.Tensor, producers) -> bool:
    """True if adding v to every producer's bias adds v to the block's output (router weights summing to
    one per token; every producer has a bias)."""
    if not all(p.bias for p in producers):
        return False
    return _try(lambda: _adds_once(block, x, producers))


def _try(f) -> bool:
    try:
        return f()
    except Exception:  # noqa: BLE001 - a block that does not run on its input alone: not resolved
        return False


def _adds_once(block: torch.nn.Module, x: torch.Tensor, producers) -> bool:
    v = 0.5 * torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(1))
    base = copy.deepcopy(block).float()
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for p in producers:
            twin.get_parameter(p.bias).data += v
        want, got = _out(base(x.float())) + v, _out(twin(x.float()))
    return float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _transform(block: torch.nn.Module, slot: Slot, M: torch.Tensor, s, reader: bool) -> None:
    W = block.get_parameter(slot.param)
    if reader:
        moved = W.data.movedim(slot.dim, -1)
        if slot.bias and s is not None:
            b = block.get_parameter(slot.bias)
            b.data += (moved @ s).reshape(b.shape)
        W.data = (moved @ M).movedim(-1, slot.dim).contiguous()
    else:
        W.data = torch.tensordot(M, W.data.movedim(slot.dim, 0), dims=1).movedim(0, slot.dim).contiguous()
        if slot.bias:
            b = block.get_parameter(slot.bias)
            b.data = b.data @ M.T
