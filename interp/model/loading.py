"""Load a Hugging Face causal LM from the zoo, a local folder, a model object or the hub.

Every path returns the model in eval mode with eager attention (so hooked and unhooked forwards
agree exactly), its tokenizer, and a :class:`~interp.model.Provenance` recording where the weights
came from and their hash. The hub path fails within seconds when the hub is unreachable instead of
retrying for most of a minute, and points at the zoo, which works offline.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import torch

from interp.errors import ModelNotAvailableError, UserError
from interp.model import zoo
from interp.model.loaded import Provenance

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_NOT_WEIGHTS = {"training_args.bin"}
HUB_TIMEOUT_S = 3.0


def log(msg: str) -> None:
    print(f"[interp.loading] {msg}", file=sys.stderr, flush=True)


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or a name such as ``"float32"``, ``"bf16"``, ``"torch.float16"``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise UserError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return _DTYPES[key]


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device from a name; ``auto`` is CUDA when present, else MPS, else the CPU."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:0, mps ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available here")
    return dev


def check_dtype_on(dtype: torch.dtype, device: torch.device) -> None:
    """A one-line UserError when ``device`` cannot run ``dtype`` (a matmul and a softmax, the two
    kernels every forward pass needs, tried on a 2 x 2 tensor)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"{device} does not support bfloat16; use float16 or float32")
    try:
        x = torch.ones(2, 2, dtype=dtype, device=device)
        (x @ x).softmax(-1).sum().item()
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"{device} cannot run {str(dtype).removeprefix('torch.')}: "
                        f"{str(exc).splitlines()[0]}; use float32") from None


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """Where the weights go: one device, or accelerate's device map over the devices of a node.

    Attributes:
        device: the device of a single-device model (and of the inputs' first layer otherwise).
        dtype: the weights' dtype.
        device_map: None for one device, else accelerate's placement strategy (``auto``...).
        max_memory: per-device limits for the device map, accelerate's form ({0: "10GiB", "cpu": ...}).
    """

    device: torch.device
    dtype: torch.dtype
    device_map: str | None = None
    max_memory: dict[int | str, str] | None = None

    @classmethod
    def parse(cls, device: str | torch.device, dtype: str | torch.dtype, device_map: str | None = None,
              max_memory: str | dict[str, str] | None = None) -> Placement:
        """The placement the options ask for, each checked with a one-line UserError: a device
        this machine lacks, a dtype it cannot run, an unknown device map or memory limit."""
        dt, dev = parse_dtype(dtype), parse_device(device)
        if device_map is not None and device_map not in DEVICE_MAPS:
            raise UserError(f"unknown device map {device_map!r} (known: {', '.join(DEVICE_MAPS)})")
        if max_memory and device_map is None:
            raise UserError("a memory limit (--max-memory) applies to a device map: give --device-map auto with it")
        check_dtype_on(dt, dev)
        return cls(dev, dt, device_map, parse_max_memory(max_memory))

    def pretrained_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"dtype": self.dtype, "attn_implementation": "eager"}
        if self.device_map is not None:
            kw["device_map"] = self.device_map
            if self.max_memory:
                kw["max_memory"] = self.max_memory
        return kw

    def finish(self, model: Any) -> Any:
        if self.device_map is None:
            model = model.to(device=self.device, dtype=self.dtype)
        model.eval()
        return model

    def describe(self, model: Any) -> str:
        """The device, or the device map as "map(cuda:0 x12, cpu x12)" (modules per device)."""
        mapping = getattr(model, "hf_device_map", None)
        if self.device_map is None or not mapping:
            return str(self.device)
        counts: dict[str, int] = {}
        for where in mapping.values():
            name = f"cuda:{where}" if isinstance(where, int) else str(where)
            counts[name] = counts.get(name, 0) + 1
        return "map(" + ", ".join(f"{d} x{n}" for d, n in counts.items()) + ")"


def parse_max_memory(spec: str | dict[str, str] | None) -> dict[int | str, str] | None:
    """Per-device limits from "cuda:0=10GiB,cpu=60GiB" (or "0=10GiB"), in accelerate's form.
    Each limit is a positive size with its unit, on a device this machine has, named once."""
    if spec is None or spec == "":
        return None
    items = spec.items() if isinstance(spec, dict) else (
        part.split("=", 1) if "=" in part else (part, "") for part in str(spec).split(",") if part.strip())
    out: dict[int | str, str] = {}
    for key, limit in items:
        key, limit = str(key).strip(), str(limit).strip()
        if not limit:
            raise UserError(f"--max-memory: {key!r} has no limit; write DEVICE=LIMIT, e.g. cuda:0=10GiB,cpu=60GiB")
        index = key.removeprefix("cuda:")
        device: int | str
        if index.isdigit():
            device = int(index)
        elif key in ("cpu", "disk", "mps"):
            device = key
        else:
            raise UserError(f"--max-memory: unknown device {key!r} (cuda:N, N, cpu, disk or mps)")
        if device in out:
            raise UserError(f"--max-memory: {key!r} is given twice")
        _check_device_present(device)
        _check_size(key, limit)
        out[device] = limit
    return out


def _check_device_present(device: int | str) -> None:
    if isinstance(device, int):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device >= count:
            raise UserError(f"--max-memory: cuda:{device} names a GPU this machine lacks (it has {count})")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--max-memory: mps names a device this machine lacks")


def _check_size(key: str, limit: str) -> None:
    """A limit accelerate reads: a positive number with its unit (10GiB, 1.5GB, 512MiB)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(limit)
    except (ValueError, OverflowError):
        size = 0
    if size <= 0:
        raise UserError(f"--max-memory: {key}={limit!r} is not a size; write a positive number and its unit, "
                        "e.g. 10GiB, 1.5GB or 512MiB")


def weights_sha256(folder: str | os.PathLike[str]) -> str | None:
    """One sha256 over the folder's weight files (safetensors/bin) read in name order.

    For a single-file checkpoint this equals that file's own sha256. None when there are none.
    """
    files = sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix in _WEIGHT_SUFFIXES and p.name not in _NOT_WEIGHTS
    )
    if not files:
        return None
    digest = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _zoo_list() -> str:
    return ", ".join(f"{n} (default)" if n == zoo.DEFAULT_MODEL else n for n in zoo.ZOO)


def _from_folder(folder: Path, place: Placement) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **place.pretrained_kwargs())
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load a causal LM from {folder}: {exc}") from exc
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot load the tokenizer saved in {folder}: {exc}") from exc
    return place.finish(model), tok


def check_architecture(folder: str | os.PathLike[str]) -> None:
    """A one-line UserError when the model saved in ``folder`` cannot be hooked (a state-space
    model, an encoder, a family without the paths the workbench reads), decided from its config
    alone: the model is built on the meta device, so no weights are read. Commands that run
    several models call it for each before the first one runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from interp.model.layout import layout_of

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read a model config in {folder}: {str(exc).splitlines()[0]}") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{folder}: model_type {config.model_type!r} is not a causal language model "
                        f"({str(exc).splitlines()[0]})") from None
    layout_of(skeleton)


# --------------------------------------------------------------------------- hub


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Cheap check: False when offline mode is set or the hub's port does not answer in ``timeout``."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:  # DNS lookups ignore socket timeouts: bound the whole probe with a thread
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")  # a Windows drive
    )


def _probe_path(path: Path, name: str) -> bool:
    """Whether something is at ``path``; a one-line UserError for a name the file system
    refuses (too long, a loop) instead of its OSError."""
    try:
        return path.exists()
    except OSError as exc:
        reason = "the name is too long for the file system" if exc.errno == errno.ENAMETOOLONG else exc.strerror
        shown = name if len(name) <= 80 else f"{name[:40]}...{name[-30:]} ({len(name)} characters)"
        raise UserError(f"model {shown!r}: {reason or exc}") from None


def resolve_model_name(name: str) -> str:
    """The one name of the model ``name`` denotes, decided without loading it: a zoo name as is,
    the zoo's converted folder of a model as that model's zoo name, any other local folder as its
    absolute path with links resolved (``a``, ``a/`` and ``/abs/a`` are one model), a hub id as
    given. UserError for a path that names no folder, a file, or a name the file system refuses."""
    text = name.strip()
    if not text:
        raise UserError(f"empty model name; the zoo has: {_zoo_list()}")
    if text in zoo.ZOO:
        return text
    path = Path(text).expanduser()
    if not _probe_path(path, text):
        if _looks_like_path(text):
            raise UserError(f"no such folder: {text!r}")
        return text
    if not path.is_dir():
        raise UserError(f"{text!r} is a file; give a model folder (with config.json) or a zoo name: {_zoo_list()}")
    resolved = path.resolve()
    for zoo_name in zoo.ZOO:
        if zoo.model_dir(zoo_name).resolve() == resolved:
            return zoo_name
    return str(resolved)


def _hub_snapshot_sha(repo_id: str) -> str | None:
    """Hash of the weights of a hub model that from_pretrained has just cached, best effort."""
    try:
        from transformers.utils import cached_file

        config = cached_file(repo_id, "config.json", local_files_only=True)
    except Exception:
        return None
    return weights_sha256(Path(config).parent) if config else None


def _from_hub(name: str, place: Placement, tokenizer: Any) -> tuple[Any, Any, str | None]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bare = "/" not in name
    online = hub_reachable()

    def load(local_only: bool) -> tuple[Any, Any]:
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only, **place.pretrained_kwargs())
        tok = tokenizer or AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        return model, tok

    try:
        model, tok = load(local_only=not online)
    except Exception as exc:
        if bare:
            raise ModelNotAvailableError(
                f"unknown model {name!r}; the zoo has: {_zoo_list()}; or give a local folder "
                f"or an org/name hub id" + ("" if online else " (the Hugging Face hub is unreachable here)")
            ) from exc
        if not online:
            raise ModelNotAvailableError(
                f"cannot reach the Hugging Face hub to fetch {name!r} (offline?) and it is not in the "
                f"local HF cache. Zoo models work offline: {_zoo_list()}"
            ) from exc
        raise ModelNotAvailableError(f"cannot load {name!r} from the Hugging Face hub: {exc}") from exc
    return place.finish(model), tok, _hub_snapshot_sha(name)


# --------------------------------------------------------------------------- objects


def _set_eager(model: Any) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter("eager")
            return
        except Exception as exc:  # an architecture without eager support, or an old transformers
            log(f"could not switch {type(model).__name__} to eager attention via the API: {exc}")
    try:
        model.config._attn_implementation = "eager"
    except Exception:
        log(f"{type(model).__name__}: attention implementation left as is; hooks may differ slightly")


def _from_object(
    model: PreTrainedModel, dtype: torch.dtype, device: torch.device, tokenizer: Any
) -> tuple[Any, Any, str]:
    label = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    if tokenizer is None:
        if not label:
            raise UserError("a model object was given without tokenizer=; pass its tokenizer")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(label, local_files_only=not hub_reachable())
        except Exception as exc:
            raise UserError(
                f"a model object was given without tokenizer= and no tokenizer could be loaded "
                f"from {label!r}; pass tokenizer="
            ) from exc
    _set_eager(model)
    return Placement(device, dtype).finish(model), tokenizer, label or type(model).__name__


# --------------------------------------------------------------------------- entry point


def _from_name(
    name: str, place: Placement, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str | None, Literal["zoo", "local", "hub"], str]:
    """A model by name: a zoo name, a local folder or a hub id, in that order. Returns the model,
    its tokenizer, its weights' hash, where it came from and its id."""
    if not name:
        raise UserError(f"empty model name; the zoo has: {_zoo_list()}")
    path = Path(name).expanduser()
    if name in zoo.ZOO:
        folder, sha = zoo.ensure_converted(name)
        model, tok = _from_folder(folder, place)
        return model, tok, sha, "zoo", name
    if _probe_path(path, name):
        if not path.is_dir():
            raise UserError(
                f"{name!r} is a file; give a model folder (with config.json) or a zoo name: {_zoo_list()}"
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"{str(path)!r} has no config.json, so it is not a Hugging Face model folder "
                f"(save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder))"
            )
        model, tok = _from_folder(path, place)
        return model, tok, weights_sha256(path), "local", str(path.resolve())
    if _looks_like_path(name):
        raise UserError(f"no such folder: {name!r}")
    model, tok, sha = _from_hub(name, place, tokenizer)
    return model, tok, sha, "hub", name


def load_hf(
    name_or_path: str | os.PathLike[str] | PreTrainedModel,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device_map: str | None = None,
    max_memory: str | dict[str, str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Provenance]:
    """Load a causal LM, its tokenizer and its provenance.

    ``name_or_path`` is a zoo name (converted once, then read from the cache), a local folder with
    ``config.json``, a ready ``PreTrainedModel`` (moved to ``device``/``dtype`` in place; give
    ``tokenizer``), or a hub id (``org/name``; fails within seconds when the hub is unreachable).
    ``device_map`` (``auto``...) spreads the layers over the node's devices with accelerate, CPU
    last, within ``max_memory`` per device ("cuda:0=10GiB,cpu=60GiB").
    """
    place = Placement.parse(device, dtype, device_map, max_memory)
    dt, dev = place.dtype, place.device
    t0 = time.perf_counter()
    source: Literal["zoo", "local", "hub", "object"]

    if not isinstance(name_or_path, str | os.PathLike):
        from transformers import PreTrainedModel as _PTM

        if not isinstance(name_or_path, _PTM):
            raise UserError(
                f"load_hf expects a zoo name, a folder, a hub id or a PreTrainedModel, "
                f"not {type(name_or_path).__name__}"
            )
        if device_map is not None:
            raise UserError("a device map places weights while loading: give a zoo name, a folder or a hub id")
        model, tok, model_id = _from_object(name_or_path, dt, dev, tokenizer)
        source, sha = "object", None
    else:
        model, tok, sha, source, model_id = _from_name(os.fspath(name_or_path).strip(), place, tokenizer)
        if tokenizer is not None:
            tok = tokenizer

    log(f"loaded {model_id} ({source}) in {time.perf_counter() - t0:.1f} s")
    provenance = Provenance(model_id=model_id, source=source, file_sha256=sha, dtype=str(dt),
                            device=place.describe(model))
    return model, tok, provenance
