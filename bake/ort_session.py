"""ONNX Runtime sessions: which execution provider to take, and opening a graph as one session.

A leaf module (it needs only `errors`), so that both the ONNX Runtime wrapper (`bake/ort.py`) and the
exporters that check their own graphs (`exporters/onnx_denoiser.py`) use it without importing upward.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BakeError


def pick_providers(want: str = "auto") -> list[str]:
    """CUDAExecutionProvider (then CPU) when onnxruntime-gpu sees a GPU and `want` allows it, else CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if want == "cpu":
        return ["CPUExecutionProvider"]
    if want == "cuda" and "CUDAExecutionProvider" not in have:
        raise BakeError("--provider cuda: onnxruntime has no CUDAExecutionProvider here "
                        "(pip install 'bake-steering[gpu]' on a machine with an NVIDIA GPU)")
    if "CUDAExecutionProvider" in have and want in ("auto", "cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(graph: str | Path, provider: str = "auto", threads: int | None = None, spin: bool = True):
    """An `onnxruntime.InferenceSession` for `graph`, quiet, on the provider `pick_providers` picks;
    `spin=False` lets idle threads block at once (fair timing of several sessions). A graph ONNX Runtime
    cannot load is one BakeError naming the file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = pick_providers(provider)
    try:
        return ort.InferenceSession(str(graph), opts, providers=providers)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BakeError(f"{str(graph)!r}: ONNX Runtime cannot load it: {first}") from None
