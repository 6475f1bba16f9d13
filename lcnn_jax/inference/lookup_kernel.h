// The lookup stage of an LCNN layer on CPU, free of XLA; lookup_kernel.cc binds it to the XLA FFI.
//
// Given S, the dictionary responses of a layer's padded input, each output value is a weighted sum of a few
// shifted copies of S: out[o, y, x, b] = bias[o] + sum_t values[t] * S[atom_t, y + r_t, x + c_t, b] over the
// non-zeros t of output o (strided layers arrive as stride-1 ones over a space-to-depth view of S).
//
// Layout (channels first, batch last, "CHWN"): S is (atoms, H, W, batch), so one non-zero reads a contiguous
// run of S. (Splitting the batch into tiles of a few images, for a tile's S to stay in cache, measured slower
// end to end: CHWN activations then take partial cache-line writes, XLA's pooling short vectors.) We compute a
// "wide" output row of W positions per output row (of which the first ow are kept): wide element q = (y * W + x) * batch + b reads S[index_t * batch + q], where
// index_t = (atom_t * H + r_t) * W + c_t. Each non-zero is then one vector multiply-add over a block of
// consecutive wide elements, with the accumulators held in registers across all non-zeros of the output.
//
// S arrives unpadded, (k, h, w, batch), as the dictionary matmul leaves it. A layer with padding or strides
// first copies it into a zero-padded space-to-depth scratch buffer (k * sh * sw, H, W, batch); a layer with
// neither reads S in place.

#ifndef LCNN_JAX_INFERENCE_LOOKUP_KERNEL_H_
#define LCNN_JAX_INFERENCE_LOOKUP_KERNEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
// GCC 12's AVX-512 intrinsics start many results from an "undefined" register, which -Wmaybe-uninitialized
// reports wherever they are inlined (GCC bug 105593, fixed in GCC 13): silenced for that header alone.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

// A Pool is anything with num_threads() and Schedule(task), such as xla::ffi::ThreadPool.
namespace lcnn {

// The kernel's limits, read by Python (lcnn_jax.inference.kernels.LIMITS parses the lines of this block, so keep
// each one `constexpr int64_t kName = <integer>;`; Python sees kName as name in snake case).
// BEGIN LIMITS
// A dictionary applied inside the kernel (lcnn_lookup_conv_fused) has at most this many multiply-adds per pixel
// (m·k): DictionaryRows holds it, and one pixel's m inputs, in fixed-size arrays.
constexpr int64_t kFusedDictionaryMacsMax = 64;
// A layer pools its own output only when a pooled row holds at least this many values (out_w · batch): the
// pooled lookups run in blocks of 16 wide elements.
constexpr int64_t kPooledRowMin = 16;
// From this batch on, the caller lets the kernel pool CHWN activations: its innermost pooling loops run over the
// batch, too short to vectorise below (AlexNet-LCNN's first pooling at batch 1: 1.0 ms here, 0.08 ms in XLA).
constexpr int64_t kPooledBatchMin = 16;
// DenseRows takes this many rows of x at once, each weight read once for all of them: up to this many rows, a
// dense layer with weights as stored (bfloat16, int8) is faster here than XLA's matmul over a float32 copy.
constexpr int64_t kDenseRowsMax = 8;
// From this many non-zeros of an output on, its last, partial block of wide elements is split (LookupBlock).
// Each block costs a fixed setup and store besides its multiply-adds, so outputs with few non-zeros keep one
// whole block: at batch 1, conv3's lookups took 11% more time split at the fast point (10 non-zeros an output),
// and 10% less at the accurate point (436) than as one whole block (AMD EPYC Zen 4, benchmarks/batch1_ab.py).
constexpr int64_t kSplitNonZeros = 64;
// The dense convolution (DenseConv) reads its weights packed in tiles of this many outputs (kernels.py packs them).
constexpr int64_t kConvTileOutputs = 6;
// END LIMITS

// The kinds of a step of lcnn_network (kernels.py reads them as the limits above).
// BEGIN STEPS
constexpr int64_t kStepFusedLookups = 0;
constexpr int64_t kStepLookups = 1;
constexpr int64_t kStepDense = 2;
// END STEPS

// 16 floats as one value of GCC's generic vectors: one zmm register with AVX-512, two ymm with AVX2, four
// registers with SSE2 or NEON. The kernel's arithmetic is written on these (and compiles on any target GCC or
// Clang knows); intrinsics appear only where a target has an instruction generic vectors cannot express
// (gathers), each with a portable fallback.
//
// A v16 is built from the target's own register width (kLanes floats): one 64-byte generic vector where no
// register holds 64 bytes makes GCC lower every operation through memory (the AVX2 build's lookups ran 5-8×
// slower than AVX-512's that way), whereas parts of the native width stay in registers.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE2, NEON, or plain scalar code the compiler vectorises as it can
#endif
constexpr int kParts = 16 / kLanes;
typedef float vnative __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef float vnative_in_memory __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
typedef uint32_t unative __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef uint16_t u16native __attribute__((vector_size(2 * kLanes), aligned(2)));
typedef int8_t i8native __attribute__((vector_size(kLanes), aligned(1)));
typedef int32_t i32native __attribute__((vector_size(4 * kLanes), aligned(4)));

struct v16 {
  vnative part[kParts];
};

inline v16& operator+=(v16& a, const v16& b) {
  for (int i = 0; i < kParts; ++i) a.part[i] += b.part[i];
  return a;
}
inline v16 operator*(float c, const v16& v) {
  v16 r;
  for (int i = 0; i < kParts; ++i) r.part[i] = c * v.part[i];
  return r;
}

// A direct unaligned load (memcpy into a vector was compiled, for 32-byte vectors, as two 16-byte loads stored
// to the stack and read back: a store-forwarding stall on every non-zero).
inline vnative LoadNative(const float* p) { return *reinterpret_cast<const vnative_in_memory*>(p); }

inline v16 Load(const float* p) {
  v16 v;
  for (int i = 0; i < kParts; ++i) v.part[i] = LoadNative(p + i * kLanes);
  return v;
}

// How many floats of accumulators the hot loops keep in registers, leaving the rest of the register file for
// loaded values and broadcast coefficients: 8 of 32 zmm with AVX-512, 8 of 16 ymm with AVX2, 16 of 32 q registers
// with NEON, 8 of 16 xmm with SSE2. A block of 16 * V wide elements (and U independent sets of them) is sized so
// its accumulators fit: a block of 128 floats, sized for AVX-512, would take all 16 ymm registers of AVX2.
#if defined(__AVX512F__)
constexpr int kAccumulatorFloats = 128;
#elif defined(__AVX__) || defined(__ARM_NEON) || defined(__aarch64__)
constexpr int kAccumulatorFloats = 64;
#else
constexpr int kAccumulatorFloats = 32;
#endif
// The widest block (vectors of 16 floats) whose accumulators fit: 8, 4 or 2; and a block of V vectors capped to it.
constexpr int kBlockVectorsMax = kAccumulatorFloats / 16;
template <int V>
constexpr int kFit = V < kBlockVectorsMax ? V : kBlockVectorsMax;
// Independent accumulator sets for a block of V vectors: as many as fit.
template <int V>
constexpr int kSets = V >= kBlockVectorsMax ? 1 : kBlockVectorsMax / V;

// Calls f(std::integral_constant<int, V>{}) with the block of V vectors of 16 that rows of `wide` elements
// fill (callers handle fewer than 16 themselves): 1 under 32, 2 under 64, 4 under 128, else 8, each capped to
// what fits (kFit).
template <typename F>
void WithBlockVectors(int64_t wide, F&& f) {
  if (wide < 32) f(std::integral_constant<int, kFit<1>>{});
  else if (wide < 64) f(std::integral_constant<int, kFit<2>>{});
  else if (wide < 128) f(std::integral_constant<int, kFit<4>>{});
  else f(std::integral_constant<int, kFit<8>>{});
}

inline float Sum(const v16& v) {
  vnative total = v.part[0];
  for (int i = 1; i < kParts; ++i) total += v.part[i];
  float sum = 0.f;
  for (int i = 0; i < kLanes; ++i) sum += total[i];
  return sum;
}

// Stored weights: float32, bfloat16 (its 16 high bits, as stored) or int8 (scaled per output, see Lookups).
// Each is converted to float32 as it is loaded into registers; accumulation is float32 throughout.
struct BF16 {
  uint16_t bits;
};

inline float ToFloat(float v) { return v; }
inline float ToFloat(int8_t v) { return static_cast<float>(v); }
inline float ToFloat(BF16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// S, the dictionary responses the lookups read, is float32, or bfloat16 where a layer of a bfloat16 or int8
// export asks for it (``lookup:s=bfloat16``): half the bytes to write, keep in cache and read, each element
// widened to float32 in registers as it is loaded (the accumulation stays float32).
inline vnative LoadS(const float* p) { return LoadNative(p); }
inline vnative LoadS(const BF16* p) {
  u16native bits;
  std::memcpy(&bits, p, sizeof(bits));
  const unative wide = __builtin_convertvector(bits, unative) << 16;
  vnative v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

// 16 consecutive stored weights as float32 (portable: widened and shifted, or converted, in registers).
inline v16 Load16(const float* p) { return Load(p); }
inline v16 Load16(const BF16* p) {
  v16 v;
  for (int i = 0; i < kParts; ++i) v.part[i] = LoadS(p + i * kLanes);
  return v;
}
// int8: sign-extended to int32 and converted, two instructions per register on x86 (vpmovsxbd, vcvtdq2ps). GCC
// builds the generic form from the loaded bytes one lane at a time (a shift pair and an insert per byte), which
// made int8 layers slower than float32 ones.
inline v16 Load16(const int8_t* p) {
  v16 v;
#if defined(__AVX512F__)
  v.part[0] = static_cast<vnative>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  for (int i = 0; i < kParts; ++i) {
    v.part[i] = static_cast<vnative>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i * kLanes)))));
  }
#else
  for (int i = 0; i < kParts; ++i) {
    i8native bytes;
    std::memcpy(&bytes, p + i * kLanes, sizeof(bytes));
    v.part[i] = __builtin_convertvector(__builtin_convertvector(bytes, i32native), vnative);
  }
#endif
  return v;
}

// float32 -> bfloat16 rounded to the nearest even (a NaN stays a NaN).
inline BF16 FromFloat(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>(u >> 16)};
}

// 16 values of S stored as computed: as float32, or rounded to bfloat16 (vcvtneps2bf16 where the CPU has
// AVX512-BF16; otherwise rounded to the nearest even in integer arithmetic, which only a NaN whose mantissa is
// all ones would get wrong).
inline void Store16(float* p, const v16& v) { std::memcpy(p, &v, sizeof(v)); }
inline void Store16(BF16* p, const v16& v) {
#if defined(__AVX512BF16__)
  const __m256bh packed = _mm512_cvtneps_pbh(static_cast<__m512>(v.part[0]));
  std::memcpy(p, &packed, sizeof(packed));
#else
  for (int i = 0; i < kParts; ++i) {
    unative u;
    std::memcpy(&u, &v.part[i], sizeof(u));
    u += 0x7fffu + ((u >> 16) & 1u);
    const u16native bits = __builtin_convertvector(u >> 16, u16native);
    std::memcpy(p + i * kLanes, &bits, sizeof(bits));
  }
#endif
}

// n consecutive float32 values into S's precision.
inline void CopyToS(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void CopyToS(BF16* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) Store16(dst + i, Load(src + i));
  for (; i < n; ++i) dst[i] = FromFloat(src[i]);
}
template <typename S>
inline void ZeroS(S* dst, int64_t n) { std::memset(static_cast<void*>(dst), 0, sizeof(S) * n); }

#if defined(__AVX512F__)

// 16 consecutive indices as int32.
inline __m512i LoadIndices16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512i LoadIndices16(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i LoadIndices16(const int32_t* p) { return _mm512_loadu_si512(p); }
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// 8 consecutive indices as int32.
inline __m256i LoadIndices8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i LoadIndices8(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i LoadIndices8(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
#endif

struct Geometry {
  int64_t batch;   // b
  int64_t width;   // W of S (after space-to-depth)
  int64_t n;       // outputs
  int64_t oh, ow;  // output height and width
  int64_t wide;    // Q = ((oh - 1) * W + ow) * batch: wide elements that hold every kept output
  int64_t height = 0;  // H of S (after space-to-depth); 0: unknown (no tiling)
  int64_t planes = 0;  // atoms of S (k, or k * sh * sw after space-to-depth)
};

// How the lookups are cut into pieces of work that keep their part of S in cache. `bytes`: the S one tile may
// hold (the caller sizes it from this core's L2 at load time; 0: no tiling, one block of wide elements per
// item as before tiles existed); `outputs`: outputs per item (0: as many as load balance allows). Every output
// of an item reads the same rows of S, so a tile's S is loaded from memory once and reused from L2 by all of
// them.
struct Tile {
  int64_t bytes = 0;
  int64_t outputs = 0;
  // Elements of S per chunk for a layer whose output is one pixel (a dense layer), whose lookups are then stored
  // chunk by chunk (see DispatchChunked); 0: stored output by output.
  int64_t chunk = 0;
};

template <typename Index, typename Value = float>
struct Lookups {
  const int32_t* starts;  // (n + 1): output o's non-zeros are [starts[o], starts[o + 1])
  const Index* indices;   // (nnz): index_t as above; uint8, uint16 or int32
  const Value* values;    // (nnz): float, BF16 or int8
  const float* scale;     // (n): output o is scale[o] * (its sum over the stored values) + bias[o]
  const float* bias;      // (n)
  // The epilogue: a residual added to each output (laid out as the output; null: none), then max(·, 0) when
  // relu. Only for outputs stored as computed (not pooled).
  const float* residual = nullptr;
  bool relu = false;
};

// Writes scale * acc + bias (+ residual, then max(·, 0) when relu) for wide elements [p0, p0 + len) of output o
// to out (n, oh, ow, batch), dropping columns x >= ow. The residual, when there is one, is read at the same place.
inline void Store(const Geometry& g, const float* acc, float scale, float bias, const float* residual, bool relu,
                  int64_t o, int64_t p0, int64_t len, float* out) {
  const int64_t row = g.width * g.batch;
  const int64_t kept = g.ow * g.batch;
  const int64_t end = std::min(p0 + len, g.wide);
  // One division for the block, then row by row (a division per row cost as much as the multiply-adds of an
  // output with few non-zeros at batch 1).
  int64_t q = p0, y = p0 / row, xb = p0 - y * row;  // xb = x * batch + b
  for (; q < end; q += row - xb, ++y, xb = 0) {
    if (xb >= kept) continue;
    const int64_t stop = std::min(end, y * row + kept);
    const int64_t at = (o * g.oh + y) * kept + xb;
    float* dst = out + at;
    const float* src = acc + (q - p0);
    const int64_t count = stop - q;
#if defined(__AVX512F__)
    // Sixteen at a time, the last up to 16 under a mask: a row of a small map (13 kept of AlexNet's 13x13
    // layers at batch 1) is one masked vector, where a scalar loop ran it element by element. The ReLU keeps a
    // NaN (max with the NaN second), as the vectors below do.
    const __m512 times = _mm512_set1_ps(scale), plus = _mm512_set1_ps(bias);
    for (int64_t i = 0; i < count; i += 16) {
      const __mmask16 k = count - i >= 16 ? static_cast<__mmask16>(0xffff)
                                          : static_cast<__mmask16>((1u << (count - i)) - 1);
      __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, src + i), times, plus);
      if (residual != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, residual + at + i));
      if (relu) v = _mm512_max_ps(_mm512_setzero_ps(), v);
      _mm512_mask_storeu_ps(dst + i, k, v);
    }
#else
    // Vectors of the target's width, the last one ending at the row's end (overlapping the one before, whose
    // values it writes again unchanged), elements one by one only for a row shorter than a vector. A NaN stays
    // a NaN through the ReLU (it is not below 0).
    const float* add = residual != nullptr ? residual + at : nullptr;
    if (count >= kLanes) {
      for (int64_t i = 0;; i += kLanes) {
        if (i + kLanes > count) i = count - kLanes;  // the last vector ends at the row's end
        vnative v = LoadNative(src + i) * scale + bias;
        if (add != nullptr) v += LoadNative(add + i);
        if (relu) v = v < vnative{} ? vnative{} : v;
        *reinterpret_cast<vnative_in_memory*>(dst + i) = v;
        if (i + kLanes >= count) break;
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        float v = src[i] * scale + bias;
        if (add != nullptr) v += add[i];
        dst[i] = relu && v < 0.f ? 0.f : v;
      }
    }
#endif
  }
}

#if defined(__AVX512BF16__)
// The coefficient's bfloat16 bits where it is exact in bfloat16 (a bfloat16 or int8 stored value).
inline uint32_t BF16Bits(BF16 v) { return v.bits; }
inline uint32_t BF16Bits(int8_t v) {
  const float f = static_cast<float>(v);  // |v| <= 127: 7 significant bits, exact in bfloat16
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u >> 16;
}

// AccumulateBlock over a bfloat16 S in AVX512-BF16's dot products (vdpbf16ps), for coefficients exact in
// bfloat16: each 64-byte load holds 32 wide elements, whose even and odd ones go to two sets of accumulators
// through the coefficient paired with a zero, (c, 0) and (0, c). No conversion of S, half the bytes of a
// float32 S loaded, and as many multiply-add instructions; the two sets are interleaved again once per block.
template <int V, typename Index, typename Value>
void AccumulateBlockDot(const BF16* s, const Lookups<Index, Value>& l, int64_t batch, int64_t o, int64_t p0,
                        float* acc) {
  constexpr int U = kSets<V>;
  constexpr int H = V / 2;  // loads of 32 wide elements per block
  __m512 even[U][H], odd[U][H];
  for (int u = 0; u < U; ++u)
    for (int h = 0; h < H; ++h) even[u][h] = odd[u][h] = _mm512_setzero_ps();
  const BF16* base = s + p0;
  auto step = [&](int u, int32_t t) {
    const BF16* src = base + static_cast<int64_t>(l.indices[t]) * batch;
    const uint32_t c = BF16Bits(l.values[t]);
    const __m512bh low = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(c)));
    const __m512bh high = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(c << 16)));
#pragma GCC unroll 8
    for (int h = 0; h < H; ++h) {
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_loadu_si512(src + 32 * h));
      even[u][h] = _mm512_dpbf16_ps(even[u][h], x, low);
      odd[u][h] = _mm512_dpbf16_ps(odd[u][h], x, high);
    }
  };
  int32_t t = l.starts[o];
  const int32_t end = l.starts[o + 1];
  for (; t + U <= end; t += U)
    for (int u = 0; u < U; ++u) step(u, t + u);
  for (; t < end; ++t) step(0, t);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int h = 0; h < H; ++h) {
    __m512 e = even[0][h], d = odd[0][h];
    for (int u = 1; u < U; ++u) {
      e = _mm512_add_ps(e, even[u][h]);
      d = _mm512_add_ps(d, odd[u][h]);
    }
    _mm512_storeu_ps(acc + 32 * h, _mm512_permutex2var_ps(e, first, d));
    _mm512_storeu_ps(acc + 32 * h + 16, _mm512_permutex2var_ps(e, second, d));
  }
}
#endif

// Sums the non-zeros of output o over the block of 16 * V wide elements starting at p0. U independent sets of
// accumulators hide the multiply-add latency when V is small.
template <int V, typename S, typename Index, typename Value>
void AccumulateBlock(const S* s, const Lookups<Index, Value>& l, int64_t batch, int64_t o, int64_t p0,
                     float* acc) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<S, BF16> && !std::is_same_v<Value, float> && V % 2 == 0) {
    return AccumulateBlockDot<V>(s, l, batch, o, p0, acc);
  }
#endif
  constexpr int U = kSets<V>;
  constexpr int P = V * kParts;  // registers per set of accumulators
  vnative a[U][P];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < P; ++v) a[u][v] = vnative{};
  const S* base = s + p0;
  int32_t t = l.starts[o];
  const int32_t end = l.starts[o + 1];
  for (; t + U <= end; t += U) {
    for (int u = 0; u < U; ++u) {
      const S* src = base + static_cast<int64_t>(l.indices[t + u]) * batch;
      const float c = ToFloat(l.values[t + u]);
#pragma GCC unroll 16
      for (int v = 0; v < P; ++v) a[u][v] += c * LoadS(src + kLanes * v);
    }
  }
  for (; t < end; ++t) {
    const S* src = base + static_cast<int64_t>(l.indices[t]) * batch;
    const float c = ToFloat(l.values[t]);
#pragma GCC unroll 16
    for (int v = 0; v < P; ++v) a[0][v] += c * LoadS(src + kLanes * v);
  }
  for (int u = 1; u < U; ++u)
    for (int v = 0; v < P; ++v) a[0][v] += a[u][v];
  std::memcpy(acc, a[0], sizeof(a[0]));
}

// Non-zeros ahead of those being read whose values and indices are asked for (in the sparse dot products'
// main loops): the gathers from S keep the core's requests to L2 busy, and without them the hardware prefetchers
// fell behind the two streams. fc6 of the fast AlexNet-LCNN at batch 1 (2.9 M non-zeros from memory), kernel
// alone on two threads: 9-17% less time at 256 and 512 non-zeros ahead, 2-11% at 1024 and 2048 (AMD EPYC Zen 4,
// benchmarks/batch1_ab.py).
constexpr int32_t kNonZerosAhead = 256;

template <typename Index, typename Value>
inline void PrefetchNonZeros(const Index* indices, const Value* values, int32_t t, int32_t step) {
  for (int32_t i = 0; i < static_cast<int32_t>(step * sizeof(Value)); i += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(values + t + kNonZerosAhead) + i);
  for (int32_t i = 0; i < static_cast<int32_t>(step * sizeof(Index)); i += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(indices + t + kNonZerosAhead) + i);
}

#if defined(__AVX512F__)
// The first n (< 16) elements at p, zero beyond them, read without touching a byte past them (a byte-masked
// load where the CPU has AVX512-BW, element by element elsewhere).
template <typename T>
struct Tail16 {
  alignas(64) T data[64 / sizeof(T)];
};
template <typename T>
inline Tail16<T> LoadTail16(const T* p, int64_t n) {
  Tail16<T> r;
#if defined(__AVX512BW__)
  const __mmask64 bytes = (1ull << (n * sizeof(T))) - 1;  // n * sizeof(T) <= 60
  _mm512_store_si512(r.data, _mm512_maskz_loadu_epi8(bytes, p));
#else
  std::memset(static_cast<void*>(r.data), 0, sizeof(r.data));
  std::memcpy(static_cast<void*>(r.data), p, n * sizeof(T));
#endif
  return r;
}

// The sixteen lane sums of the sparse dot product over the non-zeros [t, end) of float32 S (at indices[t] *
// batch): two gathers of sixteen a step, then one of sixteen, then one masked gather for the last up to 15
// (the values loaded zero-padded, the masked lanes gathering nothing), instead of a scalar loop whose
// dependent additions cost as much as the gathers on the short runs of a chunk.
template <typename Index, typename Value>
__m512 SparseDotLanes(const float* s, const Index* indices, const Value* values, int64_t batch, int32_t t,
                      int32_t end) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  const __m512i scale = _mm512_set1_epi32(static_cast<int32_t>(batch));
  const bool one = batch == 1;  // positions are the indices themselves: no multiply (10 cycles on some CPUs)
  auto positions = [&](__m512i index) { return one ? index : _mm512_mullo_epi32(index, scale); };
  for (; t + 32 <= end; t += 32) {
    PrefetchNonZeros(indices, values, t, 32);
    a0 = _mm512_fmadd_ps(static_cast<__m512>(Load16(values + t).part[0]),
                         _mm512_i32gather_ps(positions(LoadIndices16(indices + t)), s, 4), a0);
    a1 = _mm512_fmadd_ps(static_cast<__m512>(Load16(values + t + 16).part[0]),
                         _mm512_i32gather_ps(positions(LoadIndices16(indices + t + 16)), s, 4), a1);
  }
  if (t + 16 <= end) {
    a0 = _mm512_fmadd_ps(static_cast<__m512>(Load16(values + t).part[0]),
                         _mm512_i32gather_ps(positions(LoadIndices16(indices + t)), s, 4), a0);
    t += 16;
  }
  if (t < end) {
    const int64_t n = end - t;
    const Tail16<Index> index = LoadTail16(indices + t, n);
    const Tail16<Value> value = LoadTail16(values + t, n);
    const __m512 gathered = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), static_cast<__mmask16>((1u << n) - 1),
                                                     positions(LoadIndices16(index.data)), s, 4);
    a1 = _mm512_fmadd_ps(static_cast<__m512>(Load16(value.data).part[0]), gathered, a1);
  }
  return _mm512_add_ps(a0, a1);
}

inline float SumLanes(__m512 v) {
  alignas(64) float lanes[16];  // summed here: GCC 12's _mm512_reduce_add_ps warns where it is inlined (105593)
  _mm512_store_ps(lanes, v);
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  return sum;
}
#endif

// Fewer than 16 wide elements (a dense layer at a small batch): one sparse dot product per element, over the
// non-zeros [t, end) (at indices[t] * batch of s). The vector gathers read float32 S; a bfloat16 S (no 16-bit
// gathers) takes the scalar loop.
template <typename S, typename Index, typename Value>
float SparseDotRange(const S* s, const Index* indices, const Value* values, int64_t batch, int32_t t,
                     int32_t end) {
  float sum = 0.f;
  if constexpr (std::is_same_v<S, float>) {
#if defined(__AVX512F__)
  return SumLanes(SparseDotLanes(s, indices, values, batch, t, end));
#elif defined(__AVX2__)
  // Eight lanes a gather, the indices widened in registers (vpmovzx) and, at batch 1, used as they are. Widening
  // them through memory and multiplying every one by the batch made this loop 1.8x slower on an AMD EPYC (Zen 2)
  // without AVX-512 (fc6 of the fast AlexNet-LCNN at batch 1, one thread: 3.6 -> 2.0 ms).
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  const __m256i scale = _mm256_set1_epi32(static_cast<int32_t>(batch));
  const bool one = batch == 1;
  auto gather = [&](int32_t at) {
    const __m256i index = LoadIndices8(indices + at);
    return _mm256_i32gather_ps(s, one ? index : _mm256_mullo_epi32(index, scale), 4);
  };
  for (; t + 16 <= end; t += 16) {
    PrefetchNonZeros(indices, values, t, 16);
    const v16 c = Load16(values + t);
    a0 = _mm256_fmadd_ps(static_cast<__m256>(c.part[0]), gather(t), a0);
    a1 = _mm256_fmadd_ps(static_cast<__m256>(c.part[1]), gather(t + 8), a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  for (float lane : lanes) sum += lane;
#endif
  }
  for (; t < end; ++t) sum += ToFloat(values[t]) * ToFloat(s[static_cast<int64_t>(indices[t]) * batch]);
  return sum;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// SparseDotRange over float32 S in L1 (a chunk of a one-pixel layer's S, DispatchChunked) without gathers: the
// sixteen elements of a step loaded one by one and assembled into two vectors. On an AMD EPYC (Zen 3) an AVX2
// gather from L1 took 0.47 ns an element, loads and inserts 0.32 ns (one core); from L2, where unchunked lookups
// gather, both took 0.5-0.6 ns. fc6 of AlexNet-LCNN at batch 1, its non-zeros from memory, two threads: chunked,
// 17-20% less time than with gathers at the fast point and 19-20% at the accurate one (benchmarks/batch1_ab.py).
template <bool kOne, typename Index, typename Value>
float SparseDotLoads(const float* s, const Index* indices, const Value* values, int64_t batch, int32_t t,
                     int32_t end) {
  auto at = [&](const Index* i, int j) { return s[kOne ? static_cast<int64_t>(i[j]) : i[j] * batch]; };
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; t + 16 <= end; t += 16) {
    PrefetchNonZeros(indices, values, t, 16);
    const Index* i = indices + t;
    const v16 c = Load16(values + t);
    a0 = _mm256_fmadd_ps(static_cast<__m256>(c.part[0]), _mm256_setr_ps(at(i, 0), at(i, 1), at(i, 2), at(i, 3),
                         at(i, 4), at(i, 5), at(i, 6), at(i, 7)), a0);
    a1 = _mm256_fmadd_ps(static_cast<__m256>(c.part[1]), _mm256_setr_ps(at(i, 8), at(i, 9), at(i, 10),
                         at(i, 11), at(i, 12), at(i, 13), at(i, 14), at(i, 15)), a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  float sum = 0.f;
  for (float lane : lanes) sum += lane;
  for (; t < end; ++t) sum += ToFloat(values[t]) * at(indices + t, 0);
  return sum;
}
#endif

// S of at most this many bytes is read as it lies in L1 (SparseDotInL1): half of a 32 KiB L1, the smallest
// among the x86 and Arm server cores of the last years.
constexpr int64_t kSmallSBytes = 16384;

// SparseDotRange for S whose elements the dot product reads lie in L1 (a chunk of S, or a small S).
template <typename S, typename Index, typename Value>
float SparseDotInL1(const S* s, const Index* indices, const Value* values, int64_t batch, int32_t t, int32_t end) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<S, float>) {
    return batch == 1 ? SparseDotLoads<true>(s, indices, values, batch, t, end)
                      : SparseDotLoads<false>(s, indices, values, batch, t, end);
  }
#endif
  return SparseDotRange(s, indices, values, batch, t, end);
}

template <typename S, typename Index, typename Value>
float SparseDot(const S* s, const Lookups<Index, Value>& l, int64_t batch, int64_t o) {
  return SparseDotRange(s, l.indices, l.values, batch, l.starts[o], l.starts[o + 1]);
}

// A work item is one band of consecutive blocks of wide elements for one group of outputs: each output of the
// group runs over the whole band before the next, so the band's rows of S, loaded once, serve every output.
struct Plan {
  int64_t block;        // wide elements per block (16 * V, or the whole of a small Q)
  int64_t band;         // wide elements per band: a multiple of block
  int64_t bands;
  int64_t group_size;   // outputs per item
  int64_t groups;
  int64_t items() const { return bands * groups; }
};

// Output o's wide elements [p0, p0 + 16 * V), of which those before `limit` are stored to out as output
// `slot`. The last, partial block is a whole block ending at the last wide element, overlapping the one before
// (Q >= 16 * V), of which only the elements from p0 on are stored: vector code throughout, and no read past S.
// An output with many non-zeros (kSplitNonZeros) instead covers that block with blocks of half as many vectors,
// then a quarter, ..., down to one vector, each taken where the elements left fill it, and one vector ending at
// the last element for what is left (under 16): a 13x13 map at batch 1 (Q = 193 wide elements, blocks of 8
// vectors) then computes 208 elements instead of 256.
template <int V, typename S, typename Index, typename Value>
void LookupBlock(const Geometry& g, const S* s, const Lookups<Index, Value>& l, int64_t o, int64_t p0,
                 int64_t slot, float* out, int64_t limit) {
  constexpr int64_t block = 16 * V;
  if constexpr (V > 1) {
    if (p0 + block > g.wide && l.starts[o + 1] - l.starts[o] >= kSplitNonZeros) {
      const int64_t end = std::min(limit, g.wide);
      int64_t p = p0;
      if (end - p >= block / 2) {
        LookupBlock<V / 2>(g, s, l, o, p, slot, out, end);
        p += block / 2;
      }
      if (p < end) LookupBlock<V / 2>(g, s, l, o, p, slot, out, end);
      return;
    }
  }
  alignas(64) float acc[block];
  const int64_t start = std::min(p0, g.wide - block);
  AccumulateBlock<V>(s, l, g.batch, o, start, acc);
  Store(g, acc + (p0 - start), l.scale[o], l.bias[o], l.residual, l.relu, slot, p0,
        std::min(block, std::min(limit, g.wide) - p0), out);
}

template <int V, typename S, typename Index, typename Value>
void LookupBlock(const Geometry& g, const S* s, const Lookups<Index, Value>& l, int64_t o, int64_t p0,
                 int64_t slot, float* out) {
  LookupBlock<V>(g, s, l, o, p0, slot, out, g.wide);
}

template <int V, typename S, typename Index, typename Value>
void RunItems(const Geometry& g, const Plan& plan, const S* s, const Lookups<Index, Value>& l, float* out,
              int64_t begin, int64_t end) {
  // A one-pixel layer whose whole S stays in L1 (fc7's 512 or 1024 atoms at batch 1) reads it as a chunk.
  const bool small_s = g.height > 0 && g.planes * g.height * g.width * g.batch * static_cast<int64_t>(sizeof(S)) <=
                                           kSmallSBytes;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t band = item / plan.groups;
    const int64_t o0 = (item % plan.groups) * plan.group_size;
    const int64_t o1 = std::min(g.n, o0 + plan.group_size);
    const int64_t q0 = band * plan.band, q1 = std::min(g.wide, q0 + plan.band);
    for (int64_t o = o0; o < o1; ++o) {
      if constexpr (V == 0) {
        alignas(64) float acc[16];
        for (int64_t q = 0; q < g.wide; ++q)
          acc[q] = small_s ? SparseDotInL1(s + q, l.indices, l.values, g.batch, l.starts[o], l.starts[o + 1])
                           : SparseDot(s + q, l, g.batch, o);
        Store(g, acc, l.scale[o], l.bias[o], l.residual, l.relu, o, 0, plan.block, out);
      } else {
        for (int64_t p0 = q0; p0 < q1; p0 += plan.block) LookupBlock<V>(g, s, l, o, p0, o, out, q1);
      }
    }
  }
}

// The rows of S (after space-to-depth) that one output row's lookups reach: 1 + the largest tap row r_t of any
// non-zero (index_t = (atom * H + r_t) * W + c_t).
template <typename Index, typename Value>
int64_t RowsSpanned(const Geometry& g, const Lookups<Index, Value>& l) {
  int64_t largest = 0;
  const int32_t nnz = l.starts[g.n];
  for (int32_t t = 0; t < nnz; ++t) largest = std::max<int64_t>(largest, static_cast<int64_t>(l.indices[t]));
  return (largest / g.width) % g.height + 1;
}

// Wide elements per band (a multiple of `block`) for S of g's planes (element_bytes an element) to stay within
// tile.bytes: a band of q
// wide elements reads, in each plane, the band and the rows_spanned - 1 rows of S below it. The whole of Q
// when tiling is off, or when Q fits.
template <typename Index, typename Value>
int64_t BandWide(const Geometry& g, const Lookups<Index, Value>& l, const Tile& tile, int64_t block,
                 int64_t element_bytes) {
  if (tile.bytes <= 0 || g.height <= 0 || g.planes <= 0 || g.oh <= 1) return block;
  const int64_t reach = (RowsSpanned(g, l) - 1) * g.width * g.batch;  // wide elements below a band it reads
  const int64_t fits = tile.bytes / (element_bytes * g.planes) - reach;
  const int64_t band = std::max<int64_t>(block, fits / block * block);
  return band >= g.wide ? (g.wide + block - 1) / block * block : band;
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Work below this many multiply-adds (or bytes moved) runs on the calling thread alone (kernels.set_serial_work
// changes it, for benchmarks/serial_work_ab.py). ParallelFor never waits for a helper that has not started, so a
// late helper costs little: at batch 1 the fast AlexNet-LCNN took 9% less time under 2^14 than under 2^21, the
// value before, which kept conv1's and conv3-conv5's dictionary stages and conv3-conv5's lookups (0.5-2 M
// multiply-adds each) on one thread; the accurate one 6%, the fast ResNet-18 LCNN 12% (AMD EPYC Zen 4, 2 cores).
inline std::atomic<int64_t> serial_work{1 << 14};

// Runs items [0, total) on the calling thread and the XLA CPU thread pool. Idle helpers find no items and
// return, so the caller never waits on a task that has not started: it waits only for items in progress.
// `cost` estimates the whole work (multiply-adds or bytes); small work stays on the calling thread.
template <typename Pool, typename Work>
void ParallelFor(Pool& pool, int64_t total, int64_t cost, Work work) {
  if (cost < serial_work.load(std::memory_order_relaxed)) {
    work(0, total);
    return;
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = std::max<int64_t>(1, total / (8 * threads));
  auto progress = std::make_shared<Progress>();
  auto loop = [progress, total, chunk, work]() {
    for (;;) {
      const int64_t begin = progress->next.fetch_add(chunk);
      if (begin >= total) return;
      const int64_t end = std::min(total, begin + chunk);
      work(begin, end);
      progress->done.fetch_add(end - begin, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads && t * chunk < total; ++t) {
    auto task = loop;
    pool.Schedule(std::move(task));
  }
  loop();
  // Items still running on other threads finish within microseconds unless their thread lost its core: spin
  // briefly, then yield the core instead of competing with the thread being waited for.
  for (int spins = 0; progress->done.load(std::memory_order_acquire) < total; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#elif defined(__aarch64__)
      __asm__ __volatile__("yield");
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

template <int V, typename Pool, typename S, typename Index, typename Value>
void Launch(Pool& pool, const Geometry& g, const S* s, const Lookups<Index, Value>& l, float* out,
            const Tile& tile) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  Plan plan;
  plan.block = V == 0 ? g.wide : 16 * V;
  plan.band = V == 0 ? g.wide : BandWide(g, l, tile, plan.block, sizeof(S));
  plan.bands = (g.wide + plan.band - 1) / plan.band;
  // Enough items for load balance; split the outputs only when the bands alone are too few.
  const int64_t want = 16 * threads;
  plan.groups = std::min(g.n, std::max<int64_t>(1, (want + plan.bands - 1) / plan.bands));
  if (tile.outputs > 0) plan.groups = std::max<int64_t>(plan.groups, (g.n + tile.outputs - 1) / tile.outputs);
  plan.group_size = (g.n + plan.groups - 1) / plan.groups;
  plan.groups = (g.n + plan.group_size - 1) / plan.group_size;
  const int64_t cost = static_cast<int64_t>(l.starts[g.n]) * g.wide;  // multiply-adds
  ParallelFor(pool, plan.items(), cost, [g, plan, s, l, out](int64_t begin, int64_t end) {
    RunItems<V>(g, plan, s, l, out, begin, end);
  });
}

template <typename Pool, typename S, typename Index, typename Value>
void Dispatch(Pool& pool, const Geometry& g, const S* s, const Lookups<Index, Value>& l, float* out,
              const Tile& tile = Tile{}) {
  if (g.wide < 16) return Launch<0>(pool, g, s, l, out, tile);
  WithBlockVectors(g.wide, [&](auto v) { Launch<decltype(v)::value>(pool, g, s, l, out, tile); });
}

// A layer whose output is one pixel (a dense layer; g.oh = g.ow = 1, so g.wide = g.batch), its lookups stored
// chunk by chunk of S: l.starts has chunks * n + 1 entries, the non-zeros of output o whose index lies in
// [c * chunk, (c + 1) * chunk) being [starts[c * n + o], starts[c * n + o + 1]). Each piece of work loops over the
// chunks, and within one over its outputs, so the chunk of S it gathers from stays in L1 (chunk sized from the
// machine's L1 by the caller) instead of every output gathering from all of S in L2 or beyond: at batch 1, where
// each non-zero is one gathered element, the gathers then run at the L1's rate.
//
// From 16 wide elements on (batch >= 16), each non-zero reads a run of g.wide elements of S rather than one, and
// the chunks play the part of an L2 tile (a chunk of N elements spans N * batch of S): each output's blocks of
// 16 * V wide elements are summed over a chunk's non-zeros in registers (AccumulateBlock), added to its sums
// carried across the chunks, and stored once after the last (ChunkedBlocks).
template <int V, typename S, typename Index, typename Value>
void ChunkedBlocks(const Geometry& g, const S* s, const Lookups<Index, Value>& l, int64_t chunks, int64_t o0,
                   int64_t o1, float* acc) {
  constexpr int64_t block = 16 * V;
  alignas(64) float sums[block];
  for (int64_t c = 0; c < chunks; ++c) {
    Lookups<Index, Value> piece = l;
    piece.starts = l.starts + c * g.n;
    for (int64_t o = o0; o < o1; ++o) {
      if (piece.starts[o] == piece.starts[o + 1]) continue;
      float* carried = acc + (o - o0) * g.wide;
      for (int64_t p0 = 0; p0 < g.wide; p0 += block) {
        const int64_t start = std::min(p0, g.wide - block);  // the last block overlaps the one before
        AccumulateBlock<V>(s, piece, g.batch, o, start, sums);
        for (int64_t i = p0 - start; i < block; ++i) carried[start + i] += sums[i];
      }
    }
  }
}

template <typename Pool, typename S, typename Index, typename Value>
void DispatchChunked(Pool& pool, const Geometry& g, const S* s, const Lookups<Index, Value>& l, int64_t chunks,
                     float* out) {
  constexpr int64_t kGroup = 64;  // outputs per item
  const int64_t items = (g.n + kGroup - 1) / kGroup;
  const int64_t cost = static_cast<int64_t>(l.starts[chunks * g.n]) * g.wide;  // multiply-adds
  ParallelFor(pool, items, cost, [g, s, l, chunks, out](int64_t begin, int64_t end) {
    const int64_t o0 = begin * kGroup, o1 = std::min(g.n, end * kGroup);
    std::vector<float> acc((o1 - o0) * g.wide, 0.f);
    int64_t scalar_chunks = chunks;  // chunks left to the float sums below
    if (g.wide >= 16) {
      WithBlockVectors(g.wide, [&](auto v) {
        ChunkedBlocks<decltype(v)::value>(g, s, l, chunks, o0, o1, acc.data());
      });
      scalar_chunks = 0;
    }
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<S, float>) {
      if (scalar_chunks > 0) {
        // The lane sums carried from chunk to chunk, added across lanes once per output at the end.
        std::vector<float> lanes((o1 - o0) * g.wide * 16, 0.f);
        for (int64_t c = 0; c < chunks; ++c) {
          const int32_t* starts = l.starts + c * g.n;
          for (int64_t o = o0; o < o1; ++o)
            for (int64_t q = 0; q < g.wide; ++q) {
              float* sum = lanes.data() + ((o - o0) * g.wide + q) * 16;
              const __m512 lanes_o = SparseDotLanes(s + q, l.indices, l.values, g.batch, starts[o], starts[o + 1]);
              _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), lanes_o));
            }
        }
        for (int64_t i = 0; i < (o1 - o0) * g.wide; ++i) acc[i] = SumLanes(_mm512_loadu_ps(lanes.data() + i * 16));
        scalar_chunks = 0;
      }
    }
#endif
    for (int64_t c = 0; c < scalar_chunks; ++c) {
      const int32_t* starts = l.starts + c * g.n;
      for (int64_t o = o0; o < o1; ++o) {
        float* sums = acc.data() + (o - o0) * g.wide;
        for (int64_t q = 0; q < g.wide; ++q)
          sums[q] += SparseDotInL1(s + q, l.indices, l.values, g.batch, starts[o], starts[o + 1]);
      }
    }
    for (int64_t o = o0; o < o1; ++o)
      Store(g, acc.data() + (o - o0) * g.wide, l.scale[o], l.bias[o], l.residual, l.relu, o, 0, g.wide, out);
  });
}

// A max pooling, with max(·, 0) of the result when `relu`: the same as pooling a ReLU's output, as both are
// monotone, without that pass over the map.
struct PoolGeometry {
  int64_t wh, ww;  // window
  int64_t sh, sw;  // strides
  int64_t ph, pw;  // top and left padding (positions outside the map are left out, as XLA's -inf padding does)
  int64_t oh, ow;  // pooled size
  bool relu;
};

// Pooled row py into dst (p.ow, batch) from a map (rows, w, batch) holding rows [y_lo, y_hi) of the pooled
// activation. Each pooled pixel's maxima are kept in registers, 16 images at a time, over its whole window, and
// stored once: maxed into dst in place for every position of the window, dst was read and written nine times for
// a 3x3 window (AlexNet's conv1 at batch 32 with its pooling: the pooling 19% of the layer's time before).
inline void PoolRow(const float* map, int64_t y_lo, int64_t y_hi, int64_t w, int64_t batch, const PoolGeometry& p,
                    int64_t py, float* dst) {
  const float init = p.relu ? 0.f : -__builtin_inff();
  const int64_t ya = std::max(y_lo, py * p.sh - p.ph), yb = std::min(y_hi, py * p.sh - p.ph + p.wh);
  for (int64_t ox = 0; ox < p.ow; ++ox) {
    const int64_t xa = std::max<int64_t>(0, ox * p.sw - p.pw), xb = std::min(w, ox * p.sw - p.pw + p.ww);
    float* acc = dst + ox * batch;
    int64_t b = 0;
    for (; b + 16 <= batch; b += 16) {
      vnative m[kParts];
      for (int i = 0; i < kParts; ++i) m[i] = vnative{} + init;
      for (int64_t y = ya; y < yb; ++y)
        for (int64_t x = xa; x < xb; ++x) {
          const float* src = map + ((y - y_lo) * w + x) * batch + b;
          for (int i = 0; i < kParts; ++i) {
            const vnative v = LoadNative(src + i * kLanes);
            m[i] = m[i] < v ? v : m[i];
          }
        }
      std::memcpy(acc + b, m, sizeof(m));
    }
    for (; b < batch; ++b) {
      float v = init;
      for (int64_t y = ya; y < yb; ++y)
        for (int64_t x = xa; x < xb; ++x) v = std::max(v, map[((y - y_lo) * w + x) * batch + b]);
      acc[b] = v;
    }
  }
}

// Output rows [y_lo, y_hi) of outputs [o0, o1) into `local` (o - o0, y - y_lo, x, batch): the lookups over the
// band's wide elements, S read from row y_lo on.
template <int V, typename S, typename Index, typename Value>
void BandRows(const Geometry& g, const S* s, const Lookups<Index, Value>& l, int64_t y_lo, int64_t y_hi,
              int64_t o0, int64_t o1, float* local) {
  Geometry band = g;
  band.oh = y_hi - y_lo;
  band.wide = ((band.oh - 1) * g.width + g.ow) * g.batch;
  const S* sb = s + y_lo * g.width * g.batch;
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t p0 = 0; p0 < band.wide; p0 += 16 * V) LookupBlock<V>(band, sb, l, o, p0, o - o0, local);
  }
}

// The lookups followed by the pooling, without writing the unpooled map: an item is a band of pooled rows and a
// group of outputs; it computes the layer's rows that band needs into a buffer of its own (rows shared with the
// next band are computed twice), then pools them into out (n, p.oh, p.ow, batch). The unpooled map of a first
// layer (AlexNet's conv1 at batch 32: 25 MB) then never goes to memory and back.
template <int V, typename Pool, typename S, typename Index, typename Value>
void LaunchPooled(Pool& pool, const Geometry& g, const S* s, const Lookups<Index, Value>& l,
                  const PoolGeometry& p, float* out, const Tile& tile) {
  // Pooled rows and outputs per item: without a tile, 3 and 16; with one, as many pooled rows as keep the S
  // their layer rows read within tile.bytes (at least one).
  int64_t band_rows = 3;
  const int64_t group = tile.outputs > 0 ? tile.outputs : 16;
  if (tile.bytes > 0 && g.height > 0 && g.planes > 0) {
    const int64_t row_bytes = static_cast<int64_t>(sizeof(S)) * g.planes * g.width * g.batch;  // one S row
    const int64_t s_rows = tile.bytes / row_bytes - (RowsSpanned(g, l) - 1);  // layer rows a band may compute
    // Where not even one pooled row's S fits (a first layer at a large batch: AlexNet's conv1 at batch 32 has
    // 350 KB of S a row), the tile cannot hold a band anyway, and bands of one pooled row would compute half
    // their layer rows twice: the untiled bands are kept.
    if (s_rows >= p.wh) band_rows = (s_rows - p.wh) / p.sh + 1;
  }
  const int64_t bands = (p.oh + band_rows - 1) / band_rows, groups = (g.n + group - 1) / group;
  const int64_t max_rows = std::min(g.oh, (band_rows - 1) * p.sh + p.wh);
  const int64_t cost = static_cast<int64_t>(l.starts[g.n]) * g.oh * g.ow * g.batch;
  ParallelFor(pool, bands * groups, cost, [=](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> local(new float[group * max_rows * g.ow * g.batch]);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t band = item / groups, o0 = (item % groups) * group, o1 = std::min(g.n, o0 + group);
      const int64_t py0 = band * band_rows, py1 = std::min(p.oh, py0 + band_rows);
      const int64_t y_lo = std::max<int64_t>(0, py0 * p.sh - p.ph);
      const int64_t y_hi = std::min(g.oh, (py1 - 1) * p.sh - p.ph + p.wh);
      BandRows<V>(g, s, l, y_lo, y_hi, o0, o1, local.get());
      const int64_t rows = y_hi - y_lo;
      for (int64_t o = o0; o < o1; ++o) {
        const float* map = local.get() + (o - o0) * rows * g.ow * g.batch;
        for (int64_t py = py0; py < py1; ++py) {
          PoolRow(map, y_lo, y_hi, g.ow, g.batch, p, py, out + (o * p.oh + py) * p.ow * g.batch);
        }
      }
    }
  });
}

template <typename Pool, typename S, typename Index, typename Value>
void DispatchPooled(Pool& pool, const Geometry& g, const S* s, const Lookups<Index, Value>& l,
                    const PoolGeometry& p, float* out, const Tile& tile = Tile{}) {
  const int64_t narrowest = g.ow * g.batch;  // the wide elements of a one-row band
  WithBlockVectors(narrowest, [&](auto v) { LaunchPooled<decltype(v)::value>(pool, g, s, l, p, out, tile); });
}

// S (k, h, w, batch) -> the zero-padded space-to-depth view (k * sh * sw, H, W, batch), one (atom, row) per item,
// in the precision of `out` (float32, or bfloat16: rounded as it is copied).
template <typename Pool, typename S>
void SpaceToDepth(Pool& pool, const float* s, int64_t k, int64_t h, int64_t w, int64_t batch, int64_t ph,
                  int64_t pw, int64_t sh, int64_t sw, int64_t height, int64_t width, S* out) {
  const int64_t rows = k * sh * sw * height;
  ParallelFor(pool, rows, rows * width * batch * sizeof(float), [=](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t atom = item / height, row = item % height;
      const int64_t j = atom / (sh * sw), pr = (atom / sw) % sh, pc = atom % sw;
      S* dst = out + item * width * batch;
      const int64_t y = row * sh + pr - ph;
      if (y < 0 || y >= h) {
        ZeroS(dst, width * batch);
        continue;
      }
      const float* src = s + (j * h + y) * w * batch;
      if (sw == 1) {  // one run: [zeros][the row][zeros]
        const int64_t left = std::min(width, pw), copied = std::max<int64_t>(0, std::min(w, width - left));
        ZeroS(dst, left * batch);
        CopyToS(dst + left * batch, src, copied * batch);
        ZeroS(dst + (left + copied) * batch, (width - left - copied) * batch);
        continue;
      }
      for (int64_t col = 0; col < width; ++col) {
        const int64_t x = col * sw + pc - pw;
        if (x < 0 || x >= w) ZeroS(dst + col * batch, batch);
        else CopyToS(dst + col * batch, src + x * batch, batch);
      }
    }
  });
}

// S = x ⊛ D computed while filling the padded space-to-depth buffer, for a small dictionary (m * k of a first
// layer): one pass over x instead of a matmul, a transpose and a copy. x is (batch, h, w, m) when nhwc, else
// (m, h, w, batch). An item is one input row y (a phase pr and row of the output). Each pixel's channels are runs
// over the images, summed as vectors where they lie, pixel by pixel; at batch 1, where a run is one value, the
// item is taken one column phase pc at a time: the row's pixels in the phase are first gathered, zero-padded,
// into `phased` (m, width), and each atom's output row in the phase is summed as vectors from there. With scalar
// sums at batch 1 and a division per pixel, this took 0.47 of conv1's 0.71 ms in the fast AlexNet-LCNN at batch
// 1; one thread on an RGB 224x224 first layer at stride 4: batch 1 0.58 -> 0.15 ms, batches 2-32 4-6% faster.
// Stored in the precision of `out` (float32 or bfloat16). M and K are the sizes when known at compile time (0:
// read them at run time).
template <int M, int K, typename S>
void DictionaryRows(const float* x, bool nhwc, const float* dictionary, int64_t m_runtime, int64_t k_runtime,
                    int64_t h, int64_t w, int64_t batch, int64_t ph, int64_t pw, int64_t sh, int64_t sw,
                    int64_t height, int64_t width, S* out, int64_t begin, int64_t end) {
  const int64_t m = M ? M : m_runtime, k = K ? K : k_runtime;
  // Element strides of x along images, rows, columns and channels.
  const int64_t xb = nhwc ? h * w * m : 1, xy = nhwc ? w * m : w * batch, xx = nhwc ? m : batch,
                xm = nhwc ? 1 : h * w * batch;
  const int64_t plane = height * width * batch;  // one atom and phase of the output
  const int64_t run = width * batch;             // one output row of one atom and phase
  const bool direct = batch > 1;
  float d[kFusedDictionaryMacsMax];
  for (int64_t i = 0; i < m * k; ++i) d[i] = dictionary[i];
  // target[i] = sum_c d[c, j] * src[c][i] for i < count, as vectors.
  auto combine = [&](const float* const* src, int64_t j, int64_t count, S* target) {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
      v16 sum = v16{};
      for (int64_t c = 0; c < m; ++c) sum += d[c * k + j] * Load(src[c] + i);
      Store16(target + i, sum);
    }
    for (; i < count; ++i) {
      float sum = 0.f;
      for (int64_t c = 0; c < m; ++c) sum += src[c][i] * d[c * k + j];
      if constexpr (std::is_same_v<S, float>) target[i] = sum;
      else target[i] = FromFloat(sum);
    }
  };
  // NHWC, more than one image: the item's input row of every image is first copied, transposed, to `staged`
  // (m, w, batch): one contiguous read per image, after which each channel of a pixel is a contiguous run over
  // the images, as CHWN input has already.
  std::unique_ptr<float[]> staged(nhwc && direct ? new float[m * w * batch] : nullptr);
  std::unique_ptr<float[]> phased(direct ? nullptr : new float[m * width]);
  // One image (not direct): its row of each channel with pw zeros before it and zeros after it up to the
  // width * sw columns the phases read; the zeros are written once, the row between them per item.
  const int64_t padded_width = width * sw + pw;
  std::unique_ptr<float[]> padded(direct ? nullptr : new float[m * padded_width]());
  const float* src[M ? M : kFusedDictionaryMacsMax] = {};
  auto input_row = [&](int64_t item) { return (item % height) * sh + item / height - ph; };  // item: (pr, row)
  for (int64_t item = begin; item < end; ++item) {
    const int64_t pr = item / height, row = item % height;
    const int64_t y = input_row(item);
    S* first = out + pr * sw * plane + row * run;  // atom j, phase pc at first + (j * sh * sw + pc) * plane
    if (y < 0 || y >= h) {
      for (int64_t j = 0; j < k; ++j)
        for (int64_t pc = 0; pc < sw; ++pc) ZeroS(first + (j * sh * sw + pc) * plane, run);
      continue;
    }
    if (nhwc && batch >= 16) {
      // 16 images x 16 values of the row (pixel-major, channels interleaved) at a time through a tile in L1:
      // each image's row read in order, and each value's run over the images written whole. Written value by
      // value over the whole row instead, every store lands on another line of `staged` (beyond L1 at batch 32).
      // The next item's input rows are prefetched as this one's are read, line for line: each is a short run
      // (w * m values) in each of the batch's images, too short for the hardware prefetchers to follow. Both
      // together: the stage 35-41% faster at batch 16 and 32, 30-36% built for AVX2 only (RGB 224x224 at stride
      // 4, AMD EPYC Zen 4; benchmarks/first_layer_ab.py). A tile row is one vector load: copied with a memcpy of
      // variable length, it compiled to `rep movsl` and took 38% of the stage. At small batches a tile holds too
      // few images to pay: they are staged value by value below.
      const int64_t next_y = input_row(item + 1);
      const bool prefetch = item + 1 < end && next_y >= 0 && next_y < h;
      const float* row = x + y * xy;
      const float* next = prefetch ? x + next_y * xy : x;
      const int64_t values = w * m;
      alignas(64) float tile[16][16];
      for (int64_t b0 = 0; b0 < batch; b0 += 16) {
        const int64_t nb = std::min<int64_t>(16, batch - b0);
        for (int64_t j0 = 0; j0 < values; j0 += 16) {
          const int64_t nj = std::min<int64_t>(16, values - j0);
          for (int64_t b = 0; b < nb; ++b) {
            const float* from = row + (b0 + b) * xb + j0;
            if (nj == 16) Store16(tile[b], Load(from));
            else for (int64_t j = 0; j < nj; ++j) tile[b][j] = from[j];
            if (prefetch) __builtin_prefetch(next + (b0 + b) * xb + j0);
          }
          for (int64_t j = 0; j < nj; ++j) {
            const int64_t col = (j0 + j) / m, c = (j0 + j) - col * m;
            float* dst = &staged[(c * w + col) * batch + b0];
            for (int64_t b = 0; b < nb; ++b) dst[b] = tile[b][j];
          }
        }
      }
    } else if (nhwc && direct) {
      for (int64_t b = 0; b < batch; ++b) {
        const float* image = x + b * xb + y * xy;
        for (int64_t col = 0; col < w; ++col)
          for (int64_t c = 0; c < m; ++c) staged[(c * w + col) * batch + b] = image[col * m + c];
      }
    }
    auto pixel = [&](int64_t c, int64_t xcol) {  // channel c of column xcol: batch values in a run
      return nhwc ? &staged[(c * w + xcol) * batch] : x + c * xm + y * xy + xcol * xx;
    };
    if (direct) {  // pixel by pixel, left to right: the row's runs are read in order
      for (int64_t col = 0; col < width; ++col)
        for (int64_t pc = 0; pc < sw; ++pc) {
          const int64_t xcol = col * sw + pc - pw;
          const bool inside = xcol >= 0 && xcol < w;
          for (int64_t c = 0; c < m && inside; ++c) src[c] = pixel(c, xcol);
          for (int64_t j = 0; j < k; ++j) {
            S* target = first + (j * sh * sw + pc) * plane + col * batch;
            if (inside) combine(src, j, batch, target);
            else ZeroS(target, batch);
          }
        }
      continue;
    }
    // One image: its row zero-padded, channel by channel (padded[c][xcol + pw]), then each column phase's
    // pixels (every sw-th) copied out of it without a bounds test per pixel, and combined as vectors.
    for (int64_t c = 0; c < m; ++c) {
      float* row_c = padded.get() + c * padded_width;
      if (nhwc) {
        const float* image_row = x + y * xy + c;
        for (int64_t col = 0; col < w; ++col) row_c[col + pw] = image_row[col * m];
      } else {
        std::memcpy(row_c + pw, x + c * xm + y * xy, w * sizeof(float));
      }
    }
    for (int64_t pc = 0; pc < sw; ++pc) {
      for (int64_t c = 0; c < m; ++c) {
        float* dst = phased.get() + c * width;
        const float* from = padded.get() + c * padded_width + pc;
        for (int64_t col = 0; col < width; ++col) dst[col] = from[col * sw];
        src[c] = dst;
      }
      for (int64_t j = 0; j < k; ++j) combine(src, j, run, first + (j * sh * sw + pc) * plane);
    }
  }
}

template <typename Pool, typename S>
void DictionaryToDepth(Pool& pool, const float* x, bool nhwc, const float* dictionary, int64_t m, int64_t k,
                       int64_t h, int64_t w, int64_t batch, int64_t ph, int64_t pw, int64_t sh, int64_t sw,
                       int64_t height, int64_t width, S* out) {
  auto rows = &DictionaryRows<0, 0, S>;
  if (m == 3 && k == 3) rows = &DictionaryRows<3, 3, S>;  // RGB images, the original's firstPool
  else if (m == 1 && k == 1) rows = &DictionaryRows<1, 1, S>;
  else if (m == 1 && k == 3) rows = &DictionaryRows<1, 3, S>;
  else if (m == 3 && k == 1) rows = &DictionaryRows<3, 1, S>;
  ParallelFor(pool, sh * height, k * sh * sw * height * width * batch * m, [=](int64_t begin, int64_t end) {
    rows(x, nhwc, dictionary, m, k, h, w, batch, ph, pw, sh, sw, height, width, out, begin, end);
  });
}

// A dense layer over a few input rows (a fully connected layer at a small batch, bound by reading its weights):
// out[r, o] = scale[o] * sum_i w[o, i] * x[r, i] + bias[o] for x (rows, m), w (n, m) and out (rows, n). Each
// weight is read once, converted in registers, and used for all R rows; U independent sets of accumulators
// hide the multiply-add latency when R is small.
template <int R, typename Value>
void DenseRowsRange(const float* x, const Value* w, const float* scale, const float* bias, int64_t m, int64_t n,
                    int64_t o0, int64_t o1, float* out) {
  for (int64_t o = o0; o < o1; ++o) {
    const Value* row = w + o * m;
    float sum[R];
    for (int r = 0; r < R; ++r) sum[r] = 0.f;
    int64_t i = 0;
    constexpr int U = R >= kBlockVectorsMax / 2 ? 1 : (kBlockVectorsMax / 2) / R;
    vnative acc[U][R][kParts];  // native registers, as in AccumulateBlock
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int q = 0; q < kParts; ++q) acc[u][r][q] = vnative{};
    for (; i + 16 * U <= m; i += 16 * U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const v16 weights = Load16(row + i + 16 * u);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
          for (int q = 0; q < kParts; ++q)
            acc[u][r][q] += weights.part[q] * LoadNative(x + r * m + i + 16 * u + kLanes * q);
      }
    }
    for (int r = 0; r < R; ++r) {
      v16 total{};
      for (int u = 0; u < U; ++u)
        for (int q = 0; q < kParts; ++q) total.part[q] += acc[u][r][q];
      sum[r] = Sum(total);
    }
    for (; i < m; ++i) {
      const float weight = ToFloat(row[i]);
      for (int r = 0; r < R; ++r) sum[r] += weight * x[r * m + i];
    }
    for (int r = 0; r < R; ++r) out[r * n + o] = sum[r] * scale[o] + bias[o];
  }
}


template <typename Pool, typename Value>
void DenseRows(Pool& pool, const float* x, const Value* w, const float* scale, const float* bias, int64_t rows,
               int64_t m, int64_t n, float* out) {
  // Rows per pass: as many as keep one v16 accumulator per row in registers (up to kDenseRowsMax).
  constexpr int64_t kRowsPerPass = kBlockVectorsMax < kDenseRowsMax ? kBlockVectorsMax : kDenseRowsMax;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerPass) {
    const int64_t count = std::min(kRowsPerPass, rows - r0);
    auto range = &DenseRowsRange<kRowsPerPass, Value>;
    switch (count) {
      case 1: range = &DenseRowsRange<1, Value>; break;
      case 2: range = &DenseRowsRange<2, Value>; break;
      case 3: range = &DenseRowsRange<3, Value>; break;
      case 4: range = &DenseRowsRange<4, Value>; break;
      case 5: range = &DenseRowsRange<5, Value>; break;
      case 6: range = &DenseRowsRange<6, Value>; break;
      case 7: range = &DenseRowsRange<7, Value>; break;
      default: break;
    }
    const float* xr = x + r0 * m;
    float* outr = out + r0 * n;
    constexpr int64_t kOutputs = 16;  // outputs per item
    const int64_t items = (n + kOutputs - 1) / kOutputs;
    ParallelFor(pool, items, n * m * static_cast<int64_t>(sizeof(Value)), [=](int64_t begin, int64_t end) {
      range(xr, w, scale, bias, m, n, begin * kOutputs, std::min(n, end * kOutputs), outr);
    });
  }
}

// A dense stage over columns: out[o, q] = scale[o] * sum_c w[o, c] * x[c, q] + bias[o] for x (m, p), w (n, m)
// and out (n, p) -- a lookup layer's dictionary stage S = Dᵀ·x over a CHWN input of p = h·w·batch columns.
// An item is a tile of R outputs by a block of 16·V columns, accumulated in registers over all m inputs: each
// vector of x loaded serves R outputs, each weight broadcast serves the block. (One output per item, as before,
// read all of x once per output: conv4 of the fast AlexNet-LCNN at batch 1, x 384 × 225 in L2, ran at a sixth of
// the multiply-add rate, bound by moving x from L2.) The last block is a whole one overlapping the
// one before, and so is the last tile of outputs, of which only the outputs not stored yet are stored. Under
// 16 columns, x is transposed and DenseRows takes it; under R outputs, one output per item.
#if defined(__AVX512F__)
constexpr int kDenseTileFloats = 256;  // 16 of 32 zmm
#elif defined(__AVX__)
constexpr int kDenseTileFloats = 96;  // 12 of 16 ymm: 1.6-1.7x the untiled stage, where 8 (2 outputs) gave 1.05-1.1x
#elif defined(__ARM_NEON) || defined(__aarch64__)
constexpr int kDenseTileFloats = 64;  // 16 of 32 q registers, with 8 more for a block of 32 columns of x (not timed)
#else
constexpr int kDenseTileFloats = 48;  // 12 of 16 xmm
#endif
template <int V>
constexpr int kDenseTileOutputs = kDenseTileFloats / (16 * V) > 1 ? kDenseTileFloats / (16 * V) : 1;

template <int V, int R, typename Value>
void DenseColumnsTile(const float* x, const Value* w, const float* scale, const float* bias, int64_t m, int64_t p,
                      int64_t n, int64_t o0, int64_t p0, float* out) {
  constexpr int64_t block = 16 * V;
  constexpr int P = V * kParts;  // registers per output
  const int64_t start = std::min(p0, p - block);
  const int64_t first = std::min(o0, n - R);
  vnative a[R][P];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < P; ++v) a[r][v] = vnative{};
  const Value* rows = w + first * m;
  const float* base = x + start;
  for (int64_t c = 0; c < m; ++c) {
    // The block's rows of x lie p apart, too far apart for the hardware prefetchers to follow where x is not in
    // cache yet: the next block's row c is asked for as this one's is read (past the end of x on the last block,
    // which a prefetch may: it never faults).
    __builtin_prefetch(base + c * p + block);
    __builtin_prefetch(base + c * p + 2 * block - 1);
    vnative xv[P];
#pragma GCC unroll 16
    for (int v = 0; v < P; ++v) xv[v] = LoadNative(base + c * p + kLanes * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float weight = ToFloat(rows[r * m + c]);
#pragma GCC unroll 16
      for (int v = 0; v < P; ++v) a[r][v] += weight * xv[v];
    }
  }
  const int64_t end = std::min(p0 + block, p);
  for (int r = static_cast<int>(o0 - first); r < R; ++r) {
    alignas(64) float acc[block];
    std::memcpy(acc, a[r], sizeof(a[r]));
    const int64_t o = first + r;
    for (int64_t q = p0; q < end; ++q) out[o * p + q] = acc[q - start] * scale[o] + bias[o];
  }
}

template <int V, typename Pool, typename Value>
void LaunchDenseColumns(Pool& pool, const float* x, const Value* w, const float* scale, const float* bias, int64_t m,
                        int64_t p, int64_t n, float* out) {
  constexpr int R = kDenseTileOutputs<V>;
  const int64_t blocks = (p + 16 * V - 1) / (16 * V);
  const int64_t tiles = (n + R - 1) / R;
  // Items of one block of columns are consecutive, for the block of x to be reused from cache by its tiles.
  ParallelFor(pool, tiles * blocks, n * m * p, [=](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o0 = (item % tiles) * R, p0 = (item / tiles) * 16 * V;
      if (n >= R) {
        DenseColumnsTile<V, R>(x, w, scale, bias, m, p, n, o0, p0, out);
      } else {
        for (int64_t o = o0; o < n; ++o) DenseColumnsTile<V, 1>(x, w, scale, bias, m, p, n, o, p0, out);
      }
    }
  });
}

template <typename Pool, typename Value>
void DenseColumns(Pool& pool, const float* x, const Value* w, const float* scale, const float* bias, int64_t m,
                  int64_t p, int64_t n, float* out) {
  if (p < 16) {
    std::unique_ptr<float[]> rows(new float[p * m]);  // xᵀ (p, m)
    for (int64_t c = 0; c < m; ++c)
      for (int64_t q = 0; q < p; ++q) rows[q * m + c] = x[c * p + q];
    std::unique_ptr<float[]> result(new float[p * n]);  // (p, n)
    DenseRows(pool, rows.get(), w, scale, bias, p, m, n, result.get());
    for (int64_t q = 0; q < p; ++q)
      for (int64_t o = 0; o < n; ++o) out[o * p + q] = result[q * n + o];
    return;
  }
  // Blocks of 32 columns from 32 on (16 under), capped to what the accumulators hold.
  if (p < 32) return LaunchDenseColumns<kFit<1>>(pool, x, w, scale, bias, m, p, n, out);
  LaunchDenseColumns<kFit<2>>(pool, x, w, scale, bias, m, p, n, out);
}

// A dense convolution of x (c, h, w, batch) -> out (n, oh, ow, batch) = W ⊛ x + bias (+ residual, then
// max(·, 0) when relu): a lookup layer's reconstructed kernel W = D·P, for the layers where the lookups lose to
// it (many non-zeros per output: the accurate AlexNet-LCNN's conv2 at batch 1), in the activations' own CHWN
// layout (AMD EPYC Zen 3, AVX2, two threads: 57-70 G multiply-adds/s on AlexNet-LCNN's conv2-conv5 at batch 1;
// as fast as XLA's own convolution emitter on conv2 in the whole model, 9-11% faster than XLA's default).
//
// W arrives packed (tiles, m, R) for m = c·kh·kw in (channel, row, column) order and R = kConvTileOutputs, the
// outputs past n zero. The columns q = (y·ow + x)·batch + b of the im2col matrix (m, p = oh·ow·batch) are cut
// into panels of kConvPanel; a work item copies its panel's (m, kConvPanel) into a buffer of its thread (held in
// L2), then computes a group of tiles over it, R outputs by one panel at a time in registers over all m: each
// panel vector loaded serves R outputs, each weight broadcast the whole panel, both read in order.
struct ConvGeometry {
  int64_t c, h, w, batch;  // input
  int64_t n, kh, kw, sh, sw, ph, pw, oh, ow;
};

#if defined(__AVX512F__)
constexpr int kConvVectors = 4;  // 24 of 32 zmm accumulate
#elif defined(__ARM_NEON) || defined(__aarch64__)
constexpr int kConvVectors = 4;  // 24 of 32 q registers
#else
constexpr int kConvVectors = 2;  // 12 of 16 ymm (AVX2) or xmm (SSE2)
#endif
constexpr int64_t kConvPanel = kConvVectors * kLanes;

// Panel j of the im2col matrix into `panel` (m, kConvPanel): columns past p, and taps outside the map, zero.
inline void ConvPanel(const ConvGeometry& g, const float* x, int64_t j, float* panel) {
  const int64_t p = g.oh * g.ow * g.batch;
  int64_t iy0[kConvPanel], ix0[kConvPanel], b[kConvPanel];
  for (int64_t l = 0; l < kConvPanel; ++l) {
    const int64_t q = j * kConvPanel + l;
    const int64_t pixel = q / g.batch;
    b[l] = q % g.batch;
    iy0[l] = q < p ? pixel / g.ow * g.sh - g.ph : -(g.h + g.kh);  // columns past p: outside every tap
    ix0[l] = pixel % g.ow * g.sw - g.pw;
  }
  int64_t offset[kConvPanel];  // per tap: element l's offset in a channel's plane, -1 outside the map
  const int64_t plane = g.h * g.w * g.batch;
  for (int64_t dy = 0; dy < g.kh; ++dy)
    for (int64_t dx = 0; dx < g.kw; ++dx) {
      for (int64_t l = 0; l < kConvPanel; ++l) {
        const int64_t iy = iy0[l] + dy, ix = ix0[l] + dx;
        offset[l] = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w ? (iy * g.w + ix) * g.batch + b[l] : -1;
      }
      for (int64_t ch = 0; ch < g.c; ++ch) {
        const float* from = x + ch * plane;
        float* to = panel + ((ch * g.kh + dy) * g.kw + dx) * kConvPanel;
        for (int64_t l = 0; l < kConvPanel; ++l) to[l] = offset[l] >= 0 ? from[offset[l]] : 0.f;
      }
    }
}

// Outputs [t·R, t·R + R) of panel j over the panel's (m, kConvPanel) copy, stored to out (n, p).
template <int R>
void ConvTile(const ConvGeometry& g, const float* packed, const float* panel, const float* bias,
              const float* residual, bool relu, int64_t t, int64_t j, float* out) {
  const int64_t m = g.c * g.kh * g.kw, p = g.oh * g.ow * g.batch;
  const float* a = packed + t * m * R;
  vnative acc[R][kConvVectors];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kConvVectors; ++v) acc[r][v] = vnative{};
  for (int64_t i = 0; i < m; ++i) {
    vnative column[kConvVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kConvVectors; ++v) column[v] = LoadNative(panel + i * kConvPanel + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float weight = a[i * R + r];
#pragma GCC unroll 4
      for (int v = 0; v < kConvVectors; ++v) acc[r][v] += weight * column[v];
    }
  }
  const int64_t q0 = j * kConvPanel, count = std::min(kConvPanel, p - q0);
  for (int r = 0; r < R && t * R + r < g.n; ++r) {
    const int64_t o = t * R + r;
    alignas(64) float sums[kConvPanel];
    std::memcpy(sums, acc[r], sizeof(sums));
    float* to = out + o * p + q0;
    const float* add = residual != nullptr ? residual + o * p + q0 : nullptr;
    for (int64_t l = 0; l < count; ++l) {
      float value = sums[l] + bias[o] + (add != nullptr ? add[l] : 0.f);
      to[l] = relu ? std::max(value, 0.f) : value;
    }
  }
}

template <typename Pool>
void DenseConv(Pool& pool, const ConvGeometry& g, const float* x, const float* packed, const float* bias,
               const float* residual, bool relu, float* out) {
  constexpr int R = kConvTileOutputs;
  const int64_t m = g.c * g.kh * g.kw, p = g.oh * g.ow * g.batch;
  const int64_t panels = (p + kConvPanel - 1) / kConvPanel, tiles = (g.n + R - 1) / R;
  // Groups of tiles per panel: enough items for every thread to take several (each item copies its panel).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t groups = std::min(tiles, std::max<int64_t>(1, (4 * threads + panels - 1) / panels));
  const int64_t per_group = (tiles + groups - 1) / groups;
  ParallelFor(pool, panels * groups, g.n * m * p, [=](int64_t begin, int64_t end) {
    thread_local std::vector<float> buffer;  // this thread's panel, kept between calls
    if (buffer.size() < static_cast<size_t>(m * kConvPanel + 16)) buffer.resize(m * kConvPanel + 16);
    float* panel = buffer.data() + (16 - reinterpret_cast<uintptr_t>(buffer.data()) / 4 % 16) % 16;  // 64-byte aligned
    int64_t copied = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / groups, group = item % groups;
      if (j != copied) ConvPanel(g, x, j, panel);
      copied = j;
      for (int64_t t = group * per_group; t < std::min(tiles, (group + 1) * per_group); ++t)
        ConvTile<R>(g, packed, panel, bias, residual, relu, t, j, out);
    }
  });
}

#if defined(__AVX512BF16__)
// A dictionary stage S = Dᵀ·x (as DenseColumns) in AVX512-BF16 dot products, for D stored in bfloat16 or int8
// (exact in bfloat16; `scale` applied to the sums) and an S that is kept in bfloat16 anyway (lookup:s=bfloat16):
// x is rounded to bfloat16 as it is packed, input channels in pairs, one block of 32 columns at a time
// (`packed`: the item's own (m/2, 32) pairs, in L1), then the block's outputs are accumulated over the pairs
// kOutputsDot at a time, each packed vector loaded once for all of them: 32 multiply-adds an instruction.
constexpr int kOutputsDot = 6;
template <typename Value>
void DenseColumnsDotBlock(const float* x, const Value* w, const float* scale, const float* bias, int64_t m,
                          int64_t p, int64_t n, int64_t p0, uint32_t* packed, float* out) {
  constexpr int64_t block = 32;
  const int64_t start = std::min(p0, p - block);
  const int64_t pairs = (m + 1) / 2;
  for (int64_t c2 = 0; c2 < pairs; ++c2) {
    const float* low = x + 2 * c2 * p + start;
    const float* high = 2 * c2 + 1 < m ? low + p : nullptr;
    for (int v = 0; v < 2; ++v) {
      const __m512i a = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(
          _mm512_loadu_ps(low + 16 * v))));
      const __m512i b = high == nullptr ? _mm512_setzero_si512() : _mm512_cvtepu16_epi32(
          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(high + 16 * v))));
      // lane i: (x[2c2][start + 16v + i], x[2c2 + 1][start + 16v + i])
      _mm512_store_si512(packed + (2 * c2 + v) * 16, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
  const int64_t stop = std::min(p0 + block, p);
  auto outputs = [&](auto count, int64_t o0) {
    constexpr int R = decltype(count)::value;
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t c2 = 0; c2 < pairs; ++c2) {
      const __m512bh x0 = reinterpret_cast<__m512bh>(_mm512_load_si512(packed + 2 * c2 * 16));
      const __m512bh x1 = reinterpret_cast<__m512bh>(_mm512_load_si512(packed + (2 * c2 + 1) * 16));
      const bool odd = 2 * c2 + 1 < m;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Value* row = w + (o0 + r) * m;
        const uint32_t pair = BF16Bits(row[2 * c2]) | (odd ? BF16Bits(row[2 * c2 + 1]) << 16 : 0u);
        const __m512bh weights = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(pair)));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x0, weights);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x1, weights);
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(64) float sums[block];
      _mm512_store_ps(sums, acc[r][0]);
      _mm512_store_ps(sums + 16, acc[r][1]);
      const int64_t o = o0 + r;
      for (int64_t q = p0; q < stop; ++q) out[o * p + q] = sums[q - start] * scale[o] + bias[o];
    }
  };
  int64_t o = 0;
  for (; o + kOutputsDot <= n; o += kOutputsDot) outputs(std::integral_constant<int, kOutputsDot>{}, o);
  for (; o < n; ++o) outputs(std::integral_constant<int, 1>{}, o);
}

// DenseColumnsDot for bfloat16 or int8 D over at least 32 columns; false (nothing done) otherwise.
template <typename Pool, typename Value>
bool DenseColumnsDot(Pool& pool, const float* x, const Value* w, const float* scale, const float* bias, int64_t m,
                     int64_t p, int64_t n, float* out) {
  if constexpr (std::is_same_v<Value, float>) {
    return false;
  } else {
    if (p < 32) return false;
    const int64_t blocks = (p + 31) / 32;
    ParallelFor(pool, blocks, n * m * p / 2, [=](int64_t begin, int64_t end) {
      std::vector<uint32_t> storage((m + 1) / 2 * 32 + 16);  // 64-byte aligned within
      const uintptr_t address = reinterpret_cast<uintptr_t>(storage.data());
      uint32_t* packed = reinterpret_cast<uint32_t*>((address + 63) & ~uintptr_t{63});
      for (int64_t item = begin; item < end; ++item) {
        DenseColumnsDotBlock(x, w, scale, bias, m, p, n, item * 32, packed, out);
      }
    });
    return true;
  }
}
#endif

inline void MaxPoolImage(const float* x, int64_t c, int64_t h, int64_t w, const PoolGeometry& p, float* out);

// Max pooling of a CHWN activation x (c, h, w, batch) -> out (c, p.oh, p.ow, batch), one (channel, pooled row)
// per item; at batch 1, a range of channels per item (MaxPoolImage).
template <typename Pool>
void MaxPool(Pool& pool, const float* x, int64_t c, int64_t h, int64_t w, int64_t batch, const PoolGeometry& p,
             float* out) {
  if (batch == 1) {
    ParallelFor(pool, c, c * p.oh * p.ow * p.wh * p.ww, [=](int64_t begin, int64_t end) {
      MaxPoolImage(x + begin * h * w, end - begin, h, w, p, out + begin * p.oh * p.ow);
    });
    return;
  }
  ParallelFor(pool, c * p.oh, c * p.oh * p.ow * batch * p.wh * p.ww, [=](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ch = item / p.oh, py = item % p.oh;
      PoolRow(x + ch * h * w * batch, 0, h, w, batch, p, py, out + item * p.ow * batch);
    }
  });
}

// Max pooling of one image's (c, h, w) map -> out (c, p.oh, p.ow) (the batch-1 case of MaxPool, whose
// innermost loop, over the batch, is then one long): per pooled row, the maximum over the window's rows of each
// column (contiguous, vectorised), then over the window's columns of those.
inline void MaxPoolImage(const float* x, int64_t c, int64_t h, int64_t w, const PoolGeometry& p, float* out) {
  const float init = p.relu ? 0.f : -__builtin_inff();
#if defined(__AVX512F__)
  if (p.sw == 2) {
    // The columns' maxima in a row padded with `init` (which the maxima then ignore, as positions outside the map
    // are left out) by pw before and up to the last block's reach after, so that each window column j of 16 pooled
    // pixels is two unmasked loads of 32 columns, 2 * px + j - pw onwards, whose even elements one permute picks
    // out. AlexNet's three poolings at batch 1, one thread: 36, 33 and 18 us, against 96, 88 and 35 us with the
    // loops below (vectorised over the window's columns instead, one pass per column j, no faster; AMD EPYC Zen 4).
    const int64_t blocks = (p.ow + 15) / 16 * 16;  // pooled pixels, whole blocks
    std::vector<float> buffer(p.pw + std::max((w + 15) / 16 * 16, 2 * blocks + p.ww + 32), init);
    float* columns = buffer.data() + p.pw;
    const __m512 fill = _mm512_set1_ps(init);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* map = x + ch * h * w;
      for (int64_t py = 0; py < p.oh; ++py) {
        const int64_t y0 = py * p.sh - p.ph;
        const int64_t ya = std::max<int64_t>(0, y0), yb = std::min(h, y0 + p.wh);
        for (int64_t col = 0; col < w; col += 16) {
          const __mmask16 inside = static_cast<__mmask16>(w - col >= 16 ? 0xffff : (1u << (w - col)) - 1);
          __m512 m = fill;
          for (int64_t y = ya; y < yb; ++y) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(fill, inside, map + y * w + col));
          _mm512_storeu_ps(columns + col, m);  // beyond w: init, as the padding holds
        }
        float* dst = out + (ch * p.oh + py) * p.ow;
        for (int64_t px = 0; px < p.ow; px += 16) {
          __m512 m = fill;
          for (int64_t j = 0; j < p.ww; ++j) {
            const float* from = columns + 2 * px + j - p.pw;
            m = _mm512_max_ps(m, _mm512_permutex2var_ps(_mm512_loadu_ps(from), even, _mm512_loadu_ps(from + 16)));
          }
          const __mmask16 keep = static_cast<__mmask16>(p.ow - px >= 16 ? 0xffff : (1u << (p.ow - px)) - 1);
          _mm512_mask_storeu_ps(dst + px, keep, m);
        }
      }
    }
    return;
  }
#endif
  // Elsewhere the same two steps in loops the compiler vectorises: the columns' maxima in a row padded with
  // `init` (pw before, up to the last window's reach after), then, for rows of 16 columns or more, the maximum
  // of every run of ww padded columns (a window at each column, contiguous), of which each pooled pixel takes the
  // one at its window's start; shorter rows take each pixel's window in turn. AlexNet's poolings at batch 1,
  // both ways side by side (benchmarks/batch1_ab.py, AVX2, AMD EPYC Zen 3): 55x55 maps 14.5% faster, 27x27 3.8%,
  // 13x13 5.7% slower (hence the pixel by pixel loop there).
  if (w < 16) {
    std::vector<float> columns(w);
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* map = x + ch * h * w;
      for (int64_t py = 0; py < p.oh; ++py) {
        std::fill(columns.begin(), columns.end(), init);
        const int64_t y0 = py * p.sh - p.ph;
        for (int64_t y = std::max<int64_t>(0, y0); y < std::min(h, y0 + p.wh); ++y) {
          const float* row = map + y * w;
          for (int64_t col = 0; col < w; ++col) columns[col] = std::max(columns[col], row[col]);
        }
        float* dst = out + (ch * p.oh + py) * p.ow;
        for (int64_t px = 0; px < p.ow; ++px) {
          const int64_t x0 = px * p.sw - p.pw;
          float m = init;
          for (int64_t col = std::max<int64_t>(0, x0); col < std::min(w, x0 + p.ww); ++col)
            m = std::max(m, columns[col]);
          dst[px] = m;
        }
      }
    }
    return;
  }
  const int64_t starts = (p.ow - 1) * p.sw + 1;  // window starts, at every column from the first pixel's
  std::vector<float> buffer(std::max(p.pw + w, starts + p.ww - 1), init), windows(starts);
  float* columns = buffer.data() + p.pw;
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* map = x + ch * h * w;
    for (int64_t py = 0; py < p.oh; ++py) {
      std::fill(columns, columns + w, init);
      const int64_t y0 = py * p.sh - p.ph;
      for (int64_t y = std::max<int64_t>(0, y0); y < std::min(h, y0 + p.wh); ++y) {
        const float* row = map + y * w;
        for (int64_t col = 0; col < w; ++col) columns[col] = std::max(columns[col], row[col]);
      }
      const float* padded = buffer.data();
      float* m = windows.data();
      for (int64_t j = 0; j < starts; ++j) m[j] = std::max(init, padded[j]);
      for (int64_t k = 1; k < p.ww; ++k)
        for (int64_t j = 0; j < starts; ++j) m[j] = std::max(m[j], padded[j + k]);
      float* dst = out + (ch * p.oh + py) * p.ow;
      for (int64_t px = 0; px < p.ow; ++px) dst[px] = m[px * p.sw];
    }
  }
}

}  // namespace lcnn

#endif  // LCNN_JAX_INFERENCE_LOOKUP_KERNEL_H_
