// A team of OpenMP threads sharing one pair's rows (refine_loop.cpp) or slices
// (refine_loop3d.cpp): each thread's share, a barrier, and when the threads may scatter
// straight into one shared array.
#pragma once

#include <algorithm>
#include <cmath>

namespace air {

inline long share(long n, int t, int threads) { return n * t / threads; }

struct Team {
    int id, size;
    long lo(long n) const { return share(n, id, size); }
    long hi(long n) const { return share(n, id + 1, size); }
    long mid(long n) const { return lo(n) + (hi(n) - lo(n)) / 2; }  // this thread's two halves
    long thinnest(long n) const {  // the fewest rows in any thread's half
        long rows = n;
        for (int t = 0; t < size; t++) {
            rows = std::min(rows, (share(n, t + 1, size) - share(n, t, size)) / 2);
        }
        return rows;
    }
    void sync() const {
#ifdef _OPENMP
        if (size > 1) {
#pragma omp barrier
        }
#endif
    }
};

// The largest |x| of n values (infinite if one is NaN): how many rows (slices) beyond its own
// a bilinear (trilinear) scatter at row displacements x reaches, less one.
inline float largest_reach(const float* x, long n) {
    float most = 0.f;
    for (long e = 0; e < n; e++) {
        const float d = std::fabs(x[e]);
        most = d <= most ? most : (d == d ? d : INFINITY);
    }
    return most;
}

// Whether the threads may scatter from the first halves of their rows at once, then from the
// second ones, straight into a shared array: a scatter at displacements of at most D rows
// lands in rows [i - D, i + D + 1], so two halves with a half of 2 D + 1 rows between them
// never meet. Each thread gives the row displacements of its own rows (`mine`, n values);
// `slots` holds a float a thread; `thinnest` is Team::thinnest of the rows. A barrier; the
// same answer in every thread.
inline bool halves_apart(const Team& team, const float* mine, long n, float* slots,
                         long thinnest) {
    slots[team.id] = largest_reach(mine, n);
    team.sync();
    float reach = 0.f;
    for (int t = 0; t < team.size; t++) reach = std::max(reach, slots[t]);
    return 2.f * std::ceil(reach) + 1.f <= float(thinnest);
}

}  // namespace air
