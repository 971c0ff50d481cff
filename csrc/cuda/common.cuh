// Shared by the CUDA kernels and their launcher: dtype tags as C++ types, the per-thread error text.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "quantlite.h"
#include "quantlite_decode.h"

// The element type of a dtype tag (x, y and the tensor-core tiles).
template <int DTYPE> struct ql_element;
template <> struct ql_element<QL_F32> { using type = float; };
template <> struct ql_element<QL_F16> { using type = __half; };
template <> struct ql_element<QL_BF16> { using type = __nv_bfloat16; };

// Launchers (one per kernel file); each returns the launch's cudaError_t.
template <int DTYPE>
cudaError_t ql_launch_gemv(const ql_weight &w, const void *x, int64_t m, int64_t x_row_stride, void *y,
                           int64_t y_row_stride, cudaStream_t stream);
template <int DTYPE>
cudaError_t ql_launch_mma(const ql_weight &w, const void *x, int64_t m, int64_t x_row_stride, void *y,
                          int64_t y_row_stride, cudaStream_t stream);
template <int DTYPE>
cudaError_t ql_launch_dequantize(const ql_weight &w, void *out, int64_t out_row_stride, cudaStream_t stream);
