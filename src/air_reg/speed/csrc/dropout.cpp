// Inverted dropout on CPU, float32, with counter-based masks (fast_dropout=True).
//
// The mask is a pure function of (seed, element index): element i is kept when its 16 random
// bits are >= drop (= p * 2^16, rounded), its bits being bits 16 (i % 4) .. 16 (i % 4) + 15 of
// SplitMix64's output for state seed + (i / 4 + 1) * gamma (one 64-bit hash per four elements).
// So no mask is stored: the backward regenerates it from the seed, and results do not depend
// on the number of threads. One pass reads x and writes y, where torch's ops (draw, compare,
// convert, multiply) take four passes and a serial generator.
//   air_dropout            y = keep ? x * scale : 0; with relu = 1, y = keep ? max(x, 0) * scale : 0
//                          (the feed-forward's ReLU + dropout in one pass)
//   air_relu_dropout_bwd   dx = y > 0 ? dy * scale : 0, the gradient of the relu = 1 case
//                          (y > 0 exactly where x > 0 and the element was kept)
// The gradient of plain dropout is air_dropout of dy with the same seed.
// Each call handles shares t0 .. t1 - 1 of [0, n) split into `threads` ranges (starting at
// multiples of 32), with OpenMP in one parallel region (else the Python side runs the shares
// on its threads). Blocks of 32 elements take 8 hashes in one vector; the rest are scalar.

#include <cstdint>
#include <cstring>

namespace {

constexpr uint64_t GAMMA = 0x9E3779B97F4A7C15ull;  // SplitMix64's increment
constexpr int BLOCK = 32;                          // elements per vector step (8 hashes)

typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
// aligned(4): loads and stores may be unaligned; may_alias: float arrays are read as vectors.
typedef float f32x16 __attribute__((vector_size(64), aligned(4), may_alias));

template <class T>
inline T splitmix64(T z) {  // a uint64_t or a vector of them
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline unsigned bits(uint64_t seed, long i) {
    const uint64_t z = splitmix64(seed + uint64_t(i / 4 + 1) * GAMMA);
    return unsigned(z >> (16 * (i % 4))) & 0xffffu;
}

template <bool Relu>
void dropout_range(const float* x, float* y, long i, long end, uint64_t seed, unsigned drop,
                   float scale) {
    const u64x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (; i + BLOCK <= end; i += BLOCK) {  // i is a multiple of 4: words i / 4 .. i / 4 + 7
        const u16x32 r = (u16x32)splitmix64(seed + (lane + uint64_t(i / 4 + 1)) * GAMMA);
        for (int h = 0; h < 2; h++) {  // 16 elements at a time: element e has r[e]
            u16x16 half;
            std::memcpy(&half, reinterpret_cast<const char*>(&r) + 32 * h, sizeof half);
            const u32x16 b = __builtin_convertvector(half, u32x16);
            const f32x16 v = *reinterpret_cast<const f32x16*>(x + i + 16 * h);
            auto keep = b >= drop;
            if (Relu) keep &= v > 0.f;
            *reinterpret_cast<f32x16*>(y + i + 16 * h) = keep ? v * scale : f32x16{};
        }
    }
    for (; i < end; i++) {
        const bool keep = bits(seed, i) >= drop && (!Relu || x[i] > 0.f);
        y[i] = keep ? x[i] * scale : 0.f;
    }
}

// Start of share t of [0, n) split into `threads`: a multiple of BLOCK (or n).
inline long share(long n, int t, int threads) {
    return t == threads ? n : n * t / threads / BLOCK * BLOCK;
}

}  // namespace

extern "C" {

void air_dropout(const float* x, float* y, long n, uint64_t seed, unsigned drop, float scale,
                 int relu, int threads, int t0, int t1) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        const long i0 = share(n, t, threads), i1 = share(n, t + 1, threads);
        if (relu) dropout_range<true>(x, y, i0, i1, seed, drop, scale);
        else dropout_range<false>(x, y, i0, i1, seed, drop, scale);
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
