// Block attention over packed rows as two MLX primitives for the CPU (forward, backward).
//
// The same computation as mlx_pref/attention.py's flash_attention (FlashAttention's
// forward and recomputing backward over 64-query blocks, log-sum-exp in base 2), with
// the matmuls in BLAS (cblas_sgemm) and the masking, maxima, powers of two and sums in
// loops the compiler vectorizes, on every core. The mask is computed from the row's
// segments (own segment's earlier tokens, the prompt's tokens, an optional window).
// Built by mlx_pref/native.py on first use; float32 only.

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <stdexcept>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                            float alpha, const float* a, int lda, const float* b, int ldb,
                            float beta, float* c, int ldc);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr float kLog2e = 1.4426950408889634f;

struct Layout {
  int batch, heads, kv_heads, tokens, dim, value_dim, window, threads;
  float scale;
  bool operator==(const Layout&) const = default;
};

// 2^x for x <= 0 (Taylor polynomial of 2^f on |f| <= 1/2: relative error ~1e-7).
inline float exp2_neg(float x) {
  x = x < -126.0f ? -126.0f : x;
  float shifted = x + 12582912.0f;  // 1.5 * 2^23: rounds x to an integer in the low bits
  float n = shifted - 12582912.0f;
  float f = x - n;
  float p = 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  int32_t bits = (std::bit_cast<int32_t>(shifted) - 0x4B400000 + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// OpenBLAS's thread count (a process-wide setting), or null where BLAS is not OpenBLAS.
struct BlasThreads {
  void (*set)(int) = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  int (*get)() = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  bool found() const { return set != nullptr && get != nullptr; }
};

int workers_for(int threads, size_t items) {
  static BlasThreads blas;
  return blas.found() ? std::max(1, std::min<int>(threads, items)) : 1;
}

// Runs fn(item, worker) for items in the given order on `threads` workers (the calling
// thread, MLX's stream, is worker 0). BLAS runs one thread per worker meanwhile: two
// workers whose BLAS calls start two threads each wait on each other's spinning threads.
template <class F>
void parallel(const std::vector<int>& order, int threads, F&& fn) {
  static BlasThreads blas;
  if (threads <= 1) {
    for (int item : order) fn(item, 0);
    return;
  }
  int before = blas.get();
  blas.set(1);
  std::atomic<size_t> next{0};
  auto work = [&](int worker) {
    for (size_t i = next++; i < order.size(); i = next++) fn(order[i], worker);
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < threads; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  blas.set(before);
}

struct Rows {
  const int32_t *segment, *parent, *position, *ranges;
  int blocks;
};

// Block items (batch, kv head, block), largest first.
std::vector<int> items(const Layout& L, const Rows& r) {
  std::vector<int> order(L.batch * L.kv_heads * r.blocks);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto cost = [&](int i) {
    const int32_t* b = r.ranges + 3 * (i % r.blocks);
    return int64_t(b[1] - b[0]) * (b[1] - b[2]);
  };
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return cost(a) > cost(b); });
  return order;
}

// 1 where query lo+i sees key first+j, else 0 (n x keys).
void visible(const Layout& L, const Rows& r, int lo, int n, int first, int keys, uint8_t* out) {
  for (int i = 0; i < n; ++i) {
    int q = lo + i, seg = r.segment[q], parent = r.parent[q], pos = r.position[q];
    uint8_t* row = out + size_t(i) * keys;
    for (int j = 0; j < keys; ++j) {
      int k = first + j;
      bool ok = (r.segment[k] == seg && k <= q) || r.segment[k] == parent;
      if (L.window > 0) ok = ok && (pos - r.position[k] < L.window);
      row[j] = ok;
    }
  }
}

// Scores of one head's block in base 2: s = (q . k) * scale * log2(e).
void scores(const Layout& L, const float* q, const float* k, int n, int keys, float* s) {
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, keys, L.dim, L.scale * kLog2e, q, L.dim, k, L.dim,
              0.0f, s, keys);
}

void forward(const Layout& L, const Rows& r, const float* q, const float* k, const float* v,
             float* out, float* lse) {
  auto order = items(L, r);
  int g = L.heads / L.kv_heads;
  parallel(order, workers_for(L.threads, order.size()), [&](int item, int) {
    int blk = item % r.blocks, h = (item / r.blocks) % L.kv_heads, b = item / r.blocks / L.kv_heads;
    int lo = r.ranges[3 * blk], hi = r.ranges[3 * blk + 1], first = r.ranges[3 * blk + 2];
    int n = hi - lo, keys = hi - first;
    std::vector<uint8_t> mask(size_t(n) * keys);
    std::vector<float> s(size_t(n) * keys);
    visible(L, r, lo, n, first, keys, mask.data());
    const float* kb = k + (size_t(b * L.kv_heads + h) * L.tokens + first) * L.dim;
    const float* vb = v + (size_t(b * L.kv_heads + h) * L.tokens + first) * L.value_dim;
    for (int j = 0; j < g; ++j) {
      size_t row0 = size_t(b * L.heads + h * g + j) * L.tokens + lo;
      scores(L, q + row0 * L.dim, kb, n, keys, s.data());
      std::vector<float> inv(n);  // rows are normalized after the product with V
      for (int i = 0; i < n; ++i) {
        float* si = s.data() + size_t(i) * keys;
        const uint8_t* mi = mask.data() + size_t(i) * keys;
        float top = -INFINITY;
        for (int c = 0; c < keys; ++c) top = std::max(top, mi[c] ? si[c] : -INFINITY);
        float total = 0.0f;
        for (int c = 0; c < keys; ++c) {
          float p = mi[c] ? exp2_neg(si[c] - top) : 0.0f;
          si[c] = p;
          total += p;
        }
        lse[row0 + i] = top + std::log2(total);
        inv[i] = 1.0f / total;
      }
      float* ob = out + row0 * L.value_dim;
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, L.value_dim, keys, 1.0f, s.data(), keys, vb,
                  L.value_dim, 0.0f, ob, L.value_dim);
      for (int i = 0; i < n; ++i)
        for (int c = 0; c < L.value_dim; ++c) ob[size_t(i) * L.value_dim + c] *= inv[i];
    }
  });
}

void backward(const Layout& L, const Rows& r, const float* q, const float* k, const float* v,
              const float* out, const float* lse, const float* d_out, float* dq, float* dk,
              float* dv) {
  auto order = items(L, r);
  int g = L.heads / L.kv_heads;
  int workers = workers_for(L.threads, order.size());
  size_t kv_size = size_t(L.batch) * L.kv_heads * L.tokens;
  // Worker 0 accumulates into the outputs, the others into their own buffers (summed after).
  std::vector<std::vector<float>> extra_k(workers - 1), extra_v(workers - 1);
  std::fill(dk, dk + kv_size * L.dim, 0.0f);
  std::fill(dv, dv + kv_size * L.value_dim, 0.0f);
  for (int w = 0; w + 1 < workers; ++w) {
    extra_k[w].assign(kv_size * L.dim, 0.0f);
    extra_v[w].assign(kv_size * L.value_dim, 0.0f);
  }
  parallel(order, workers, [&](int item, int worker) {
    float* dk_w = worker == 0 ? dk : extra_k[worker - 1].data();
    float* dv_w = worker == 0 ? dv : extra_v[worker - 1].data();
    int blk = item % r.blocks, h = (item / r.blocks) % L.kv_heads, b = item / r.blocks / L.kv_heads;
    int lo = r.ranges[3 * blk], hi = r.ranges[3 * blk + 1], first = r.ranges[3 * blk + 2];
    int n = hi - lo, keys = hi - first;
    std::vector<uint8_t> mask(size_t(n) * keys);
    std::vector<float> p(size_t(n) * keys), ds(size_t(n) * keys);
    visible(L, r, lo, n, first, keys, mask.data());
    size_t kv0 = size_t(b * L.kv_heads + h) * L.tokens + first;
    const float *kb = k + kv0 * L.dim, *vb = v + kv0 * L.value_dim;
    for (int j = 0; j < g; ++j) {
      size_t row0 = size_t(b * L.heads + h * g + j) * L.tokens + lo;
      const float *qb = q + row0 * L.dim, *dob = d_out + row0 * L.value_dim;
      const float* ob = out + row0 * L.value_dim;
      scores(L, qb, kb, n, keys, p.data());
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, keys, L.value_dim, 1.0f, dob, L.value_dim, vb,
                  L.value_dim, 0.0f, ds.data(), keys);
      for (int i = 0; i < n; ++i) {
        float delta = 0.0f;
        for (int c = 0; c < L.value_dim; ++c)
          delta += dob[size_t(i) * L.value_dim + c] * ob[size_t(i) * L.value_dim + c];
        float shift = lse[row0 + i];
        float *pi = p.data() + size_t(i) * keys, *di = ds.data() + size_t(i) * keys;
        const uint8_t* mi = mask.data() + size_t(i) * keys;
        for (int c = 0; c < keys; ++c) {
          float pc = mi[c] ? exp2_neg(pi[c] - shift) : 0.0f;
          pi[c] = pc;
          di[c] = pc * (di[c] - delta);
        }
      }
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, L.dim, keys, L.scale, ds.data(), keys, kb,
                  L.dim, 0.0f, dq + row0 * L.dim, L.dim);
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, keys, L.dim, n, L.scale, ds.data(), keys, qb,
                  L.dim, 1.0f, dk_w + kv0 * L.dim, L.dim);
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, keys, L.value_dim, n, 1.0f, p.data(), keys, dob,
                  L.value_dim, 1.0f, dv_w + kv0 * L.value_dim, L.value_dim);
    }
  });
  for (int w = 0; w + 1 < workers; ++w) {
    for (size_t i = 0; i < kv_size * L.dim; ++i) dk[i] += extra_k[w][i];
    for (size_t i = 0; i < kv_size * L.value_dim; ++i) dv[i] += extra_v[w][i];
  }
}

Rows rows_of(const std::vector<mx::array>& in, size_t at) {
  return {in[at].data<int32_t>(), in[at + 1].data<int32_t>(), in[at + 2].data<int32_t>(),
          in[at + 3].data<int32_t>(), int(in[at + 3].shape(0))};
}

class BlockAttention : public mx::Primitive {
 public:
  BlockAttention(mx::Stream stream, Layout layout, bool grad)
      : mx::Primitive(stream), layout_(layout), grad_(grad) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    for (auto& o : outs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) encoder.set_input_array(a);
    for (auto& o : outs) encoder.set_output_array(o);
    Layout L = layout_;
    if (!grad_) {
      Rows r = rows_of(in, 3);
      encoder.dispatch([L, r, q = in[0].data<float>(), k = in[1].data<float>(),
                        v = in[2].data<float>(), o = outs[0].data<float>(),
                        lse = outs[1].data<float>()]() { forward(L, r, q, k, v, o, lse); });
    } else {
      Rows r = rows_of(in, 6);
      encoder.dispatch([L, r, q = in[0].data<float>(), k = in[1].data<float>(),
                        v = in[2].data<float>(), o = in[3].data<float>(),
                        lse = in[4].data<float>(), d_out = in[5].data<float>(),
                        dq = outs[0].data<float>(), dk = outs[1].data<float>(),
                        dv = outs[2].data<float>()]() {
        backward(L, r, q, k, v, o, lse, d_out, dq, dk, dv);
      });
    }
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx-pref's native block attention runs on the CPU only");
  }

  const char* name() const override { return grad_ ? "BlockAttentionGrad" : "BlockAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const BlockAttention*>(&other);
    return o != nullptr && o->layout_ == layout_ && o->grad_ == grad_;
  }

 private:
  Layout layout_;
  bool grad_;
};

mx::array f32(const mx::array& a) { return mx::contiguous(mx::astype(a, mx::float32)); }
mx::array i32(const mx::array& a) { return mx::contiguous(mx::astype(a, mx::int32)); }

Layout layout_of(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                 int window, int threads) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument("block attention: q (B, Hq, T, D), k/v (B, Hkv, T, D)");
  return {int(q.shape(0)), int(q.shape(1)), int(k.shape(1)), int(q.shape(2)), int(q.shape(3)),
          int(v.shape(3)), window, threads, scale};
}

std::vector<mx::array> attention_forward(const mx::array& q, const mx::array& k,
                                         const mx::array& v, const mx::array& segment,
                                         const mx::array& parent, const mx::array& position,
                                         const mx::array& ranges, float scale, int window,
                                         int threads) {
  Layout L = layout_of(q, k, v, scale, window, threads);
  auto s = mx::default_stream(mx::Device::cpu);
  mx::Shape out{L.batch, L.heads, L.tokens, L.value_dim}, lse{L.batch, L.heads, L.tokens, 1};
  return mx::array::make_arrays(
      {out, lse}, {mx::float32, mx::float32}, std::make_shared<BlockAttention>(s, L, false),
      {f32(q), f32(k), f32(v), i32(segment), i32(parent), i32(position), i32(ranges)});
}

std::vector<mx::array> attention_backward(const mx::array& q, const mx::array& k,
                                          const mx::array& v, const mx::array& out,
                                          const mx::array& lse, const mx::array& d_out,
                                          const mx::array& segment, const mx::array& parent,
                                          const mx::array& position, const mx::array& ranges,
                                          float scale, int window, int threads) {
  Layout L = layout_of(q, k, v, scale, window, threads);
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array::make_arrays(
      {q.shape(), k.shape(), v.shape()}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<BlockAttention>(s, L, true),
      {f32(q), f32(k), f32(v), f32(out), f32(lse), f32(d_out), i32(segment), i32(parent),
       i32(position), i32(ranges)});
}

}  // namespace

NB_MODULE(_native, m) {
  m.def("attention_forward", &attention_forward);
  m.def("attention_backward", &attention_backward);
}
