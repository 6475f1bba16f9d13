// The fast AlexNet-LCNN's stages at batch 1 other than conv1 (benchmarks/first_layer_ab.cc has conv1), timed for
// two versions of lookup_kernel.h side by side in one process, on two threads. Run by benchmarks/batch1_ab.py,
// which writes the baseline header (namespace lcnn_base) from another git revision and compiles this file against
// both:
//
//   g++ -O3 -std=c++17 -march=native -DBASE_HEADER='"base.h"' batch1_ab.cc -o ab -lpthread
//   ./ab ROUNDS
//
// Stages: the dictionary stages of conv2-conv5 (DenseColumns: 30 atoms from 64, 192, 384 and 256 channels over
// 27x27 and 13x13 maps); fc6's lookups (4096 outputs, 711 random non-zeros each among 512 atoms x 6 x 6, the
// fast point's density 0.0386; and 3565 among 1024 x 6 x 6, the accurate point's 0.0967) and fc7's (20 among
// 512 atoms, 99 among 1024) stored output by output (Dispatch) and in chunks of 4096 elements of S
// (DispatchChunked), each timed warm (run again at once) and cold (after 128 MB were read through the caches, as
// a model's other weights leave them at batch 1); and the lookups of conv2 (30 atoms, 5x5, 192 outputs over
// 27x27) and conv3 (384 outputs over 13x13, 3x3) at the fast point, and of conv3 at the accurate point (500
// atoms, density 0.0967), random non-zeros among each output's atoms x taps, S padded as the kernel reads it;
// AlexNet's three max poolings (3x3, stride 2, with the ReLU), each channel's plane pooled. A
// dictionary stage's input is written just before it is timed, as the layer before it leaves it in a model; its
// weights come from wherever fc6's lookups left them. Each round times both headers on every stage, the
// baseline first in even rounds and the current one first in odd ones (with the baseline always
// first, the same code measured up to 12% slower second); one line of medians per version and stage.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../lcnn_jax/inference/lookup_kernel.h"
#include "ab_driver.h"
#include BASE_HEADER

namespace {

std::vector<char> flush_buffer(128 << 20, 1);
volatile long flush_sink;

void FlushCaches() {
  long sum = 0;
  for (size_t i = 0; i < flush_buffer.size(); i += 64) sum += ++flush_buffer[i];
  flush_sink = sum;
}

struct Stage {
  std::string name;
  std::vector<double> times[2];
  float worst = 0.f;  // largest difference between the versions' outputs
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s ROUNDS\n", argv[0]);
    return 2;
  }
  const int64_t rounds = std::atoll(argv[1]);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  auto random = [&](int64_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = uniform(rng);
    return v;
  };
  ab::ThreadPool pool(2);

  struct Columns { const char* name; int64_t m, n, p; };
  const std::vector<Columns> columns{{"conv2 dictionary", 64, 30, 27 * 27}, {"conv3 dictionary", 192, 30, 13 * 13},
                                     {"conv4 dictionary", 384, 30, 13 * 13}, {"conv5 dictionary", 256, 30, 13 * 13}};
  struct ColumnData { std::vector<float> x, written, w, scale, bias, out[2]; };
  std::vector<ColumnData> data;
  for (const Columns& c : columns) {
    ColumnData d{random(c.m * c.p), {}, random(c.n * c.m), random(c.n), random(c.n), {}};
    d.written = d.x;
    d.out[0].resize(c.n * c.p);
    d.out[1].resize(c.n * c.p);
    data.push_back(std::move(d));
  }

  // fc6: S of atoms x 6 x 6 (512 at the fast point, 1024 at the accurate one), its non-zeros in memory order per
  // output; the same chunk by chunk of 4096 elements of S.
  // fc7: S of 512 (1024) atoms, one chunk.
  struct Fc6Case { const char* name; int64_t atoms, taps; double density; };
  const std::vector<Fc6Case> fc6_cases{{"fc6", 512, 36, 0.0386}, {"fc6 (accurate)", 1024, 36, 0.0967},
                                       {"fc7", 512, 1, 0.0386}, {"fc7 (accurate)", 1024, 1, 0.0967}};
  const int64_t n = 4096, chunk = 4096;
  struct Fc6Data {
    int64_t chunks;
    std::vector<float> s, scale, bias, values, chunk_values, out[2][2];  // out[version][chunked]
    std::vector<int32_t> starts{0}, chunk_starts{0};
    std::vector<uint16_t> indices, chunk_indices;
  };
  std::vector<Fc6Data> fc6s;
  for (const Fc6Case& c : fc6_cases) {
    const int64_t elements = c.atoms * c.taps, per_output = static_cast<int64_t>(c.density * elements + 0.5);
    Fc6Data d;
    d.chunks = (elements + chunk - 1) / chunk;
    d.s = random(elements);
    d.scale = random(n);
    d.bias = random(n);
    std::vector<int32_t> all(elements);
    for (int64_t i = 0; i < elements; ++i) all[i] = static_cast<int32_t>(i);
    for (int64_t o = 0; o < n; ++o) {
      for (int64_t i = 0; i < per_output; ++i) std::swap(all[i], all[i + rng() % (elements - i)]);
      std::vector<int32_t> picked(all.begin(), all.begin() + per_output);
      std::sort(picked.begin(), picked.end());
      for (int32_t p : picked) {
        d.indices.push_back(static_cast<uint16_t>(p));
        d.values.push_back(uniform(rng));
      }
      d.starts.push_back(static_cast<int32_t>(d.indices.size()));
    }
    for (int64_t part = 0; part < d.chunks; ++part)
      for (int64_t o = 0; o < n; ++o) {
        for (int32_t t = d.starts[o]; t < d.starts[o + 1]; ++t)
          if (d.indices[t] / chunk == part) {
            d.chunk_indices.push_back(d.indices[t]);
            d.chunk_values.push_back(d.values[t]);
          }
        d.chunk_starts.push_back(static_cast<int32_t>(d.chunk_indices.size()));
      }
    for (auto& version : d.out)
      for (auto& out : version) out.resize(n);
    fc6s.push_back(std::move(d));
  }

  // Conv lookups at batch 1: S (atoms, H, W) padded, index_t = (atom * H + r) * W + c for tap (r, c).
  struct ConvCase { const char* name; int64_t atoms, n, kernel, size; double density; };
  const std::vector<ConvCase> conv_cases{{"conv2 lookups (fast)", 30, 192, 5, 27, 0.0386},
                                         {"conv3 lookups (fast)", 30, 384, 3, 13, 0.0386},
                                         {"conv3 lookups (accurate)", 500, 384, 3, 13, 0.0967}};
  struct ConvData {
    std::vector<float> s, scale, bias, values, out[2];
    std::vector<int32_t> starts, indices;
    int64_t padded;
  };
  std::vector<ConvData> convs;
  for (const ConvCase& c : conv_cases) {
    ConvData d;
    d.padded = c.size + c.kernel - 1;
    d.s = random(c.atoms * d.padded * d.padded);
    d.scale = random(c.n);
    d.bias = random(c.n);
    d.starts.push_back(0);
    const int64_t taps = c.atoms * c.kernel * c.kernel;
    const int64_t per_output = static_cast<int64_t>(c.density * taps + 0.5);
    std::vector<int32_t> picks(taps);
    for (int64_t i = 0; i < taps; ++i) picks[i] = static_cast<int32_t>(i);
    for (int64_t o = 0; o < c.n; ++o) {
      for (int64_t i = 0; i < per_output; ++i) std::swap(picks[i], picks[i + rng() % (taps - i)]);
      std::vector<int32_t> chosen(picks.begin(), picks.begin() + per_output);
      std::sort(chosen.begin(), chosen.end());
      for (int32_t t : chosen) {  // t = (atom * kernel + r) * kernel + c
        const int64_t atom = t / (c.kernel * c.kernel), r = t / c.kernel % c.kernel, col = t % c.kernel;
        d.indices.push_back(static_cast<int32_t>((atom * d.padded + r) * d.padded + col));
        d.values.push_back(uniform(rng));
      }
      d.starts.push_back(static_cast<int32_t>(d.indices.size()));
    }
    d.out[0].resize(c.n * c.size * c.size);
    d.out[1].resize(c.n * c.size * c.size);
    convs.push_back(std::move(d));
  }

  // AlexNet's three max poolings at batch 1 (3x3, stride 2, the ReLU before them), each channel's plane pooled
  // (MaxPool at batch 1) from a map the layer before just wrote.
  struct PoolCase { const char* name; int64_t c, size; };
  const std::vector<PoolCase> pool_cases{{"pool1 (96 x 55 x 55)", 96, 55}, {"pool2 (256 x 27 x 27)", 256, 27},
                                         {"pool5 (256 x 13 x 13)", 256, 13}};
  struct PoolData { std::vector<float> x, out[2]; int64_t pooled; };
  std::vector<PoolData> pools;
  for (const PoolCase& c : pool_cases) {
    PoolData d{random(c.c * c.size * c.size), {}, (c.size - 3) / 2 + 1};
    d.out[0].resize(c.c * d.pooled * d.pooled);
    d.out[1].resize(c.c * d.pooled * d.pooled);
    pools.push_back(std::move(d));
  }

  std::vector<Stage> stages;
  for (const Columns& c : columns) stages.push_back({c.name, {}, 0.f});
  for (const ConvCase& c : conv_cases) stages.push_back({c.name, {}, 0.f});
  for (const PoolCase& c : pool_cases) stages.push_back({c.name, {}, 0.f});
  for (const Fc6Case& c : fc6_cases)
    for (const char* kind : {" lookups, cold", " lookups, warm", " chunked lookups, cold", " chunked lookups, warm"})
      stages.push_back({std::string(c.name) + kind, {}, 0.f});

  auto timed = [&](auto&& call) {
    const double t0 = ab::Millis();
    call();
    pool.Join();
    return ab::Millis() - t0;
  };
  for (int64_t round = 0; round < rounds + 2; ++round) {  // the first two rounds warm up
    for (int turn = 0; turn < 2; ++turn) {
      const int version = static_cast<int>((turn + round) % 2);  // which goes first alternates by round
      std::vector<double> t;
      for (size_t i = 0; i < columns.size(); ++i) {
        const Columns& c = columns[i];
        ColumnData& d = data[i];
        std::copy(d.written.begin(), d.written.end(), d.x.begin());  // x as the layer before leaves it: just written
        t.push_back(timed([&] {
          if (version == 0) lcnn_base::DenseColumns(pool, d.x.data(), d.w.data(), d.scale.data(), d.bias.data(), c.m,
                                                    c.p, c.n, d.out[0].data());
          else lcnn::DenseColumns(pool, d.x.data(), d.w.data(), d.scale.data(), d.bias.data(), c.m, c.p, c.n,
                                  d.out[1].data());
        }));
      }
      for (size_t i = 0; i < conv_cases.size(); ++i) {
        const ConvCase& c = conv_cases[i];
        ConvData& d = convs[i];
        const int64_t wide = (c.size - 1) * d.padded + c.size;
        t.push_back(timed([&] {
          if (version == 0) {
            const lcnn_base::Geometry cg{1, d.padded, c.n, c.size, c.size, wide, d.padded, c.atoms};
            const lcnn_base::Lookups<int32_t, float> cl{d.starts.data(), d.indices.data(), d.values.data(),
                                                        d.scale.data(), d.bias.data()};
            lcnn_base::Dispatch(pool, cg, d.s.data(), cl, d.out[0].data());
          } else {
            const lcnn::Geometry cg{1, d.padded, c.n, c.size, c.size, wide, d.padded, c.atoms};
            const lcnn::Lookups<int32_t, float> cl{d.starts.data(), d.indices.data(), d.values.data(),
                                                   d.scale.data(), d.bias.data()};
            lcnn::Dispatch(pool, cg, d.s.data(), cl, d.out[1].data());
          }
        }));
      }
      for (size_t i = 0; i < pool_cases.size(); ++i) {
        const PoolCase& c = pool_cases[i];
        PoolData& d = pools[i];
        for (float& v : d.x) v += 0.f;  // written just before, as the layer before leaves it
        t.push_back(timed([&] {
          if (version == 0) {
            const lcnn_base::PoolGeometry p{3, 3, 2, 2, 0, 0, d.pooled, d.pooled, true};
            lcnn_base::MaxPool(pool, d.x.data(), c.c, c.size, c.size, 1, p, d.out[0].data());
          } else {
            const lcnn::PoolGeometry p{3, 3, 2, 2, 0, 0, d.pooled, d.pooled, true};
            lcnn::MaxPool(pool, d.x.data(), c.c, c.size, c.size, 1, p, d.out[1].data());
          }
        }));
      }
      for (Fc6Data& d : fc6s)
        for (bool chunked : {false, true}) {
          auto call = [&] {
            const int64_t elements = static_cast<int64_t>(d.s.size());  // S's planes, as the runtime passes them
            const lcnn::Geometry g{1, 1, n, 1, 1, 1, 1, elements};
            const lcnn_base::Geometry bg{1, 1, n, 1, 1, 1, 1, elements};
            float* out = d.out[version][chunked].data();
            if (version == 0) {
              const lcnn_base::Lookups<uint16_t, float> bl{d.starts.data(), d.indices.data(), d.values.data(),
                                                           d.scale.data(), d.bias.data()};
              const lcnn_base::Lookups<uint16_t, float> blc{d.chunk_starts.data(), d.chunk_indices.data(),
                                                            d.chunk_values.data(), d.scale.data(), d.bias.data()};
              if (chunked) lcnn_base::DispatchChunked(pool, bg, d.s.data(), blc, d.chunks, out);
              else lcnn_base::Dispatch(pool, bg, d.s.data(), bl, out);
            } else {
              const lcnn::Lookups<uint16_t, float> l{d.starts.data(), d.indices.data(), d.values.data(),
                                                     d.scale.data(), d.bias.data()};
              const lcnn::Lookups<uint16_t, float> lc{d.chunk_starts.data(), d.chunk_indices.data(),
                                                      d.chunk_values.data(), d.scale.data(), d.bias.data()};
              if (chunked) lcnn::DispatchChunked(pool, g, d.s.data(), lc, d.chunks, out);
              else lcnn::Dispatch(pool, g, d.s.data(), l, out);
            }
          };
          FlushCaches();
          t.push_back(timed(call));
          t.push_back(timed(call));
        }
      if (round >= 2)
        for (size_t i = 0; i < stages.size(); ++i) stages[i].times[version].push_back(t[i]);
      if (turn == 1) {
        for (size_t i = 0; i < columns.size(); ++i)
          for (size_t j = 0; j < data[i].out[0].size(); ++j)
            stages[i].worst = std::max(stages[i].worst, std::abs(data[i].out[0][j] - data[i].out[1][j]));
        for (size_t i = 0; i < conv_cases.size(); ++i)
          for (size_t j = 0; j < convs[i].out[0].size(); ++j)
            stages[columns.size() + i].worst = std::max(stages[columns.size() + i].worst,
                                                        std::abs(convs[i].out[0][j] - convs[i].out[1][j]));
        for (size_t i = 0; i < pool_cases.size(); ++i) {
          Stage& stage = stages[columns.size() + conv_cases.size() + i];
          for (size_t j = 0; j < pools[i].out[0].size(); ++j)
            stage.worst = std::max(stage.worst, std::abs(pools[i].out[0][j] - pools[i].out[1][j]));
        }
        const size_t first_fc6 = columns.size() + conv_cases.size() + pool_cases.size();
        for (size_t i = first_fc6; i < stages.size(); ++i) {
          const Fc6Data& d = fc6s[(i - first_fc6) / 4];
          const size_t chunked = (i - first_fc6) % 4 / 2;  // cold and warm of plain, then of chunked lookups
          for (int64_t o = 0; o < n; ++o)
            stages[i].worst = std::max(stages[i].worst, std::abs(d.out[0][chunked][o] - d.out[1][chunked][o]));
        }
      }
    }
  }
  float worst = 0.f;
  for (const Stage& stage : stages) {
    for (int version = 0; version < 2; ++version)
      std::printf("%s %s: %.4f ms\n", version == 0 ? "base" : "current", stage.name.c_str(),
                  ab::Median(stage.times[version]));
    worst = std::max(worst, stage.worst);
  }
  std::printf("largest difference between the versions' outputs: %.3g\n", worst);
  return worst <= 1e-3 ? 0 : 1;
}
