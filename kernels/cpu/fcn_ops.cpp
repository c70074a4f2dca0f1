// C++ twins of the fused FCN ops. The spec is kernels/reference.py; the shapes
// and dtypes are validated by the Python wrapper (kernels/cpu/__init__.py).
//
// The transposed convolution is computed as a gather, one output row at a time:
// output row Y reads the input rows i with 0 <= Y - i*s < k (ceil(k/s) of them),
// and output column X = jb*s + r reads input columns jb - t with filter column
// r + t*s. Walking X in blocks of s keeps the filter reads contiguous, so the
// inner loop over r vectorises (s = 8 for FCN-8s' upscore8, s = 32 for FCN-32s).
// Only the requested region of the output is computed, so a crop costs only
// the pixels it keeps.
#include "fcn_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastfcn {

namespace {

// Interior blocks of hpass when k = T*S with S known at compile time: every block
// is whole and all T taps exist, so the loop over r is a fixed-width vector FMA
// (S = 8: two 4-float SSE ops per tap). FCN-8s' final stage (500x500, C=21,
// bilinear, 1 thread, 2-core EPYC): logits 6.3 -> 4.7 ms, labels 12.5 -> 4.9 ms
// (with the branch-free argmax below) against the generic block loop alone.
template <int S>
inline void hpass_interior(float* __restrict out, i64 x0, i64 jlo, i64 jhi, const float* __restrict in,
                           const float* __restrict wrow, i64 T) {
    for (i64 jb = jlo; jb <= jhi; ++jb) {
        float* o = out + (jb * S - x0);
        for (i64 t = 0; t < T; ++t) {
            const float v = in[jb - t];
            const float* wr = wrow + t * S;
            for (int r = 0; r < S; ++r) o[r] += v * wr[r];
        }
    }
}

// One block of s output columns (base = jb*s), clipped to [x0, x0 + W), any k.
inline void hpass_block(float* __restrict out, i64 x0, i64 W, i64 jb, const float* __restrict in, i64 w,
                        const float* __restrict wrow, i64 k, i64 s) {
    const i64 base = jb * s;
    const i64 rb = std::max<i64>(0, x0 - base);
    const i64 re = std::min<i64>(s, x0 + W - base);
    for (i64 t = 0; t * s < k; ++t) {
        const i64 j = jb - t;
        if (j < 0) break;
        if (j >= w) continue;
        const float v = in[j];
        const float* wr = wrow + t * s;
        const i64 rend = std::min<i64>(re, k - t * s);
        for (i64 r = rb; r < rend; ++r) out[base - x0 + r] += v * wr[r];
    }
}

template <int S>
inline void hpass_fixed(float* __restrict out, i64 x0, i64 W, const float* __restrict in, i64 w,
                        const float* __restrict wrow, i64 k) {
    const i64 T = k / S;
    const i64 jb0 = x0 / S, jb1 = (x0 + W - 1) / S;
    // interior: base >= x0, base + S <= x0 + W, jb - (T - 1) >= 0, jb < w
    const i64 lo = std::max<i64>((x0 + S - 1) / S, T - 1);
    const i64 hi = std::min<i64>((x0 + W) / S - 1, w - 1);
    if (lo > hi) {
        for (i64 jb = jb0; jb <= jb1; ++jb) hpass_block(out, x0, W, jb, in, w, wrow, k, S);
        return;
    }
    for (i64 jb = jb0; jb < lo; ++jb) hpass_block(out, x0, W, jb, in, w, wrow, k, S);
    hpass_interior<S>(out, x0, lo, hi, in, wrow, T);
    for (i64 jb = hi + 1; jb <= jb1; ++jb) hpass_block(out, x0, W, jb, in, w, wrow, k, S);
}

// out[X - x0] += sum_t in[jb - t] * wrow[r + t*s] for every X = jb*s + r in [x0, x0 + W).
// in: one input row (w,), wrow: one filter row (k,).
// No AVX2 clone: a target_clones("avx2,fma") build of this function measured the
// same as the SSE2 default (FCN-8s head, 500x500, C=21, labels, 1 thread: 5.7-6.0
// vs 5.5-5.7 ms), the time going to loads/stores rather than multiply-adds.
void hpass(float* __restrict out, i64 x0, i64 W, const float* __restrict in, i64 w,
           const float* __restrict wrow, i64 k, i64 s) {
    if (k % s == 0) {
        switch (s) {
            case 2: return hpass_fixed<2>(out, x0, W, in, w, wrow, k);
            case 4: return hpass_fixed<4>(out, x0, W, in, w, wrow, k);
            case 8: return hpass_fixed<8>(out, x0, W, in, w, wrow, k);
            case 16: return hpass_fixed<16>(out, x0, W, in, w, wrow, k);
            case 32: return hpass_fixed<32>(out, x0, W, in, w, wrow, k);
            default: break;
        }
    }
    const i64 jb0 = x0 / s, jb1 = (x0 + W - 1) / s;
    for (i64 jb = jb0; jb <= jb1; ++jb) hpass_block(out, x0, W, jb, in, w, wrow, k, s);
}

// One output row (class o, full-output row yf, columns [x0, x0 + W)) into row (W,).
// tmp: scratch of w floats.
void compute_row(const float* x, i64 c, i64 h, i64 w, const Upsampler& up, i64 ni, i64 o, i64 yf, i64 x0,
                 i64 W, float* row, float* tmp) {
    std::fill(row, row + W, 0.0f);
    const i64 s = up.stride, k = up.k;
    const i64 ihi = std::min<i64>(yf / s, h - 1);
    const i64 ilo = yf - k + 1 <= 0 ? 0 : (yf - k + 1 + s - 1) / s;
    if (ilo > ihi) return;
    const float* xn = x + ni * c * h * w;
    switch (up.kind) {
        case KIND_BILINEAR: {
            // Separable: combine the input rows with the vertical taps first (w
            // values), then one horizontal pass: 2 + 2 multiply-adds per output
            // pixel for k = 2s instead of 4.
            const float* xp = xn + o * h * w;
            {
                const float f = up.w[yf - ilo * s];
                const float* xr = xp + ilo * w;
                for (i64 j = 0; j < w; ++j) tmp[j] = f * xr[j];
            }
            for (i64 i = ilo + 1; i <= ihi; ++i) {
                const float f = up.w[yf - i * s];
                const float* xr = xp + i * w;
                for (i64 j = 0; j < w; ++j) tmp[j] += f * xr[j];
            }
            hpass(row, x0, W, tmp, w, up.w, k, s);
            break;
        }
        case KIND_DEPTHWISE: {
            const float* xp = xn + o * h * w;
            const float* wp = up.w + o * k * k;
            for (i64 i = ilo; i <= ihi; ++i) hpass(row, x0, W, xp + i * w, w, wp + (yf - i * s) * k, k, s);
            break;
        }
        default: {  // dense: every input class feeds every output class
            for (i64 ci = 0; ci < c; ++ci) {
                const float* xp = xn + ci * h * w;
                const float* wp = up.w + (ci * c + o) * k * k;
                for (i64 i = ilo; i <= ihi; ++i)
                    hpass(row, x0, W, xp + i * w, w, wp + (yf - i * s) * k, k, s);
            }
        }
    }
}

// Running argmax over classes. Strictly greater keeps the lowest index on ties;
// NaN wins over numbers and the first NaN is kept, as torch.argmax. Bitwise
// operators keep the loop branch-free so it vectorises.
inline void argmax_update(float* __restrict best, std::int32_t* __restrict lab, const float* __restrict cur,
                          i64 W, std::int32_t oc) {
    for (i64 X = 0; X < W; ++X) {
        const float v = cur[X], b = best[X];
        const bool take = (v > b) | ((v != v) & (b == b));
        best[X] = take ? v : b;
        lab[X] = take ? oc : lab[X];
    }
}

inline void add_skip(float* row, const Skip& sk, i64 c, i64 ni, i64 o, i64 yf, i64 x0, i64 W) {
    if (!sk.data) return;
    const float* sp = sk.data + ((ni * c + o) * sk.hs + yf + sk.offset) * sk.ws + sk.offset + x0;
    const float a = sk.scale;
    for (i64 X = 0; X < W; ++X) row[X] += a * sp[X];
}

}  // namespace

void upsample_region(const float* x, i64 n, i64 c, i64 h, i64 w, const Upsampler& up, const Skip& skip,
                     i64 y0, i64 x0, i64 H, i64 W, int output, void* out, int threads) {
    if (n <= 0 || H <= 0 || W <= 0) return;
    if (output == OUT_LOGITS) {
        float* o = static_cast<float*>(out);
#pragma omp parallel num_threads(threads)
        {
            std::vector<float> tmp(w);
#pragma omp for collapse(3) schedule(static)
            for (i64 ni = 0; ni < n; ++ni)
                for (i64 oc = 0; oc < c; ++oc)
                    for (i64 Y = 0; Y < H; ++Y) {
                        float* row = o + ((ni * c + oc) * H + Y) * W;
                        compute_row(x, c, h, w, up, ni, oc, y0 + Y, x0, W, row, tmp.data());
                        add_skip(row, skip, c, ni, oc, y0 + Y, x0, W);
                    }
        }
        return;
    }
    // labels and probs need every class of a pixel: parallel over (batch, row), all
    // classes of a row computed into a thread-local buffer; C float maps are never written.
    const bool probs = output == OUT_PROBS;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> tmp(w), buf((probs ? c : 2) * W), mx(probs ? W : 0), sum(probs ? W : 0);
        std::vector<std::int32_t> lab(probs ? 0 : W);
#pragma omp for collapse(2) schedule(static)
        for (i64 ni = 0; ni < n; ++ni)
            for (i64 Y = 0; Y < H; ++Y) {
                const i64 yf = y0 + Y;
                if (!probs) {
                    float* best = buf.data();
                    float* cur = buf.data() + W;
                    compute_row(x, c, h, w, up, ni, 0, yf, x0, W, best, tmp.data());
                    add_skip(best, skip, c, ni, 0, yf, x0, W);
                    std::fill(lab.begin(), lab.end(), 0);
                    for (i64 oc = 1; oc < c; ++oc) {
                        compute_row(x, c, h, w, up, ni, oc, yf, x0, W, cur, tmp.data());
                        add_skip(cur, skip, c, ni, oc, yf, x0, W);
                        argmax_update(best, lab.data(), cur, W, static_cast<std::int32_t>(oc));
                    }
                    if (output == OUT_LABELS_U8) {
                        auto* lo = static_cast<std::uint8_t*>(out) + (ni * H + Y) * W;
                        for (i64 X = 0; X < W; ++X) lo[X] = static_cast<std::uint8_t>(lab[X]);
                    } else {
                        auto* lo = static_cast<std::int32_t*>(out) + (ni * H + Y) * W;
                        std::memcpy(lo, lab.data(), W * sizeof(std::int32_t));
                    }
                } else {
                    for (i64 oc = 0; oc < c; ++oc) {
                        float* r = buf.data() + oc * W;
                        compute_row(x, c, h, w, up, ni, oc, yf, x0, W, r, tmp.data());
                        add_skip(r, skip, c, ni, oc, yf, x0, W);
                    }
                    // softmax over classes, max-subtracted like torch.softmax
                    float* m = mx.data();
                    std::copy(buf.data(), buf.data() + W, m);
                    for (i64 oc = 1; oc < c; ++oc) {
                        const float* r = buf.data() + oc * W;
                        for (i64 X = 0; X < W; ++X) m[X] = std::max(m[X], r[X]);
                    }
                    float* sm = sum.data();
                    std::fill(sm, sm + W, 0.0f);
                    for (i64 oc = 0; oc < c; ++oc) {
                        float* r = buf.data() + oc * W;
                        for (i64 X = 0; X < W; ++X) {
                            r[X] = std::exp(r[X] - m[X]);
                            sm[X] += r[X];
                        }
                    }
                    float* po = static_cast<float*>(out);
                    for (i64 oc = 0; oc < c; ++oc) {
                        const float* r = buf.data() + oc * W;
                        float* dst = po + ((ni * c + oc) * H + Y) * W;
                        for (i64 X = 0; X < W; ++X) dst[X] = r[X] / sm[X];
                    }
                }
            }
    }
}

void max_pool2d_switches(const float* x, i64 planes, i64 H, i64 W, i64 kernel, i64 stride, i64 h, i64 w,
                         float* values, std::uint8_t* switches, int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (i64 p = 0; p < planes; ++p)
        for (i64 oy = 0; oy < h; ++oy) {
            const float* xp = x + p * H * W;
            const i64 iy0 = oy * stride, iy1 = std::min(iy0 + kernel, H);
            for (i64 ox = 0; ox < w; ++ox) {
                const i64 ix0 = ox * stride, ix1 = std::min(ix0 + kernel, W);
                // torch's rule: start from -inf at the window's first position, take
                // a value if it is greater or NaN (so the first strict maximum wins,
                // and a NaN propagates).
                float best = -std::numeric_limits<float>::infinity();
                i64 sw = 0;
                for (i64 iy = iy0; iy < iy1; ++iy)
                    for (i64 ix = ix0; ix < ix1; ++ix) {
                        const float v = xp[iy * W + ix];
                        if (v > best || v != v) {
                            best = v;
                            sw = (iy - iy0) * kernel + (ix - ix0);
                        }
                    }
                values[(p * h + oy) * w + ox] = best;
                switches[(p * h + oy) * w + ox] = static_cast<std::uint8_t>(sw);
            }
        }
}

namespace {

// Number of windows in input row i whose index/switch does not name a pixel of
// its own window inside the H x W output (checked once per window, on its first row).
template <bool COMPACT>
i64 count_bad(const void* ind, i64 w, i64 i, i64 H, i64 W, i64 k, i64 s) {
    const i64 ybase = i * s;
    i64 bad = 0;
    if (COMPACT) {
        const auto* sr = static_cast<const std::uint8_t*>(ind);
        for (i64 j = 0; j < w; ++j) {
            const i64 v = sr[j], vy = v / k, vx = v % k;
            bad += (v >= k * k) | (ybase + vy >= H) | (j * s + vx >= W);
        }
    } else if (k == 2 && s == 2) {
        // branch-free form of the general check below for 2x2/2 windows
        const auto* ir = static_cast<const i64*>(ind);
        const bool row2 = ybase + 1 < H;
        for (i64 j = 0; j < w; ++j) {
            const i64 rel = ir[j] - (ybase * W + 2 * j);
            const bool col2 = 2 * j + 1 < W;
            const bool ok = (rel == 0) | ((rel == 1) & col2) | (row2 & ((rel == W) | ((rel == W + 1) & col2)));
            bad += ok ? 0 : 1;
        }
    } else {
        const auto* ir = static_cast<const i64*>(ind);
        for (i64 j = 0; j < w; ++j) {
            const i64 rel = ir[j] - (ybase * W + j * s);
            bool ok = false;
            for (i64 ddy = 0; ddy < k && ybase + ddy < H; ++ddy) {
                const i64 dx = rel - ddy * W;
                ok |= (dx >= 0) & (dx < k) & (j * s + dx < W);
            }
            bad += ok ? 0 : 1;
        }
    }
    return bad;
}

// One output row Y = i*s + dy (dy < k) of the gather. code[j] is the window's
// position on this row: dx in [0, k) when its maximum lies on this row, anything
// else otherwise. 2x2/2 (every DeconvNet unpooling) gets a branch-free loop that
// writes both columns of a window at once: 64x112 -> 224x224, 1 thread, 4.2 ms
// against 21.2 ms for the generic loop and 5.7 ms for torch's fill+scatter.
template <bool COMPACT, bool RELU>
void gather_row(float* __restrict orow, const float* __restrict xr, const void* ind, i64 w, i64 W, i64 Y,
                i64 dy, i64 k, i64 s) {
    const auto* sr = static_cast<const std::uint8_t*>(ind);
    const auto* ir = static_cast<const i64*>(ind);
    const i64 wcov = std::min<i64>(w, (W + s - 1) / s);
    i64 j = 0;
    if (k == 2 && s == 2) {
        // One 8-byte store per window: the value's bits shifted into the column of
        // its maximum, or zero when the maximum is on the other row. SSE2 has no
        // 64-bit compare, so a per-pixel select of int64 indices does not vectorise.
        const i64 jfull = std::min<i64>(w, W / 2);
        for (; j < jfull; ++j) {
            float v = xr[j];
            if (RELU) v = v < 0.0f ? 0.0f : v;
            const i64 t = COMPACT ? static_cast<i64>(sr[j]) - 2 * dy : ir[j] - Y * W - 2 * j;
            std::uint32_t bits;
            std::memcpy(&bits, &v, 4);
            // mask arithmetic, not ?:, which gcc compiled to a 50%-mispredicted branch
            // (64x112 -> 224x224, 1 thread: 10.8 -> 4.2 ms; torch fill+scatter 5.7 ms)
            const std::uint64_t mask = std::uint64_t{0} - (static_cast<std::uint64_t>(t) < 2);
            const std::uint64_t sel = bits & mask;
            const std::uint64_t word = sel << (32 * (t & 1));  // little-endian: column 2j in the low half
            std::memcpy(orow + 2 * j, &word, 8);
        }
    }
    for (; j < wcov; ++j) {
        float v = xr[j];
        if (RELU) v = v < 0.0f ? 0.0f : v;
        const i64 xb = j * s;
        const i64 t = COMPACT ? static_cast<i64>(sr[j]) - dy * k : ir[j] - Y * W - xb;
        const i64 xe = std::min<i64>(xb + s, W);
        for (i64 X = xb; X < xe; ++X) orow[X] = (X - xb == t && t < k) ? v : 0.0f;
    }
    if (wcov * s < W) std::fill(orow + wcov * s, orow + W, 0.0f);
}

template <bool COMPACT, bool RELU>
i64 unpool_impl(const float* x, const void* indices, i64 planes, i64 h, i64 w, i64 H, i64 W, i64 k, i64 s,
                float* out, int threads) {
    const std::size_t isz = COMPACT ? 1 : sizeof(i64);
    const auto* ib = static_cast<const unsigned char*>(indices);
    i64 bad = 0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) reduction(+ : bad)
    for (i64 p = 0; p < planes; ++p)
        for (i64 Y = 0; Y < H; ++Y) {
            float* orow = out + (p * H + Y) * W;
            const i64 i = Y / s, dy = Y - i * s;
            if (i >= h || dy >= k) {
                std::fill(orow, orow + W, 0.0f);
                continue;
            }
            const void* ind = ib + static_cast<std::size_t>((p * h + i) * w) * isz;
            if (dy == 0) bad += count_bad<COMPACT>(ind, w, i, H, W, k, s);
            gather_row<COMPACT, RELU>(orow, x + (p * h + i) * w, ind, w, W, Y, dy, k, s);
        }
    return bad;
}

}  // namespace

i64 max_unpool2d_gather(const float* x, const void* indices, bool compact, i64 planes, i64 h, i64 w, i64 H,
                        i64 W, i64 kernel, i64 stride, bool relu, float* out, int threads) {
    if (compact)
        return relu ? unpool_impl<true, true>(x, indices, planes, h, w, H, W, kernel, stride, out, threads)
                    : unpool_impl<true, false>(x, indices, planes, h, w, H, W, kernel, stride, out, threads);
    return relu ? unpool_impl<false, true>(x, indices, planes, h, w, H, W, kernel, stride, out, threads)
                : unpool_impl<false, false>(x, indices, planes, h, w, H, W, kernel, stride, out, threads);
}

void max_pool2d_switches_nhwc(const float* x, i64 n, i64 c, i64 H, i64 W, i64 kernel, i64 stride, i64 h,
                              i64 w, float* values, std::uint8_t* switches, int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (i64 ni = 0; ni < n; ++ni)
        for (i64 oy = 0; oy < h; ++oy) {
            const i64 iy0 = oy * stride, iy1 = std::min(iy0 + kernel, H);
            for (i64 ox = 0; ox < w; ++ox) {
                const i64 ix0 = ox * stride, ix1 = std::min(ix0 + kernel, W);
                float* __restrict best = values + ((ni * h + oy) * w + ox) * c;
                std::uint8_t* __restrict sw = switches + ((ni * h + oy) * w + ox) * c;
                std::fill(best, best + c, -std::numeric_limits<float>::infinity());
                std::fill(sw, sw + c, std::uint8_t{0});
                for (i64 iy = iy0; iy < iy1; ++iy)
                    for (i64 ix = ix0; ix < ix1; ++ix) {
                        const float* __restrict xp = x + ((ni * H + iy) * W + ix) * c;
                        const auto code = static_cast<std::uint8_t>((iy - iy0) * kernel + (ix - ix0));
                        // the NCHW kernel's rule, branch-free over channels: greater or NaN wins
                        for (i64 ch = 0; ch < c; ++ch) {
                            const float v = xp[ch], b = best[ch];
                            const bool take = (v > b) | (v != v);
                            best[ch] = take ? v : b;
                            sw[ch] = take ? code : sw[ch];
                        }
                    }
            }
        }
}

namespace {

inline float bf16_to_float(std::uint16_t b) {
    std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline float to_float(float v) { return v; }
inline float to_float(std::uint16_t b) { return bf16_to_float(b); }
inline void from_float(float v, float& o) { o = v; }
inline void from_float(float v, std::uint16_t& o) {
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    o = static_cast<std::uint16_t>(u >> 16);  // exact: v is one of the bf16 inputs, widened
}

// One output pixel's c channels, as floats in ``best`` (each loop is a plain vector pass: widen,
// compare-select, narrow), then written back in T. Greater or NaN wins, as in max_pool2d.
template <typename T>
void pool_window(const T* __restrict x, i64 c, i64 W, i64 iy0, i64 iy1, i64 ix0, i64 ix1, float* __restrict best,
                 T* __restrict o) {
    const T* __restrict first = x + (iy0 * W + ix0) * c;
    for (i64 ch = 0; ch < c; ++ch) best[ch] = to_float(first[ch]);
    for (i64 iy = iy0; iy < iy1; ++iy)
        for (i64 ix = ix0; ix < ix1; ++ix) {
            if (iy == iy0 && ix == ix0) continue;
            const T* __restrict xp = x + (iy * W + ix) * c;
            for (i64 ch = 0; ch < c; ++ch) {
                const float v = to_float(xp[ch]), b = best[ch];
                best[ch] = (v > b) | (v != v) ? v : b;
            }
        }
    for (i64 ch = 0; ch < c; ++ch) from_float(best[ch], o[ch]);
}

template <typename T>
void max_pool2d_nhwc_t(const T* x, i64 n, i64 c, i64 H, i64 W, i64 kernel, i64 stride, i64 h, i64 w, T* out,
                       int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> best(static_cast<std::size_t>(c));
#pragma omp for collapse(2) schedule(static)
        for (i64 ni = 0; ni < n; ++ni)
            for (i64 oy = 0; oy < h; ++oy) {
                const i64 iy0 = oy * stride, iy1 = std::min(iy0 + kernel, H);
                for (i64 ox = 0; ox < w; ++ox) {
                    const i64 ix0 = ox * stride, ix1 = std::min(ix0 + kernel, W);
                    pool_window(x + ni * H * W * c, c, W, iy0, iy1, ix0, ix1, best.data(),
                                out + ((ni * h + oy) * w + ox) * c);
                }
            }
    }
}

}  // namespace

void max_pool2d_nhwc(const void* x, bool bf16, i64 n, i64 c, i64 H, i64 W, i64 kernel, i64 stride, i64 h,
                     i64 w, void* out, int threads) {
    if (bf16)
        max_pool2d_nhwc_t(static_cast<const std::uint16_t*>(x), n, c, H, W, kernel, stride, h, w,
                          static_cast<std::uint16_t*>(out), threads);
    else
        max_pool2d_nhwc_t(static_cast<const float*>(x), n, c, H, W, kernel, stride, h, w, static_cast<float*>(out),
                          threads);
}

i64 max_unpool2d_gather_nhwc(const float* x, const std::uint8_t* switches, i64 n, i64 c, i64 h, i64 w,
                             i64 H, i64 W, i64 kernel, i64 stride, bool relu, float* out, int threads) {
    const i64 k2 = kernel * kernel;
    i64 bad = 0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) reduction(+ : bad)
    for (i64 ni = 0; ni < n; ++ni)
        for (i64 Y = 0; Y < H; ++Y) {
            float* orow = out + (ni * H + Y) * W * c;
            const i64 i = Y / stride, dy = Y - i * stride;
            if (i >= h || dy >= kernel) {
                std::fill(orow, orow + W * c, 0.0f);
                continue;
            }
            for (i64 X = 0; X < W; ++X) {
                float* __restrict o = orow + X * c;
                const i64 j = X / stride, dx = X - j * stride;
                if (j >= w || dx >= kernel) {
                    std::fill(o, o + c, 0.0f);
                    continue;
                }
                const i64 off = ((ni * h + i) * w + j) * c;
                const float* __restrict xr = x + off;
                const std::uint8_t* __restrict sr = switches + off;
                const auto code = static_cast<std::uint8_t>(dy * kernel + dx);
                for (i64 ch = 0; ch < c; ++ch) {
                    float v = xr[ch];
                    if (relu) v = v < 0.0f ? 0.0f : v;
                    o[ch] = sr[ch] == code ? v : 0.0f;
                }
                if (dy == 0 && dx == 0) {
                    // once per window: a switch must name a pixel of the window inside the output
                    const i64 rows = std::min(kernel, H - i * stride), cols = std::min(kernel, W - j * stride);
                    i64 b = 0;
                    for (i64 ch = 0; ch < c; ++ch) {
                        const i64 v = sr[ch];
                        b += (v >= k2) | (v / kernel >= rows) | (v % kernel >= cols);
                    }
                    bad += b;
                }
            }
        }
    return bad;
}

}  // namespace fastfcn
