/* The int8-activation opt-in's prefill GEMM, y (M, N) = x (M, K) @ W^T for M >= QL_Q8ACT_GEMM_MIN_M
 * (kernels.h) with AVX-512 VNNI: the rule of qmatmul_q8act_scalar.c (x quantized by the GEMV
 * kernel's packing, the rule in vectors, so the same x_q and factors; the same exact int32 dot per
 * (row, column, activation block), each
 * converted and multiplied by the float32 product (weight block scale x activation factor), summed
 * in float32 block after block, plus the outliers times the float x); only the float32 sums' order
 * differs from the GEMV kernel's (qmatmul_q8act_avx512.c, which sums per 8-column lane). The plan is
 * gemm.h's (the float GEMM): y^T = W x^T, the weight decoded once per call into a panel that every
 * group of 16 rows of x then uses, the same row split over the pool (x packed by a pool job first,
 * every thread a share of the groups). CMake gives this file
 * -mavx512f; the pragma adds BW and VNNI, which api.c checks (ql_q8act_avx512_supported).
 *
 * Layouts (G = ceil(M / 16) groups of 16 rows of x, rows past M zero; A = QL_Q8ACT_BLOCK(B)):
 *   x_groups  per group g, packed once per call (ql_q8act_gemm_pack_groups, every thread a share of
 *             the groups): its rows quantized by ql_q8act_pack_avx512 (qmatmul_q8act_avx512.c's
 *             records, into the thread's scratch; each strip's even / odd bytes put back in column
 *             order as the panel's are), then
 *               quads    (Kp / 4, 16, 4) int8: column quad q of the 16 rows side by side, 64 bytes
 *                        (one zmm: int32 lane i = row 16 g + i's x_q at columns 4q .. 4q + 3);
 *               factor   (Kp / A, 16) float32: the rows' x_factor per activation block;
 *               neg_sum  (Kp / A, 16) int32: -128 x the rows' sum of x_q over the block.
 *   x_packed  the float GEMM's float32 x (G, Kp, 16) (api.c's pack_gemm_x_groups), for the outliers
 *             only (a weight without outliers: neither it nor outlier_sums is made).
 *   outlier_sums (G, N, 16) float32: lane i of (g, n) = sum_e vals[e] x[16 g + i, cols[e]] over row
 *             n's CSR entries, from 0 in order (the rule's outlier sum, float x), made by the pack
 *             job QL_Q8ACT_OUTLIER_GROUPS groups at a time right after packing them (their float x,
 *             4 x 256 KiB at K = 4096, still in L2; made per panel instead, each outlier's line of
 *             x came from L3 once per group: +33 % at M = 512, against +10 % now).
 *   panel     (ACC_ROWS, K_C) uint8 per thread: up to 256 weight rows, columns [k0, k0 + K_C), each
 *             weight its int8 level + 128 (16-entry table in every 128-bit lane, vpshufb on the low
 *             and high nibbles, the two byte streams interleaved back to column order: 64 code bytes
 *             -> 128 columns in 9 operations; the next slice's code lines prefetched). 64 KiB, in
 *             L2; each weight decoded once per call.
 *   acc       (G, ACC_ROWS, 16) float32 per thread: lane i of (g, r) = y[16 g + i, n0 + r] so far,
 *             carried over the K_C slices (as gemm.h's), then + outlier_sums, rounded to y's dtype.
 * Micro-kernel: MR weight rows x V = 1..MAX_GROUPS groups of x, per activation block j of the slice
 *     iacc[r][v] = neg_sum[v][j]                                    (int32: the +128 taken back)
 *     per quad q: xv[v] = quads[v][q]; iacc[r][v] = vpdpbusd(iacc[r][v], broadcast(panel[r][4q..]), xv[v])
 *     facc[r][v] = fma(float(iacc[r][v]), scale[r][block of j] * factor[v][j], facc[r][v])  (float32)
 * (u8 weight x s8 x, 4 products per int32 lane: 64 multiply-adds per vpdpbusd, 4x an FMA's). The
 * exact dot of the block is iacc: 32 x 255 x 127 fits in int32. MR x V int32 and float accumulators
 * in registers over the slice (4 x 3: 24 of 32 zmm); per quad V loads of x and MR broadcast loads;
 * per block MR scale broadcasts, V factor and V neg_sum loads, MR V converts, multiplies and FMAs.
 * Loop nest per block of up to 256 weight rows (the pool's chunk, kernels.h's ql_row_grain as for
 * the float GEMM): for each K_C slice: decode the panel; for each block of V groups (3, 4 as 2 + 2):
 * for each MR rows of the panel: the slice's activation blocks. A block's x slice (V x 4 KiB) stays
 * in L1 over the panel's micro-tiles. The CSR is checked whole before (api.c): the outlier pass
 * reads every row's. Per output the float32 order is: blocks in column order, then + the outlier sum:
 * independent of the split and the thread count, and of M from QL_Q8ACT_GEMM_MIN_M on (bitwise). */
#pragma GCC target("avx512f,avx512bw,avx512vnni")
#include <immintrin.h>
#include <string.h>

#include "chunk.h"
#include "kernels.h"
#include "quantlite_decode.h"

#define GROUP 16         /* rows of x per group (int32 lanes of a zmm) */
#define MR 4             /* weight rows per micro-tile */
#define MAX_GROUPS 3     /* groups of x per micro-tile: 4 x 3 int32 + 4 x 3 float accumulators */
#define K_C 256          /* columns per panel slice (a multiple of every A) */
#define PANEL_ROWS QL_GEMM_PANEL_ROWS
#define ACC_ROWS ((PANEL_ROWS + MR - 1) / MR * MR)

static int64_t groups_of(const ql_q8act_job *job) { return (job->base.m + GROUP - 1) / GROUP; }

/* Bytes of one group's record: quads, factor, neg_sum (each a multiple of 64 bytes). */
static int64_t group_bytes(const ql_q8act_job *job) {
    const int64_t kp = job->base.padded_k;
    return kp * GROUP + 2 * (kp / job->act_block) * GROUP * 4;
}

int64_t ql_q8act_gemm_x_bytes(const ql_q8act_job *job) { return groups_of(job) * group_bytes(job); }

static int64_t strips_of(const ql_q8act_job *job) { return (job->base.padded_k + QL_AVX512_STRIP - 1) / QL_AVX512_STRIP; }

/* Group g's rows as a job of their own (ql_q8act_pack_avx512 packs base.m rows from base.x). */
static ql_q8act_job group_job(const ql_q8act_job *job, int64_t g) {
    ql_q8act_job group = *job;
    group.base.x = (const char *)job->base.x + g * GROUP * job->base.x_row_stride * ql_dtype_size(job->base.dtype);
    group.base.m = job->base.m - g * GROUP < GROUP ? job->base.m - g * GROUP : GROUP;
    return group;
}

/* Bytes of the packing's scratch: the GEMV kernel's records and strip table for 16 rows, its
 * float32 row, then the rows' x_q (16, Kp) int8 in column order and factors (16, Kp / A) float32. */
static int64_t pack_scratch_bytes(const ql_q8act_job *job) {
    ql_q8act_job sixteen = *job;
    sixteen.base.m = GROUP;
    const int64_t kp = job->base.padded_k;
    return 64 + ql_aligned_bytes(ql_q8act_avx512_strip_bytes(&sixteen)) + strips_of(job) * QL_AVX512_STRIP * 4 + GROUP * kp +
           GROUP * (kp / job->act_block) * 4;
}

/* Per thread: the packing's scratch, or the panel (64-byte aligned), acc and the decoded scales. */
int64_t ql_q8act_gemm_scratch_floats(const ql_q8act_job *job) {
    const int64_t kp = job->base.padded_k;
    const int64_t pack = pack_scratch_bytes(job) / 4 + 1;
    const int64_t gemm = 16 + ACC_ROWS * K_C / 4 + groups_of(job) * ACC_ROWS * GROUP + PANEL_ROWS * (kp / job->base.w->block_size);
    return pack > gemm ? pack : gemm;
}

/* 128 columns given as their even and odd bytes (byte j: columns 2j and 2j + 1), the first `columns`
 * of them stored at out in column order (per 128-bit lane l unpacklo gives columns 32 l .. 32 l + 15
 * and unpackhi 32 l + 16 .. 32 l + 31; one permute per 64 columns puts the lanes in order). */
static inline __attribute__((always_inline)) void store_columns(__m512i even, __m512i odd, int64_t columns, uint8_t *out) {
    const __m512i first_half = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second_half = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    const __m512i low = _mm512_unpacklo_epi8(even, odd), high = _mm512_unpackhi_epi8(even, odd);
    _mm512_mask_storeu_epi8(out, columns >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << columns) - 1,
                            _mm512_permutex2var_epi64(low, first_half, high));
    if (columns > 64)
        _mm512_mask_storeu_epi8(out + 64, columns >= 128 ? ~(__mmask64)0 : ((__mmask64)1 << (columns - 64)) - 1,
                                _mm512_permutex2var_epi64(low, second_half, high));
}

void ql_q8act_gemm_pack_groups(const ql_q8act_job *job, float level_unit, void *x_groups, int64_t g_begin, int64_t g_end,
                               float *scratch) {
    const int64_t kp = job->base.padded_k, act = job->act_block, act_blocks = kp / act, strips = strips_of(job);
    ql_q8act_job sixteen = *job;
    sixteen.base.m = GROUP;
    uint8_t *records = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);  /* 256 bytes per (row, strip) */
    float *row = (float *)(records + ql_aligned_bytes(ql_q8act_avx512_strip_bytes(&sixteen)));
    int8_t *rows_q = (int8_t *)(row + strips * QL_AVX512_STRIP);                               /* (16, Kp) */
    float *rows_factor = (float *)(rows_q + GROUP * kp);                           /* (16, Kp / A) */
    const __m512i row_starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                  _mm512_set1_epi32((int)(kp / 4)));
    const __m512i factor_starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                     _mm512_set1_epi32((int)act_blocks));
    for (int64_t g = g_begin; g < g_end; ++g) {
        /* the rule in vectors (the GEMV kernel's packing, the same x_q and factors as
         * ql_q8act_quantize_x), each record then back to column order */
        const ql_q8act_job group = group_job(job, g);
        const int64_t rows = group.base.m;
        ql_q8act_pack_avx512(&group, level_unit, row, records);
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t s = 0; s < strips; ++s) {
                const uint8_t *strip = records + (i * strips + s) * 256;
                const int64_t columns = kp - QL_AVX512_STRIP * s < QL_AVX512_STRIP ? kp - QL_AVX512_STRIP * s : QL_AVX512_STRIP;
                store_columns(_mm512_load_si512(strip), _mm512_load_si512(strip + 64), columns, (uint8_t *)rows_q + i * kp + QL_AVX512_STRIP * s);
                const float *lane_factor = (const float *)(strip + 192);  /* lane l: the block of columns 8 l .. 8 l + 7 */
                for (int64_t b = 0; b < columns / act; ++b) rows_factor[i * act_blocks + QL_AVX512_STRIP * s / act + b] = lane_factor[b * act / 8];
            }
        const __mmask16 real = (__mmask16)((1u << rows) - 1);
        uint8_t *record = (uint8_t *)x_groups + g * group_bytes(job);
        __m512i *quads = (__m512i *)record;
        float *factor = (float *)(record + kp * GROUP);
        int32_t *neg_sum = (int32_t *)(factor + act_blocks * GROUP);
        for (int64_t q = 0; q < kp / 4; ++q)  /* dword q of each row: the 16 rows' quad q */
            quads[q] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, row_starts, (const int32_t *)rows_q + q, 4);
        const __m512i ones = _mm512_set1_epi8(1);
        for (int64_t a = 0; a < act_blocks; ++a) {
            _mm512_store_ps(factor + a * GROUP, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, factor_starts, rows_factor + a, 4));
            __m512i sum = _mm512_setzero_si512();
            for (int64_t q = a * act / 4; q < (a + 1) * act / 4; ++q) sum = _mm512_dpbusd_epi32(sum, ones, quads[q]);
            _mm512_store_si512(neg_sum + a * GROUP, _mm512_slli_epi32(_mm512_sub_epi32(_mm512_setzero_si512(), sum), 7));
        }
    }
}

/* Weight rows [n0, n0 + rows) x columns [k0, k0 + kc) -> panel (rows, K_C): level + 128 as uint8,
 * column order (kc a multiple of 16: whole code bytes, whole 8-byte steps of a masked load). */
static void decode_panel(const ql_weight *w, int64_t padded_k, __m512i table, int64_t n0, int64_t rows, int64_t k0, int64_t kc,
                         uint8_t *panel) {
    const __m512i low_nibbles = _mm512_set1_epi8(15);
    const int64_t row_bytes = padded_k / 2;
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t *codes = w->codes + (n0 + r) * row_bytes + k0 / 2;
        if (k0 + K_C < padded_k) {  /* the row's codes of the next slice (2 lines), a slice's work ahead */
            _mm_prefetch((const char *)(codes + K_C / 2), _MM_HINT_T0);
            _mm_prefetch((const char *)(codes + K_C - 1), _MM_HINT_T0);
        }
        for (int64_t c = 0; c < kc; c += 128) {
            const int64_t bytes = (kc - c) / 2 < 64 ? (kc - c) / 2 : 64;
            const __m512i code = _mm512_maskz_loadu_epi8(bytes == 64 ? ~(__mmask64)0 : ((__mmask64)1 << bytes) - 1, codes + c / 2);
            const __m512i even = _mm512_shuffle_epi8(table, _mm512_and_si512(code, low_nibbles));
            const __m512i odd = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(code, 4), low_nibbles));
            store_columns(even, odd, 2 * bytes, panel + r * K_C + c);
        }
    }
}

/* acc[v][r] += the slice's activation blocks of panel rows r < MR against x groups v < V (x: group
 * 0's quads at the slice's first column, groups x_stride bytes apart; factor, neg_sum: group 0's at
 * the slice's first activation block, groups side_stride elements apart; row r's scales at
 * scale_of[r], the slice's activation block j in weight block block_of[j]). A: activation block
 * columns (16 or 32). */
static inline __attribute__((always_inline)) void micro_tile(const uint8_t *panel, const uint8_t *x, int64_t x_stride,
                                                             const float *factor, const int32_t *neg_sum, int64_t side_stride,
                                                             const float *const *scale_of, const int64_t *block_of, int64_t kc,
                                                             float *acc, const int V, const int A) {
    __m512 facc[MR][MAX_GROUPS];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < V; ++v) facc[r][v] = _mm512_load_ps(acc + (v * ACC_ROWS + r) * GROUP);
    for (int64_t j = 0; j < kc / A; ++j) {
        __m512i iacc[MR][MAX_GROUPS];
        for (int v = 0; v < V; ++v) {
            const __m512i start = _mm512_load_si512(neg_sum + v * side_stride + j * GROUP);
            for (int r = 0; r < MR; ++r) iacc[r][v] = start;
        }
        const uint8_t *block_x = x + j * A * GROUP;
#pragma GCC unroll 8
        for (int q = 0; q < A / 4; ++q) {
            __m512i xv[MAX_GROUPS];
            for (int v = 0; v < V; ++v) xv[v] = _mm512_load_si512(block_x + v * x_stride + q * 64);
            for (int r = 0; r < MR; ++r) {
                int32_t weights;
                memcpy(&weights, panel + r * K_C + j * A + 4 * q, 4);
                const __m512i w = _mm512_set1_epi32(weights);
                for (int v = 0; v < V; ++v) iacc[r][v] = _mm512_dpbusd_epi32(iacc[r][v], w, xv[v]);
            }
        }
        __m512 f[MAX_GROUPS];
        for (int v = 0; v < V; ++v) f[v] = _mm512_load_ps(factor + v * side_stride + j * GROUP);
        for (int r = 0; r < MR; ++r) {
            const __m512 scale = _mm512_set1_ps(scale_of[r][block_of[j]]);
            for (int v = 0; v < V; ++v)
                facc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][v]), _mm512_mul_ps(scale, f[v]), facc[r][v]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < V; ++v) _mm512_store_ps(acc + (v * ACC_ROWS + r) * GROUP, facc[r][v]);
}

/* Groups per micro-tile for the `left` groups still to do: 3, but 4 as 2 + 2 (never a lone 1 after 3s). */
static int block_groups(int64_t left) { return left >= MAX_GROUPS ? (left == 4 ? 2 : MAX_GROUPS) : (int)left; }

/* The slice's micro-tiles of one block of V groups over the panel's rows (scales: (rows, Kp / B);
 * a tile's rows past `rows` read the last row's, and are never stored). */
static inline __attribute__((always_inline)) void groups_over_panel(const uint8_t *panel, int64_t rows, const uint8_t *x,
                                                                    int64_t x_stride, const float *factor, const int32_t *neg_sum,
                                                                    int64_t side_stride, const float *scales, int64_t n_blocks,
                                                                    const int64_t *block_of, int64_t kc, float *acc, const int V,
                                                                    const int A) {
    for (int64_t r0 = 0; r0 < rows; r0 += MR) {
        const float *scale_of[MR];
        for (int r = 0; r < MR; ++r) scale_of[r] = scales + (r0 + r < rows ? r0 + r : rows - 1) * n_blocks;
        micro_tile(panel + r0 * K_C, x, x_stride, factor, neg_sum, side_stride, scale_of, block_of, kc, acc + r0 * GROUP, V, A);
    }
}

/* y rows' acc (G, ACC_ROWS, 16) = weight rows [n0, n0 + rows) against every group of x, over all of K. */
static void block_product(const ql_q8act_job *job, const float *scales, __m512i table, int64_t n0, int64_t rows, uint8_t *panel,
                          float *acc) {
    const ql_matmul_job *base = &job->base;
    const int64_t kp = base->padded_k, act = job->act_block, groups = groups_of(job), block = base->w->block_size;
    const int64_t n_blocks = kp / block, tile_rows = (rows + MR - 1) / MR * MR;
    const int64_t x_stride = group_bytes(job), side_stride = x_stride / 4;
    const uint8_t *x_groups = job->x_groups;
    memset(panel + rows * K_C, 128, (size_t)((tile_rows - rows) * K_C));  /* level 0: rows past `rows`, never stored */
    memset(acc, 0, sizeof(float) * (size_t)(groups * ACC_ROWS * GROUP));
    for (int64_t k0 = 0; k0 < kp; k0 += K_C) {
        const int64_t kc = kp - k0 < K_C ? kp - k0 : K_C;
        decode_panel(base->w, kp, table, n0, rows, k0, kc, panel);
        int64_t block_of[K_C / 16];  /* the weight block of each of the slice's activation blocks */
        for (int64_t j = 0; j < kc / act; ++j) block_of[j] = (k0 + j * act) / block;
        for (int64_t g0 = 0; g0 < groups; g0 += block_groups(groups - g0)) {
            const uint8_t *x = x_groups + g0 * x_stride + k0 * GROUP;
            const float *factor = (const float *)(x_groups + g0 * x_stride + kp * GROUP) + k0 / act * GROUP;
            const int32_t *neg_sum = (const int32_t *)(factor + (kp / act) * GROUP);
            float *block_acc = acc + g0 * ACC_ROWS * GROUP;
#define RUN(V, A) groups_over_panel(panel, rows, x, x_stride, factor, neg_sum, side_stride, scales, n_blocks, block_of, kc, block_acc, V, A)
            switch (block_groups(groups - g0) * 100 + (int)act) {  /* constants keep the accumulators in registers */
                case 132: RUN(1, 32); break;
                case 232: RUN(2, 32); break;
                case 332: RUN(3, 32); break;
                case 116: RUN(1, 16); break;
                case 216: RUN(2, 16); break;
                default: RUN(3, 16); break;
            }
#undef RUN
        }
    }
}

static inline __attribute__((always_inline)) void outlier_pass(const ql_weight *w, const float *x, int64_t x_stride,
                                                               float *sums, int64_t sums_stride, const int V) {
    for (int64_t n = 0; n < w->n; ++n) {
        __m512 sum[QL_Q8ACT_OUTLIER_GROUPS];
        for (int v = 0; v < V; ++v) sum[v] = _mm512_setzero_ps();
        for (int64_t e = w->row_ptr[n]; e < w->row_ptr[n + 1]; ++e) {
            const float value = w->val_kind == QL_VALS_F16 ? _cvtsh_ss(((const uint16_t *)w->vals)[e]) : ((const float *)w->vals)[e];
            const float *column = x + ql_outlier_col(w->cols, w->col_kind, e) * GROUP;
            for (int v = 0; v < V; ++v) sum[v] = _mm512_fmadd_ps(_mm512_set1_ps(value), _mm512_load_ps(column + v * x_stride), sum[v]);
        }
        for (int v = 0; v < V; ++v) _mm512_store_ps(sums + v * sums_stride + n * GROUP, sum[v]);
    }
}

void ql_q8act_gemm_outliers(const ql_q8act_job *job, const float *x_packed, float *outlier_sums, int64_t g_begin, int64_t g_end) {
    const ql_weight *w = job->base.w;
    const int64_t x_stride = job->base.padded_k * GROUP, sums_stride = w->n * GROUP;
    for (int64_t g = g_begin; g < g_end; g += QL_Q8ACT_OUTLIER_GROUPS) {
        const float *x = x_packed + g * x_stride;
        float *sums = outlier_sums + g * sums_stride;
        switch (g_end - g < QL_Q8ACT_OUTLIER_GROUPS ? g_end - g : QL_Q8ACT_OUTLIER_GROUPS) {  /* constants: the sums in registers */
            case 1: outlier_pass(w, x, x_stride, sums, sums_stride, 1); break;
            case 2: outlier_pass(w, x, x_stride, sums, sums_stride, 2); break;
            case 3: outlier_pass(w, x, x_stride, sums, sums_stride, 3); break;
            default: outlier_pass(w, x, x_stride, sums, sums_stride, 4); break;
        }
    }
}

/* y[m, n0 + r] = acc's lane m % 16 of (m / 16, r), r < rows, in y's dtype. */
static void store_outputs(const ql_matmul_job *job, const float *acc, int64_t n0, int64_t rows) {
    for (int64_t m = 0; m < job->m; ++m) {
        const float *lanes = acc + (m / GROUP) * ACC_ROWS * GROUP + m % GROUP;
        const int64_t y_row = m * job->y_row_stride + n0;
        if (job->dtype == QL_F32)
            for (int64_t r = 0; r < rows; ++r) ((float *)job->y)[y_row + r] = lanes[r * GROUP];
        else
            for (int64_t r = 0; r < rows; ++r) ql_store(job->y, job->dtype, y_row + r, lanes[r * GROUP]);
    }
}

void ql_q8act_gemm_rows_avx512(const ql_q8act_job *job, int64_t n_begin, int64_t n_end, int thread_index) {
    const ql_matmul_job *base = &job->base;
    const ql_weight *w = base->w;
    float *scratch = base->scratch + thread_index * base->scratch_floats_per_thread;
    uint8_t *panel = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *acc = (float *)(panel + ACC_ROWS * K_C), *scale_scratch = acc + groups_of(job) * ACC_ROWS * GROUP;
    uint8_t unsigned_levels[16];
    for (int i = 0; i < 16; ++i) unsigned_levels[i] = (uint8_t)(job->levels[i] + 128);
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)unsigned_levels));
    for (int64_t n0 = n_begin; n0 < n_end; n0 += PANEL_ROWS) {
        const int64_t rows = n_end - n0 < PANEL_ROWS ? n_end - n0 : PANEL_ROWS;
        const float *scales = ql_chunk_scales(w, base->padded_k, n0, rows, scale_scratch);
        block_product(job, scales, table, n0, rows, panel, acc);
        if (job->outlier_sums)
            for (int64_t g = 0; g < groups_of(job); ++g)
                for (int64_t r = 0; r < rows; ++r) {
                    float *lanes = acc + (g * ACC_ROWS + r) * GROUP;
                    const float *sums = job->outlier_sums + (g * w->n + n0 + r) * GROUP;
                    _mm512_store_ps(lanes, _mm512_add_ps(_mm512_load_ps(lanes), _mm512_load_ps(sums)));
                }
        store_outputs(base, acc, n0, rows);
    }
}
