/* CPU dispatch: which kernel tables this build has, which of them this CPU runs, and the choice
 * AUTO makes. The tables themselves are data (internal.h), so reading one here runs no
 * instruction of its ISA; the first call into a table happens only after its CPU check. */
#include "internal.h"

#include <stddef.h>

int cb_cpu_has_avx2_fma(void) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    /* Checks the CPUID bits and that the OS saves the AVX registers (XGETBV). */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

int cb_cpu_has_avx512_vnni(void) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && defined(COGBERT_HAVE_VNNI)
    __builtin_cpu_init();
    return cb_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

int cb_cpu_has_avx512(void) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && defined(COGBERT_HAVE_AVX512)
    /* __builtin_cpu_supports reports AVX-512 only when the OS also saves the zmm state. */
    __builtin_cpu_init();
    return cb_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static int cpu_has_neon(void) {
#if defined(__aarch64__) && (defined(__ARM_NEON) || defined(__ARM_NEON__))
    return 1; /* NEON (AdvSIMD) is mandatory on arm64. */
#else
    return 0; /* 32-bit ARM: only when forced, since NEON there is optional. */
#endif
}

const char *cb_kernel_name(int id) {
    switch (id) {
    case COGBERT_KERNEL_SCALAR: return "scalar";
    case COGBERT_KERNEL_AVX2: return "AVX2/FMA";
    case COGBERT_KERNEL_NEON: return "NEON";
    case COGBERT_KERNEL_VNNI: return "AVX512-VNNI";
    case COGBERT_KERNEL_SCALAR_INT8: return "scalar-int8";
    case COGBERT_KERNEL_AVX512: return "AVX-512";
    case COGBERT_KERNEL_VNNI512: return "AVX512-VNNI (512-bit)";
    default: return "unknown";
    }
}

/* AUTO: the fastest kernels this build has and this CPU runs. */
static const cb_kernels *best(void) {
    if (cb_vnni512_kernels.id && cb_cpu_has_avx512() && cb_cpu_has_avx512_vnni())
        return &cb_vnni512_kernels;
    if (cb_avx512_kernels.id && cb_cpu_has_avx512())
        return &cb_avx512_kernels;
    if (cb_vnni_kernels.id && cb_cpu_has_avx512_vnni())
        return &cb_vnni_kernels;
    if (cb_avx2_kernels.id && cb_cpu_has_avx2_fma())
        return &cb_avx2_kernels;
    if (cb_neon_kernels.id && cpu_has_neon())
        return &cb_neon_kernels;
    return &cb_scalar_kernels;
}

int cogbert_best_kernel(void) {
    return best()->id;
}

int cb_choose_kernels(int want, cb_kernels *out, cogbert_error *err) {
    const cb_kernels *t = NULL;
    int cpu_ok = 0;
    switch (want) {
    case COGBERT_KERNEL_AUTO:
        t = best();
        cpu_ok = 1;
        break;
    case COGBERT_KERNEL_SCALAR: t = &cb_scalar_kernels; cpu_ok = 1; break;
    case COGBERT_KERNEL_SCALAR_INT8: t = &cb_scalar8_kernels; cpu_ok = 1; break;
    case COGBERT_KERNEL_AVX2: t = &cb_avx2_kernels; cpu_ok = cb_cpu_has_avx2_fma(); break;
    case COGBERT_KERNEL_VNNI: t = &cb_vnni_kernels; cpu_ok = cb_cpu_has_avx512_vnni(); break;
    case COGBERT_KERNEL_AVX512: t = &cb_avx512_kernels; cpu_ok = cb_cpu_has_avx512(); break;
    case COGBERT_KERNEL_VNNI512:
        t = &cb_vnni512_kernels;
        cpu_ok = cb_cpu_has_avx512() && cb_cpu_has_avx512_vnni();
        break;
    case COGBERT_KERNEL_NEON: t = &cb_neon_kernels; cpu_ok = 1; break; /* 32-bit ARM: the caller vouches */
    default:
        cb_set_error(err, COGBERT_ERR_ARGUMENT, "unknown kernel %d", want);
        return COGBERT_ERR_ARGUMENT;
    }
    if (!t->id || !cpu_ok) {
        cb_set_error(err, COGBERT_ERR_UNSUPPORTED, "%s kernels requested, but %s", cb_kernel_name(want),
                     t->id ? "this CPU lacks them" : "this build has none");
        return COGBERT_ERR_UNSUPPORTED;
    }
    *out = *t;
    return COGBERT_OK;
}
