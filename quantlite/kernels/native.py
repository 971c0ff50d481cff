"""ctypes binding of the native kernels (csrc/, C ABI in csrc/include/quantlite.h).

One hop from Python to C: check shapes and dtypes here (errors name the sizes and the back-end),
allocate the output, call the library. Libraries are built by `make native` into quantlite/_native/:
    libquantlite_cpu.so    AVX-512, AVX2/FMA or scalar (chosen by cpuid at run time), threaded
    libquantlite_cuda.so   GEMV + tensor-core kernels for sm_80 / 86 / 89 / 90
`cpu_status()` / `cuda_status()` say None when a back-end can run, else why not.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import weakref
from pathlib import Path

import torch

from quantlite.errors import QuantliteError
from quantlite.kernels.dispatch import ACTIVATIONS
from quantlite.kernels.prepared import COL_KINDS, VAL_KINDS, PreparedWeight, prepare
from quantlite.native import CPU_LIBRARY, CUDA_LIBRARY, NATIVE_DIR  # noqa: F401  where the build installs them
from quantlite.q8weight import Q8Weight
from quantlite.qweight import QWeight

ABI_VERSION = 7  # QL_ABI_VERSION in quantlite.h

DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ql_dtype
ISA_TAGS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}          # ql_isa, levels in order
QL_ERR_CUDA = 10                                                       # ql_status: see ql_cuda_last_error


class NativeKernelError(QuantliteError, ValueError):
    """A native kernel refused its arguments (shapes, dtypes, devices) or reported an error."""


class _Weight(ctypes.Structure):
    """ql_weight: the compute layout of quantlite.kernels.prepared, as raw pointers and storage tags."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("codes", ctypes.c_void_p),      # (N, Kp / 2) uint8, low nibble = even column
        ("scales", ctypes.c_void_p),     # (N, Kp / B) of scale_kind
        ("codebook", ctypes.c_void_p),   # (16,) float32
        ("row_ptr", ctypes.c_void_p),    # (N + 1,) int32
        ("cols", ctypes.c_void_p),       # (nnz,) of col_kind
        ("vals", ctypes.c_void_p),       # (nnz,) of val_kind
        ("nnz", ctypes.c_int64),
        ("scale_kind", ctypes.c_int32),  # ql_scale_kind: float32, float16, double-quantized
        ("col_kind", ctypes.c_int32),    # ql_col_kind: int32, uint16
        ("val_kind", ctypes.c_int32),    # ql_val_kind: float32, float16
        ("scale_group_min", ctypes.c_void_p),   # double-quantized: (groups,) float32
        ("scale_group_step", ctypes.c_void_p),
    ]


class _WeightInt8(ctypes.Structure):
    """ql_weight_int8: a Q8Weight's stored tensors, as raw pointers."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("qs", ctypes.c_void_p),         # (N, Kp) int8
        ("scales", ctypes.c_void_p),     # (N, Kp / B) float16
    ]


_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_MATMUL_ARGS = [ctypes.POINTER(_Weight), _PTR, _I64, _I64, _PTR, _I64, _INT]


def _declare(library: ctypes.CDLL, name: str, argtypes: list, restype=ctypes.c_int) -> None:
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, restype


@functools.cache
def _load(path: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why it cannot be used)."""
    if not path.exists():
        return None, f"{path.name} is not built (run `make native`)"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"{path.name} does not load: {error}"
    _declare(library, "ql_abi_version", [])
    _declare(library, "ql_error_string", [_INT], ctypes.c_char_p)
    if library.ql_abi_version() != ABI_VERSION:
        return None, f"{path.name} has ABI version {library.ql_abi_version()}, this binding wants {ABI_VERSION} (rebuild: `make native`)"
    if path == CPU_LIBRARY:
        _declare(library, "ql_cpu_qmatmul", _MATMUL_ARGS + [_INT, _INT])
        _declare(library, "ql_cpu_qmatmul_q8act", _MATMUL_ARGS + [_INT, _INT])
        _declare(library, "ql_cpu_dequantize", [ctypes.POINTER(_Weight), _PTR, _I64, _INT, _INT])
        _declare(library, "ql_cpu_dequantize_rows", [ctypes.POINTER(_Weight), _I64, _I64, _PTR, _I64, _INT, _INT, _INT])
        _declare(library, "ql_cpu_encode_codes", [_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _INT, _INT])
        _declare(library, "ql_cpu_qmatmul_int8", [ctypes.POINTER(_WeightInt8), _PTR, _I64, _I64, _PTR, _I64, _INT, _INT])
        _declare(library, "ql_cpu_best_isa", [])
        _declare(library, "ql_cpu_isa_name", [_INT], ctypes.c_char_p)
        _declare(library, "ql_cpu_gptq_columns", [_PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR])
    else:
        _declare(library, "ql_cuda_qmatmul", _MATMUL_ARGS + [_PTR])
        _declare(library, "ql_cuda_dequantize", [ctypes.POINTER(_Weight), _PTR, _I64, _INT, _PTR])
        _declare(library, "ql_cuda_device_count", [ctypes.POINTER(ctypes.c_int)])
        _declare(library, "ql_cuda_last_error", [], ctypes.c_char_p)
    return library, None


# ---------------------------------------------------------------------------- status
def cpu_status() -> str | None:
    """None when the CPU library is loaded and usable, else the reason."""
    return _load(CPU_LIBRARY)[1]


def cpu_isa() -> str:
    """The instruction set the CPU library runs on this machine: "avx512", "avx2" or "scalar"."""
    library = _cpu_library()
    return library.ql_cpu_isa_name(library.ql_cpu_best_isa()).decode()


def cpu_isas() -> list[str]:
    """Every instruction set qmatmul_cpu(isa=...) runs on this machine, lowest first (cpuid)."""
    best = _cpu_library().ql_cpu_best_isa()
    return [name for name, tag in ISA_TAGS.items() if 0 < tag <= best]


def cuda_status() -> str | None:
    """None when the CUDA library is loaded and a CUDA device is visible to it and to torch."""
    library, reason = _load(CUDA_LIBRARY)
    if reason:
        return reason
    count = ctypes.c_int(0)
    status = library.ql_cuda_device_count(ctypes.byref(count))
    if status != 0:
        return f"{CUDA_LIBRARY.name} loaded, but {library.ql_error_string(status).decode()}: {library.ql_cuda_last_error().decode()}"
    if not torch.cuda.is_available():
        return f"{CUDA_LIBRARY.name} sees {count.value} device(s), but this torch build has no CUDA"
    return None


def _cpu_library() -> ctypes.CDLL:
    global _cpu_library_loaded
    if _cpu_library_loaded is None:  # a global, not only functools.cache: this runs ~200 times a token
        library, reason = _load(CPU_LIBRARY)
        if reason:
            raise NativeKernelError(f"native cpu back-end: {reason}")
        _cpu_library_loaded = library
    return _cpu_library_loaded


_cpu_library_loaded: ctypes.CDLL | None = None
_CPU = torch.device("cpu")
_cpu_threads: int | None = None  # set by cpu_threads(); None: torch.get_num_threads()

def _threads(n_threads: int | None) -> int:
    """A CPU kernel call's thread count: as given, else cpu_threads()'s, else torch's."""
    return n_threads or _cpu_threads or torch.get_num_threads()


@contextlib.contextmanager
def cpu_threads(n_threads: int):
    """Within the block, CPU kernel calls that name no n_threads use `n_threads`, whatever torch's own
    intra-op thread count is (generate runs its decode steps with torch on one thread)."""
    global _cpu_threads
    before, _cpu_threads = _cpu_threads, n_threads
    try:
        yield
    finally:
        _cpu_threads = before


_int8_activations = False  # set by activations(); qmatmul_cpu's default when a call names none


def _check_activations(kind: str, where: str) -> None:
    if kind not in ACTIVATIONS:
        raise NativeKernelError(f"{where}: activations {kind!r} is not one of {', '.join(ACTIVATIONS)}")


@contextlib.contextmanager
def activations(kind: str):
    """Within the block, CPU qmatmul calls on 4-bit weights that name no `activations` multiply x as
    `kind`: "int8" is the opt-in ql_cpu_qmatmul_q8act (faster, at a perplexity cost docs/accuracy.md
    measures), "float32" the default. The runtime's `load(..., activations="int8")` runs its forward
    passes inside this block."""
    global _int8_activations
    _check_activations(kind, "native cpu qmatmul")
    before, _int8_activations = _int8_activations, kind == "int8"
    try:
        yield
    finally:
        _int8_activations = before


def int8_activations_on() -> bool:
    """Whether activations("int8") is in force (cpu_ops.DecodeLayers passes it to the native step)."""
    return _int8_activations


def _cuda_library() -> ctypes.CDLL:
    reason = cuda_status()
    if reason:
        raise NativeKernelError(f"native cuda back-end: {reason}")
    return _load(CUDA_LIBRARY)[0]


def _check(library: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        message = library.ql_error_string(status).decode()
        if status == QL_ERR_CUDA:
            message += f" ({library.ql_cuda_last_error().decode()})"
        raise NativeKernelError(f"{what}: {message}")


# ---------------------------------------------------------------------------- the weight as a C struct
# QWeight -> (device -> (PreparedWeight, _Weight, pointer to it)); the struct points into the
# prepared tensors, which the tuple keeps alive. Building it per call would cost more than a small
# GEMV, and so would ctypes.byref per call: the pointer is made once too. The CPU's entries are also
# kept by id(qw) in a plain dict (removed when qw dies, so an id is never reused while listed): the
# decode path asks ~120 times a token, and a WeakKeyDictionary lookup cost ~0.5 us of that.
_structs: "weakref.WeakKeyDictionary[QWeight, dict[str, tuple]]" = weakref.WeakKeyDictionary()
_cpu_pointers: dict[int, object] = {}


def _weight_pointer(qw: QWeight, device: torch.device):
    """ctypes pointer to qw's ql_weight on `device` (built once, then cached while qw lives)."""
    per_device = _structs.get(qw)
    key = device.type if device.index is None else str(device)
    if per_device is None or key not in per_device:
        prepared = prepare(qw, device)
        struct = _struct(prepared)
        per_device = _structs.setdefault(qw, {})
        per_device[key] = (prepared, struct, ctypes.pointer(struct))
        if key == "cpu":
            _cpu_pointers[id(qw)] = per_device[key][2]
            weakref.finalize(qw, _cpu_pointers.pop, id(qw), None)
    return per_device[key][2]


def _cpu_weight_pointer(qw: QWeight):
    pointer = _cpu_pointers.get(id(qw))
    return pointer if pointer is not None else _weight_pointer(qw, _CPU)


def _struct(prepared: PreparedWeight) -> _Weight:
    """The ql_weight pointing into a layout's tensors (which the caller keeps alive)."""
    dq = prepared.scale_group_min is not None
    return _Weight(
        n=prepared.n, k=prepared.k, block_size=prepared.block_size,
        codes=prepared.codes.data_ptr(), scales=prepared.scales.data_ptr(),
        codebook=prepared.codebook.data_ptr(), row_ptr=prepared.row_ptr.data_ptr(),
        cols=prepared.cols.data_ptr() if prepared.n_outliers else None,
        vals=prepared.vals.data_ptr() if prepared.n_outliers else None,
        nnz=prepared.n_outliers, scale_kind=prepared.scale_kind,
        col_kind=COL_KINDS[prepared.cols.dtype], val_kind=VAL_KINDS[prepared.vals.dtype],
        scale_group_min=prepared.scale_group_min.data_ptr() if dq else None,
        scale_group_step=prepared.scale_group_step.data_ptr() if dq else None,
    )


def _as_rows(x: torch.Tensor, qw: QWeight | Q8Weight, backend: str, kind: type = QWeight) -> torch.Tensor:
    """x (..., K) -> a (M, K) view or copy whose rows are contiguous, after checking it and that qw is a `kind`."""
    if not isinstance(x, torch.Tensor) or not isinstance(qw, kind):
        raise NativeKernelError(f"native {backend} qmatmul takes (Tensor, {kind.__name__}), got ({type(x).__name__}, {type(qw).__name__})")
    n, k = qw.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise NativeKernelError(
            f"native {backend} qmatmul: x has shape {tuple(x.shape)}, its last size must be K={k} "
            f"(the weight is N x K = {n} x {k})"
        )
    if x.dtype not in DTYPE_TAGS:
        raise NativeKernelError(f"native {backend} qmatmul: x is {x.dtype}, expected float32, float16 or bfloat16")
    return contiguous_rows(x, k)


def contiguous_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., k) as (M, k) whose rows are contiguous: a view where one does it, else a copy."""
    rows = x.reshape(-1, k)
    if rows.stride(1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < k):
        rows = rows.contiguous()
    return rows


def rows_stride(rows: torch.Tensor) -> int:
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]


# ---------------------------------------------------------------------------- CPU
def qmatmul_cpu(
    x: torch.Tensor,
    qw: QWeight,
    *,
    out: torch.Tensor | None = None,
    isa: str = "auto",
    n_threads: int | None = None,
    activations: str | None = None,
) -> torch.Tensor:
    """x (..., K) float32/float16/bfloat16 on the CPU -> (..., N) in x's dtype = x @ dequantize(qw).T,
    accumulated in float32. activations: "float32" (exact), "int8" (x quantized per block of 32 to
    int8, ql_cpu_qmatmul_q8act: an opt-in trading accuracy for speed), None: activations()'s setting
    (float32 unless inside activations("int8")). out: optional (M, N) tensor of x's dtype whose rows are contiguous
    (M = the product of x's leading sizes; its row stride may exceed N), written and returned as
    (..., N) when it is contiguous. isa: "auto" (the best, cpu_isa()), "avx512", "avx2" or "scalar"
    (any level up to cpu_isa()); n_threads: default torch.get_num_threads() (or cpu_threads()'s).
    Every M runs the library's kernels (with AVX-512, from 16 rows of x on, its prefill GEMM).

    The decode path calls this ~120 times a token with M = 1, so a contiguous x with no `out` goes
    straight to the library: no reshape, no copy, the weight's struct pointer cached (14 -> 9.5 us of
    CPU per call, 2.2 of them the C call; docs/runtime.md)."""
    library = _cpu_library_loaded or _cpu_library()
    if isa not in ISA_TAGS:
        raise NativeKernelError(f"native cpu qmatmul: isa {isa!r} is not one of {', '.join(ISA_TAGS)}")
    if activations is not None:
        _check_activations(activations, "native cpu qmatmul")
    int8 = _int8_activations if activations is None else activations == "int8"
    shape = x.shape if isinstance(x, torch.Tensor) else None
    if out is None and _is_contiguous_input(x, shape, qw):  # the runtime's case: x is the (M, K) rows as is
        n, k = qw.shape
        rows, m, row_stride, out_stride = x, x.numel() // k, k, n
        # a 1-D x (the runtime's decode step) allocates its output by size alone: 1.3 against 3 us
        y = out = torch.empty(n, dtype=x.dtype) if len(shape) == 1 else torch.empty(shape[:-1] + (n,), dtype=x.dtype)
    else:
        rows = _as_rows(x, qw, "cpu")
        if x.device.type != "cpu":
            raise NativeKernelError(f"native cpu qmatmul: x is on {x.device}, expected the CPU")
        m, row_stride = rows.shape[0], rows_stride(rows)
        out = _checked_out(out, m, qw.shape[0], x.dtype)
        out_stride = rows_stride(out)
        y = out.reshape(*x.shape[:-1], qw.shape[0]) if out.is_contiguous() else out
    if m:
        status = (library.ql_cpu_qmatmul_q8act if int8 else library.ql_cpu_qmatmul)(
            _cpu_weight_pointer(qw), rows.data_ptr(), m, row_stride, out.data_ptr(), out_stride,
            DTYPE_TAGS[x.dtype], ISA_TAGS[isa], n_threads or _cpu_threads or torch.get_num_threads(),
        )
        if status:
            _check(library, status, f"native cpu qmatmul{' (int8 activations)' if int8 else ''} "
                                    f"(M={m}, N={qw.shape[0]}, K={qw.shape[1]}, isa={isa})")
    return y


def _is_contiguous_input(x, shape, qw) -> bool:
    """Whether x (of `shape`, None if not a tensor) is a contiguous (..., K) CPU tensor of a kernel dtype
    for qw: no copy, no reshape needed."""
    return (shape is not None and type(qw) is QWeight and len(shape) > 0 and shape[-1] == qw.shape[1]
            and x.is_cpu and x.dtype in DTYPE_TAGS and x.is_contiguous())


def _checked_out(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A new (M, N) output, or the caller's after checking that the kernel can write its rows."""
    if out is None:
        return torch.empty(m, n, dtype=dtype)
    if (out.shape != (m, n) or out.dtype != dtype or out.device.type != "cpu" or out.stride(1) != 1
            or (m > 1 and out.stride(0) < n)):
        raise NativeKernelError(
            f"native cpu qmatmul: out must be a ({m}, {n}) {dtype} CPU tensor with contiguous rows, "
            f"got {tuple(out.shape)} {out.dtype} strides {out.stride()} on {out.device}"
        )
    return out


def dequantize_cpu(
    qw: QWeight,
    dtype: torch.dtype = torch.float32,
    *,
    rows: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    isa: str = "auto",
    n_threads: int | None = None,
) -> torch.Tensor:
    """Dense weight rows (n_end - n_begin, K) in `dtype` (float32/float16/bfloat16), outliers included,
    decoded by the CPU library. rows: (n_begin, n_end), default all N; out: optional tensor of that
    shape and dtype with contiguous rows (a buffer to reuse); isa as for qmatmul_cpu."""
    library = _cpu_library()
    where = "native cpu dequantize"
    if dtype not in DTYPE_TAGS:
        raise NativeKernelError(f"{where}: dtype {dtype} is not float32, float16 or bfloat16")
    if isa not in ISA_TAGS:
        raise NativeKernelError(f"{where}: isa {isa!r} is not one of {', '.join(ISA_TAGS)}")
    n, k = qw.shape
    n_begin, n_end = (0, n) if rows is None else rows
    if not 0 <= n_begin < n_end <= n:
        raise NativeKernelError(f"{where}: rows {rows} are not a non-empty range within the N = {n} rows")
    if out is None:
        out = torch.empty(n_end - n_begin, k, dtype=dtype)
    elif (out.shape != (n_end - n_begin, k) or out.dtype != dtype or out.device.type != "cpu" or out.stride(1) != 1
          or out.stride(0) < k):
        raise NativeKernelError(f"{where}: out must be a ({n_end - n_begin}, {k}) {dtype} CPU tensor with contiguous rows, "
                                f"got {tuple(out.shape)} {out.dtype} strides {out.stride()} on {out.device}")
    status = library.ql_cpu_dequantize_rows(_cpu_weight_pointer(qw), n_begin, n_end, out.data_ptr(), out.stride(0),
                                            DTYPE_TAGS[dtype], ISA_TAGS[isa], _threads(n_threads))
    _check(library, status, f"{where} (rows {n_begin}..{n_end} of N={n}, K={k}, isa={isa})")
    return out


def encode_codes(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
    column_weight: torch.Tensor | None = None,
    want_errors: bool = False,
    *,
    isa: str = "auto",
    n_threads: int | None = None,
):
    """The quantizer's code step, bit-exact with quantlite/quantizer.py, multi-threaded.

    blocks (N, Kp) float32 (or its (N, Kp/B, B) view), scales (N, Kp/B) float32, codebook (16,)
    float32 ascending -> codes (N, Kp/2) uint8, low nibble = even column, where a weight's code is
    the number of codebook midpoints below w * (1/scale) (0 for scale == 0). With want_errors, also
    returns (N, Kp/B) float32: per block, sum of column_weight[k] * (w - codebook[code] * scale)**2
    (column_weight (Kp,) float32, None = all ones; summed in float64, rounded once).
    """
    library = _cpu_library()
    where = "native cpu encode_codes"
    if blocks.dim() == 3:
        if blocks.shape[2] != block_size:
            raise NativeKernelError(f"{where}: blocks {tuple(blocks.shape)} does not end in the block size {block_size}")
        blocks = blocks.reshape(blocks.shape[0], -1)
    if blocks.dim() != 2 or blocks.dtype != torch.float32 or blocks.device.type != "cpu":
        raise NativeKernelError(f"{where}: blocks must be a 2-D float32 CPU tensor (N, Kp), got {tuple(blocks.shape)} {blocks.dtype} on {blocks.device}")
    n, padded_k = blocks.shape
    if block_size <= 0 or padded_k % block_size:
        raise NativeKernelError(f"{where}: Kp={padded_k} is not a multiple of block_size={block_size}")
    n_blocks = padded_k // block_size
    expected = {"scales": (scales, (n, n_blocks)), "codebook": (codebook, (16,))}
    if column_weight is not None:
        expected["column_weight"] = (column_weight, (padded_k,))
    for label, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise NativeKernelError(f"{where}: {label} must be float32 {shape} on the CPU, got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    blocks, scales, codebook = blocks.contiguous(), scales.contiguous(), codebook.contiguous()
    column_weight = None if column_weight is None else column_weight.contiguous()
    codes = torch.empty(n, padded_k // 2, dtype=torch.uint8)
    errors = torch.empty(n, n_blocks, dtype=torch.float32) if want_errors else None
    status = library.ql_cpu_encode_codes(
        blocks.data_ptr(), scales.data_ptr(), codebook.data_ptr(), n, padded_k, block_size,
        None if column_weight is None else column_weight.data_ptr(), codes.data_ptr(),
        None if errors is None else errors.data_ptr(), ISA_TAGS[isa], n_threads or torch.get_num_threads(),
    )
    _check(library, status, f"{where} (N={n}, Kp={padded_k}, B={block_size})")
    return (codes, errors) if want_errors else codes


def qmatmul_int8_cpu(x: torch.Tensor, qw: Q8Weight, *, n_threads: int | None = None) -> torch.Tensor:
    """x (..., K) float32/float16/bfloat16 on the CPU -> (..., N) in x's dtype = x @ qw.dequantize().T
    for a block-scaled int8 weight (csrc/cpu/qmatmul_int8.c), accumulated in float32."""
    library = _cpu_library()
    rows = _as_rows(x, qw, "cpu", Q8Weight)
    if x.device.type != "cpu" or qw.device.type != "cpu":
        raise NativeKernelError(f"native cpu int8 qmatmul: x is on {x.device}, the weight on {qw.device}; both must be on the CPU")
    (n, k), m = qw.shape, rows.shape[0]
    out = torch.empty(m, n, dtype=x.dtype)
    if m:
        qs, scales = qw.qs.contiguous(), qw.scales.contiguous()
        weight = _WeightInt8(n=n, k=k, block_size=qw.block_size, qs=qs.data_ptr(), scales=scales.data_ptr())
        status = library.ql_cpu_qmatmul_int8(ctypes.byref(weight), rows.data_ptr(), m, rows_stride(rows),
                                             out.data_ptr(), n, DTYPE_TAGS[x.dtype], _threads(n_threads))
        _check(library, status, f"native cpu int8 qmatmul (M={m}, N={n}, K={k})")
    return out.reshape(*x.shape[:-1], n)


def gptq_columns(
    work: torch.Tensor,
    column_scale: torch.Tensor,
    upper: torch.Tensor,
    codebook: torch.Tensor,
    is_outlier: torch.Tensor,
    quota: torch.Tensor | None,
    codes: torch.Tensor,
    errors: torch.Tensor,
) -> None:
    """GPTQ's innermost level in C (csrc/cpu/gptq.c; quantlite/gptq.py's Python loop is the
    reference): the S columns of one sub-block, in processing order, rounded one after the other,
    each one's error flowing into the later ones. A column of W is a row of N here:
    work (S, N) float32 (changed in place), column_scale (S, N) float32, upper (S, S) float32 (the
    sub-block's diagonal block of U, any strides: a view of the whole U), codebook (16,) float32,
    is_outlier (S, N) bool (the quota's choices are marked in it), quota (S,) int64 or None ->
    codes (S, N) uint8 and errors (S, N) float32 = (w - q) / U[j, j], written."""
    library = _cpu_library_loaded or _cpu_library()
    where = "native cpu gptq_columns"
    columns, n = work.shape
    expected = {"work": (work, (columns, n), torch.float32), "column_scale": (column_scale, (columns, n), torch.float32),
                "codebook": (codebook, (16,), torch.float32), "is_outlier": (is_outlier, (columns, n), torch.bool),
                "codes": (codes, (columns, n), torch.uint8), "errors": (errors, (columns, n), torch.float32)}
    if quota is not None:
        expected["quota"] = (quota, (columns,), torch.int64)
    for label, (tensor, shape, dtype) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_cpu or not tensor.is_contiguous():
            raise NativeKernelError(f"{where}: {label} must be a contiguous {dtype} CPU tensor {shape} (S = {columns} columns of "
                                    f"N = {n}), got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    if tuple(upper.shape) != (columns, columns) or upper.dtype != torch.float32 or not upper.is_cpu or min(upper.stride()) <= 0:
        raise NativeKernelError(f"{where}: upper must be a float32 CPU tensor ({columns}, {columns}) with positive strides, "
                                f"got {tuple(upper.shape)} {upper.dtype} strides {upper.stride()} on {upper.device}")
    status = library.ql_cpu_gptq_columns(
        work.data_ptr(), column_scale.data_ptr(), upper.data_ptr(), upper.stride(0), upper.stride(1), codebook.data_ptr(),
        is_outlier.data_ptr(), None if quota is None else quota.data_ptr(), columns, n, codes.data_ptr(), errors.data_ptr(),
    )
    _check(library, status, f"{where} (S={columns}, N={n})")


# ---------------------------------------------------------------------------- CUDA
def qmatmul_cuda(x: torch.Tensor, qw: QWeight) -> torch.Tensor:
    """x (..., K) float32/float16/bfloat16 on a CUDA device -> (..., N) in x's dtype, enqueued on the
    current stream. M <= 8 (and float32 x) runs the GEMV kernel, larger M the tensor-core kernel."""
    library = _cuda_library()
    rows = _as_rows(x, qw, "cuda")
    if x.device.type != "cuda":
        raise NativeKernelError(f"native cuda qmatmul: x is on {x.device}, expected a CUDA device")
    n = qw.shape[0]
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        with torch.cuda.device(x.device):
            weight = _weight_pointer(qw, x.device)
            stream = torch.cuda.current_stream(x.device).cuda_stream
            status = library.ql_cuda_qmatmul(
                weight, rows.data_ptr(), rows.shape[0], rows_stride(rows), out.data_ptr(), n,
                DTYPE_TAGS[x.dtype], stream,
            )
        _check(library, status, f"native cuda qmatmul (M={rows.shape[0]}, N={n}, K={qw.shape[1]}, {x.device})")
    return out.reshape(*x.shape[:-1], n)


def dequantize_cuda(qw: QWeight, dtype: torch.dtype = torch.float32, device: torch.device | str = "cuda") -> torch.Tensor:
    """(N, K) dense weight in `dtype` on a CUDA device, decoded by the CUDA library."""
    library = _cuda_library()
    device = torch.device(device)
    if device.type != "cuda" or dtype not in DTYPE_TAGS:
        raise NativeKernelError(f"native cuda dequantize: needs a CUDA device and float32/float16/bfloat16, got {device}, {dtype}")
    n, k = qw.shape
    out = torch.empty(n, k, dtype=dtype, device=device)
    with torch.cuda.device(device):
        status = library.ql_cuda_dequantize(_weight_pointer(qw, device), out.data_ptr(), k, DTYPE_TAGS[dtype],
                                            torch.cuda.current_stream(device).cuda_stream)
    _check(library, status, f"native cuda dequantize (N={n}, K={k}, {device})")
    return out
