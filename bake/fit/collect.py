"""Activation collection: per text, the mean over its non-pad tokens of each site's activation (the
first token left out where it is a BOS or an attention sink: `first_token`).

Memory is bounded by texts × units per site (never by sequence length × layers), batches show a
progress bar, and a forward pass stops as soon as the last site it needs has been seen.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..families import SiteInfo
from .distributed import gather_texts, rank, shard


class _Enough(Exception):
    pass


POOLINGS = ("mean", "last", "max")


KEEP_FIRST = "+first"  # a pooling name ending so ("mean+first") pools the first token too
SINK_RATIO = 10.0


def content_mask(mask: torch.Tensor, drop_first: bool = True) -> torch.Tensor:
    """The tokens that mean and max pooling read (right padding): the non-pad tokens, without the
    first one (wherever a text has more than one) when `drop_first`. The first position is an
    attention sink in most causal LMs, with activations orders of magnitude larger than any other
    token's (SmolLM2-135M after layer 15: 22,900 in unit 507 against about 100), so in a mean it
    weighs 1/length and a source-target difference in text length becomes a "direction" in the
    sink's units; in a model without a BOS or a sink it is content like any other token."""
    keep = mask.bool().clone()
    if drop_first:
        keep[:, 0] &= mask.sum(1) < 2
    return keep


@torch.no_grad()
def first_token(model, tok, texts: list[str], ratio: float = SINK_RATIO) -> dict:
    """Should mean/max pooling leave the first token out? Yes where the tokenizer puts its BOS there,
    or where the first token is an attention sink: its hidden-state norm at the middle layer is over
    `ratio` × the median norm of the text's other tokens (median over up to 8 texts of ≥ 3 tokens)."""
    texts = [t for t in texts if t.strip()][:8]
    encs = [tok(t, return_tensors="pt").input_ids[:, :64] for t in texts]
    bos = tok.bos_token_id
    if encs and bos is not None and all(int(e[0, 0]) == bos for e in encs):
        return {"drop": True, "why": f"BOS token {bos} first"}
    ratios = []
    for ids in (e for e in encs if e.shape[1] >= 3):
        hs = model(ids.to(model.device), output_hidden_states=True).hidden_states
        norms = hs[len(hs) // 2][0].float().norm(dim=-1)
        ratios.append(float(norms[0] / norms[1:].median().clamp_min(1e-12)))
    r = float(torch.tensor(ratios).median()) if ratios else 0.0
    return {"drop": r > ratio, "why": f"first-token norm {r:.1f}x the others' at the middle layer "
                                      f"({'a sink' if r > ratio else 'no sink'}; threshold {ratio:g}x)"}


def pool_tokens(x: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Differentiable pooling over non-pad tokens (right padding): [B, T, d] with mask [B, T] →
    [B, d], on x's device and in its dtype.

    mean: average of the tokens after the first (see content_mask); last: the last token;
    max: per-unit maximum over the tokens after the first. With the suffix `KEEP_FIRST` ("mean+first",
    "max+first") the first token counts too.
    """
    if x.dim() == 2 and x.shape[0] == mask.numel():  # a site whose module flattens the tokens (OPT's MLP)
        x = x.reshape(*mask.shape, x.shape[-1])
    drop = not how.endswith(KEEP_FIRST)
    how = how if drop else how[:-len(KEEP_FIRST)]
    if how == "mean":
        m = content_mask(mask, drop).to(x.dtype)[..., None]
        return (x * m).sum(1) / m.sum(1)
    if how == "last":
        return x[torch.arange(x.shape[0], device=x.device), mask.sum(1) - 1]
    if how == "max":
        return x.masked_fill(~content_mask(mask, drop)[..., None], float("-inf")).max(1).values
    raise ValueError(how)


def _pool(x: torch.Tensor, mask: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """pool_tokens, detached to float32 on the CPU (what collection keeps)."""
    return pool_tokens(x, mask, how).float().cpu()


def _batches(tok, texts: list[str], batch_size: int, desc: str = "", progress: bool = False):
    """Right-padded tokenized batches (pooling masks the padding out)."""
    old_side = tok.padding_side
    tok.padding_side = "right"
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, unit="batch", disable=not progress):
            yield tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256)
    finally:
        tok.padding_side = old_side


def _watch(model, site: SiteInfo, record):
    """Call record(activation) whenever the site's tensor is computed; returns the hook handle."""
    mod = model.get_submodule(site.module)
    if site.side == "output":
        return mod.register_forward_hook(lambda m, a, o: record(o[0] if isinstance(o, tuple) else o))
    return mod.register_forward_pre_hook(lambda m, a, k: record(a[0] if a else next(iter(k.values()))),
                                         with_kwargs=True)


@torch.no_grad()
def collect(model, tok, texts: list[str], sites: list[SiteInfo], batch_size: int = 16, desc: str = "collect",
            stop_early: bool = True, progress: bool = True, pooling: str = "mean") -> dict[str, torch.Tensor]:
    """{site name: [len(texts), units] float32} of per-text pooled activations. Under torch.distributed
    each rank runs its shard of the texts and every rank gets all rows, in text order."""
    n, texts = len(texts), shard(texts, batch_size)
    pooled: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    _run_batches(model, tok, texts, sites, batch_size, desc, progress and rank() == 0, stop_early,
                 lambda name, x, mask: pooled[name].append(_pool(x, mask, pooling)))
    return {k: gather_texts(torch.cat(v), n, batch_size) for k, v in pooled.items()}


def _run_batches(model, tok, texts: list[str], sites: list[SiteInfo], batch_size: int, desc: str, progress: bool,
                 stop_early: bool, record) -> None:
    """Run the texts in right-padded batches, calling record(site name, activation, attention mask) at
    each site; with stop_early the forward pass stops once every site of the batch is recorded."""
    mask_box: list[torch.Tensor] = []
    seen: set[str] = set()  # sites recorded in the current batch

    def recorder(name: str):
        def on(x: torch.Tensor):
            record(name, x, mask_box[0])
            seen.add(name)
            if stop_early and len(seen) == len(sites):
                raise _Enough  # every site seen: the rest of the forward pass is not needed
        return on

    handles = [_watch(model, s, recorder(s.name)) for s in sites]
    try:
        for enc in _batches(tok, texts, batch_size, desc, progress):
            mask_box[:] = [enc.attention_mask.to(model.device)]
            seen.clear()
            try:
                model(input_ids=enc.input_ids.to(model.device), attention_mask=enc.attention_mask.to(model.device),
                      use_cache=False)
            except _Enough:
                pass
    finally:
        for h in handles:
            h.remove()


def _kinds(calls: list[tuple[tuple, dict]]) -> list[int]:
    """Per layer, the first layer called with the same extra arguments (each the very same object)."""
    def one(x, y) -> bool:
        if x is y:
            return True
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(one(u, v) for u, v in zip(x, y))
        return isinstance(x, (int, float, str, bool, type(None))) and x == y

    def same(a, b) -> bool:
        (aa, ak), (ba, bk) = a, b
        return one(aa[1:], ba[1:]) and ak.keys() == bk.keys() and all(one(ak[k], bk[k]) for k in ak)

    out: list[int] = []
    for i, c in enumerate(calls):
        out.append(next(j for j in range(i + 1) if j == i or same(calls[j], c)))
    return out


class LayerReplay:
    """Causal collection, layer by layer.

    The inputs of decoder layer L (computed with every map of earlier layers active) are kept per
    batch, so fitting a site in layer L runs that one layer, not the model up to it. Memory is one
    hidden state per batch: texts × tokens × hidden size floats.
    """

    def __init__(self, model, tok, texts: list[str], batch_size: int, layers_prefix: str):
        self.model, self.prefix = model, layers_prefix
        self.n, self.batch_size, texts = len(texts), batch_size, shard(texts, batch_size)
        self.layers = model.get_submodule(layers_prefix)
        self.layer = 0
        self.batches: list[tuple[tuple, dict, torch.Tensor]] = []  # (args, kwargs, mask) entering self.layer
        # each layer's own extra arguments per batch: hybrids give state-space and attention layers
        # different masks (Jamba, Nemotron-H, Qwen3.5), so layer 0's cannot serve every layer. The first
        # batch runs the whole model to see which layers get the same arguments (the very objects):
        # `kind[i]` is the first such layer; later batches stop at the last of those (layer 0 mostly)
        self.kind: list[int] = []
        self.extras: dict[int, list[tuple[tuple, dict]]] = {}
        for enc in _batches(tok, texts, batch_size):
            self._grab(enc)

    @torch.no_grad()
    def _grab(self, enc) -> None:
        """One batch, recording the arguments of each kind's first layer (the hidden state of layer 0)."""
        box: dict[int, tuple] = {}
        watch = sorted(set(self.kind)) if self.kind else range(len(self.layers))
        last = watch[-1] if self.kind else None

        def grab(i):
            def hook(module, args, kwargs):
                box[i] = (args, kwargs)
                if i == last:
                    raise _Enough
            return hook

        hs = [self.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in watch]
        try:
            mask = enc.attention_mask.to(self.model.device)
            self.model(input_ids=enc.input_ids.to(self.model.device), attention_mask=mask, use_cache=False)
        except _Enough:
            pass
        finally:
            for h in hs:
                h.remove()
        if not self.kind:
            self.kind = _kinds([box[i] for i in range(len(self.layers))])
        for i in set(self.kind):
            self.extras.setdefault(i, []).append((tuple(box[i][0][1:]), box[i][1]))
        args, kwargs = box[0]
        self.batches.append((args, kwargs, mask))

    def layer_of(self, module_path: str) -> int | None:
        if not module_path.startswith(self.prefix + "."):
            return None
        return int(module_path[len(self.prefix) + 1:].split(".")[0])

    @torch.no_grad()
    def advance(self, to_layer: int) -> None:
        """Run layers up to `to_layer` (exclusive) with whatever hooks are active now."""
        while self.layer < to_layer:
            layer = self.layers[self.layer]
            nxt = self.extras[self.kind[self.layer + 1]] if self.layer + 1 < len(self.layers) else None
            new = []
            for b, (args, kwargs, mask) in enumerate(self.batches):
                out = layer(*args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
                rest, kw = nxt[b] if nxt else (tuple(args[1:]), kwargs)
                new.append(((h,) + rest, kw, mask))
            self.batches = new
            self.layer += 1

    @torch.no_grad()
    def collect(self, site: SiteInfo, pooling: str = "mean") -> torch.Tensor:
        """Pooled activations of a site in the current layer (hooks active now apply)."""
        assert self.layer_of(site.module) == self.layer
        pooled: list[torch.Tensor] = []
        mask_box: list[torch.Tensor] = []

        def record(x):
            pooled.append(_pool(x, mask_box[0], pooling))
            raise _Enough

        h = _watch(self.model, site, record)
        try:
            layer = self.layers[self.layer]
            for args, kwargs, mask in self.batches:
                mask_box[:] = [mask]
                try:
                    layer(*args, **kwargs)
                except _Enough:
                    pass
        finally:
            h.remove()
        return gather_texts(torch.cat(pooled), self.n, self.batch_size)


@torch.no_grad()
def collect_tokens(model, tok, texts: list[str], sites: list[SiteInfo], batch_size: int = 16, desc: str = "tokens",
                   pooling: str = "mean", progress: bool = True) -> tuple[dict, dict]:
    """({site name: [tokens, units]}, {site name: [len(texts), units]}) float32, from one pass: the
    activation at every non-pad token of every text (the first token included), for fits that must hold
    on each token, and each text's pooled activation as `collect` gives it (all texts on every rank)."""
    rows: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    pooled: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def record(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        rows[name].append(x.reshape(*mask.shape, x.shape[-1])[mask.bool()].float().cpu())
        pooled[name].append(_pool(x, mask, pooling))

    _run_batches(model, tok, texts, sites, batch_size, desc, progress and rank() == 0, True, record)
    return {k: torch.cat(v) for k, v in rows.items()}, {k: torch.cat(v) for k, v in pooled.items()}
