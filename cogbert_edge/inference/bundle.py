"""Bundle format v1: a Cogbert model in one safetensors file. See ``docs/bundle-format.md``.

Reading is strict, because bundle bytes are untrusted until every check has passed: the
safetensors layer (header length, UTF-8, JSON, offsets that tile the data exactly) and the
model layer (metadata, the exact set of tensors the config implies, their dtypes and shapes,
finite values) each raise :class:`BundleError` naming what is wrong. Loading never copies
tensor data; tensors are read-only views of the bundle's bytes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from cogbert_edge._internal.fs import atomic_write
from cogbert_edge.errors import BundleError, ConfigError
from cogbert_edge.inference.model import ARCHITECTURE, ModelConfig
from cogbert_edge.inference.quant import QuantSpec, dequantize

__all__ = ["Bundle", "load_bundle", "FORMAT", "FORMAT_VERSION", "MAX_HEADER_BYTES", "MAX_BUNDLE_BYTES"]

FORMAT = "cogbert-bundle"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20      # real headers are ~2 KiB; anything near this is hostile
MAX_BUNDLE_BYTES = 1 << 30
MAX_TENSORS = 256
MAX_RANK = 4
_MAX_QUOTES = 8 * 1024
_MAX_CONTAINERS = 2 * 1024
_DTYPES = {"F32": np.dtype("<f4"), "U32": np.dtype("<u4")}
# Whole-string matches (fullmatch: no trailing newline) over ASCII only ([0-9], not \d).
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_TENSOR_RE = re.compile(r"[a-z0-9_.]{1,128}")
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z")
_REQUIRED_META = {"format", "format_version", "model_id", "architecture", "config",
                  "normalization", "quantization", "created_at", "parent"}

Source = str | os.PathLike | bytes | bytearray | memoryview


@dataclass(frozen=True)
class Bundle:
    """A validated model: its config, its tensors (read-only) and its metadata.

    ``quant`` maps each quantized layer to its :class:`QuantSpec`; layers not in it are fp32.
    ``extra`` holds the free-form ``x-`` metadata entries (training metrics, lineage notes).
    """

    config: ModelConfig
    tensors: Mapping[str, np.ndarray]
    model_id: str
    created_at: str
    parent: str = ""
    quant: Mapping[str, QuantSpec] = field(default_factory=dict)
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, config: ModelConfig, tensors: Mapping[str, np.ndarray], *,
               quant: Mapping[str, QuantSpec] | None = None, model_id: str | None = None,
               parent: str = "", extra: Mapping[str, str] | None = None,
               created_at: str | None = None) -> Bundle:
        """Build a bundle from parameters and check it exactly as a loaded one is checked."""
        bundle = cls(
            config=config,
            tensors=MappingProxyType({k: _readonly(_as_stored(v)) for k, v in tensors.items()}),
            model_id=model_id or new_model_id(),
            created_at=created_at or _now(),
            parent=parent,
            quant=MappingProxyType(dict(quant or {})),
            extra=MappingProxyType(dict(extra or {})),
        )
        _validate(bundle)
        return bundle

    @property
    def quant_label(self) -> str:
        """``fp32``, ``int8``, ``int4`` or ``mixed`` (several bit widths)."""
        bits = {q.bits for q in self.quant.values()}
        if not bits:
            return "fp32"
        return f"int{bits.pop()}" if len(bits) == 1 else "mixed"

    def fp32_params(self) -> dict[str, np.ndarray]:
        """All parameters as fp32 ``[out, in]`` weights, dequantizing quantized layers."""
        params = {k: v for k, v in self.tensors.items()
                  if not k.endswith((".scales", ".biases"))}
        for name, spec in self.quant.items():
            t = self.tensors
            params[f"{name}.weight"] = dequantize(t[f"{name}.weight"], t[f"{name}.scales"],
                                                  t[f"{name}.biases"], spec)
        return params

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` map (all values strings)."""
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model_id": self.model_id,
            "architecture": ARCHITECTURE,
            "config": self.config.to_json(),
            "normalization": _dumps({"kind": "standardize", "clip": self.config.obs_clip}),
            "quantization": _dumps({
                "kind": "affine" if self.quant else "none",
                "layers": {k: q.to_dict() for k, q in sorted(self.quant.items())},
            }),
            "created_at": self.created_at,
            "parent": self.parent,
        }
        meta.update(self.extra)
        return meta

    def to_bytes(self) -> bytes:
        """Serialize: deterministic for the same content (tensors sorted by name)."""
        header: dict[str, Any] = {"__metadata__": self.metadata()}
        offset = 0
        names = sorted(self.tensors)
        for name in names:
            t = self.tensors[name]
            header[name] = {"dtype": _dtype_name(t), "shape": list(t.shape),
                            "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = _dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        parts = [struct.pack("<Q", len(raw)), raw]
        parts += [self.tensors[n].astype(_DTYPES[_dtype_name(self.tensors[n])], copy=False).tobytes()
                  for n in names]
        return b"".join(parts)

    def save(self, path: str | os.PathLike) -> int:
        """Write atomically (temp file, fsync, rename); returns the number of bytes written."""
        data = self.to_bytes()
        atomic_write(Path(path), data)
        return len(data)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def new_model_id() -> str:
    return "m-" + secrets.token_hex(8)


def load_bundle(source: Source) -> Bundle:
    """Load and fully validate a bundle from a path or from bytes.

    Raises :class:`BundleError` naming the first problem found. Tensors are zero-copy views.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source) if not isinstance(source, bytes) else source
        if len(data) > MAX_BUNDLE_BYTES:
            raise BundleError(f"{len(data)} bytes is over the {MAX_BUNDLE_BYTES}-byte bundle limit")
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > MAX_BUNDLE_BYTES:
                raise BundleError(f"{path}: {size} bytes is over the {MAX_BUNDLE_BYTES}-byte bundle limit")
            data = path.read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read bundle {path}: {e.strerror or e}") from e
    meta, tensors = _parse_safetensors(data)
    bundle = _from_parts(meta, tensors)
    _validate(bundle)
    return bundle


# -- safetensors layer -----------------------------------------------------------------------


def _parse_safetensors(data: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    if len(data) < 8:
        raise BundleError(f"file is {len(data)} bytes; a bundle starts with an 8-byte header length")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_HEADER_BYTES:
        raise BundleError(f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
    if n > len(data) - 8:
        raise BundleError(f"header claims {n} bytes but only {len(data) - 8} follow the length field")
    if n < 2 or n % 8:
        raise BundleError(f"header length {n} is not a positive multiple of 8")
    try:
        text = data[8:8 + n].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"header is not valid UTF-8 (byte {e.start})") from None
    if not text.startswith("{"):
        raise BundleError("header does not start with '{'")
    # A real header holds a few dozen JSON containers and strings. Bounding their number
    # before parsing bounds the memory the parse can take to a small multiple of the header.
    if text.count('"') > _MAX_QUOTES or text.count("{") + text.count("[") > _MAX_CONTAINERS:
        raise BundleError("header holds far more JSON values than any bundle has")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"header is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(header, dict):
        raise BundleError("header is not a JSON object")

    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BundleError("__metadata__ is missing or not a map of strings")
    if len(header) > MAX_TENSORS:
        raise BundleError(f"{len(header)} tensors is over the limit of {MAX_TENSORS}")

    body = memoryview(data)[8 + n:]
    spans = []
    for name, entry in header.items():
        if not _TENSOR_RE.fullmatch(name):
            raise BundleError(f"invalid tensor name {name[:64]!r}")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise BundleError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise BundleError(f"tensor {name!r}: dtype {str(dtype)[:16]!r} is not F32 or U32")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(_is_uint(d) for d in shape)):
            raise BundleError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise BundleError(f"tensor {name!r}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if not begin <= end <= len(body):
            raise BundleError(f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the "
                              f"{len(body)}-byte data section")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise BundleError(f"tensor {name!r}: shape {shape} needs {nbytes} bytes, offsets give {end - begin}")
        spans.append((begin, end, name, dtype, shape))

    spans.sort()
    cursor = 0
    for begin, end, name, _, _ in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise BundleError(f"tensor {name!r} {what} (offset {begin}, expected {cursor})")
        cursor = end
    if cursor != len(body):
        raise BundleError(f"data section has {len(body) - cursor} trailing bytes no tensor covers")

    tensors = {}
    for begin, end, name, dtype, shape in spans:
        dt = _DTYPES[dtype]
        arr = np.frombuffer(data, dtype=dt, count=(end - begin) // dt.itemsize, offset=8 + n + begin)
        tensors[name] = _readonly(arr.reshape(shape))
    return meta, tensors


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 53


# -- model layer -----------------------------------------------------------------------------


def _from_parts(meta: dict[str, str], tensors: dict[str, np.ndarray]) -> Bundle:
    missing = _REQUIRED_META - set(meta)
    if missing:
        raise BundleError(f"metadata is missing {sorted(missing)}")
    unknown = [k for k in meta if k not in _REQUIRED_META and not k.startswith("x-")]
    if unknown:
        raise BundleError(f"unknown metadata keys {sorted(unknown)[:8]} (free-form keys must start with 'x-')")
    if meta["format"] != FORMAT:
        raise BundleError(f"not a Cogbert bundle (format {meta['format'][:40]!r})")
    if meta["format_version"] != str(FORMAT_VERSION):
        raise BundleError(f"bundle format version {meta['format_version'][:16]!r} is not supported; "
                          f"this SDK reads version {FORMAT_VERSION} (upgrade cogbert to read newer bundles)")
    if meta["architecture"] != ARCHITECTURE:
        raise BundleError(f"unknown architecture {meta['architecture'][:40]!r}; expected {ARCHITECTURE!r}")

    norm = _json_field(meta, "normalization")
    if not isinstance(norm, dict) or set(norm) != {"kind", "clip"} or norm["kind"] != "standardize":
        raise BundleError("normalization must be {\"kind\": \"standardize\", \"clip\": <number>}")
    clip = norm["clip"]
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        raise BundleError("normalization.clip must be a number")
    try:
        clip = float(clip)
    except OverflowError:
        raise BundleError("normalization.clip is too large for a double") from None
    try:
        config = ModelConfig.from_dict(_json_field(meta, "config"), obs_clip=clip)
    except ConfigError as e:
        raise BundleError(f"invalid model config: {e}") from None

    q = _json_field(meta, "quantization")
    if not isinstance(q, dict) or set(q) != {"kind", "layers"} or not isinstance(q["layers"], dict):
        raise BundleError("quantization must be {\"kind\": ..., \"layers\": {...}}")
    quant: dict[str, QuantSpec] = {}
    for name, spec in q["layers"].items():
        if not isinstance(spec, dict) or set(spec) != {"bits", "group_size"}:
            raise BundleError(f"quantization of {name!r} must be {{\"bits\", \"group_size\"}}")
        try:
            quant[name] = QuantSpec(spec["bits"], spec["group_size"])
        except ConfigError as e:
            raise BundleError(f"quantization of {name!r}: {e}") from None
    if q["kind"] != ("affine" if quant else "none"):
        raise BundleError(f"quantization kind {str(q['kind'])[:16]!r} does not match its layers")

    return Bundle(config=config, tensors=MappingProxyType(tensors), model_id=meta["model_id"],
                  created_at=meta["created_at"], parent=meta["parent"],
                  quant=MappingProxyType(quant),
                  extra=MappingProxyType({k: v for k, v in meta.items() if k.startswith("x-")}))


def expected_tensors(config: ModelConfig, quant: Mapping[str, QuantSpec]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor a bundle with this config and quantization holds."""
    expected = {name: ("F32", shape) for name, shape in config.param_shapes().items()}
    layers = {layer.name: layer for layer in config.layers()}
    for name, spec in quant.items():
        layer = layers[name]
        expected[f"{name}.weight"] = ("U32", (layer.out_dim, spec.packed_cols(layer.in_dim)))
        expected[f"{name}.scales"] = ("F32", (layer.out_dim, spec.groups(layer.in_dim)))
        expected[f"{name}.biases"] = ("F32", (layer.out_dim, spec.groups(layer.in_dim)))
    return expected


def _validate(b: Bundle) -> None:
    if not _NAME_RE.fullmatch(b.model_id):
        raise BundleError(f"model_id {b.model_id[:40]!r} must match {_NAME_RE.pattern}")
    if b.parent and not _NAME_RE.fullmatch(b.parent):
        raise BundleError(f"parent {b.parent[:40]!r} must be empty or a model id")
    if not _TIME_RE.fullmatch(b.created_at):
        raise BundleError(f"created_at {b.created_at[:40]!r} is not an RFC 3339 UTC time (…Z)")
    for key, value in b.extra.items():
        if not key.startswith("x-") or not isinstance(value, str):
            raise BundleError(f"extra metadata {key[:40]!r} must be an 'x-' key with a string value")

    layers = {layer.name: layer for layer in b.config.layers()}
    for name, spec in b.quant.items():
        layer = layers.get(name)
        if layer is None:
            raise BundleError(f"quantization names {name!r}, which is not a layer of this model")
        if layer.in_dim % spec.group_size:
            raise BundleError(f"layer {name!r}: input width {layer.in_dim} is not a multiple of group size "
                              f"{spec.group_size}")

    expected = expected_tensors(b.config, b.quant)
    missing = sorted(set(expected) - set(b.tensors))
    extra = sorted(set(b.tensors) - set(expected))
    if missing:
        raise BundleError(f"missing tensors {missing[:8]}")
    if extra:
        raise BundleError(f"unexpected tensors {extra[:8]}")
    for name, (dtype, shape) in expected.items():
        t = b.tensors[name]
        if _dtype_name(t) != dtype:
            raise BundleError(f"tensor {name!r} has dtype {_dtype_name(t)}; expected {dtype}")
        if tuple(t.shape) != shape:
            raise BundleError(f"tensor {name!r} has shape {tuple(t.shape)}; the config implies {shape}")
        if dtype == "F32" and not np.isfinite(t).all():
            raise BundleError(f"tensor {name!r} holds NaN or Inf values")
    if not (b.tensors["obs_norm.std"] > 0).all():
        raise BundleError("tensor 'obs_norm.std' must be strictly positive")


def _json_field(meta: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key], object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BundleError(f"metadata {key!r} is not valid JSON") from None


def _dtype_name(t: np.ndarray) -> str:
    if t.dtype == np.float32:
        return "F32"
    if t.dtype == np.uint32:
        return "U32"
    return str(t.dtype)


def _as_stored(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else a.dtype)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False
    return a


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
