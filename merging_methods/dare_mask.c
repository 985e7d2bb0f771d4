/* DARE's keep-masks (mask rule 2, merging_methods/primitives.py) fused with their multiply:
 * delta[i] *= keep(start + i), where keep(j) says whether 16-bit lane j mod 4 of the SplitMix64
 * word w_{j div 4} = mix(key + (j div 4 + 1) * GOLDEN) is below t. One pass over the delta
 * instead of a dozen numpy passes and a torch multiply. Built by dare_kernel.py with
 * -march=native; vectorised only where AVX-512DQ has 64-bit lane multiplies (elsewhere the
 * numpy path is as fast), so other targets refuse to build and the numpy path is used. */
#include <stdint.h>

#if !defined(__AVX512DQ__)
#error "DARE's mask kernel is built only for CPUs with AVX-512DQ"
#endif

#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t mix(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ULL;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* One entry of a partial word (the first and last words of an unaligned range). */
static inline void keep_one(float *d, int64_t j, uint64_t key, uint32_t t) {
    uint64_t w = mix(key + (uint64_t)(j / 4 + 1) * GOLDEN);
    *d *= (float)(((w >> (16 * (j & 3))) & 0xFFFF) < t);
}

/* delta[0 .. n-1] *= keep(start .. start+n-1); a dropped entry becomes delta * 0 (its sign
 * kept), as a float multiply by the 0/1 mask gives. */
void dare_keep_mul(float *delta, int64_t n, uint64_t key, int64_t start, uint32_t t) {
    int64_t j = start, stop = start + n;
    for (; j < stop && (j & 3); j++)
        keep_one(delta + (j - start), j, key, t);
    float *p = delta + (j - start);
    uint64_t state = key + (uint64_t)(j / 4 + 1) * GOLDEN;
    int64_t words = (stop - j) / 4;
    for (int64_t k = 0; k < words; k++) {
        uint64_t w = mix(state + (uint64_t)k * GOLDEN);
        p[4 * k + 0] *= (float)((w & 0xFFFF) < t);
        p[4 * k + 1] *= (float)(((w >> 16) & 0xFFFF) < t);
        p[4 * k + 2] *= (float)(((w >> 32) & 0xFFFF) < t);
        p[4 * k + 3] *= (float)((w >> 48) < t);
    }
    for (j += 4 * words; j < stop; j++)
        keep_one(delta + (j - start), j, key, t);
}
