// C++ twins of the fused FCN ops (the spec is kernels/reference.py).
//
// All tensors are contiguous fp32 NCHW (labels: uint8 or int32 NHW; switches:
// uint8; indices: int64). The Python wrapper (kernels/cpu/__init__.py)
// validates shapes and dtypes and converts; nothing here allocates an output.
#pragma once

#include <cstdint>
#include <vector>

namespace fastfcn {

using i64 = std::int64_t;

enum Kind : int { KIND_BILINEAR = 0, KIND_DEPTHWISE = 1, KIND_DENSE = 2 };
enum Output : int { OUT_LOGITS = 0, OUT_LABELS_U8 = 1, OUT_LABELS_I32 = 2, OUT_PROBS = 3 };

// One upsampling weight as the kernels read it.
//   bilinear:  w = the 1-D filter (k,), separable taps f[ky] * f[kx]
//   depthwise: w = the per-class filters (C, k, k)
//   dense:     w = the full conv_transpose2d weight (C_in, C_out, k, k)
struct Upsampler {
    int kind;
    const float* w;
    i64 k;
    i64 stride;
};

// A scaled skip added to the full (uncropped) transposed-conv output.
struct Skip {
    const float* data;  // (N, C, Hs, Ws) or nullptr
    i64 hs, ws;
    i64 offset;
    float scale;
};

// conv_transpose2d(x, up) restricted to rows [y0, y0 + H) and columns [x0, x0 + W)
// of the full output, plus the optional skip, written as `output` into `out`:
// logits/probs (N, C, H, W) fp32, labels (N, H, W).
void upsample_region(const float* x, i64 n, i64 c, i64 h, i64 w, const Upsampler& up, const Skip& skip,
                     i64 y0, i64 x0, i64 H, i64 W, int output, void* out, int threads);

// Max pooling (no padding) with torch's window rules; switches[i] = dy * kernel + dx.
void max_pool2d_switches(const float* x, i64 planes, i64 H, i64 W, i64 kernel, i64 stride, i64 h, i64 w,
                         float* values, std::uint8_t* switches, int threads);

// Gather unpooling: returns the number of windows whose index/switch does not point
// inside that window (0 on success; the output is then exactly max_unpool2d's).
i64 max_unpool2d_gather(const float* x, const void* indices, bool compact, i64 planes, i64 h, i64 w,
                        i64 H, i64 W, i64 kernel, i64 stride, bool relu, float* out, int threads);

// Channels-last twins (x, values, switches, out all (N, rows, cols, C) in memory), so the
// convolutions around them keep oneDNN's preferred layout: the loops run over C innermost
// (contiguous, vectorised), each window's switch is still dy * kernel + dx per channel.
void max_pool2d_switches_nhwc(const float* x, i64 n, i64 c, i64 H, i64 W, i64 kernel, i64 stride, i64 h,
                              i64 w, float* values, std::uint8_t* switches, int threads);

// Max pooling (no padding, torch's window rules) without switches, channels last, on fp32 or
// bf16 (stored as uint16; compared as floats, the winner's bits copied, so the result is exact).
// The greater value or a NaN wins, as in max_pool2d. torch's CPU max_pool2d always computes
// int64 indices as well: at bf16 those are 4x the bytes of the values it writes.
void max_pool2d_nhwc(const void* x, bool bf16, i64 n, i64 c, i64 H, i64 W, i64 kernel, i64 stride, i64 h,
                     i64 w, void* out, int threads);

// Gather unpooling from compact switches, channels last; returns the number of switches that
// do not name a pixel of their own window inside the H x W output (as max_unpool2d_gather).
i64 max_unpool2d_gather_nhwc(const float* x, const std::uint8_t* switches, i64 n, i64 c, i64 h, i64 w,
                             i64 H, i64 W, i64 kernel, i64 stride, bool relu, float* out, int threads);

}  // namespace fastfcn
