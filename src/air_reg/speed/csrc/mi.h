// Mutual information's image term for the fused level loops (refine_loop.cpp, refine_loop3d.cpp):
// losses.MutualInformation() over all samples, the box window on the fixed image, its gradient
// as losses._ParzenMI's, the min/max mapping's terms too. One definition, inline.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

namespace air {

// Bin coordinate t = 1 + (x - lo) / span * (bins - 3), as _bin_coordinates; its window's first
// bin minus one (floor(t) clamped to [1, bins - 3]) and fraction.
inline float mi_fraction(float x, float lo, float span, float c, long nb, long* base) {
    const float t = 1.f + (x - lo) / span * c;
    const float f = std::min(std::max(std::floor(t), 1.f), float(nb - 3));
    *base = long(f);
    return t - f;
}

// The joint histogram's gradient table (bins, bins): d value / d joint, up to a constant per
// pair, from `parts` histograms summed (a team's), as _ParzenMI.forward; n samples in all.
template <typename Acc>
void mi_table(const Acc* hist, int parts, long nb, long n, bool normalised, float* table) {
    const long nn = nb * nb;
    std::vector<float> joint(nn), pf(nb, 0.f), pm(nb, 0.f);
    for (long e = 0; e < nn; e++) {
        Acc acc = hist[e];
        for (int t = 1; t < parts; t++) acc += hist[t * nn + e];
        joint[e] = float(acc) / float(n);
    }
    for (long f = 0; f < nb; f++) {
        for (long m = 0; m < nb; m++) pf[f] += joint[f * nb + m], pm[m] += joint[f * nb + m];
    }
    auto xlogx = [](float p) { return p > 0.f ? double(p) * std::log(double(p)) : 0.0; };
    double hf = 0.0, hm = 0.0, hfm = 0.0;
    for (long k = 0; k < nb; k++) hf -= xlogx(pf[k]), hm -= xlogx(pm[k]);
    for (long e = 0; e < nn; e++) hfm -= xlogx(joint[e]);
    const float sum = float(hf) + float(hm), joint_h = float(hfm), denom = joint_h * joint_h;
    for (long f = 0; f < nb; f++) {
        for (long m = 0; m < nb; m++) {
            const float lj = std::log(std::max(joint[f * nb + m], 1e-30f));
            const float lm = std::log(std::max(pm[m], 1e-30f));
            table[f * nb + m] = normalised ? (lj * sum - lm * joint_h) / denom : lj - lm;
        }
    }
}

// One pair's samples: `val` (C, stride) the warped image, `fb` (C, stride) the fixed image's
// bins; a team thread owns [p0, p1) of each channel, whose min and max it found (lo, hi).
// `hist` (team, bins, bins), `table` (bins, bins) and `stats` (team, 8) are the team's.
template <typename Acc>
struct MiPair {
    const float* val;
    const int* fb;
    long C, stride, p0, p1, bins;
    bool normalised;
    float lo, hi;
    Acc* hist;
    float* table;
    double* stats;
};

struct MiEnds {  // the pair's min and max, and what a sample equal to them adds
    float lo, hi, g_lo, g_hi;
    float grad(float g, float x) const {  // a sample's gradient from its gm
        return g + (x == lo ? g_lo : 0.f) + (x == hi ? g_hi : 0.f);
    }
};

// d(-value)/d(warped) of the thread's samples into gm (C, stride), at a fixed min and max:
// the team's min and max of the warped image (from the threads' lo, hi); the joint histogram
// (the moving sample through a cubic B-spline window, 4 bins a sample; Acc the accumulator);
// the gradient table; each sample's gradient through its bin coordinate. Returns the min's
// and max's share of the coordinates' gradient (split between ties, as amin/amax): a
// sample's gradient is ends.grad(gm[p], val[p]). `Team` has id, size and sync() (a barrier).
template <typename Team, typename Acc>
MiEnds mi_gradient(const MiPair<Acc>& s, const Team& team, float* gm) {
    const long nb = s.bins, nn = nb * nb, n = s.C * s.stride;
    double* mine = s.stats + 8 * team.id;  // min, max, S1, S2, #min, #max
    float lo = s.lo, hi = s.hi;
    mine[0] = lo, mine[1] = hi;
    team.sync();
    for (int t = 0; t < team.size; t++) {
        lo = std::min(lo, float(s.stats[8 * t]));
        hi = std::max(hi, float(s.stats[8 * t + 1]));
    }
    const float range = hi - lo, span = std::max(range, 1e-12f), c = float(nb - 3);
    Acc* hist = s.hist + team.id * nn;
    std::fill(hist, hist + nn, Acc(0));
    for (long ch = 0; ch < s.C; ch++) {  // in _ParzenMI's order (one thread: the same sums)
        for (long p = ch * s.stride + s.p0; p < ch * s.stride + s.p1; p++) {
            long base;
            const float f = mi_fraction(s.val[p], lo, span, c, nb, &base);
            const float f2 = f * f, f3 = f * f * f, r = 1.f - f;
            Acc* to = hist + s.fb[p] * nb + base - 1;
            to[0] += r * r * r / 6.f;
            to[1] += (3.f * f3 - 6.f * f2 + 4.f) / 6.f;
            to[2] += (-3.f * f3 + 3.f * f2 + 3.f * f + 1.f) / 6.f;
            to[3] += f3 / 6.f;
        }
    }
    team.sync();
    if (team.id == 0) mi_table(s.hist, team.size, nb, n, s.normalised, s.table);
    team.sync();
    double s1 = 0.0, s2 = 0.0, at_lo = 0.0, at_hi = 0.0;
    for (long ch = 0; ch < s.C; ch++) {
        for (long p = ch * s.stride + s.p0; p < ch * s.stride + s.p1; p++) {
            long base;
            const float x = s.val[p], f = mi_fraction(x, lo, span, c, nb, &base);
            const float f2 = f * f, r = 1.f - f;
            const float* tb = s.table + s.fb[p] * nb + base - 1;
            const float g = tb[0] * (-r * r / 2.f) + tb[1] * ((3.f * f2 - 4.f * f) / 2.f) +
                            tb[2] * ((-3.f * f2 + 2.f * f + 1.f) / 2.f) + tb[3] * (f2 / 2.f);
            const float grad = -(g / float(n) * c) / span;  // d(-value)/d(x) at fixed lo, hi
            gm[p] = grad;
            s1 += grad;
            s2 += double(grad) * double((x - lo) / span);
            at_lo += x == lo, at_hi += x == hi;
        }
    }
    mine[2] = s1, mine[3] = s2, mine[4] = at_lo, mine[5] = at_hi;
    team.sync();
    s1 = s2 = at_lo = at_hi = 0.0;
    for (int t = 0; t < team.size; t++) {
        const double* st = s.stats + 8 * t;
        s1 += st[2], s2 += st[3], at_lo += st[4], at_hi += st[5];
    }
    const double d_span = range >= 1e-12f ? -s2 : 0.0;  // clamp_min passes no gradient below
    return {lo, hi, float(-s1 - d_span) / float(at_lo), float(d_span) / float(at_hi)};
}

}  // namespace air
