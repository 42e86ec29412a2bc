// mlx-pref's native CPU kernels, as MLX primitives (built by mlx_pref/native.py).
//
// MLX's CPU backend evaluates element-wise work one element at a time on one thread;
// these kernels do the step's heaviest element-wise work vectorized, on every core:
// - block attention over packed rows (forward, recomputing backward): the computation of
//   mlx_pref/attention.py's flash_attention (64-query blocks, log-sum-exp in base 2), the
//   matmuls in BLAS (cblas_sgemm), the mask computed from the row's segments;
// - the gated MLP's silu(gate) * up (forward, backward);
// - the LM head's token log-probs, logits[target] - logsumexp(logits) (forward, backward).
// float32 only: callers convert.

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <dlfcn.h>
#include <exception>
#include <functional>
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

// Runs work(w) for w in [0, threads), w = 0 on the calling thread (MLX's stream), the
// others on threads of their own; rethrows a worker's exception once all have stopped.
template <class W>
void on_threads(int threads, W&& work) {
  std::vector<std::exception_ptr> errors(threads);
  auto guarded = [&](int w) {
    try {
      work(w);
    } catch (...) {
      errors[w] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < threads; ++w) pool.emplace_back(guarded, w);
  guarded(0);
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Runs fn(item, worker) for items in the given order on `threads` workers. BLAS runs one
// thread per worker meanwhile: two workers whose BLAS calls start two threads each wait on
// each other's spinning threads.
template <class F>
void parallel(const std::vector<int>& order, int threads, F&& fn) {
  static BlasThreads blas;
  if (threads <= 1) {
    for (int item : order) fn(item, 0);
    return;
  }
  struct Restore {
    int before;
    ~Restore() { blas.set(before); }
  } restore{blas.get()};
  blas.set(1);
  std::atomic<size_t> next{0};
  on_threads(threads, [&](int worker) {
    for (size_t i = next++; i < order.size(); i = next++) fn(order[i], worker);
  });
}

struct Rows {
  const int32_t *segment, *parent, *position, *ranges;
  int blocks;
  // Query-key pairs of block `blk` (its queries times the keys they can reach).
  int64_t cost(int blk) const {
    const int32_t* b = ranges + 3 * blk;
    return int64_t(b[1] - b[0]) * (b[1] - b[2]);
  }
};

// The query blocks, largest first (for load balance).
std::vector<int> by_cost(const Rows& r) {
  std::vector<int> order(r.blocks);
  for (int i = 0; i < r.blocks; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return r.cost(a) > r.cost(b); });
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

// Query block `blk` of kv head h in batch row b: queries lo..lo+n, the keys first..first+keys
// they can reach (from row kv0 of k and v), and which of those each query sees.
struct Block {
  int lo, n, first, keys;
  size_t kv0;
  std::vector<uint8_t> mask;
  Block(const Layout& L, const Rows& r, int b, int h, int blk)
      : lo(r.ranges[3 * blk]), n(r.ranges[3 * blk + 1] - lo), first(r.ranges[3 * blk + 2]),
        keys(lo + n - first), kv0(size_t(b * L.kv_heads + h) * L.tokens + first),
        mask(size_t(n) * keys) {
    visible(L, r, lo, n, first, keys, mask.data());
  }
};

// Scores of one head's block in base 2: s = (q . k) * scale * log2(e).
void scores(const Layout& L, const float* q, const float* k, int n, int keys, float* s) {
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, n, keys, L.dim, L.scale * kLog2e, q, L.dim, k, L.dim,
              0.0f, s, keys);
}

void forward(const Layout& L, const Rows& r, const float* q, const float* k, const float* v,
             float* out, float* lse) {
  int g = L.heads / L.kv_heads, heads = L.batch * L.kv_heads;
  std::vector<int> order;  // (kv head, block) items, the largest blocks first
  for (int blk : by_cost(r))
    for (int head = 0; head < heads; ++head) order.push_back(head * r.blocks + blk);
  parallel(order, workers_for(L.threads, order.size()), [&](int item, int) {
    int head = item / r.blocks, b = head / L.kv_heads, h = head % L.kv_heads;
    Block blk(L, r, b, h, item % r.blocks);
    int lo = blk.lo, n = blk.n, keys = blk.keys;
    const uint8_t* mask = blk.mask.data();
    std::vector<float> s(size_t(n) * keys);
    const float *kb = k + blk.kv0 * L.dim, *vb = v + blk.kv0 * L.value_dim;
    for (int j = 0; j < g; ++j) {
      size_t row0 = size_t(b * L.heads + h * g + j) * L.tokens + lo;
      scores(L, q + row0 * L.dim, kb, n, keys, s.data());
      std::vector<float> inv(n);  // rows are normalized after the product with V
      for (int i = 0; i < n; ++i) {
        float* si = s.data() + size_t(i) * keys;
        const uint8_t* mi = mask + size_t(i) * keys;
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int c = 0; c < keys; ++c) top = std::max(top, mi[c] ? si[c] : -INFINITY);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
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

// One query block's share of the gradients: its rows of dq, and its keys' dk, dv added to
// the given accumulators.
void block_backward(const Layout& L, const Rows& r, int b, int h, int blk, const float* q,
                    const float* k, const float* v, const float* out, const float* lse,
                    const float* d_out, float* dq, float* dk, float* dv) {
  int g = L.heads / L.kv_heads;
  Block block(L, r, b, h, blk);
  int lo = block.lo, n = block.n, keys = block.keys;
  size_t kv0 = block.kv0;
  const uint8_t* mask = block.mask.data();
  std::vector<float> p(size_t(n) * keys), ds(size_t(n) * keys);
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
#pragma omp simd reduction(+ : delta)
      for (int c = 0; c < L.value_dim; ++c)
        delta += dob[size_t(i) * L.value_dim + c] * ob[size_t(i) * L.value_dim + c];
      float shift = lse[row0 + i];
      float *pi = p.data() + size_t(i) * keys, *di = ds.data() + size_t(i) * keys;
      const uint8_t* mi = mask + size_t(i) * keys;
#pragma omp simd
      for (int c = 0; c < keys; ++c) {
        float pc = mi[c] ? exp2_neg(pi[c] - shift) : 0.0f;
        pi[c] = pc;
        di[c] = pc * (di[c] - delta);
      }
    }
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, n, L.dim, keys, L.scale, ds.data(), keys, kb,
                L.dim, 0.0f, dq + row0 * L.dim, L.dim);
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, keys, L.dim, n, L.scale, ds.data(), keys, qb,
                L.dim, 1.0f, dk + kv0 * L.dim, L.dim);
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, keys, L.value_dim, n, 1.0f, p.data(), keys, dob,
                L.value_dim, 1.0f, dv + kv0 * L.value_dim, L.value_dim);
  }
}

void backward(const Layout& L, const Rows& r, const float* q, const float* k, const float* v,
              const float* out, const float* lse, const float* d_out, float* dq, float* dk,
              float* dv) {
  // Each kv head's query blocks are cut into two lanes of about equal cost; a lane runs on
  // one worker in block order, lane 0 adding into dk/dv, lane 1 into its own buffers, added
  // last. So the sums run in the same order whatever the number of threads: a resumed run
  // reproduces the gradients bit for bit.
  size_t kv_size = size_t(L.batch) * L.kv_heads * L.tokens;
  std::fill(dk, dk + kv_size * L.dim, 0.0f);
  std::fill(dv, dv + kv_size * L.value_dim, 0.0f);
  std::vector<float> dk1(kv_size * L.dim, 0.0f), dv1(kv_size * L.value_dim, 0.0f);
  std::vector<int> lane_of(r.blocks);
  int64_t load[2] = {0, 0};
  for (int blk : by_cost(r)) {
    int lane = load[1] < load[0];
    lane_of[blk] = lane;
    load[lane] += r.cost(blk);
  }
  std::vector<int> lanes(2 * L.batch * L.kv_heads);
  for (size_t i = 0; i < lanes.size(); ++i) lanes[i] = i;
  parallel(lanes, workers_for(L.threads, lanes.size()), [&](int lane, int) {
    int head = lane / 2, b = head / L.kv_heads, h = head % L.kv_heads, which = lane % 2;
    for (int blk = 0; blk < r.blocks; ++blk) {
      if (lane_of[blk] != which) continue;
      block_backward(L, r, b, h, blk, q, k, v, out, lse, d_out, dq, which ? dk1.data() : dk,
                     which ? dv1.data() : dv);
    }
  });
  for (size_t i = 0; i < dk1.size(); ++i) dk[i] += dk1[i];
  for (size_t i = 0; i < dv1.size(); ++i) dv[i] += dv1[i];
}

// The gated MLP: out = silu(gate) * up, sigmoid through 2^(-|x| log2 e) (never overflows).
inline float sigmoid(float x) {
  float t = exp2_neg(-std::fabs(x) * kLog2e);
  float r = 1.0f / (1.0f + t);
  return x >= 0.0f ? r : t * r;
}

// fn(begin, end) over [0, n) in up to `threads` contiguous parts of at least `grain`.
template <class F>
void parallel_range(size_t n, int threads, size_t grain, F&& fn) {
  threads = std::max<int>(1, std::min<size_t>(threads, n / std::max<size_t>(grain, 1) + 1));
  size_t part = (n + threads - 1) / threads;
  on_threads(threads, [&](int w) { fn(std::min(n, w * part), std::min(n, (w + 1) * part)); });
}

constexpr size_t kElementGrain = 4096;

void swiglu_forward(size_t n, int threads, const float* gate, const float* up, float* out) {
  parallel_range(n, threads, kElementGrain, [&](size_t lo, size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
  });
}

void swiglu_backward(size_t n, int threads, const float* gate, const float* up, const float* grad,
                     float* d_gate, float* d_up) {
  parallel_range(n, threads, kElementGrain, [&](size_t lo, size_t hi) {
#pragma omp simd
    for (size_t i = lo; i < hi; ++i) {
      float s = sigmoid(gate[i]), silu = gate[i] * s;
      d_up[i] = grad[i] * silu;
      d_gate[i] = grad[i] * up[i] * (s + silu * (1.0f - s));
    }
  });
}

// Token log-probs of `rows` rows of `vocab` logits: logits[target] - logsumexp(logits).
void logps_forward(int rows, int vocab, int threads, const float* logits, const int32_t* target,
                   float* logp, float* lse) {
  parallel_range(rows, threads, kElementGrain / vocab + 1, [&](size_t lo, size_t hi) {
    for (size_t r = lo; r < hi; ++r) {
      const float* x = logits + r * vocab;
      float top = -INFINITY, total = 0.0f;
#pragma omp simd reduction(max : top)
      for (int c = 0; c < vocab; ++c) top = std::max(top, x[c]);
#pragma omp simd reduction(+ : total)
      for (int c = 0; c < vocab; ++c) total += exp2_neg((x[c] - top) * kLog2e);
      lse[r] = top + std::log(total);
      int t = target[r];  // a token the vocabulary does not have: NaN (the step is skipped)
      logp[r] = (t >= 0 && t < vocab) ? x[t] - lse[r] : NAN;
    }
  });
}

// d logits = grad * (onehot(target) - softmax(logits)).
void logps_backward(int rows, int vocab, int threads, const float* logits, const int32_t* target,
                    const float* lse, const float* grad, float* d_logits) {
  parallel_range(rows, threads, kElementGrain / vocab + 1, [&](size_t lo, size_t hi) {
    for (size_t r = lo; r < hi; ++r) {
      const float *x = logits + r * vocab;
      float* d = d_logits + r * vocab;
      float shift = lse[r], g = grad[r];
#pragma omp simd
      for (int c = 0; c < vocab; ++c) d[c] = -g * exp2_neg((x[c] - shift) * kLog2e);
      if (target[r] >= 0 && target[r] < vocab) d[target[r]] += g;
    }
  });
}

// One MLX primitive for every kernel: `run` computes the outputs from the inputs (all
// evaluated, row-major contiguous) on the CPU stream.
using Run = std::function<void(const std::vector<mx::array>&, std::vector<mx::array>&)>;

class Kernel : public mx::Primitive {
 public:
  Kernel(mx::Stream stream, const char* name, Run run)
      : mx::Primitive(stream), name_(name), run_(std::move(run)) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    for (auto& o : outs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) encoder.set_input_array(a);
    for (auto& o : outs) encoder.set_output_array(o);
    std::vector<mx::array> inputs, outputs;
    for (auto& a : in) inputs.push_back(mx::array::unsafe_weak_copy(a));
    for (auto& o : outs) outputs.push_back(mx::array::unsafe_weak_copy(o));
    encoder.dispatch([run = run_, inputs = std::move(inputs), outputs = std::move(outputs)]() mutable {
      run(inputs, outputs);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx-pref's native kernels run on the CPU only");
  }

  const char* name() const override { return name_; }

 private:
  const char* name_;
  Run run_;
};

mx::array f32(const mx::array& a) { return mx::contiguous(mx::astype(a, mx::float32)); }
mx::array i32(const mx::array& a) { return mx::contiguous(mx::astype(a, mx::int32)); }

std::vector<mx::array> launch(const char* name, std::vector<mx::Shape> shapes,
                              std::vector<mx::array> inputs, Run run) {
  std::vector<mx::Dtype> types(shapes.size(), mx::float32);
  auto stream = mx::default_stream(mx::Device::cpu);
  return mx::array::make_arrays(std::move(shapes), types,
                                std::make_shared<Kernel>(stream, name, std::move(run)),
                                std::move(inputs));
}

const float* F(const mx::array& a) { return a.data<float>(); }
float* F(mx::array& a) { return a.data<float>(); }
const int32_t* I(const mx::array& a) { return a.data<int32_t>(); }

Rows rows_of(const std::vector<mx::array>& in, size_t at) {
  return {I(in[at]), I(in[at + 1]), I(in[at + 2]), I(in[at + 3]), int(in[at + 3].shape(0))};
}

Layout layout_of(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                 int window, int threads) {
  bool ok = q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && q.shape(1) % k.shape(1) == 0 &&
            k.shape() == mx::Shape({q.shape(0), k.shape(1), q.shape(2), q.shape(3)}) &&
            v.shape(0) == q.shape(0) && v.shape(1) == k.shape(1) && v.shape(2) == q.shape(2);
  if (!ok) throw std::invalid_argument("block attention: q (B, Hq, T, D), k/v (B, Hkv, T, D)");
  return {int(q.shape(0)), int(q.shape(1)), int(k.shape(1)), int(q.shape(2)), int(q.shape(3)),
          int(v.shape(3)), window, threads, scale};
}

void check_rows(const Layout& L, const mx::array& segment, const mx::array& parent,
                const mx::array& position, const mx::array& ranges) {
  for (auto* a : {&segment, &parent, &position})
    if (a->ndim() != 1 || a->shape(0) != L.tokens)
      throw std::invalid_argument("block attention: segment, parent, position: (T,) each");
  if (ranges.ndim() != 2 || ranges.shape(1) != 3)
    throw std::invalid_argument("block attention: ranges (blocks, 3)");
}

std::vector<mx::array> attention_forward(const mx::array& q, const mx::array& k,
                                         const mx::array& v, const mx::array& segment,
                                         const mx::array& parent, const mx::array& position,
                                         const mx::array& ranges, float scale, int window,
                                         int threads) {
  Layout L = layout_of(q, k, v, scale, window, threads);
  check_rows(L, segment, parent, position, ranges);
  return launch(
      "BlockAttention",
      {{L.batch, L.heads, L.tokens, L.value_dim}, {L.batch, L.heads, L.tokens, 1}},
      {f32(q), f32(k), f32(v), i32(segment), i32(parent), i32(position), i32(ranges)},
      [L](const std::vector<mx::array>& in, std::vector<mx::array>& out) {
        forward(L, rows_of(in, 3), F(in[0]), F(in[1]), F(in[2]), F(out[0]), F(out[1]));
      });
}

std::vector<mx::array> attention_backward(const mx::array& q, const mx::array& k,
                                          const mx::array& v, const mx::array& out,
                                          const mx::array& lse, const mx::array& d_out,
                                          const mx::array& segment, const mx::array& parent,
                                          const mx::array& position, const mx::array& ranges,
                                          float scale, int window, int threads) {
  Layout L = layout_of(q, k, v, scale, window, threads);
  check_rows(L, segment, parent, position, ranges);
  return launch(
      "BlockAttentionGrad", {q.shape(), k.shape(), v.shape()},
      {f32(q), f32(k), f32(v), f32(out), f32(lse), f32(d_out), i32(segment), i32(parent),
       i32(position), i32(ranges)},
      [L](const std::vector<mx::array>& in, std::vector<mx::array>& o) {
        backward(L, rows_of(in, 6), F(in[0]), F(in[1]), F(in[2]), F(in[3]), F(in[4]), F(in[5]),
                 F(o[0]), F(o[1]), F(o[2]));
      });
}

std::vector<mx::array> swiglu(const mx::array& gate, const mx::array& up, int threads) {
  if (gate.shape() != up.shape()) throw std::invalid_argument("swiglu: gate and up differ");
  return launch("SwiGLU", {gate.shape()}, {f32(gate), f32(up)},
                [threads](const std::vector<mx::array>& in, std::vector<mx::array>& out) {
                  swiglu_forward(in[0].size(), threads, F(in[0]), F(in[1]), F(out[0]));
                });
}

std::vector<mx::array> swiglu_grad(const mx::array& gate, const mx::array& up,
                                   const mx::array& grad, int threads) {
  if (gate.shape() != up.shape() || gate.shape() != grad.shape())
    throw std::invalid_argument("swiglu_grad: gate, up and grad differ");
  return launch("SwiGLUGrad", {gate.shape(), up.shape()}, {f32(gate), f32(up), f32(grad)},
                [threads](const std::vector<mx::array>& in, std::vector<mx::array>& out) {
                  swiglu_backward(in[0].size(), threads, F(in[0]), F(in[1]), F(in[2]),
                                  F(out[0]), F(out[1]));
                });
}

std::vector<mx::array> token_logps(const mx::array& logits, const mx::array& targets,
                                   int threads) {
  if (logits.ndim() != 2 || targets.ndim() != 1 || targets.shape(0) != logits.shape(0))
    throw std::invalid_argument("token_logps: logits (rows, vocab), targets (rows,)");
  int rows = logits.shape(0), vocab = logits.shape(1);
  return launch("TokenLogps", {{rows}, {rows}}, {f32(logits), i32(targets)},
                [=](const std::vector<mx::array>& in, std::vector<mx::array>& out) {
                  logps_forward(rows, vocab, threads, F(in[0]), I(in[1]), F(out[0]),
                                F(out[1]));
                });
}

std::vector<mx::array> token_logps_grad(const mx::array& logits, const mx::array& targets,
                                        const mx::array& lse, const mx::array& grad,
                                        int threads) {
  int rows = logits.shape(0), vocab = logits.shape(1);
  return launch("TokenLogpsGrad", {logits.shape()}, {f32(logits), i32(targets), f32(lse), f32(grad)},
                [=](const std::vector<mx::array>& in, std::vector<mx::array>& out) {
                  logps_backward(rows, vocab, threads, F(in[0]), I(in[1]), F(in[2]), F(in[3]),
                                 F(out[0]));
                });
}

}  // namespace

NB_MODULE(_native, m) {
  m.def("attention_forward", &attention_forward);
  m.def("attention_backward", &attention_backward);
  m.def("swiglu", &swiglu);
  m.def("swiglu_grad", &swiglu_grad);
  m.def("token_logps", &token_logps);
  m.def("token_logps_grad", &token_logps_grad);
}
