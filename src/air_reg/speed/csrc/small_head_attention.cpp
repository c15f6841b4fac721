// Exact softmax attention for small heads on CPU: forward and backward, float32.
//
// AiR's attention has 4 heads of size 4 over ~200 tokens. PyTorch's fused CPU kernel
// (flash attention) is built for heads of 64-128: at size 4 its small matrix products cost
// more than the arithmetic. Here the head size D is a template constant, every loop runs
// over VL query rows or VL keys at once in SIMD lanes (VL = 16 with AVX-512, else 8), and
// accumulators stay in registers (or, for dQ, in per-lane partial sums):
//   forward    lanes = queries: pass 1 finds each row's max score, pass 2 sums
//              P = exp(S - max) and accumulates P V; also returns lse = max + log(sum) for
//              the backward (scores and lse in log2 units: q is scaled by log2(e)).
//   backward   lanes = keys: recomputes P = exp(S - lse) (no N x N matrix is stored),
//              dP = dO V^T, dS = P (dP - rowsum(dO * O)); accumulates dK = scale dS^T Q and
//              dV = P^T dO in registers and dQ = scale dS K as per-lane partial sums
//              (N x D vectors), summed across lanes at the end.
// Memory is O(N D) per call and thread; results do not depend on the number of threads.
// Tensors are (B, N, H * D) views with unit stride along channels (a `View`: pointer, batch
// stride, token stride), so the slices of a fused q/k/v projection are read in place;
// slice s = (b, h) covers channels h * D .. h * D + D - 1 of batch b. The (batch x head)
// slices are split into contiguous ranges, one per thread (OpenMP when available: the
// runtime torch has loaded already; else the Python side, cpu_attention.py, runs the ranges).
// Built on first use with the machine's C++ compiler (-O3 -march=native -fopenmp).

#include <cmath>
#include <cstring>
#include <limits>

#include "vec.h"

struct View {  // a (B, N, H * D) float tensor with unit channel stride
    float* data;
    long batch_stride, token_stride;
};

struct Slice {  // one (batch, head) slice of a View: element (i, d) is at p[i * rs + d]
    float* p;
    long rs;
    float operator()(int i, int d) const { return p[i * rs + d]; }
};

static inline Slice slice(const View& v, long s, int H, int D) {
    return {v.data + (s / H) * v.batch_stride + (s % H) * D, v.token_stride};
}

static inline int padded(int N) { return (N + VL - 1) / VL * VL; }

// x (N, D) -> xT (D, Np) times mul, zero padded to Np columns; and back
static void to_T(Slice x, float* xT, int N, int Np, int D, float mul = 1.f) {
    for (int d = 0; d < D; d++) {
        for (int j = 0; j < N; j++) xT[d * Np + j] = x(j, d) * mul;
        for (int j = N; j < Np; j++) xT[d * Np + j] = 0.f;
    }
}

static void from_T(const float* xT, Slice x, int N, int Np, int D) {
    for (int j = 0; j < N; j++)
        for (int d = 0; d < D; d++) x.p[j * x.rs + d] = xT[d * Np + j];
}

// Scores of VL query rows (qv: their transposed, scaled q) against key j.
template <int D>
static inline vf scores(const vf* qv, Slice k, int j) {
    vf sv = qv[0] * k(j, 0);
    for (int d = 1; d < D; d++) sv += qv[d] * k(j, d);
    return sv;
}

// views: q, k, v, o; lse (S, N)
template <int D>
static void fwd(const View* views, float* lse, long s0, long s1, int N, int H, float scale,
                float* work) {
    const int Np = padded(N);
    float *qT = work, *oT = qT + D * Np;
    for (long s = s0; s < s1; s++) {
        const Slice q = slice(views[0], s, H, D), k = slice(views[1], s, H, D);
        const Slice v = slice(views[2], s, H, D), o = slice(views[3], s, H, D);
        to_T(q, qT, N, Np, D, scale * LOG2E);  // scores in log2 units
        for (int i = 0; i < Np; i += VL) {
            vf qv[D];
            for (int d = 0; d < D; d++) qv[d] = at(qT + d * Np + i);
            vf m = splat(-std::numeric_limits<float>::infinity());
            for (int j = 0; j < N; j++) {
                const vf sv = scores<D>(qv, k, j);
                m = sv > m ? sv : m;
            }
            vf l = splat(0.f), ov[D];
            for (int d = 0; d < D; d++) ov[d] = splat(0.f);
            for (int j = 0; j < N; j++) {
                const vf p = vexp2(scores<D>(qv, k, j) - m);
                l += p;
                for (int d = 0; d < D; d++) ov[d] += p * v(j, d);
            }
            vf inv = 1.f / l;
            for (int d = 0; d < D; d++) at(oT + d * Np + i) = ov[d] * inv;
            for (int t = 0; t < VL && i + t < N; t++) lse[s * N + i + t] = m[t] + std::log2(l[t]);
        }
        from_T(oT, o, N, Np, D);
    }
}

// views: q, k, v, o, dO, dq, dk, dv; lse (S, N)
template <int D>
static void bwd(const View* views, const float* lse, long s0, long s1, int N, int H,
                float scale, float* work) {
    const int Np = padded(N);
    float *qT = work, *kT = qT + D * Np, *vT = kT + D * Np, *lp = vT + D * Np, *di = lp + Np;
    float* dqp = di + Np;  // (N, D) vectors of per-lane partial sums of dQ
    for (long s = s0; s < s1; s++) {
        const Slice q = slice(views[0], s, H, D), k = slice(views[1], s, H, D);
        const Slice v = slice(views[2], s, H, D), o = slice(views[3], s, H, D);
        const Slice g = slice(views[4], s, H, D), dq = slice(views[5], s, H, D);
        to_T(q, qT, N, Np, D, scale * LOG2E);  // scores in log2 units, as lse
        to_T(k, kT, N, Np, D);
        to_T(v, vT, N, Np, D);
        for (int i = 0; i < N; i++) {
            float acc = 0.f;
            for (int d = 0; d < D; d++) acc += g(i, d) * o(i, d);
            di[i] = acc;
            lp[i] = lse[s * N + i];
        }
        std::memset(dqp, 0, sizeof(float) * N * D * VL);
        // keys in lanes; padded keys (k = v = 0) add nothing to dQ, their dK/dV are dropped
        for (int j = 0; j < Np; j += VL) {
            vf kv[D], vv[D], dkv[D], dvv[D];
            for (int d = 0; d < D; d++) {
                kv[d] = at(kT + d * Np + j);
                vv[d] = at(vT + d * Np + j);
                dkv[d] = dvv[d] = splat(0.f);
            }
            for (int i = 0; i < N; i++) {
                vf sv = kv[0] * qT[i], dp = vv[0] * g(i, 0);
                for (int d = 1; d < D; d++) {
                    sv += kv[d] * qT[d * Np + i];
                    dp += vv[d] * g(i, d);
                }
                vf p = vexp2(sv - lp[i]);
                vf ds = p * (dp - di[i]);
                float* dqi = dqp + (long)i * D * VL;
                for (int d = 0; d < D; d++) {
                    dkv[d] += ds * qT[d * Np + i];  // qT holds scale log2(e) q
                    dvv[d] += p * g(i, d);
                    at(dqi + d * VL) += ds * kv[d];
                }
            }
            for (int d = 0; d < D; d++) {  // this block of kT / vT is read no more: reuse it
                at(kT + d * Np + j) = dkv[d] * LN2;
                at(vT + d * Np + j) = dvv[d];
            }
        }
        for (int i = 0; i < N; i++)
            for (int d = 0; d < D; d++) {
                float acc = 0.f;
                const float* part = dqp + ((long)i * D + d) * VL;
                for (int l = 0; l < VL; l++) acc += part[l];
                dq.p[i * dq.rs + d] = acc * scale;
            }
        from_T(kT, slice(views[6], s, H, D), N, Np, D);
        from_T(vT, slice(views[7], s, H, D), N, Np, D);
    }
}

static long work_floats(int N, int D, int backward) {
    return backward ? (long)(3 * D + 2) * padded(N) + (long)N * D * VL : 2L * D * padded(N);
}

template <bool Backward>
static int run_range(const View* views, float* lse, long s0, long s1, int N, int H, int D,
                     float scale, float* work) {
#define CASE(DD)                                                                   \
    case DD:                                                                       \
        if (Backward) bwd<DD>(views, lse, s0, s1, N, H, scale, work);              \
        else fwd<DD>(views, lse, s0, s1, N, H, scale, work);                       \
        return 0;
    switch (D) { CASE(1) CASE(2) CASE(4) CASE(8) CASE(16) }
#undef CASE
    return 1;
}

// Slices [S t / T, S (t + 1) / T) for t < T = threads, thread t using scratch
// work + t * work_floats; with OpenMP in one parallel region, else on the calling thread.
template <bool Backward>
static int run(const View* views, float* lse, long S, int N, int H, int D, float scale,
               float* work, int threads, int t0, int t1) {
    int bad = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1) reduction(| : bad)
#endif
    for (int t = t0; t < t1; t++) {
        const long s0 = S * t / threads, s1 = S * (t + 1) / threads;
        bad |= run_range<Backward>(views, lse, s0, s1, N, H, D, scale,
                                   work + t * work_floats(N, D, Backward));
    }
    return bad;
}

extern "C" {

// 1 when built with OpenMP: one call runs all threads' ranges in parallel.
int air_attn_openmp() {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// Floats of scratch memory one thread needs.
long air_attn_work_floats(int N, int D, int backward) { return work_floats(N, D, backward); }

// Ranges t0 .. t1 - 1 of `threads`; returns 0, or 1 for an unsupported head size D.
// views: q, k, v, o (forward); q, k, v, o, dO, dq, dk, dv (backward). lse: (B * H, N).
int air_attn_fwd(const View* views, float* lse, long S, int N, int H, int D, float scale,
                 float* work, int threads, int t0, int t1) {
    return run<false>(views, lse, S, N, H, D, scale, work, threads, t0, t1);
}

int air_attn_bwd(const View* views, const float* lse, long S, int N, int H, int D, float scale,
                 float* work, int threads, int t0, int t1) {
    return run<true>(views, const_cast<float*>(lse), S, N, H, D, scale, work, threads, t0, t1);
}
}
