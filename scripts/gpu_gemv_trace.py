#!/usr/bin/env python3
"""gpu_gemv_trace.py — a per-block timeline of the batch-1 int4 GEMVs of a decode step (a
diagnostic, not part of quill). Writes an instrumented copy of src/backend/cuda/cuda_gemv.cu in
which every block of gemv_q4x<1> records %globaltimer at its start, after pdl_wait(), after the
x prologue and at its end, and a copy of tests/backend/bench_cuda_decode.cu that replays the
decode-step graph three times with recording on and prints, per matrix (mean over the 36 layers
of the second step, ns): first block start and first release after the previous GEMV's last
block ended (s-pe, r-pe), spread of the releases, prologue (mean / max over blocks), loop + drain,
tail (first to last block end), span (previous GEMV's end to this one's), the mean wait of a
block before its release, and the matrix's stream time at the copy probe's rate.

On the GPU machine, after scripts/gpu_build.sh (bench/RESULTS.md, ninth session, has a run):
  python3 scripts/gpu_gemv_trace.py /tmp/trace
  nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Isrc /tmp/trace/bench_trace.cu \\
      /tmp/trace/cuda_gemv.cu build-gpu/libquill_cuda.a -lcublas -o /tmp/bench-trace
  /tmp/bench-trace --dtype int4 --ctx 512
The instrumented object replaces the library's cuda_gemv.o at link time. The barrier it adds at
each block's end costs a little (H100: decode step 2.59 -> 2.66 ms)."""
import os
import sys

TRACE_STATE = r'''
constexpr unsigned kTrCap = 65536;
__device__ unsigned long long g_tr[kTrCap][4];
__device__ int g_tr_nk[kTrCap][2];
__device__ unsigned g_tr_n = 0xffffffffu; /* off until gemv_trace_begin */
__device__ __forceinline__ unsigned long long gtime() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
'''

RECORD = r'''    cp_async_wait<0>();
    __syncthreads();
    if (M == 1 && threadIdx.x == 0 && g_tr_n < kTrCap) {
        const unsigned long long tr3 = gtime();
        const unsigned s = atomicAdd(&g_tr_n, 1u);
        if (s < kTrCap) {
            g_tr[s][0] = tr0, g_tr[s][1] = tr1, g_tr[s][2] = tr2, g_tr[s][3] = tr3;
            g_tr_nk[s][0] = pair ? 2 * pair : n, g_tr_nk[s][1] = k;
        }
    }
}'''

REPORT = r'''
extern "C" void gemv_trace_begin(void) {
    unsigned z = 0;
    cudaMemcpyToSymbol(g_tr_n, &z, sizeof z);
}

/* Launches are told apart by their matrix (n, k): the i-th run of sms blocks of a matrix, by
 * start time, is its i-th launch. Prints the second of the recorded steps (144 launches each). */
extern "C" void gemv_trace_report(int sms, double probe_gbs) {
    unsigned n = 0, off = 0xffffffffu;
    cudaDeviceSynchronize();
    cudaMemcpyFromSymbol(&n, g_tr_n, sizeof n);
    cudaMemcpyToSymbol(g_tr_n, &off, sizeof off);
    if (n > kTrCap) n = kTrCap;
    std::vector<unsigned long long> t(4 * (size_t)n);
    std::vector<int> nk(2 * (size_t)n);
    cudaMemcpyFromSymbol(t.data(), g_tr, t.size() * 8);
    cudaMemcpyFromSymbol(nk.data(), g_tr_nk, nk.size() * 4);
    struct L { int n, k; unsigned long long s0, w0, w1, p1, e0, e1; double pm, pmax, wm; };
    std::map<long long, std::vector<int>> kinds;
    for (unsigned i = 0; i < n; i++) kinds[(long long)nk[2 * i] * 100000 + nk[2 * i + 1]].push_back(i);
    std::vector<L> ls;
    for (auto &kv : kinds) {
        auto &v = kv.second;
        std::sort(v.begin(), v.end(), [&](int a, int b) { return t[4 * a] < t[4 * b]; });
        for (size_t j = 0; j + sms <= v.size(); j += sms) {
            L l{};
            l.n = nk[2 * v[j]], l.k = nk[2 * v[j] + 1];
            l.s0 = l.w0 = l.e0 = ~0ull;
            for (int b = 0; b < sms; b++) {
                const unsigned long long *r = &t[4 * (size_t)v[j + b]];
                l.s0 = std::min(l.s0, r[0]);
                l.w0 = std::min(l.w0, r[1]), l.w1 = std::max(l.w1, r[1]);
                l.p1 = std::max(l.p1, r[2]);
                l.e0 = std::min(l.e0, r[3]), l.e1 = std::max(l.e1, r[3]);
                l.pm += (double)(r[2] - r[1]) / sms, l.pmax = std::max(l.pmax, (double)(r[2] - r[1]));
                l.wm += (double)(r[1] - r[0]) / sms;
            }
            ls.push_back(l);
        }
    }
    std::sort(ls.begin(), ls.end(), [](const L &a, const L &b) { return a.s0 < b.s0; });
    const size_t per = 144, st = per; /* the second step */
    printf("trace: %u block records, %zu launches\n", n, ls.size());
    if (ls.size() < st + per) {
        printf("trace: too few launches\n");
        return;
    }
    const char *names[4] = {"qkv", "o", "gate_up", "down"};
    double sum[4][9] = {};
    for (size_t i = st; i < st + per; i++) {
        const L &l = ls[i], &p = ls[i - 1];
        const double v[9] = {(double)((long long)l.s0 - (long long)p.e1), (double)((long long)l.w0 - (long long)p.e1),
                             (double)(l.w1 - l.w0), l.pm, l.pmax, (double)(l.e1 - l.p1), (double)(l.e1 - l.e0),
                             (double)(l.e1 - p.e1), l.wm};
        for (int q = 0; q < 9; q++) sum[(i - st) % 4][q] += v[q] / (per / 4);
    }
    for (int kind = 0; kind < 4; kind++) {
        const L &l = ls[st + kind];
        const double bytes = (double)l.n * l.k / 2 + (double)l.n * (l.k / 128) * 4;
        const double *s = sum[kind];
        printf("  mean %-7s s-pe %6.0f r-pe %6.0f spread %5.0f prologue %5.0f/%5.0f loop+drain %6.0f tail %5.0f "
               "span %6.0f waitm %6.0f ideal %6.0f ns (n %d k %d)\n", names[kind], s[0], s[1], s[2], s[3], s[4], s[5],
               s[6], s[7], s[8], bytes / probe_gbs, l.n, l.k);
    }
    printf("  step: first GEMV start to last GEMV end %.1f us\n", (ls[st + per - 1].e1 - ls[st].s0) / 1e3);
}
'''

BENCH_HOOK = r'''
    for (int tr = 0; tr < 2; tr++) { /* gpu_gemv_trace.py */
        gemv_trace_begin();
        for (int i = 0; i < 3; i++) {
            op->to_device(b.be, b.x, xh, (size_t)H * 4);
            op->graph_replay(b.be, 1);
        }
        op->sync(b.be);
        int dev = 0, sms = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        gemv_trace_report(sms, probe);
    }'''


def replace_once(text, old, new, what):
    if text.count(old) != 1:
        sys.exit(f"gpu_gemv_trace.py: {what}: the source no longer has the expected text; update this script")
    return text.replace(old, new)


def instrument_gemv(src):
    src = replace_once(src, 'namespace {\n', 'namespace {\n' + TRACE_STATE, "namespace")
    src = replace_once(src, '    __shared__ float red[32];\n    pdl_trigger();',
                       '    __shared__ float red[32];\n    const unsigned long long tr0 = gtime();\n    pdl_trigger();',
                       "gemv_q4x start")
    src = replace_once(src, '    pdl_wait();\n    float scale[M];',
                       '    pdl_wait();\n    const unsigned long long tr1 = gtime();\n    float scale[M];',
                       "gemv_q4x pdl_wait")
    src = replace_once(src, '    __syncthreads();\n\n    float acc[M][kRows] = {};',
                       '    __syncthreads();\n    const unsigned long long tr2 = gtime();\n\n    float acc[M][kRows] = {};',
                       "gemv_q4x prologue")
    src = replace_once(src, '    cp_async_wait<0>();\n}', RECORD, "gemv_q4x end")
    return '#include <algorithm>\n#include <cstdio>\n#include <map>\n#include <vector>\n' + src + REPORT


def instrument_bench(src):
    src = replace_once(src, 'int main(int argc, char **argv) {',
                       'extern "C" void gemv_trace_begin(void);\n'
                       'extern "C" void gemv_trace_report(int sms, double probe_gbs);\n'
                       'int main(int argc, char **argv) {', "bench main")
    step = '    double t_step = time_graph(&b, 1, [&] { forward(&b, &dm, 1, false); }, reps, 20, true, xh);'
    return replace_once(src, step, step + BENCH_HOOK, "bench decode step")


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: gpu_gemv_trace.py OUT_DIR [CUDA_GEMV_SOURCE]")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1]
    gemv = sys.argv[2] if len(sys.argv) == 3 else os.path.join(root, "src/backend/cuda/cuda_gemv.cu")
    os.makedirs(out, exist_ok=True)
    with open(gemv) as f:
        gemv_src = instrument_gemv(f.read())
    with open(os.path.join(root, "tests/backend/bench_cuda_decode.cu")) as f:
        bench_src = instrument_bench(f.read())
    with open(os.path.join(out, "cuda_gemv.cu"), "w") as f:
        f.write(gemv_src)
    with open(os.path.join(out, "bench_trace.cu"), "w") as f:
        f.write(bench_src)


if __name__ == "__main__":
    main()
