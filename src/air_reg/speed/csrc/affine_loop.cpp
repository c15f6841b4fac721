// One pyramid level of air_reg.refine's affine stage (estimate_affine) in one call (issue #31),
// 2-D, CPU float32.
//
// Per pair, at a level of (H, W) pixels with s = level size / full size per axis:
//   u(p)  = (A - I)(p - c) + s * t          (refine.flows.affine_flow; c the image centre)
//   loss  = MSE(warp(moving, u), fixed)      (or -MutualInformation()(warped, fixed): mi.h)
// its gradient in A (2 x 2) and t (2, full-size pixels), written out, then torch.optim.Adam's
// update (betas 0.9, 0.999, eps 1e-8) with the stage's two learning rates, one for A and one
// for t: estimate_affine's loop, step for step. The warp is the bilinear sampling with
// border clamping of interp.h (warp.cpp's); the sums over pixels are in double.
//
// Threads: pairs are independent; each thread owns whole pairs.

#include <algorithm>
#include <cmath>
#include <vector>

struct AirAffineLevel {  // mirrored by air_reg.speed.affine_loop._Level
    float* matrix;         // (B, 2, 2) A, updated in place
    float* shift;          // (B, 2) t in full-size pixels, updated in place
    float* m;              // (B, 6) Adam's first moments: A's 4 entries, then t's 2
    float* v;              // (B, 6) second moments
    const float* fixed;    // (B, C, H, W) at this level
    const float* moving;   // (B, C, H, W)
    long B, C, H, W;
    long steps, t;         // t: Adam steps taken before this level
    double lr_matrix, lr_shift;
    float scale_y, scale_x;  // level size / full size, per axis
    const int* fixed_bins;   // (B, C * H * W) the fixed image's box-window bins, or null: MSE
    long bins, normalised;   // MutualInformation's bins and normalised
};

#include "interp.h"
#include "mi.h"

namespace {

struct Solo {  // mi.h's team of one
    int id = 0, size = 1;
    void sync() const {}
};

struct Buffers {  // one thread's: the warped image and its slopes (MI), the MI work
    std::vector<float> val, dy, dx, gm, hist, table;
    std::vector<double> stats;
    explicit Buffers(const AirAffineLevel& a) {
        if (!a.fixed_bins) return;
        const long n = a.C * a.H * a.W;
        val.resize(n), dy.resize(n), dx.resize(n), gm.resize(n);
        hist.resize(a.bins * a.bins), table.resize(a.bins * a.bins), stats.resize(8);
    }
};

// d loss / d (A, t) of pair b at (A, t): grad[0..3] A row-major, grad[4..5] t (full-size px).
void gradient(const AirAffineLevel& a, long b, Buffers& buf, double grad[6]) {
    const long H = a.H, W = a.W, C = a.C, hw = H * W;
    const float* A = a.matrix + b * 4;
    const float ty = a.shift[b * 2] * a.scale_y, tx = a.shift[b * 2 + 1] * a.scale_x;
    const float cy = float(H - 1) / 2.f, cx = float(W - 1) / 2.f;
    const float a00 = A[0] - 1.f, a01 = A[1], a10 = A[2], a11 = A[3] - 1.f;
    const float* fixed = a.fixed + b * C * hw;
    const float* moving = a.moving + b * C * hw;
    std::fill(grad, grad + 6, 0.0);
    const bool mi = a.fixed_bins != nullptr;
    air::MiEnds ends{};
    if (mi) {  // the warped image first: MI's gradient needs its histogram
        float lo = INFINITY, hi = -INFINITY;
        for (long i = 0; i < H; i++) {
            const float qy = float(i) - cy;
            for (long j = 0; j < W; j++) {
                const float qx = float(j) - cx;
                const float uy = a00 * qy + a01 * qx + ty, ux = a10 * qy + a11 * qx + tx;
                const air::Sample s = air::locate(float(i) + uy, float(j) + ux, H, W);
                for (long ch = 0; ch < C; ch++) {
                    const long p = ch * hw + i * W + j;
                    const air::Corners c = air::corners(moving + ch * hw, W, s);
                    buf.val[p] = air::value(c, s);
                    air::slope(c, s, &buf.dy[p], &buf.dx[p]);
                    lo = std::min(lo, buf.val[p]);
                    hi = std::max(hi, buf.val[p]);
                }
            }
        }
        const air::MiPair<float> pair{buf.val.data(), a.fixed_bins + b * C * hw, C, hw, 0, hw,
                                      a.bins, a.normalised != 0, lo, hi, buf.hist.data(),
                                      buf.table.data(), buf.stats.data()};
        ends = air::mi_gradient(pair, Solo{}, buf.gm.data());
    }
    const float gcoef = float(2.0 / double(C * hw));  // d(b * batch mean)/d(warped), a pair
    for (long i = 0; i < H; i++) {
        const float qy = float(i) - cy;
        double sy = 0.0, sx = 0.0, syx = 0.0, sxx = 0.0;  // this row's sums of g and g * qx
        for (long j = 0; j < W; j++) {
            const float qx = float(j) - cx;
            float gy = 0.f, gx = 0.f;
            if (mi) {
                for (long ch = 0; ch < C; ch++) {
                    const long p = ch * hw + i * W + j;
                    const float g = ends.grad(buf.gm[p], buf.val[p]);
                    gy += g * buf.dy[p];
                    gx += g * buf.dx[p];
                }
            } else {
                const float uy = a00 * qy + a01 * qx + ty, ux = a10 * qy + a11 * qx + tx;
                const air::Sample s = air::locate(float(i) + uy, float(j) + ux, H, W);
                for (long ch = 0; ch < C; ch++) {
                    const air::Corners c = air::corners(moving + ch * hw, W, s);
                    float dy, dx;
                    air::slope(c, s, &dy, &dx);
                    const float g = (air::value(c, s) - fixed[ch * hw + i * W + j]) * gcoef;
                    gy += g * dy;
                    gx += g * dx;
                }
            }
            sy += gy, sx += gx, syx += double(gy) * qx, sxx += double(gx) * qx;
        }
        grad[0] += sy * qy, grad[1] += syx, grad[2] += sx * qy, grad[3] += sxx;
        grad[4] += sy, grad[5] += sx;
    }
    grad[4] *= a.scale_y;  // t enters as s * t
    grad[5] *= a.scale_x;
}

// torch.optim.Adam's step t (1-based) on one pair's six numbers, A's at lr_matrix, t's at
// lr_shift.
void adam(const AirAffineLevel& a, long b, const double grad[6], long t) {
    const float b1 = float(1.0 - 0.9), b2 = float(0.999), c2 = float(1.0 - 0.999), eps = 1e-8f;
    const double bias1 = 1.0 - std::pow(0.9, double(t));
    const float bias2 = float(std::sqrt(1.0 - std::pow(0.999, double(t))));
    float* m = a.m + b * 6;
    float* v = a.v + b * 6;
    for (int e = 0; e < 6; e++) {
        float* p = e < 4 ? a.matrix + b * 4 + e : a.shift + b * 2 + (e - 4);
        const float step = float(-(e < 4 ? a.lr_matrix : a.lr_shift) / bias1);
        const float g = float(grad[e]);
        m[e] = m[e] + b1 * (g - m[e]);  // torch's lerp_ for weights < 0.5
        v[e] = v[e] * b2 + c2 * g * g;
        *p = *p + step * m[e] / (std::sqrt(v[e]) / bias2 + eps);
    }
}

}  // namespace

extern "C" void air_affine_level(const AirAffineLevel* a, int threads, int t0, int t1) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        Buffers buf(*a);
        for (long b = a->B * t / threads; b < a->B * (t + 1) / threads; b++) {
            for (long step = 0; step < a->steps; step++) {
                double grad[6];
                gradient(*a, b, buf, grad);
                adam(*a, b, grad, a->t + step + 1);
            }
        }
    }
}
