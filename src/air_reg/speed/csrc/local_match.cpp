// AiR-Match's local window match at inference (models/components/matching.py, local_match),
// CPU float32, forward only (training keeps the torch ops and their autograd).
//
//   air_local_match  flow[b, :, i, j] = sum_k softmax_k(s) o_k over the (2r+1)^2 offsets
//                    o_k = (dy, dx), row-major, with
//                    s_k = scale * (f(i, j) . m(i + dy, j + dx) - half(i + dy, j + dx))
//                          - prior * |o_k|^2 / 2,
//                    f: the fixed features (B, C, H, W); m: the moving ones replicate-padded by
//                    r, (B, C, H + 2r, W + 2r); half: |m|^2 / 2 on the padded grid
//                    (B, H + 2r, W + 2r) for the l2 score, null for the dot score.
//
// In torch this is K shifted products and channel sums, a (B, H, W, K) score block, a softmax
// and an einsum: K + 4 passes over memory. Here SIMD lanes run along a row of pixels (VL at a
// time; a row's last block overlaps the one before, rows shorter than VL go one pixel at a
// time), each offset's score is a register summed over the channels, and the softmax and the
// mean offset follow on the K registers: one read of the features a pixel block, one write of
// the flow. Shares: the B * H output rows split into `threads` ranges, as in warp.cpp.

#include <cmath>
#include <vector>

#include "vec.h"

namespace {

inline long share(long n, int t, int threads) { return n * t / threads; }

struct Window {
    long B, C, H, W, r, k;  // k = 2r + 1; the padded grid is (H + 2r) x (W + 2r)
    float scale, prior;
    long prow(long i, int dy) const { return i + r + dy; }  // padded row of i + dy
};

// The flow of pixels j .. j + VL - 1 of row i of pair b (all within the row).
void block(const Window& w, const float* f, const float* m, const float* half, float* flow,
           long b, long i, long j, vf* s) {
    const long Wp = w.W + 2 * w.r, Hp = w.H + 2 * w.r;
    const float* fb = f + b * w.C * w.H * w.W + i * w.W + j;
    const float* mb = m + b * w.C * Hp * Wp;
    vf best = splat(-INFINITY);
    long idx = 0;
    for (int dy = -int(w.r); dy <= int(w.r); dy++) {
        for (int dx = -int(w.r); dx <= int(w.r); dx++, idx++) {
            const long at0 = w.prow(i, dy) * Wp + j + w.r + dx;
            vf acc = splat(0.f);
            for (long c = 0; c < w.C; c++)
                acc += load(fb + c * w.H * w.W) * load(mb + c * Hp * Wp + at0);
            if (half) acc -= load(half + b * Hp * Wp + at0);
            acc = acc * w.scale - w.prior * 0.5f * float(dy * dy + dx * dx);
            s[idx] = acc;
            best = acc > best ? acc : best;
        }
    }
    vf sum = splat(0.f), fy = splat(0.f), fx = splat(0.f);
    idx = 0;
    for (int dy = -int(w.r); dy <= int(w.r); dy++) {
        for (int dx = -int(w.r); dx <= int(w.r); dx++, idx++) {
            const vf p = vexp2((s[idx] - best) * LOG2E);
            sum += p;
            fy += p * float(dy);
            fx += p * float(dx);
        }
    }
    at(flow + (b * 2 * w.H + i) * w.W + j) = fy / sum;
    at(flow + ((b * 2 + 1) * w.H + i) * w.W + j) = fx / sum;
}

// The same for one pixel (rows shorter than VL).
void pixel(const Window& w, const float* f, const float* m, const float* half, float* flow,
           long b, long i, long j, float* s) {
    const long Wp = w.W + 2 * w.r, Hp = w.H + 2 * w.r;
    float best = -INFINITY;
    long idx = 0;
    for (int dy = -int(w.r); dy <= int(w.r); dy++) {
        for (int dx = -int(w.r); dx <= int(w.r); dx++, idx++) {
            const long at0 = w.prow(i, dy) * Wp + j + w.r + dx;
            float acc = 0.f;
            for (long c = 0; c < w.C; c++)
                acc += f[((b * w.C + c) * w.H + i) * w.W + j] * m[(b * w.C + c) * Hp * Wp + at0];
            if (half) acc -= half[b * Hp * Wp + at0];
            s[idx] = acc * w.scale - w.prior * 0.5f * float(dy * dy + dx * dx);
            best = std::fmax(best, s[idx]);
        }
    }
    float sum = 0.f, fy = 0.f, fx = 0.f;
    idx = 0;
    for (int dy = -int(w.r); dy <= int(w.r); dy++) {
        for (int dx = -int(w.r); dx <= int(w.r); dx++, idx++) {
            const float p = std::exp(s[idx] - best);
            sum += p;
            fy += p * float(dy);
            fx += p * float(dx);
        }
    }
    flow[(b * 2 * w.H + i) * w.W + j] = fy / sum;
    flow[((b * 2 + 1) * w.H + i) * w.W + j] = fx / sum;
}

}  // namespace

extern "C" void air_local_match(const float* fixed, const float* padded, const float* half,
                                float* flow, long B, long C, long H, long W, long radius,
                                float scale, float prior, int threads, int t0, int t1) {
    const Window w{B, C, H, W, radius, 2 * radius + 1, scale, prior};
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        std::vector<vf> s(w.k * w.k);
        std::vector<float> s1(w.k * w.k);
        for (long row = share(B * H, t, threads); row < share(B * H, t + 1, threads); row++) {
            const long b = row / H, i = row % H;
            if (W < VL) {
                for (long j = 0; j < W; j++)
                    pixel(w, fixed, padded, half, flow, b, i, j, s1.data());
                continue;
            }
            for (long j = 0; j < W; j += VL)  // the last block ends at the row's end
                block(w, fixed, padded, half, flow, b, i, j + VL <= W ? j : W - VL, s.data());
        }
    }
}
