"""Bundle format v1: round trips, MLX reads it as it is, and strict loading names each problem."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from cogbert_edge import Bundle, BundleError, load_bundle
from cogbert_edge.inference.bundle import MAX_HEADER_BYTES

from .helpers import needs_mlx


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def raw_header(text: bytes) -> bytes:
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def edit_meta(data: bytes, **changes) -> bytes:
    header, body = split(data)
    header["__metadata__"].update(changes)
    return join(header, body)


def drop_tensor(data: bytes, name: str) -> bytes:
    """Remove a tensor and its bytes, keeping the rest consistent."""
    header, body = split(data)
    begin, end = header.pop(name)["data_offsets"]
    size = end - begin
    for k, v in header.items():
        if k != "__metadata__" and v["data_offsets"][0] >= end:
            v["data_offsets"] = [v["data_offsets"][0] - size, v["data_offsets"][1] - size]
    return join(header, body[:begin] + body[end:])


def add_tensor(data: bytes, name: str, arr: np.ndarray, dtype: str = "F32") -> bytes:
    header, body = split(data)
    header[name] = {"dtype": dtype, "shape": list(arr.shape),
                    "data_offsets": [len(body), len(body) + arr.nbytes]}
    return join(header, body + arr.tobytes())


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_round_trip_through_bytes_and_file(bundles, bundle_files, quant):
    b = bundles[quant]
    for loaded in (load_bundle(b.to_bytes()), load_bundle(bundle_files[quant])):
        assert loaded.config == b.config
        assert loaded.model_id == b.model_id and loaded.parent == b.parent
        assert dict(loaded.quant) == dict(b.quant)
        assert set(loaded.tensors) == set(b.tensors)
        for k in b.tensors:
            np.testing.assert_array_equal(loaded.tensors[k], b.tensors[k])
    assert b.to_bytes() == load_bundle(b.to_bytes()).to_bytes(), "serialization is deterministic"


def test_loaded_tensors_are_read_only_views(bundles):
    loaded = load_bundle(bundles["int8"].to_bytes())
    w = loaded.tensors["lstm.ih.weight"]
    assert w.dtype == np.uint32 and not w.flags.writeable
    with pytest.raises(ValueError):
        w[0, 0] = 1


def test_data_section_is_8_byte_aligned_and_tensors_4_byte_aligned(bundles):
    data = bundles["int4"].to_bytes()
    n = struct.unpack_from("<Q", data)[0]
    assert (8 + n) % 8 == 0
    header, _ = split(data)
    assert all(v["data_offsets"][0] % 4 == 0 for k, v in header.items() if k != "__metadata__")


@needs_mlx
@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_mlx_core_load_reads_a_bundle_as_it_is(bundles, bundle_files, quant):
    import mlx.core as mx

    arrays, meta = mx.load(str(bundle_files[quant]), return_metadata=True)
    b = bundles[quant]
    assert meta == b.metadata()
    assert set(arrays) == set(b.tensors)
    for k, v in b.tensors.items():
        np.testing.assert_array_equal(np.array(arrays[k]), v)
    for name, spec in b.quant.items():   # and MLX dequantizes the packed layout to our weights
        w = mx.dequantize(arrays[f"{name}.weight"], arrays[f"{name}.scales"], arrays[f"{name}.biases"],
                          group_size=spec.group_size, bits=spec.bits)
        np.testing.assert_allclose(np.array(w), b.fp32_params()[f"{name}.weight"], atol=1e-6)


# Each hostile or broken file, and the words the error must contain.
def _cases(fp32: bytes, int8: bytes):
    header, body = split(fp32)
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])

    def with_entry(name, **changes):
        h = json.loads(json.dumps(header))
        h[name].update(changes)
        return join(h, body)

    overlap = json.loads(json.dumps(header))
    second = sorted((v["data_offsets"][0], k) for k, v in overlap.items() if k != "__metadata__")[1][1]
    b0, e0 = overlap[second]["data_offsets"]
    overlap[second]["data_offsets"] = [b0 - 4, e0 - 4]
    return {
        "empty file": (b"", "8-byte header length"),
        "header claims more bytes than the file has": (struct.pack("<Q", 4096) + b"{}", "only"),
        "absurd header size": (struct.pack("<Q", 1 << 62) + b"{}" + b" " * 6, "over the"),
        "header just over the limit": (struct.pack("<Q", MAX_HEADER_BYTES + 8) + b"{" * 16, "over the"),
        "non-UTF-8 header": (struct.pack("<Q", 8) + b"{\xff\xfe    }", "UTF-8"),
        "not JSON": (struct.pack("<Q", 8) + b"{not js}", "not valid JSON"),
        "deeply nested JSON": (raw_header(b'{"a":' + b"[" * 1020 + b"]" * 1020 + b"}"), "not valid JSON"),
        "nested tensor entry": (join({"__metadata__": {}, "a": json.loads("[" * 50 + "]" * 50)}, b""),
                                "entry must"),
        "duplicate keys": (struct.pack("<Q", 16) + b'{"a":1, "a":2}  ', "duplicate"),
        "missing tensor": (drop_tensor(fp32, "lstm.hh.weight"), "missing tensors ['lstm.hh.weight']"),
        "extra tensor": (add_tensor(fp32, "lstm.peephole", np.zeros(4, np.float32)),
                         "unexpected tensors ['lstm.peephole']"),
        "mis-shaped tensor": (with_entry("policy.bias", shape=[2, 4]), "shape"),
        "wrong dtype, unsupported": (with_entry(first, dtype="F16"), "not F32 or U32"),
        "wrong dtype, U32 for F32": (with_entry("policy.bias", dtype="U32"), "expected F32"),
        "offsets outside the data": (with_entry(first, data_offsets=[0, len(body) + 4]), "outside"),
        "offsets disagree with shape": (with_entry("value.bias", data_offsets=[
            header["value.bias"]["data_offsets"][0], header["value.bias"]["data_offsets"][0] + 8]), "needs 4 bytes"),
        "overlapping tensors": (join(overlap, body), "overlaps"),
        "trailing bytes": (fp32 + b"\0" * 8, "trailing bytes"),
        "truncated data": (fp32[:-4], "outside"),
        "wrong format": (edit_meta(fp32, format="onnx"), "not a Cogbert bundle"),
        "newer format version": (edit_meta(fp32, format_version="2"), "version '2' is not supported"),
        "unknown metadata key": (edit_meta(fp32, owner="me"), "unknown metadata keys ['owner']"),
        "bad config": (edit_meta(fp32, config='{"obs_dim": 64}'), "invalid model config"),
        "config disagrees with tensors": (edit_meta(fp32, config=json.dumps(
            {"obs_dim": 32, "encoder": [256], "hidden": 256, "action": {"kind": "discrete", "size": 8}})),
            "shape"),
        "quantization not matching tensors": (edit_meta(int8, quantization=json.dumps(
            {"kind": "none", "layers": {}})), "unexpected tensors"),
        "bad bits": (edit_meta(int8, quantization=json.dumps(
            {"kind": "affine", "layers": {"lstm.hh": {"bits": 3, "group_size": 64}}})), "bits must be"),
        "bad created_at": (edit_meta(fp32, created_at="yesterday"), "RFC 3339"),
        "bad model id": (edit_meta(fp32, model_id="../../etc"), "model_id"),
    }


def test_each_broken_bundle_raises_a_bundle_error_naming_the_problem(bundles):
    cases = _cases(bundles["fp32"].to_bytes(), bundles["int8"].to_bytes())
    for what, (data, words) in cases.items():
        with pytest.raises(BundleError) as err:
            load_bundle(data)
        assert words in str(err.value), f"{what}: {err.value}"


def _replace_tensor(data: bytes, name: str, value: np.ndarray) -> bytes:
    header, body = split(data)
    begin, end = header[name]["data_offsets"]
    return join(header, body[:begin] + value.astype("<f4").tobytes() + body[end:])


def test_nan_weights_and_non_positive_std_are_rejected(bundles):
    data = bundles["fp32"].to_bytes()
    bias = np.zeros(8, np.float32)
    bias[3] = np.nan
    with pytest.raises(BundleError, match="NaN or Inf"):
        load_bundle(_replace_tensor(data, "policy.bias", bias))
    with pytest.raises(BundleError, match="strictly positive"):
        load_bundle(_replace_tensor(data, "obs_norm.std", np.zeros(64, np.float32)))


def test_every_truncation_of_a_bundle_is_rejected(bundles):
    data = bundles["int4"].to_bytes()
    n = struct.unpack_from("<Q", data)[0]
    cuts = list(range(0, 8 + n + 16)) + list(range(8 + n + 16, len(data), 997))
    for cut in cuts:
        with pytest.raises(BundleError):
            load_bundle(data[:cut])


def test_unreadable_path_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match="cannot read bundle"):
        load_bundle(tmp_path / "nope.safetensors")


def test_free_form_x_metadata_survives_a_round_trip(config, params):
    b = Bundle.create(config, params, extra={"x-train-return": "412.5"})
    assert load_bundle(b.to_bytes()).extra == {"x-train-return": "412.5"}
