// pybind11 bindings of fastfcn.kernels.cpu._ext.
//
// Tensors cross as raw addresses (tensor.data_ptr()) plus sizes, so the build
// needs pybind11 only, never torch; kernels/cpu/__init__.py owns validation,
// allocation and dtype conversion. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "fcn_ops.h"

namespace py = pybind11;
using fastfcn::i64;

namespace {

template <typename T>
T* ptr(std::uintptr_t a) {
    return reinterpret_cast<T*>(a);
}

void upsample_region(std::uintptr_t x, i64 n, i64 c, i64 h, i64 w, int kind, std::uintptr_t weight, i64 k,
                     i64 stride, std::uintptr_t skip, i64 hs, i64 ws, i64 skip_offset, double scale, i64 y0,
                     i64 x0, i64 H, i64 W, int output, std::uintptr_t out, int threads) {
    const fastfcn::Upsampler up{kind, ptr<const float>(weight), k, stride};
    const fastfcn::Skip sk{ptr<const float>(skip), hs, ws, skip_offset, static_cast<float>(scale)};
    py::gil_scoped_release nogil;
    fastfcn::upsample_region(ptr<const float>(x), n, c, h, w, up, sk, y0, x0, H, W, output, ptr<void>(out),
                             threads);
}

// A whole head: len(skips) upsample+add stages, then upsample+crop to (H, W) as `output`.
// The intermediate maps are (N, C, (h-1)s+k, ...) fp32 held here (for FCN-8s at
// 500x500, C=21: 34x34 and 70x70, 0.5 MB in all, L2-resident, 1/65 of the logits
// the last stage would otherwise write); the last stage computes only the pixels kept
// and, for labels/probs, writes no intermediate float map.
void fcn_head(std::uintptr_t score, i64 n, i64 c, i64 h, i64 w, const std::vector<std::uintptr_t>& skips,
              const std::vector<i64>& skip_h, const std::vector<i64>& skip_w,
              const std::vector<std::uintptr_t>& weights, const std::vector<int>& kinds,
              const std::vector<i64>& ks, const std::vector<i64>& strides, const std::vector<i64>& offsets,
              const std::vector<double>& scales, i64 H, i64 W, int output, std::uintptr_t out, int threads) {
    const size_t ns = skips.size();
    if (weights.size() != ns + 1 || kinds.size() != ns + 1 || ks.size() != ns + 1 ||
        strides.size() != ns + 1 || offsets.size() != ns + 1 || scales.size() != ns || skip_h.size() != ns ||
        skip_w.size() != ns)
        throw std::invalid_argument("fcn_head: inconsistent stage list lengths");
    py::gil_scoped_release nogil;
    std::vector<float> bufs[2];
    const float* cur = ptr<const float>(score);
    i64 ch = h, cw = w;
    for (size_t st = 0; st < ns; ++st) {
        const i64 ho = (ch - 1) * strides[st] + ks[st], wo = (cw - 1) * strides[st] + ks[st];
        std::vector<float>& b = bufs[st % 2];
        b.resize(static_cast<size_t>(n * c * ho * wo));
        const fastfcn::Upsampler up{kinds[st], ptr<const float>(weights[st]), ks[st], strides[st]};
        const fastfcn::Skip sk{ptr<const float>(skips[st]), skip_h[st], skip_w[st], offsets[st],
                               static_cast<float>(scales[st])};
        fastfcn::upsample_region(cur, n, c, ch, cw, up, sk, 0, 0, ho, wo, fastfcn::OUT_LOGITS, b.data(), threads);
        cur = b.data();
        ch = ho;
        cw = wo;
    }
    const fastfcn::Upsampler up{kinds[ns], ptr<const float>(weights[ns]), ks[ns], strides[ns]};
    const fastfcn::Skip none{nullptr, 0, 0, 0, 0.0f};
    fastfcn::upsample_region(cur, n, c, ch, cw, up, none, offsets[ns], offsets[ns], H, W, output, ptr<void>(out),
                             threads);
}

void max_pool2d_switches(std::uintptr_t x, i64 planes, i64 H, i64 W, i64 kernel, i64 stride, i64 h, i64 w,
                         std::uintptr_t values, std::uintptr_t switches, int threads) {
    py::gil_scoped_release nogil;
    fastfcn::max_pool2d_switches(ptr<const float>(x), planes, H, W, kernel, stride, h, w, ptr<float>(values),
                                 ptr<std::uint8_t>(switches), threads);
}

i64 max_unpool2d(std::uintptr_t x, std::uintptr_t indices, bool compact, i64 planes, i64 h, i64 w, i64 H, i64 W,
                 i64 kernel, i64 stride, bool relu, std::uintptr_t out, int threads) {
    py::gil_scoped_release nogil;
    return fastfcn::max_unpool2d_gather(ptr<const float>(x), ptr<const void>(indices), compact, planes, h, w, H,
                                        W, kernel, stride, relu, ptr<float>(out), threads);
}

void max_pool2d_switches_nhwc(std::uintptr_t x, i64 n, i64 c, i64 H, i64 W, i64 kernel, i64 stride, i64 h,
                              i64 w, std::uintptr_t values, std::uintptr_t switches, int threads) {
    py::gil_scoped_release nogil;
    fastfcn::max_pool2d_switches_nhwc(ptr<const float>(x), n, c, H, W, kernel, stride, h, w, ptr<float>(values),
                                      ptr<std::uint8_t>(switches), threads);
}

void max_pool2d_nhwc(std::uintptr_t x, bool bf16, i64 n, i64 c, i64 H, i64 W, i64 kernel, i64 stride, i64 h,
                     i64 w, std::uintptr_t out, int threads) {
    py::gil_scoped_release nogil;
    fastfcn::max_pool2d_nhwc(ptr<const void>(x), bf16, n, c, H, W, kernel, stride, h, w, ptr<void>(out), threads);
}

i64 max_unpool2d_nhwc(std::uintptr_t x, std::uintptr_t switches, i64 n, i64 c, i64 h, i64 w, i64 H, i64 W,
                      i64 kernel, i64 stride, bool relu, std::uintptr_t out, int threads) {
    py::gil_scoped_release nogil;
    return fastfcn::max_unpool2d_gather_nhwc(ptr<const float>(x), ptr<const std::uint8_t>(switches), n, c, h, w,
                                             H, W, kernel, stride, relu, ptr<float>(out), threads);
}

}  // namespace

PYBIND11_MODULE(_ext, m) {
    m.doc() = "C++ twins of fastfcn's fused ops; call them through fastfcn.kernels.cpu";
    m.def("upsample_region", &upsample_region);
    m.def("fcn_head", &fcn_head);
    m.def("max_pool2d_switches", &max_pool2d_switches);
    m.def("max_unpool2d", &max_unpool2d);
    m.def("max_pool2d_switches_nhwc", &max_pool2d_switches_nhwc);
    m.def("max_unpool2d_nhwc", &max_unpool2d_nhwc);
    m.def("max_pool2d_nhwc", &max_pool2d_nhwc);
}
