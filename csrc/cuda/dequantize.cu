// Dense dequantization on the GPU: out (N, K) = W in float32 / float16 / bfloat16.
// One thread per weight (grid.x over K, grid.y striding over N); an outlier is found by binary
// search in its row's ascending CSR columns and added before the single rounding to out's dtype.
#include <cuda_runtime.h>

#include "common.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int64_t MAX_GRID_Y = 65535;

template <int DTYPE>
__global__ void __launch_bounds__(THREADS)
dequantize_kernel(const ql_weight w, void *__restrict__ out, int64_t out_row_stride) {
    const int64_t k = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (k >= w.k) return;
    const int64_t padded_k = (w.k + w.block_size - 1) / w.block_size * w.block_size;
    for (int64_t n = blockIdx.y; n < w.n; n += gridDim.y) {
        float value = ql_weight_at(w.codebook, ql_code_at(w.codes + n * (padded_k / 2), k),
                                   ((const float *)w.scales)[n * (padded_k / w.block_size) + k / w.block_size]);
        int64_t low = w.row_ptr[n], high = w.row_ptr[n + 1];  // first column >= k in [low, high)
        while (low < high) {
            const int64_t mid = (low + high) / 2;
            if (((const int32_t *)w.cols)[mid] < k) low = mid + 1;
            else high = mid;
        }
        if (low < w.row_ptr[n + 1] && ((const int32_t *)w.cols)[low] == k) value += ((const float *)w.vals)[low];
        ql_store(out, DTYPE, n * out_row_stride + k, value);
    }
}

}  // namespace

template <int DTYPE>
cudaError_t ql_launch_dequantize(const ql_weight &w, void *out, int64_t out_row_stride, cudaStream_t stream) {
    const dim3 grid((unsigned)((w.k + THREADS - 1) / THREADS), (unsigned)(w.n < MAX_GRID_Y ? w.n : MAX_GRID_Y));
    dequantize_kernel<DTYPE><<<grid, THREADS, 0, stream>>>(w, out, out_row_stride);
    return cudaGetLastError();
}

template cudaError_t ql_launch_dequantize<QL_F32>(const ql_weight &, void *, int64_t, cudaStream_t);
template cudaError_t ql_launch_dequantize<QL_F16>(const ql_weight &, void *, int64_t, cudaStream_t);
template cudaError_t ql_launch_dequantize<QL_BF16>(const ql_weight &, void *, int64_t, cudaStream_t);
