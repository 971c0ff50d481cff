/* The per-instruction-set kernels behind the CPU entry points (api.c). Each processes a range of
 * output rows [n_begin, n_end) and is called from worker threads with disjoint ranges. */
#ifndef QL_CPU_KERNELS_H
#define QL_CPU_KERNELS_H

#include <stdint.h>

#include "pool.h"
#include "quantlite.h"

typedef struct {
    const ql_weight *w;
    int64_t padded_k;        /* Kp = ceil(K / B) * B */
    const void *x;           /* (M, K) in `dtype`, rows x_row_stride apart */
    int64_t m, x_row_stride;
    void *y;                 /* (M, N) in `dtype`, rows y_row_stride apart */
    int64_t y_row_stride;
    int dtype;
    /* AVX2: x in float32, each row's groups of 8 columns in the order (0, 2, 4, 6, 1, 3, 5, 7)
     * in which the AVX2 kernel decodes weights, padding columns zero. M <= 8: (Kp / 8, M, 8), per
     * group the M rows side by side (the register path reads them together); M > 8: (M, Kp), row
     * after row (the GEMM's x tiles, measured faster so at K = 11008). AVX-512: tiles of 8 rows
     * in strips of 128 columns (ql_avx512_x_position); the GEMMs: groups of 16 (AVX-512) or 8
     * (AVX2) rows (ql_gemm_x_position). */
    const float *x_packed;
    /* (K, M) float32, AVX2 and AVX-512: x transposed, so that the outliers of a column meet its M
     * rows of x side by side (chunk.h); at M = 1, x itself. NULL for the GEMMs (they add the
     * outliers to their decoded weights). */
    const float *x_columns;
    float *scratch;                    /* per thread: ql_avx2_scratch_floats, ql_avx512_scratch_floats,
                                          ql_gemm_avx512_scratch_floats or ql_gemm_avx2_scratch_floats */
    int64_t scratch_floats_per_thread;
    int *status;                       /* QL_OK, or the error a chunk met (chunk.h: a malformed CSR) */
    uint64_t call;                     /* this call's number (api.c counts them), by which a thread
                                          knows that its scratch already holds what it built for the
                                          call at an earlier chunk (qmatmul_avx512.c's strip table) */
} ql_matmul_job;

/* Dequantization of weight rows [n_begin, n_end) into out ((n_end - n_begin, K) in `dtype`, rows
 * out_row_stride apart); a kernel handles a sub-range [begin, end) of them. */
typedef struct {
    const ql_weight *w;
    int64_t padded_k;
    int64_t n_begin;
    void *out;
    int64_t out_row_stride;
    int dtype;
} ql_dequantize_job;

/* Rows of x up to which x_packed interleaves them per group of 8 columns. */
#define QL_PACKED_MAX_M 8

/* Where column k of x's row m sits in x_packed, for M rows of Kp columns. */
static inline int64_t ql_packed_position(int64_t k, int64_t m, int64_t rows, int64_t padded_k) {
    const int64_t in_group = ((k & 1) ? 4 : 0) + ((k & 7) >> 1);
    return rows <= QL_PACKED_MAX_M ? (k & ~(int64_t)7) * rows + m * 8 + in_group : m * padded_k + (k & ~(int64_t)7) + in_group;
}

/* x rows per tile of the AVX-512 kernel, and where column k of x's row m sits in its x_packed
 * (64-byte aligned, M * strips * 128 floats): tile t = rows 8t .. 8t + x_rows - 1, x_rows =
 * min(8, M - 8t), stored as (strips, 8, x_rows, 16) with strips = ceil(Kp / 128); lane l of vector
 * v of strip s is column 128 s + 8 l + v, the order in which the kernel decodes a strip's codes. */
#define QL_AVX512_X_TILE 8
/* count rounded up to whole 64-byte lines (the call buffer's and scratch's alignment) */
static inline int64_t ql_aligned_bytes(int64_t count) { return (count + 63) / 64 * 64; }

#define QL_AVX512_STRIP 128

static inline int64_t ql_avx512_x_position(int64_t k, int64_t m, int64_t rows, int64_t padded_k) {
    const int64_t strips = (padded_k + QL_AVX512_STRIP - 1) / QL_AVX512_STRIP;
    const int64_t tile = m / QL_AVX512_X_TILE, left = rows - tile * QL_AVX512_X_TILE;
    const int64_t x_rows = left < QL_AVX512_X_TILE ? left : QL_AVX512_X_TILE;
    const int64_t strip = k / QL_AVX512_STRIP, lane = (k % QL_AVX512_STRIP) / 8, v = k % 8;
    return tile * QL_AVX512_X_TILE * strips * QL_AVX512_STRIP + ((strip * 8 + v) * x_rows + m % QL_AVX512_X_TILE) * 16 + lane;
}

/* The prefill GEMM (gemm.h: gemm_avx512.c, gemm_avx2.c) from this many rows of x on, with either
 * instruction set (the crossover from the small-M kernels: AVX-512 M = 12: tiles 10.0 ms, GEMM 13.7;
 * M = 16: 11.3 and 10.2; AVX2 M = 12: its old GEMM 14.5 ms, this one 17.4; M = 16: 18.0 and 17.6;
 * 4096 x 4096, one thread); its x_packed: (G, Kp, group), G = ceil(M / group), group g = rows
 * group * g .. group * (g + 1) - 1 side by side per column, rows past M zero; group = the floats of
 * a vector. */
#define QL_GEMM_MIN_M 16
#define QL_GEMM_PANEL_ROWS 256  /* weight rows a GEMM decodes into one panel (gemm.h), at most */
#define QL_GEMM_AVX512_X_GROUP 16
#define QL_GEMM_AVX2_X_GROUP 8

static inline int64_t ql_gemm_x_position(int64_t k, int64_t m, int64_t padded_k, int64_t group) {
    return ((m / group) * padded_k + k) * group + m % group;
}

/* Output rows one parallel chunk should hold at least (a multiple of every kernel's row tile). */
#define QL_ROW_GRAIN 32

/* Below this many weights x rows of x one thread is faster: waking a worker costs a few
 * microseconds, and a 576 x 576 GEMV (SmolLM2's attention projections) takes about 20. */
#define QL_PARALLEL_MIN_WEIGHTS (1 << 18)

/* The smallest chunk of rows a thread takes, but for the GEMMs (QL_GEMM_PANEL_ROWS: a smaller chunk
 * decodes a smaller panel, and x is read once per panel): the pool hands out 1 / (4 x threads) of
 * the rows left, at least this, so only the last few chunks are this small. */
#define QL_MIN_CHUNK_ROWS (2 * QL_ROW_GRAIN)

/* The pool's grain for n_rows output rows: all of them (one chunk: no hand-off) when the call is
 * too small to share, else min_rows, but no more than n_rows / (4 x threads) rounded up to
 * QL_ROW_GRAIN, so that a small call still has ~4 chunks a thread (a GEMM of 576 rows: 6 of 96
 * rows at 2 threads, not 256 + 256 + 64, which would leave one thread 25 % more rows). */
static inline int64_t ql_row_grain(int64_t n_rows, int64_t weights_per_row, int64_t min_rows, int n_threads) {
    if (n_rows * weights_per_row < QL_PARALLEL_MIN_WEIGHTS) return n_rows;
    if (n_threads <= 0) n_threads = ql_available_cores();
    const int64_t chunks = 4 * (int64_t)n_threads, per_chunk = (n_rows + chunks - 1) / chunks;
    const int64_t even_share = (per_chunk + QL_ROW_GRAIN - 1) / QL_ROW_GRAIN * QL_ROW_GRAIN;
    return even_share < min_rows ? even_share : min_rows;
}

typedef struct {
    const float *blocks;         /* (N, Kp) float32 */
    const float *scales;         /* (N, Kp / B) float32 */
    const float *codebook;       /* (16,) float32 ascending */
    const float *column_weight;  /* (Kp,) float32 or NULL */
    int64_t padded_k, block_size;
    uint8_t *codes;              /* (N, Kp / 2) uint8 out */
    float *errors;               /* (N, Kp / B) float32 out, or NULL */
} ql_encode_job;

void ql_qmatmul_rows_scalar(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index);
void ql_qmatmul_rows_avx2(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index);
int64_t ql_avx2_scratch_floats(const ql_matmul_job *job);
void ql_qmatmul_rows_avx512(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index);
int64_t ql_avx512_scratch_floats(const ql_matmul_job *job);
void ql_gemm_rows_avx512(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index);
int64_t ql_gemm_avx512_scratch_floats(const ql_matmul_job *job);
void ql_gemm_rows_avx2(const ql_matmul_job *job, int64_t n_begin, int64_t n_end, int thread_index);
int64_t ql_gemm_avx2_scratch_floats(const ql_matmul_job *job);
void ql_dequantize_rows_scalar(const ql_dequantize_job *job, int64_t begin, int64_t end);
void ql_dequantize_rows_avx512(const ql_dequantize_job *job, int64_t begin, int64_t end);
void ql_encode_rows_scalar(const ql_encode_job *job, int64_t n_begin, int64_t n_end);
void ql_encode_rows_avx2(const ql_encode_job *job, int64_t n_begin, int64_t n_end);

/* Rows of one block's squared error, shared by both encoders: the quantizer's float32 arithmetic
 * (w - level * scale), squared and weighted in double so the sum does not depend on its order. */
static inline float ql_block_error(const float *w, const uint8_t *block_codes_unpacked,
                                   const float *codebook, float scale, const float *column_weight,
                                   int64_t count) {
    double sum = 0.0;
    for (int64_t j = 0; j < count; ++j) {
        float level_times_scale = codebook[block_codes_unpacked[j]] * scale;
        float diff = w[j] - level_times_scale;
        double squared = (double)diff * (double)diff;
        sum += column_weight ? squared * column_weight[j] : squared;
    }
    return (float)sum;
}

/* Packs one block's unpacked codes (low nibble = even column) and, when asked, stores its error. */
static inline void ql_finish_block(const ql_encode_job *job, int64_t n, int64_t b, const uint8_t *block_codes,
                                   const float *w, float scale) {
    const int64_t block = job->block_size;
    uint8_t *packed = job->codes + n * (job->padded_k / 2) + b * (block / 2);
    for (int64_t j = 0; j < block; j += 2) packed[j / 2] = (uint8_t)(block_codes[j] | block_codes[j + 1] << 4);
    if (job->errors)
        job->errors[n * (job->padded_k / block) + b] = ql_block_error(
            w, block_codes, job->codebook, scale, job->column_weight ? job->column_weight + b * block : NULL, block);
}

/* ---------------------------------------------------------------- the int8-activation qmatmul
 * (ql_cpu_qmatmul_q8act: qmatmul_q8act_scalar.c states the rule, qmatmul_q8act_avx512.c runs it
 * with AVX-512 VNNI, qmatmul_q8act_avx2.c with AVX2). Columns per activation scale: 32 (llama.cpp's Q8_0), 16 where 32 does not
 * divide the weight's block size B (a multiple of 16), so that no activation block straddles two
 * weight blocks. */
#define QL_Q8ACT_BLOCK(block_size) ((block_size) % 32 == 0 ? 32 : 16)

typedef struct {
    ql_matmul_job base;      /* w, padded_k, x (the float x: the outliers use it), m, y, dtype;
                                x_columns, scratch, status, call for the AVX-512 kernel's chunks */
    int64_t act_block;       /* A = QL_Q8ACT_BLOCK(B) */
    const int8_t *x_q;       /* (M, Kp) int8 in [-127, 127], padding columns 0 (the scalar rule's; AVX2 packs it) */
    const float *x_factor;   /* (M, Kp / A) float32: activation scale * level unit (likewise) */
    int8_t levels[16];       /* round(127 * codebook / max |codebook|) */
    const void *x_strips;    /* AVX-512 / AVX2: x in the kernel's strip records (ql_q8act_pack_avx512 / _avx2) */
    const void *x_groups;    /* the GEMM: x quantized in groups of 16 rows (ql_q8act_gemm_pack_groups) */
    const float *outlier_sums; /* the GEMM: (G, N, 16) float32, ql_q8act_gemm_outliers; NULL: no outliers */
} ql_q8act_job;

/* The int8 GEMM (gemm_q8act_avx512.c) from this many rows of x on, where the VNNI kernels run (the
 * crossover with the GEMV kernel, one thread, loaded machine: 4096 x 4096 M = 16 0.45x, 24 1.11x, 32
 * 1.55x; 11008 x 4096 0.63x, 1.05x, 1.36x the GEMV kernel's speed). */
#define QL_Q8ACT_GEMM_MIN_M 24

void ql_q8act_levels(const float *codebook, int8_t levels[16], float *level_unit);
void ql_q8act_quantize_x(const void *x, int dtype, int64_t x_row_stride, int64_t m, int64_t k, int64_t padded_k,
                         int64_t act_block, float level_unit, int8_t *x_q, float *factor);
void ql_q8act_rows_scalar(const ql_q8act_job *job, int64_t n_begin, int64_t n_end);
int ql_q8act_avx512_supported(void);  /* AVX-512 F, BW and VNNI (cpuid) */
int64_t ql_q8act_avx512_strip_bytes(const ql_q8act_job *job);
int64_t ql_q8act_avx512_scratch_floats(const ql_q8act_job *job);
/* x (base.x, every row) -> the kernel's records and strip table in x_strips; row: strips * 128 floats of room */
void ql_q8act_pack_avx512(const ql_q8act_job *job, float level_unit, float *row, void *x_strips);
void ql_q8act_rows_avx512(const ql_q8act_job *job, int64_t n_begin, int64_t n_end, int thread_index);
int64_t ql_q8act_avx2_strip_bytes(const ql_q8act_job *job);
int64_t ql_q8act_avx2_scratch_floats(const ql_q8act_job *job);
/* x_q and x_factor (the rule's quantization of x) -> the kernel's records and strip table in x_strips */
void ql_q8act_pack_avx2(const ql_q8act_job *job, void *x_strips);
void ql_q8act_rows_avx2(const ql_q8act_job *job, int64_t n_begin, int64_t n_end, int thread_index);
int64_t ql_q8act_gemm_x_bytes(const ql_q8act_job *job);
int64_t ql_q8act_gemm_scratch_floats(const ql_q8act_job *job);
/* groups [g_begin, g_end) of x -> x_groups (quantized by ql_q8act_pack_avx512); scratch: the
 * thread's ql_q8act_gemm_scratch_floats */
void ql_q8act_gemm_pack_groups(const ql_q8act_job *job, float level_unit, void *x_groups, int64_t g_begin, int64_t g_end,
                               float *scratch);
/* groups of x the GEMM's pack job packs and then sums the outliers of together (their float x in
 * L2; ql_q8act_gemm_outliers runs its chains side by side and decodes each entry once for them) */
#define QL_Q8ACT_OUTLIER_GROUPS 4
/* outlier_sums' groups [g_begin, g_end) against x_packed (the float GEMM's, kernels.h); the CSR checked before */
void ql_q8act_gemm_outliers(const ql_q8act_job *job, const float *x_packed, float *outlier_sums, int64_t g_begin, int64_t g_end);
void ql_q8act_gemm_rows_avx512(const ql_q8act_job *job, int64_t n_begin, int64_t n_end, int thread_index);

#endif
