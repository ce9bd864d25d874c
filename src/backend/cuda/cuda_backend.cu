/* cuda_backend.cu — the CUDA backend: device memory, weight upload, the KV pool, CUDA graphs,
 * and the op table that forwards to the kernels of cuda_gemv.cu, cuda_gemm_q4.cu, cuda_ops.cu,
 * cuda_attention.cu and cuda_sample.cu.
 *
 * Trade-offs:
 *  - Weights: bf16 stays bf16 (rows padded to a multiple of 8 so 16-byte loads stay aligned);
 *    int4 keeps the checkpoint's codes, each 16 bytes reordered in place for the tensor cores
 *    (fragment order, cuda_common.cuh), with scale and zero packed into one word per group, so an
 *    int4 model costs its file size on the GPU.
 *    Stacked parts (q|k|v, gate|up) become one matrix and one launch.
 *  - Decode at M = 1 (and int4 up to 3 tokens) uses our GEMV kernels (cuda_gemv.cu), built to
 *    stream weights from HBM once. Larger M converts x to bf16: int4 parts up to kGemmQ4MaxM
 *    rows (any M on Hopper: batched decode, chunked prefill, whole prefills) go to our
 *    tensor-core int4 GEMM (cuda_gemm_q4.cu), which reads the codes (0.5 byte per weight); bf16
 *    parts, and int4 parts at larger M elsewhere, call cuBLAS, int4 weights first dequantized to
 *    a bf16 scratch one matrix at a time (~4.5 bytes per weight, which cuBLAS's higher bf16 rate
 *    outweighs at large M). See kGemmQ4MaxM for the measurements.
 *  - The embedding table stays in host memory unless the model asks for it resident (a server),
 *    which keeps ~1.2 GB off the GPU. A bf16 table is then copied into page-locked host memory
 *    that kernels can read (1.25 GB of host memory for Qwen3-8B), so a kernel gathers a step's
 *    rows over the bus (8 KB per token) from the uploaded ids, as it does from a resident table;
 *    the host gathering and converting the rows into a pinned buffer and uploading them as
 *    float, with the GPU idle, took 1.4 ms of a 512-token prefill and 5.5 of a 2048-token one
 *    (H200). Other dtypes, or no pinned memory to be had: the host still does that.
 *  - Ops cannot fail (backend.h), so a CUDA error is recorded (the first one wins) for
 *    cuda_backend_error() and the op does nothing more.
 *  - Graph capture uses relaxed mode so scratch can still grow during a capture; a scratch buffer
 *    replaced while graphs exist is kept until destroy (a graph may point into it), and freeing
 *    any model buffer drops all graphs (a later model may reuse the same keys). */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cublas_v2.h>
#include <cuda_fp16.h>

#include "backend/cuda/cuda_common.cuh"

extern "C" {
#include "backend/cuda/cuda_backend.h"
#include "util/bf16.h"
}

bool cu_pdl = false;
bool cu_pdl_graphs = true;
bool cu_pdl_now = false;

namespace {

/* Never launched: its attributes tell which PTX version this file (and its siblings, built with
 * the same flags) was compiled for. */
__global__ void arch_probe_kernel() {}

/* Which kernel multiplies at which M (H100, one step's 144 linears of Qwen3-8B, bench_cuda_decode
 * --matmul-m): int4 up to M = 3 streams through the fixed-point GEMV (M = 1: 1.71 ms, 2: 2.18,
 * 3: 2.58; cu_gemv_takes); from there the tensor-core GEMM reads the codes directly (M = 4..16:
 * 2.85-2.88 ms, 32: 3.61, 64: 4.49, 128: 6.06, 256: 8.96); above kGemmQ4MaxM the weights are
 * dequantized to bf16 one matrix at a time for cuBLAS, whose tensor-core rate then makes up for
 * the extra ~4 bytes per weight. On Hopper the wgmma kernel takes every M (H200, the step's
 * linears as the model runs them, wgmma / dequant + cuBLAS: M = 512 13.25 / 16.30 ms, 1024 21.65
 * / 26.81, 2048 43.21 / 48.16, where bf16 takes 48.6; 4096 87.1 / 90.7, 8192 173.5 / 187.6,
 * where bf16 takes 188.4, since the kernel's tile groups, kTileGroup; serving int4 with 8192-token
 * steps the same either way, concurrency 64 / 256 7084 / 9626 vs 7072 / 9635 tok/s over four
 * alternating rounds, and no dequant scratch, ~200 MB, bench/RESULTS.md). bf16 uses the GEMV
 * only at M = 1: cuBLAS is as fast from M = 2. */
constexpr int kGemmQ4MaxM = 256;
constexpr int kBf16GemvMaxM = 1;
constexpr size_t kDequantElems = (size_t)128 << 20; /* bf16 elements of the dequant scratch (the
                                                       largest Qwen3-8B matrix is 100 M) */
constexpr size_t kConvertElems = (size_t)16 << 20;  /* host staging when converting weights */
constexpr size_t kBlasWorkspace = (size_t)32 << 20;
constexpr int kMaxParts = 3;

struct AllocRec {
    void *p;
    size_t n;
};

struct GraphRec {
    uint64_t key;
    cudaGraphExec_t exec;
};

struct CudaBackend {
    Backend base;
    int device, sms;
    bool wgmma; /* the int4 GEMM may use its wgmma kernel (QUILL_CUDA_WGMMA) */
    cudaStream_t st;
    cublasHandle_t blas;
    void *blas_ws;
    size_t used, peak;
    AllocRec *allocs;
    size_t n_allocs, cap_allocs;
    __nv_bfloat16 *xb; /* x as bf16 for cuBLAS, xb_n elements */
    size_t xb_n;
    float *xn;         /* RMSNorm or SwiGLU of x for a float GEMV that cannot make it, xn_n floats */
    size_t xn_n;
    __nv_bfloat16 *dq; /* dequantized int4 rows for cuBLAS, dq_n elements */
    size_t dq_n;
    void **retired; /* scratch replaced while graphs may still point into it */
    size_t n_retired, cap_retired;
    float *h_embed; /* pinned (or, if pinning failed, malloc'd) staging of embedding rows, or of
                       the ids (as int32) for a resident table */
    size_t h_embed_n;
    int32_t *d_embed_ids; /* the ids for a resident table, d_embed_ids_n of them */
    size_t d_embed_ids_n;
    bool h_embed_pinned;
    cudaEvent_t embed_done;
    CuSampleRow *h_rows, *d_rows;
    int32_t *h_ids, *d_ids;
    CuArgmax *d_argmax; /* sample_cap * kArgmaxSplits */
    int sample_cap;
    GraphRec *graphs;
    int n_graphs, cap_graphs;
    bool capturing;
    bool failed;
    char err[512];
};

CudaBackend *cb(Backend *be) { return reinterpret_cast<CudaBackend *>(be); }

int set_err(QErr *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int set_err(QErr *e, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* Records the first failure of an op; returns true when rc is success. */
bool note(CudaBackend *c, cudaError_t rc, const char *what) {
    if (rc == cudaSuccess) return true;
    if (!c->failed) {
        snprintf(c->err, sizeof c->err, "%s: %s", what, cudaGetErrorString(rc));
        c->failed = true;
    }
    return false;
}

bool note_blas(CudaBackend *c, cublasStatus_t rc, const char *what) {
    if (rc == CUBLAS_STATUS_SUCCESS) return true;
    if (!c->failed) {
        snprintf(c->err, sizeof c->err, "%s: cuBLAS status %d", what, (int)rc);
        c->failed = true;
    }
    return false;
}

void use_device(CudaBackend *c) { cudaSetDevice(c->device); }

/* ---- memory ------------------------------------------------------------------------------- */

void *dev_alloc(CudaBackend *c, size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError(); /* an out-of-memory error is not sticky; clear it */
        return NULL;
    }
    if (c->n_allocs == c->cap_allocs) {
        size_t cap = c->cap_allocs ? 2 * c->cap_allocs : 256;
        AllocRec *a = static_cast<AllocRec *>(realloc(c->allocs, cap * sizeof *a));
        if (!a) {
            cudaFree(p);
            return NULL;
        }
        c->allocs = a;
        c->cap_allocs = cap;
    }
    c->allocs[c->n_allocs++] = AllocRec{p, bytes};
    c->used += bytes;
    if (c->used > c->peak) c->peak = c->used;
    return p;
}

void drop_graphs(CudaBackend *c) {
    for (int i = 0; i < c->n_graphs; i++) cudaGraphExecDestroy(c->graphs[i].exec);
    c->n_graphs = 0;
}

void dev_free(CudaBackend *c, void *p) {
    if (!p) return;
    for (size_t i = c->n_allocs; i-- > 0;) {
        if (c->allocs[i].p != p) continue;
        c->used -= c->allocs[i].n;
        c->allocs[i] = c->allocs[--c->n_allocs];
        break;
    }
    cudaFree(p);
}

/* Scratch of at least n elements of `size` bytes in *buf (capacity *cap elements). A buffer that
 * a graph may reference is retired rather than freed. Returns false when out of memory. */
bool grow(CudaBackend *c, void **buf, size_t *cap, size_t n, size_t size) {
    if (n <= *cap) return true;
    size_t want = n + n / 4;
    void *p = dev_alloc(c, want * size);
    if (!p) return false;
    if (*buf) {
        if (c->n_graphs || c->capturing) {
            if (c->n_retired == c->cap_retired) {
                size_t rc = c->cap_retired ? 2 * c->cap_retired : 8;
                void **r = static_cast<void **>(realloc(c->retired, rc * sizeof *r));
                if (!r) {
                    dev_free(c, p);
                    return false;
                }
                c->retired = r;
                c->cap_retired = rc;
            }
            c->retired[c->n_retired++] = *buf;
        } else {
            dev_free(c, *buf);
        }
    }
    *buf = p;
    *cap = want;
    return true;
}

void *cu_alloc(Backend *be, size_t bytes) {
    CudaBackend *c = cb(be);
    use_device(c);
    return dev_alloc(c, bytes);
}

void cu_free(Backend *be, void *p) {
    CudaBackend *c = cb(be);
    if (!p) return;
    use_device(c);
    drop_graphs(c);
    dev_free(c, p);
}

void cu_to_device(Backend *be, void *dst, const void *src, size_t bytes) {
    CudaBackend *c = cb(be);
    if (!bytes) return;
    use_device(c);
    note(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->st), "to_device");
}

void cu_to_host(Backend *be, void *dst, const void *src, size_t bytes) {
    CudaBackend *c = cb(be);
    use_device(c);
    if (bytes) note(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->st), "to_host");
    note(c, cudaStreamSynchronize(c->st), "to_host");
}

void cu_sync(Backend *be) {
    CudaBackend *c = cb(be);
    use_device(c);
    note(c, cudaStreamSynchronize(c->st), "sync");
}

size_t cu_mem_free(Backend *be, size_t *total) {
    use_device(cb(be));
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        cudaGetLastError();
        free_b = total_b = 0;
    }
    if (total) *total = total_b;
    return free_b;
}

size_t cu_mem_used(Backend *be, size_t *peak) {
    CudaBackend *c = cb(be);
    if (peak) *peak = c->peak;
    return c->used;
}

/* ---- weights ------------------------------------------------------------------------------ */

float elem_f32(const StTensor *t, size_t i) {
    switch (t->dtype) {
    case DT_BF16: return bf16_to_f32(static_cast<const uint16_t *>(t->data)[i]);
    case DT_F16: return __half2float(static_cast<const __half *>(t->data)[i]);
    default: return static_cast<const float *>(t->data)[i];
    }
}

/* Drops the mapped pages of a tensor's bytes once uploaded, so they stop counting as resident
 * (they are read from the file again if ever touched). Only for tensors of a checkpoint file:
 * on anonymous memory this would zero the caller's data. */
void release_pages(const StTensor *t, const void *p, size_t bytes) {
    if (!t->file) return;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), b = ((uintptr_t)p + bytes) & ~(page - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

int upload(CudaBackend *c, void *dst, const void *src, size_t bytes, const char *name, QErr *err) {
    cudaError_t rc = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->st);
    if (rc == cudaSuccess) rc = cudaStreamSynchronize(c->st);
    if (rc != cudaSuccess) return set_err(err, "%s: uploading %zu bytes: %s", name, bytes, cudaGetErrorString(rc));
    return 0;
}

/* Dense rows of t ([n][k], any float dtype) as bf16 rows of k_pad (zero padded) at dst. */
int upload_dense(CudaBackend *c, uint16_t *dst, const StTensor *t, int64_t n, int64_t k, int64_t k_pad,
                 const char *name, QErr *err) {
    if (t->dtype == DT_BF16 && k == k_pad) {
        if (upload(c, dst, t->data, (size_t)(n * k) * 2, name, err)) return -1;
        release_pages(t, t->data, (size_t)(n * k) * 2);
        return 0;
    }
    int64_t rows = (int64_t)(kConvertElems / (size_t)k_pad);
    if (rows < 1) rows = 1;
    if (rows > n) rows = n;
    uint16_t *buf = static_cast<uint16_t *>(malloc((size_t)(rows * k_pad) * 2));
    if (!buf) return set_err(err, "%s: out of host memory converting weights", name);
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
        int64_t nr = n - r0 < rows ? n - r0 : rows;
        for (int64_t r = 0; r < nr; r++)
            for (int64_t j = 0; j < k_pad; j++)
                buf[r * k_pad + j] = j < k ? f32_to_bf16_rne(elem_f32(t, (size_t)((r0 + r) * k + j))) : 0;
        if (upload(c, dst + r0 * k_pad, buf, (size_t)(nr * k_pad) * 2, name, err)) {
            free(buf);
            return -1;
        }
    }
    free(buf);
    return 0;
}

/* Scale (low half) and zero (high half) of each group, as one word; rows cu_sz_ld words apart
 * (the padding zero). */
int upload_sz(CudaBackend *c, uint32_t *dst, const LinearSource *s, QErr *err) {
    const size_t groups = (size_t)(s->k / s->group_size), ld = (size_t)cu_sz_ld((int)s->k, s->group_size);
    const size_t n = (size_t)s->n * ld;
    uint32_t *buf = static_cast<uint32_t *>(calloc(n, sizeof *buf));
    if (!buf) return set_err(err, "%s: out of host memory packing scales", s->name);
    const uint16_t *sc = static_cast<const uint16_t *>(s->scales->data), *ze = static_cast<const uint16_t *>(s->zeros->data);
    for (size_t r = 0; r < (size_t)s->n; r++)
        for (size_t i = 0; i < groups; i++)
            buf[r * ld + i] = (uint32_t)sc[r * groups + i] | (uint32_t)ze[r * groups + i] << 16;
    int rc = upload(c, dst, buf, n * sizeof *buf, s->name, err);
    free(buf);
    return rc;
}

} // namespace

struct Linear {
    int n_mats;
    int64_t n, k;
    CuMat mat[kMaxParts];
    void *w[kMaxParts], *sz[kMaxParts]; /* device buffers owned */
};

struct Embedding {
    const StTensor *table;
    int64_t vocab, dim;
    __nv_bfloat16 *dev; /* the resident copy, the device's view of the pinned host copy, or NULL */
    void *pinned;       /* the pinned host copy, or NULL */
};

namespace {

void cu_linear_free(Backend *be, Linear *l) {
    CudaBackend *c = cb(be);
    use_device(c);
    drop_graphs(c);
    for (int i = 0; i < l->n_mats; i++) {
        dev_free(c, l->w[i]);
        dev_free(c, l->sz[i]);
    }
    free(l);
}

int check_source(const LinearSource *s, int64_t k, QErr *err) {
    if (s->k != k) return set_err(err, "%s: in_features %lld differs from the other stacked parts' %lld", s->name,
                                  (long long)s->k, (long long)k);
    if (s->n < 1 || s->n > INT_MAX / 2 || s->k < 1 || s->k > INT_MAX / 2)
        return set_err(err, "%s: shape [%lld, %lld] is out of range for the CUDA kernels", s->name, (long long)s->n,
                       (long long)s->k);
    if (s->q4) {
        int g = s->group_size;
        if (g != 32 && g != 64 && g != 128 && g != 256)
            return set_err(err, "%s: int4 group_size %d is not 32, 64, 128 or 256", s->name, g);
        if (s->k % g) return set_err(err, "%s: in_features %lld is not a multiple of group_size %d", s->name, (long long)s->k, g);
        if (s->qweight->dtype != DT_U8 || s->scales->dtype != DT_BF16 || s->zeros->dtype != DT_BF16)
            return set_err(err, "%s: int4 tensors must be U8 qweight with BF16 scales and zeros", s->name);
        if (s->qweight->nbytes != (size_t)(s->n * s->k / 2) || s->scales->nbytes != (size_t)(s->n * (s->k / g)) * 2 ||
            s->zeros->nbytes != (size_t)(s->n * (s->k / g)) * 2)
            return set_err(err, "%s: int4 tensor sizes do not match [%lld, %lld] with group %d", s->name, (long long)s->n,
                           (long long)s->k, g);
    } else {
        DType dt = s->dense->dtype;
        if (dt != DT_BF16 && dt != DT_F16 && dt != DT_F32)
            return set_err(err, "%s: dense weights must be BF16, F16 or F32", s->name);
        if (s->dense->nbytes != (size_t)(s->n * s->k) * (dt == DT_F32 ? 4u : 2u))
            return set_err(err, "%s: weight size does not match [%lld, %lld]", s->name, (long long)s->n, (long long)s->k);
    }
    return 0;
}

Linear *cu_linear_load(Backend *be, const LinearSource *parts, int n_parts, QErr *err) {
    CudaBackend *c = cb(be);
    use_device(c);
    if (n_parts < 1 || n_parts > kMaxParts) {
        set_err(err, "%s: %d stacked parts (1 to %d supported)", n_parts > 0 ? parts[0].name : "linear", n_parts, kMaxParts);
        return NULL;
    }
    const int64_t k = parts[0].k;
    bool merge = true;
    int64_t n_total = 0;
    for (int i = 0; i < n_parts; i++) {
        if (check_source(&parts[i], k, err)) return NULL;
        if (parts[i].q4 != parts[0].q4 || (parts[i].q4 && parts[i].group_size != parts[0].group_size)) merge = false;
        n_total += parts[i].n;
    }
    if (n_total > INT_MAX / 2) {
        set_err(err, "%s: %lld stacked output features are too many", parts[0].name, (long long)n_total);
        return NULL;
    }
    Linear *l = static_cast<Linear *>(calloc(1, sizeof *l));
    if (!l) {
        set_err(err, "out of memory");
        return NULL;
    }
    l->n = n_total;
    l->k = k;
    l->n_mats = merge ? 1 : n_parts;
    const int64_t k_pad = (k + 7) / 8 * 8;
    int64_t n0 = 0;
    for (int mi = 0; mi < l->n_mats; mi++) {
        const int first = merge ? 0 : mi, last = merge ? n_parts : mi + 1;
        int64_t rows = 0;
        for (int i = first; i < last; i++) rows += parts[i].n;
        const LinearSource *p0 = &parts[first];
        CuMat *m = &l->mat[mi];
        m->n0 = (int)n0;
        m->n = (int)rows;
        m->k = (int)k;
        m->k_pad = (int)k_pad;
        m->group = p0->q4 ? p0->group_size : 0;
        size_t wbytes = p0->q4 ? (size_t)(rows * k / 2) : (size_t)(rows * k_pad) * 2;
        size_t szbytes = p0->q4 ? (size_t)rows * (size_t)cu_sz_ld((int)k, p0->group_size) * 4 : 0;
        l->w[mi] = dev_alloc(c, wbytes);
        l->sz[mi] = szbytes ? dev_alloc(c, szbytes) : NULL;
        if (!l->w[mi] || (szbytes && !l->sz[mi])) {
            set_err(err, "%s: out of GPU memory for %zu bytes of weights", p0->name, wbytes + szbytes);
            cu_linear_free(be, l);
            return NULL;
        }
        m->w = l->w[mi];
        m->sz = static_cast<const uint32_t *>(l->sz[mi]);
        int64_t r = 0;
        for (int i = first; i < last; i++) {
            const LinearSource *s = &parts[i];
            int rc;
            if (s->q4) {
                rc = upload(c, static_cast<uint8_t *>(l->w[mi]) + (size_t)(r * k / 2), s->qweight->data,
                            (size_t)(s->n * k / 2), s->name, err);
                if (!rc) release_pages(s->qweight, s->qweight->data, (size_t)(s->n * k / 2));
                const size_t sz_row = (size_t)r * (size_t)cu_sz_ld((int)k, s->group_size);
                if (!rc) rc = upload_sz(c, static_cast<uint32_t *>(l->sz[mi]) + sz_row, s, err);
            } else {
                rc = upload_dense(c, static_cast<uint16_t *>(l->w[mi]) + (size_t)(r * k_pad), s->dense, s->n, k, k_pad,
                                  s->name, err);
            }
            if (rc) {
                cu_linear_free(be, l);
                return NULL;
            }
            r += s->n;
        }
        if (m->group) {
            /* the codes into the order the kernels read (cuda_common.cuh, fragment order) */
            cudaError_t rc = cu_q4_to_fragment_order(c->st, l->w[mi], (int)rows, (int)k);
            if (rc == cudaSuccess) rc = cudaStreamSynchronize(c->st);
            if (rc != cudaSuccess) {
                set_err(err, "%s: reordering int4 codes: %s", p0->name, cudaGetErrorString(rc));
                cu_linear_free(be, l);
                return NULL;
            }
            cu_gemm_q4_describe(m);
        }
        n0 += rows;
    }
    return l;
}

float *cu_vector_load(Backend *be, const StTensor *t, QErr *err) {
    CudaBackend *c = cb(be);
    use_device(c);
    if (t->ndim != 1 || (t->dtype != DT_BF16 && t->dtype != DT_F16 && t->dtype != DT_F32)) {
        set_err(err, "%s: expected a 1-D float tensor", t->name);
        return NULL;
    }
    size_t n = (size_t)t->shape[0];
    float *tmp = static_cast<float *>(malloc(n * sizeof(float)));
    float *v = static_cast<float *>(dev_alloc(c, n * sizeof(float)));
    if (!tmp || !v) {
        free(tmp);
        dev_free(c, v);
        set_err(err, "out of memory loading %s", t->name);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) tmp[i] = elem_f32(t, i);
    int rc = upload(c, v, tmp, n * sizeof(float), t->name, err);
    free(tmp);
    if (rc) {
        dev_free(c, v);
        return NULL;
    }
    return v;
}

/* A page-locked copy of host table t that kernels read over the bus (*host: the copy, for
 * cudaFreeHost), or NULL where page-locked memory is not to be had. (Registering the table where
 * it lies instead, cudaHostRegister on the checkpoint's mmap, made test_qwen3_ref hang on the
 * H200, though it worked on malloc'd tables; not pursued.) */
__nv_bfloat16 *pinned_copy(const StTensor *t, void **host) {
    void *p = NULL, *dev = NULL;
    if (cudaHostAlloc(&p, t->nbytes, cudaHostAllocMapped) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    if (cudaHostGetDevicePointer(&dev, p, 0) != cudaSuccess) {
        cudaFreeHost(p);
        cudaGetLastError();
        return NULL;
    }
    memcpy(p, t->data, t->nbytes);
    *host = p;
    return static_cast<__nv_bfloat16 *>(dev);
}

Embedding *cu_embedding_load(Backend *be, const StTensor *table, bool resident, QErr *err) {
    CudaBackend *c = cb(be);
    if (table->ndim != 2 || (table->dtype != DT_BF16 && table->dtype != DT_F16 && table->dtype != DT_F32)) {
        set_err(err, "%s: expected a 2-D float tensor", table->name);
        return NULL;
    }
    Embedding *e = static_cast<Embedding *>(malloc(sizeof *e));
    if (!e) {
        set_err(err, "out of memory");
        return NULL;
    }
    e->table = table;
    e->vocab = table->shape[0];
    e->dim = table->shape[1];
    e->dev = NULL;
    e->pinned = NULL;
    if (table->dtype != DT_BF16) return e; /* gathered on the host */
    use_device(c);
    if (resident) {
        e->dev = static_cast<__nv_bfloat16 *>(dev_alloc(c, table->nbytes));
        const cudaError_t rc = e->dev ? cudaMemcpy(e->dev, table->data, table->nbytes, cudaMemcpyHostToDevice) : cudaSuccess;
        if (rc != cudaSuccess) {
            set_err(err, "%s: copying the embedding table to the GPU: %s", table->name, cudaGetErrorString(rc));
            dev_free(c, e->dev);
            free(e);
            return NULL;
        }
    }
    /* not resident, or no room on the GPU: the pinned copy (or, without one, the host gather) */
    if (!e->dev) e->dev = pinned_copy(table, &e->pinned);
    return e;
}

void cu_embedding_free(Backend *be, Embedding *e) {
    if (!e) return;
    if (e->dev) {
        CudaBackend *c = cb(be);
        use_device(c);
        drop_graphs(c);
        if (e->pinned)
            cudaFreeHost(e->pinned);
        else
            dev_free(c, e->dev);
    }
    free(e);
}

/* ---- KV cache ----------------------------------------------------------------------------- */

struct CudaKV {
    KVShape s;
    size_t layer_bytes; /* of K (or V) per layer */
    char *k, *v;        /* bf16 values (KV_AUTO) or e4m3 codes (KV_FP8) */
    CuAttnScratch scr;
};

void *cu_kv_alloc(Backend *be, const KVShape *s, QErr *err) {
    CudaBackend *c = cb(be);
    use_device(c);
    if (!cu_attention_supports(s->head_dim)) {
        set_err(err, "head_dim %d: the CUDA attention kernels support 64, 128 and 256", s->head_dim);
        return NULL;
    }
    if (s->block_size < 1 || (s->block_size & (s->block_size - 1))) {
        set_err(err, "KV block size %d: the CUDA backend needs a power of two", s->block_size);
        return NULL;
    }
    CudaKV *kv = static_cast<CudaKV *>(calloc(1, sizeof *kv));
    if (!kv) {
        set_err(err, "out of memory");
        return NULL;
    }
    kv->s = *s;
    kv->layer_bytes =
        (size_t)s->n_blocks * s->block_size * s->n_kv_heads * s->head_dim * kv_dtype_bytes(be->ops, s->dtype);
    size_t bytes = kv->layer_bytes * s->n_layers;
    /* split-KV partials: fewer than 4 x SMs (sequence, kv head, split) units, up to 16 query heads
     * per kv head (more only lowers the split count); one counter per (sequence, kv head). */
    kv->scr.part_floats = (size_t)4 * c->sms * 16 * cu_part_stride(s->head_dim);
    kv->scr.n_counters = 2 * c->sms;
    kv->k = static_cast<char *>(dev_alloc(c, bytes));
    kv->v = static_cast<char *>(dev_alloc(c, bytes));
    kv->scr.part = static_cast<float *>(dev_alloc(c, kv->scr.part_floats * sizeof(float)));
    kv->scr.counters = static_cast<int *>(dev_alloc(c, (size_t)kv->scr.n_counters * sizeof(int)));
    if (!kv->k || !kv->v || !kv->scr.part || !kv->scr.counters ||
        cudaMemset(kv->scr.counters, 0, (size_t)kv->scr.n_counters * sizeof(int)) != cudaSuccess) {
        dev_free(c, kv->k);
        dev_free(c, kv->v);
        dev_free(c, kv->scr.part);
        dev_free(c, kv->scr.counters);
        free(kv);
        set_err(err, "out of GPU memory for the KV cache (%zu MiB)", 2 * bytes >> 20);
        return NULL;
    }
    return kv;
}

void cu_kv_free(Backend *be, void *p) {
    CudaBackend *c = cb(be);
    CudaKV *kv = static_cast<CudaKV *>(p);
    use_device(c);
    drop_graphs(c);
    dev_free(c, kv->k);
    dev_free(c, kv->v);
    dev_free(c, kv->scr.part);
    dev_free(c, kv->scr.counters);
    free(kv);
}

/* ---- compute ------------------------------------------------------------------------------ */

void cu_embed(Backend *be, float *x, const int32_t *ids, int M, const Embedding *e) {
    CudaBackend *c = cb(be);
    if (M <= 0) return;
    use_device(c);
    /* a resident table stages only the ids */
    const size_t D = (size_t)e->dim, n = e->dev ? (size_t)M : (size_t)M * D;
    /* the staging buffer may still feed the previous upload */
    if (!note(c, cudaEventSynchronize(c->embed_done), "embed")) return;
    if (n > c->h_embed_n) {
        if (c->h_embed_pinned)
            cudaFreeHost(c->h_embed);
        else
            free(c->h_embed);
        c->h_embed = NULL;
        c->h_embed_n = 0;
        void *p = NULL;
        c->h_embed_pinned = cudaHostAlloc(&p, n * sizeof(float), cudaHostAllocDefault) == cudaSuccess;
        if (!c->h_embed_pinned) {
            cudaGetLastError();
            p = malloc(n * sizeof(float));
        }
        if (!p) {
            note(c, cudaErrorMemoryAllocation, "embed");
            return;
        }
        c->h_embed = static_cast<float *>(p);
        c->h_embed_n = n;
    }
    if (e->dev) {
        if (!grow(c, reinterpret_cast<void **>(&c->d_embed_ids), &c->d_embed_ids_n, n, sizeof(int32_t))) {
            note(c, cudaErrorMemoryAllocation, "embed");
            return;
        }
        memcpy(c->h_embed, ids, n * sizeof(int32_t));
        note(c, cudaMemcpyAsync(c->d_embed_ids, c->h_embed, n * sizeof(int32_t), cudaMemcpyHostToDevice, c->st),
             "embed");
        note(c, cudaEventRecord(c->embed_done, c->st), "embed");
        note(c, cu_embed_rows(c->st, x, e->dev, c->d_embed_ids, M, (int)D), "embed");
        return;
    }
    const StTensor *t = e->table;
    for (int m = 0; m < M; m++) {
        float *row = c->h_embed + (size_t)m * D;
        size_t off = (size_t)ids[m] * D;
        if (t->dtype == DT_BF16)
            bf16_to_f32_row(row, static_cast<const uint16_t *>(t->data) + off, D);
        else if (t->dtype == DT_F16)
            for (size_t i = 0; i < D; i++) row[i] = __half2float(static_cast<const __half *>(t->data)[off + i]);
        else
            memcpy(row, static_cast<const float *>(t->data) + off, D * sizeof(float));
    }
    note(c, cudaMemcpyAsync(x, c->h_embed, n * sizeof(float), cudaMemcpyHostToDevice, c->st), "embed");
    note(c, cudaEventRecord(c->embed_done, c->st), "embed");
}

/* y[:, off .. off + n) (+)= x [M][k] * A^T with x and A bf16, A [n][lda]; y row stride ldy. */
void gemm(CudaBackend *c, const __nv_bfloat16 *x, const __nv_bfloat16 *a, int n, int lda, int k, int M, float *y, int ldy,
          bool accumulate) {
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    note_blas(c,
              cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, M, k, &one, a, CUDA_R_16BF, lda, x, CUDA_R_16BF, k,
                           &beta, y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              "matmul (cuBLAS)");
}

/* What a matmul multiplies: x, RMSNorm(x) (weight norm_w, eps), SwiGLU(x) (x holds rows
 * [gate | up] of 2 k values; silu(gate) * up), or bf16 rows already made (xb; for the
 * tensor-core paths only). */
enum class InOp { Plain, Norm, SwiGLU, Bf16 };
struct MatIn {
    const float *x;
    InOp op;
    const float *norm_w; /* Norm */
    float eps;
    const __nv_bfloat16 *xb; /* Bf16 */
};

/* Which kernel multiplies one matrix at M rows. */
enum class MatPath { Gemv, GemmQ4, DequantBlas, Blas };

MatPath mat_path(const CudaBackend *c, const CuMat *m, int M) {
    if (!m->group) return M <= kBf16GemvMaxM ? MatPath::Gemv : MatPath::Blas;
    if (cu_gemv_takes(m, M)) return MatPath::Gemv; /* the decode int4 kernel (M <= 3) */
    return cu_gemm_q4_wgmma(m, c->wgmma) || M <= kGemmQ4MaxM ? MatPath::GemmQ4 : MatPath::DequantBlas;
}

/* Whether some part of l is multiplied by a GEMV at M rows (which reads x as float; every other
 * path reads bf16). */
bool any_gemv(const CudaBackend *c, const Linear *l, int M) {
    for (int i = 0; i < l->n_mats; i++)
        if (mat_path(c, &l->mat[i], M) == MatPath::Gemv) return true;
    return false;
}

/* Grows the matmul scratch *buf to count elements; false (the error noted) when out of memory. */
template <class T>
bool matmul_scratch(CudaBackend *c, T **buf, size_t *cap, size_t count) {
    if (grow(c, reinterpret_cast<void **>(buf), cap, count, sizeof(T))) return true;
    note(c, cudaErrorMemoryAllocation, "matmul scratch");
    return false;
}

/* Writes in's x' (RMSNorm or SwiGLU of in->x, M rows of K) to out, float or bf16. */
template <class T>
cudaError_t make_input(cudaStream_t st, const MatIn *in, T *out, int M, int K) {
    if (in->op == InOp::Norm) return cu_rmsnorm(st, out, in->x, in->norm_w, M, K, in->eps);
    return cu_swiglu(st, out, in->x, M, K);
}

/* y (+)= x' W^T with x' from `in` (x, RMSNorm(x) or SwiGLU(x)). The decode GEMVs (int4 up to 3
 * tokens, bf16 at M = 1) apply an RMSNorm themselves where cu_gemv_fuses_norm says it pays, and
 * accumulate in their store. Elsewhere x' is written first: as float to c->xn where a GEMV reads
 * it (then converted to bf16 if another part needs that), else straight as bf16 to c->xb, what
 * the tensor-core kernels and cuBLAS read (saving a conversion launch; cuBLAS accumulates with
 * beta = 1). */
void matmul(CudaBackend *c, float *y, MatIn in, int M, const Linear *l, bool accumulate) {
    if (M <= 0) return;
    use_device(c);
    const int ldy = (int)l->n, K = (int)l->k;
    MatPath path[kMaxParts];
    bool fused_input = in.op == InOp::Norm, need_float = false, need_bf16 = false;
    for (int i = 0; i < l->n_mats; i++) {
        path[i] = mat_path(c, &l->mat[i], M);
        fused_input = fused_input && path[i] == MatPath::Gemv && cu_gemv_fuses_norm(&l->mat[i], c->sms);
        need_float = need_float || path[i] == MatPath::Gemv;
        need_bf16 = need_bf16 || path[i] != MatPath::Gemv;
    }
    bool have_bf16 = false;
    const __nv_bfloat16 *xbf = c->xb; /* what the tensor-core paths read */
    if (in.op == InOp::Bf16) {
        if (need_float) {
            note(c, cudaErrorInvalidValue, "matmul: bf16 input for a GEMV");
            return;
        }
        xbf = in.xb;
        have_bf16 = true;
    } else if (in.op != InOp::Plain && !fused_input) {
        if (need_float) {
            if (!matmul_scratch(c, &c->xn, &c->xn_n, (size_t)M * K)) return;
            if (!note(c, make_input(c->st, &in, c->xn, M, K), "matmul input")) return;
            in = MatIn{c->xn, InOp::Plain, nullptr, 0.0f, nullptr};
        } else {
            if (!matmul_scratch(c, &c->xb, &c->xb_n, (size_t)M * K)) return;
            if (!note(c, make_input(c->st, &in, c->xb, M, K), "matmul input")) return;
            xbf = c->xb;
            have_bf16 = true;
        }
    }
    if (need_bf16 && !have_bf16) {
        if (!matmul_scratch(c, &c->xb, &c->xb_n, (size_t)M * K)) return;
        if (!note(c, cu_to_bf16(c->st, in.x, c->xb, (size_t)M * K), "matmul")) return;
        xbf = c->xb;
    }
    for (int i = 0; i < l->n_mats; i++) {
        const CuMat *m = &l->mat[i];
        switch (path[i]) {
        case MatPath::Gemv:
            note(c,
                 cu_gemv(c->st, m, in.x, K, M, y, ldy, c->sms, fused_input ? in.norm_w : nullptr, in.eps, accumulate),
                 "matmul");
            break;
        case MatPath::GemmQ4:
            note(c, cu_gemm_q4(c->st, m, xbf, M, y, ldy, c->sms, accumulate, c->wgmma), "matmul (int4 GEMM)");
            break;
        case MatPath::Blas:
            gemm(c, xbf, static_cast<const __nv_bfloat16 *>(m->w), m->n, m->k_pad, K, M, y + m->n0, ldy, accumulate);
            break;
        case MatPath::DequantBlas: {
            size_t rows = kDequantElems / (size_t)K;
            if (rows < 1) rows = 1;
            if (rows > (size_t)m->n) rows = (size_t)m->n;
            if (!matmul_scratch(c, &c->dq, &c->dq_n, rows * K)) return;
            for (int r0 = 0; r0 < m->n; r0 += (int)rows) {
                int nr = m->n - r0 < (int)rows ? m->n - r0 : (int)rows;
                if (!note(c, cu_dequant_q4(c->st, m, r0, nr, c->dq), "matmul dequant")) return;
                gemm(c, xbf, c->dq, nr, K, K, M, y + m->n0 + r0, ldy, accumulate);
            }
            break;
        }
        }
    }
}

void cu_matmul(Backend *be, float *y, const float *x, int M, const Linear *l) {
    matmul(cb(be), y, MatIn{x, InOp::Plain, nullptr, 0.0f, nullptr}, M, l, false);
}

void cu_matmul_add(Backend *be, float *y, const float *x, int M, const Linear *l) {
    matmul(cb(be), y, MatIn{x, InOp::Plain, nullptr, 0.0f, nullptr}, M, l, true);
}

void cu_norm_matmul(Backend *be, float *y, const float *x, const float *norm_w, float eps, int M, const Linear *l) {
    matmul(cb(be), y, MatIn{x, InOp::Norm, norm_w, eps, nullptr}, M, l, false);
}

void cu_swiglu_matmul_add(Backend *be, float *y, const float *gate_up, int M, int I, const Linear *l) {
    if (I != l->k) {
        note(cb(be), cudaErrorInvalidValue, "swiglu_matmul_add: I is not the matrix's in_features");
        return;
    }
    matmul(cb(be), y, MatIn{gate_up, InOp::SwiGLU, nullptr, 0.0f, nullptr}, M, l, true);
}

/* The fused MLP. On the GEMVs (int4 up to 3 tokens, bf16 at 1): the gate|up GEMV normalizes x
 * itself and stores SwiGLU's float h (into the caller's scratch) for the down GEMV. (A bf16
 * GEMV re-applies the norm weight for every row group a warp walks, which the H100 measured
 * slower than the separate norm only at lm_head's 24 groups per warp; a gate|up's warps walk a
 * few pairs: Qwen3-8B 2.) From 4 tokens on the int4 GEMM (any M on Hopper, up to 256 elsewhere):
 * RMSNorm(x) as bf16, the gate|up GEMM stores SwiGLU's bf16 h in its epilogue, down reads it as
 * it is. Elsewhere (cuBLAS, stacked parts, shapes the kernels do not pair) the ops one by one. */
void cu_mlp_add(Backend *be, float *x, const float *norm_w, float eps, int M, const Linear *gu, const Linear *down,
                float *scratch) {
    CudaBackend *c = cb(be);
    if (M <= 0) return;
    const int I = (int)(gu->n / 2), K = (int)gu->k;
    if (gu->n % 2 || down->k != I) {
        note(c, cudaErrorInvalidValue, "mlp_add: gate|up is not [2I][H] for down's I");
        return;
    }
    /* gate|up in stacked parts (mixed dtypes) is never fused: taken as cuBLAS here */
    const MatPath gp = gu->n_mats == 1 ? mat_path(c, &gu->mat[0], M) : MatPath::Blas;
    const bool down_gemv = any_gemv(c, down, M); /* a part of down needs a float input */
    use_device(c);
    if (gp == MatPath::Gemv && I % 2 == 0) {
        if (!note(c, cu_gemv_swiglu(c->st, &gu->mat[0], x, K, M, scratch, I, c->sms, norm_w, eps), "mlp gate_up (GEMV)"))
            return;
        matmul(c, x, MatIn{scratch, InOp::Plain, nullptr, 0.0f, nullptr}, M, down, true);
        return;
    }
    if (gp == MatPath::GemmQ4 && I % 8 == 0 && !down_gemv) {
        if (!matmul_scratch(c, &c->xb, &c->xb_n, (size_t)M * K)) return;
        if (!note(c, cu_rmsnorm(c->st, c->xb, x, norm_w, M, K, eps), "mlp norm")) return;
        __nv_bfloat16 *h = reinterpret_cast<__nv_bfloat16 *>(scratch); /* [M][I] of the [M][2I] floats */
        if (!note(c, cu_gemm_q4_swiglu(c->st, &gu->mat[0], c->xb, M, h, c->sms, c->wgmma), "mlp gate_up (int4 GEMM)"))
            return;
        matmul(c, x, MatIn{nullptr, InOp::Bf16, nullptr, 0.0f, h}, M, down, true);
        return;
    }
    cu_norm_matmul(be, scratch, x, norm_w, eps, M, gu);
    cu_swiglu_matmul_add(be, x, scratch, M, I, down);
}

void cu_gather_op(Backend *be, float *dst, const float *src, const int32_t *rows, int n, int width) {
    CudaBackend *c = cb(be);
    note(c, cu_gather_rows(c->st, dst, src, rows, n, width), "gather_rows");
}

void cu_rope_op(Backend *be, float *cs, const int32_t *pos, int M, const float *inv_freq, int half) {
    CudaBackend *c = cb(be);
    note(c, cu_rope_cos_sin(c->st, cs, pos, M, inv_freq, half), "rope_cos_sin");
}

/* The attention launches of one layer, storing out as it says. */
void attend(CudaBackend *c, CuAttnOut out, float *qkv, const AttnHeads *heads, const float *cs, void *kvp, int layer,
            const AttnMeta *meta) {
    CudaKV *kv = static_cast<CudaKV *>(kvp);
    const CuAttnHeads ah = {qkv, heads->q_norm, heads->k_norm, cs, heads->eps, heads->nh, heads->nkv, heads->hd};
    const CuKvPools pools = {kv->k + kv->layer_bytes * layer, kv->v + kv->layer_bytes * layer, kv->s.dtype};
    note(c, cu_attention(c->st, out, &ah, pools, kv->s.block_size, meta, &kv->scr, c->sms), "attention");
}

void cu_attention_op(Backend *be, float *out, float *qkv, const AttnHeads *heads, const float *cs, void *kvp,
                     int layer, const AttnMeta *meta) {
    attend(cb(be), CuAttnOut{out, nullptr}, qkv, heads, cs, kvp, layer, meta);
}

/* x += attention(...) o^T. Where no part of o is a GEMV at the step's M (all tensor-core or
 * cuBLAS paths, which read bf16), the attention kernels store bf16 straight into c->xb: the
 * float-to-bf16 launch that matmul would put between them is gone (the same rounding, so the same
 * result). The GEMVs read float: there, attention into scratch and a plain matmul_add. */
void cu_attn_add(Backend *be, float *x, float *qkv, const AttnHeads *heads, const float *cs, void *kvp, int layer,
                 const AttnMeta *meta, const Linear *o, float *scratch) {
    CudaBackend *c = cb(be);
    const int M = meta->n_tokens, K = heads->nh * heads->hd;
    if (M <= 0) return;
    if (o->k != K) {
        note(c, cudaErrorInvalidValue, "attn_add: o's in_features is not nh * head_dim");
        return;
    }
    use_device(c);
    if (any_gemv(c, o, M)) {
        attend(c, CuAttnOut{scratch, nullptr}, qkv, heads, cs, kvp, layer, meta);
        matmul(c, x, MatIn{scratch, InOp::Plain, nullptr, 0.0f, nullptr}, M, o, true);
        return;
    }
    if (!matmul_scratch(c, &c->xb, &c->xb_n, (size_t)M * K)) return;
    attend(c, CuAttnOut{nullptr, c->xb}, qkv, heads, cs, kvp, layer, meta);
    matmul(c, x, MatIn{nullptr, InOp::Bf16, nullptr, 0.0f, c->xb}, M, o, true);
}

/* ---- graphs ------------------------------------------------------------------------------- */

bool cu_graph_replay(Backend *be, uint64_t key) {
    CudaBackend *c = cb(be);
    for (int i = 0; i < c->n_graphs; i++) {
        if (c->graphs[i].key != key) continue;
        use_device(c);
        note(c, cudaGraphLaunch(c->graphs[i].exec, c->st), "graph_replay");
        return true;
    }
    return false;
}

void cu_graph_begin(Backend *be, uint64_t key) {
    CudaBackend *c = cb(be);
    (void)key;
    use_device(c);
    c->capturing = note(c, cudaStreamBeginCapture(c->st, cudaStreamCaptureModeRelaxed), "graph_begin");
    if (c->capturing) cu_pdl_now = cu_pdl && cu_pdl_graphs;
}

void cu_graph_end(Backend *be, uint64_t key) {
    CudaBackend *c = cb(be);
    if (!c->capturing) return;
    c->capturing = false;
    cu_pdl_now = cu_pdl;
    cudaGraph_t g = NULL;
    if (!note(c, cudaStreamEndCapture(c->st, &g), "graph_end")) return;
    cudaGraphExec_t exec = NULL;
    cudaError_t rc = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    if (!note(c, rc, "graph_end (instantiate)")) return;
    if (c->n_graphs == c->cap_graphs) {
        int cap = c->cap_graphs ? 2 * c->cap_graphs : 16;
        GraphRec *r = static_cast<GraphRec *>(realloc(c->graphs, (size_t)cap * sizeof *r));
        if (!r) {
            note(c, cudaGraphLaunch(exec, c->st), "graph_end");
            note(c, cudaStreamSynchronize(c->st), "graph_end");
            cudaGraphExecDestroy(exec);
            return;
        }
        c->graphs = r;
        c->cap_graphs = cap;
    }
    c->graphs[c->n_graphs++] = GraphRec{key, exec};
    note(c, cudaGraphLaunch(exec, c->st), "graph_end");
}

/* ---- sampling ----------------------------------------------------------------------------- */

bool cu_sample_op(Backend *be, const float *logits, int rows, int vocab, const SamplingParams *params,
                  const float *uniform, int32_t *out_ids) {
    CudaBackend *c = cb(be);
    if (rows <= 0) return true;
    for (int r = 0; r < rows; r++)
        if (sampling_needs_host(&params[r])) return false;
    use_device(c);
    if (rows > c->sample_cap) {
        if (!note(c, cudaStreamSynchronize(c->st), "sample")) return false;
        cudaFreeHost(c->h_rows);
        cudaFreeHost(c->h_ids);
        dev_free(c, c->d_rows);
        dev_free(c, c->d_ids);
        dev_free(c, c->d_argmax);
        c->sample_cap = 0;
        void *hr = NULL, *hi = NULL;
        bool ok = cudaHostAlloc(&hr, (size_t)rows * sizeof(CuSampleRow), cudaHostAllocDefault) == cudaSuccess;
        c->h_rows = static_cast<CuSampleRow *>(hr);
        ok = ok && cudaHostAlloc(&hi, (size_t)rows * sizeof(int32_t), cudaHostAllocDefault) == cudaSuccess;
        c->h_ids = static_cast<int32_t *>(hi);
        c->d_rows = static_cast<CuSampleRow *>(dev_alloc(c, (size_t)rows * sizeof(CuSampleRow)));
        c->d_ids = static_cast<int32_t *>(dev_alloc(c, (size_t)rows * sizeof(int32_t)));
        c->d_argmax = static_cast<CuArgmax *>(dev_alloc(c, (size_t)rows * kArgmaxSplits * sizeof(CuArgmax)));
        if (!ok || !c->d_rows || !c->d_ids || !c->d_argmax) {
            cudaGetLastError();
            return false;
        }
        c->sample_cap = rows;
    }
    for (int r = 0; r < rows; r++) {
        const SamplingParams *p = &params[r];
        CuSampleRow *h = &c->h_rows[r];
        h->greedy = p->temperature == 0.0f || p->top_k == 1;
        h->temperature = h->greedy ? 1.0f : p->temperature;
        h->top_k = p->top_k > 0 ? p->top_k : 0;
        h->top_p = p->top_p;
        h->min_p = p->min_p;
        h->u = uniform[r];
    }
    if (!note(c, cudaMemcpyAsync(c->d_rows, c->h_rows, (size_t)rows * sizeof(CuSampleRow), cudaMemcpyHostToDevice, c->st),
              "sample") ||
        !note(c, cu_sample(c->st, logits, rows, vocab, c->d_rows, c->d_argmax, c->d_ids), "sample") ||
        !note(c, cudaMemcpyAsync(c->h_ids, c->d_ids, (size_t)rows * sizeof(int32_t), cudaMemcpyDeviceToHost, c->st),
              "sample") ||
        !note(c, cudaStreamSynchronize(c->st), "sample"))
        return false;
    memcpy(out_ids, c->h_ids, (size_t)rows * sizeof(int32_t));
    return true;
}

/* ---- bandwidth probe --------------------------------------------------------------------- */

/* Device-to-device copies of 512 MiB (several times the L2), bytes read + written per second;
 * the best of 8 after a warm-up. 0 when the buffers do not fit. */
double cu_probe_bandwidth(Backend *be) {
    CudaBackend *c = cb(be);
    use_device(c);
    const size_t bytes = (size_t)512 << 20;
    void *a = NULL, *b = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    double best = 0;
    if (cudaMalloc(&a, bytes) == cudaSuccess && cudaMalloc(&b, bytes) == cudaSuccess &&
        cudaEventCreate(&e0) == cudaSuccess && cudaEventCreate(&e1) == cudaSuccess &&
        cudaMemsetAsync(a, 0x5a, bytes, c->st) == cudaSuccess) {
        for (int rep = 0; rep < 9; rep++) {
            cudaEventRecord(e0, c->st);
            cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, c->st);
            cudaEventRecord(e1, c->st);
            float ms = 0;
            if (cudaEventSynchronize(e1) != cudaSuccess || cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess) break;
            double gbs = 2.0 * (double)bytes / (ms * 1e-3) / 1e9;
            if (rep > 0 && gbs > best) best = gbs;
        }
    }
    cudaGetLastError();
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return best;
}

/* ---- lifetime ----------------------------------------------------------------------------- */

void cu_destroy(Backend *be) {
    CudaBackend *c = cb(be);
    use_device(c);
    if (c->capturing) {
        cudaGraph_t g = NULL;
        if (cudaStreamEndCapture(c->st, &g) == cudaSuccess && g) cudaGraphDestroy(g);
    }
    cudaStreamSynchronize(c->st);
    drop_graphs(c);
    free(c->graphs);
    for (size_t i = 0; i < c->n_retired; i++) dev_free(c, c->retired[i]);
    free(c->retired);
    while (c->n_allocs) dev_free(c, c->allocs[c->n_allocs - 1].p);
    free(c->allocs);
    if (c->h_embed_pinned)
        cudaFreeHost(c->h_embed);
    else
        free(c->h_embed);
    cudaFreeHost(c->h_rows);
    cudaFreeHost(c->h_ids);
    if (c->embed_done) cudaEventDestroy(c->embed_done);
    if (c->blas) cublasDestroy(c->blas);
    if (c->blas_ws) cudaFree(c->blas_ws);
    if (c->st) cudaStreamDestroy(c->st);
    free(c);
}

const BackendOps CUDA_OPS = {
    .name = "cuda",
    .kv_value_bytes = sizeof(__nv_bfloat16),
    .destroy = cu_destroy,
    .alloc = cu_alloc,
    .free = cu_free,
    .to_device = cu_to_device,
    .to_host = cu_to_host,
    .sync = cu_sync,
    .mem_used = cu_mem_used,
    .linear_load = cu_linear_load,
    .linear_free = cu_linear_free,
    .vector_load = cu_vector_load,
    .embedding_load = cu_embedding_load,
    .embedding_free = cu_embedding_free,
    .kv_alloc = cu_kv_alloc,
    .kv_free = cu_kv_free,
    .embed = cu_embed,
    .matmul = cu_matmul,
    .matmul_add = cu_matmul_add,
    .norm_matmul = cu_norm_matmul,
    .gather_rows = cu_gather_op,
    .swiglu_matmul_add = cu_swiglu_matmul_add,
    .mlp_add = cu_mlp_add,
    .rope_cos_sin = cu_rope_op,
    .attention = cu_attention_op,
    .attn_add = cu_attn_add,
    .probe_bandwidth = cu_probe_bandwidth,
    .error = cuda_backend_error,
    .mem_free = cu_mem_free,
    .graph_replay = cu_graph_replay,
    .graph_begin = cu_graph_begin,
    .graph_end = cu_graph_end,
    .sample = cu_sample_op,
};

} // namespace

extern "C" bool cuda_backend_available(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return n > 0;
}

extern "C" const char *cuda_backend_error(Backend *be) {
    CudaBackend *c = cb(be);
    return c->failed ? c->err : NULL;
}

extern "C" Backend *cuda_backend_create(int device, QErr *err) {
    int n = 0;
    cudaError_t rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess) {
        set_err(err, "CUDA: no usable device (%s)", cudaGetErrorString(rc));
        return NULL;
    }
    if (device < 0 || device >= n) {
        set_err(err, "CUDA device %d does not exist (%d device%s)", device, n, n == 1 ? "" : "s");
        return NULL;
    }
    CudaBackend *c = static_cast<CudaBackend *>(calloc(1, sizeof *c));
    if (!c) {
        set_err(err, "out of memory");
        return NULL;
    }
    c->base.ops = &CUDA_OPS;
    c->device = device;
    const char *step = "cudaSetDevice";
    rc = cudaSetDevice(device);
    if (rc == cudaSuccess) step = "device attributes", rc = cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, device);
    if (rc == cudaSuccess) step = "stream", rc = cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking);
    if (rc == cudaSuccess) step = "event", rc = cudaEventCreateWithFlags(&c->embed_done, cudaEventDisableTiming);
    if (rc == cudaSuccess) step = "cuBLAS workspace", rc = cudaMalloc(&c->blas_ws, kBlasWorkspace);
    if (rc != cudaSuccess) {
        set_err(err, "CUDA device %d: %s: %s", device, step, cudaGetErrorString(rc));
        cu_destroy(&c->base);
        return NULL;
    }
    int major = 0;
    cudaFuncAttributes fa;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaFuncGetAttributes(&fa, arch_probe_kernel) == cudaSuccess)
        cu_pdl = major >= 9 && fa.ptxVersion >= 90;
    cudaGetLastError();
    /* QUILL_CUDA_PDL=0 switches programmatic dependent launch off, =eager keeps it out of graphs */
    const char *pdl_env = getenv("QUILL_CUDA_PDL");
    if (pdl_env && !strcmp(pdl_env, "0")) cu_pdl = false;
    cu_pdl_graphs = !(pdl_env && !strcmp(pdl_env, "eager"));
    cu_pdl_now = cu_pdl;
    /* QUILL_CUDA_WGMMA=0 keeps the int4 GEMM on mma.sync at every M (the tests cover it so) */
    const char *wgmma_env = getenv("QUILL_CUDA_WGMMA");
    c->wgmma = !(wgmma_env && !strcmp(wgmma_env, "0"));
    cublasStatus_t bs = cublasCreate(&c->blas);
    if (bs == CUBLAS_STATUS_SUCCESS) bs = cublasSetStream(c->blas, c->st);
    if (bs == CUBLAS_STATUS_SUCCESS) bs = cublasSetWorkspace(c->blas, c->blas_ws, kBlasWorkspace);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        set_err(err, "CUDA device %d: cuBLAS initialisation failed (status %d)", device, (int)bs);
        cu_destroy(&c->base);
        return NULL;
    }
    return &c->base;
}
