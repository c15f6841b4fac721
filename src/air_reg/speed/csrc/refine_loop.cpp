// One pyramid level of air_reg.refine's Adam loop in one call (issue #31), CPU float32.
//
// refine's objective per pair, at a level of (H, W) pixels with the field on an (fh, fw) grid:
//   v      = scale * (rows @ param @ cols^T) / 2^n      (B-spline control grid -> field grid)
//   u      = n squarings of v, each u + u sampled at p + u(p)          (scaling and squaring)
//   coarse = affine + u + (A - I) u                      (after_affine; without one: u)
//   loss   = MSE(warp(moving, up(coarse)), fixed) + wd Diffusion(coarse) + wf NegJac(coarse)
// (or, given the fixed image's bins, -MutualInformation()(warped, fixed) for MSE: mi.h's
// histogram pass, entropies and analytic gradient as losses._ParzenMI's, min/max terms too)
// and its gradient, written out (no autograd), then torch.optim.Adam's update with refine's
// cosine-decayed step: _optimise in air_reg/refine/optimise.py, step for step. The formulas
// are warp.cpp's, per element (its taps mirrored, its per-pixel sampling rewritten as row
// passes over structures of arrays, which vectorise): only the order of some sums differs
// from the per-op path.
//
// Threads: pairs are independent, so pairs split over threads (each owns whole pairs), or,
// with `team` > 1 (OpenMP only; B == 1), the threads share one pair's rows, meeting at a
// barrier between passes. The scatters (the squarings' and penalties' transposes) then run in
// two phases straight into the shared field: each thread's rows cut in two halves, the first
// halves at once, then the second ones, which is safe while no scatter reaches further than
// a half's rows (checked per squaring; else a buffer per thread, summed by rows afterwards).
// The buffers alone made a team's level 1.1-1.3x slower on 2 cores (2026-12-07): each thread
// zeroes and fills a whole field that the other threads then read from its core's cache.

#include <algorithm>
#include <cmath>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

struct AirRefineLevel {  // mirrored by air_reg.speed.refine_loop._Level
    float* param;              // (B, 2, gh, gw) control grid, updated in place
    float* m;                  // (B, 2, gh, gw) Adam's first moment, updated
    float* v;                  // (B, 2, gh, gw) Adam's second moment, updated
    const float* fixed;        // (B, C, H, W) at this level
    const float* moving;       // (B, C, H, W)
    const float* rows;         // (fh, gh) control rows -> field rows
    const float* cols;         // (fw, gw)
    const float* affine;       // (B, 2, fh, fw) affine displacement, or null
    const float* matrix;       // (B, 2, 2) A - I, or null
    long B, C, H, W, fh, fw, gh, gw;
    long squarings, steps, t;  // t: Adam steps taken before this level
    double lr, decay;          // step lr * (decay + (1 - decay) (1 + cos(pi i / (steps - 1))) / 2)
    float scale_y, scale_x;    // field grid / image size, per axis
    float reg_weight, fold_weight, fold_margin;
    const int* fixed_bins;     // (B, C * H * W) the fixed image's box-window bins, or null: MSE
    long bins, normalised;     // MutualInformation's bins and normalised
};

#include "interp.h"
#include "mi.h"
#include "team.h"

namespace {

using air::Tap;
using air::difference;
using air::upsample_tap;  // interp.h: shared with warp.cpp
using air::share;
using air::Team;  // team.h: shared with refine_loop3d.cpp

// ---- the level's plan: what every step reads ----

struct Band {  // [lo, hi): the nonzero entries of one row or column of a banded matrix
    long lo, hi;
};

// The band of each row (by_rows) or each column of an (n, k) matrix.
std::vector<Band> bands(const float* a, long n, long k, bool by_rows) {
    const long outer = by_rows ? n : k, inner = by_rows ? k : n;
    std::vector<Band> out(outer);
    for (long o = 0; o < outer; o++) {
        long lo = inner, hi = 0;
        for (long q = 0; q < inner; q++) {
            if ((by_rows ? a[o * k + q] : a[q * k + o]) != 0.f) {
                lo = std::min(lo, q);
                hi = q + 1;
            }
        }
        out[o] = lo < hi ? Band{lo, hi} : Band{0, 0};
    }
    return out;
}

struct Plan {
    std::vector<Band> rows_of_row, cols_of_row, rows_of_col;  // B-spline bands
    // cols as 4 taps a field column (cubic B-splines: every band fits), zero-padded: the
    // column pass in fixed-length loops; col4 false when some band is wider or gw < 4
    bool col4;
    std::vector<int> col4_lo;
    std::vector<float> col4_w;
    std::vector<int> col_i0, col_i1;   // image column j <- field columns (warp's upsampling)
    std::vector<float> col_l0, col_l1;
    std::vector<long> from;            // field row q gathers image rows take[from[q]:from[q+1]]
    std::vector<std::pair<long, float>> take;  // (image row, weight)
    std::vector<int> col_from, col_take;  // the same for field column q and image columns
    std::vector<float> col_weight;
    float up_scale[2];                 // the upsampling's displacement scale

    explicit Plan(const AirRefineLevel& a)
        : rows_of_row(bands(a.rows, a.fh, a.gh, true)),
          cols_of_row(bands(a.cols, a.fw, a.gw, true)),
          rows_of_col(bands(a.rows, a.fh, a.gh, false)),
          col4(a.gw >= 4),
          col4_lo(a.fw),
          col4_w(4 * a.fw, 0.f),
          col_i0(a.W),
          col_i1(a.W),
          col_l0(a.W),
          col_l1(a.W),
          from(a.fh + 1, 0),
          col_from(a.fw + 1, 0),
          up_scale{float(a.H) / float(a.fh), float(a.W) / float(a.fw)} {
        for (long j = 0; j < a.W; j++) {
            const Tap c = upsample_tap(j, a.fw, a.W);
            col_i0[j] = int(c.i0), col_i1[j] = int(c.i1), col_l0[j] = c.l0, col_l1[j] = c.l1;
        }
        std::vector<std::vector<std::pair<long, float>>> by(a.fh);
        for (long j = 0; j < a.fw && col4; j++) {  // zeros before or after a band add nothing
            const Band b = cols_of_row[j];
            col4 = b.hi - b.lo <= 4;
            const long lo = std::max(0L, std::min(b.lo, a.gw - 4));
            col4_lo[j] = int(lo);
            for (long c = b.lo; c < b.hi && col4; c++) {
                col4_w[4 * j + (c - lo)] = a.cols[j * a.gw + c];
            }
        }
        for (long i = 0; i < a.H; i++) {  // the transpose of the row upsampling, as a gather
            const Tap r = upsample_tap(i, a.fh, a.H);
            by[r.i0].push_back({i, r.l0});
            by[r.i1].push_back({i, r.l1});
        }
        for (long q = 0; q < a.fh; q++) {
            take.insert(take.end(), by[q].begin(), by[q].end());
            from[q + 1] = long(take.size());
        }
        std::vector<std::vector<std::pair<long, float>>> by_col(a.fw);
        for (long j = 0; j < a.W; j++) {  // in the order the scatter adds them: same floats
            by_col[col_i0[j]].push_back({j, col_l0[j]});
            by_col[col_i1[j]].push_back({j, col_l1[j]});
        }
        for (long q = 0; q < a.fw; q++) {
            for (const auto& [j, l] : by_col[q]) {
                col_take.push_back(int(j));
                col_weight.push_back(l);
            }
            col_from[q + 1] = int(col_take.size());
        }
    }
};

struct Work {  // one pair's fields (shared by a team)
    std::vector<float> u, coarse, g0, g1, mx, tmp, priv, reach;
    // mutual information: the warped image, its slopes, its gradient (C, H, W); a histogram
    // per team thread and the gradient table (bins, bins); per thread min, max and sums
    std::vector<float> val, dy, dx, gm, hist, table;
    std::vector<double> stats;
    Work(const AirRefineLevel& a, int team)
        : u((a.squarings + 1) * 2 * a.fh * a.fw),
          coarse(a.affine ? 2 * a.fh * a.fw : 0),
          g0(2 * a.fh * a.fw),
          g1(2 * a.fh * a.fw),
          mx(2 * a.H * a.fw),
          tmp(2 * a.fh * a.gw),
          priv(team > 1 ? team * 2 * a.fh * a.fw : 0),
          reach(team) {
        if (!a.fixed_bins) return;
        for (auto* x : {&val, &dy, &dx, &gm}) x->resize(a.C * a.H * a.W);
        hist.resize(team * a.bins * a.bins);
        table.resize(a.bins * a.bins);
        stats.resize(8 * team);
    }
};

struct Scratch {  // one thread's rows, as structures of arrays (so the row passes vectorise)
    std::vector<float> buf;
    std::vector<int> ibuf;
    float *mix, *row, *uy, *ux, *gy, *gx, *ty, *tx, *cy, *cx, *val, *dy, *dx;
    int *at, *right, *down;
    explicit Scratch(const AirRefineLevel& a) {
        const long n = std::max(a.W, a.fw);
        buf.resize(2 * a.fw + a.gw + 11 * n);
        ibuf.resize(3 * n);
        float* p = buf.data();
        mix = p, row = p + 2 * a.fw, p = row + a.gw;
        for (float** q : {&uy, &ux, &gy, &gx, &ty, &tx, &cy, &cx, &val, &dy, &dx}) {
            *q = p, p += n;
        }
        at = ibuf.data(), right = at + n, down = right + n;
    }
};

// interp.h's locate() for the n samples (i + uy[j], j + ux[j]) of one row of an (h, w) plane,
// branch-free (the clip as selects) so that it vectorises: the clipped fractions ty, tx, the
// clip's gradients cy, cx, the top-left corners `at` and the offsets to the other corners.
void locate(long i, const float* __restrict uy, const float* __restrict ux, long n, long h,
            long w, float* __restrict ty, float* __restrict tx, float* __restrict cy,
            float* __restrict cx, int* __restrict at, int* __restrict right,
            int* __restrict down) {
    const float hy = float(h - 1), hx = float(w - 1), fi = float(i);
    const int ih = int(h), iw = int(w);
    for (int j = 0; j < int(n); j++) {
        float y = fi + uy[j], x = float(j) + ux[j];
        const bool y_in = y > 0.f, x_in = x > 0.f;
        cy[j] = (y_in & (y < hy)) ? 1.f : 0.f;  // the clip's gradient
        cx[j] = (x_in & (x < hx)) ? 1.f : 0.f;
        y = y_in ? y : 0.f;  // NaN -> 0, as torch's clip
        x = x_in ? x : 0.f;
        y = y < hy ? y : hy;
        x = x < hx ? x : hx;
        const int y0 = int(y), x0 = int(x);
        ty[j] = y - float(y0);
        tx[j] = x - float(x0);
        at[j] = y0 * iw + x0;
        right[j] = (x0 + 1 < iw) ? 1 : 0;
        down[j] = (y0 + 1 < ih) ? iw : 0;
    }
}

inline void locate_row(long i, const float* uy, const float* ux, long n, long h, long w,
                       const Scratch& s) {
    locate(i, uy, ux, n, h, w, s.ty, s.tx, s.cy, s.cx, s.at, s.right, s.down);
}

// A plane's four corners at one sample (the row's `at`, `right`, `down`), and interp.h's
// value() and slope() from them: the row passes below share these per-sample formulas.
struct Quad {
    float v00, v01, v10, v11;
};

inline Quad quad(const float* __restrict plane, int a, int r, int d) {
    return {plane[a], plane[a + r], plane[a + d], plane[a + d + r]};
}

inline float value(const Quad& q, float y, float x) {
    return (1.f - y) * ((1.f - x) * q.v00 + x * q.v01) + y * ((1.f - x) * q.v10 + x * q.v11);
}

inline float slope_y(const Quad& q, float x, float cy) {
    return cy * ((1.f - x) * (q.v10 - q.v00) + x * (q.v11 - q.v01));
}

inline float slope_x(const Quad& q, float y, float cx) {
    return cx * ((1.f - y) * (q.v01 - q.v00) + y * (q.v11 - q.v10));
}

// value() and slope() of a plane at the row's n samples (the image term's warp).
void sample_row(const float* __restrict plane, long n, const Scratch& s, float* __restrict val,
                float* __restrict dy, float* __restrict dx) {
    for (int j = 0; j < int(n); j++) {
        const Quad q = quad(plane, s.at[j], s.right[j], s.down[j]);
        val[j] = value(q, s.ty[j], s.tx[j]);
        dy[j] = slope_y(q, s.tx[j], s.cy[j]);
        dx[j] = slope_x(q, s.ty[j], s.cx[j]);
    }
}

// Both planes of a 2-channel field at the row's n samples, the offsets read once:
// out0 = add0 + plane0 sampled, out1 = add1 + plane1 sampled (the squaring's forward).
void sample_two(const float* __restrict p0, const float* __restrict p1, long n, const Scratch& s,
                const float* __restrict add0, const float* __restrict add1,
                float* __restrict out0, float* __restrict out1) {
    for (int j = 0; j < int(n); j++) {
        const int a = s.at[j], r = s.right[j], d = s.down[j];
        out0[j] = add0[j] + value(quad(p0, a, r, d), s.ty[j], s.tx[j]);
        out1[j] = add1[j] + value(quad(p1, a, r, d), s.ty[j], s.tx[j]);
    }
}

// The squaring's location terms for one row: gu0 += g0 d(plane0)/dy + g1 d(plane1)/dy, gu1 the
// same along x, the slopes of both planes at the row's samples from one read of the offsets.
void slopes_two(const float* __restrict p0, const float* __restrict p1, long n, const Scratch& s,
                const float* __restrict g0, const float* __restrict g1, float* __restrict gu0,
                float* __restrict gu1) {
    for (int j = 0; j < int(n); j++) {
        const int a = s.at[j], r = s.right[j], d = s.down[j];
        const Quad q0 = quad(p0, a, r, d), q1 = quad(p1, a, r, d);
        const float y = s.ty[j], x = s.tx[j];
        gu0[j] += g0[j] * slope_y(q0, x, s.cy[j]) + g1[j] * slope_y(q1, x, s.cy[j]);
        gu1[j] += g0[j] * slope_x(q0, y, s.cx[j]) + g1[j] * slope_x(q1, y, s.cx[j]);
    }
}

// interp.h's spread() of g0[j] into plane0 and g1[j] into plane1 at the row's n samples.
void spread_row(float* plane0, float* plane1, const float* g0, const float* g1, long n,
                const Scratch& s) {
    for (long j = 0; j < n; j++) {
        const float y = s.ty[j], x = s.tx[j], a = g0[j], b = g1[j];
        const long at = s.at[j], r = s.right[j], d = s.down[j];
        float *p = plane0 + at, *q = plane1 + at;
        p[0] += a * (1.f - y) * (1.f - x);
        p[r] += a * (1.f - y) * x;
        p[d] += a * y * (1.f - x);
        p[d + r] += a * y * x;
        q[0] += b * (1.f - y) * (1.f - x);
        q[r] += b * (1.f - y) * x;
        q[d] += b * y * (1.f - x);
        q[d + r] += b * y * x;
    }
}

// ---- the passes of one step, over a team's share of rows ----

// v (2, fh, fw) = factor[k] * rows @ p[k] @ cols^T
void bspline(const AirRefineLevel& a, const Plan& plan, const float* p, const float factor[2],
             float* v, float* row, const Team& team) {
    for (long i = team.lo(a.fh); i < team.hi(a.fh); i++) {
        const Band rb = plan.rows_of_row[i];
        for (int k = 0; k < 2; k++) {
            std::fill(row, row + a.gw, 0.f);
            for (long r = rb.lo; r < rb.hi; r++) {
                const float wr = a.rows[i * a.gh + r];
                const float* pr = p + (k * a.gh + r) * a.gw;
                for (long c = 0; c < a.gw; c++) row[c] += wr * pr[c];
            }
            float* out = v + (k * a.fh + i) * a.fw;
            if (plan.col4) {
                const int* lo = plan.col4_lo.data();
                const float* w4 = plan.col4_w.data();
                for (long j = 0; j < a.fw; j++) {
                    const float* r = row + lo[j];
                    const float* wj = w4 + 4 * j;
                    float acc = 0.f;
                    acc += wj[0] * r[0];
                    acc += wj[1] * r[1];
                    acc += wj[2] * r[2];
                    acc += wj[3] * r[3];
                    out[j] = acc * factor[k];
                }
                continue;
            }
            for (long j = 0; j < a.fw; j++) {
                const Band cb = plan.cols_of_row[j];
                const float* cj = a.cols + j * a.gw;
                float acc = 0.f;
                for (long c = cb.lo; c < cb.hi; c++) acc += cj[c] * row[c];
                out[j] = acc * factor[k];
            }
        }
    }
}

// The transpose: gp (2, gh, gw) = factor[k] * rows^T @ g[k] @ cols; tmp (2, fh, gw) between.
void bspline_grad(const AirRefineLevel& a, const Plan& plan, const float* g,
                  const float factor[2], float* tmp, float* gp, const Team& team) {
    for (long i = team.lo(a.fh); i < team.hi(a.fh); i++) {
        for (int k = 0; k < 2; k++) {
            float* trow = tmp + (k * a.fh + i) * a.gw;
            const float* gi = g + (k * a.fh + i) * a.fw;
            std::fill(trow, trow + a.gw, 0.f);
            if (plan.col4) {
                for (long j = 0; j < a.fw; j++) {
                    const float x = gi[j] * factor[k];
                    const float* wj = plan.col4_w.data() + 4 * j;
                    float* t = trow + plan.col4_lo[j];
                    t[0] += x * wj[0];
                    t[1] += x * wj[1];
                    t[2] += x * wj[2];
                    t[3] += x * wj[3];
                }
                continue;
            }
            for (long j = 0; j < a.fw; j++) {
                const Band cb = plan.cols_of_row[j];
                const float x = gi[j] * factor[k];
                const float* cj = a.cols + j * a.gw;
                for (long c = cb.lo; c < cb.hi; c++) trow[c] += x * cj[c];
            }
        }
    }
    team.sync();
    for (long r = team.lo(a.gh); r < team.hi(a.gh); r++) {
        const Band ib = plan.rows_of_col[r];
        for (int k = 0; k < 2; k++) {
            float* out = gp + (k * a.gh + r) * a.gw;
            std::fill(out, out + a.gw, 0.f);
            for (long i = ib.lo; i < ib.hi; i++) {
                const float wr = a.rows[i * a.gh + r];
                const float* trow = tmp + (k * a.fh + i) * a.gw;
                for (long c = 0; c < a.gw; c++) out[c] += wr * trow[c];
            }
        }
    }
}

// out = u + u sampled at p + u(p), rows [r0, r1)
void square(const float* u, float* out, long h, long w, long r0, long r1, const Scratch& s) {
    const long n = h * w;
    for (long i = r0; i < r1; i++) {
        const float *uy = u + i * w, *ux = u + n + i * w;
        locate_row(i, uy, ux, w, h, w, s);
        sample_two(u, u + n, w, s, uy, ux, out + i * w, out + n + i * w);
    }
}

// The square's transpose for rows [r0, r1): gu += the location terms, the sampled values'
// terms spread into `to` (gu itself for a lone thread).
void square_grad(const float* u, const float* g, float* gu, float* to, long h, long w, long r0,
                 long r1, const Scratch& s) {
    const long n = h * w;
    for (long i = r0; i < r1; i++) {
        locate_row(i, u + i * w, u + n + i * w, w, h, w, s);
        const float *g0 = g + i * w, *g1 = g + n + i * w;
        slopes_two(u, u + n, w, s, g0, g1, gu + i * w, gu + n + i * w);
        spread_row(to, to + n, g0, g1, w, s);
    }
}

// The diffusion and fold penalties' gradient (warp.cpp's air_flow_penalty, one pair, no
// value) for rows [r0, r1), scattered into g.
void penalty_grad(const AirRefineLevel& a, const float* u, float* g, long r0, long r1) {
    const long h = a.fh, w = a.fw, n = h * w;
    if (a.reg_weight != 0.f) {
        const float cy = float(2.0 * a.reg_weight / (2.0 * (h - 1) * w));
        const float cx = float(2.0 * a.reg_weight / (2.0 * h * (w - 1)));
        for (long k = 0; k < 2; k++) {
            const float* v = u + k * n;
            float* gk = g + k * n;
            for (long i = r0; i < r1; i++) {
                for (long j = 0; j < w; j++) {
                    const long p = i * w + j;
                    if (i + 1 < h) {
                        const float d = v[p + w] - v[p];
                        gk[p + w] += cy * d;
                        gk[p] -= cy * d;
                    }
                    if (j + 1 < w) {
                        const float d = v[p + 1] - v[p];
                        gk[p + 1] += cx * d;
                        gk[p] -= cx * d;
                    }
                }
            }
        }
    }
    if (a.fold_weight == 0.f) return;
    const float gdet = float(-double(a.fold_weight) / double(n)), eps = a.fold_margin;
    const float *v0 = u, *v1 = u + n;
    float *h0 = g, *h1 = g + n;
    for (long i = r0; i < r1; i++) {
        long ip, im;
        float fi;
        difference(i, h, &ip, &im, &fi);
        for (long j = 0; j < w; j++) {
            long jp, jm;
            float fj;
            difference(j, w, &jp, &jm, &fj);
            const long py = ip * w + j, my = im * w + j, px = i * w + jp, mx = i * w + jm;
            const float ay = fi * (v0[py] - v0[my]), dy = fi * (v1[py] - v1[my]);
            const float cx = fj * (v0[px] - v0[mx]), ex = fj * (v1[px] - v1[mx]);
            const float det = (1.f + ay) * (1.f + ex) - cx * dy;
            if (eps - det > 0.f) {
                const float ga = gdet * (1.f + ex), ge = gdet * (1.f + ay);
                const float gc = -gdet * dy, gd = -gdet * cx;
                h0[py] += fi * ga, h0[my] -= fi * ga;
                h1[py] += fi * gd, h1[my] -= fi * gd;
                h0[px] += fj * gc, h0[mx] -= fj * gc;
                h1[px] += fj * ge, h1[mx] -= fj * ge;
            }
        }
    }
}

// Image row i's displacement, the coarse flow upsampled (rows, then columns) into s.uy, s.ux,
// and its samples located.
void dense_row(const AirRefineLevel& a, const Plan& plan, const float* coarse, long i,
               const Scratch& s) {
    const long H = a.H, W = a.W, h = a.fh, w = a.fw;
    const int *ci0 = plan.col_i0.data(), *ci1 = plan.col_i1.data();
    const float *cl0 = plan.col_l0.data(), *cl1 = plan.col_l1.data();
    const Tap r = upsample_tap(i, h, H);
    for (int k = 0; k < 2; k++) {
        const float* top = coarse + (k * h + r.i0) * w;
        const float* bottom = coarse + (k * h + r.i1) * w;
        float* m = s.mix + k * w;
        const float scale = plan.up_scale[k];
        for (long q = 0; q < w; q++) m[q] = scale * (r.l0 * top[q] + r.l1 * bottom[q]);
    }
    const float *my = s.mix, *mx_ = s.mix + w;
    for (long j = 0; j < W; j++) {
        s.uy[j] = cl0[j] * my[ci0[j]] + cl1[j] * my[ci1[j]];
        s.ux[j] = cl0[j] * mx_[ci0[j]] + cl1[j] * mx_[ci1[j]];
    }
    locate_row(i, s.uy, s.ux, W, H, W, s);
}

// Row i of mx (2, H, fw): s.gy, s.gx through the column upsampling's transpose, as a gather.
void columns_adjoint(const AirRefineLevel& a, const Plan& plan, const Scratch& s, float* mx,
                     long i) {
    const long w = a.fw;
    float* oy = mx + i * w;
    float* ox = mx + (a.H + i) * w;
    for (long q = 0; q < w; q++) {
        float sy = 0.f, sx = 0.f;
        for (int e = plan.col_from[q]; e < plan.col_from[q + 1]; e++) {
            sy += plan.col_weight[e] * s.gy[plan.col_take[e]];
            sx += plan.col_weight[e] * s.gx[plan.col_take[e]];
        }
        oy[q] = sy;
        ox[q] = sx;
    }
}

// Image rows [r0, r1): the warp through the upsampled coarse flow, MSE's gradient, back to the
// flow at each image pixel, then through the column upsampling: mx (2, H, fw).
void image_rows(const AirRefineLevel& a, const Plan& plan, long b, const float* coarse,
                float* mx, const Scratch& s, long r0, long r1) {
    const long H = a.H, W = a.W;
    const float gcoef = float(2.0 / double(a.C * H * W));  // d(b * batch mean)/d(warped), a pair
    for (long i = r0; i < r1; i++) {
        dense_row(a, plan, coarse, i, s);
        std::fill(s.gy, s.gy + W, 0.f);
        std::fill(s.gx, s.gx + W, 0.f);
        for (long ch = 0; ch < a.C; ch++) {
            const long at = (b * a.C + ch) * H * W;
            sample_row(a.moving + at, W, s, s.val, s.dy, s.dx);
            const float* f = a.fixed + at + i * W;
            for (long j = 0; j < W; j++) {
                const float g = (s.val[j] - f[j]) * gcoef;
                s.gy[j] += g * s.dy[j];
                s.gx[j] += g * s.dx[j];
            }
        }
        columns_adjoint(a, plan, s, mx, i);
    }
}

// ---- mutual information (losses.MutualInformation(): all pixels, box window on the fixed) ----

// The image term for mutual information over the team's image rows, into mx as image_rows:
// warp, keeping the warped image and its slopes; mi.h's gradient per pixel (the team's
// histogram and sums, float32 as _ParzenMI's); back to the flow.
void mi_rows(const AirRefineLevel& a, const Plan& plan, Work& work, const Scratch& s, long b,
             const float* coarse, const Team& team) {
    const long H = a.H, W = a.W, C = a.C, hw = H * W;
    const long r0 = team.lo(H), r1 = team.hi(H);
    float *val = work.val.data(), *dy = work.dy.data(), *dx = work.dx.data();
    float* gm = work.gm.data();
    float lo = INFINITY, hi = -INFINITY;
    for (long i = r0; i < r1; i++) {
        dense_row(a, plan, coarse, i, s);
        for (long ch = 0; ch < C; ch++) {
            const long at = ch * hw + i * W;
            sample_row(a.moving + (b * C + ch) * hw, W, s, val + at, dy + at,
                                   dx + at);
            for (long j = 0; j < W; j++) {
                lo = std::min(lo, val[at + j]);
                hi = std::max(hi, val[at + j]);
            }
        }
    }
    const air::MiPair<float> pair{val, a.fixed_bins + b * C * hw, C, hw, r0 * W, r1 * W,
                                  a.bins, a.normalised != 0, lo, hi, work.hist.data(),
                                  work.table.data(), work.stats.data()};
    const air::MiEnds ends = air::mi_gradient(pair, team, gm);
    for (long i = r0; i < r1; i++) {
        std::fill(s.gy, s.gy + W, 0.f);
        std::fill(s.gx, s.gx + W, 0.f);
        for (long ch = 0; ch < C; ch++) {
            const long at = ch * hw + i * W;
            for (long j = 0; j < W; j++) {
                const float g = ends.grad(gm[at + j], val[at + j]);
                s.gy[j] += g * dy[at + j];
                s.gx[j] += g * dx[at + j];
            }
        }
        columns_adjoint(a, plan, s, work.mx.data(), i);
    }
}

// Adam on elements [e0, e1) of one pair's control grid, step `i` of the level.
void adam(const AirRefineLevel& a, long b, const float* grad, long i, long e0, long e1) {
    const long t = a.t + i + 1;
    const double x = double(i) / double(std::max(a.steps - 1, 1L));
    const double lr = a.lr * (a.decay + (1.0 - a.decay) * 0.5 * (1.0 + std::cos(M_PI * x)));
    const float step = float(-lr / (1.0 - std::pow(0.9, double(t))));
    const float bias2 = float(std::sqrt(1.0 - std::pow(0.999, double(t))));
    const float b1 = float(1.0 - 0.9), b2 = float(0.999), c2 = float(1.0 - 0.999), eps = 1e-8f;
    const long at = b * 2 * a.gh * a.gw;
    float *p = a.param + at, *m = a.m + at, *v = a.v + at;
    for (long e = e0; e < e1; e++) {
        const float g = grad[e];
        m[e] = m[e] + b1 * (g - m[e]);  // torch's lerp_ for weights < 0.5
        v[e] = v[e] * b2 + c2 * g * g;
        p[e] = p[e] + step * m[e] / (std::sqrt(v[e]) / bias2 + eps);
    }
}

// Sums the team's scatter buffers into dst for rows [r0, r1) of a (2, h, w) field.
void gather_priv(const float* priv, int team, float* dst, long h, long w, long r0, long r1,
                 bool add) {
    const long n = 2 * h * w;
    for (int k = 0; k < 2; k++) {
        for (long e = (k * h + r0) * w; e < (k * h + r1) * w; e++) {
            float acc = add ? dst[e] : 0.f;
            for (int t = 0; t < team; t++) acc += priv[t * n + e];
            dst[e] = acc;
        }
    }
}

void run_pair(const AirRefineLevel& a, const Plan& plan, Work& work, const Scratch& s, long b,
              const Team& team) {
    const long h = a.fh, w = a.fw, n = 2 * h * w, ns = a.squarings;
    const float inv = std::ldexp(1.f, -int(ns));  // 1 / 2^n, exact
    const float factor[2] = {a.scale_y * inv, a.scale_x * inv};
    const float* param = a.param + b * 2 * a.gh * a.gw;
    const bool shared = team.size > 1;
    float* priv = shared ? work.priv.data() + team.id * n : nullptr;
    float* u = work.u.data();
    const long f0 = team.lo(h), f1 = team.hi(h), fm = team.mid(h);
    const long thinnest = team.thinnest(h);  // the fewest rows in a thread's half
    // the penalties' scatter reaches one row beyond its rows: two phases from 2 rows a half
    const bool penalty_halves = shared && thinnest >= 2;
    std::vector<float> gp(2 * a.gh * a.gw);  // this pair's gradient (rows of the team's share)
    for (long step = 0; step < a.steps; step++) {
        if (penalty_halves) {  // this thread's rows of the gradient, before the others add
            for (int k = 0; k < 2; k++) {
                float* rows = work.g0.data() + k * h * w;
                std::fill(rows + f0 * w, rows + f1 * w, 0.f);
            }
        }
        // forward: control grid -> velocity -> flow -> (affine) coarse flow
        bspline(a, plan, param, factor, u, s.row, team);
        for (long k = 1; k <= ns; k++) {
            team.sync();
            square(u + (k - 1) * n, u + k * n, h, w, f0, f1, s);
        }
        const float* flow = u + ns * n;
        const float* coarse = flow;
        if (a.affine) {
            const float* aff = a.affine + b * n;
            const float* M = a.matrix + b * 4;
            float* c = work.coarse.data();
            for (long e = f0 * w; e < f1 * w; e++) {
                const float y = flow[e], x = flow[n / 2 + e];
                c[e] = aff[e] + y + (M[0] * y + M[1] * x);
                c[n / 2 + e] = aff[n / 2 + e] + x + (M[2] * y + M[3] * x);
            }
            coarse = c;
        }
        team.sync();
        // backward: the image term per image row, the penalties per field row
        float* g = work.g0.data();
        if (a.fixed_bins) {
            mi_rows(a, plan, work, s, b, coarse, team);
        } else {
            image_rows(a, plan, b, coarse, work.mx.data(), s, team.lo(a.H), team.hi(a.H));
        }
        if (penalty_halves) {
            penalty_grad(a, coarse, g, f0, fm);
            team.sync();
            penalty_grad(a, coarse, g, fm, f1);
        } else if (shared) {
            std::fill(priv, priv + n, 0.f);
            penalty_grad(a, coarse, priv, f0, f1);
        } else {
            std::fill(g, g + n, 0.f);
            penalty_grad(a, coarse, g, f0, f1);
        }
        team.sync();
        for (long q = f0; q < f1; q++) {  // the row upsampling's transpose, then the affine's
            if (shared && !penalty_halves) {
                gather_priv(work.priv.data(), team.size, g, h, w, q, q + 1, false);
            }
            for (int k = 0; k < 2; k++) {
                float* dst = g + (k * h + q) * w;
                for (long e = plan.from[q]; e < plan.from[q + 1]; e++) {
                    const float wt = plan.up_scale[k] * plan.take[e].second;
                    const float* src = work.mx.data() + (k * a.H + plan.take[e].first) * w;
                    for (long c = 0; c < w; c++) dst[c] += wt * src[c];
                }
            }
            if (a.affine) {
                const float* M = a.matrix + b * 4;
                for (long e = q * w; e < (q + 1) * w; e++) {
                    const float y = g[e], x = g[n / 2 + e];
                    g[e] = y + (M[0] * y + M[2] * x);
                    g[n / 2 + e] = x + (M[1] * y + M[3] * x);
                }
            }
        }
        for (long k = ns; k >= 1; k--) {  // the squarings' transposes
            float* gu = g == work.g0.data() ? work.g1.data() : work.g0.data();
            team.sync();
            if (shared) {
                const float* uk = u + (k - 1) * n;
                std::copy(g + f0 * w, g + f1 * w, gu + f0 * w);
                std::copy(g + n / 2 + f0 * w, g + n / 2 + f1 * w, gu + n / 2 + f0 * w);
                if (air::halves_apart(team, uk + f0 * w, (f1 - f0) * w, work.reach.data(),
                                      thinnest)) {
                    square_grad(uk, g, gu, gu, h, w, f0, fm, s);
                    team.sync();
                    square_grad(uk, g, gu, gu, h, w, fm, f1, s);
                } else {
                    std::fill(priv, priv + n, 0.f);
                    square_grad(uk, g, gu, priv, h, w, f0, f1, s);
                    team.sync();
                    gather_priv(work.priv.data(), team.size, gu, h, w, f0, f1, true);
                }
            } else {
                std::copy(g, g + n, gu);
                square_grad(u + (k - 1) * n, g, gu, gu, h, w, 0, h, s);
            }
            g = gu;
        }
        team.sync();
        bspline_grad(a, plan, g, factor, work.tmp.data(), gp.data(), team);
        for (int k = 0; k < 2; k++) {  // the team's control rows of both channels
            const long base = k * a.gh * a.gw;
            adam(a, b, gp.data(), step, base + team.lo(a.gh) * a.gw, base + team.hi(a.gh) * a.gw);
        }
        team.sync();
    }
}

}  // namespace

extern "C" void air_refine_level(const AirRefineLevel* a, int team, int threads, int t0, int t1) {
#ifndef _OPENMP
    team = 1;
#endif
    const Plan plan(*a);
    if (team > 1) {  // the pairs one after the other, each pair's rows over the team
        Work work(*a, team);
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
        {
            const Scratch s(*a);
            const Team tm{omp_get_thread_num(), omp_get_num_threads()};
            for (long b = 0; b < a->B; b++) run_pair(*a, plan, work, s, b, tm);
        }
#endif
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(t1 - t0) schedule(static, 1)
#endif
    for (int t = t0; t < t1; t++) {
        Work work(*a, 1);
        const Scratch s(*a);
        for (long b = share(a->B, t, threads); b < share(a->B, t + 1, threads); b++) {
            run_pair(*a, plan, work, s, b, Team{0, 1});
        }
    }
}
