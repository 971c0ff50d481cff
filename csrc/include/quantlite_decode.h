/* quantlite_decode.h: the per-element math every back-end shares, for host (C) and device (CUDA).
 *
 *     code(n, k)   = (codes[n, k / 2] >> 4 * (k % 2)) & 15        low nibble = even column
 *     W[n, k]      = codebook[code(n, k)] * scale(n, k / B)  (+ the CSR outlier at (n, k), if any)
 *     scale, cols, vals as stored (ql_scale_at, ql_outlier_col, ql_outlier_val: every storage kind)
 *     encode(v)    = #{i : mid[i] < v * r},  mid[i] = (codebook[i] + codebook[i+1]) / 2
 *
 * plus the conversions of x / y between float32 and float16 / bfloat16 (round to nearest even, as
 * torch's .to() does). The scalar CPU kernel is written in these functions (ql_group_levels,
 * ql_group_dot, ql_outlier_partial, ql_load / ql_store) and the CUDA GEMV kernel calls the same
 * ones, so the CPU tests cover the math the GPU runs; the tensor-core kernel shares the group
 * decode, and the AVX2 kernel is a vectorised copy, both tested against the same reference.
 */
#ifndef QUANTLITE_DECODE_H
#define QUANTLITE_DECODE_H

#include <stdint.h>
#include <string.h>

#include "quantlite.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QL_HOSTDEV __host__ __device__ __forceinline__
#else
#define QL_HOSTDEV static inline
#endif

/* ---------------------------------------------------------------- codes and levels */
QL_HOSTDEV int ql_code_at(const uint8_t *code_row, int64_t k) {
    return (code_row[k >> 1] >> ((k & 1) * 4)) & 15;
}

/* A code's level; kernels multiply a block's sum of level * x by the block's scale once. */
QL_HOSTDEV float ql_level(const float *codebook, int code) { return codebook[code]; }

/* Kernels read codes 8 bytes (16 columns) at a time; 16 always divides B, so a group never crosses
 * a block. As two little-endian 32-bit words, column col0 + i is nibble i % 8 of word i / 8. */
QL_HOSTDEV void ql_group_levels(uint32_t low_word, uint32_t high_word, const float *codebook, float levels[16]) {
    for (int i = 0; i < 8; ++i) {
        levels[i] = ql_level(codebook, (low_word >> (4 * i)) & 15u);
        levels[8 + i] = ql_level(codebook, (high_word >> (4 * i)) & 15u);
    }
}

/* One dequantized weight without its outlier. */
QL_HOSTDEV float ql_weight_at(const float *codebook, int code, float scale) {
    return ql_level(codebook, code) * scale;
}

/* The reciprocal the quantizer multiplies by: 1 / scale, clamped to the smallest normal float so a
 * subnormal scale cannot overflow, and 0 for an all-zero block (its weights all get the zero code). */
QL_HOSTDEV float ql_block_reciprocal(float scale) {
    const float smallest_normal = 1.17549435e-38f;
    return scale > 0.0f ? 1.0f / (scale < smallest_normal ? smallest_normal : scale) : 0.0f;
}

/* The decision thresholds between neighbouring levels: mid (15,) float32. */
QL_HOSTDEV void ql_midpoints(const float *codebook, float *mid) {
    for (int i = 0; i < 15; ++i) mid[i] = (codebook[i] + codebook[i + 1]) * 0.5f;
}

/* Code of the nearest level of an already normalised value; a value exactly on a midpoint goes to
 * the lower level (torch.bucketize(right=False), bitsandbytes' quantize_4bit). */
QL_HOSTDEV int ql_encode_value(float normalized, const float *mid) {
    int code = 0;
    for (int i = 0; i < 15; ++i) code += mid[i] < normalized;
    return code;
}

/* ---------------------------------------------------------------- float16 / bfloat16 */
QL_HOSTDEV float ql_bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

QL_HOSTDEV uint32_t ql_float_to_bits(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

QL_HOSTDEV float ql_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {  /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return ql_bits_to_float(sign | ql_float_to_bits(magnitude));
    }
    if (exponent == 31) return ql_bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    return ql_bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/* Round to nearest even, overflow to infinity, NaN stays NaN (F. Giesen's float_to_half_fast3_rtne). */
QL_HOSTDEV uint16_t ql_f32_to_f16(float f) {
    uint32_t bits = ql_float_to_bits(f);
    const uint32_t sign = bits & 0x80000000u;
    bits ^= sign;
    uint32_t half;
    if (bits >= (127u + 16u) << 23) {                 /* >= 65536, inf or NaN */
        half = bits > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (bits < 113u << 23) {                   /* below 2^-14: a float16 subnormal or zero */
        const uint32_t magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
        half = ql_float_to_bits(ql_bits_to_float(bits) + ql_bits_to_float(magic)) - magic;
    } else {
        const uint32_t mantissa_odd = (bits >> 13) & 1u;
        bits += ((uint32_t)(15 - 127) << 23) + 0xfffu + mantissa_odd;
        half = bits >> 13;
    }
    return (uint16_t)(half | (sign >> 16));
}

QL_HOSTDEV float ql_bf16_to_f32(uint16_t b) { return ql_bits_to_float((uint32_t)b << 16); }

QL_HOSTDEV uint16_t ql_f32_to_bf16(float f) {
    const uint32_t bits = ql_float_to_bits(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);  /* quiet NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* ---------------------------------------------------------------- x and y elements */
QL_HOSTDEV int ql_dtype_size(int dtype) { return dtype == QL_F32 ? 4 : 2; }

QL_HOSTDEV float ql_load(const void *base, int dtype, int64_t index) {
    if (dtype == QL_F32) return ((const float *)base)[index];
#ifdef __CUDA_ARCH__  /* the hardware conversions are the same IEEE conversions, in one instruction */
    if (dtype == QL_F16) return __half2float(((const __half *)base)[index]);
    return __bfloat162float(((const __nv_bfloat16 *)base)[index]);
#else
    if (dtype == QL_F16) return ql_f16_to_f32(((const uint16_t *)base)[index]);
    return ql_bf16_to_f32(((const uint16_t *)base)[index]);
#endif
}

QL_HOSTDEV void ql_store(void *base, int dtype, int64_t index, float value) {
    if (dtype == QL_F32) {
        ((float *)base)[index] = value;
        return;
    }
#ifdef __CUDA_ARCH__
    if (dtype == QL_F16) ((__half *)base)[index] = __float2half_rn(value);
    else ((__nv_bfloat16 *)base)[index] = __float2bfloat16_rn(value);
#else
    ((uint16_t *)base)[index] = dtype == QL_F16 ? ql_f32_to_f16(value) : ql_f32_to_bf16(value);
#endif
}

/* ---------------------------------------------------------------- one group's dot product */
/* sum_i levels[i] * x_row[col0 + i] over the group's columns below K (padding columns have no x). */
QL_HOSTDEV float ql_group_dot(const float levels[16], const void *x_row, int dtype, int64_t col0, int64_t k) {
    float sum = 0.0f;
    if (col0 + 16 <= k) {
        for (int i = 0; i < 16; ++i) sum += levels[i] * ql_load(x_row, dtype, col0 + i);
    } else {
        for (int i = 0; i < 16; ++i)
            if (col0 + i < k) sum += levels[i] * ql_load(x_row, dtype, col0 + i);
    }
    return sum;
}

/* ---------------------------------------------------------------- stored scales and outliers */
/* Scale i of the row-major (N, Kp / B) scales, whatever their storage (ql_scale_kind). */
QL_HOSTDEV float ql_scale_at(const ql_weight *w, int64_t i) {
    if (w->scale_kind == QL_SCALES_F32) return ((const float *)w->scales)[i];
    if (w->scale_kind == QL_SCALES_F16) return ql_f16_to_f32(((const uint16_t *)w->scales)[i]);
    const int64_t group = i / QL_SCALE_GROUP;
    return w->scale_group_min[group] + (float)((const uint8_t *)w->scales)[i] * w->scale_group_step[group];
}

QL_HOSTDEV int64_t ql_outlier_col(const void *cols, int col_kind, int64_t e) {
    return col_kind == QL_COLS_U16 ? ((const uint16_t *)cols)[e] : ((const int32_t *)cols)[e];
}

QL_HOSTDEV float ql_outlier_val(const void *vals, int val_kind, int64_t e) {
    return val_kind == QL_VALS_F16 ? ql_f16_to_f32(((const uint16_t *)vals)[e]) : ((const float *)vals)[e];
}

/* Part of sum_e vals[e] * x_row[cols[e]] over row n's CSR entries e = first, first + step, ...
 * (a CUDA lane takes every 32nd entry, with the widened kinds as constants; the CPU takes them all
 * with first = 0, step = 1). */
QL_HOSTDEV float ql_outlier_partial(const int32_t *row_ptr, const void *cols, int col_kind, const void *vals,
                                    int val_kind, int64_t n, const void *x_row, int dtype, int first, int step) {
    float sum = 0.0f;
    for (int64_t e = row_ptr[n] + first; e < row_ptr[n + 1]; e += step)
        sum += ql_outlier_val(vals, val_kind, e) * ql_load(x_row, dtype, ql_outlier_col(cols, col_kind, e));
    return sum;
}

#endif /* QUANTLITE_DECODE_H */
