/* The AVX-512 decode of 16 consecutive columns of one stored weight row into their float32 levels
 * (natural column order), shared by the dequantizer (dequantize_avx512.c) and the prefill GEMM's
 * packing step (gemm_avx512.c). Codes as stored: low nibble = even column. The 8 code bytes are
 * doubled (b0 b0 b1 b1 ..), widened to 16 dwords and shifted right by 0 / 4 alternately, so that
 * dword i holds column i's nibble in its low 4 bits, which is all vpermps reads of an index: one
 * vpermps looks up the 16 float32 levels held in one register. Included only by *_avx512.c. */
#ifndef QL_CPU_LEVELS_AVX512_H
#define QL_CPU_LEVELS_AVX512_H

#include <immintrin.h>
#include <stdint.h>

/* Levels of columns 2j .. 2j + 15 of a row whose code bytes start at `bytes` (= codes + j). */
static inline __attribute__((always_inline)) __m512 ql_avx512_levels16(const uint8_t *bytes, __m512 codebook) {
    const __m512i nibble_shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    const __m128i pair = _mm_loadl_epi64((const __m128i *)bytes);
    const __m512i index = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(pair, pair)), nibble_shift);
    return _mm512_permutexvar_ps(index, codebook);
}

#endif
