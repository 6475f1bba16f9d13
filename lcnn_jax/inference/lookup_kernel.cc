// The XLA FFI handlers of the lookup kernel (lookup_kernel.h): lcnn_lookup_conv takes S from a dictionary
// matmul done by XLA; lcnn_lookup_conv_dictionary computes S first from D as stored (small maps);
// lcnn_lookup_conv_fused computes S itself while filling the space-to-depth buffer (small dictionaries);
// lcnn_max_pool pools CHWN activations (optionally with the ReLU before it); lcnn_dense_rows is a dense layer
// over a few rows with float32, bfloat16 or int8 weights. The lookups' coefficients may be float32, bfloat16
// or int8 (with a scale per output), their indices uint8, uint16 or int32.

#include <cstdint>
#include <type_traits>
#include <utility>

#include "lookup_kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// A lookup layer's `layer` attribute: its padding (top, left), its strides and its output size.
struct LayerGeometry {
  int64_t pad_h, pad_w, stride_h, stride_w, out_h, out_w;
  bool copies() const { return pad_h || pad_w || stride_h > 1 || stride_w > 1; }
};

// A `pool` attribute: the max pooling after a layer (window_h = 0: none), with the ReLU before it when `relu`;
// the window's origin at (-pad_h, -pad_w).
struct PoolWindow {
  int64_t window_h, window_w, stride_h, stride_w, pad_h, pad_w;
  bool relu;
};

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(LayerGeometry, ffi::StructMember<int64_t>("pad_h"),
                                      ffi::StructMember<int64_t>("pad_w"), ffi::StructMember<int64_t>("stride_h"),
                                      ffi::StructMember<int64_t>("stride_w"), ffi::StructMember<int64_t>("out_h"),
                                      ffi::StructMember<int64_t>("out_w"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(PoolWindow, ffi::StructMember<int64_t>("window_h"),
                                      ffi::StructMember<int64_t>("window_w"), ffi::StructMember<int64_t>("stride_h"),
                                      ffi::StructMember<int64_t>("stride_w"), ffi::StructMember<int64_t>("pad_h"),
                                      ffi::StructMember<int64_t>("pad_w"), ffi::StructMember<bool>("relu"));

namespace {

using lcnn::BF16;
using lcnn::DenseColumns;
using lcnn::DenseRows;
using lcnn::Dispatch;
using lcnn::DictionaryToDepth;
using lcnn::Geometry;
using lcnn::Lookups;
using lcnn::MaxPool;
using lcnn::PoolGeometry;
using lcnn::SpaceToDepth;
using FlatF32 = ffi::Buffer<ffi::F32, 1>;
using FlatS32 = ffi::Buffer<ffi::S32, 1>;
using ChwnF32 = ffi::Buffer<ffi::F32, 4>;  // (channels, height, width, batch), or NHWC images
using OutF32 = ChwnF32;
using MatrixF32 = ffi::Buffer<ffi::F32, 2>;

// The pooling of a `pool` attribute (window_h = 0: none) into `out`, whose rows and columns are the pooled size.
PoolGeometry MakePooling(const OutF32& out, const PoolWindow& w) {
  const auto dims = out.dimensions();
  return PoolGeometry{w.window_h, w.window_w, w.stride_h, w.stride_w, w.pad_h, w.pad_w, dims[1], dims[2], w.relu};
}

// Whether pooling p is sane for a map of h × w: a window and strides of at least 1, no negative padding, and
// every window starting inside the map.
bool PoolingFits(const PoolGeometry& p, int64_t h, int64_t w) {
  return p.wh >= 1 && p.ww >= 1 && p.sh >= 1 && p.sw >= 1 && p.ph >= 0 && p.pw >= 0 &&
         (p.oh - 1) * p.sh - p.ph < h && (p.ow - 1) * p.sw - p.pw < w;
}

// Calls f(typed pointer) with the data of a weight buffer: float32, bfloat16 or int8; false for another type.
template <typename F>
bool WithValues(ffi::AnyBuffer& values, F f) {
  switch (values.element_type()) {
    case ffi::DataType::F32: f(values.typed_data<float>()); return true;
    case ffi::DataType::BF16: f(reinterpret_cast<const BF16*>(values.untyped_data())); return true;
    case ffi::DataType::S8: f(values.typed_data<int8_t>()); return true;
    default: return false;
  }
}

// Calls f(typed pointer) with the data of an index buffer: uint8, uint16 or int32; false for another type.
template <typename F>
bool WithIndices(ffi::AnyBuffer& indices, F f) {
  switch (indices.element_type()) {
    case ffi::DataType::U8: f(indices.typed_data<uint8_t>()); return true;
    case ffi::DataType::U16: f(indices.typed_data<uint16_t>()); return true;
    case ffi::DataType::S32: f(indices.typed_data<int32_t>()); return true;
    default: return false;
  }
}

// Checks shapes and runs the lookups over `s` (already padded and in space-to-depth layout when needed), then
// the pooling when there is one (out is then the pooled map).
ffi::Error RunLookups(ffi::ThreadPool& pool, const Geometry& g, const float* s, FlatS32& starts,
                      ffi::AnyBuffer& indices, ffi::AnyBuffer& values, FlatF32& scale, FlatF32& bias,
                      const PoolGeometry& pooling, const OutF32& out_buffer, float* out) {
  const bool pools = pooling.wh > 0;
  if (pools) {
    if (!PoolingFits(pooling, g.oh, g.ow) || g.ow * g.batch < lcnn::kPooledRowMin) {
      return ffi::Error::InvalidArgument("lcnn_lookup_conv: the pooling, the layer's output and out disagree");
    }
  } else if (out_buffer.dimensions()[1] != g.oh || out_buffer.dimensions()[2] != g.ow) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv: out must be (n, out_h, out_w, batch)");
  }
  if (starts.element_count() != static_cast<size_t>(g.n + 1) || bias.element_count() != static_cast<size_t>(g.n) ||
      scale.element_count() != static_cast<size_t>(g.n) || indices.element_count() != values.element_count()) {
    return ffi::Error::InvalidArgument(
        "lcnn_lookup_conv: starts must have n + 1, scale and bias n elements, indices as many as values");
  }
  bool typed = false;
  const bool indexed = WithIndices(indices, [&](auto index) {
    typed = WithValues(values, [&](auto value) {
      using Index = std::remove_cv_t<std::remove_pointer_t<decltype(index)>>;
      using Value = std::remove_cv_t<std::remove_pointer_t<decltype(value)>>;
      Lookups<Index, Value> l{starts.typed_data(), index, value, scale.typed_data(), bias.typed_data()};
      if (pools) DispatchPooled(pool, g, s, l, pooling, out);
      else Dispatch(pool, g, s, l, out);
    });
  });
  if (!indexed || !typed) {
    return ffi::Error::InvalidArgument(
        "lcnn_lookup_conv: indices must be uint8, uint16 or int32, values float32, bfloat16 or int8");
  }
  return ffi::Error::Success();
}

// out is (n, ., ., batch), the layer's output oh × ow (or its pooling); S (or x) has h × w pixels.
Geometry MakeGeometry(const OutF32& out, int64_t h, int64_t w, const LayerGeometry& p, int64_t* height) {
  const auto dims = out.dimensions();
  Geometry g;
  g.n = dims[0];
  g.oh = p.out_h;
  g.ow = p.out_w;
  g.batch = dims[3];
  *height = (h + 2 * p.pad_h + p.stride_h - 1) / p.stride_h;
  g.width = (w + 2 * p.pad_w + p.stride_w - 1) / p.stride_w;
  g.wide = ((g.oh - 1) * g.width + g.ow) * g.batch;
  return g;
}

// Whether a `layer` attribute is sane: strides of at least 1, no negative padding, an output of at least 1 × 1.
bool LayerFits(const LayerGeometry& p) {
  return p.stride_h >= 1 && p.stride_w >= 1 && p.pad_h >= 0 && p.pad_w >= 0 && p.out_h >= 1 && p.out_w >= 1;
}

ffi::Error LookupConvImpl(ffi::ThreadPool pool, ChwnF32 s, FlatS32 starts, ffi::AnyBuffer indices,
                          ffi::AnyBuffer values, FlatF32 scale, FlatF32 bias, ffi::Result<ChwnF32> out,
                          ffi::Result<FlatF32> scratch, LayerGeometry layer, PoolWindow window) {
  if (!LayerFits(layer)) return ffi::Error::InvalidArgument("lcnn_lookup_conv: strides < 1 or padding < 0");
  const PoolGeometry pooling = MakePooling(*out, window);
  const auto in = s.dimensions();  // (k, h, w, batch)
  int64_t height;
  const Geometry g = MakeGeometry(*out, in[1], in[2], layer, &height);
  if (in[3] != g.batch || g.ow > g.width || g.oh > height) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv: S (k, h, w, batch) does not match the output");
  }
  const float* source = s.typed_data();
  if (layer.copies()) {
    const int64_t sh = layer.stride_h, sw = layer.stride_w;
    if (scratch->element_count() != static_cast<size_t>(in[0] * sh * sw * height * g.width * g.batch)) {
      return ffi::Error::InvalidArgument("lcnn_lookup_conv: scratch must hold the padded space-to-depth S");
    }
    SpaceToDepth(pool, source, in[0], in[1], in[2], g.batch, layer.pad_h, layer.pad_w, sh, sw, height, g.width,
                 scratch->typed_data());
    source = scratch->typed_data();
  }
  return RunLookups(pool, g, source, starts, indices, values, scale, bias, pooling, *out, out->typed_data());
}

// As LookupConvImpl, with S = Dᵀ·x computed here first (DenseColumns, from D as stored) into `s_buffer`:
// one call for the whole layer where XLA's matmul would cost more to dispatch than to run (small maps).
ffi::Error LookupConvDictionaryImpl(ffi::ThreadPool pool, ChwnF32 x, ffi::AnyBuffer dictionary, FlatF32 d_scale,
                                    FlatS32 starts, ffi::AnyBuffer indices, ffi::AnyBuffer values, FlatF32 scale,
                                    FlatF32 bias, ffi::Result<ChwnF32> out, ffi::Result<FlatF32> scratch,
                                    ffi::Result<ChwnF32> s_buffer, LayerGeometry layer, PoolWindow window) {
  const auto in = x.dimensions();  // (m, h, w, batch)
  const auto d = dictionary.dimensions();  // (k, m)
  const auto sd = s_buffer->dimensions();  // (k, h, w, batch)
  if (d.size() != 2 || d[1] != in[0] || sd[0] != d[0] || sd[1] != in[1] || sd[2] != in[2] || sd[3] != in[3] ||
      d_scale.element_count() != static_cast<size_t>(d[0])) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv_dictionary: x (m, h, w, batch), the dictionary (k, m), "
                                       "its scale (k) and S (k, h, w, batch) disagree");
  }
  const int64_t columns = in[1] * in[2] * in[3];
  std::unique_ptr<float[]> zeros(new float[d[0]]());
  const bool typed = WithValues(dictionary, [&](auto value) {
    DenseColumns(pool, x.typed_data(), value, d_scale.typed_data(), zeros.get(), in[0], columns, d[0],
                 s_buffer->typed_data());
  });
  if (!typed) return ffi::Error::InvalidArgument("lcnn_lookup_conv_dictionary: D must be float32, bfloat16 or int8");
  return LookupConvImpl(pool, *s_buffer, starts, indices, values, scale, bias, out, scratch, layer, window);
}

ffi::Error LookupConvFusedImpl(ffi::ThreadPool pool, ChwnF32 x, MatrixF32 dictionary, FlatS32 starts,
                               ffi::AnyBuffer indices, ffi::AnyBuffer values, FlatF32 scale, FlatF32 bias,
                               ffi::Result<ChwnF32> out, ffi::Result<FlatF32> scratch, LayerGeometry layer,
                               PoolWindow window, bool nhwc) {
  if (!LayerFits(layer)) return ffi::Error::InvalidArgument("lcnn_lookup_conv_fused: strides < 1 or padding < 0");
  const PoolGeometry pooling = MakePooling(*out, window);
  const auto in = x.dimensions();  // (batch, h, w, m) when nhwc, else (m, h, w, batch)
  const auto d = dictionary.dimensions();
  const int64_t m = d[0], k = d[1];
  const int64_t h = in[1], w = in[2];
  const int64_t sh = layer.stride_h, sw = layer.stride_w;
  int64_t height;
  const Geometry g = MakeGeometry(*out, h, w, layer, &height);
  const bool shapes_agree = nhwc ? (in[3] == m && in[0] == g.batch) : (in[0] == m && in[3] == g.batch);
  if (!shapes_agree || m * k > lcnn::kFusedDictionaryMacsMax || g.ow > g.width || g.oh > height) {
    return ffi::Error::InvalidArgument(
        "lcnn_lookup_conv_fused: x, the dictionary (m, k with m·k <= kFusedDictionaryMacsMax) and out disagree");
  }
  if (scratch->element_count() != static_cast<size_t>(k * sh * sw * height * g.width * g.batch)) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv_fused: scratch must hold the padded space-to-depth S");
  }
  DictionaryToDepth(pool, x.typed_data(), nhwc, dictionary.typed_data(), m, k, h, w, g.batch, layer.pad_h,
                    layer.pad_w, sh, sw, height, g.width, scratch->typed_data());
  return RunLookups(pool, g, scratch->typed_data(), starts, indices, values, scale, bias, pooling, *out,
                    out->typed_data());
}

ffi::Error MaxPoolImpl(ffi::ThreadPool pool, ChwnF32 x, ffi::Result<ChwnF32> out, PoolWindow window) {
  const auto in = x.dimensions();  // (c, h, w, batch)
  const auto o = out->dimensions();  // (c, oh, ow, batch)
  const PoolGeometry pooling = MakePooling(*out, window);
  if (o[0] != in[0] || o[3] != in[3] || !PoolingFits(pooling, in[1], in[2])) {
    return ffi::Error::InvalidArgument("lcnn_max_pool: x (c, h, w, batch), the window and out disagree");
  }
  MaxPool(pool, x.typed_data(), in[0], in[1], in[2], in[3], pooling, out->typed_data());
  return ffi::Error::Success();
}

ffi::Error DenseRowsImpl(ffi::ThreadPool pool, MatrixF32 x, ffi::AnyBuffer weights, FlatF32 scale, FlatF32 bias,
                         ffi::Result<MatrixF32> out) {
  const auto in = x.dimensions();  // (rows, m)
  const auto w = weights.dimensions();  // (n, m)
  const auto o = out->dimensions();  // (rows, n)
  if (w.size() != 2 || w[1] != in[1] || o[0] != in[0] || o[1] != w[0] ||
      scale.element_count() != static_cast<size_t>(w[0]) || bias.element_count() != static_cast<size_t>(w[0])) {
    return ffi::Error::InvalidArgument("lcnn_dense_rows: x (rows, m), weights (n, m), scale and bias (n) and out "
                                       "(rows, n) disagree");
  }
  const bool typed = WithValues(weights, [&](auto value) {
    DenseRows(pool, x.typed_data(), value, scale.typed_data(), bias.typed_data(), in[0], in[1], w[0],
              out->typed_data());
  });
  if (!typed) return ffi::Error::InvalidArgument("lcnn_dense_rows: weights must be float32, bfloat16 or int8");
  return ffi::Error::Success();
}

}  // namespace

// Attributes (kernels.py passes them): `layer` a LayerGeometry, `pool` a PoolWindow, `nhwc` a bool.

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcnnMaxPool, MaxPoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ChwnF32>()   // x (c, h, w, batch)
                                  .Ret<ChwnF32>()   // out (c, oh, ow, batch)
                                  .Attr<PoolWindow>("pool"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcnnLookupConv, LookupConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ChwnF32>()           // S (k, h, w, batch), unpadded
                                  .Arg<FlatS32>()           // starts
                                  .Arg<ffi::AnyBuffer>()    // indices
                                  .Arg<ffi::AnyBuffer>()    // values
                                  .Arg<FlatF32>()           // scale
                                  .Arg<FlatF32>()           // bias
                                  .Ret<OutF32>()            // out (n, oh, ow, batch) or pooled
                                  .Ret<FlatF32>()           // the padded space-to-depth S
                                  .Attr<LayerGeometry>("layer")
                                  .Attr<PoolWindow>("pool"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcnnLookupConvFused, LookupConvFusedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ChwnF32>()           // x, NHWC or CHWN
                                  .Arg<MatrixF32>()         // the dictionary (m, k)
                                  .Arg<FlatS32>()           // starts
                                  .Arg<ffi::AnyBuffer>()    // indices
                                  .Arg<ffi::AnyBuffer>()    // values
                                  .Arg<FlatF32>()           // scale
                                  .Arg<FlatF32>()           // bias
                                  .Ret<OutF32>()            // out (n, oh, ow, batch) or pooled
                                  .Ret<FlatF32>()           // the padded space-to-depth S
                                  .Attr<LayerGeometry>("layer")
                                  .Attr<PoolWindow>("pool")
                                  .Attr<bool>("nhwc"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcnnDenseRows, DenseRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<MatrixF32>()        // x (rows, m)
                                  .Arg<ffi::AnyBuffer>()   // weights (n, m)
                                  .Arg<FlatF32>()          // scale (n)
                                  .Arg<FlatF32>()          // bias (n)
                                  .Ret<MatrixF32>());      // out (rows, n)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcnnLookupConvDictionary, LookupConvDictionaryImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ChwnF32>()           // x (m, h, w, batch)
                                  .Arg<ffi::AnyBuffer>()    // Dᵀ (k, m) as stored
                                  .Arg<FlatF32>()           // its scale (k)
                                  .Arg<FlatS32>()           // starts
                                  .Arg<ffi::AnyBuffer>()    // indices
                                  .Arg<ffi::AnyBuffer>()    // values
                                  .Arg<FlatF32>()           // scale
                                  .Arg<FlatF32>()           // bias
                                  .Ret<OutF32>()            // out (n, oh, ow, batch) or pooled
                                  .Ret<FlatF32>()           // the padded space-to-depth S
                                  .Ret<ChwnF32>()           // S (k, h, w, batch)
                                  .Attr<LayerGeometry>("layer")
                                  .Attr<PoolWindow>("pool"));
