/* The int8-activation qmatmul with AVX2 (ql_cpu_qmatmul_q8act's path on CPUs without AVX-512 VNNI;
 * the rule is qmatmul_q8act_scalar.c's, the integers the same, the float32 sums in another order).
 * CMake gives this file -mavx2 -mfma -mf16c; api.c calls it only when cpuid reports them.
 *
 * Why: the float AVX2 kernel decodes 32 weights with 12 byte shuffles (qmatmul_avx2.c), all on one
 * port. Here a 32-byte code line is 64 weights as int8 in 5 uops (2 of them shuffles):
 *     c = load 32 bytes                                   (dword-masked for a short last strip)
 *     even = vpshufb(table, c & 15)   odd = vpshufb(table, (c >> 4) & 15)
 * with table = level_q (int8, both 128-bit lanes). vpmaddubsw multiplies an unsigned byte by a signed
 * one and adds pairs into int16 with saturation; with the sign trick (llama.cpp's) it cannot
 * saturate: the unsigned operand is |x_q| <= 127 and the signed one level_q with x_q's sign
 * (vpsignb: -level where x_q < 0, 0 where x_q = 0), so every product is x_q * level_q exactly and a
 * pair's sum has |.| <= 2 * 127 * 127 = 32258 < 32767. vpmaddwd against ones adds pairs of those into
 * int32 (exact); the even and odd halves are added in int32 (in int16 they could overflow).
 *
 * Layouts: codes as stored, (N, Kp / 2) uint8, low nibble = even column; K in strips of 64 columns
 * (32 code bytes), strips = ceil(Kp / 64). Byte j of `even` is column 64 s + 2j, of `odd` column
 * 64 s + 2j + 1, so int32 lane l of the sums covers columns 64 s + 8l .. 8l + 7: one weight block
 * and one activation block (8 divides A, A divides B). x is quantized by the rule's own code
 * (ql_q8act_quantize_x: x_q (M, Kp), factors (M, Kp / A)), then rearranged once per call into a
 * record per (row m, strip s), 160 bytes (ql_q8act_pack_avx2; a permutation, no arithmetic):
 *     [0, 32)    |x_q| of the strip's even columns      [32, 64)   of its odd columns
 *     [64, 96)   x_q of its even columns (the signs)     [96, 128)  of its odd columns
 *     [128, 160) float32 lane l: x_factor of columns 8l .. 8l + 7's activation block (0 past Kp)
 * then a per-strip table of which weight scale each lane uses (a strip spans at most 3 blocks, as
 * B >= 32: a masked load of 4 of the row's scales from the strip's first block and one vpermps).
 *
 * Register tiles: 4 weight rows against up to 2 rows of x, else 2 against up to 4 (X_TILE); per
 * strip and weight row r, its levels and scale vector, then per x row m:
 *     acc = madd(maddubs(|x_even[m]|, sign(even[r], x_even[m])), 1)
 *         + madd(maddubs(|x_odd[m]|, sign(odd[r], x_odd[m])), 1)                  (int32, exact)
 *     total[r][m] += float(acc) * (scale_vector[r] * factor[m])                  (float32)
 * then y = the sum of total's 8 lanes + the chunk's outlier sums (chunk.h: float x, as the default
 * path). A total's terms do not depend on the tile it ran in, so neither the thread count nor M
 * (from 2 on: at M = 1 chunk.h sums the outliers in another order) changes an output's bits.
 * Work partition: api.c hands chunks of QL_ROW_GRAIN weight rows to the pool; a chunk runs every
 * x tile over its rows (in L2 by then). Every M runs this kernel, as with AVX-512 VNNI. */
#include <immintrin.h>
#include <string.h>

#include "chunk.h"
#include "kernels.h"
#include "quantlite_decode.h"

#define STRIP_COLUMNS 64
#define STRIP_BYTES (STRIP_COLUMNS / 2)
#define X_RECORD_BYTES 160     /* per (row of x, strip), as drawn above */
#define X_TILE 4               /* rows of x per tile */
#define WIDE_TILE_MAX_X_ROWS 2 /* 4 weight rows up to this many x rows, else 2 (16 ymm registers) */
#define STRIP_SCALES 4         /* scales loaded per strip (an xmm): a strip touches at most 3 blocks */

/* Per strip: which of the row's scales its 8 lanes use. */
typedef struct {
    __m256i lane_block;   /* block of lane l minus first_block */
    __m128i blocks;       /* the scales to load from first_block on (all-ones dwords) */
    int64_t first_block;  /* block of the strip's first column */
} strip_scales;

#define Q8ACT_TABLE __m256i
#include "q8act_tiles.h"

static int64_t strips_of(const ql_q8act_job *job) { return (job->base.padded_k + STRIP_COLUMNS - 1) / STRIP_COLUMNS; }

static int64_t records_bytes(const ql_q8act_job *job) { return job->base.m * strips_of(job) * X_RECORD_BYTES; }

/* The x records, then the strip table (both 32-byte aligned when x_strips is). */
int64_t ql_q8act_avx2_strip_bytes(const ql_q8act_job *job) {
    return records_bytes(job) + strips_of(job) * (int64_t)sizeof(strip_scales);
}

int64_t ql_q8act_avx2_scratch_floats(const ql_q8act_job *job) { return ql_chunk_scratch_floats(&job->base); }

void ql_q8act_pack_avx2(const ql_q8act_job *job, void *x_strips) {
    const int64_t padded_k = job->base.padded_k, strips = strips_of(job), act_block = job->act_block;
    for (int64_t m = 0; m < job->base.m; ++m) {
        const int8_t *x_q = job->x_q + m * padded_k;                             /* (Kp,) */
        const float *factor = job->x_factor + m * (padded_k / act_block);        /* (Kp / A,) */
        for (int64_t s = 0; s < strips; ++s) {
            uint8_t *record = (uint8_t *)x_strips + (m * strips + s) * X_RECORD_BYTES;
            for (int j = 0; j < STRIP_BYTES; ++j)
                for (int parity = 0; parity < 2; ++parity) {
                    const int64_t column = s * STRIP_COLUMNS + 2 * j + parity;
                    const int8_t value = column < padded_k ? x_q[column] : 0;
                    record[parity * STRIP_BYTES + j] = (uint8_t)(value < 0 ? -value : value);
                    record[2 * STRIP_BYTES + parity * STRIP_BYTES + j] = (uint8_t)value;
                }
            float lane_factor[8];
            for (int l = 0; l < 8; ++l) {
                const int64_t column = s * STRIP_COLUMNS + 8 * l;
                lane_factor[l] = column < padded_k ? factor[column / act_block] : 0.0f;
            }
            memcpy(record + 4 * STRIP_BYTES, lane_factor, sizeof lane_factor);
        }
    }
    strip_scales *table = (strip_scales *)((uint8_t *)x_strips + records_bytes(job));
    const int64_t block = job->base.w->block_size, n_blocks = padded_k / block;
    for (int64_t s = 0; s < strips; ++s) {
        int32_t lanes[8], present[STRIP_SCALES];
        const int64_t first = s * STRIP_COLUMNS / block;
        for (int l = 0; l < 8; ++l) {
            const int64_t b = (s * STRIP_COLUMNS + 8 * l) / block;
            lanes[l] = (int32_t)((b < n_blocks ? b : n_blocks - 1) - first);  /* past Kp: any loaded scale, x is 0 */
        }
        for (int i = 0; i < STRIP_SCALES; ++i) present[i] = first + i < n_blocks ? -1 : 0;
        table[s].lane_block = _mm256_loadu_si256((const __m256i *)lanes);
        table[s].blocks = _mm_loadu_si128((const __m128i *)present);
        table[s].first_block = first;
    }
}

/* One strip of weight rows codes[0 .. R - 1] (scales[r]: the row's float32 scales) against x_rows
 * records (x: the first row's record; rows `x_stride` bytes apart), added to total (R, x_rows).
 * `dwords`: the code dwords to load when `short_strip` (the row's last strip may hold fewer than 32
 * bytes; Kp / 2 is a multiple of 8, so whole dwords). `one_block`: B is a multiple of 64, so the
 * strip lies in one block and its scale is one broadcast load (3 uops fewer per row than the table's
 * masked load and vpermps: 1.05-1.12x at M = 1, one thread, A/B in one process, loaded machine). */
static inline __attribute__((always_inline)) void strip(const strip_scales *entry, __m256i table,
                                                        const uint8_t *const *codes, const float *const *scales,
                                                        int64_t byte0, const int short_strip, __m256i dwords,
                                                        const uint8_t *x, int64_t x_stride, __m256 total[][X_TILE],
                                                        const int R, const int x_rows, const int one_block) {
    const __m256i low_nibbles = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; ++r) {
        const __m256i c = short_strip ? _mm256_maskload_epi32((const int *)(codes[r] + byte0), dwords)
                                      : _mm256_loadu_si256((const __m256i *)(codes[r] + byte0));
        const __m256i even = _mm256_shuffle_epi8(table, _mm256_and_si256(c, low_nibbles));
        const __m256i odd = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(c, 4), low_nibbles));
        const __m256 scale = one_block ? _mm256_broadcast_ss(scales[r] + entry->first_block)
                                       : _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_maskload_ps(
                                                                      scales[r] + entry->first_block, entry->blocks)),
                                                                  entry->lane_block);
        for (int m = 0; m < x_rows; ++m) {
            const uint8_t *record = x + m * x_stride;
            const __m256i even_products = _mm256_maddubs_epi16(
                _mm256_load_si256((const __m256i *)record), _mm256_sign_epi8(even, _mm256_load_si256((const __m256i *)(record + 64))));
            const __m256i odd_products = _mm256_maddubs_epi16(
                _mm256_load_si256((const __m256i *)(record + 32)), _mm256_sign_epi8(odd, _mm256_load_si256((const __m256i *)(record + 96))));
            const __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(even_products, ones), _mm256_madd_epi16(odd_products, ones));
            const __m256 factor = _mm256_load_ps((const float *)(record + 128));
            total[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(scale, factor), total[r][m]);
        }
    }
}

static inline float lane_total(__m256 v) {
    const __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 half = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

/* q8act_tiles.h's tile: sums (R, x_rows) = the dense dot products, strip by strip, the last one short. */
static inline __attribute__((always_inline)) void tile(const ql_q8act_job *job, const strip_scales *table_of_strips,
                                                       __m256i table, int64_t n0, const float *scale0, int64_t m0,
                                                       float *sums, const int R, const int x_rows) {
    const tile_weight_rows rows = weight_rows_of(job, n0, scale0, R);
    const uint8_t *const *codes = rows.codes;
    const float *const *scales = rows.scales;
    const int64_t strips = strips_of(job), x_stride = strips * X_RECORD_BYTES;
    const uint8_t *x = (const uint8_t *)job->x_strips + m0 * x_stride;
    __m256 total[4][X_TILE] = {{_mm256_setzero_ps()}};  /* (R, x_rows) lane sums */
    int64_t s = 0;
    if (job->base.w->block_size % STRIP_COLUMNS == 0)
        for (; s + 1 < strips; ++s)
            strip(table_of_strips + s, table, codes, scales, s * STRIP_BYTES, 0, _mm256_setzero_si256(),
                  x + s * X_RECORD_BYTES, x_stride, total, R, x_rows, 1);
    else
        for (; s + 1 < strips; ++s)
            strip(table_of_strips + s, table, codes, scales, s * STRIP_BYTES, 0, _mm256_setzero_si256(),
                  x + s * X_RECORD_BYTES, x_stride, total, R, x_rows, 0);
    const int tail_dwords = (int)(job->base.padded_k / 2 - s * STRIP_BYTES) / 4;
    const __m256i dwords = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail_dwords), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    strip(table_of_strips + s, table, codes, scales, s * STRIP_BYTES, 1, dwords, x + s * X_RECORD_BYTES, x_stride,
          total, R, x_rows, 0);
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < x_rows; ++m) sums[r * x_rows + m] = lane_total(total[r][m]);
}

void ql_q8act_rows_avx2(const ql_q8act_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    const strip_scales *table_of_strips = (const strip_scales *)((const uint8_t *)job->x_strips + records_bytes(job));
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)job->levels));
    q8act_rows(job, n_begin, n_end, thread_index, table_of_strips, table);
}
