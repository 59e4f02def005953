"""ONNX exporter for a pipeline's denoiser: one denoising call as a graph, `<denoiser>/model.onnx`.

The graph's inputs are the tensors the pipeline itself passes to its denoiser (captured from one
seeded call: `sample`, `timestep`, `encoder_hidden_states`, and for SDXL the extra
conditioning tensors, dict entries named `added_cond_kwargs.text_embeds` and so on); non-tensor
arguments are fixed at their captured values. The batch dimension is dynamic, and so are height and
width of 4-D latents. The output is `out_sample`. The UNet goes through the TorchScript exporter,
opset 17 (plain ops that every execution provider runs); FLUX through torch.export and the dynamo
exporter (opset 18), every dimension of every input left to torch.export (`Dim.AUTO`), from a call with
batch 2 (a traced batch of 1 would be specialised to 1): the graph runs other batch sizes and other
resolutions (the image-token count and the ids' length vary together).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import BakeError

OPSET = 17
DYNAMO_OPSET = 18
from ..families.pipelines import ONNX_DENOISERS as SUPPORTED  # noqa: E402
from ..families.pipelines import ONNX_REFUSED as WHY_NOT  # noqa: E402


def check_supported(root) -> None:
    """Refuse, before any work, a denoiser whose ONNX graph would not run for other batch sizes."""
    den = type(getattr(root, root.denoiser_name())).__name__
    if den not in SUPPORTED:
        why = WHY_NOT.get(den, "not tested")
        raise BakeError(f"--format onnx: the {den} denoiser is not exported to ONNX yet ({why}); "
                        f"supported: {', '.join(SUPPORTED)} (use --format safetensors)")


def flatten(kwargs: dict) -> tuple[list[str], list[torch.Tensor], dict]:
    """Tensor inputs (name, value) of a call given by keyword, dict entries as `key.entry`; the rest frozen."""
    names, values, frozen = [], [], {}
    for k, v in kwargs.items():
        if torch.is_tensor(v):
            names.append(k)
            values.append(v)
        elif isinstance(v, dict) and v and all(torch.is_tensor(x) for x in v.values()):
            for kk, vv in v.items():
                names.append(f"{k}.{kk}")
                values.append(vv)
        else:
            frozen[k] = v
    return names, values, frozen


class _Call(torch.nn.Module):
    def __init__(self, den: torch.nn.Module, names: list[str], frozen: dict):
        super().__init__()
        self.den, self.names, self.frozen = den, names, frozen

    def forward(self, *tensors):
        kwargs = dict(self.frozen)
        for name, t in zip(self.names, tensors):
            if "." in name:
                k, kk = name.split(".", 1)
                kwargs.setdefault(k, {})[kk] = t
            else:
                kwargs[name] = t
        kwargs["return_dict"] = False
        out = self.den(**kwargs)
        return out[0] if isinstance(out, tuple) else out


def as_kwargs(den, args: list, kwargs: dict) -> dict:
    """Positional arguments named by the denoiser's forward signature (`sample`, `timestep`, ...)."""
    import inspect

    names = [n for n in inspect.signature(den.forward).parameters if n != "self"][:len(args)]
    return {**dict(zip(names, args)), **kwargs}


def capture(root, size: int | None = None) -> tuple[list, dict]:
    """The arguments of the denoiser's first call in a one-step run of the pipeline."""
    from ..models.diffusion import run_pipeline

    den = getattr(root, root.denoiser_name())
    seen: dict = {}

    def grab(module, args, kwargs):
        if not seen:
            seen["args"], seen["kwargs"] = list(args), dict(kwargs)

    h = den.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run_pipeline(root, ["a photo"], 1, 0, "latent", size=size)
    finally:
        h.remove()
    return seen["args"], seen["kwargs"]


def export(root, out: Path, log=print, size: int | None = None) -> Path:
    name = root.denoiser_name()
    den = getattr(root, name)
    args, kwargs = capture(root, size)
    names, values, frozen = flatten(as_kwargs(den, args, kwargs))
    dyn = {}
    for n, v in zip(names, values):
        if v.dim() >= 1:
            dyn[n] = {0: "batch"}
            if v.dim() == 4:
                dyn[n].update({2: "height", 3: "width"})
    target = out / name / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"onnx: exporting {type(den).__name__} ({len(names)} inputs: {', '.join(names)})")
    call = _Call(den.float(), names, frozen).eval()
    with torch.no_grad():
        if SUPPORTED[type(den).__name__] == "dynamo":
            _dynamo(call, names, values, target)
        else:
            torch.onnx.export(call, tuple(values), str(target), input_names=names,
                              output_names=["out_sample"], dynamic_axes={**dyn, "out_sample": {0: "batch"}},
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return target


def _dynamo(call: torch.nn.Module, names: list[str], values: list[torch.Tensor], target: Path) -> None:
    """torch.export with every dimension automatic, from the call at batch 2: a tensor whose first
    dimension is the latents' batch is repeated (the ids, without a batch dimension, are not)."""
    import warnings

    from torch.export import Dim

    b = values[0].shape[0]
    if b == 1:
        values = [v.repeat(2, *[1] * (v.dim() - 1)) if v.dim() >= 1 and v.shape[0] == b else v for v in values]
    shapes = (tuple({i: Dim.AUTO for i in range(v.dim())} for v in values),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(call, tuple(values), input_names=names, output_names=["out_sample"],
                                 dynamic_shapes=shapes, opset_version=DYNAMO_OPSET, dynamo=True, verbose=False)
    prog.save(str(target))


def run_onnx_denoiser(path: Path, den, args: list, kwargs: dict,
                      provider: str | None = None) -> np.ndarray:
    import onnxruntime as ort

    from ..ort_session import pick_providers

    names, values, _ = flatten(as_kwargs(den, args, kwargs))
    sess = ort.InferenceSession(str(path), providers=pick_providers(provider or "auto"))
    wanted = {i.name for i in sess.get_inputs()}
    feed = {n: v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
            for n, v in zip(names, values) if n in wanted}
    return sess.run(None, feed)[0]
