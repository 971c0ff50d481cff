/* The int8-activation qmatmul with AVX-512 VNNI (ql_cpu_qmatmul_q8act's fast path; the rule is
 * qmatmul_q8act_scalar.c's, the integers the same, the float32 sums in another order). CMake gives
 * this file -mavx512f; the pragma below adds BW (byte shuffles) and VNNI (vpdpbusd), which api.c
 * checks by cpuid (ql_q8act_avx512_supported) before calling anything here.
 *
 * Why: the float path's decode is ~22 uops per 64 code bytes (shifts, 8 vpermps, FMAs) and reads
 * ~13 GB/s per thread, short of DRAM at two threads. Here a 64-byte code line is
 *     c = load 64 bytes                                   (masked for a short last strip)
 *     even = vpshufb(table, c & 15)   odd = vpshufb(table, (c >> 4) & 15)
 * with table = level_q + 128 as uint8 in each 128-bit lane: 64 + 64 weights as unsigned bytes in 5
 * uops, and per row of x two vpdpbusd do the 128 products (u8 x s8, 4 per int32 lane). The +128 is
 * taken back by starting each accumulator at -128 * (the lane's sum of x_q), precomputed with x.
 *
 * Layouts: codes as stored, (N, Kp / 2) uint8, low nibble = even column; K in strips of 128
 * columns (64 code bytes), strips = ceil(Kp / 128). Byte j of `even` is column 128 s + 2j, of `odd`
 * column 128 s + 2j + 1, so int32 lane l of a vpdpbusd covers columns 128 s + 8l .. 8l + 7: one
 * weight block and one activation block (8 divides A, A divides B). x per (row m, strip s), 256
 * bytes, built once per call from x itself (ql_q8act_pack_avx512, the rule's quantization in vectors):
 *     [0, 64)    x_q of the strip's even columns      [64, 128)  of its odd columns
 *     [128, 192) int32 lane l: -128 * sum of x_q over columns 8l .. 8l + 7
 *     [192, 256) float32 lane l: x_factor of those columns' activation block (0 past Kp)
 * then a per-strip table of which weight scale each lane uses (a masked load of the row's scales
 * from the strip's first block and one vpermps).
 *
 * Register tiles: 4 weight rows against up to 2 rows of x, else 2 against up to 4 (X_TILE); per
 * strip and (weight row r, x row m):
 *     acc = dpbusd(dpbusd(neg_sum[m], even[r], x_even[m]), odd[r], x_odd[m])     (int32, exact)
 *     total[r][m] += float(acc) * (scale_vector[r] * factor[m])                  (float32)
 * then y = reduce(total) + the chunk's outlier sums (chunk.h: float x, as the default path).
 * Work partition: api.c hands chunks of QL_ROW_GRAIN weight rows to the pool; a chunk runs every
 * x tile over its rows (in L2 by then). It runs below QL_Q8ACT_GEMM_MIN_M rows of x (the weight is
 * decoded once per x tile of 4 rows); from there on the GEMM, gemm_q8act_avx512.c. */
#pragma GCC target("avx512f,avx512bw,avx512vnni")
#include <immintrin.h>
#include <string.h>

#include "chunk.h"
#include "kernels.h"
#include "quantlite_decode.h"

#define STRIP_COLUMNS 128
#define STRIP_BYTES (STRIP_COLUMNS / 2)
#define X_RECORD_BYTES 256     /* per (row of x, strip), as drawn above */
#define X_TILE 4               /* rows of x per tile */
#define WIDE_TILE_MAX_X_ROWS 2 /* 4 weight rows up to this many x rows, else 2 (32 zmm registers) */

/* Per strip: which of the row's scales its 16 lanes use. */
typedef struct {
    __m512i lane_block;   /* block of lane l minus first_block */
    int64_t first_block;  /* block of the strip's first column */
    __mmask16 blocks;     /* the scales to load, from first_block on */
} strip_scales;

#define Q8ACT_TABLE __m512i
#include "q8act_tiles.h"

int ql_q8act_avx512_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

static int64_t strips_of(const ql_q8act_job *job) { return (job->base.padded_k + STRIP_COLUMNS - 1) / STRIP_COLUMNS; }

static int64_t records_bytes(const ql_q8act_job *job) { return job->base.m * strips_of(job) * X_RECORD_BYTES; }

/* The x records, then the strip table (both 64-byte aligned when x_strips is). */
int64_t ql_q8act_avx512_strip_bytes(const ql_q8act_job *job) {
    return records_bytes(job) + strips_of(job) * (int64_t)sizeof(strip_scales);
}

int64_t ql_q8act_avx512_scratch_floats(const ql_q8act_job *job) { return ql_chunk_scratch_floats(&job->base); }

/* One strip (128 columns) of a float32 x row, padded with zeros, -> its record: the rule of
 * ql_q8act_quantize_x in vectors, the same float32 operations (absmax, / 127, x / xs rounded half to
 * even, xs * level_unit), so the same x_q and factors. The even / odd split is done on the int32
 * values (vpermt2d) before narrowing; the lane sums of the correction come from vpdpbusd against
 * ones (lane l of even and odd together is columns 8l .. 8l + 7, as in the kernel). */
static void pack_strip(const float *x, int64_t columns_left, int64_t act_block, float level_unit, uint8_t *record) {
    const __m512i even_index = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd_index = _mm512_add_epi32(even_index, _mm512_set1_epi32(1));
    const int vectors_per_block = (int)(act_block / 16), blocks = (int)(STRIP_COLUMNS / act_block);
    __m512i q[8];
    float factors[16] = {0};
    for (int b = 0; b < blocks; ++b) {
        const int first = b * vectors_per_block;
        if (b * act_block >= columns_left) {  /* past Kp: x_q 0, factor 0 */
            for (int v = first; v < first + vectors_per_block; ++v) q[v] = _mm512_setzero_si512();
            continue;
        }
        __m512 largest = _mm512_setzero_ps();
        for (int v = first; v < first + vectors_per_block; ++v) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(x + 16 * v)));
        const float scale = _mm512_reduce_max_ps(largest) / 127.0f;
        factors[b] = scale * level_unit;
        for (int v = first; v < first + vectors_per_block; ++v)
            q[v] = scale > 0.0f ? _mm512_cvt_roundps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + 16 * v), _mm512_set1_ps(scale)),
                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                : _mm512_setzero_si512();
    }
    for (int h = 0; h < 4; ++h) {  /* columns 32h .. 32h + 31 -> bytes 16h .. 16h + 15 of each half */
        _mm_store_si128((__m128i *)(record + 16 * h), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q[2 * h], even_index, q[2 * h + 1])));
        _mm_store_si128((__m128i *)(record + 64 + 16 * h), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(q[2 * h], odd_index, q[2 * h + 1])));
    }
    const __m512i ones = _mm512_set1_epi8(1);
    const __m512i lane_sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_load_si512(record)),
                                                  ones, _mm512_load_si512(record + 64));
    _mm512_store_si512(record + 128, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(lane_sums, 7)));
    /* lane l's columns 8l .. 8l + 7 lie in activation block 8l / A of the strip */
    const __m512i lane_block = _mm512_srli_epi32(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120),
                                                 act_block == 32 ? 5 : 4);
    _mm512_store_ps((float *)(record + 192), _mm512_permutexvar_ps(lane_block, _mm512_loadu_ps(factors)));
}

void ql_q8act_pack_avx512(const ql_q8act_job *job, float level_unit, float *row, void *x_strips) {
    const ql_matmul_job *base = &job->base;
    const int64_t padded_k = base->padded_k, strips = strips_of(job), k = base->w->k;
    for (int64_t m = 0; m < base->m; ++m) {
        const char *x_row = (const char *)base->x + m * base->x_row_stride * ql_dtype_size(base->dtype);
        if (base->dtype == QL_F32) memcpy(row, x_row, sizeof(float) * (size_t)k);
        else for (int64_t c = 0; c < k; ++c) row[c] = ql_load(x_row, base->dtype, c);
        memset(row + k, 0, sizeof(float) * (size_t)(strips * STRIP_COLUMNS - k));
        for (int64_t s = 0; s < strips; ++s)
            pack_strip(row + s * STRIP_COLUMNS, padded_k - s * STRIP_COLUMNS, job->act_block, level_unit,
                       (uint8_t *)x_strips + (m * strips + s) * X_RECORD_BYTES);
    }
    strip_scales *table = (strip_scales *)((uint8_t *)x_strips + records_bytes(job));
    const int64_t block = base->w->block_size, n_blocks = padded_k / block;
    for (int64_t s = 0; s < strips; ++s) {
        int32_t lanes[16];
        const int64_t first = s * STRIP_COLUMNS / block;
        int64_t last = first;
        for (int l = 0; l < 16; ++l) {
            int64_t b = (s * STRIP_COLUMNS + 8 * l) / block;
            b = b < n_blocks ? b : n_blocks - 1;  /* past Kp (a short strip): any loaded scale, its x is 0 */
            lanes[l] = (int32_t)(b - first);
            last = b;
        }
        table[s].lane_block = _mm512_loadu_si512(lanes);
        table[s].first_block = first;
        table[s].blocks = (__mmask16)((1u << (last - first + 1)) - 1);
    }
}

/* One strip of weight rows codes[0 .. R - 1] (scales[r]: the row's float32 scales) against x_rows
 * records (x: the first row's record; rows `x_stride` bytes apart), added to total (R, x_rows). */
static inline __attribute__((always_inline)) void strip(const strip_scales *entry, __m512i table,
                                                        const uint8_t *const *codes, const float *const *scales,
                                                        int64_t byte0, __mmask64 bytes, int64_t prefetch_ahead,
                                                        const uint8_t *x, int64_t x_stride, __m512 total[][X_TILE],
                                                        const int R, const int x_rows) {
    const __m512i low_nibbles = _mm512_set1_epi8(15);
    __m512i even[4], odd[4];
    __m512 scale[4];
    for (int r = 0; r < R; ++r) {
        _mm_prefetch((const char *)codes[r] + byte0 + prefetch_ahead, _MM_HINT_T0);
        const __m512i c = _mm512_maskz_loadu_epi8(bytes, codes[r] + byte0);
        even[r] = _mm512_shuffle_epi8(table, _mm512_and_si512(c, low_nibbles));
        odd[r] = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(c, 4), low_nibbles));
        scale[r] = _mm512_permutexvar_ps(entry->lane_block, _mm512_maskz_loadu_ps(entry->blocks, scales[r] + entry->first_block));
    }
    for (int m = 0; m < x_rows; ++m) {
        const uint8_t *record = x + m * x_stride;
        const __m512i x_even = _mm512_load_si512(record), x_odd = _mm512_load_si512(record + 64);
        const __m512i neg_sum = _mm512_load_si512(record + 128);
        const __m512 factor = _mm512_load_ps((const float *)(record + 192));
        for (int r = 0; r < R; ++r) {
            const __m512i acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(neg_sum, even[r], x_even), odd[r], x_odd);
            total[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(scale[r], factor), total[r][m]);
        }
    }
}

/* Weight rows n0 .. n0 + R - 1 (float32 scales from scale0, Kp / B apart) against x rows m0 ..
 * m0 + x_rows - 1: sums (R, x_rows) = the dense dot products. */
static inline __attribute__((always_inline)) void tile(const ql_q8act_job *job, const strip_scales *table_of_strips,
                                                       __m512i table, int64_t n0, const float *scale0, int64_t m0,
                                                       float *sums, const int R, const int x_rows) {
    const int64_t row_bytes = job->base.padded_k / 2, strips = strips_of(job), x_stride = strips * X_RECORD_BYTES;
    const uint8_t *x = (const uint8_t *)job->x_strips + m0 * x_stride;
    const tile_weight_rows rows = weight_rows_of(job, n0, scale0, R);
    const uint8_t *const *codes = rows.codes;
    const float *const *scales = rows.scales;
    __m512 total[4][X_TILE];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < x_rows; ++m) total[r][m] = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 1 < strips; ++s)
        strip(table_of_strips + s, table, codes, scales, s * STRIP_BYTES, ~(__mmask64)0, R * row_bytes,
              x + s * X_RECORD_BYTES, x_stride, total, R, x_rows);
    const int64_t tail_bytes = row_bytes - s * STRIP_BYTES;
    const __mmask64 tail = tail_bytes >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << tail_bytes) - 1);
    strip(table_of_strips + s, table, codes, scales, s * STRIP_BYTES, tail, R * row_bytes, x + s * X_RECORD_BYTES,
          x_stride, total, R, x_rows);
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < x_rows; ++m) sums[r * x_rows + m] = _mm512_reduce_add_ps(total[r][m]);
}

void ql_q8act_rows_avx512(const ql_q8act_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    const strip_scales *table_of_strips = (const strip_scales *)((const uint8_t *)job->x_strips + records_bytes(job));
    uint8_t unsigned_levels[16];
    for (int i = 0; i < 16; ++i) unsigned_levels[i] = (uint8_t)(job->levels[i] + 128);
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)unsigned_levels));
    q8act_rows(job, n_begin, n_end, thread_index, table_of_strips, table);
}
