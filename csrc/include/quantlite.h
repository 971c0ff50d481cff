/* quantlite.h: the C ABI of quantlite's native kernels (CPU: libquantlite_cpu.so, CUDA:
 * libquantlite_cuda.so). Plain C, no C++ or CUDA types, so any runtime can embed it.
 *
 * The operation (docs/native.md, docs/FORMAT.md for the stored form):
 *
 *     y[m, n] = sum_k x[m, k] * W[n, k]      W[n, k] = codebook[code(n, k)] * scales[n, k / B] + S[n, k]
 *
 * W is (N, K) = (out_features, in_features), quantized in blocks of B weights along K, K padded up to
 * Kp = ceil(K / B) * B with the zero code; S is a sparse matrix of outliers in CSR form. The weight is
 * handed over as docs/FORMAT.md stores it (every array contiguous, row-major): scales float32,
 * float16 or double-quantized, outlier columns int32 or uint16, outlier values float32 or float16,
 * each named by a tag (the CPU kernels read every kind as it is; CUDA takes the all-zero tags).
 * x and y are row-major with a row stride (elements, >= K resp. >= N) and one dtype tag for both;
 * every kernel accumulates in float32.
 *
 * Every function returns QL_OK (0) or an error code; ql_error_string() turns it into a message.
 * The CUDA entry points take device pointers and enqueue on `stream` (a cudaStream_t, NULL = the
 * legacy default stream); they return once the work is enqueued.
 */
#ifndef QUANTLITE_H
#define QUANTLITE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QL_ABI_VERSION 7  /* 2: QL_ISA_AVX512, ql_cpu_qmatmul_int8; 3: ql_cpu_dequantize_rows;
                             4: ql_weight's storage tags (stored scales / outliers, no widened copies);
                             5: the decode-step primitives (ql_cpu_rms_norm, ...);
                             6: ql_cpu_decode_layer (decoder layers' decode step);
                             7: ql_cpu_qmatmul_q8act (int8 activations, opt-in),
                                ql_decode_layer_args.int8_activations, ql_cpu_gptq_columns
                                (GPTQ's column loop) */

#if defined(_WIN32)
#define QL_API __declspec(dllexport)
#else
#define QL_API __attribute__((visibility("default")))
#endif

/* ---------------------------------------------------------------- error codes */
typedef enum {
    QL_OK = 0,
    QL_ERR_NULL_POINTER = 1,     /* a required pointer is NULL */
    QL_ERR_BAD_SIZE = 2,         /* M, N or K <= 0, or nnz < 0 */
    QL_ERR_BAD_BLOCK_SIZE = 3,   /* B not a multiple of 16 in [32, 256] */
    QL_ERR_BAD_STRIDE = 4,       /* a row stride smaller than the row */
    QL_ERR_BAD_DTYPE = 5,        /* dtype tag not one of ql_dtype */
    QL_ERR_BAD_ISA = 6,          /* the instruction set asked for is not supported by this CPU */
    QL_ERR_OUT_OF_MEMORY = 7,    /* host scratch allocation failed */
    QL_ERR_BAD_OUTLIERS = 8,     /* row_ptr not 0..nnz non-decreasing, or a column outside [0, K) */
    QL_ERR_NO_CUDA_DEVICE = 9,   /* no CUDA driver or device */
    QL_ERR_CUDA = 10,            /* a CUDA runtime call or launch failed (see ql_cuda_last_error) */
    QL_ERR_MISALIGNED = 11,      /* CUDA: codes not 8-byte aligned (the kernels load them 8 or 16 bytes at a time) */
    QL_ERR_BAD_LAYOUT = 12       /* a storage tag unknown, or (CUDA) not float32 / int32 / float32 */
} ql_status;

/* ---------------------------------------------------------------- dtype tags (x and y) */
typedef enum {
    QL_F32 = 0,   /* IEEE float32 */
    QL_F16 = 1,   /* IEEE float16 */
    QL_BF16 = 2   /* bfloat16 */
} ql_dtype;

/* ---------------------------------------------------------------- CPU instruction sets */
typedef enum {
    QL_ISA_AUTO = 0,    /* the best this CPU supports (cpuid at run time) */
    QL_ISA_SCALAR = 1,  /* portable C */
    QL_ISA_AVX2 = 2,    /* AVX2 + FMA */
    QL_ISA_AVX512 = 3   /* AVX-512 F (qmatmul; the encoder runs its AVX2 code there) */
} ql_isa;

/* ---------------------------------------------------------------- the weight (as stored) */
typedef enum {
    QL_SCALES_F32 = 0,   /* scales: (N, Kp / B) float32 */
    QL_SCALES_F16 = 1,   /* scales: (N, Kp / B) IEEE float16 bits */
    QL_SCALES_DQ = 2     /* scales: (N, Kp / B) uint8 codes; scale i (row-major) = group_min[i / 256] +
                            code * group_step[i / 256], in float32 (a multiply, then an add) */
} ql_scale_kind;

typedef enum {
    QL_COLS_I32 = 0,     /* cols: (nnz,) int32 */
    QL_COLS_U16 = 1      /* cols: (nnz,) uint16 (K <= 65536) */
} ql_col_kind;

typedef enum {
    QL_VALS_F32 = 0,     /* vals: (nnz,) float32 */
    QL_VALS_F16 = 1      /* vals: (nnz,) IEEE float16 bits */
} ql_val_kind;

/* Every tag 0 is the widened layout that ABI version 3 took; the struct is longer than version 3's,
 * so only the version check (ql_abi_version) keeps a caller built against version 3 out. */
typedef struct {
    int64_t n;                /* N: output features (rows of W) */
    int64_t k;                /* K: input features (columns of W, before padding) */
    int64_t block_size;       /* B: weights per scale along K, a multiple of 16 */
    const uint8_t *codes;     /* (N, Kp / 2) uint8: two codes per byte, low nibble = even column */
    const void *scales;       /* (N, Kp / B) of scale_kind */
    const float *codebook;    /* (16,) float32 */
    const int32_t *row_ptr;   /* (N + 1,) int32: CSR row pointers into cols / vals */
    const void *cols;         /* (nnz,) of col_kind: column of each outlier, ascending in a row */
    const void *vals;         /* (nnz,) of val_kind: added to W at (row, col) */
    int64_t nnz;              /* number of outliers (cols / vals may be NULL when 0) */
    int32_t scale_kind;       /* ql_scale_kind */
    int32_t col_kind;         /* ql_col_kind */
    int32_t val_kind;         /* ql_val_kind */
    const float *scale_group_min;   /* QL_SCALES_DQ: (ceil(N * Kp / B / 256),) float32, else NULL */
    const float *scale_group_step;  /* QL_SCALES_DQ: likewise */
} ql_weight;

/* Scales per (group_min, group_step) pair of QL_SCALES_DQ (docs/FORMAT.md). */
#define QL_SCALE_GROUP 256

/* A block-scaled int8 weight (docs/FORMAT.md, section 1b): W[n, k] = qs[n, k] * scales[n, k / B]. */
typedef struct {
    int64_t n;                /* N: output features */
    int64_t k;                /* K: input features, before padding */
    int64_t block_size;       /* B: weights per scale along K, a multiple of 16 */
    const int8_t *qs;         /* (N, Kp) int8 in [-127, 127], padding columns 0 */
    const uint16_t *scales;   /* (N, Kp / B) IEEE float16 bits */
} ql_weight_int8;

QL_API int ql_abi_version(void);
QL_API const char *ql_error_string(int status);

/* ---------------------------------------------------------------- CPU (libquantlite_cpu.so) */
/* y (M, N) = x (M, K) @ W^T. x: rows of `x_row_stride` elements; y: rows of `y_row_stride`.
 * n_threads <= 0: one per available core. isa: QL_ISA_AUTO unless a test wants one path (any level
 * up to ql_cpu_best_isa(); a higher one is QL_ERR_BAD_ISA). */
QL_API int ql_cpu_qmatmul(const ql_weight *w, const void *x, int64_t m, int64_t x_row_stride,
                          void *y, int64_t y_row_stride, int dtype, int isa, int n_threads);

/* out (N, K) = W, dense, in `dtype`, rows of `out_row_stride` elements (the best isa cpuid has). */
QL_API int ql_cpu_dequantize(const ql_weight *w, void *out, int64_t out_row_stride, int dtype,
                             int n_threads);

/* out (n_end - n_begin, K) = rows [n_begin, n_end) of W, as ql_cpu_dequantize, for a caller that
 * needs a dense slice of the weight. isa as for ql_cpu_qmatmul: AVX-512 has its own code, AVX2 runs the scalar one. */
QL_API int ql_cpu_dequantize_rows(const ql_weight *w, int64_t n_begin, int64_t n_end, void *out,
                                  int64_t out_row_stride, int dtype, int isa, int n_threads);

/* The offline quantizer's inner step (bit-exact with quantlite/quantizer.py):
 *   blocks (N, Kp) float32, scales (N, Kp / B) float32, codebook (16,) float32 ascending
 *   -> codes (N, Kp / 2) uint8, low nibble = even column: code = #{i : mid[i] < w * r}, with
 *      mid[i] = (codebook[i] + codebook[i + 1]) / 2 and r = 1 / max(scale, FLT_MIN) if scale > 0 else 0.
 *   errors (N, Kp / B) float32 or NULL: per block, sum_k column_weight[k] * (w - codebook[code] * scale)^2,
 *      column_weight (Kp,) float32 or NULL (= all ones). */
QL_API int ql_cpu_encode_codes(const float *blocks, const float *scales, const float *codebook,
                               int64_t n, int64_t padded_k, int64_t block_size,
                               const float *column_weight, uint8_t *codes, float *errors,
                               int isa, int n_threads);

/* y (M, N) = x (M, K) @ W^T for an int8 weight; arguments as for ql_cpu_qmatmul. The instruction
 * set is chosen by cpuid on each call (AVX-512, AVX2 or baseline; qmatmul_int8.c). */
QL_API int ql_cpu_qmatmul_int8(const ql_weight_int8 *w, const void *x, int64_t m, int64_t x_row_stride,
                               void *y, int64_t y_row_stride, int dtype, int n_threads);

/* y (M, N) ~= x (M, K) @ W^T with x quantized to int8 (an opt-in that trades accuracy for speed;
 * arguments as for ql_cpu_qmatmul). The rule (csrc/cpu/qmatmul_q8act_scalar.c): x per row and block
 * of 32 columns (16 when 32 does not divide B) to int8 with one float32 scale (absmax / 127,
 * round half to even), the codebook to int8 levels round(127 * level / max |level|), each block's
 * int32 dot product times (weight scale x activation scale) summed in float32, the outliers added
 * with the float x. isa: QL_ISA_AVX512 runs AVX-512 VNNI (vpdpbusd) where cpuid reports AVX-512 F,
 * BW and VNNI; QL_ISA_AVX2 (and AVX-512 without VNNI) runs AVX2 (vpmaddubsw); QL_ISA_SCALAR the
 * portable C rule. Every M runs the same kernel (no separate prefill GEMM). */
QL_API int ql_cpu_qmatmul_q8act(const ql_weight *w, const void *x, int64_t m, int64_t x_row_stride,
                                void *y, int64_t y_row_stride, int dtype, int isa, int n_threads);

/* The instruction set QL_ISA_AUTO picks on this CPU (the highest it supports; every lower level runs
 * too), and its name ("avx512", "avx2", "scalar"). */
QL_API int ql_cpu_best_isa(void);
QL_API const char *ql_cpu_isa_name(int isa);

/* ---------------------------------------------------------------- CUDA (libquantlite_cuda.so) */
/* Device pointers; `stream` is a cudaStream_t. M <= 8 (or fp32 x) runs the GEMV kernel, larger M
 * with fp16 / bf16 x the tensor-core kernel. */
QL_API int ql_cuda_qmatmul(const ql_weight *w, const void *x, int64_t m, int64_t x_row_stride,
                           void *y, int64_t y_row_stride, int dtype, void *stream);
QL_API int ql_cuda_dequantize(const ql_weight *w, void *out, int64_t out_row_stride, int dtype,
                              void *stream);
/* Number of visible devices (QL_ERR_NO_CUDA_DEVICE when the driver is missing or reports none). */
QL_API int ql_cuda_device_count(int *count);
/* The message of the last CUDA runtime error seen by this library in this thread. */
QL_API const char *ql_cuda_last_error(void);

/* ---------------------------------------------------------------- CPU decode-step primitives
 * The float32 work of a decode step between the matmuls (csrc/cpu/decode_ops.c, which draws the
 * layouts; quantlite/runtime/llama.py holds the same math in torch). Single-threaded except
 * ql_cpu_decode_attention over a large batch and the matmuls of ql_cpu_decode_layer. */

/* out (rows, n) = weight * (x * 1 / sqrt(mean(x^2) + eps)) per row; x rows of x_row_stride (>= n)
 * floats, out contiguous (it may be x when the stride is n). */
QL_API int ql_cpu_rms_norm(const float *x, int64_t rows, int64_t n, int64_t x_row_stride,
                           const float *weight, float eps, float *out);

/* out (rows, n) = silu(gate) * up, silu(g) = g / (1 + exp(-g)); gate_up rows of row_stride (>= 2n)
 * floats, gate in columns [0, n), up in [n, 2n); out contiguous. */
QL_API int ql_cpu_silu_mul(const float *gate_up, int64_t rows, int64_t n, int64_t row_stride, float *out);

/* One new position per sequence of a batch (all at the same cache index). */
typedef struct {
    int64_t batch;            /* B */
    int64_t heads;            /* H query heads, a multiple of kv_heads */
    int64_t kv_heads;         /* Hkv */
    int64_t head_dim;         /* D, even */
    int64_t position;         /* the cache index written: keys [0, position] are attended to */
    int64_t capacity;         /* L: positions the cache holds, > position */
    const float *qkv;         /* (B, (H + 2 Hkv) * D): q heads, k heads, v heads */
    const float *cos;         /* (B, D) RoPE cos at each sequence's position */
    const float *sin;         /* (B, D) RoPE sin, first half negated */
    const float *q_norm;      /* (D,) per-head RMSNorm weight of q before RoPE, or NULL (none) */
    const float *k_norm;      /* (D,) the same for k, or NULL */
    float eps;                /* of q_norm / k_norm */
    float scale;              /* on q . k, usually 1 / sqrt(D) */
    const float *mask;        /* (B, mask_row_stride) additive over keys [0, position], or NULL */
    int64_t mask_row_stride;  /* >= position + 1 */
    float *keys;              /* (B, Hkv, L, D) the key cache; row `position` is written */
    float *values;            /* (B, Hkv, L, D) the value cache; likewise */
    float *out;               /* (B, H * D) */
} ql_decode_attention_args;

/* out = softmax(rope(q) . keys^T * scale + mask) @ values per query head, after writing rope(k) and
 * v at `position`; n_threads as for ql_cpu_qmatmul (used only when the batch's work is large). */
QL_API int ql_cpu_decode_attention(const ql_decode_attention_args *args, int n_threads);

/* One decode step of a pre-norm decoder layer (quantlite/runtime/llama.py's decoder_layer, in the
 * same operations and order: the result equals the per-op calls bit for bit):
 *     h = rms_norm(x) * input_norm;            qkv = h @ W_qkv^T (+ b_qkv)
 *     a = decode_attention(qkv) (as above);    x1 = x + (a @ W_o^T (+ b_o))
 *     h = rms_norm(x1) * post_attention_norm;  g = silu_mul(h @ W_gate_up^T (+ b_gate_up))
 *     out = x1 + (g @ W_down^T (+ b_down))
 * The matmuls are ql_cpu_qmatmul (float32, QL_ISA_AUTO, n_threads). `attention` holds the attention's
 * arguments except qkv and out (the layer's own scratch; they are ignored); attention.batch rows. */
typedef struct {
    int64_t hidden;                 /* E: x's row */
    int64_t intermediate;           /* F: the MLP's width */
    const ql_weight *qkv;           /* ((H + 2 Hkv) * D, E): q, k, v rows */
    const ql_weight *o;             /* (E, H * D) */
    const ql_weight *gate_up;       /* (2F, E): gate rows, then up rows */
    const ql_weight *down;          /* (E, F) */
    const float *qkv_bias;          /* ((H + 2 Hkv) * D,) or NULL; likewise the others */
    const float *o_bias;            /* (E,) */
    const float *gate_up_bias;      /* (2F,) */
    const float *down_bias;         /* (E,) */
    const float *input_norm;        /* (E,) */
    const float *post_attention_norm;  /* (E,) */
    float eps;                      /* of both norms */
    ql_decode_attention_args attention;
    const float *x;                 /* (B, E) contiguous, the layer's input */
    float *out;                     /* (B, E) contiguous, the layer's output (may be x) */
    double matmul_seconds;          /* out: wall seconds inside the four ql_cpu_qmatmul calls */
    double attention_seconds;       /* out: wall seconds inside the attention */
    int32_t int8_activations;       /* 0: the matmuls are ql_cpu_qmatmul; 1: ql_cpu_qmatmul_q8act (the
                                       opt-in; read from layers[0] for every layer of the call) */
} ql_decode_layer_args;

/* n_layers consecutive layers, layer i's output layer i + 1's input: layers[0] holds the step (x, out,
 * and the attention's position, cos, sin, mask, mask_row_stride), which the others' fields are set
 * to (their x and out to layers[0].out: the stream runs in place there). Each layer adds its own
 * matmul and attention seconds. */
QL_API int ql_cpu_decode_layer(ql_decode_layer_args *layers, int64_t n_layers, int n_threads);

/* ---------------------------------------------------------------- GPTQ's column loop (csrc/cpu/gptq.c)
 * The offline quantizer's GPTQ pass, innermost level (bit-identical with quantlite/gptq.py's Python
 * loop): `columns` (S) consecutive columns of the processing order rounded one after the other, each
 * one's scaled rounding error e = (w - q) / U[j, j] flowing into the later ones by
 * w' = fma(-U[j, j'], e, w'). The weight is held transposed, a column of W = a row of N floats:
 *   work (S, N) float32 in place, column_scale (S, N) float32, upper (S, S) float32 with U[j, j'] at
 *   upper[j * upper_row_stride + j' * upper_column_stride] (the diagonal block of U, the upper
 *   Cholesky factor of H^-1; strides > 0, in floats),
 *   codebook (16,) float32 ascending with a 0 level, is_outlier (S, N) uint8 0/1 in and out,
 *   quota (S,) int64 in [0, N] or NULL: per column, how many more weights to keep exact (those of
 *   the largest |w - q|, ties to the lower row)
 *   -> codes (S, N) uint8 (code = #{i : mid[i] < w * r} as ql_cpu_encode_codes; the zero level's at
 *      outliers, where q = w), errors (S, N) float32 = e (0 at outliers). Single-threaded. */
QL_API int ql_cpu_gptq_columns(float *work, const float *column_scale, const float *upper, int64_t upper_row_stride,
                               int64_t upper_column_stride, const float *codebook, uint8_t *is_outlier, const int64_t *quota, int64_t columns,
                               int64_t n, uint8_t *codes, float *errors);

#ifdef __cplusplus
}
#endif

#endif /* QUANTLITE_H */
