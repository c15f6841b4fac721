// SIMD vectors for the kernels (GCC / clang vector extensions): VL float lanes, a splat, an
// unaligned view of a float array, and 2^x to about 1 ulp. Used by small_head_attention.cpp and
// local_match.cpp.
#pragma once

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
// aligned(4): loads and stores may be unaligned; may_alias: float arrays are read as vectors.
typedef float vf __attribute__((vector_size(VL * 4), aligned(4), may_alias));
typedef int vi __attribute__((vector_size(VL * 4), aligned(4), may_alias));

static inline vf splat(float x) { return vf{} + x; }
static inline vf& at(float* p) { return *reinterpret_cast<vf*>(p); }
static inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }

// 2^x for x <= ~0 (scores are kept in log2 units), to about 1 ulp: x = n + f with n the
// nearest integer, |f| <= 1/2; 2^f by its degree-7 Taylor polynomial in f ln 2 (truncation
// error < 1e-8); 2^n through the exponent bits. x < -125 is clamped (2^-125 = 2.4e-38,
// negligible against the row's largest term, 1), and so is x > 64: only the lanes of padded
// keys get there, and their terms must stay finite (they are multiplied by k = 0).
static inline vf vexp2(vf x) {
    x = x < -125.f ? splat(-125.f) : x;
    x = x > 64.f ? splat(64.f) : x;
    const vf fn = (x + 12582912.f) - 12582912.f;  // round to nearest by the 1.5 * 2^23 trick
    const vf f = x - fn;
    vf p = splat(1.5252733646775596e-05f);
    p = p * f + 1.5403529687318950e-04f;
    p = p * f + 1.3333557872101665e-03f;
    p = p * f + 9.6181286498904230e-03f;
    p = p * f + 5.5504109710454940e-02f;
    p = p * f + 2.4022650718688965e-01f;
    p = p * f + 6.9314718246459960e-01f;
    p = p * f + 1.f;
    const vi e = (__builtin_convertvector(fn, vi) + 127) << 23;  // 2^n
    return p * (vf)e;
}

constexpr float LOG2E = 1.44269504088896341f, LN2 = 0.693147180559945309f;
