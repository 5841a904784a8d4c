/* The machine's measured peak multiply-add rate on one core, for bench_step to report its
 * kernels' GMAC/s against: 12 independent chains of the instruction the kernels are built on
 * (more than latency x throughput on current cores), so only issue width limits them.
 *
 *   fp32: vfmadd (zmm where AVX-512 runs, else ymm; NEON vfmaq on arm64)
 *   int8: vpdpbusd (zmm, VNNI: 64 multiply-adds an instruction) for the VNNI kernels;
 *         vpmaddwd (zmm or ymm) for the int16-activation kernels, counted as the products it
 *         makes (2 per int32 lane).
 * Compiled without ISA flags: each loop carries its own target attribute and runs only after
 * the CPU check, like the library's kernels. Returns 0 where it cannot measure.
 */
#define _POSIX_C_SOURCE 199309L
#include "peak.h"

#include <stdint.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Short runs, the best of many: on a shared machine a run that another process interrupts is
 * slow, and the fastest of 60 sub-millisecond runs is the core's own rate. */
#define ITERS 100000L
#define CHAINS 12

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>

/* The accumulators go through a volatile sink so the loops cannot be folded away. */
static volatile float sink_f;
static volatile int sink_i;

#define PEAK_LOOP(T, ZERO, OP, LANES, STORE)                                                    \
    T a[CHAINS];                                                                               \
    long n;                                                                                    \
    int i;                                                                                     \
    double t;                                                                                  \
    for (i = 0; i < CHAINS; i++)                                                               \
        a[i] = ZERO;                                                                           \
    t = now_s();                                                                               \
    for (n = 0; n < ITERS; n++) {                                                              \
        _Pragma("GCC unroll 12") for (i = 0; i < CHAINS; i++) a[i] = OP;                       \
    }                                                                                          \
    t = now_s() - t;                                                                           \
    for (i = 0; i < CHAINS; i++)                                                               \
        STORE;                                                                                 \
    return (double)ITERS * CHAINS * (LANES) / t / 1e9;

__attribute__((target("avx2,fma"))) static double fma256(void) {
    const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-3f);
    PEAK_LOOP(__m256, _mm256_set1_ps(1.0f), _mm256_fmadd_ps(a[i], b, c), 8, sink_f = _mm256_cvtss_f32(a[i]))
}

__attribute__((target("avx512f"))) static double fma512(void) {
    const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
    PEAK_LOOP(__m512, _mm512_set1_ps(1.0f), _mm512_fmadd_ps(a[i], b, c), 16, sink_f = _mm512_cvtss_f32(a[i]))
}

__attribute__((target("avx512f,avx512vnni"))) static double dpbusd512(void) {
    const __m512i b = _mm512_set1_epi8(3), c = _mm512_set1_epi8(-1);
    PEAK_LOOP(__m512i, _mm512_setzero_si512(), _mm512_dpbusd_epi32(a[i], b, c), 64,
              sink_i = _mm_cvtsi128_si32(_mm512_castsi512_si128(a[i])))
}

__attribute__((target("avx512f,avx512vl,avx512vnni"))) static double dpbusd256(void) {
    const __m256i b = _mm256_set1_epi8(3), c = _mm256_set1_epi8(-1);
    PEAK_LOOP(__m256i, _mm256_setzero_si256(), _mm256_dpbusd_epi32(a[i], b, c), 32,
              sink_i = _mm_cvtsi128_si32(_mm256_castsi256_si128(a[i])))
}

/* vpmaddwd's products, accumulated with vpaddd as the int16 kernels do (that pair is the loop). */
__attribute__((target("avx2"))) static double maddwd256(void) {
    const __m256i b = _mm256_set1_epi16(3), c = _mm256_set1_epi16(-1);
    PEAK_LOOP(__m256i, _mm256_setzero_si256(), _mm256_add_epi32(a[i], _mm256_madd_epi16(b, c)), 16,
              sink_i = _mm_cvtsi128_si32(_mm256_castsi256_si128(a[i])))
}

__attribute__((target("avx512f,avx512bw"))) static double maddwd512(void) {
    const __m512i b = _mm512_set1_epi16(3), c = _mm512_set1_epi16(-1);
    PEAK_LOOP(__m512i, _mm512_setzero_si512(), _mm512_add_epi32(a[i], _mm512_madd_epi16(b, c)), 32,
              sink_i = _mm_cvtsi128_si32(_mm512_castsi512_si128(a[i])))
}

static double best_of(double (*f)(void)) {
    double b = 0, v;
    int k;
    for (k = 0; k < 60; k++)
        if ((v = f()) > b)
            b = v;
    return b;
}

double cb_peak_gmacs(int kernel, int quantized) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return 0.0;
    switch (kernel) {
    case COGBERT_KERNEL_AVX2:
        return best_of(quantized ? maddwd256 : fma256);
    case COGBERT_KERNEL_VNNI:
        return best_of(quantized ? dpbusd256 : fma256);
    case COGBERT_KERNEL_AVX512:
        return best_of(quantized ? maddwd512 : fma512);
    case COGBERT_KERNEL_VNNI512:
        return best_of(quantized ? dpbusd512 : fma512);
    default:
        return 0.0;
    }
}

#else
double cb_peak_gmacs(int kernel, int quantized) {
    (void)kernel;
    (void)quantized;
    return 0.0;
}
#endif
