// Interpolation helpers shared by warp.cpp and refine_loop.cpp (one definition, inline).
#pragma once

#include <cmath>

namespace air {

struct Tap {  // 1-D linear interpolation: value = l0 * v[i0] + l1 * v[i1]
    long i0, i1;
    float l0, l1;
};

// torch's upsample_bilinear2d source index (align_corners=False, sizes given, not scales).
inline Tap upsample_tap(long dst, long n_in, long n_out) {
    const float scale = float(n_in) / float(n_out);
    float src = scale * (float(dst) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    long i0 = long(std::floor(src));
    if (i0 > n_in - 1) i0 = n_in - 1;
    float l1 = src - float(i0);
    l1 = l1 < 0.f ? 0.f : (l1 > 1.f ? 1.f : l1);
    return {i0, i0 + (i0 < n_in - 1 ? 1 : 0), 1.f - l1, l1};
}

// torch.gradient's neighbours and factor at index i of n (one-sided at the ends).
inline void difference(long i, long n, long* plus, long* minus, float* factor) {
    if (i == 0) {
        *plus = 1, *minus = 0, *factor = 1.f;
    } else if (i == n - 1) {
        *plus = n - 1, *minus = n - 2, *factor = 1.f;
    } else {
        *plus = i + 1, *minus = i - 1, *factor = 0.5f;
    }
}

}  // namespace air
