/* safetensors.h — read and write Hugging Face safetensors files.
 *
 * Reading: files are mmap'd read-only and never copied; a tensor's `data` points into the map.
 * Every byte of the header is validated before it is trusted (JSON syntax, dtype names, shapes,
 * offsets inside the file, byte counts matching shape x dtype, no overlaps). A checkpoint
 * directory holds either `model.safetensors` or shards listed by `model.safetensors.index.json`.
 *
 * Writing: the whole file is laid out up front (header first, tensors in byte order of their
 * names, as the random-weights spec requires), space is reserved with posix_fallocate (so a full
 * disk fails cleanly instead of SIGBUS), the data region is mmap'd writable, and callers fill the
 * tensors — from many threads if they like — before st_writer_finish(). Producers that can make
 * any piece of a tensor on demand use the block interface instead, which bypasses the page cache
 * (st_writer_write_block). */
#ifndef QUILL_SAFETENSORS_H
#define QUILL_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "util/qerr.h"

typedef enum DType {
    DT_BF16,
    DT_F16,
    DT_F32,
    DT_U8,
    DT_I8,
    DT_I32,
    DT_I64,
    DT_COUNT
} DType;

#define ST_MAX_DIMS 4

typedef struct StTensor {
    const char *name;            /* owned by the StModel / StWriter */
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    void *data;                  /* into the map; read-only for StModel */
    size_t nbytes;
    const char *file;            /* path of the file it lives in (for error messages) */
} StTensor;

/* Bytes per element of a dtype; name as written in safetensors headers ("BF16", ...). */
size_t dtype_size(DType dt);
const char *dtype_name(DType dt);
/* Parses "BF16" etc.; returns -1 if unknown. */
int dtype_from_name(const char *name, DType *out);

/* A read-only view of one checkpoint: one file, or several shards from an index. */
typedef struct StModel StModel;

/* Opens DIR/model.safetensors, or the shards named in DIR/model.safetensors.index.json (every
 * tensor the index names must be in the shard it names; none may appear twice). Returns NULL and
 * fills err naming the file (and tensor) at fault on any problem. */
StModel *st_open_dir(const char *dir, QErr *err);
/* Opens a single .safetensors file. */
StModel *st_open_file(const char *path, QErr *err);
void st_close(StModel *m);

size_t st_count(const StModel *m);
const StTensor *st_at(const StModel *m, size_t i);          /* sorted by name */
/* NULL if absent; O(log n). The result is st_at(m, i) for its index i (so callers may index
 * per-tensor arrays by `t - st_at(m, 0)`). */
const StTensor *st_find(const StModel *m, const char *name);
/* The string value of `__metadata__[key]` in the (first) file, or NULL. */
const char *st_metadata(const StModel *m, const char *key);

/* Description of one tensor (to write, or to hold in memory). */
typedef struct StSpec {
    const char *name;
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
} StSpec;

/* A checkpoint made in memory (e.g. random weights for a benchmark, never written to disk): one
 * tensor per spec, with zeroed, writable data the caller fills through st_at()/st_find() before
 * use; names are copied and `name` stands for the file in messages. Returns NULL with err set
 * (out of memory, a duplicate name, a bad rank). Close with st_close. */
StModel *st_create_memory(const StSpec *specs, size_t n, const char *name, QErr *err);

typedef struct StWriter StWriter;

/* Creates PATH (which must not exist... it is truncated if it does) holding the given tensors,
 * laid out in byte order of their names, header keys sorted, `__metadata__` = metadata pairs
 * (n_meta key/value strings; may be 0). After this returns, st_writer_tensor() gives writable
 * memory for each tensor. Returns NULL with err set on failure (ENOSPC included). */
StWriter *st_writer_create(const char *path, const StSpec *specs, size_t n,
                           const char *const *meta_kv, size_t n_meta, QErr *err);
/* Writable tensor i (in the writer's sorted order); st_writer_count() tensors in all. */
size_t st_writer_count(const StWriter *w);
StTensor *st_writer_tensor(StWriter *w, size_t i);
StTensor *st_writer_find(StWriter *w, const char *name);
/* Block-wise writing, the fast path for producers that can make any byte range of any tensor
 * (a 16 GB file goes out at disk speed: whole blocks are written with O_DIRECT, bypassing the
 * page cache, where storing through the mapping runs at half the speed or less). The file is
 * cut into st_writer_block_count() blocks of ST_WRITER_BLOCK bytes (the header is in block 0, the
 * last is shorter). st_writer_write_block() composes block b in scratch by calling produce(ctx,
 * i, off, dst, n) for every piece of a tensor in it — bytes [off, off + n) of tensor i (in the
 * writer's order), where off and n are multiples of the element size — then writes it. Blocks
 * may be written in any order from many threads at once, each with its own scratch
 * (ST_WRITER_BLOCK bytes aligned to ST_WRITER_ALIGN). Do not also store through
 * st_writer_tensor()->data. Returns 0, or -1 with err naming the file on an I/O error. */
#define ST_WRITER_BLOCK ((size_t)8 << 20)
#define ST_WRITER_ALIGN 4096
typedef void (*StProduceFn)(void *ctx, size_t i, size_t off, void *dst, size_t n);
size_t st_writer_block_count(const StWriter *w);
int st_writer_write_block(StWriter *w, size_t b, StProduceFn produce, void *ctx, void *scratch,
                          QErr *err);
/* Flushes and closes. Returns 0, or -1 with err set (the file is then removed). Frees w either way. */
int st_writer_finish(StWriter *w, QErr *err);
/* Abandons the file (removes it) and frees w. */
void st_writer_abort(StWriter *w);

#endif
