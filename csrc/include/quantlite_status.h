/* ql_abi_version and ql_error_string, which both libraries export. Definitions, not declarations:
 * included by exactly one source file of each library (cpu/api.c, cuda/api.cu). */
#ifndef QUANTLITE_STATUS_H
#define QUANTLITE_STATUS_H

#include "quantlite.h"

#ifdef __cplusplus
extern "C" {
#endif

QL_API int ql_abi_version(void) { return QL_ABI_VERSION; }

QL_API const char *ql_error_string(int status) {
    switch (status) {
        case QL_OK: return "success";
        case QL_ERR_NULL_POINTER: return "a required pointer is NULL";
        case QL_ERR_BAD_SIZE: return "a size (M, N, K or nnz) is out of range";
        case QL_ERR_BAD_BLOCK_SIZE: return "block_size must be a multiple of 16 in [32, 256]";
        case QL_ERR_BAD_STRIDE: return "a row stride is smaller than its row";
        case QL_ERR_BAD_DTYPE: return "dtype must be QL_F32, QL_F16 or QL_BF16";
        case QL_ERR_BAD_ISA: return "this CPU does not support the instruction set asked for";
        case QL_ERR_OUT_OF_MEMORY: return "out of host memory for scratch buffers";
        case QL_ERR_BAD_OUTLIERS: return "outlier CSR is malformed (row_ptr must rise from 0 to nnz, columns lie in [0, K))";
        case QL_ERR_NO_CUDA_DEVICE: return "no CUDA driver or device";
        case QL_ERR_CUDA: return "a CUDA call failed (see ql_cuda_last_error)";
        case QL_ERR_MISALIGNED: return "codes must be 8-byte aligned for the CUDA kernels' vector loads";
        case QL_ERR_BAD_LAYOUT:
            return "a storage tag (scale_kind, col_kind, val_kind) is not one of quantlite.h's, uint16 columns with K > 65536, "
                   "or (CUDA) not the widened layout (float32 scales, int32 columns, float32 values)";
        default: return "unknown quantlite status code";
    }
}

#ifdef __cplusplus
}
#endif

#endif
