/* assets.c — locating shipped assets at run time (see assets.h). Three candidate places are
 * probed with stat(); a directory counts only if it exists, which is cheap and keeps the rule
 * simple at the cost of not checking the files inside (their readers report those). */
#include "io/assets.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int is_dir(const char *path) {
    struct stat st;
    return !stat(path, &st) && S_ISDIR(st.st_mode);
}

int assets_find(const char *rel, char *out, size_t n, QErr *err) {
    char tried[3][PATH_MAX + 64];
    int n_tried = 0;
    const char *env = getenv("QUILL_ASSETS");
    if (env && *env) snprintf(tried[n_tried++], sizeof tried[0], "%s/%s", env, rel);

    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            snprintf(tried[n_tried++], sizeof tried[0], "%s/../assets/%s", exe, rel);
            snprintf(tried[n_tried++], sizeof tried[0], "%s/assets/%s", exe, rel);
        }
    }
    for (int i = 0; i < n_tried; i++) {
        if (!is_dir(tried[i])) continue;
        char real[PATH_MAX];
        const char *p = realpath(tried[i], real) ? real : tried[i];
        if ((size_t)snprintf(out, n, "%s", p) >= n)
            return qerr_set(err, "asset path %s is too long", p);
        return 0;
    }
    char list[3 * (PATH_MAX + 64) + 16] = "";
    for (int i = 0; i < n_tried; i++) {
        if (i) strcat(list, ", ");
        strcat(list, tried[i]);
    }
    return qerr_set(err, "cannot find the shipped assets '%s' (tried: %s); set QUILL_ASSETS to the "
                         "assets folder", rel, n_tried ? list : "nothing: no QUILL_ASSETS and no "
                                                               "/proc/self/exe");
}

int assets_tokenizer_dir(char *out, size_t n, QErr *err) {
    return assets_find("tokenizer/qwen3", out, n, err);
}
