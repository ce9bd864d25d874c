/* ckpt_dir.h — writing a checkpoint directory so that it appears whole or not at all.
 *
 * Everything is written into a staging directory OUT_DIR.tmp-XXXXXX beside the target; commit
 * fsyncs it and renames it into place (an existing non-empty target, allowed only with force, is
 * swapped atomically and its old contents deleted afterwards). A failed or interrupted run leaves
 * no directory at OUT_DIR that looks like a valid checkpoint. */
#ifndef QUILL_CKPT_DIR_H
#define QUILL_CKPT_DIR_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>

#include "util/qerr.h"

typedef struct CkptStage {
    char out[PATH_MAX]; /* the target, without trailing slashes */
    char tmp[PATH_MAX]; /* the staging directory (exists between begin and commit/abort) */
    bool replace;       /* the target exists and is not empty */
} CkptStage;

/* Checks the target and creates the staging directory. The target may be missing or an empty
 * directory; a non-empty directory is refused unless force (anything else is refused always).
 * Returns 0, or -1 with err naming the target and the problem. */
int ckpt_stage_begin(CkptStage *st, const char *out_dir, bool force, QErr *err);

/* out = staging directory / name (n bytes). Returns 0, or -1 with err if it does not fit. */
int ckpt_stage_path(const CkptStage *st, const char *name, char *out, size_t n, QErr *err);

/* Copies SRC_DIR/name into the staging directory (fsync'd). A missing source file is skipped
 * (returns 0) when optional, an error otherwise. Returns 0, or -1 with err naming the file. */
int ckpt_stage_copy(const CkptStage *st, const char *src_dir, const char *name, bool optional,
                    QErr *err);

/* fsyncs every file in the staging directory, moves it into place and fsyncs the parent.
 * Returns 0, or -1 with err set (the staging directory is then still there: call abort). */
int ckpt_stage_commit(CkptStage *st, QErr *err);

/* Deletes the staging directory and what is in it. Safe after a failed begin or commit. */
void ckpt_stage_abort(CkptStage *st);

#endif
