/* probe_hbm_locality.cu — how fast HBM serves the int4 weight streams of our two matmul kernels,
 * by access pattern alone (no arithmetic): weights laid out as [n/R][k/128][R rows][64 bytes]
 * (R = 1: the row-major layout the kernels use) and read
 *  (a) as the wgmma GEMM does: a block of 256 threads takes 128 rows x 64 bytes per stage of k,
 *      four stages in flight, two blocks per multiprocessor (shared memory set to force that);
 *  (b) as the batch-1 GEMV does: a warp takes 4 rows x 512 bytes per item, four items in flight,
 *      12 warps, one block per multiprocessor.
 * Standalone (no quill code): nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a
 * tests/backend/probe_hbm_locality.cu -o probe && ./probe. Results: bench/RESULTS.md, fifteenth
 * session. */
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

__device__ __forceinline__ size_t off_of(int row, int chunk, int R, int KT) {  // chunk: 16 B unit of the row
    const int g = row / R, rr = row % R, kt = chunk >> 2, cc = chunk & 3;
    return (((size_t)g * KT + kt) * R + rr) * 64 + cc * 16;
}
__device__ __forceinline__ uint4 ldw(const char *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__global__ void gemm_pat(const char *w, int R, int KT, int stages_per_block, int feature_tiles, unsigned *sink) {
    const int ft = blockIdx.x % feature_tiles, part = blockIdx.x / feature_tiles;
    unsigned acc = 0;
    for (int s = 0; s < stages_per_block; s += 4) {
        uint4 v[4][2];
#pragma unroll
        for (int d = 0; d < 4; d++)
#pragma unroll
            for (int l = 0; l < 2; l++) {
                const int idx = threadIdx.x + 256 * l, r = idx >> 2, c = idx & 3;
                const int kt = part * stages_per_block + s + d;
                v[d][l] = ldw(w + off_of(ft * 128 + r, kt * 4 + c, R, KT));
            }
#pragma unroll
        for (int d = 0; d < 4; d++)
#pragma unroll
            for (int l = 0; l < 2; l++) acc ^= v[d][l].x ^ v[d][l].w;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

__global__ void gemv_pat(const char *w, int R, int KT, int n, unsigned *sink) {
    const int warp = blockIdx.x * 12 + (threadIdx.x >> 5), lane = threadIdx.x & 31, nw = gridDim.x * 12;
    const int groups = n / 4, g0 = (int)((long long)warp * groups / nw), g1 = (int)((long long)(warp + 1) * groups / nw);
    const int iters = KT * 4 / 32;  // items per group
    unsigned acc = 0;
    const int total = (g1 - g0) * iters;
    for (int i = 0; i < total; i += 4) {
        uint4 v[4][4];
#pragma unroll
        for (int d = 0; d < 4; d++) {
            const int item = min(i + d, total - 1), g = g0 + item / iters, it = item % iters;
#pragma unroll
            for (int r = 0; r < 4; r++) v[d][r] = ldw(w + off_of(g * 4 + r, it * 32 + lane, R, KT));
        }
#pragma unroll
        for (int d = 0; d < 4; d++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc ^= v[d][r].x ^ v[d][r].w;
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

template <class F>
float timeit(F f) {
    cudaEvent_t a, b;
    cudaEventCreate(&a), cudaEventCreate(&b);
    f();
    cudaEventRecord(a);
    for (int i = 0; i < 20; i++) f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    return ms / 20;
}

int main() {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    unsigned *sink;
    cudaMalloc(&sink, 4);
    cudaFuncSetAttribute(gemm_pat, cudaFuncAttributeMaxDynamicSharedMemorySize, 110 << 10);
    cudaFuncSetAttribute(gemv_pat, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 << 10);
    struct Shape { const char *name; int n, k; } shapes[] = {{"gate_up", 24576, 4096}, {"down", 4096, 12288}, {"qkv", 6144, 4096}};
    for (auto sh : shapes) {
        const size_t bytes = (size_t)sh.n * sh.k / 2;
        char *w;
        cudaMalloc(&w, bytes);
        cudaMemset(w, 1, bytes);
        const int KT = sh.k / 128, ft = sh.n / 128;
        for (int R : {1, 4, 8, 16, 64}) {
            float best_gemm = 1e9f;
            int best_split = 0;
            for (int split = 1; split <= 8; split *= 2) {
                float t = timeit([&] { gemm_pat<<<ft * split, 256, 110 << 10>>>(w, R, KT, KT / split, ft, sink); });
                if (t < best_gemm) best_gemm = t, best_split = split;
            }
            float tv = timeit([&] { gemv_pat<<<sms, 384, 200 << 10>>>(w, R, KT, sh.n, sink); });
            printf("%-8s R=%-3d GEMM pattern %6.1f us (%4.0f GB/s, split %d)   GEMV pattern %6.1f us (%4.0f GB/s)\n", sh.name, R,
                   best_gemm * 1e3, bytes / best_gemm / 1e6, best_split, tv * 1e3, bytes / tv / 1e6);
        }
        cudaFree(w);
    }
    printf("err: %s\n", cudaGetErrorString(cudaGetLastError()));
    return 0;
}
