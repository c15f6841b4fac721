// One pyramid level of air_reg.refine's Adam loop on volumes in one call (issue #34), CPU
// float32, MSE or mutual information: refine_loop.cpp's maths one axis up.
//
// refine's objective per pair, at a level of (D, H, W) voxels with the field on an (fd, fh, fw)
// grid:
//   v      = scale * (S x R x C) param / 2^n     (B-spline control grid -> field grid, per axis)
//   u      = n squarings of v, each u + u sampled (trilinear, border) at p + u(p)
//   coarse = affine + u + (A - I) u               (after_affine; without one: u)
//   loss   = MSE(warp(moving, up(coarse)), fixed) + wd Diffusion(coarse) + wf NegJac(coarse)
// (or, given the fixed image's bins, -MutualInformation()(warped, fixed) for MSE: mi.h's
// histogram, entropies and analytic gradient, the joint histogram summed in double: at 1 mm a
// bin can hold millions of samples, where float32 sums drop the window's weights)
// and its gradient, written out, then torch.optim.Adam's update with refine's cosine-decayed
// step (_optimise in air_reg/refine/optimise.py). up() is torch's trilinear upsampling
// (align_corners=False) times the size ratio (resize_flow); NegJac's det J takes
// torch.gradient's differences (central inside, one-sided at the ends) and the cofactor
// expansion of metrics._det. Every transpose that would scatter to neighbours (the upsampling,
// the penalties) is written as a gather, so a team's threads never write the same voxel; the
// squarings' transposes, which scatter to sampled places, run in two phases straight into the
// shared field (each thread's slices in halves, team.h) while no scatter reaches further than
// a half, else into a buffer per team thread, summed by slices afterwards.
//
// Threads: pairs split over threads (each owns whole pairs), or, with `team` > 1 (OpenMP
// only; B == 1), the threads share one pair's slices, meeting at a barrier between passes.

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

struct AirRefineLevel3 {  // mirrored by air_reg.speed.refine_loop._Level3
    float* param;              // (B, 3, gd, gh, gw) control grid, updated in place
    float* m;                  // (B, 3, gd, gh, gw) Adam's first moment, updated
    float* v;                  // (B, 3, gd, gh, gw) Adam's second moment, updated
    const float* fixed;        // (B, C, D, H, W) at this level
    const float* moving;       // (B, C, D, H, W)
    const float* mats[3];      // (fd, gd), (fh, gh), (fw, gw): control -> field, per axis
    const float* affine;       // (B, 3, fd, fh, fw) affine displacement, or null
    const float* matrix;       // (B, 3, 3) A - I, or null
    long B, C;
    long size[3], field[3], grid[3];  // (D, H, W), (fd, fh, fw), (gd, gh, gw)
    long squarings, steps, t;  // t: Adam steps taken before this level
    double lr, decay;          // step lr * (decay + (1 - decay) (1 + cos(pi i / (steps - 1))) / 2)
    float scale[3];            // field grid / image size, per axis
    float reg_weight, fold_weight, fold_margin;
    const int* fixed_bins;     // (B, C * D * H * W) the fixed image's box-window bins, or null
    long bins, normalised;     // MutualInformation's bins and normalised
};

#include "interp.h"
#include "mi.h"
#include "team.h"

namespace {

using air::Tap;
using air::difference;
using air::upsample_tap;
using air::share;
using air::Team;  // team.h: shared with refine_loop.cpp

struct Band {  // [lo, hi): the nonzero entries of one row or column of a banded matrix
    long lo, hi;
};

struct Axis {  // one axis: its B-spline matrix's bands, the upsampling's taps and transpose
    const float* mat;                  // (n, k)
    long n, k, size;                   // field, control and image points
    std::vector<Band> of_row, of_col;  // control points of a field point; field points of one
    std::vector<Tap> tap;              // image point <- field points
    std::vector<long> from;            // field point q <- image points take[from[q]:from[q+1]]
    std::vector<std::pair<long, float>> take;

    Axis(const float* a, long n_, long k_, long size_)
        : mat(a), n(n_), k(k_), size(size_), of_row(n_), of_col(k_), tap(size_), from(n_ + 1, 0) {
        for (long o = 0; o < n; o++) of_row[o] = band(o, true);
        for (long o = 0; o < k; o++) of_col[o] = band(o, false);
        std::vector<std::vector<std::pair<long, float>>> by(n);
        for (long i = 0; i < size; i++) {
            tap[i] = upsample_tap(i, n, size);
            by[tap[i].i0].push_back({i, tap[i].l0});
            by[tap[i].i1].push_back({i, tap[i].l1});
        }
        for (long q = 0; q < n; q++) {
            take.insert(take.end(), by[q].begin(), by[q].end());
            from[q + 1] = long(take.size());
        }
    }
    Band band(long o, bool row) const {
        const long inner = row ? k : n;
        long lo = inner, hi = 0;
        for (long q = 0; q < inner; q++) {
            if ((row ? mat[o * k + q] : mat[q * k + o]) != 0.f) lo = std::min(lo, q), hi = q + 1;
        }
        return lo < hi ? Band{lo, hi} : Band{0, 0};
    }
};

struct Plan {
    Axis ax[3];
    float up_scale[3];  // the upsampling's displacement scale, image / field size
    explicit Plan(const AirRefineLevel3& a)
        : ax{Axis(a.mats[0], a.field[0], a.grid[0], a.size[0]),
             Axis(a.mats[1], a.field[1], a.grid[1], a.size[1]),
             Axis(a.mats[2], a.field[2], a.grid[2], a.size[2])},
          up_scale{float(a.size[0]) / float(a.field[0]), float(a.size[1]) / float(a.field[1]),
                   float(a.size[2]) / float(a.field[2])} {}
};

// ---- trilinear sampling with border padding (grid_sample, align_corners=True) ----

struct Loc {  // a sample: the first corner, the offsets to the others, fractions, clip slopes
    long at, ox, oy, oz;
    float tz, ty, tx, cz, cy, cx;
};

inline float clip(float x, float top, float* slope) {
    const bool in = x > 0.f;
    *slope = (in & (x < top)) ? 1.f : 0.f;
    x = in ? x : 0.f;  // NaN -> 0, as torch's clip
    return x < top ? x : top;
}

inline Loc locate(float z, float y, float x, long d, long h, long w) {
    Loc l;
    z = clip(z, float(d - 1), &l.cz), y = clip(y, float(h - 1), &l.cy);
    x = clip(x, float(w - 1), &l.cx);
    const long z0 = long(z), y0 = long(y), x0 = long(x);
    l.tz = z - float(z0), l.ty = y - float(y0), l.tx = x - float(x0);
    l.at = (z0 * h + y0) * w + x0;
    l.ox = x0 + 1 < w ? 1 : 0, l.oy = y0 + 1 < h ? w : 0, l.oz = z0 + 1 < d ? h * w : 0;
    return l;
}

struct Corners {
    float v[8];  // (z, y, x) bits: v[4 z + 2 y + x]
    Corners(const float* p, const Loc& l) {
        const long o[8] = {0, l.ox, l.oy, l.oy + l.ox, l.oz, l.oz + l.ox, l.oz + l.oy,
                           l.oz + l.oy + l.ox};
        for (int c = 0; c < 8; c++) v[c] = p[l.at + o[c]];
    }
    float value(const Loc& l) const {
        const float x0 = 1.f - l.tx, x1 = l.tx, y0 = 1.f - l.ty, y1 = l.ty;
        const float a = y0 * (x0 * v[0] + x1 * v[1]) + y1 * (x0 * v[2] + x1 * v[3]);
        const float b = y0 * (x0 * v[4] + x1 * v[5]) + y1 * (x0 * v[6] + x1 * v[7]);
        return (1.f - l.tz) * a + l.tz * b;
    }
    void slopes(const Loc& l, float* dz, float* dy, float* dx) const {
        const float x0 = 1.f - l.tx, x1 = l.tx, y0 = 1.f - l.ty, y1 = l.ty;
        const float z0 = 1.f - l.tz, z1 = l.tz;
        *dz = l.cz * (y0 * (x0 * (v[4] - v[0]) + x1 * (v[5] - v[1])) +
                      y1 * (x0 * (v[6] - v[2]) + x1 * (v[7] - v[3])));
        *dy = l.cy * (z0 * (x0 * (v[2] - v[0]) + x1 * (v[3] - v[1])) +
                      z1 * (x0 * (v[6] - v[4]) + x1 * (v[7] - v[5])));
        *dx = l.cx * (z0 * (y0 * (v[1] - v[0]) + y1 * (v[3] - v[2])) +
                      z1 * (y0 * (v[5] - v[4]) + y1 * (v[7] - v[6])));
    }
};

// g spread into p at the sample's corners (the sampling's transpose)
inline void spread(float* p, const Loc& l, float g) {
    const float x0 = 1.f - l.tx, x1 = l.tx, y0 = 1.f - l.ty, y1 = l.ty;
    const float a = g * (1.f - l.tz), b = g * l.tz;
    float* q = p + l.at;
    q[0] += a * y0 * x0, q[l.ox] += a * y0 * x1;
    q[l.oy] += a * y1 * x0, q[l.oy + l.ox] += a * y1 * x1;
    q[l.oz] += b * y0 * x0, q[l.oz + l.ox] += b * y0 * x1;
    q[l.oz + l.oy] += b * y1 * x0, q[l.oz + l.oy + l.ox] += b * y1 * x1;
}

// ---- the per-pair work buffers (shared by a team) ----

struct Work {
    long N, np;  // field voxels, control points
    std::vector<float> u, coarse, g0, g1, fold, mx, t2, t3, gp, priv, reach;
    // mutual information: the warped volume, its slopes, its gradient (C, D, H, W); per team
    // thread a histogram (bins, bins) and sums; the gradient table
    std::vector<float> val, dz, dy, dx, gm, table;
    std::vector<double> hist, stats;
    Work(const AirRefineLevel3& a, int team)
        : N(a.field[0] * a.field[1] * a.field[2]),
          np(a.grid[0] * a.grid[1] * a.grid[2]),
          u((a.squarings + 1) * 3 * N),
          coarse(a.affine ? 3 * N : 0),
          g0(3 * N),
          g1(3 * N),
          fold(a.fold_weight != 0.f ? 9 * N : 0),
          mx(3 * a.size[0] * a.size[1] * a.field[2]),
          t2(3 * a.grid[0] * a.field[1] * a.field[2]),
          t3(3 * a.field[0] * a.grid[1] * a.grid[2]),
          gp(3 * np),
          priv(team > 1 ? team * 3 * N : 0),
          reach(team) {
        if (!a.fixed_bins) return;
        const long n = a.C * a.size[0] * a.size[1] * a.size[2];
        for (auto* x : {&val, &dz, &dy, &dx, &gm}) x->resize(n);
        hist.resize(team * a.bins * a.bins);
        table.resize(a.bins * a.bins);
        stats.resize(8 * team);
    }
};

// ---- the passes of one step ----

// v (3, fd, fh, fw) = factor[k] * (S x R x C) p[k]; t2 (3, gd, fh, fw) between.
void bspline(const AirRefineLevel3& a, const Plan& plan, const float* p, const float factor[3],
             Work& w, float* v, const Team& team) {
    const Axis &S = plan.ax[0], &R = plan.ax[1], &Cx = plan.ax[2];
    const long gd = a.grid[0], gh = a.grid[1], gw = a.grid[2], fh = a.field[1], fw = a.field[2];
    std::vector<float> row(gw);
    for (long r = team.lo(gd); r < team.hi(gd); r++) {
        for (int k = 0; k < 3; k++) {
            const float* pr = p + (k * gd + r) * gh * gw;
            float* out = w.t2.data() + (k * gd + r) * fh * fw;
            for (long y = 0; y < fh; y++) {
                std::fill(row.begin(), row.end(), 0.f);
                for (long c = R.of_row[y].lo; c < R.of_row[y].hi; c++) {
                    const float wr = R.mat[y * gh + c];
                    for (long e = 0; e < gw; e++) row[e] += wr * pr[c * gw + e];
                }
                for (long x = 0; x < fw; x++) {
                    const float* cx = Cx.mat + x * gw;
                    float acc = 0.f;
                    for (long c = Cx.of_row[x].lo; c < Cx.of_row[x].hi; c++) acc += cx[c] * row[c];
                    out[y * fw + x] = acc;
                }
            }
        }
    }
    team.sync();
    const long fd = a.field[0], plane = fh * fw;
    for (long z = team.lo(fd); z < team.hi(fd); z++) {
        for (int k = 0; k < 3; k++) {
            float* out = v + (k * fd + z) * plane;
            std::fill(out, out + plane, 0.f);
            for (long r = S.of_row[z].lo; r < S.of_row[z].hi; r++) {
                const float ws = S.mat[z * gd + r];
                const float* src = w.t2.data() + (k * gd + r) * plane;
                for (long e = 0; e < plane; e++) out[e] += ws * src[e];
            }
            for (long e = 0; e < plane; e++) out[e] *= factor[k];
        }
    }
}

// The transpose: gp (3, gd, gh, gw) = factor[k] * (S x R x C)^T g[k]; t3 (3, fd, gh, gw).
void bspline_grad(const AirRefineLevel3& a, const Plan& plan, const float* g,
                  const float factor[3], Work& w, const Team& team) {
    const Axis &S = plan.ax[0], &R = plan.ax[1], &Cx = plan.ax[2];
    const long fd = a.field[0], fh = a.field[1], fw = a.field[2];
    const long gd = a.grid[0], gh = a.grid[1], gw = a.grid[2];
    std::vector<float> row(gw);
    for (long z = team.lo(fd); z < team.hi(fd); z++) {
        for (int k = 0; k < 3; k++) {
            float* out = w.t3.data() + (k * fd + z) * gh * gw;
            std::fill(out, out + gh * gw, 0.f);
            for (long y = 0; y < fh; y++) {
                const float* gi = g + ((k * fd + z) * fh + y) * fw;
                std::fill(row.begin(), row.end(), 0.f);
                for (long x = 0; x < fw; x++) {
                    const float* cx = Cx.mat + x * gw;
                    const Band cb = Cx.of_row[x];
                    for (long c = cb.lo; c < cb.hi; c++) row[c] += gi[x] * cx[c];
                }
                for (long c = R.of_row[y].lo; c < R.of_row[y].hi; c++) {
                    const float wr = R.mat[y * gh + c];
                    for (long e = 0; e < gw; e++) out[c * gw + e] += wr * row[e];
                }
            }
        }
    }
    team.sync();
    const long plane = gh * gw;
    for (long r = team.lo(gd); r < team.hi(gd); r++) {
        for (int k = 0; k < 3; k++) {
            float* out = w.gp.data() + (k * gd + r) * plane;
            std::fill(out, out + plane, 0.f);
            for (long z = S.of_col[r].lo; z < S.of_col[r].hi; z++) {
                const float ws = S.mat[z * gd + r];
                const float* src = w.t3.data() + (k * fd + z) * plane;
                for (long e = 0; e < plane; e++) out[e] += ws * src[e];
            }
            for (long e = 0; e < plane; e++) out[e] *= factor[k];
        }
    }
}

// out = u + u sampled at p + u(p), slices [z0, z1) of a (3, d, h, w) field
void square(const float* u, float* out, long d, long h, long w, long z0, long z1) {
    const long n = d * h * w;
    for (long z = z0; z < z1; z++) {
        for (long y = 0; y < h; y++) {
            for (long x = 0; x < w; x++) {
                const long p = (z * h + y) * w + x;
                const Loc l = locate(float(z) + u[p], float(y) + u[n + p], float(x) + u[2 * n + p],
                                     d, h, w);
                for (int c = 0; c < 3; c++) {
                    out[c * n + p] = u[c * n + p] + Corners(u + c * n, l).value(l);
                }
            }
        }
    }
}

// The square's transpose for slices [z0, z1): gu += the location terms, the sampled values'
// terms spread into `to` (gu itself for a lone thread).
void square_grad(const float* u, const float* g, float* gu, float* to, long d, long h, long w,
                 long z0, long z1) {
    const long n = d * h * w;
    for (long z = z0; z < z1; z++) {
        for (long y = 0; y < h; y++) {
            for (long x = 0; x < w; x++) {
                const long p = (z * h + y) * w + x;
                const Loc l = locate(float(z) + u[p], float(y) + u[n + p], float(x) + u[2 * n + p],
                                     d, h, w);
                float sz = 0.f, sy = 0.f, sx = 0.f;
                for (int c = 0; c < 3; c++) {
                    float dz, dy, dx;
                    Corners(u + c * n, l).slopes(l, &dz, &dy, &dx);
                    const float gc = g[c * n + p];
                    sz += gc * dz, sy += gc * dy, sx += gc * dx;
                }
                gu[p] += sz, gu[n + p] += sy, gu[2 * n + p] += sx;
                for (int c = 0; c < 3; c++) spread(to + c * n, l, g[c * n + p]);
            }
        }
    }
}

// The fold term's d/dJ per field voxel of slices [z0, z1): fold (9, N) = gdet * cof(J) where
// fold_margin - det J > 0, else 0 (J = I + torch.gradient of the flow).
void fold_terms(const AirRefineLevel3& a, const float* u, float* fold, long z0, long z1) {
    const long d = a.field[0], h = a.field[1], w = a.field[2], n = d * h * w;
    const float gdet = float(-double(a.fold_weight) / double(n)), eps = a.fold_margin;
    for (long z = z0; z < z1; z++) {
        long zp, zm, yp, ym, xp, xm;
        float fz, fy, fx;
        difference(z, d, &zp, &zm, &fz);
        for (long y = 0; y < h; y++) {
            difference(y, h, &yp, &ym, &fy);
            for (long x = 0; x < w; x++) {
                difference(x, w, &xp, &xm, &fx);
                const long p = (z * h + y) * w + x;
                const long plus[3] = {(zp * h + y) * w + x, (z * h + yp) * w + x,
                                      (z * h + y) * w + xp};
                const long minus[3] = {(zm * h + y) * w + x, (z * h + ym) * w + x,
                                       (z * h + y) * w + xm};
                const float f[3] = {fz, fy, fx};
                float J[3][3];
                for (int i = 0; i < 3; i++) {
                    for (int j = 0; j < 3; j++) {
                        J[i][j] = f[j] * (u[i * n + plus[j]] - u[i * n + minus[j]]);
                    }
                    J[i][i] = 1.f + J[i][i];
                }
                const float c00 = J[1][1] * J[2][2] - J[1][2] * J[2][1];
                const float c01 = J[1][0] * J[2][2] - J[1][2] * J[2][0];  // minus the cofactor
                const float c02 = J[1][0] * J[2][1] - J[1][1] * J[2][0];
                const float det = J[0][0] * c00 - J[0][1] * c01 + J[0][2] * c02;
                float* out = fold + p;
                if (!(eps - det > 0.f)) {
                    for (int e = 0; e < 9; e++) out[e * n] = 0.f;
                    continue;
                }
                const float cof[9] = {  // d det / d J[i][j] at 3 i + j
                    c00,
                    -c01,
                    c02,
                    -(J[0][1] * J[2][2] - J[0][2] * J[2][1]),
                    J[0][0] * J[2][2] - J[0][2] * J[2][0],
                    -(J[0][0] * J[2][1] - J[0][1] * J[2][0]),
                    J[0][1] * J[1][2] - J[0][2] * J[1][1],
                    -(J[0][0] * J[1][2] - J[0][2] * J[1][0]),
                    J[0][0] * J[1][1] - J[0][1] * J[1][0]};
                for (int e = 0; e < 9; e++) out[e * n] = gdet * cof[e];
            }
        }
    }
}

// The transpose of torch.gradient along an axis of n points, as a gather: what point q gets,
// sum of coef * G at `at` (at most 4 terms, G the gradient's d/d output at each point).
inline int difference_adjoint(long q, long n, long at[4], float coef[4]) {
    int k = 0;
    if (q - 1 >= 1 && q - 1 <= n - 2) at[k] = q - 1, coef[k++] = 0.5f;  // plus of q - 1
    if (q + 1 >= 1 && q + 1 <= n - 2) at[k] = q + 1, coef[k++] = -0.5f;  // minus of q + 1
    if (q == 1) at[k] = 0, coef[k++] = 1.f;  // the first point: plus 1, minus 0
    if (q == 0) at[k] = 0, coef[k++] = -1.f;
    if (q == n - 1) at[k] = n - 1, coef[k++] = 1.f;  // the last: plus n - 1, minus n - 2
    if (q == n - 2) at[k] = n - 1, coef[k++] = -1.f;
    return k;
}

// d loss / d coarse for field slices [z0, z1): the image term (mx through the row and slice
// upsampling's transposes), the diffusion and fold penalties as gathers, then the affine's
// transpose: into g (3, N).
void coarse_grad(const AirRefineLevel3& a, const Plan& plan, const Work& w, long b,
                 const float* coarse, float* g, long z0, long z1) {
    const long d = a.field[0], h = a.field[1], wd = a.field[2], n = d * h * wd;
    const long H = a.size[1];
    const Axis &Z = plan.ax[0], &Y = plan.ax[1];
    const long stride[3] = {h * wd, wd, 1}, len[3] = {d, h, wd};
    float cd[3];  // diffusion: 2 wd / (3 N_j), N_j the differences along axis j
    for (int j = 0; j < 3; j++) {
        cd[j] = float(2.0 * a.reg_weight / (3.0 * double(n / len[j]) * double(len[j] - 1)));
    }
    for (long z = z0; z < z1; z++) {
        for (long y = 0; y < h; y++) {
            for (int k = 0; k < 3; k++) {
                float* dst = g + (k * d + z) * h * wd + y * wd;
                std::fill(dst, dst + wd, 0.f);
                for (long e = Z.from[z]; e < Z.from[z + 1]; e++) {
                    for (long f = Y.from[y]; f < Y.from[y + 1]; f++) {
                        const float wt = plan.up_scale[k] * Z.take[e].second * Y.take[f].second;
                        const long row = (k * a.size[0] + Z.take[e].first) * H + Y.take[f].first;
                        const float* src = w.mx.data() + row * wd;
                        for (long x = 0; x < wd; x++) dst[x] += wt * src[x];
                    }
                }
            }
            for (long x = 0; x < wd; x++) {
                const long p = (z * h + y) * wd + x, q[3] = {z, y, x};
                for (int k = 0; k < 3; k++) {
                    const float* v = coarse + k * n;
                    float acc = 0.f;
                    if (a.reg_weight != 0.f) {
                        for (int j = 0; j < 3; j++) {
                            if (q[j] >= 1) acc += cd[j] * (v[p] - v[p - stride[j]]);
                            if (q[j] + 1 < len[j]) acc -= cd[j] * (v[p + stride[j]] - v[p]);
                        }
                    }
                    if (a.fold_weight != 0.f) {
                        for (int j = 0; j < 3; j++) {
                            long at[4];
                            float coef[4];
                            const int m = difference_adjoint(q[j], len[j], at, coef);
                            const float* G =  // the line through p along axis j
                                w.fold.data() + (3 * k + j) * n + p - q[j] * stride[j];
                            for (int t = 0; t < m; t++) acc += coef[t] * G[at[t] * stride[j]];
                        }
                    }
                    g[k * n + p] += acc;
                }
                if (a.affine) {  // coarse = ... + (I + M) u: its transpose
                    const float* M = a.matrix + b * 9;
                    const float g0 = g[p], g1 = g[n + p], g2 = g[2 * n + p];
                    g[p] = g0 + (M[0] * g0 + M[3] * g1 + M[6] * g2);
                    g[n + p] = g1 + (M[1] * g0 + M[4] * g1 + M[7] * g2);
                    g[2 * n + p] = g2 + (M[2] * g0 + M[5] * g1 + M[8] * g2);
                }
            }
        }
    }
}

// Image row (Z, Y)'s samples: the coarse flow upsampled (slices and rows, then columns,
// scaled), each voxel's sample located, into locs (W); mix (3, fw) between.
void locate_row(const AirRefineLevel3& a, const Plan& plan, const float* coarse, long Z, long Yi,
                float* mix, Loc* locs) {
    const long D = a.size[0], H = a.size[1], W = a.size[2];
    const long h = a.field[1], w = a.field[2], n = a.field[0] * h * w;
    const Tap tz = plan.ax[0].tap[Z], ty = plan.ax[1].tap[Yi];
    for (int k = 0; k < 3; k++) {  // the field's row at (Z, Y), scaled
        const float* c = coarse + k * n;
        const float *a00 = c + (tz.i0 * h + ty.i0) * w, *a01 = c + (tz.i0 * h + ty.i1) * w;
        const float *a10 = c + (tz.i1 * h + ty.i0) * w, *a11 = c + (tz.i1 * h + ty.i1) * w;
        for (long q = 0; q < w; q++) {
            mix[k * w + q] = plan.up_scale[k] * (tz.l0 * (ty.l0 * a00[q] + ty.l1 * a01[q]) +
                                                 tz.l1 * (ty.l0 * a10[q] + ty.l1 * a11[q]));
        }
    }
    for (long Xi = 0; Xi < W; Xi++) {
        const Tap tx = plan.ax[2].tap[Xi];
        float u[3];
        for (int k = 0; k < 3; k++) u[k] = tx.l0 * mix[k * w + tx.i0] + tx.l1 * mix[k * w + tx.i1];
        locs[Xi] = locate(float(Z) + u[0], float(Yi) + u[1], float(Xi) + u[2], D, H, W);
    }
}

// Row (Z, Y) of mx (3, D, H, fw): grad (3, W) through the column upsampling's transpose, as a
// gather.
void columns_adjoint(const AirRefineLevel3& a, const Plan& plan, const float* grad, float* mx,
                     long Z, long Yi) {
    const Axis& X = plan.ax[2];
    const long w = a.field[2], W = a.size[2];
    for (int k = 0; k < 3; k++) {
        float* out = mx + ((k * a.size[0] + Z) * a.size[1] + Yi) * w;
        for (long q = 0; q < w; q++) {
            float acc = 0.f;
            for (long e = X.from[q]; e < X.from[q + 1]; e++) {
                acc += X.take[e].second * grad[k * W + X.take[e].first];
            }
            out[q] = acc;
        }
    }
}

// Image slices [z0, z1): the warp through the upsampled coarse flow, MSE's gradient, back to
// the flow at each voxel, then through the column upsampling's transpose: mx (3, D, H, fw).
void image_slices(const AirRefineLevel3& a, const Plan& plan, long b, const float* coarse,
                  float* mx, long z0, long z1) {
    const long H = a.size[1], W = a.size[2], vol = a.size[0] * H * W;
    const float gcoef = float(2.0 / double(a.C * vol));  // d(b * batch mean)/d(warped), a pair
    std::vector<float> mix(3 * a.field[2]), grad(3 * W);
    std::vector<Loc> locs(W);
    for (long Z = z0; Z < z1; Z++) {
        for (long Yi = 0; Yi < H; Yi++) {
            locate_row(a, plan, coarse, Z, Yi, mix.data(), locs.data());
            std::fill(grad.begin(), grad.end(), 0.f);
            const long row = (Z * H + Yi) * W;
            for (long Xi = 0; Xi < W; Xi++) {
                const Loc& l = locs[Xi];
                for (long ch = 0; ch < a.C; ch++) {
                    const long at = (b * a.C + ch) * vol;
                    const Corners cs(a.moving + at, l);
                    float dz, dy, dx;
                    cs.slopes(l, &dz, &dy, &dx);
                    const float gv = (cs.value(l) - a.fixed[at + row + Xi]) * gcoef;
                    grad[Xi] += gv * dz, grad[W + Xi] += gv * dy, grad[2 * W + Xi] += gv * dx;
                }
            }
            columns_adjoint(a, plan, grad.data(), mx, Z, Yi);
        }
    }
}

// The image term for mutual information over the team's image slices, into mx as
// image_slices: warp, keeping the warped volume and its slopes; mi.h's gradient per voxel
// (the team's histogram and sums); back to the flow.
void mi_slices(const AirRefineLevel3& a, const Plan& plan, Work& work, long b,
               const float* coarse, const Team& team) {
    const long H = a.size[1], W = a.size[2], hw = H * W, vol = a.size[0] * hw, C = a.C;
    const long z0 = team.lo(a.size[0]), z1 = team.hi(a.size[0]);
    float *val = work.val.data(), *dz = work.dz.data(), *dy = work.dy.data();
    float *dx = work.dx.data(), *gm = work.gm.data();
    std::vector<float> mix(3 * a.field[2]), grad(3 * W);
    std::vector<Loc> locs(W);
    float lo = INFINITY, hi = -INFINITY;
    for (long Z = z0; Z < z1; Z++) {
        for (long Yi = 0; Yi < H; Yi++) {
            locate_row(a, plan, coarse, Z, Yi, mix.data(), locs.data());
            for (long ch = 0; ch < C; ch++) {
                const float* moving = a.moving + (b * C + ch) * vol;
                const long row = ch * vol + (Z * H + Yi) * W;
                for (long Xi = 0; Xi < W; Xi++) {
                    const Corners cs(moving, locs[Xi]);
                    const float x = cs.value(locs[Xi]);
                    val[row + Xi] = x;
                    lo = std::min(lo, x), hi = std::max(hi, x);
                    cs.slopes(locs[Xi], dz + row + Xi, dy + row + Xi, dx + row + Xi);
                }
            }
        }
    }
    const air::MiPair<double> pair{val, a.fixed_bins + b * C * vol, C, vol, z0 * hw, z1 * hw,
                                   a.bins, a.normalised != 0, lo, hi, work.hist.data(),
                                   work.table.data(), work.stats.data()};
    const air::MiEnds ends = air::mi_gradient(pair, team, gm);
    for (long Z = z0; Z < z1; Z++) {
        for (long Yi = 0; Yi < H; Yi++) {
            std::fill(grad.begin(), grad.end(), 0.f);
            for (long ch = 0; ch < C; ch++) {
                const long row = ch * vol + (Z * H + Yi) * W;
                for (long Xi = 0; Xi < W; Xi++) {
                    const float g = ends.grad(gm[row + Xi], val[row + Xi]);
                    grad[Xi] += g * dz[row + Xi];
                    grad[W + Xi] += g * dy[row + Xi];
                    grad[2 * W + Xi] += g * dx[row + Xi];
                }
            }
            columns_adjoint(a, plan, grad.data(), work.mx.data(), Z, Yi);
        }
    }
}

// Adam on elements [e0, e1) of one pair's control grid, step `i` of the level.
void adam(const AirRefineLevel3& a, long b, long np, const float* grad, long i, long e0, long e1) {
    const long t = a.t + i + 1;
    const double x = double(i) / double(std::max(a.steps - 1, 1L));
    const double lr = a.lr * (a.decay + (1.0 - a.decay) * 0.5 * (1.0 + std::cos(M_PI * x)));
    const float step = float(-lr / (1.0 - std::pow(0.9, double(t))));
    const float bias2 = float(std::sqrt(1.0 - std::pow(0.999, double(t))));
    const float b1 = float(1.0 - 0.9), b2 = float(0.999), c2 = float(1.0 - 0.999), eps = 1e-8f;
    const long at = b * 3 * np;
    float *p = a.param + at, *m = a.m + at, *v = a.v + at;
    for (long e = e0; e < e1; e++) {
        const float g = grad[e];
        m[e] = m[e] + b1 * (g - m[e]);  // torch's lerp_ for weights < 0.5
        v[e] = v[e] * b2 + c2 * g * g;
        p[e] = p[e] + step * m[e] / (std::sqrt(v[e]) / bias2 + eps);
    }
}

void run_pair(const AirRefineLevel3& a, const Plan& plan, Work& work, long b, const Team& team) {
    const long d = a.field[0], h = a.field[1], w = a.field[2], n = work.N, ns = a.squarings;
    const long plane = h * w, vol = 3 * n;
    const float inv = std::ldexp(1.f, -int(ns));  // 1 / 2^n, exact
    const float factor[3] = {a.scale[0] * inv, a.scale[1] * inv, a.scale[2] * inv};
    const float* param = a.param + b * 3 * work.np;
    const bool shared = team.size > 1;
    float* priv = shared ? work.priv.data() + team.id * vol : nullptr;
    float* u = work.u.data();
    const long f0 = team.lo(d), f1 = team.hi(d), fm = team.mid(d), thinnest = team.thinnest(d);
    for (long step = 0; step < a.steps; step++) {
        // forward: control grid -> velocity -> flow -> (affine) coarse flow
        bspline(a, plan, param, factor, work, u, team);
        for (long k = 1; k <= ns; k++) {
            team.sync();
            square(u + (k - 1) * vol, u + k * vol, d, h, w, f0, f1);
        }
        const float* flow = u + ns * vol;
        const float* coarse = flow;
        if (a.affine) {
            const float* aff = a.affine + b * vol;
            const float* M = a.matrix + b * 9;
            float* c = work.coarse.data();
            for (long e = f0 * plane; e < f1 * plane; e++) {
                const float u0 = flow[e], u1 = flow[n + e], u2 = flow[2 * n + e];
                c[e] = aff[e] + u0 + (M[0] * u0 + M[1] * u1 + M[2] * u2);
                c[n + e] = aff[n + e] + u1 + (M[3] * u0 + M[4] * u1 + M[5] * u2);
                c[2 * n + e] = aff[2 * n + e] + u2 + (M[6] * u0 + M[7] * u1 + M[8] * u2);
            }
            coarse = c;
        }
        team.sync();
        // backward: the image term per image slice, the fold term per field slice
        if (a.fixed_bins) {
            mi_slices(a, plan, work, b, coarse, team);
        } else {
            image_slices(a, plan, b, coarse, work.mx.data(), team.lo(a.size[0]),
                         team.hi(a.size[0]));
        }
        if (a.fold_weight != 0.f) fold_terms(a, coarse, work.fold.data(), f0, f1);
        team.sync();
        float* g = work.g0.data();
        coarse_grad(a, plan, work, b, coarse, g, f0, f1);
        for (long k = ns; k >= 1; k--) {  // the squarings' transposes
            float* gu = g == work.g0.data() ? work.g1.data() : work.g0.data();
            team.sync();
            if (shared) {
                for (int c = 0; c < 3; c++) {
                    const long e0 = c * n + f0 * plane, e1 = c * n + f1 * plane;
                    std::copy(g + e0, g + e1, gu + e0);
                }
                const float* uk = u + (k - 1) * vol;  // its first component moves slices
                if (air::halves_apart(team, uk + f0 * plane, (f1 - f0) * plane,
                                      work.reach.data(), thinnest)) {  // straight into gu
                    square_grad(uk, g, gu, gu, d, h, w, f0, fm);
                    team.sync();
                    square_grad(uk, g, gu, gu, d, h, w, fm, f1);
                    g = gu;
                    continue;
                }
                std::fill(priv, priv + vol, 0.f);
                square_grad(uk, g, gu, priv, d, h, w, f0, f1);
                team.sync();
                for (int c = 0; c < 3; c++) {
                    for (long e = c * n + f0 * plane; e < c * n + f1 * plane; e++) {
                        float acc = gu[e];
                        for (int t = 0; t < team.size; t++) acc += work.priv[t * vol + e];
                        gu[e] = acc;
                    }
                }
            } else {
                std::copy(g, g + vol, gu);
                square_grad(u + (k - 1) * vol, g, gu, gu, d, h, w, 0, d);
            }
            g = gu;
        }
        team.sync();
        bspline_grad(a, plan, g, factor, work, team);
        const long gd = a.grid[0], gplane = a.grid[1] * a.grid[2];
        for (int k = 0; k < 3; k++) {  // the team's control slices of each component
            const long base = k * work.np;
            adam(a, b, work.np, work.gp.data(), step, base + team.lo(gd) * gplane,
                 base + team.hi(gd) * gplane);
        }
        team.sync();
    }
}

}  // namespace

extern "C" void air_refine_level3d(const AirRefineLevel3* a, int team, int threads, int t0,
                                   int t1) {
#ifndef _OPENMP
    team = 1;
#endif
    const Plan plan(*a);
    if (team > 1) {  // the pairs one after the other, each pair's slices over the team
        Work work(*a, team);
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
        {
            const Team tm{omp_get_thread_num(), omp_get_num_threads()};
            for (long b = 0; b < a->B; b++) run_pair(*a, plan, work, b, tm);
        }
#endif
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        Work work(*a, 1);
        for (long b = share(a->B, t, threads); b < share(a->B, t + 1, threads); b++) {
            run_pair(*a, plan, work, b, Team{0, 1});
        }
    }
}
