// The XLA FFI handlers of the lookup kernel (lookup_kernel.h): lcnn_lookup_conv takes S from a dictionary
// matmul done by XLA; lcnn_lookup_conv_dictionary computes S first from D as stored (small maps);
// lcnn_lookup_conv_fused computes S itself while filling the space-to-depth buffer (small dictionaries);
// lcnn_max_pool pools CHWN activations (optionally with the ReLU before it); lcnn_dense_rows is a dense layer
// over a few rows with float32, bfloat16 or int8 weights; lcnn_dense_conv a dense convolution of CHWN
// activations with packed float32 weights. The lookups' coefficients may be float32, bfloat16
// or int8 (with a scale per output), their indices uint8, uint16 or int32.

#include <cstdint>
#include <string>
#include <vector>
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

// One step of lcnn_network, attribute `step<i>`: a layer (`kind`), and whether the ReLU follows it (applied by
// the pooling when there is one). Its geometry is attribute `step<i>_layer` (lookups), the max pooling after it
// `step<i>_pool`; its arrays follow the previous step's among the handler's arguments (see NetworkImpl).
struct NetworkStep {
  int64_t kind;  // kStepFusedLookups, kStepLookups or kStepDense
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
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(lcnn::Tile, ffi::StructMember<int64_t>("bytes"),
                                      ffi::StructMember<int64_t>("outputs"), ffi::StructMember<int64_t>("chunk"));
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(NetworkStep, ffi::StructMember<int64_t>("kind"),
                                      ffi::StructMember<bool>("relu"));

namespace {

using lcnn::BF16;
using lcnn::ConvGeometry;
using lcnn::DenseColumns;
using lcnn::DenseConv;
using lcnn::DenseRows;
using lcnn::Dispatch;
using lcnn::DispatchChunked;
using lcnn::DictionaryToDepth;
using lcnn::Geometry;
using lcnn::Lookups;
using lcnn::MaxPool;
using lcnn::PoolGeometry;
using lcnn::SpaceToDepth;
using lcnn::Tile;
using FlatF32 = ffi::Buffer<ffi::F32, 1>;
using FlatS32 = ffi::Buffer<ffi::S32, 1>;
using ChwnF32 = ffi::Buffer<ffi::F32, 4>;  // (channels, height, width, batch), or NHWC images
using OutF32 = ChwnF32;
using MatrixF32 = ffi::Buffer<ffi::F32, 2>;
using PackedF32 = ffi::Buffer<ffi::F32, 3>;  // a dense kernel packed for DenseConv (tiles, m, R)

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

// What a layer's outputs get before they are stored: a residual of out's shape added (none: no elements), then
// max(·, 0) when relu.
struct Epilogue {
  ffi::Buffer<ffi::F32> residual;
  bool relu;
};

// Checks shapes and runs the lookups over `s` (float32 or bfloat16, already padded and in space-to-depth layout
// when needed), then the pooling when there is one (out is then the pooled map).
template <typename S>
ffi::Error RunLookups(ffi::ThreadPool& pool, const Geometry& g, const S* s, FlatS32& starts,
                      ffi::AnyBuffer& indices, ffi::AnyBuffer& values, FlatF32& scale, FlatF32& bias,
                      const PoolGeometry& pooling, const Epilogue& epilogue, const Tile& tile,
                      const OutF32& out_buffer, float* out) {
  const bool pools = pooling.wh > 0;
  const size_t residual = epilogue.residual.element_count();
  if ((residual != 0 || epilogue.relu) && (pools || (residual != 0 && residual != out_buffer.element_count()))) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv: the residual must be shaped as out, and the epilogue "
                                       "comes without pooling");
  }
  if (pools) {
    if (!PoolingFits(pooling, g.oh, g.ow) || g.ow * g.batch < lcnn::kPooledRowMin) {
      return ffi::Error::InvalidArgument("lcnn_lookup_conv: the pooling, the layer's output and out disagree");
    }
  } else if (out_buffer.dimensions()[1] != g.oh || out_buffer.dimensions()[2] != g.ow) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv: out must be (n, out_h, out_w, batch)");
  }
  // Lookups stored chunk by chunk of S (DispatchChunked): a layer of one output pixel, chunks * n + 1 starts.
  const int64_t chunks = tile.chunk > 0 ? (g.planes * g.height * g.width + tile.chunk - 1) / tile.chunk : 1;
  if (tile.chunk > 0 && (pools || g.oh != 1 || g.ow != 1 || g.planes * g.height * g.width <= 0)) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv: lookups stored by chunks of S need an output of one "
                                       "pixel, without pooling");
  }
  if (starts.element_count() != static_cast<size_t>(chunks * g.n + 1) ||
      bias.element_count() != static_cast<size_t>(g.n) ||
      scale.element_count() != static_cast<size_t>(g.n) || indices.element_count() != values.element_count()) {
    return ffi::Error::InvalidArgument(
        "lcnn_lookup_conv: starts must have n + 1 (by chunks: chunks * n + 1), scale and bias n elements, indices "
        "as many as values");
  }
  bool typed = false;
  const bool indexed = WithIndices(indices, [&](auto index) {
    typed = WithValues(values, [&](auto value) {
      using Index = std::remove_cv_t<std::remove_pointer_t<decltype(index)>>;
      using Value = std::remove_cv_t<std::remove_pointer_t<decltype(value)>>;
      Lookups<Index, Value> l{starts.typed_data(), index, value, scale.typed_data(), bias.typed_data(),
                              residual != 0 ? epilogue.residual.typed_data() : nullptr, epilogue.relu};
      if (pools) DispatchPooled(pool, g, s, l, pooling, out, tile);
      else if (tile.chunk > 0) DispatchChunked(pool, g, s, l, chunks, out);
      else Dispatch(pool, g, s, l, out, tile);
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
  g.height = *height;
  return g;
}

// Whether scratch holds `count` elements of S: as many floats, or in bfloat16 half as many (rounded up).
bool ScratchFits(const FlatF32& scratch, int64_t count, bool s_bfloat16) {
  return scratch.element_count() == static_cast<size_t>(s_bfloat16 ? (count + 1) / 2 : count);
}

// Whether a `layer` attribute is sane: strides of at least 1, no negative padding, an output of at least 1 × 1.
bool LayerFits(const LayerGeometry& p) {
  return p.stride_h >= 1 && p.stride_w >= 1 && p.pad_h >= 0 && p.pad_w >= 0 && p.out_h >= 1 && p.out_w >= 1;
}

ffi::Error LookupConvImpl(ffi::ThreadPool pool, ChwnF32 s, FlatS32 starts, ffi::AnyBuffer indices,
                          ffi::AnyBuffer values, FlatF32 scale, FlatF32 bias, ffi::Buffer<ffi::F32> residual,
                          ffi::Result<ChwnF32> out, ffi::Result<FlatF32> scratch, LayerGeometry layer,
                          PoolWindow window, bool relu, Tile tile, bool s_bfloat16) {
  if (!LayerFits(layer)) return ffi::Error::InvalidArgument("lcnn_lookup_conv: strides < 1 or padding < 0");
  const PoolGeometry pooling = MakePooling(*out, window);
  const auto in = s.dimensions();  // (k, h, w, batch)
  int64_t height;
  Geometry g = MakeGeometry(*out, in[1], in[2], layer, &height);
  g.planes = in[0] * layer.stride_h * layer.stride_w;
  if (in[3] != g.batch || g.ow > g.width || g.oh > height) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv: S (k, h, w, batch) does not match the output");
  }
  const float* source = s.typed_data();
  const Epilogue epilogue{residual, relu};
  if (layer.copies()) {
    const int64_t sh = layer.stride_h, sw = layer.stride_w;
    if (!ScratchFits(*scratch, in[0] * sh * sw * height * g.width * g.batch, s_bfloat16)) {
      return ffi::Error::InvalidArgument("lcnn_lookup_conv: scratch must hold the padded space-to-depth S (in "
                                         "bfloat16: half as many floats, rounded up)");
    }
    auto run = [&](auto* copy) {  // the padded copy in S's precision, then the lookups over it
      SpaceToDepth(pool, source, in[0], in[1], in[2], g.batch, layer.pad_h, layer.pad_w, sh, sw, height, g.width,
                   copy);
      return RunLookups(pool, g, copy, starts, indices, values, scale, bias, pooling, epilogue, tile, *out,
                        out->typed_data());
    };
    if (s_bfloat16) return run(reinterpret_cast<BF16*>(scratch->typed_data()));
    return run(scratch->typed_data());
  }
  if (s_bfloat16) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv: S in bfloat16 is made while padding it; this layer "
                                       "neither pads nor strides");
  }
  return RunLookups(pool, g, source, starts, indices, values, scale, bias, pooling, epilogue, tile, *out,
                    out->typed_data());
}

// As LookupConvImpl, with S = Dᵀ·x computed here first (DenseColumns, from D as stored) into `s_buffer`:
// one call for the whole layer where XLA's matmul would cost more to dispatch than to run (small maps).
ffi::Error LookupConvDictionaryImpl(ffi::ThreadPool pool, ChwnF32 x, ffi::AnyBuffer dictionary, FlatF32 d_scale,
                                    FlatS32 starts, ffi::AnyBuffer indices, ffi::AnyBuffer values, FlatF32 scale,
                                    FlatF32 bias, ffi::Buffer<ffi::F32> residual, ffi::Result<ChwnF32> out,
                                    ffi::Result<FlatF32> scratch, ffi::Result<ChwnF32> s_buffer, LayerGeometry layer,
                                    PoolWindow window, bool relu, Tile tile, bool s_bfloat16) {
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
#if defined(__AVX512BF16__)
    // S is kept in bfloat16 anyway: computed in bfloat16 dot products where D is stored in bfloat16 or int8.
    if (s_bfloat16 && lcnn::DenseColumnsDot(pool, x.typed_data(), value, d_scale.typed_data(), zeros.get(), in[0],
                                            columns, d[0], s_buffer->typed_data())) {
      return;
    }
#endif
    DenseColumns(pool, x.typed_data(), value, d_scale.typed_data(), zeros.get(), in[0], columns, d[0],
                 s_buffer->typed_data());
  });
  if (!typed) return ffi::Error::InvalidArgument("lcnn_lookup_conv_dictionary: D must be float32, bfloat16 or int8");
  return LookupConvImpl(pool, *s_buffer, starts, indices, values, scale, bias, residual, out, scratch, layer, window,
                        relu, tile, s_bfloat16);
}

ffi::Error LookupConvFusedImpl(ffi::ThreadPool pool, ChwnF32 x, MatrixF32 dictionary, FlatS32 starts,
                               ffi::AnyBuffer indices, ffi::AnyBuffer values, FlatF32 scale, FlatF32 bias,
                               ffi::Buffer<ffi::F32> residual, ffi::Result<ChwnF32> out,
                               ffi::Result<FlatF32> scratch, LayerGeometry layer, PoolWindow window, bool relu,
                               bool nhwc, Tile tile, bool s_bfloat16) {
  if (!LayerFits(layer)) return ffi::Error::InvalidArgument("lcnn_lookup_conv_fused: strides < 1 or padding < 0");
  const PoolGeometry pooling = MakePooling(*out, window);
  const auto in = x.dimensions();  // (batch, h, w, m) when nhwc, else (m, h, w, batch)
  const auto d = dictionary.dimensions();
  const int64_t m = d[0], k = d[1];
  const int64_t h = in[1], w = in[2];
  const int64_t sh = layer.stride_h, sw = layer.stride_w;
  int64_t height;
  Geometry g = MakeGeometry(*out, h, w, layer, &height);
  g.planes = k * sh * sw;
  const bool shapes_agree = nhwc ? (in[3] == m && in[0] == g.batch) : (in[0] == m && in[3] == g.batch);
  if (!shapes_agree || m * k > lcnn::kFusedDictionaryMacsMax || g.ow > g.width || g.oh > height) {
    return ffi::Error::InvalidArgument(
        "lcnn_lookup_conv_fused: x, the dictionary (m, k with m·k <= kFusedDictionaryMacsMax) and out disagree");
  }
  if (!ScratchFits(*scratch, k * sh * sw * height * g.width * g.batch, s_bfloat16)) {
    return ffi::Error::InvalidArgument("lcnn_lookup_conv_fused: scratch must hold the padded space-to-depth S (in "
                                       "bfloat16: half as many floats, rounded up)");
  }
  auto run = [&](auto* s) {
    DictionaryToDepth(pool, x.typed_data(), nhwc, dictionary.typed_data(), m, k, h, w, g.batch, layer.pad_h,
                      layer.pad_w, sh, sw, height, g.width, s);
    return RunLookups(pool, g, s, starts, indices, values, scale, bias, pooling, Epilogue{residual, relu}, tile, *out,
                      out->typed_data());
  };
  if (s_bfloat16) return run(reinterpret_cast<BF16*>(scratch->typed_data()));
  return run(scratch->typed_data());
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

// x (c, h, w, batch) with W packed (tiles, c·kh·kw, kConvTileOutputs) -> out (n, oh, ow, batch); kernel_h and
// kernel_w name W's window, `layer` the padding, strides and output size.
ffi::Error DenseConvImpl(ffi::ThreadPool pool, ChwnF32 x, PackedF32 packed, FlatF32 bias,
                         ffi::Buffer<ffi::F32> residual, ffi::Result<OutF32> out, LayerGeometry layer,
                         int64_t kernel_h, int64_t kernel_w, bool relu) {
  const auto in = x.dimensions();  // (c, h, w, batch)
  const auto w = packed.dimensions();  // (tiles, m, R)
  const auto o = out->dimensions();  // (n, oh, ow, batch)
  const ConvGeometry g{in[0], in[1], in[2], in[3], o[0], kernel_h, kernel_w, layer.stride_h, layer.stride_w,
                       layer.pad_h, layer.pad_w, layer.out_h, layer.out_w};
  const int64_t tiles = (g.n + lcnn::kConvTileOutputs - 1) / lcnn::kConvTileOutputs;
  if (!LayerFits(layer) || kernel_h < 1 || kernel_w < 1 || o[1] != g.oh || o[2] != g.ow || o[3] != g.batch ||
      (g.oh - 1) * g.sh + kernel_h > g.h + 2 * g.ph || (g.ow - 1) * g.sw + kernel_w > g.w + 2 * g.pw ||
      w[0] != tiles || w[1] != g.c * kernel_h * kernel_w || w[2] != lcnn::kConvTileOutputs ||
      bias.element_count() != static_cast<size_t>(g.n) ||
      (residual.element_count() != 0 && residual.element_count() != out->element_count())) {
    return ffi::Error::InvalidArgument("lcnn_dense_conv: x (c, h, w, batch), the packed kernel (tiles, c kh kw, "
                                       "R), bias (n), the residual and out (n, oh, ow, batch) disagree");
  }
  DenseConv(pool, g, x.typed_data(), packed.typed_data(), bias.typed_data(),
            residual.element_count() ? residual.typed_data() : nullptr, relu, out->typed_data());
  return ffi::Error::Success();
}

// lcnn_network: a chain of layers over one image in one call, each step's ReLU and max pooling applied as it
// ends, the activation (c, h, w) handed to the next step in memory the call owns. At batch 1 every layer of
// AlexNet-LCNN is small (0.1–5 M multiply-adds), so what a call per layer costs (XLA dispatching it, the
// pooling fusions between them, writing and reading each output through XLA's buffers) is a large part of its
// time. The arguments after the image are each step's arrays in order:
//   kStepFusedLookups: D (m, k) float32, then the lookups (starts, indices, values, scale, bias);
//   kStepLookups: Dᵀ (k, m) as stored, its scale (k), then the lookups;
//   kStepDense (a 1×1 convolution, stride 1): W (n, m) as stored, its scale (n), the bias (n).
struct Activation {
  std::vector<float> data;
  int64_t c = 0, h = 0, w = 0;
};

// The lookups of one step over `s` (its padded space-to-depth view when `layer` pads or strides).
ffi::Error NetworkLookups(ffi::ThreadPool& pool, const float* s, const LayerGeometry& layer, int64_t planes,
                          int64_t height, int64_t width, ffi::AnyBuffer starts, ffi::AnyBuffer indices,
                          ffi::AnyBuffer values, ffi::AnyBuffer scale, ffi::AnyBuffer bias, Activation& out) {
  const int64_t n = static_cast<int64_t>(scale.element_count());
  Geometry g;
  g.n = n;
  g.oh = layer.out_h;
  g.ow = layer.out_w;
  g.batch = 1;
  g.width = width;
  g.wide = (g.oh - 1) * g.width + g.ow;
  g.height = height;
  g.planes = planes;
  if (g.ow > width || g.oh > height || starts.element_type() != ffi::DataType::S32 ||
      scale.element_type() != ffi::DataType::F32 || bias.element_type() != ffi::DataType::F32 ||
      starts.element_count() != static_cast<size_t>(n + 1) || bias.element_count() != static_cast<size_t>(n) ||
      indices.element_count() != values.element_count()) {
    return ffi::Error::InvalidArgument("lcnn_network: a step's lookups disagree with its input or each other");
  }
  out.c = n;
  out.h = g.oh;
  out.w = g.ow;
  out.data.resize(n * g.oh * g.ow);  // every element is stored by Dispatch
  bool typed = false;
  const bool indexed = WithIndices(indices, [&](auto index) {
    typed = WithValues(values, [&](auto value) {
      using Index = std::remove_cv_t<std::remove_pointer_t<decltype(index)>>;
      using Value = std::remove_cv_t<std::remove_pointer_t<decltype(value)>>;
      Lookups<Index, Value> l{starts.typed_data<int32_t>(), index, value, scale.typed_data<float>(),
                              bias.typed_data<float>()};
      Dispatch(pool, g, s, l, out.data.data());
    });
  });
  if (!indexed || !typed) return ffi::Error::InvalidArgument("lcnn_network: a step's lookups have a wrong type");
  return ffi::Error::Success();
}

// Max pooling (the ReLU first when window.relu) of `a` in place, or the ReLU alone when `relu`.
ffi::Error NetworkEpilogue(const NetworkStep& step, const PoolWindow& w, Activation& a) {
  if (w.window_h > 0) {
    PoolGeometry p{w.window_h, w.window_w, w.stride_h, w.stride_w, w.pad_h, w.pad_w, 0, 0, w.relu};
    p.oh = p.sh >= 1 ? (a.h + 2 * p.ph - p.wh) / p.sh + 1 : 0;  // the padding after the map = before it
    p.ow = p.sw >= 1 ? (a.w + 2 * p.pw - p.ww) / p.sw + 1 : 0;
    if (p.oh < 1 || p.ow < 1 || !PoolingFits(p, a.h, a.w)) {
      return ffi::Error::InvalidArgument("lcnn_network: a step's pooling does not fit its map");
    }
    std::vector<float> pooled(a.c * p.oh * p.ow);
    lcnn::MaxPoolImage(a.data.data(), a.c, a.h, a.w, p, pooled.data());
    a.data.swap(pooled);
    a.h = p.oh;
    a.w = p.ow;
  } else if (step.relu) {
    for (float& v : a.data) v = std::max(v, 0.f);
  }
  return ffi::Error::Success();
}

ffi::Error NetworkImpl(ffi::ThreadPool pool, ChwnF32 image, ffi::RemainingArgs args, ffi::Result<ChwnF32> out,
                       ffi::Dictionary attrs) {
  const auto in = image.dimensions();  // (1, h, w, c): one NHWC image
  if (in[0] != 1) return ffi::Error::InvalidArgument("lcnn_network: runs one image (batch 1)");
  auto steps = attrs.get<int64_t>("steps");
  if (steps.has_error()) return steps.error();
  std::vector<ffi::AnyBuffer> arrays;
  for (size_t i = 0; i < args.size(); ++i) {
    auto got = args.get<ffi::AnyBuffer>(i);
    if (got.has_error()) return got.error();
    arrays.push_back(*got);
  }
  size_t next = 0;  // the next step's first array
  auto take = [&](size_t count) { return next + count <= arrays.size() ? (next += count) - count : arrays.size(); };
  Activation a;  // (c, h, w); (h, w, c) while nhwc
  a.c = in[3];
  a.h = in[1];
  a.w = in[2];
  a.data.assign(image.typed_data(), image.typed_data() + a.c * a.h * a.w);
  bool nhwc = true;
  for (int64_t i = 0; i < *steps; ++i) {
    const std::string name = "step" + std::to_string(i);
    auto decoded = attrs.get<NetworkStep>(name);
    if (decoded.has_error()) return decoded.error();
    auto geometry = attrs.get<LayerGeometry>(name + "_layer");
    if (geometry.has_error()) return geometry.error();
    auto window = attrs.get<PoolWindow>(name + "_pool");
    if (window.has_error()) return window.error();
    const NetworkStep& step = *decoded;
    if (step.kind != lcnn::kStepFusedLookups && nhwc) {  // (h, w, c) -> (c, h, w)
      std::vector<float> chw(a.data.size());
      for (int64_t y = 0; y < a.h * a.w; ++y)
        for (int64_t c = 0; c < a.c; ++c) chw[c * a.h * a.w + y] = a.data[y * a.c + c];
      a.data.swap(chw);
      nhwc = false;
    }
    const LayerGeometry& layer = *geometry;
    Activation result;
    ffi::Error error = ffi::Error::Success();
    if (step.kind == lcnn::kStepDense) {
      const size_t at = take(3);
      if (at == arrays.size()) return ffi::Error::InvalidArgument("lcnn_network: too few arrays for the steps");
      ffi::AnyBuffer &weights = arrays[at], &scale = arrays[at + 1], &bias = arrays[at + 2];
      const auto wd = weights.dimensions();  // (n, m)
      if (wd.size() != 2 || wd[1] != a.c || scale.element_count() != static_cast<size_t>(wd[0]) ||
          bias.element_count() != static_cast<size_t>(wd[0]) || scale.element_type() != ffi::DataType::F32 ||
          bias.element_type() != ffi::DataType::F32) {
        return ffi::Error::InvalidArgument("lcnn_network: a dense step's W (n, m), scale and bias (n) disagree");
      }
      result.c = wd[0];
      result.h = a.h;
      result.w = a.w;
      result.data.resize(result.c * a.h * a.w);
      const bool typed = WithValues(weights, [&](auto value) {
        DenseColumns(pool, a.data.data(), value, scale.typed_data<float>(), bias.typed_data<float>(), a.c,
                     a.h * a.w, result.c, result.data.data());
      });
      if (!typed) return ffi::Error::InvalidArgument("lcnn_network: W must be float32, bfloat16 or int8");
    } else if (step.kind == lcnn::kStepFusedLookups || step.kind == lcnn::kStepLookups) {
      if (!LayerFits(layer)) return ffi::Error::InvalidArgument("lcnn_network: strides < 1 or padding < 0");
      const bool fused = step.kind == lcnn::kStepFusedLookups;
      const size_t at = take(fused ? 6 : 7);
      if (at == arrays.size()) return ffi::Error::InvalidArgument("lcnn_network: too few arrays for the steps");
      const size_t lookups = at + (fused ? 1 : 2);
      const int64_t sh = layer.stride_h, sw = layer.stride_w;
      const int64_t height = (a.h + 2 * layer.pad_h + sh - 1) / sh, width = (a.w + 2 * layer.pad_w + sw - 1) / sw;
      std::vector<float> s;  // S (k, h, w), then its padded space-to-depth view (k·sh·sw, height, width)
      if (fused) {
        ffi::AnyBuffer& dictionary = arrays[at];
        const auto d = dictionary.dimensions();  // (m, k)
        if (d.size() != 2 || d[0] != a.c || d[0] * d[1] > lcnn::kFusedDictionaryMacsMax ||
            dictionary.element_type() != ffi::DataType::F32) {
          return ffi::Error::InvalidArgument("lcnn_network: a fused step's D (m, k) disagrees with its input");
        }
        s.resize(d[1] * sh * sw * height * width);
        DictionaryToDepth(pool, a.data.data(), nhwc, dictionary.typed_data<float>(), d[0], d[1], a.h, a.w, 1,
                          layer.pad_h, layer.pad_w, sh, sw, height, width, s.data());
      } else {
        ffi::AnyBuffer &dictionary = arrays[at], &d_scale = arrays[at + 1];
        const auto d = dictionary.dimensions();  // (k, m)
        if (d.size() != 2 || d[1] != a.c || d_scale.element_count() != static_cast<size_t>(d[0]) ||
            d_scale.element_type() != ffi::DataType::F32) {
          return ffi::Error::InvalidArgument("lcnn_network: a step's Dᵀ (k, m) or scale disagrees with its input");
        }
        s.resize(d[0] * a.h * a.w);
        std::vector<float> zeros(d[0], 0.f);
        const bool typed = WithValues(dictionary, [&](auto value) {
          DenseColumns(pool, a.data.data(), value, d_scale.typed_data<float>(), zeros.data(), a.c, a.h * a.w, d[0],
                       s.data());
        });
        if (!typed) return ffi::Error::InvalidArgument("lcnn_network: Dᵀ must be float32, bfloat16 or int8");
        if (layer.copies()) {
          std::vector<float> padded(d[0] * sh * sw * height * width);
          SpaceToDepth(pool, s.data(), d[0], a.h, a.w, 1, layer.pad_h, layer.pad_w, sh, sw, height, width,
                       padded.data());
          s.swap(padded);
        }
      }
      const int64_t planes = static_cast<int64_t>(s.size()) / (height * width);
      error = NetworkLookups(pool, s.data(), layer, planes, height, width, arrays[lookups], arrays[lookups + 1],
                             arrays[lookups + 2], arrays[lookups + 3], arrays[lookups + 4], result);
    } else {
      return ffi::Error::InvalidArgument("lcnn_network: unknown step kind");
    }
    if (error.failure()) return error;
    error = NetworkEpilogue(step, *window, result);
    if (error.failure()) return error;
    a = std::move(result);
    nhwc = false;
  }
  if (next != arrays.size()) return ffi::Error::InvalidArgument("lcnn_network: more arrays than the steps take");
  const auto o = out->dimensions();  // (1, h, w, c)
  if (nhwc || o[0] != 1 || o[1] != a.h || o[2] != a.w || o[3] != a.c) {
    return ffi::Error::InvalidArgument("lcnn_network: out must be (1, h, w, c) of the last step's output");
  }
  float* dst = out->typed_data();
  for (int64_t c = 0; c < a.c; ++c)
    for (int64_t y = 0; y < a.h * a.w; ++y) dst[y * a.c + c] = a.data[c * a.h * a.w + y];
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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a residual shaped as out, or no elements
                                  .Ret<OutF32>()            // out (n, oh, ow, batch) or pooled
                                  .Ret<FlatF32>()           // the padded space-to-depth S
                                  .Attr<LayerGeometry>("layer")
                                  .Attr<PoolWindow>("pool")
                                  .Attr<bool>("relu")
                                  .Attr<Tile>("tile")
                                  .Attr<bool>("s_bfloat16"));

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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a residual shaped as out, or no elements
                                  .Ret<OutF32>()            // out (n, oh, ow, batch) or pooled
                                  .Ret<FlatF32>()           // the padded space-to-depth S
                                  .Attr<LayerGeometry>("layer")
                                  .Attr<PoolWindow>("pool")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("nhwc")
                                  .Attr<Tile>("tile")
                                  .Attr<bool>("s_bfloat16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcnnDenseRows, DenseRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<MatrixF32>()        // x (rows, m)
                                  .Arg<ffi::AnyBuffer>()   // weights (n, m)
                                  .Arg<FlatF32>()          // scale (n)
                                  .Arg<FlatF32>()          // bias (n)
                                  .Ret<MatrixF32>());      // out (rows, n)

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcnnDenseConv, DenseConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ChwnF32>()                    // x (c, h, w, batch)
                                  .Arg<PackedF32>()                  // W packed (tiles, c kh kw, R)
                                  .Arg<FlatF32>()                    // bias (n)
                                  .Arg<ffi::Buffer<ffi::F32>>()      // a residual shaped as out, or no elements
                                  .Ret<OutF32>()                     // out (n, oh, ow, batch)
                                  .Attr<LayerGeometry>("layer")
                                  .Attr<int64_t>("kernel_h")
                                  .Attr<int64_t>("kernel_w")
                                  .Attr<bool>("relu"));

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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a residual shaped as out, or no elements
                                  .Ret<OutF32>()            // out (n, oh, ow, batch) or pooled
                                  .Ret<FlatF32>()           // the padded space-to-depth S
                                  .Ret<ChwnF32>()           // S (k, h, w, batch)
                                  .Attr<LayerGeometry>("layer")
                                  .Attr<PoolWindow>("pool")
                                  .Attr<bool>("relu")
                                  .Attr<Tile>("tile")
                                  .Attr<bool>("s_bfloat16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LcnnNetwork, NetworkImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ChwnF32>()            // one NHWC image (1, h, w, c)
                                  .RemainingArgs()           // each step's arrays
                                  .Ret<ChwnF32>()            // the last step's output, NHWC (1, h, w, c)
                                  .Attrs<ffi::Dictionary>());  // steps; step<i>, step<i>_layer, step<i>_pool

// Whether this build computes a bfloat16 S's dictionary stage and lookups in AVX512-BF16 dot products
// (kernels.kernel_bf16_dot).
extern "C" int LcnnKernelBf16Dot() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

// The work (multiply-adds or bytes) below which a call stays on the calling thread: set when `value` >= 0; the
// value in force is returned (kernels.set_serial_work).
extern "C" int64_t LcnnSerialWork(int64_t value) {
  if (value >= 0) lcnn::serial_work.store(value);
  return lcnn::serial_work.load();
}

// The vector ISA this build targets (kernels.kernel_arch reports it beside every timing).
extern "C" const char* LcnnKernelIsa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__SSE2__)
  return "sse2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "scalar";
#endif
}
