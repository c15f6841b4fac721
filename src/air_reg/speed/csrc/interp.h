// Interpolation helpers shared by warp.cpp, refine_loop.cpp and affine_loop.cpp (one
// definition, inline).
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

// Bilinear sampling of one (H, W) plane as grid_sample's (bilinear, border padding,
// align_corners=True): warp.cpp's per-sample form.

// grid_sample's border clipping: the clipped coordinate and d(clipped)/d(coordinate).
inline float clip(float x, long n, float* grad) {
    const float hi = float(n - 1);
    if (!(x > 0.f)) {  // also NaN -> 0, as torch's clip does
        *grad = 0.f;
        return 0.f;
    }
    if (x >= hi) {
        *grad = 0.f;
        return hi;
    }
    *grad = 1.f;
    return x;
}

struct Sample {  // bilinear sampling at (y, x) of an (H, W) plane: corner, weights, offsets
    long at;         // index of the top-left corner (y0 * W + x0)
    long right, down;  // offsets to the right and lower neighbours (0 on the last column/row,
                       // where that neighbour's weight is 0: torch reads 0 there, same result)
    float ty, tx, gy, gx;  // fractions, and the clip gradients
};

inline Sample locate(float y, float x, long h, long w) {
    Sample s;
    y = clip(y, h, &s.gy);
    x = clip(x, w, &s.gx);
    const long y0 = long(y), x0 = long(x);  // y, x >= 0: truncation is floor
    s.ty = y - float(y0);
    s.tx = x - float(x0);
    s.at = y0 * w + x0;
    s.right = x0 + 1 < w ? 1 : 0;
    s.down = y0 + 1 < h ? w : 0;
    return s;
}

struct Corners {
    float v00, v01, v10, v11;
};

inline Corners corners(const float* plane, long /*w*/, const Sample& s) {
    const float* p = plane + s.at;
    return {p[0], p[s.right], p[s.down], p[s.down + s.right]};
}

inline float value(const Corners& c, const Sample& s) {
    return (1.f - s.ty) * ((1.f - s.tx) * c.v00 + s.tx * c.v01) +
           s.ty * ((1.f - s.tx) * c.v10 + s.tx * c.v11);
}

// d(value)/d(y) and d(value)/d(x) before clipping (the clip gradients included).
inline void slope(const Corners& c, const Sample& s, float* dy, float* dx) {
    *dy = s.gy * ((1.f - s.tx) * (c.v10 - c.v00) + s.tx * (c.v11 - c.v01));
    *dx = s.gx * ((1.f - s.ty) * (c.v01 - c.v00) + s.ty * (c.v11 - c.v10));
}

// Adds g times the sampling weights into an (H, W) plane (the transpose of value()).
inline void spread(float* plane, long /*w*/, const Sample& s, float g) {
    float* p = plane + s.at;
    p[0] += g * (1.f - s.ty) * (1.f - s.tx);
    p[s.right] += g * (1.f - s.ty) * s.tx;
    p[s.down] += g * s.ty * (1.f - s.tx);
    p[s.down + s.right] += g * s.ty * s.tx;
}

}  // namespace air
