/* The measured peak multiply-add rate of one core for a kernel's instruction (bench/peak.c). */
#ifndef COGBERT_BENCH_PEAK_H
#define COGBERT_BENCH_PEAK_H

#include "cogbert.h"

/* GMAC/s of the instruction kernel `kernel` (COGBERT_KERNEL_*) builds its fp32 (quantized = 0)
 * or quantized (1) products on, measured now on this core; 0 where it cannot be measured. */
double cb_peak_gmacs(int kernel, int quantized);

#endif
