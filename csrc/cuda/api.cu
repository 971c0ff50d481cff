// The CUDA entry points of quantlite.h: check the arguments (sizes and pointers; device memory is
// not read on the host), pick the kernel, launch on the caller's stream, report errors.
//
//   M <= GEMV_MAX_M, or float32 x  -> gemv.cu   (weights read once per 8 rows of x)
//   otherwise (fp16 / bf16, M > 8) -> mma.cu    (tensor cores, 64 x 64 tiles)
// Grids have at most 65535 blocks along y, so M is walked in chunks the launchers can cover.
#include <cstdio>

#include <cuda_runtime.h>

#include "common.cuh"
#include "quantlite_checks.h"
#include "quantlite_status.h"

namespace {

constexpr int64_t GEMV_MAX_M = 8;
constexpr int64_t M_PER_LAUNCH = 65535 * 8;  // the GEMV's grid.y limit (8 rows per block); also fine for mma

thread_local char last_error[512] = "no CUDA error recorded";

int record(cudaError_t error, const char *what) {
    std::snprintf(last_error, sizeof last_error, "%s: %s (%s)", what, cudaGetErrorString(error), cudaGetErrorName(error));
    return error == cudaErrorNoDevice || error == cudaErrorInsufficientDriver ? QL_ERR_NO_CUDA_DEVICE : QL_ERR_CUDA;
}

template <int DTYPE>
cudaError_t launch_qmatmul(const ql_weight &w, const char *x, int64_t m, int64_t x_row_stride, char *y,
                           int64_t y_row_stride, cudaStream_t stream) {
    const int element = ql_dtype_size(DTYPE);
    for (int64_t m0 = 0; m0 < m; m0 += M_PER_LAUNCH) {
        const int64_t rows = m - m0 < M_PER_LAUNCH ? m - m0 : M_PER_LAUNCH;
        const char *x_part = x + m0 * x_row_stride * element;
        char *y_part = y + m0 * y_row_stride * element;
        cudaError_t error;
        if constexpr (DTYPE == QL_F32) {
            error = ql_launch_gemv<DTYPE>(w, x_part, rows, x_row_stride, y_part, y_row_stride, stream);
        } else {
            error = m <= GEMV_MAX_M ? ql_launch_gemv<DTYPE>(w, x_part, rows, x_row_stride, y_part, y_row_stride, stream)
                                    : ql_launch_mma<DTYPE>(w, x_part, rows, x_row_stride, y_part, y_row_stride, stream);
        }
        if (error != cudaSuccess) return error;
    }
    return cudaSuccess;
}

}  // namespace

extern "C" {

QL_API int ql_cuda_qmatmul(const ql_weight *w, const void *x, int64_t m, int64_t x_row_stride, void *y,
                           int64_t y_row_stride, int dtype, void *stream) {
    int status = ql_check_matmul(w, x, m, x_row_stride, y, y_row_stride, dtype);
    if (status == QL_OK) status = ql_check_widened(w);  // the CUDA kernels read float32 / int32 / float32
    if (status != QL_OK) return status;
    if ((uintptr_t)w->codes % 8 != 0) return QL_ERR_MISALIGNED;
    const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
    const char *x_bytes = static_cast<const char *>(x);
    char *y_bytes = static_cast<char *>(y);
    cudaError_t error;
    switch (dtype) {
        case QL_F32: error = launch_qmatmul<QL_F32>(*w, x_bytes, m, x_row_stride, y_bytes, y_row_stride, cuda_stream); break;
        case QL_F16: error = launch_qmatmul<QL_F16>(*w, x_bytes, m, x_row_stride, y_bytes, y_row_stride, cuda_stream); break;
        default: error = launch_qmatmul<QL_BF16>(*w, x_bytes, m, x_row_stride, y_bytes, y_row_stride, cuda_stream); break;
    }
    return error == cudaSuccess ? QL_OK : record(error, "qmatmul launch");
}

QL_API int ql_cuda_dequantize(const ql_weight *w, void *out, int64_t out_row_stride, int dtype, void *stream) {
    int status = ql_check_weight(w);
    if (status == QL_OK) status = ql_check_widened(w);
    if (status == QL_OK && out == nullptr) status = QL_ERR_NULL_POINTER;
    if (status == QL_OK && out_row_stride < w->k) status = QL_ERR_BAD_STRIDE;
    if (status == QL_OK) status = ql_check_dtype(dtype);
    if (status != QL_OK) return status;
    const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
    cudaError_t error;
    switch (dtype) {
        case QL_F32: error = ql_launch_dequantize<QL_F32>(*w, out, out_row_stride, cuda_stream); break;
        case QL_F16: error = ql_launch_dequantize<QL_F16>(*w, out, out_row_stride, cuda_stream); break;
        default: error = ql_launch_dequantize<QL_BF16>(*w, out, out_row_stride, cuda_stream); break;
    }
    return error == cudaSuccess ? QL_OK : record(error, "dequantize launch");
}

QL_API int ql_cuda_device_count(int *count) {
    if (count == nullptr) return QL_ERR_NULL_POINTER;
    *count = 0;
    const cudaError_t error = cudaGetDeviceCount(count);
    if (error != cudaSuccess) {
        *count = 0;
        record(error, "cudaGetDeviceCount");
        return QL_ERR_NO_CUDA_DEVICE;
    }
    if (*count == 0) {
        std::snprintf(last_error, sizeof last_error, "the CUDA driver reports no device");
        return QL_ERR_NO_CUDA_DEVICE;
    }
    return QL_OK;
}

QL_API const char *ql_cuda_last_error(void) { return last_error; }

}  // extern "C"
