/* Status codes, error messages and the library's identity: the helpers every other file reports
 * through. Depends on nothing but libc. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void cb_set_error(cogbert_error *err, int status, const char *fmt, ...) {
    va_list ap;
    if (!err)
        return;
    err->status = status;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

uint32_t cogbert_version(void) {
    return ((uint32_t)COGBERT_VERSION_MAJOR << 16) | ((uint32_t)COGBERT_VERSION_MINOR << 8) | COGBERT_VERSION_PATCH;
}

const char *cogbert_version_string(void) {
    return "0.1.0";
}

const char *cogbert_strerror(int status) {
    switch (status) {
    case COGBERT_OK: return "success";
    case COGBERT_ERR_ARGUMENT: return "invalid argument (NULL pointer, batch out of range, or a state of another policy)";
    case COGBERT_ERR_NO_MEMORY: return "out of memory";
    case COGBERT_ERR_IO: return "cannot read the bundle file";
    case COGBERT_ERR_FORMAT: return "not a well-formed safetensors bundle";
    case COGBERT_ERR_VERSION: return "unsupported bundle format version";
    case COGBERT_ERR_BUNDLE: return "invalid Cogbert bundle";
    case COGBERT_ERR_UNSUPPORTED: return "not supported by this build, CPU or model";
    case COGBERT_ERR_NONFINITE: return "observation holds NaN or Inf";
    default: return "unknown status code";
    }
}

void cogbert_options_init(cogbert_options *o) {
    if (o)
        memset(o, 0, sizeof *o);
}
