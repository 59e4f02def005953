"""FitConfig: every option of one fit as a frozen, typed, versioned, JSON-safe value.

`fit(model, tok, source, target, FitConfig(...))` fits; `FitConfig.to_dict()` / `FitConfig.from_dict()`
round-trip it through JSON (unknown keys and wrong types are a BakeError naming the field). The value
checks (unknown method, pooling, support, each method's own options) are `check()`: common ones here
and in `methods`, the method-specific ones in that method's registry entry (`methods.METHODS`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import BakeError
from .lineas import LineasConfig
from ..typed import build, check_fields, encode

FIT_CONFIG_VERSION = 1  # bump when a field changes meaning; from_dict refuses newer versions
DEFAULT_BATCH = 16  # texts per batch when collecting activations


@dataclass(frozen=True)
class TextCounts:
    """How many texts a fit gets per side (control: None when there is no control set)."""
    source: int
    target: int
    control: int | None = None


@dataclass(frozen=True)
class FitConfig:
    """The options of a fit. Field order follows the old `fit(...)` positional arguments (method,
    sites, strength, support, causal, batch_size). `sites` accepts a list or a comma-separated string
    and is stored as a tuple (None or empty: the method's default sites). `batch_size` None: 16 texts
    per batch, or for the methods that train (LinEAS, DSAS --joint) the per-step batch of `lineas`
    (8 unless set there); given, it is also that per-step batch. `lineas`: the training options of
    LinEAS and DSAS --joint (None: LineasConfig's defaults); other methods ignore it. `seed` seeds the
    DSAS detector split and diffusion noise (LinEAS has its own in `lineas`)."""
    method: str
    sites: tuple[str, ...] | None = None
    strength: float = 1.0
    support: str = "none"
    causal: bool = True
    batch_size: int | None = None
    pooling: str | None = None
    knots: int = 16  # monotone-pwl
    direction_layer: float | None = None  # ablate (a fraction interpolates between two layers' directions)
    reference: str = "zero"  # ablate
    direction: str | None = None  # ablate (None: lda)
    layer_directions: bool = False  # ablate: each write its own layer's direction
    kernel: str | None = None  # ablate: per-layer strengths "attn=MAX,POS,MIN,DIST;mlp=…" (heretic's)
    rank: int = 1  # ablate: remove a rank-k subspace (the mean direction and k − 1 principal ones)
    orthogonalize: bool = False  # ablate: remove the direction's component along the target mean
    system: str | None = None  # --chat: the system turn (None: the template's default)
    norm_preserving: bool = False  # ablate: keep each writer row's norm (biprojected abliteration, exact)
    lineas: LineasConfig | None = None  # lineas, dsas --joint
    inner: str | None = None  # dsas: a spec file or a method name
    min_accuracy: float = 0.75  # dsas
    pca: int | None = None  # dsas
    seed: int = 0
    joint: bool = False  # dsas
    gate_form: str = "sigmoid"  # dsas: sigmoid (σ(w·x + c), inserted) | units (MLP units, folds: fit/dsas_units.py)
    chat: bool = False  # every text as one chat user turn + the generation prompt (the tokenizer's template)
    version: int = FIT_CONFIG_VERSION

    def __post_init__(self) -> None:
        sites = self.sites
        if isinstance(sites, str):
            sites = sites.split(",")
        if isinstance(sites, list):
            sites = tuple(sites)
        if isinstance(sites, tuple) and all(isinstance(s, str) for s in sites):
            sites = tuple(s.strip() for s in sites if s.strip()) or None
        object.__setattr__(self, "sites", sites)
        check_fields(self)
        if not 1 <= self.version <= FIT_CONFIG_VERSION:
            raise BakeError(f"fit config: version: {self.version} is not a version this bake reads "
                            f"(1 … {FIT_CONFIG_VERSION}; a newer bake wrote it?)")

    @property
    def trains(self) -> bool:
        """Does this method train end to end (LinEAS, DSAS --joint)?"""
        from .methods import METHODS

        meth = METHODS.get(self.method)
        return bool(meth and meth.trains(self))

    @property
    def texts_per_batch(self) -> int:
        """The batch size the fit uses (see the class docstring)."""
        if self.batch_size is not None:
            return self.batch_size
        return (self.lineas or LineasConfig()).batch_size if self.trains else DEFAULT_BATCH

    def training(self, pooling: str | None = None, gated: bool = False) -> LineasConfig:
        """The LinEAS options this fit trains with: `lineas` with the batch size, pooling and gate set."""
        return replace(self.lineas or LineasConfig(), batch_size=self.texts_per_batch,
                       pooling=pooling or self.pooling or "mean", gated=gated)

    def check(self, counts: TextCounts | None = None) -> None:
        """Value checks (before any model is loaded): BakeError naming the CLI flag at fault. With
        `counts`, also the checks that depend on how many texts there are."""
        from .methods import check

        check(self, counts)

    def to_dict(self) -> dict:
        """JSON-safe dict of every field (tuples as lists, `lineas` as a dict or None)."""
        return encode(self)

    @classmethod
    def from_dict(cls, data: dict) -> FitConfig:
        """The inverse of `to_dict`; missing keys take their defaults (`method` is required)."""
        return build(cls, data)
