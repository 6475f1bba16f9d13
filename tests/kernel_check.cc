// The lookup kernel's arithmetic against float64 references, in C++ alone (no XLA, no Python): the header
// lookup_kernel.h built for any target a compiler knows, run where Python and jaxlib cannot be, such as an Arm
// build under user-mode emulation (tests/test_kernel_portable.py). Every entry point the XLA binding calls is
// checked on fresh random inputs over the shapes that pick each of its code paths (block widths, tails, tiles,
// chunks, strides, batch 1 and batch > 1; float32, bfloat16 and int8 weights; float32 and bfloat16 S).
//
//   g++ -std=c++17 -O3 -march=<target> -pthread tests/kernel_check.cc -o kernel_check && ./kernel_check [seed]
//
// Prints one line per check and a summary; exits 1 if any value is off by more than its tolerance.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../lcnn_jax/inference/lookup_kernel.h"

namespace {

// A pool of real threads, as the kernel gets from XLA: each task runs on a thread of its own.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) : threads_(threads) {}
  ~ThreadPool() {
    for (std::thread& t : running_) t.join();
  }
  int64_t num_threads() const { return threads_; }
  template <typename Task>
  void Schedule(Task&& task) {
    std::lock_guard<std::mutex> lock(mutex_);
    running_.emplace_back(std::forward<Task>(task));
  }

 private:
  int threads_;
  std::mutex mutex_;
  std::vector<std::thread> running_;
};

std::mt19937_64 rng;
int failures = 0, checks = 0;

float Uniform(float lo = -1.f, float hi = 1.f) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
int64_t Int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
std::vector<float> Random(size_t n) {
  std::vector<float> v(n);
  for (float& x : v) x = Uniform();
  return v;
}

// got against want, each within atol + rtol * |want|.
void Check(const std::string& name, const std::vector<float>& got, const std::vector<double>& want,
           double rtol = 1e-5, double atol = 1e-5) {
  ++checks;
  double worst = 0.0;
  size_t bad = 0, at = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double allowed = atol + rtol * std::fabs(want[i]);
    if (!(err <= allowed)) ++bad;  // NaN counts as bad
    if (!(err <= worst)) worst = err, at = i;
  }
  if (got.size() != want.size()) bad = want.size() + 1;
  std::printf("%-4s %-72s max error %.3g (%zu values)\n", bad ? "FAIL" : "ok", name.c_str(), worst, want.size());
  if (bad) {
    ++failures;
    std::printf("     %zu values off, the worst at %zu: %.9g against %.9g\n", bad, at,
                at < got.size() ? got[at] : NAN, at < want.size() ? want[at] : NAN);
  }
}

// Stored weights (or S) of each type: the values as stored, and as the kernel reads them (float64).
template <typename Value>
struct Weights {
  std::vector<Value> stored;
  std::vector<double> exact;
};
template <typename Value>
Weights<Value> RandomWeights(size_t n) {
  Weights<Value> w;
  w.stored.resize(n);
  w.exact.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<Value, float>) w.stored[i] = Uniform();
    else if constexpr (std::is_same_v<Value, int8_t>) w.stored[i] = static_cast<int8_t>(Int(-127, 127));
    else w.stored[i] = lcnn::FromFloat(Uniform());
    w.exact[i] = lcnn::ToFloat(w.stored[i]);
  }
  return w;
}
template <typename T>
const char* TypeName() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, int8_t>) return "int8";
  else if constexpr (std::is_same_v<T, lcnn::BF16>) return "bfloat16";
  else if constexpr (std::is_same_v<T, uint8_t>) return "uint8";
  else if constexpr (std::is_same_v<T, uint16_t>) return "uint16";
  else return "int32";
}

// Sparse lookups of n outputs over `positions` indices of S: 0 to `most` distinct, sorted indices each.
template <typename Index, typename Value>
struct SparseLookups {
  std::vector<int32_t> starts{0};
  std::vector<Index> indices;
  Weights<Value> values;
  std::vector<float> scale, bias;
  lcnn::Lookups<Index, Value> View() const {
    return {starts.data(), indices.data(), values.stored.data(), scale.data(), bias.data()};
  }
};
template <typename Index, typename Value>
SparseLookups<Index, Value> RandomLookups(int64_t n, int64_t positions, int64_t most) {
  SparseLookups<Index, Value> l;
  std::vector<int64_t> all(positions);
  for (int64_t i = 0; i < positions; ++i) all[i] = i;
  for (int64_t o = 0; o < n; ++o) {
    std::shuffle(all.begin(), all.end(), rng);
    const int64_t count = Int(0, std::min(most, positions));
    std::vector<int64_t> chosen(all.begin(), all.begin() + count);
    std::sort(chosen.begin(), chosen.end());
    for (int64_t i : chosen) l.indices.push_back(static_cast<Index>(i));
    l.starts.push_back(static_cast<int32_t>(l.indices.size()));
  }
  l.values = RandomWeights<Value>(l.indices.size());
  for (int64_t o = 0; o < n; ++o) {
    l.scale.push_back(std::is_same_v<Value, int8_t> ? Uniform(0.001f, 0.01f) : 1.f);
    l.bias.push_back(Uniform());
  }
  return l;
}

// A stride-1 layer's lookups over S (k, H, W, batch): R×C windows, output (n, H-R+1, W-C+1, batch).
template <typename S, typename Index, typename Value>
void CheckConv(ThreadPool& pool, int64_t k, int64_t H, int64_t W, int64_t R, int64_t C, int64_t batch, int64_t n,
               int64_t tile_bytes, bool epilogue) {
  const int64_t oh = H - R + 1, ow = W - C + 1;
  auto [s, s_exact] = RandomWeights<S>(k * H * W * batch);  // S in the kernel's precision
  // Non-zeros as (atom, r, c) of the window: index = (atom * H + r) * W + c.
  auto l = RandomLookups<Index, Value>(n, k * R * C, 24);
  for (Index& i : l.indices) {
    const int64_t flat = i, atom = flat / (R * C), r = flat / C % R, c = flat % C;
    i = static_cast<Index>((atom * H + r) * W + c);
  }
  lcnn::Geometry g{batch, W, n, oh, ow, ((oh - 1) * W + ow) * batch, H, k};
  std::vector<float> residual = epilogue ? Random(n * oh * ow * batch) : std::vector<float>();
  auto view = l.View();
  view.residual = epilogue ? residual.data() : nullptr;
  view.relu = epilogue;
  std::vector<float> out(n * oh * ow * batch, NAN);
  lcnn::Tile tile;
  tile.bytes = tile_bytes;
  lcnn::Dispatch(pool, g, s.data(), view, out.data(), tile);
  std::vector<double> want(out.size());
  for (int64_t o = 0; o < n; ++o)
    for (int64_t y = 0; y < oh; ++y)
      for (int64_t x = 0; x < ow; ++x)
        for (int64_t b = 0; b < batch; ++b) {
          double sum = 0.0;
          for (int32_t t = l.starts[o]; t < l.starts[o + 1]; ++t)
            sum += l.values.exact[t] * s_exact[(static_cast<int64_t>(l.indices[t]) + y * W + x) * batch + b];
          const int64_t at = ((o * oh + y) * ow + x) * batch + b;
          double v = l.scale[o] * sum + l.bias[o];
          if (epilogue) v = std::max(v + residual[at], 0.0);
          want[at] = v;
        }
  char name[200];
  std::snprintf(name, sizeof(name), "lookups %s S, %s indices, %s values: k%ld %ldx%ld %ldx%ld b%ld n%ld tile%ld%s",
                TypeName<S>(), TypeName<Index>(), TypeName<Value>(), long(k), long(H), long(W), long(R), long(C),
                long(batch), long(n), long(tile_bytes), epilogue ? " +residual,relu" : "");
  Check(name, out, want, 1e-5, 1e-5);
  if (!epilogue) {  // the ReLU alone, as a convolution followed by its ReLU stores its output
    view.relu = true;
    std::fill(out.begin(), out.end(), NAN);
    lcnn::Dispatch(pool, g, s.data(), view, out.data(), tile);
    std::vector<double> rectified(want.size());
    for (size_t i = 0; i < want.size(); ++i) rectified[i] = std::max(want[i], 0.0);
    Check(std::string(name) + " +relu", out, rectified, 1e-5, 1e-5);
  }

  // The same lookups pooled as they are computed (3x3 windows, stride 2, the ReLU first), where rows are wide
  // enough for the kernel to pool them.
  if (ow * batch >= lcnn::kPooledRowMin && oh >= 3 && ow >= 3) {
    lcnn::PoolGeometry p{3, 3, 2, 2, 0, 0, (oh - 3) / 2 + 1, (ow - 3) / 2 + 1, true};
    std::vector<float> pooled(n * p.oh * p.ow * batch, NAN);
    lcnn::Dispatch(pool, g, s.data(), l.View(), out.data(), tile);  // without the epilogue, for the reference
    std::vector<double> plain(out.begin(), out.end());
    lcnn::DispatchPooled(pool, g, s.data(), l.View(), p, pooled.data(), tile);
    std::vector<double> pooled_want(pooled.size());
    for (int64_t o = 0; o < n; ++o)
      for (int64_t py = 0; py < p.oh; ++py)
        for (int64_t px = 0; px < p.ow; ++px)
          for (int64_t b = 0; b < batch; ++b) {
            double m = 0.0;  // the ReLU
            for (int64_t y = py * 2; y < py * 2 + 3; ++y)
              for (int64_t x = px * 2; x < px * 2 + 3; ++x) m = std::max(m, plain[((o * oh + y) * ow + x) * batch + b]);
            pooled_want[((o * p.oh + py) * p.ow + px) * batch + b] = m;
          }
    Check(std::string(name) + " pooled", pooled, pooled_want, 1e-5, 1e-5);
  }
}

// A one-pixel layer (dense): S (positions, batch), its lookups stored output by output and chunk by chunk.
template <typename Index, typename Value>
void CheckDense(ThreadPool& pool, int64_t positions, int64_t batch, int64_t n, int64_t most, int64_t chunk) {
  auto [s, s_exact] = RandomWeights<float>(positions * batch);
  auto l = RandomLookups<Index, Value>(n, positions, most);
  lcnn::Geometry g{batch, 1, n, 1, 1, batch, positions, 1};
  std::vector<double> want(n * batch);
  for (int64_t o = 0; o < n; ++o)
    for (int64_t b = 0; b < batch; ++b) {
      double sum = 0.0;
      for (int32_t t = l.starts[o]; t < l.starts[o + 1]; ++t)
        sum += l.values.exact[t] * s_exact[static_cast<int64_t>(l.indices[t]) * batch + b];
      want[o * batch + b] = l.scale[o] * sum + l.bias[o];
    }
  std::vector<float> out(n * batch, NAN);
  lcnn::Dispatch(pool, g, s.data(), l.View(), out.data());
  char name[200];
  std::snprintf(name, sizeof(name), "one-pixel lookups, %s indices, %s values: %ld positions b%ld n%ld up to %ld",
                TypeName<Index>(), TypeName<Value>(), long(positions), long(batch), long(n), long(most));
  // Sums of up to ~1000 products: float32 accumulation in another order.
  Check(name, out, want, 1e-4, 1e-4);

  // Chunk by chunk: chunks * n + 1 starts, output o's non-zeros in chunk c at [starts[c n + o], starts[c n + o + 1]).
  const int64_t chunks = (positions + chunk - 1) / chunk;
  SparseLookups<Index, Value> c;
  c.starts.clear();
  c.scale = l.scale;
  c.bias = l.bias;
  for (int64_t part = 0; part < chunks; ++part)
    for (int64_t o = 0; o < n; ++o) {
      c.starts.push_back(static_cast<int32_t>(c.indices.size()));
      for (int32_t t = l.starts[o]; t < l.starts[o + 1]; ++t)
        if (static_cast<int64_t>(l.indices[t]) / chunk == part) {
          c.indices.push_back(l.indices[t]);
          c.values.stored.push_back(l.values.stored[t]);
        }
    }
  c.starts.push_back(static_cast<int32_t>(c.indices.size()));
  std::fill(out.begin(), out.end(), NAN);
  lcnn::DispatchChunked(pool, g, s.data(), c.View(), chunks, out.data());
  Check(std::string(name) + ", chunks of " + std::to_string(chunk), out, want, 1e-4, 1e-4);
}

// S (k, h, w, batch) into its zero-padded space-to-depth view (k sh sw, H, W, batch); and the first layer's
// dictionary applied while filling it, from NHWC or CHWN input.
template <typename S>
void CheckToDepth(ThreadPool& pool, int64_t m, int64_t k, int64_t h, int64_t w, int64_t batch, int64_t ph,
                  int64_t pw, int64_t sh, int64_t sw) {
  const int64_t height = (h + 2 * ph + sh - 1) / sh, width = (w + 2 * pw + sw - 1) / sw;
  const int64_t planes = k * sh * sw, size = planes * height * width * batch;
  auto value_at = [&](const std::function<double(int64_t, int64_t, int64_t, int64_t)>& at) {
    std::vector<double> want(size);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t pr = 0; pr < sh; ++pr)
        for (int64_t pc = 0; pc < sw; ++pc)
          for (int64_t row = 0; row < height; ++row)
            for (int64_t col = 0; col < width; ++col)
              for (int64_t b = 0; b < batch; ++b) {
                const int64_t y = row * sh + pr - ph, x = col * sw + pc - pw;
                const int64_t plane = (j * sh + pr) * sw + pc;
                const double v = y < 0 || y >= h || x < 0 || x >= w ? 0.0 : at(j, y, x, b);
                want[((plane * height + row) * width + col) * batch + b] =
                    std::is_same_v<S, float> ? v : lcnn::ToFloat(lcnn::FromFloat(static_cast<float>(v)));
              }
    return want;
  };
  auto widened = [](const std::vector<S>& out) {
    std::vector<float> f(out.size());
    for (size_t i = 0; i < out.size(); ++i) f[i] = lcnn::ToFloat(out[i]);
    return f;
  };
  const double rtol = std::is_same_v<S, float> ? 1e-5 : 8e-3;  // one bfloat16 rounding apart at most
  char name[200];
  std::snprintf(name, sizeof(name), "%%s to %s: m%ld k%ld %ldx%ld b%ld pad %ld,%ld stride %ld,%ld", TypeName<S>(),
                long(m), long(k), long(h), long(w), long(batch), long(ph), long(pw), long(sh), long(sw));
  std::vector<S> out(size);
  {
    const std::vector<float> s = Random(k * h * w * batch);
    lcnn::SpaceToDepth(pool, s.data(), k, h, w, batch, ph, pw, sh, sw, height, width, out.data());
    char label[220];
    std::snprintf(label, sizeof(label), name, "space-to-depth");
    Check(label, widened(out), value_at([&](int64_t j, int64_t y, int64_t x, int64_t b) {
            return s[((j * h + y) * w + x) * batch + b];
          }), rtol, 1e-6);
  }
  if (m * k > lcnn::kFusedDictionaryMacsMax) return;
  const std::vector<float> x = Random(batch * h * w * m), d = Random(m * k);  // d (m, k)
  for (bool nhwc : {true, false}) {
    lcnn::DictionaryToDepth(pool, x.data(), nhwc, d.data(), m, k, h, w, batch, ph, pw, sh, sw, height, width,
                            out.data());
    char label[220];
    std::snprintf(label, sizeof(label), name, nhwc ? "dictionary (NHWC input)" : "dictionary (CHWN input)");
    Check(label, widened(out), value_at([&](int64_t j, int64_t y, int64_t xc, int64_t b) {
            double sum = 0.0;
            for (int64_t c = 0; c < m; ++c)
              sum += double(d[c * k + j]) *
                     x[nhwc ? ((b * h + y) * w + xc) * m + c : ((c * h + y) * w + xc) * batch + b];
            return sum;
          }), rtol, 1e-5);
  }
}

// Dense stages: out (rows, n) = x (rows, m) Wᵀ, and out (n, p) = W x (m, p), scaled per output, plus the bias.
template <typename Value>
void CheckDenseStages(ThreadPool& pool, int64_t m, int64_t n, int64_t rows) {
  auto w = RandomWeights<Value>(n * m);
  std::vector<float> scale(n), bias = Random(n);
  for (float& v : scale) v = std::is_same_v<Value, int8_t> ? Uniform(0.001f, 0.01f) : Uniform(0.5f, 2.f);
  const std::vector<float> x = Random(rows * m);
  std::vector<float> out(rows * n, NAN);
  lcnn::DenseRows(pool, x.data(), w.stored.data(), scale.data(), bias.data(), rows, m, n, out.data());
  std::vector<double> want(rows * n), want_columns(rows * n);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < n; ++o) {
      double sum = 0.0, sum_columns = 0.0;
      for (int64_t i = 0; i < m; ++i) {
        sum += w.exact[o * m + i] * x[r * m + i];
        sum_columns += w.exact[o * m + i] * x[i * rows + r];  // x read as (m, p = rows)
      }
      want[r * n + o] = scale[o] * sum + bias[o];
      want_columns[o * rows + r] = scale[o] * sum_columns + bias[o];
    }
  char name[160];
  std::snprintf(name, sizeof(name), "dense %s weights: m%ld n%ld, %ld", TypeName<Value>(), long(m), long(n),
                long(rows));
  Check(std::string(name) + " rows", out, want, 1e-4, 1e-4);
  std::fill(out.begin(), out.end(), NAN);
  lcnn::DenseColumns(pool, x.data(), w.stored.data(), scale.data(), bias.data(), m, rows, n, out.data());
  Check(std::string(name) + " columns", out, want_columns, 1e-4, 1e-4);
}

void CheckMaxPool(ThreadPool& pool, int64_t c, int64_t h, int64_t w, int64_t batch, int64_t window, int64_t stride,
                  int64_t pad, bool relu) {
  lcnn::PoolGeometry p{window, window, stride, stride, pad, pad, (h + 2 * pad - window) / stride + 1,
                       (w + 2 * pad - window) / stride + 1, relu};
  const std::vector<float> x = Random(c * h * w * batch);
  std::vector<double> want(c * p.oh * p.ow * batch);
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t py = 0; py < p.oh; ++py)
      for (int64_t px = 0; px < p.ow; ++px)
        for (int64_t b = 0; b < batch; ++b) {
          double m = relu ? 0.0 : -INFINITY;
          for (int64_t y = py * stride - pad; y < py * stride - pad + window; ++y)
            for (int64_t xc = px * stride - pad; xc < px * stride - pad + window; ++xc)
              if (y >= 0 && y < h && xc >= 0 && xc < w) m = std::max(m, double(x[((ch * h + y) * w + xc) * batch + b]));
          want[((ch * p.oh + py) * p.ow + px) * batch + b] = m;
        }
  std::vector<float> out(want.size(), NAN);
  lcnn::MaxPool(pool, x.data(), c, h, w, batch, p, out.data());
  char name[160];
  std::snprintf(name, sizeof(name), "max pooling %ldx%ld stride %ld pad %ld%s: c%ld %ldx%ld b%ld", long(window),
                long(window), long(stride), long(pad), relu ? " relu" : "", long(c), long(h), long(w), long(batch));
  Check(name, out, want, 0.0, 0.0);
  if (batch == 1) {
    std::fill(out.begin(), out.end(), NAN);
    lcnn::MaxPoolImage(x.data(), c, h, w, p, out.data());
    Check(std::string(name) + " (one image)", out, want, 0.0, 0.0);
  }
}

}  // namespace

// The dense convolution (DenseConv): x (c, h, w, batch) with a kernel (kh, kw) packed as kernels.py packs it,
// (tiles, c kh kw, R) with the outputs past n zero, against the float64 convolution; a residual and the ReLU too.
void CheckDenseConv(ThreadPool& pool, int64_t c, int64_t h, int64_t w, int64_t batch, int64_t n, int64_t k,
                    int64_t stride, int64_t pad, bool epilogue) {
  constexpr int64_t R = lcnn::kConvTileOutputs;
  const int64_t oh = (h + 2 * pad - k) / stride + 1, ow = (w + 2 * pad - k) / stride + 1, m = c * k * k;
  const int64_t tiles = (n + R - 1) / R, p = oh * ow * batch;
  const std::vector<float> x = Random(c * h * w * batch), weights = Random(n * m), bias = Random(n),
                           residual = Random(n * p);
  std::vector<float> packed(tiles * m * R, 0.f);
  for (int64_t o = 0; o < n; ++o)
    for (int64_t i = 0; i < m; ++i) packed[(o / R * m + i) * R + o % R] = weights[o * m + i];
  std::vector<double> want(n * p);
  for (int64_t o = 0; o < n; ++o)
    for (int64_t y = 0; y < oh; ++y)
      for (int64_t xo = 0; xo < ow; ++xo)
        for (int64_t b = 0; b < batch; ++b) {
          double sum = bias[o];
          for (int64_t ch = 0; ch < c; ++ch)
            for (int64_t dy = 0; dy < k; ++dy)
              for (int64_t dx = 0; dx < k; ++dx) {
                const int64_t iy = y * stride + dy - pad, ix = xo * stride + dx - pad;
                if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                  sum += static_cast<double>(weights[o * m + (ch * k + dy) * k + dx]) *
                         x[((ch * h + iy) * w + ix) * batch + b];
              }
          const int64_t q = (y * ow + xo) * batch + b;
          if (epilogue) sum = std::max(sum + residual[o * p + q], 0.0);
          want[o * p + q] = sum;
        }
  std::vector<float> out(n * p, NAN);
  const lcnn::ConvGeometry g{c, h, w, batch, n, k, k, stride, stride, pad, pad, oh, ow};
  lcnn::DenseConv(pool, g, x.data(), packed.data(), bias.data(), epilogue ? residual.data() : nullptr, epilogue,
                  out.data());
  char name[200];
  std::snprintf(name, sizeof(name), "dense convolution: c%ld %ldx%ld b%ld n%ld k%ld stride %ld pad %ld%s", long(c),
                long(h), long(w), long(batch), long(n), long(k), long(stride), long(pad),
                epilogue ? " +residual relu" : "");
  Check(name, out, want, 1e-4, 1e-4);
}

int main(int argc, char** argv) {
  const unsigned long seed = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : std::random_device{}();
  rng.seed(seed);
  std::printf("lookup kernel check: %d-float vectors (%s), seed %lu\n", lcnn::kLanes,
#if defined(__AVX512F__)
              "AVX-512",
#elif defined(__AVX2__)
              "AVX2",
#elif defined(__aarch64__)
              "AArch64 NEON",
#elif defined(__SSE2__)
              "SSE2",
#else
              "generic",
#endif
              seed);
  ThreadPool pool(3);
  // Every block width: wide = ((oh - 1) W + ow) batch from 6 (V = 0) to thousands (V = 8); tiles of 0 and 4 KiB.
  for (int64_t batch : {1, 3, 16, 19}) {
    for (auto [H, W, R, C] : {std::array<int64_t, 4>{4, 4, 3, 3}, {9, 9, 3, 3}, {15, 13, 5, 3}}) {
      for (int64_t tile : {0, 4096}) {
        CheckConv<float, uint16_t, float>(pool, 6, H, W, R, C, batch, 37, tile, false);
        CheckConv<float, int32_t, int8_t>(pool, 6, H, W, R, C, batch, 21, tile, true);
      }
      CheckConv<lcnn::BF16, uint16_t, lcnn::BF16>(pool, 5, H, W, R, C, batch, 19, 0, false);
      CheckConv<float, uint16_t, lcnn::BF16>(pool, 5, H, W, R, C, batch, 17, 4096, true);
    }
  }
  CheckConv<float, uint8_t, float>(pool, 2, 6, 6, 3, 3, 2, 9, 0, false);  // indices below 256
  for (int64_t batch : {1, 2, 17, 32, 70}) {  // chunks from 16 wide elements on: blocks of 16, 32, 64 summed
    CheckDense<uint16_t, float>(pool, 2304, batch, 70, 300, 512);
    CheckDense<int32_t, int8_t>(pool, 70000, batch, 33, 900, 4096);  // indices past 16 bits
    CheckDense<uint16_t, lcnn::BF16>(pool, 1000, batch, 40, 17, 256);  // short rows: masked tails
  }
  for (int64_t batch : {1, 2, 7, 16, 33}) {  // 16 and 33: NHWC input staged through tiles of 16 images
    CheckToDepth<float>(pool, 3, 3, 23, 21, batch, 2, 1, 4, 4);  // an RGB first layer, stride 4
    CheckToDepth<float>(pool, 1, 3, 11, 9, batch, 0, 0, 1, 1);
    CheckToDepth<float>(pool, 2, 5, 10, 12, batch, 1, 2, 2, 3);  // a dictionary of run-time size
    CheckToDepth<float>(pool, 3, 1, 9, 8, batch, 1, 1, 2, 2);
    CheckToDepth<float>(pool, 1, 1, 7, 5, batch, 0, 1, 1, 2);
    CheckToDepth<lcnn::BF16>(pool, 3, 3, 23, 21, batch, 2, 1, 4, 4);
    CheckToDepth<lcnn::BF16>(pool, 9, 9, 10, 11, batch, 1, 1, 2, 2);  // m k above the fused limit: copy only
  }
  for (int64_t rows : {1, 3, 8, 11, 40, 150}) {
    CheckDenseStages<float>(pool, 77, 35, rows);
    CheckDenseStages<lcnn::BF16>(pool, 64, 19, rows);
    CheckDenseStages<int8_t>(pool, 130, 16, rows);
  }
  // The column stage's tiles of R outputs (kDenseTileOutputs: 8 with AVX-512, 3 with AVX2, 2 on NEON, per block
  // of 32 columns; twice as many per block of 16): fewer outputs than a tile (1, 2, and 5 with AVX-512), a last
  // tile overlapping the one before (30 = 3 tiles of 8 and an overlapping 4th with AVX-512; 5 = 3 and an
  // overlapping 3 with AVX2; 5 on NEON), 17 columns (blocks of 16), and a conv4-like stage at batch 1 (384 inputs,
  // 15 x 15 columns) large enough for the pool's threads.
  for (int64_t rows : {17, 33, 225}) {
    CheckDenseStages<float>(pool, 7, 1, rows);
    CheckDenseStages<float>(pool, 12, 2, rows);
    CheckDenseStages<float>(pool, 9, 5, rows);
    CheckDenseStages<float>(pool, 384, 30, rows);
    CheckDenseStages<int8_t>(pool, 40, 30, rows);
  }
  for (int64_t batch : {1, 5, 16, 19}) {  // 19: a run of 16 images in registers, then 3 one by one
    CheckMaxPool(pool, 4, 13, 13, batch, 3, 2, 0, false);
    CheckMaxPool(pool, 3, 12, 11, batch, 3, 2, 1, true);
    CheckMaxPool(pool, 2, 8, 8, batch, 2, 2, 0, false);
  }
  CheckMaxPool(pool, 96, 55, 55, 1, 3, 2, 0, true);   // AlexNet's first pooling at batch 1
  CheckMaxPool(pool, 300, 61, 61, 1, 3, 2, 1, false);  // more work
  CheckMaxPool(pool, 5, 9, 71, 1, 3, 2, 1, true);      // 36 pooled columns: two whole vectors and a part
  CheckMaxPool(pool, 1, 4, 5, 1, 2, 2, 1, false);      // one channel, a pooled row shorter than a vector
  CheckMaxPool(pool, 3, 10, 40, 1, 3, 1, 1, false);    // column strides other than 2: the loops for any stride
  CheckMaxPool(pool, 3, 10, 40, 1, 3, 3, 0, true);
  // Panels of kConvPanel columns (16 with AVX2, 64 with AVX-512) with a partial last one, tiles of R outputs with
  // a partial last one, taps outside the map, strides, batches; and AlexNet-LCNN's conv2 and conv3 at batch 1,
  // large enough for the pool's threads.
  for (int64_t batch : {1, 3}) {
    CheckDenseConv(pool, 5, 9, 7, batch, 13, 3, 1, 1, false);
    CheckDenseConv(pool, 4, 11, 12, batch, 6, 5, 2, 2, true);
    CheckDenseConv(pool, 3, 6, 6, batch, 1, 1, 1, 0, true);
    CheckDenseConv(pool, 7, 8, 10, batch, 20, 3, 3, 0, false);
  }
  CheckDenseConv(pool, 64, 27, 27, 1, 192, 5, 1, 2, true);
  CheckDenseConv(pool, 192, 13, 13, 1, 384, 3, 1, 1, false);
  std::printf("%d of %d checks failed\n", failures, checks);
  return failures ? 1 : 0;
}
