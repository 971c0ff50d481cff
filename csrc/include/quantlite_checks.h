/* Argument checks shared by the CPU and CUDA entry points (host code). They look at sizes and
 * pointers only; the CPU library also checks the CSR contents, which a CUDA entry point cannot read
 * without a device-to-host copy. */
#ifndef QUANTLITE_CHECKS_H
#define QUANTLITE_CHECKS_H

#include <stddef.h>

#include "quantlite.h"

/* The block sizes the format allows: the same rule as quantlite/qweight.py (block_size_problem). */
#define QL_MIN_BLOCK_SIZE 32
#define QL_MAX_BLOCK_SIZE 256
#define QL_BLOCK_SIZE_MULTIPLE 16

static inline int ql_block_size_ok(int64_t block_size) {
    return block_size >= QL_MIN_BLOCK_SIZE && block_size <= QL_MAX_BLOCK_SIZE && block_size % QL_BLOCK_SIZE_MULTIPLE == 0;
}

static inline int64_t ql_padded_k(const ql_weight *w) {
    return (w->k + w->block_size - 1) / w->block_size * w->block_size;
}

static inline int ql_check_weight(const ql_weight *w) {
    if (w == NULL || w->codes == NULL || w->scales == NULL || w->codebook == NULL || w->row_ptr == NULL)
        return QL_ERR_NULL_POINTER;
    if (w->n <= 0 || w->k <= 0 || w->nnz < 0) return QL_ERR_BAD_SIZE;
    if (w->nnz > 0 && (w->cols == NULL || w->vals == NULL)) return QL_ERR_NULL_POINTER;
    if (!ql_block_size_ok(w->block_size)) return QL_ERR_BAD_BLOCK_SIZE;
    if (w->scale_kind < QL_SCALES_F32 || w->scale_kind > QL_SCALES_DQ || w->col_kind < QL_COLS_I32 ||
        w->col_kind > QL_COLS_U16 || w->val_kind < QL_VALS_F32 || w->val_kind > QL_VALS_F16 ||
        (w->col_kind == QL_COLS_U16 && w->k > 65536))
        return QL_ERR_BAD_LAYOUT;
    if (w->scale_kind == QL_SCALES_DQ && (w->scale_group_min == NULL || w->scale_group_step == NULL))
        return QL_ERR_NULL_POINTER;
    return QL_OK;
}

/* The CUDA kernels read the widened layout only (float32 scales, int32 columns, float32 values). */
static inline int ql_check_widened(const ql_weight *w) {
    return w->scale_kind == QL_SCALES_F32 && w->col_kind == QL_COLS_I32 && w->val_kind == QL_VALS_F32
               ? QL_OK : QL_ERR_BAD_LAYOUT;
}

static inline int ql_check_dtype(int dtype) {
    return dtype == QL_F32 || dtype == QL_F16 || dtype == QL_BF16 ? QL_OK : QL_ERR_BAD_DTYPE;
}

static inline int ql_check_matmul(const ql_weight *w, const void *x, int64_t m, int64_t x_row_stride,
                                  const void *y, int64_t y_row_stride, int dtype) {
    int status = ql_check_weight(w);
    if (status != QL_OK) return status;
    if (x == NULL || y == NULL) return QL_ERR_NULL_POINTER;
    if (m <= 0) return QL_ERR_BAD_SIZE;
    if (x_row_stride < w->k || y_row_stride < w->n) return QL_ERR_BAD_STRIDE;
    return ql_check_dtype(dtype);
}

#endif
