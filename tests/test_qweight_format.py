"""QWeight's flat-dict format (docs/FORMAT.md): round trips, and what QWeight.from_dict must reject."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlite import qweight as qweight_module
from quantlite.errors import FormatError
from quantlite.qweight import FORMAT_NAME, OUTLIER_FIELDS, QWeight, stored_nbytes
from quantlite.quantizer import quantize


def meta_tensor(meta) -> torch.Tensor:
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


@pytest.fixture(params=["quantlite", "nf4", "rtn"])
def qweight(request, generator) -> QWeight:
    # 70 x 200 with block 64: K is padded to 256, so the last block of every row has 56 padding codes
    w = 0.02 * torch.randn(70, 200, generator=generator)
    w[3, 17] = 1.5  # an outlier the quantlite method keeps exactly
    return quantize(w, method=request.param, block_size=64, outlier_frac=0.01 if request.param == "quantlite" else 0.0)


def test_round_trip_through_dict_and_safetensors(qweight, tmp_path):
    flat = qweight.to_dict("model.layers.0.mlp.down_proj.weight.")
    assert all(name.startswith("model.layers.0.mlp.down_proj.weight.") for name in flat)
    again = QWeight.from_dict(flat, prefix="model.layers.0.mlp.down_proj.weight.")
    qweight.save(tmp_path / "w.safetensors")
    loaded = QWeight.load(tmp_path / "w.safetensors")
    for other in (again, loaded):
        assert other.shape == qweight.shape and other.block_size == 64 and other.method == qweight.method
        assert torch.equal(other.dequantize(torch.float64), qweight.dequantize(torch.float64))
        for name, tensor in qweight.to_dict().items():
            assert torch.equal(other.to_dict()[name], tensor), name


def test_documented_layout(qweight):
    """The facts docs/FORMAT.md states, checked against what quantize() writes."""
    n, k = qweight.shape
    assert qweight.codes.shape == (n, 256 // 2) and qweight.codes.dtype == torch.uint8
    unpacked = qweight.unpacked_codes()
    assert torch.equal(unpacked[:, 0::2], qweight.codes & 0x0F)  # low nibble = even column
    zero = int((qweight.codebook == 0).nonzero())
    assert bool((unpacked[:, k:] == zero).all())  # padding holds the zero code
    assert qweight.outlier_row_ptr.dtype == torch.int32 and qweight.outlier_cols.dtype == torch.uint16
    meta = json.loads(bytes(qweight.to_dict()["meta"].tolist()))
    assert meta == {"format": FORMAT_NAME, "version": 1, "shape": [n, k], "block_size": 64, "method": qweight.method}
    if qweight.double_quant:
        assert qweight.scale_codes.shape == (n, 4) and qweight.scale_group_min.shape == (-(-n * 4 // 256),)
    if qweight.n_outliers:
        rows = torch.repeat_interleave(torch.arange(n), torch.diff(qweight.outlier_row_ptr.long()))
        assert bool((unpacked[rows, qweight.outlier_cols.long()] == zero).all())  # zero code under outliers
        assert qweight.dequantize()[3, 17] == torch.tensor(1.5, dtype=torch.float16).float()


def test_a_weight_without_outliers_stores_no_csr_tensors(qweight):
    stored = qweight.to_dict()
    assert all((name in stored) == (qweight.n_outliers > 0) for name in OUTLIER_FIELDS)
    again = QWeight.from_dict(stored)
    assert torch.equal(again.outlier_row_ptr, qweight.outlier_row_ptr)  # all zeros when nothing is stored
    assert again.outlier_cols.dtype == torch.uint16 and again.outlier_vals.dtype == torch.float16


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 80), k=st.integers(1, 300), block=st.sampled_from([32, 64, 128, 256]),
       method=st.sampled_from(["quantlite", "nf4", "rtn"]), double_quant=st.booleans(),
       scale_dtype=st.sampled_from([torch.float16, torch.float32]), outliers=st.integers(0, 40))
def test_stored_nbytes_is_what_to_dict_stores(n, k, block, method, double_quant, scale_dtype, outliers):
    w = torch.randn(n, k)
    q = quantize(w, method=method, block_size=block, double_quant=double_quant, scale_dtype=scale_dtype,
                 outlier_frac=min(outliers, n * k) / (n * k) * 0.25)
    assert q.nbytes == stored_nbytes((n, k), block, method, double_quant=double_quant, scale_dtype=scale_dtype,
                                     n_outliers=q.n_outliers)


def _mutations(q: QWeight) -> list[tuple[str, dict, str]]:
    d = q.to_dict()
    n, _ = q.shape
    cases = [
        ("missing codes", {k: v for k, v in d.items() if k != "codes"}, "missing tensor 'codes'"),
        ("codes int8", {**d, "codes": d["codes"].to(torch.int8)}, "codes has dtype int8"),
        ("codes short", {**d, "codes": d["codes"][:, :-1].contiguous()}, "codes has shape"),
        ("codebook desc", {**d, "codebook": d["codebook"].flip(0).contiguous()}, "ascending"),
        ("codebook no zero", {**d, "codebook": d["codebook"] + 0.01}, "0.0 exactly once"),
        ("codebook fp16", {**d, "codebook": d["codebook"].half()}, "codebook has dtype"),
        ("meta version", {**d, "meta": meta_tensor({**_meta(d), "version": 2})}, "version 2 is not supported"),
        ("meta format", {**d, "meta": meta_tensor({**_meta(d), "format": "gguf"})}, "does not describe"),
        ("meta block", {**d, "meta": meta_tensor({**_meta(d), "block_size": 40})}, "block_size 40"),
        ("meta shape", {**d, "meta": meta_tensor({**_meta(d), "shape": [n, 0]})}, "two positive integers"),
        ("meta shape lie", {**d, "meta": meta_tensor({**_meta(d), "shape": [n + 1, 200]})}, "codes has shape"),
        ("meta bool", {**d, "meta": meta_tensor({**_meta(d), "block_size": True})}, "block_size True"),
        ("meta junk", {**d, "meta": meta_tensor(b"\xff\x00garbage")}, "not UTF-8 JSON"),
        ("meta huge", {**d, "meta": torch.zeros(5000, dtype=torch.uint8)}, "at most 4096 bytes"),
        ("meta empty", {**d, "meta": meta_tensor(b"")}, "not UTF-8 JSON"),
    ]
    if q.double_quant:
        cases += [
            ("both scales", {**d, "scales": torch.ones(n, 4)}, "exactly one of"),
            ("no group min", {k: v for k, v in d.items() if k != "scale_group_min"}, "need 'scale_group_min'"),
            ("group step nan", {**d, "scale_group_step": d["scale_group_step"] * float("nan")}, "must be finite"),
        ]
    else:
        cases += [
            ("no scales", {k: v for k, v in d.items() if k != "scales"}, "exactly one of"),
            ("negative scale", {**d, "scales": -d["scales"]}, "non-negative"),
            ("inf scale", {**d, "scales": d["scales"] * float("inf")}, "finite"),
            ("scales int", {**d, "scales": d["scales"].int()}, "scales has dtype"),
        ]
    if q.n_outliers == 0:  # the CSR tensors are absent; adding only some of them is refused
        cases += [
            ("only cols", {**d, "outlier_cols": torch.zeros(0, dtype=torch.uint16)}, "all three or not at all"),
            ("no row_ptr", {**d, "outlier_cols": torch.zeros(0, dtype=torch.uint16),
                            "outlier_vals": torch.zeros(0, dtype=torch.float16)}, "missing 'outlier_row_ptr'"),
        ]
    if q.n_outliers >= 2:
        cols = d["outlier_cols"].clone()
        last_out = cols.clone()
        last_out[-1] = 200  # only the last row's last outlier: found in the last chunk of rows checked
        cases += [
            ("last col out of range", {**d, "outlier_cols": last_out}, "outside"),
            ("row_ptr end", {**d, "outlier_row_ptr": d["outlier_row_ptr"] + 1}, "must start at 0"),
            ("row_ptr int64", {**d, "outlier_row_ptr": d["outlier_row_ptr"].long()}, "outlier_row_ptr has dtype"),
            ("cols vs vals", {**d, "outlier_cols": torch.zeros(q.n_outliers + 1, dtype=torch.uint16)}, "one length"),
            ("no vals", {k: v for k, v in d.items() if k != "outlier_vals"}, "missing 'outlier_vals'"),
            ("col out of range", {**d, "outlier_cols": torch.full_like(cols, 200)}, "outside"),
            ("vals nan", {**d, "outlier_vals": d["outlier_vals"] * float("nan")}, "finite"),
            ("row_ptr decreasing", {**d, "outlier_row_ptr": _decreasing(d["outlier_row_ptr"])}, "decreases"),
            ("cols int32", {**d, "outlier_cols": cols.to(torch.int32)}, "outlier_cols has dtype"),
        ]
    return cases


def _meta(d: dict) -> dict:
    return json.loads(bytes(d["meta"].tolist()))


def _decreasing(row_ptr: torch.Tensor) -> torch.Tensor:
    changed = row_ptr.clone()
    changed[1] = changed[-1]  # jumps to nnz then back down
    return changed


@pytest.mark.parametrize("chunk", [None, 3])
def test_every_violation_is_a_format_error(qweight, monkeypatch, chunk):
    """chunk: the outliers checked at a time (qweight.OUTLIER_CHECK_CHUNK), small enough that the
    rows are checked a few at a time; a valid weight still passes."""
    if chunk is not None:
        monkeypatch.setattr(qweight_module, "OUTLIER_CHECK_CHUNK", chunk)
    assert torch.equal(QWeight.from_dict(qweight.to_dict()).dequantize(), qweight.dequantize())
    for label, tensors, message in _mutations(qweight):
        with pytest.raises(FormatError, match=message):
            QWeight.from_dict(tensors, name=label)


def test_unsorted_outlier_columns_within_a_row_are_refused(generator):
    w = 0.02 * torch.randn(4, 64, generator=generator)
    w[1, 5], w[1, 40] = 2.0, -2.0
    q = quantize(w, outlier_frac=2 / 256)
    d = q.to_dict()
    assert q.n_outliers == 2 and d["outlier_row_ptr"].tolist() == [0, 0, 2, 2, 2]
    with pytest.raises(FormatError, match="strictly ascending"):
        QWeight.from_dict({**d, "outlier_cols": torch.tensor([40, 5], dtype=torch.int32).to(torch.uint16)})


@settings(max_examples=60, deadline=1000)
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_arbitrary_meta_bytes_raise_only_format_error(raw):
    base = quantize(torch.linspace(-1, 1, 64 * 4).reshape(4, 64), method="rtn").to_dict()
    try:
        QWeight.from_dict({**base, "meta": meta_tensor(raw)})
    except FormatError:
        pass


# ---------------------------------------------------------------------------------------- holes
# Validation holes found while writing this file, now closed in QWeight.from_dict: each test states a
# rule of docs/FORMAT.md.
def test_deeply_nested_meta_is_a_format_error():
    base = quantize(torch.linspace(-1, 1, 128).reshape(2, 64), method="rtn").to_dict()
    with pytest.raises(FormatError):
        QWeight.from_dict({**base, "meta": meta_tensor(b"[" * 4000)})


def test_double_quantized_scales_must_not_decode_negative(generator):
    d = quantize(0.02 * torch.randn(8, 64, generator=generator)).to_dict()
    with pytest.raises(FormatError):
        QWeight.from_dict({**d, "scale_group_min": -d["scale_group_min"].abs() - 1.0})


def test_codes_under_outliers_must_be_the_zero_code(generator):
    w = 0.02 * torch.randn(8, 64, generator=generator)
    w[2, 9] = 3.0
    d = quantize(w, outlier_frac=1 / 512).to_dict()
    with pytest.raises(FormatError):
        QWeight.from_dict({**d, "codes": torch.full_like(d["codes"], 0xFF)})


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_1(version):
    base = quantize(torch.linspace(-1, 1, 128).reshape(2, 64), method="rtn").to_dict()
    with pytest.raises(FormatError, match="version"):
        QWeight.from_dict({**base, "meta": meta_tensor({**_meta(base), "version": version})})


@pytest.mark.parametrize("method, outlier_frac", [("nf4", 0.0), ("quantlite", 0.02)])
def test_dequantize_rows_equals_the_rows_of_dequantize(method, outlier_frac, generator):
    """Plain (nf4: float32 scales) and double-quantized scales, with outliers: bit for bit, rows in any order."""
    w = torch.randn(300, 100, generator=generator)
    qw = quantize(w, method=method, outlier_frac=outlier_frac, max_bits_per_weight=None)
    assert (qw.scales is None) is (method == "quantlite") and (qw.n_outliers > 0) is (outlier_frac > 0)
    rows = torch.randint(0, 300, (40,), generator=generator)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(qw.dequantize_rows(rows, dtype), qw.dequantize(dtype)[rows])
