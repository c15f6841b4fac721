// Warps and penalties for instance optimisation (air_reg.refine), CPU float32, forward and backward.
//
// The refinement's step spends its time in a few memory-bound passes over full-size fields
// that torch runs as a dozen kernels each (select, scale, add, stack, grid_sample, upsample,
// and their backwards, which also fill zero tensors). Each function here is one pass.
//
//   air_upwarp_fwd   out[b, c] = moving[b, c] sampled at p + up(flow[b])(p), where up() is
//                    torch's bilinear upsampling (align_corners=False, no antialias) of the
//                    (h, w) flow to (H, W), its displacements scaled by (H / h, W / w); the
//                    sampling is grid_sample's (bilinear, border padding, align_corners=True).
//                    = warp(moving, resize_flow(flow, (H, W))) in air_reg.
//   air_upwarp_bwd   d(loss)/d(flow) from d(loss)/d(out) (moving is a constant).
//   air_square_fwd   out = u + u sampled at p + u(p) (one scaling-and-squaring step).
//   air_square_bwd   d(loss)/d(u) from d(loss)/d(out), through both uses of u.
//   air_flow_penalty the diffusion and fold penalties, value and gradient in one pass.
//
// Locations follow torch: a coordinate outside [0, n - 1] is clipped to it and gets no
// gradient (nor does one exactly on the border); out-of-range neighbours read 0.
// The row passes take the upsampling's column taps once per call and mix the two coarse rows
// once per output row, so each pixel reads two values of the field, not eight.
// Shares: the forwards split the B * H output rows into `threads` ranges; the backwards,
// which scatter into the field, split the B pairs (each share owns whole pairs, so no two
// threads write one value). With OpenMP the shares t0 .. t1 - 1 run in one parallel region,
// otherwise the Python side runs them on its threads.

#include <cmath>
#include <vector>

#include "interp.h"

namespace {

using air::corners;
using air::difference;
using air::locate;
using air::Sample;
using air::slope;
using air::spread;
using air::Tap;
using air::upsample_tap;
using air::value;

inline long share(long n, int t, int threads) { return n * t / threads; }

// Row i of the upsampled flow of one pair, in output pixels: uy[j], ux[j] for j < W. `flow`
// is the pair's (2, h, w) flow; `mix` (2 w floats) holds the two coarse rows mixed.
inline void upsample_row(const float* flow, long h, long w, long H, const Tap* cols, long W,
                         long i, float* mix, float* uy, float* ux) {
    const Tap r = upsample_tap(i, h, H);
    const float scale[2] = {float(H) / float(h), float(W) / float(w)};
    for (int k = 0; k < 2; k++) {
        const float* a = flow + (k * h + r.i0) * w;
        const float* b = flow + (k * h + r.i1) * w;
        float* m = mix + k * w;
        for (long q = 0; q < w; q++) m[q] = scale[k] * (r.l0 * a[q] + r.l1 * b[q]);
    }
    for (long j = 0; j < W; j++) {
        const Tap& c = cols[j];
        uy[j] = c.l0 * mix[c.i0] + c.l1 * mix[c.i1];
        ux[j] = c.l0 * mix[w + c.i0] + c.l1 * mix[w + c.i1];
    }
}

// The transpose of upsample_row: adds the row gradients gy, gx (W each) into the pair's
// (2, h, w) flow gradient. `mix` (2 w floats) is scratch.
inline void upsample_row_grad(float* grad, long h, long w, long H, const Tap* cols, long W,
                              long i, const float* gy, const float* gx, float* mix) {
    const Tap r = upsample_tap(i, h, H);
    const float scale[2] = {float(H) / float(h), float(W) / float(w)};
    for (long q = 0; q < 2 * w; q++) mix[q] = 0.f;
    for (long j = 0; j < W; j++) {
        const Tap& c = cols[j];
        mix[c.i0] += c.l0 * gy[j];
        mix[c.i1] += c.l1 * gy[j];
        mix[w + c.i0] += c.l0 * gx[j];
        mix[w + c.i1] += c.l1 * gx[j];
    }
    for (int k = 0; k < 2; k++) {
        float* a = grad + (k * h + r.i0) * w;
        float* b = grad + (k * h + r.i1) * w;
        const float* m = mix + k * w;
        for (long q = 0; q < w; q++) a[q] += scale[k] * r.l0 * m[q];
        for (long q = 0; q < w; q++) b[q] += scale[k] * r.l1 * m[q];
    }
}

std::vector<Tap> column_taps(long w, long W) {
    std::vector<Tap> cols(W);
    for (long j = 0; j < W; j++) cols[j] = upsample_tap(j, w, W);
    return cols;
}

}  // namespace

extern "C" {

void air_upwarp_fwd(const float* moving, const float* flow, float* out, long B, long C, long H,
                    long W, long h, long w, int threads, int t0, int t1) {
    const std::vector<Tap> cols = column_taps(w, W);
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        std::vector<float> scratch(2 * w + 2 * W);
        float *mix = scratch.data(), *uy = mix + 2 * w, *ux = uy + W;
        for (long row = share(B * H, t, threads); row < share(B * H, t + 1, threads); row++) {
            const long b = row / H, i = row % H;
            upsample_row(flow + b * 2 * h * w, h, w, H, cols.data(), W, i, mix, uy, ux);
            for (long j = 0; j < W; j++) {
                const Sample s = locate(float(i) + uy[j], float(j) + ux[j], H, W);
                for (long ch = 0; ch < C; ch++) {
                    const float* plane = moving + (b * C + ch) * H * W;
                    out[((b * C + ch) * H + i) * W + j] = value(corners(plane, W, s), s);
                }
            }
        }
    }
}

// grad_flow (B, 2, h, w) must be zeroed by the caller.
void air_upwarp_bwd(const float* moving, const float* flow, const float* grad_out,
                    float* grad_flow, long B, long C, long H, long W, long h, long w, int threads,
                    int t0, int t1) {
    const std::vector<Tap> cols = column_taps(w, W);
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        std::vector<float> scratch(2 * w + 4 * W);
        float *mix = scratch.data(), *uy = mix + 2 * w, *ux = uy + W, *gy = ux + W, *gx = gy + W;
        for (long b = share(B, t, threads); b < share(B, t + 1, threads); b++) {
            for (long i = 0; i < H; i++) {
                upsample_row(flow + b * 2 * h * w, h, w, H, cols.data(), W, i, mix, uy, ux);
                for (long j = 0; j < W; j++) {
                    const Sample s = locate(float(i) + uy[j], float(j) + ux[j], H, W);
                    float sy = 0.f, sx = 0.f;
                    for (long ch = 0; ch < C; ch++) {
                        const long at = (b * C + ch) * H * W;
                        const float g = grad_out[at + i * W + j];
                        float dy, dx;
                        slope(corners(moving + at, W, s), s, &dy, &dx);
                        sy += g * dy;
                        sx += g * dx;
                    }
                    gy[j] = sy;
                    gx[j] = sx;
                }
                upsample_row_grad(grad_flow + b * 2 * h * w, h, w, H, cols.data(), W, i, gy, gx,
                                  mix);
            }
        }
    }
}

void air_square_fwd(const float* u, float* out, long B, long H, long W, int threads, int t0,
                    int t1) {
    const long n = H * W;
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        for (long row = share(B * H, t, threads); row < share(B * H, t + 1, threads); row++) {
            const long b = row / H, i = row % H;
            const float* uy = u + b * 2 * n;
            const float* ux = uy + n;
            for (long j = 0; j < W; j++) {
                const long p = i * W + j;
                const Sample s = locate(float(i) + uy[p], float(j) + ux[p], H, W);
                out[b * 2 * n + p] = uy[p] + value(corners(uy, W, s), s);
                out[b * 2 * n + n + p] = ux[p] + value(corners(ux, W, s), s);
            }
        }
    }
}

// grad_u (B, 2, H, W) must hold a copy of grad_out (the identity term) on entry.
void air_square_bwd(const float* u, const float* grad_out, float* grad_u, long B, long H, long W,
                    int threads, int t0, int t1) {
    const long n = H * W;
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        for (long b = share(B, t, threads); b < share(B, t + 1, threads); b++) {
            const float* uy = u + b * 2 * n;
            const float* ux = uy + n;
            const float* gy_out = grad_out + b * 2 * n;
            const float* gx_out = gy_out + n;
            float* gy_u = grad_u + b * 2 * n;
            float* gx_u = gy_u + n;
            for (long i = 0; i < H; i++) {
                for (long j = 0; j < W; j++) {
                    const long p = i * W + j;
                    const Sample s = locate(float(i) + uy[p], float(j) + ux[p], H, W);
                    const float g0 = gy_out[p], g1 = gx_out[p];
                    float dy0, dx0, dy1, dx1;
                    slope(corners(uy, W, s), s, &dy0, &dx0);
                    slope(corners(ux, W, s), s, &dy1, &dx1);
                    gy_u[p] += g0 * dy0 + g1 * dy1;  // through the sampling location
                    gx_u[p] += g0 * dx0 + g1 * dx1;
                    spread(gy_u, W, s, g0);  // through the sampled values
                    spread(gx_u, W, s, g1);
                }
            }
        }
    }
}
}

// Penalties of air_reg.losses in one pass, value and gradient:
//   wd * Diffusion(u) + wf * NegativeJacobian(eps)(u)  for u (B, 2, H, W), H, W >= 2,
// Diffusion being the mean squared forward difference along rows plus that along columns,
// NegativeJacobian the mean of relu(eps - det J) with J from torch.gradient's differences
// (central inside, one-sided on the edges). value[b] receives pair b's share of the batch
// value; grad (zeroed by the caller) the gradient. Shares split the pairs.
namespace {

// torch.gradient along one axis at index i of n, as (plus, minus, factor): the derivative is
// factor * (v[plus] - v[minus]) in units of that axis's stride.

}  // namespace

extern "C" void air_flow_penalty(const float* u, float* grad, double* value, long B, long H,
                                 long W, float wd, float wf, float eps, int threads, int t0,
                                 int t1) {
    const long n = H * W;
    const double ny = double(B) * 2 * (H - 1) * W, nx = double(B) * 2 * H * (W - 1);
    const double npx = double(B) * n;
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        for (long b = share(B, t, threads); b < share(B, t + 1, threads); b++) {
            const float* u0 = u + b * 2 * n;  // rows displacement; u0 + n: columns
            float* g0 = grad + b * 2 * n;
            double sy = 0, sx = 0, sf = 0;
            if (wd != 0.f) {
                const float cy = float(2.0 * wd / ny), cx = float(2.0 * wd / nx);
                for (long k = 0; k < 2; k++) {
                    const float* v = u0 + k * n;
                    float* g = g0 + k * n;
                    for (long i = 0; i < H; i++) {
                        for (long j = 0; j < W; j++) {
                            const long p = i * W + j;
                            if (i + 1 < H) {
                                const float d = v[p + W] - v[p];
                                sy += double(d) * d;
                                g[p + W] += cy * d;
                                g[p] -= cy * d;
                            }
                            if (j + 1 < W) {
                                const float d = v[p + 1] - v[p];
                                sx += double(d) * d;
                                g[p + 1] += cx * d;
                                g[p] -= cx * d;
                            }
                        }
                    }
                }
            }
            if (wf != 0.f) {
                const float gdet = float(-wf / npx);
                const float* v0 = u0;
                const float* v1 = u0 + n;
                float* h0 = g0;
                float* h1 = g0 + n;
                for (long i = 0; i < H; i++) {
                    long ip, im;
                    float fi;
                    difference(i, H, &ip, &im, &fi);
                    for (long j = 0; j < W; j++) {
                        long jp, jm;
                        float fj;
                        difference(j, W, &jp, &jm, &fj);
                        const long py = ip * W + j, my = im * W + j;  // row neighbours
                        const long px = i * W + jp, mx = i * W + jm;  // column neighbours
                        const float a = fi * (v0[py] - v0[my]);  // d u_y / d row
                        const float d = fi * (v1[py] - v1[my]);  // d u_x / d row
                        const float c = fj * (v0[px] - v0[mx]);  // d u_y / d col
                        const float e = fj * (v1[px] - v1[mx]);  // d u_x / d col
                        const float det = (1.f + a) * (1.f + e) - c * d;
                        if (eps - det > 0.f) {
                            sf += double(eps - det);
                            const float ga = gdet * (1.f + e), ge = gdet * (1.f + a);
                            const float gc = -gdet * d, gd = -gdet * c;
                            h0[py] += fi * ga, h0[my] -= fi * ga;
                            h1[py] += fi * gd, h1[my] -= fi * gd;
                            h0[px] += fj * gc, h0[mx] -= fj * gc;
                            h1[px] += fj * ge, h1[mx] -= fj * ge;
                        }
                    }
                }
            }
            value[b] = wd * (sy / ny + sx / nx) + wf * sf / npx;
        }
    }
}
