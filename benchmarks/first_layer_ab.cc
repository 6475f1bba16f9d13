// A first layer's two stages in the lookup kernel, timed for two versions of lookup_kernel.h side by side in one
// process: AlexNet's conv1 (RGB 224x224 NHWC images, a 3x3 dictionary, 11x11 windows at stride 4 and padding 2,
// 64 outputs with 14 random non-zeros each of 3 * 121 coefficients, then 3x3 max pooling at stride 2 with the
// ReLU), at one batch size, on two threads. Run by benchmarks/first_layer_ab.py, which writes the baseline
// header (namespace lcnn_base) from another git revision and compiles this file against both:
//
//   g++ -O3 -std=c++17 -march=native -DBASE_HEADER='"base.h"' first_layer_ab.cc -o ab -lpthread
//   ./ab BATCH TILE_BYTES ROUNDS
//
// Each round times, for both headers, the dictionary stage (DictionaryToDepth into the padded space-to-depth S)
// and the pooled lookups (DispatchPooled), the baseline first in even rounds and the current header first in odd
// ones (in benchmarks/batch1_ab.cc, whichever ran second measured up to 12% slower on the same code); one line of
// medians per version.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../lcnn_jax/inference/lookup_kernel.h"
#include "ab_driver.h"
#include BASE_HEADER

using ab::Median;
using ab::Millis;
using ab::ThreadPool;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s BATCH TILE_BYTES ROUNDS\n", argv[0]);
    return 2;
  }
  const int64_t batch = std::atoll(argv[1]), tile_bytes = std::atoll(argv[2]), rounds = std::atoll(argv[3]);
  const int64_t m = 3, k = 3, h = 224, w = 224, ph = 2, pw = 2, sh = 4, sw = 4, n = 64, taps = 11;
  const int64_t height = (h + 2 * ph + sh - 1) / sh, width = (w + 2 * pw + sw - 1) / sw, planes = k * sh * sw;
  const int64_t oh = (h + 2 * ph - taps) / sh + 1, ow = (w + 2 * pw - taps) / sw + 1;
  const int64_t poh = (oh - 3) / 2 + 1, pow_ = (ow - 3) / 2 + 1;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<float> x(batch * h * w * m), d(m * k);
  for (float& v : x) v = uniform(rng);
  for (float& v : d) v = uniform(rng);
  // 14 non-zeros per output among its 3 atoms x 11 x 11 taps (the fast point's density, 0.0386), each tap
  // (ky, kx) of atom a at S's plane (a, ky % 4, kx % 4), row ky / 4 and column kx / 4, visited in memory order.
  std::vector<int32_t> starts{0};
  std::vector<uint16_t> indices;
  std::vector<float> values;
  std::vector<int64_t> all(k * taps * taps);
  for (int64_t i = 0; i < static_cast<int64_t>(all.size()); ++i) all[i] = i;
  for (int64_t o = 0; o < n; ++o) {
    std::shuffle(all.begin(), all.end(), rng);
    std::vector<int64_t> positions;
    for (int64_t i = 0; i < 14; ++i) {
      const int64_t f = all[i], atom = f / (taps * taps), ky = f / taps % taps, kx = f % taps;
      positions.push_back((((atom * sh + ky % sh) * sw + kx % sw) * height + ky / sh) * width + kx / sw);
    }
    std::sort(positions.begin(), positions.end());
    for (int64_t p : positions) {
      indices.push_back(static_cast<uint16_t>(p));
      values.push_back(uniform(rng));
    }
    starts.push_back(static_cast<int32_t>(indices.size()));
  }
  std::vector<float> scale(n, 1.f), bias(n, 0.1f), s(planes * height * width * batch);
  std::vector<float> out(n * poh * pow_ * batch), base_out(out.size());
  ThreadPool pool(2);

  const lcnn::Lookups<uint16_t, float> l{starts.data(), indices.data(), values.data(), scale.data(), bias.data()};
  const lcnn::Geometry g{batch, width, n, oh, ow, ((oh - 1) * width + ow) * batch, height, planes};
  const lcnn::PoolGeometry p{3, 3, 2, 2, 0, 0, poh, pow_, true};
  lcnn::Tile tile;
  tile.bytes = tile_bytes;
  const lcnn_base::Lookups<uint16_t, float> bl{starts.data(), indices.data(), values.data(), scale.data(),
                                                bias.data()};
  const lcnn_base::Geometry bg{batch, width, n, oh, ow, ((oh - 1) * width + ow) * batch, height, planes};
  const lcnn_base::PoolGeometry bp{3, 3, 2, 2, 0, 0, poh, pow_, true};
  lcnn_base::Tile btile;
  btile.bytes = tile_bytes;

  std::vector<double> times[2][2];  // [version][stage]
  for (int64_t round = 0; round < rounds + 2; ++round) {  // the first two rounds warm up
    for (int turn = 0; turn < 2; ++turn) {
      const int version = static_cast<int>((turn + round) % 2);  // which goes first alternates by round
      const double t0 = Millis();
      if (version == 0) {
        lcnn_base::DictionaryToDepth(pool, x.data(), true, d.data(), m, k, h, w, batch, ph, pw, sh, sw, height,
                                     width, s.data());
      } else {
        lcnn::DictionaryToDepth(pool, x.data(), true, d.data(), m, k, h, w, batch, ph, pw, sh, sw, height, width,
                                s.data());
      }
      pool.Join();
      const double t1 = Millis();
      if (version == 0) lcnn_base::DispatchPooled(pool, bg, s.data(), bl, bp, base_out.data(), btile);
      else lcnn::DispatchPooled(pool, g, s.data(), l, p, out.data(), tile);
      pool.Join();
      const double t2 = Millis();
      if (round >= 2) {
        times[version][0].push_back(t1 - t0);
        times[version][1].push_back(t2 - t1);
      }
    }
  }
  double worst = 0.0;  // both versions must agree on the output
  for (size_t i = 0; i < out.size(); ++i) worst = std::max(worst, double(std::abs(out[i] - base_out[i])));
  for (int version = 0; version < 2; ++version) {
    const double dictionary = Median(times[version][0]), lookups = Median(times[version][1]);
    std::printf("%s batch %ld tile %ld: dictionary %.3f ms, pooled lookups %.3f ms, layer %.3f ms\n",
                version == 0 ? "base" : "current", long(batch), long(tile_bytes), dictionary, lookups,
                dictionary + lookups);
  }
  std::printf("largest difference between the versions' outputs: %.3g\n", worst);
  return worst <= 1e-4 ? 0 : 1;
}
