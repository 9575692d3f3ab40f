// y[m, n] = sum_k x[m, k] * w[n, k]: a weight matrix stored [out, in] times a few rows of activations, on
// every thread of XLA:CPU's intra-op pool. Compiled on first use by instit_jax/kernels/cpu.py.
//
// Each thread takes blocks of consecutive weight rows (a contiguous range of memory) from a shared counter
// and writes the matching output columns, so the weights stream from memory once, in order, on all cores.
// The inner loops use GCC/Clang vector extensions: -march=native picks the widest registers the host has.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define INSTIT_PAUSE() _mm_pause()
#else
#define INSTIT_PAUSE() ((void)0)
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float hsum(v16 v) {
#if defined(__AVX512F__)
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  return _mm512_reduce_add_ps(m);
#else
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
#endif
}

// Rows [n0, n1) of w against M rows of x (x row stride K, y row stride N): two weight rows at a time, M
// accumulators per weight row.
template <int M>
void block(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t k16 = K & ~int64_t(15);
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const float* w0 = w + n * K;
    const float* w1 = w0 + K;
    v16 a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = v16{};
    for (int64_t k = 0; k < k16; k += 16) {
      const v16 r0 = load16(w0 + k), r1 = load16(w1 + k);
      for (int m = 0; m < M; ++m) {
        const v16 xv = load16(x + m * K + k);
        a0[m] += r0 * xv;
        a1[m] += r1 * xv;
      }
    }
    for (int m = 0; m < M; ++m) {
      float s0 = hsum(a0[m]), s1 = hsum(a1[m]);
      for (int64_t k = k16; k < K; ++k) {
        s0 += w0[k] * x[m * K + k];
        s1 += w1[k] * x[m * K + k];
      }
      y[m * N + n] = s0;
      y[m * N + n + 1] = s1;
    }
  }
  for (; n < n1; ++n) {
    const float* w0 = w + n * K;
    for (int m = 0; m < M; ++m) {
      v16 a{};
      for (int64_t k = 0; k < k16; k += 16) a += load16(w0 + k) * load16(x + m * K + k);
      float s = hsum(a);
      for (int64_t k = k16; k < K; ++k) s += w0[k] * x[m * K + k];
      y[m * N + n] = s;
    }
  }
}

void rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block<4>(x + m * K, w, y + m * N, K, N, n0, n1);
  for (; m + 2 <= M; m += 2) block<2>(x + m * K, w, y + m * N, K, N, n0, n1);
  for (; m < M; ++m) block<1>(x + m * K, w, y + m * N, K, N, n0, n1);
}

// Runs work.unit(i, scratch) for every i in [0, units) on the calling thread and up to num_threads - 1 tasks of
// XLA's intra-op pool, units handed out by an atomic counter (each thread has one W::Scratch). The caller waits
// only for units already taken: a task that starts after every unit was taken returns at once (the shared
// state stays alive through its shared_ptr), so a busy pool cannot deadlock the call.
template <typename W>
void parallel_units(ffi::ThreadPool& pool, int64_t units, const W& work) {
  struct Shared {
    W work;
    int64_t units = 0;
    std::atomic<int64_t> next{0}, finished{0};

    void run() {
      typename W::Scratch scratch;
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= units) return;
        work.unit(i, scratch);
        finished.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->work = work;
  shared->units = units;
  const int64_t helpers = std::min(std::max<int64_t>(1, pool.num_threads()), units) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->run(); });
  shared->run();
  while (shared->finished.load(std::memory_order_acquire) < units) INSTIT_PAUSE();
}

// Blocks of consecutive weight rows.
struct MatvecWork {
  struct Scratch {};
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, rows_per_block;

  void unit(int64_t b, Scratch&) const {
    const int64_t n0 = b * rows_per_block;
    rows(x, w, y, M, K, N, n0, std::min(N, n0 + rows_per_block));
  }
};

ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("instit_matvec_f32: the weight must be 2-D [out, in]");
  const int64_t N = wd[0], K = wd[1];
  const auto xd = x.dimensions();
  if (xd.size() == 0 || xd[xd.size() - 1] != K)
    return ffi::Error::InvalidArgument("instit_matvec_f32: x's last dimension must equal the weight's second");
  const int64_t M = K ? x.element_count() / K : 0;
  if (static_cast<int64_t>(y->element_count()) != M * N)
    return ffi::Error::InvalidArgument("instit_matvec_f32: the result must hold x's rows times the weight's");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(y->typed_data(), 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Blocks of >= 64 KiB of weights (scheduling costs a few microseconds), at most 8 per thread, even rows.
  int64_t per = std::max<int64_t>(2, (16384 + K - 1) / K);
  per = std::max(per, (N + 8 * threads - 1) / (8 * threads));
  per = (per + 1) & ~int64_t(1);
  parallel_units(pool, (N + per - 1) / per, MatvecWork{x.typed_data(), w.typed_data(), y->typed_data(), M, K, N, per});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstitMatvecF32, Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// ---------------------------------------------------------------------------------------------------------
// Attention of one query per row over a KV cache: out[b, k, g] = softmax_s(scale * q[b, k, g] . keys[b, k, s])
// over the visible slots s, applied to values[b, k, s]. A row with no visible slot averages every slot, as
// the XLA formulation (masked logits at a large negative value) does. Threads take (row, KV head) pairs.
namespace {

void axpy(float alpha, const float* x, float* y, int64_t n) {
  const int64_t n16 = n & ~int64_t(15);
  for (int64_t i = 0; i < n16; i += 16) {
    v16 v = load16(y + i) + load16(x + i) * alpha;
    std::memcpy(y + i, &v, sizeof(v));
  }
  for (int64_t i = n16; i < n; ++i) y[i] += alpha * x[i];
}

// x[i] <- exp(x[i] - shift) for x[i] - shift <= 0, 16 lanes at a time in vector arithmetic (Cody-Waite
// reduction and a degree-6 polynomial, ~1 ulp; arguments below -87 give 0); returns the sum.
typedef int32_t vi16 __attribute__((vector_size(64)));

inline v16 exp16(v16 v) {
  const v16 lo = v16{} - 87.f;
  const v16 a = v < lo ? lo : v;
  const v16 magic = v16{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const v16 t = (a * 1.44269504088896341f + magic) - magic;
  const v16 r = (a - t * 0.693359375f) + t * 2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi16 bits = (__builtin_convertvector(t, vi16) + 127) << 23;
  v16 two_t;
  std::memcpy(&two_t, &bits, sizeof(two_t));
  return v < lo ? v16{} : p * two_t;
}

float exp_shifted(float* x, int64_t n, float shift) {
  const int64_t n16 = n & ~int64_t(15);
  v16 total{};
  for (int64_t i = 0; i < n16; i += 16) {
    const v16 e = exp16(load16(x + i) - shift);
    std::memcpy(x + i, &e, sizeof(e));
    total += e;
  }
  float sum = hsum(total);
  for (int64_t i = n16; i < n; ++i) {
    x[i] = x[i] - shift < -87.f ? 0.f : __builtin_expf(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// Two-vector lane shuffles: __builtin_shufflevector (Clang, GCC >= 12), else GCC's __builtin_shuffle with the
// lane indices as a vector (GCC < 12). -DINSTIT_NO_SHUFFLEVECTOR forces the latter (to test it).
#if defined(__has_builtin) && !defined(INSTIT_NO_SHUFFLEVECTOR)
#if __has_builtin(__builtin_shufflevector)
#define INSTIT_SHUFFLEVECTOR 1
#endif
#endif
#ifdef INSTIT_SHUFFLEVECTOR
#define SHUF16(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF16(a, b, ...) __builtin_shuffle(a, b, vi16{__VA_ARGS__})
#endif

// 16 vectors -> one: lane j = the sum of a[j]'s lanes (a transpose-and-add tree: 15 adds and 30 shuffles for
// 16 horizontal sums).
inline v16 reduce16(const v16* a) {
  v16 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = SHUF16(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUF16(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    u[i] = SHUF16(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUF16(t[2 * i], t[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    w[i] = SHUF16(u[2 * i], u[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUF16(u[2 * i], u[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return SHUF16(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUF16(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// Units are (row, KV head) pairs. Only the slots from the first to the last visible one are read (all slots
// when none is visible: equal weights). Per query head: logits for 16 slots at a time (one accumulator per
// slot, then one transpose-and-add reduction), a vectorised softmax, then probabilities x values with the
// output row in registers. DV = D / 16 when D is 16, 32, 64 or 128 (unrolled); 0: any D.
template <int DV>
struct AttentionWork {
  using Scratch = std::vector<float>;  // one head's logits over the read slots, padded to 16
  const float *q, *keys, *values;
  const int32_t* visible;
  float* out;
  int64_t B, K, G, S, D;
  float scale;

  void unit(int64_t i, Scratch& logits) const {
    const int64_t b = i / K, k = i % K;
    const int32_t* vis = visible + b * S;
    int64_t lo = 0, hi = S - 1;
    while (lo < S && !vis[lo]) ++lo;
    while (hi >= lo && !vis[hi]) --hi;
    const bool any = lo < S;
    if (!any) lo = 0, hi = S - 1;
    const int64_t n = hi - lo + 1;
    logits.resize((n + 15) & ~int64_t(15));
    float* lg = logits.data();
    const float* kb = keys + ((b * K + k) * S + lo) * D;
    const float* vb = values + ((b * K + k) * S + lo) * D;
    const int32_t* vr = vis + lo;
    const int64_t d16 = DV ? DV * 16 : D & ~int64_t(15);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + ((b * K + k) * G + g) * D;
      float* og = out + ((b * K + k) * G + g) * D;
      v16 top16 = v16{} - 3.0e38f;
      for (int64_t s0 = 0; s0 < n; s0 += 16) {
        const int64_t m = std::min<int64_t>(16, n - s0);
        v16 acc[16];
        for (int j = 0; j < 16; ++j) acc[j] = v16{};
        for (int64_t j = 0; j < m; ++j) {
          const float* kr = kb + (s0 + j) * D;
          for (int64_t c = 0; c < d16; c += 16) acc[j] += load16(qg + c) * load16(kr + c);
        }
        v16 sc = reduce16(acc);
        if (!DV && d16 < D)
          for (int64_t j = 0; j < m; ++j)
            for (int64_t c = d16; c < D; ++c) sc[j] += qg[c] * kb[(s0 + j) * D + c];
        sc *= scale;
        for (int64_t j = 0; j < 16; ++j) sc[j] = j >= m ? -3.0e38f : !any ? 0.f : vr[s0 + j] ? sc[j] : -3.0e38f;
        std::memcpy(lg + s0, &sc, sizeof(sc));
        top16 = top16 > sc ? top16 : sc;
      }
      float top = -3.0e38f;
      for (int j = 0; j < 16; ++j) top = std::max(top, top16[j]);
      const float inv = 1.f / exp_shifted(lg, n, top);  // lg[s] <- exp(lg[s] - top); masked slots -> 0
      if (DV) {
        v16 o[DV ? DV : 1];
        for (int c = 0; c < DV; ++c) o[c] = v16{};
        for (int64_t s = 0; s < n; ++s) {
          const float p = lg[s];
          for (int c = 0; c < DV; ++c) o[c] += load16(vb + s * D + 16 * c) * p;
        }
        for (int c = 0; c < DV; ++c) {
          const v16 r = o[c] * inv;
          std::memcpy(og + 16 * c, &r, sizeof(r));
        }
      } else {
        std::memset(og, 0, sizeof(float) * D);
        for (int64_t s = 0; s < n; ++s)
          if (lg[s] != 0.f) axpy(lg[s] * inv, vb + s * D, og, D);
      }
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                           ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> visible, float scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions(), md = visible.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2)
    return ffi::Error::InvalidArgument("instit_decode_attention_f32: q, keys, values are 4-D, visible 2-D");
  const int64_t B = kd[0], K = kd[1], S = kd[2], D = kd[3];
  if (qd[0] != B || qd[1] != K || qd[3] != D || vd[0] != B || vd[1] != K || vd[2] != S || vd[3] != D ||
      md[0] != B || md[1] != S)
    return ffi::Error::InvalidArgument("instit_decode_attention_f32: shapes do not agree");
  if (B * K == 0 || qd[2] == 0 || D == 0) return ffi::Error::Success();
  if (S == 0) {
    std::memset(out->typed_data(), 0, sizeof(float) * B * K * qd[2] * D);
    return ffi::Error::Success();
  }
  const float* qp = q.typed_data();
  const float *kp = keys.typed_data(), *vp = values.typed_data();
  const int32_t* mp = visible.typed_data();
  float* op = out->typed_data();
  const int64_t G = qd[2];
  switch (D) {
    case 16: parallel_units(pool, B * K, AttentionWork<1>{qp, kp, vp, mp, op, B, K, G, S, D, scale}); break;
    case 32: parallel_units(pool, B * K, AttentionWork<2>{qp, kp, vp, mp, op, B, K, G, S, D, scale}); break;
    case 64: parallel_units(pool, B * K, AttentionWork<4>{qp, kp, vp, mp, op, B, K, G, S, D, scale}); break;
    case 128: parallel_units(pool, B * K, AttentionWork<8>{qp, kp, vp, mp, op, B, K, G, S, D, scale}); break;
    default: parallel_units(pool, B * K, AttentionWork<0>{qp, kp, vp, mp, op, B, K, G, S, D, scale});
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstitDecodeAttentionF32, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// ---------------------------------------------------------------------------------------------------------
// Attention of T queries per row over a KV cache (prefill): query (b, t) sees slot s when slot_mask[b, s] != 0
// and s <= query_slots[b, t]; a query that sees nothing averages every slot (as masked XLA softmax does).
// q [B, T, K, G, D] (query heads grouped by KV head), keys / values [B, K, S, D] -> out [B, T, K, G, D].
// Work units are (row, KV head) pairs; a unit walks its queries in blocks of TQ positions: the block's
// R = TQ * G query vectors against the keys up to the block's last visible slot, as register-tiled products
// (the keys transposed once per unit into a per-thread buffer, as far as the blocks need, so the inner loop
// is broadcasts and FMAs), a vectorised softmax, and a register-tiled probabilities x values product.
namespace {

constexpr int64_t TQ = 8;  // query positions per work unit

// Units are (row, KV head, range of query blocks); `chunks` ranges per pair (more units when pairs are few).
struct PrefillWork {
  struct Scratch {
    std::vector<float> kt, lg, qt;
    std::vector<int64_t> limit;
    std::vector<int32_t> maskpad;
  };
  const float *q, *keys, *values;
  const int32_t *slot_mask, *query_slots;
  float* out;
  int64_t B, T, K, G, S, D, tblocks, chunks;
  float scale;

  void block(int64_t b, int64_t k, int64_t tb, std::vector<float>& kt, int64_t& done, std::vector<float>& lg,
             std::vector<float>& qt, std::vector<int64_t>& limit, const std::vector<int32_t>& maskpad,
             int64_t first_visible) const {
    const int64_t t0 = tb * TQ, t1 = std::min(T, t0 + TQ), R = (t1 - t0) * G;
    const int64_t stride = (S + 31) & ~int64_t(31);  // kt is [D, stride]
    const float* kb = keys + (b * K + k) * S * D;
    const float* vb = values + (b * K + k) * S * D;
    // the slots any query of the block may see: 0 .. send-1 (all of them where some query sees nothing)
    int64_t send = 0;
    bool all = false;
    limit.assign(R, 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qs = query_slots[b * T + t];
      const bool sees = first_visible <= qs;
      for (int64_t g = 0; g < G; ++g) limit[(t - t0) * G + g] = sees ? std::min<int64_t>(qs + 1, S) : -1;
      if (sees) send = std::max<int64_t>(send, std::min<int64_t>(qs + 1, S));
      else all = true;
    }
    if (all) send = S;
    const int64_t sp = (send + 31) & ~int64_t(31);  // padded to the 32-slot tile
    // keys^T: slots [done, send) added to the unit's buffer (zero past S)
    for (int64_t s = done; s < send; ++s)
      for (int64_t d = 0; d < D; ++d) kt[d * stride + s] = kb[s * D + d];
    done = std::max(done, send);
    // the block's queries [R, D]
    qt.resize(R * D);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(&qt[((t - t0) * G + g) * D], q + (((b * T + t) * K + k) * G + g) * D, sizeof(float) * D);
    // logits [R, sp] = qt kt, 4 rows x 32 slots per tile
    lg.resize(R * sp);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int64_t rn = std::min<int64_t>(4, R - r0);
      for (int64_t s0 = 0; s0 < sp; s0 += 32) {
        v16 acc[4][2] = {};
        for (int64_t d = 0; d < D; ++d) {
          const v16 k0 = load16(&kt[d * stride + s0]), k1 = load16(&kt[d * stride + s0 + 16]);
          for (int64_t rr = 0; rr < 4; ++rr) {
            if (rr >= rn) break;
            const float x = qt[(r0 + rr) * D + d];
            acc[rr][0] += k0 * x;
            acc[rr][1] += k1 * x;
          }
        }
        for (int64_t rr = 0; rr < rn; ++rr) {
          std::memcpy(&lg[(r0 + rr) * sp + s0], &acc[rr][0], sizeof(v16));
          std::memcpy(&lg[(r0 + rr) * sp + s0 + 16], &acc[rr][1], sizeof(v16));
        }
      }
    }
    // mask, softmax (probabilities left unnormalised; 1 / sum kept per row)
    std::vector<float> inv(R);
    vi16 iota;
    for (int j = 0; j < 16; ++j) iota[j] = j;
    const v16 hidden = v16{} - 3.0e38f;
    const vi16 every = vi16{} - 1;  // all lanes true
    for (int64_t r = 0; r < R; ++r) {
      float* row = &lg[r * sp];
      const int32_t lim = static_cast<int32_t>(limit[r] < 0 ? S : limit[r]);
      v16 topv = hidden;
      for (int64_t s0 = 0; s0 < sp; s0 += 16) {
        vi16 m;
        std::memcpy(&m, &maskpad[s0], sizeof(m));
        const vi16 ok = (iota + static_cast<int32_t>(s0) < lim) & (limit[r] < 0 ? every : m != 0);
        const v16 v = ok ? (limit[r] < 0 ? v16{} : load16(row + s0) * scale) : hidden;
        std::memcpy(row + s0, &v, sizeof(v));
        topv = topv > v ? topv : v;
      }
      float top = topv[0];
      for (int j = 1; j < 16; ++j) top = std::max(top, topv[j]);
      inv[r] = 1.f / exp_shifted(row, sp, top);
    }
    // out [R, D] = p [R, sp] values [sp, D], 4 rows x 64 dims per tile
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int64_t rn = std::min<int64_t>(4, R - r0);
      int64_t hi = 0;  // last slot with a non-zero probability in these rows
      for (int64_t rr = 0; rr < rn; ++rr) hi = std::max(hi, limit[r0 + rr] < 0 ? send : limit[r0 + rr]);
      for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int64_t dn = std::min<int64_t>(64, D - d0), nv = dn / 16;
        v16 acc[4][4] = {};
        float tail[4][16] = {};
        for (int64_t s = 0; s < hi; ++s) {
          const float* vs = vb + s * D + d0;
          v16 v[4];
          for (int64_t j = 0; j < nv; ++j) v[j] = load16(vs + 16 * j);
          for (int64_t rr = 0; rr < rn; ++rr) {
            const float p = lg[(r0 + rr) * sp + s];
            for (int64_t j = 0; j < nv; ++j) acc[rr][j] += v[j] * p;
            for (int64_t j = nv * 16; j < dn; ++j) tail[rr][j - nv * 16] += p * vs[j];
          }
        }
        for (int64_t rr = 0; rr < rn; ++rr) {
          const int64_t r = r0 + rr, t = t0 + r / G, g = r % G;
          float* o = out + (((b * T + t) * K + k) * G + g) * D + d0;
          for (int64_t j = 0; j < nv; ++j) {
            const v16 w = acc[rr][j] * inv[r];
            std::memcpy(o + 16 * j, &w, sizeof(w));
          }
          for (int64_t j = nv * 16; j < dn; ++j) o[j] = tail[rr][j - nv * 16] * inv[r];
        }
      }
    }
  }

  void unit(int64_t i, Scratch& sc) const {
    const int64_t stride = (S + 31) & ~int64_t(31);
    const int64_t per = (tblocks + chunks - 1) / chunks;
    const int64_t pair = i / chunks, c = i % chunks;
    const int64_t b = pair / K;
    sc.kt.assign(D * stride, 0.f);
    sc.maskpad.assign(stride, 0);  // the row's slot mask, zero-padded to the tile stride
    int64_t first_visible = S;
    for (int64_t s = S - 1; s >= 0; --s)
      if ((sc.maskpad[s] = slot_mask[b * S + s] != 0)) first_visible = s;
    int64_t done = 0;
    for (int64_t tb = c * per; tb < std::min(tblocks, (c + 1) * per); ++tb)
      block(b, pair % K, tb, sc.kt, done, sc.lg, sc.qt, sc.limit, sc.maskpad, first_visible);
  }
};

ffi::Error PrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                            ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> slot_mask,
                            ffi::Buffer<ffi::S32> query_slots, float scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  const auto md = slot_mask.dimensions(), sd = query_slots.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("instit_cached_attention_f32: q 5-D, keys/values 4-D, masks 2-D");
  const int64_t B = kd[0], K = kd[1], S = kd[2], D = kd[3], T = qd[1], G = qd[3];
  if (qd[0] != B || qd[2] != K || qd[4] != D || vd[0] != B || vd[1] != K || vd[2] != S || vd[3] != D ||
      md[0] != B || md[1] != S || sd[0] != B || sd[1] != T)
    return ffi::Error::InvalidArgument("instit_cached_attention_f32: shapes do not agree");
  if (B * T * K * G * D == 0) return ffi::Error::Success();
  if (S == 0) {
    std::memset(out->typed_data(), 0, sizeof(float) * B * T * K * G * D);
    return ffi::Error::Success();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tblocks = (T + TQ - 1) / TQ;
  const int64_t chunks = std::min(tblocks, std::max<int64_t>(1, (2 * threads + B * K - 1) / (B * K)));
  parallel_units(pool, B * K * chunks,
                 PrefillWork{q.typed_data(), keys.typed_data(), values.typed_data(), slot_mask.typed_data(),
                             query_slots.typed_data(), out->typed_data(), B, T, K, G, S, D, tblocks, chunks, scale});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(InstitCachedAttentionF32, PrefillAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
