/* ckpt_dir.c — staged, atomic creation of a checkpoint directory (see ckpt_dir.h).
 *
 * The trade-off: the new checkpoint needs room in the target's filesystem while the old one (with
 * force) still exists, and the staging name is visible during the run. In exchange a crash, a
 * full disk or a bad tensor found half-way never leaves a half-written directory under the name
 * a user would load. Checkpoints are flat directories, so fsync'ing the staging directory's
 * entries is enough; the old contents of a replaced target are deleted with nftw(FTW_PHYS), which
 * never follows symlinks out of the directory. */
#include "io/ckpt_dir.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int join(char *out, size_t n, const char *dir, const char *name) {
    return (size_t)snprintf(out, n, "%s/%s", dir, name) >= n ? -1 : 0;
}

static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int remove_tree(const char *path) { return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

int ckpt_stage_begin(CkptStage *st, const char *out_dir, bool force, QErr *err) {
    memset(st, 0, sizeof *st);
    size_t len = strlen(out_dir);
    while (len > 1 && out_dir[len - 1] == '/') len--;
    if (len == 0) return qerr_set(err, "output directory name is empty");
    if (len + 16 >= sizeof st->out) return qerr_set(err, "output directory name is too long");
    memcpy(st->out, out_dir, len);
    st->out[len] = '\0';

    struct stat sb;
    if (stat(st->out, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode)) return qerr_set(err, "%s exists and is not a directory", st->out);
        DIR *d = opendir(st->out);
        if (!d) return qerr_set(err, "%s: cannot read: %s", st->out, strerror(errno));
        for (struct dirent *e; (e = readdir(d));)
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                st->replace = true;
                break;
            }
        closedir(d);
        if (st->replace && !force)
            return qerr_set(err, "%s exists and is not empty (use --force to replace it)",
                            st->out);
    } else if (errno != ENOENT) {
        return qerr_set(err, "%s: %s", st->out, strerror(errno));
    }

    /* Missing parent directories are created, as `mkdir -p` would (models/NAME on a fresh tree). */
    for (char *slash = strchr(st->out + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        int rc = mkdir(st->out, 0755);
        int e = errno;
        *slash = '/';
        if (rc != 0 && e != EEXIST)
            return qerr_set(err, "cannot create the parent directories of %s: %s", st->out, strerror(e));
    }
    memcpy(st->tmp, st->out, len);
    memcpy(st->tmp + len, ".tmp-XXXXXX", sizeof ".tmp-XXXXXX");
    if (!mkdtemp(st->tmp)) {
        int e = errno;
        st->tmp[0] = '\0';
        return qerr_set(err, "cannot create a staging directory beside %s: %s", st->out,
                        strerror(e));
    }
    chmod(st->tmp, 0755);
    return 0;
}

int ckpt_stage_path(const CkptStage *st, const char *name, char *out, size_t n, QErr *err) {
    if (join(out, n, st->tmp, name)) return qerr_set(err, "%s/%s: path too long", st->tmp, name);
    return 0;
}

int ckpt_stage_copy(const CkptStage *st, const char *src_dir, const char *name, bool optional,
                    QErr *err) {
    char src[PATH_MAX], dst[PATH_MAX];
    if (join(src, sizeof src, src_dir, name))
        return qerr_set(err, "%s/%s: path too long", src_dir, name);
    if (ckpt_stage_path(st, name, dst, sizeof dst, err)) return -1;
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        if (errno == ENOENT && optional) return 0;
        return qerr_set(err, "%s: cannot open: %s", src, strerror(errno));
    }
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) {
        int e = errno;
        close(in);
        return qerr_set(err, "%s: cannot create: %s", dst, strerror(e));
    }
    int rc = 0;
    char buf[1 << 16];
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            rc = qerr_set(err, "%s: read failed: %s", src, strerror(errno));
            break;
        }
        if (n == 0) break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(out, buf + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) {
                rc = qerr_set(err, "%s: write failed: %s", dst, strerror(errno));
                break;
            }
            off += w;
        }
        if (rc) break;
    }
    if (!rc && fsync(out)) rc = qerr_set(err, "%s: fsync failed: %s", dst, strerror(errno));
    if (close(out) && !rc) rc = qerr_set(err, "%s: close failed: %s", dst, strerror(errno));
    close(in);
    return rc;
}

int ckpt_stage_commit(CkptStage *st, QErr *err) {
    DIR *d = opendir(st->tmp);
    if (!d) return qerr_set(err, "%s: cannot read: %s", st->tmp, strerror(errno));
    int rc = 0;
    for (struct dirent *e; !rc && (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[PATH_MAX];
        if (join(p, sizeof p, st->tmp, e->d_name) || fsync_path(p))
            rc = qerr_set(err, "%s/%s: fsync failed: %s", st->tmp, e->d_name, strerror(errno));
    }
    closedir(d);
    if (rc) return rc;
    if (fsync_path(st->tmp)) return qerr_set(err, "%s: fsync failed: %s", st->tmp, strerror(errno));

    if (st->replace) {
        if (renameat2(AT_FDCWD, st->tmp, AT_FDCWD, st->out, RENAME_EXCHANGE))
            return qerr_set(err, "cannot replace %s: %s", st->out, strerror(errno));
        remove_tree(st->tmp); /* the old contents; best effort */
    } else if (rename(st->tmp, st->out)) {
        return qerr_set(err, "cannot rename %s to %s: %s", st->tmp, st->out, strerror(errno));
    }
    st->tmp[0] = '\0';

    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", st->out);
    char *slash = strrchr(parent, '/');
    if (slash == parent)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(parent, sizeof parent, ".");
    fsync_path(parent); /* best effort: makes the rename durable */
    return 0;
}

void ckpt_stage_abort(CkptStage *st) {
    if (st->tmp[0]) remove_tree(st->tmp);
    st->tmp[0] = '\0';
}
