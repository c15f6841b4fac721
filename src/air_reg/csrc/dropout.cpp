// Inverted dropout on CPU, float32, with counter-based masks (fast_dropout=True).
//
// Element i of a call with seed s is kept when the top 16 bits of SplitMix64's output for
// state s + (i + 1) * gamma are >= drop (drop = p * 2^16, rounded): the mask is a pure
// function of (s, i). So no mask is stored: the backward regenerates it from the seed, and
// results do not depend on the number of threads. One pass reads x and writes y, where
// torch's ops (draw, compare, convert, multiply) take four passes and a serial generator.
//   air_dropout            y = keep ? x * scale : 0; with relu = 1, y = keep ? max(x, 0) * scale : 0
//                          (the feed-forward's ReLU + dropout in one pass)
//   air_relu_dropout_bwd   dx = y > 0 ? dy * scale : 0, the gradient of the relu = 1 case
//                          (y > 0 exactly where x > 0 and the element was kept)
// The gradient of plain dropout is air_dropout of dy with the same seed.
// Each call handles the shares t0 .. t1 - 1 of [0, n) split into `threads` equal ranges,
// with OpenMP in one parallel region (else the Python side runs the shares on its threads).

#include <cstdint>

namespace {

constexpr uint64_t GAMMA = 0x9E3779B97F4A7C15ull;  // SplitMix64's increment

inline uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline long share(long n, int t, int threads) { return n * t / threads; }

}  // namespace

extern "C" {

void air_dropout(const float* x, float* y, long n, uint64_t seed, unsigned drop, float scale,
                 int relu, int threads, int t0, int t1) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        const long i0 = share(n, t, threads), i1 = share(n, t + 1, threads);
        if (relu) {
            for (long i = i0; i < i1; i++) {
                const unsigned bits = unsigned(splitmix64(seed + uint64_t(i + 1) * GAMMA) >> 48);
                y[i] = bits >= drop && x[i] > 0.f ? x[i] * scale : 0.f;
            }
        } else {
            for (long i = i0; i < i1; i++) {
                const unsigned bits = unsigned(splitmix64(seed + uint64_t(i + 1) * GAMMA) >> 48);
                y[i] = bits >= drop ? x[i] * scale : 0.f;
            }
        }
    }
}

void air_relu_dropout_bwd(const float* y, const float* dy, float* dx, long n, float scale,
                          int threads, int t0, int t1) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        const long i0 = share(n, t, threads), i1 = share(n, t + 1, threads);
        for (long i = i0; i < i1; i++) dx[i] = y[i] > 0.f ? dy[i] * scale : 0.f;
    }
}
}
