// Fused CPU kernels for the ELS engine (edtool/els/kernel.py builds and loads this file).
//
// score_chunk: for queries q (G, R, E) and one chunk of candidate keys (G, E, M), the logits
// q[r] . keys[:, m] (E = D + 3 rows [1; P; |P|^2; log count], q[r, 0] unused: the shift takes its
// place), clamped at `floor`, exponentiated and summed against the value rows `vrows` of the keys
// without ever leaving registers; sums are flushed to float64 per block of candidates. The shift
// logic is the engine's (edtool.machines.posterior_moments): a task starts at the exact max of
// its first block, rows whose block sum would overflow are lifted to the block's max, and the
// shift grows by log(sum) whenever the running sum exceeds 1. The chunk's result is merged into
// the running state (shift (G, R) float32, sums (G, R, V) float64) passed in.
//
// logits_exp: exp(max(q . keys, floor)) (G, R, M) in float32, q's column 0 multiplying the keys'
// row of ones (the engine's shift), for the Jacobian's wide weighted sums done by BLAS.
//
// Plain C ABI (no torch headers: it builds in about a second), called through ctypes, which
// releases the GIL; the work is spread over `threads` std::threads taking tasks from a counter.
// Vectors are GCC vector extensions (16 floats: one AVX-512 register, two AVX2 ones, four SSE);
// exp is a Cephes-style polynomial (relative error ~2e-7) valid on [floor, 88].

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int VL = 16;  // floats per vector
constexpr int RB = 6;   // query rows per register tile
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int vi __attribute__((vector_size(VL * 4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vf splat(float s) { return vf{} + s; }

// exp(x) for x in [floor, 88] (callers clamp): 2^n * p(r), n = round(x / ln 2), |r| <= ln 2 / 2.
inline vf vexp(vf x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  vf t = x * 1.44269504088896341f + magic;
  vf n = t - magic;
  vi ni = (vi)t - (vi)splat(magic);
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * (r * r) + r + 1.0f;
  vi scale = (ni + 127) << 23;
  return y * (vf)scale;
}

inline vf clamp(vf x, float lo, float hi) {
  x = x > lo ? x : splat(lo);
  return x < hi ? x : splat(hi);
}

// Logits of RB rows against VL candidates (keys column pointer kp, row stride ks), minus shift.
inline void logits(const float* q, int E, const float* kp, int64_t ks, const float* shift, vf* l) {
  for (int r = 0; r < RB; ++r) l[r] = splat(-shift[r]);
  for (int e = 1; e < E; ++e) {
    vf kv = load(kp + e * ks);
    for (int r = 0; r < RB; ++r) l[r] += q[r * E + e] * kv;
  }
}

// Sums of exp(clamp(logit - shift)) * value over candidates [m0, m1) for RB rows, in float64.
template <int V>
void tile_sums(const float* q, int E, const float* keys, int64_t ks, const int64_t* vrows, int64_t m0, int64_t m1,
               const float* shift, float floor, double* out) {
  vf acc[RB][V];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vf{};
  float tail[256 * VL];  // the last partial vector, zero-padded (E <= 256 is checked by the caller)
  for (int64_t m = m0; m < m1; m += VL) {
    const float* kp = keys + m;
    int64_t stride = ks;
    bool partial = m + VL > m1;
    if (partial) {
      std::memset(tail, 0, sizeof(float) * E * VL);
      for (int e = 0; e < E; ++e)
        for (int j = 0; j < m1 - m; ++j) tail[e * VL + j] = keys[e * ks + m + j];
      kp = tail;
      stride = VL;
    }
    vf l[RB];
    logits(q, E, kp, stride, shift, l);
    vf vals[V];
    for (int v = 1; v < V; ++v) vals[v] = load(kp + vrows[v] * stride);
    vf live = splat(1.0f);
    if (partial)
      for (int j = m1 - m; j < VL; ++j) live[j] = 0.0f;
    for (int r = 0; r < RB; ++r) {
      vf w = vexp(clamp(l[r], floor, 88.0f));
      if (partial) w *= live;
      acc[r][0] += w;
      for (int v = 1; v < V; ++v) acc[r][v] += w * vals[v];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < V; ++v) {
      double s = 0;
      for (int j = 0; j < VL; ++j) s += acc[r][v][j];
      out[r * V + v] = s;
    }
}

// The largest logit (no shift) of RB rows over candidates [m0, m1).
void tile_max(const float* q, int E, const float* keys, int64_t ks, int64_t m0, int64_t m1, float* out) {
  const float zero[RB] = {};
  vf top[RB];
  for (int r = 0; r < RB; ++r) top[r] = splat(-INFINITY);
  float tail[256 * VL];
  for (int64_t m = m0; m < m1; m += VL) {
    const float* kp = keys + m;
    int64_t stride = ks;
    if (m + VL > m1) {  // pad the last partial vector with copies of its first candidate
      for (int e = 0; e < E; ++e)
        for (int j = 0; j < VL; ++j) tail[e * VL + j] = keys[e * ks + m + std::min<int64_t>(j, m1 - m - 1)];
      kp = tail;
      stride = VL;
    }
    vf l[RB];
    logits(q, E, kp, stride, zero, l);
    for (int r = 0; r < RB; ++r) top[r] = top[r] > l[r] ? top[r] : l[r];
  }
  for (int r = 0; r < RB; ++r) {
    out[r] = -INFINITY;
    for (int j = 0; j < VL; ++j) out[r] = std::max(out[r], top[r][j]);
  }
}

// One task: RB-row tiles x candidates [m0, m1) of one group; state shift (Rp,), sums (Rp, V).
template <int V>
void run_task(const float* q, int Rp, int E, const float* keys, int64_t ks, const int64_t* vrows, int64_t m0,
              int64_t m1, int64_t block, float floor, float* shift, double* sums) {
  for (int r0 = 0; r0 < Rp; r0 += RB) tile_max(q + r0 * E, E, keys, ks, m0, std::min(m0 + block, m1), shift + r0);
  double part[RB * V];
  float lifted[RB], top[RB];
  for (int64_t b0 = m0; b0 < m1; b0 += block) {
    int64_t b1 = std::min(b0 + block, m1);
    for (int r0 = 0; r0 < Rp; r0 += RB) {
      const float* qt = q + r0 * E;
      float* sh = shift + r0;
      double* st = sums + r0 * V;
      tile_sums<V>(qt, E, keys, ks, vrows, b0, b1, sh, floor, part);
      bool over = false;
      for (int r = 0; r < RB; ++r) over |= !(part[r * V] < 1e30);
      if (over) {  // a candidate far better than any before: lift those rows to this block's max
        tile_max(qt, E, keys, ks, b0, b1, top);
        for (int r = 0; r < RB; ++r) {
          lifted[r] = part[r * V] < 1e30 ? sh[r] : std::max(top[r], sh[r]);
          double lift = (double)lifted[r] - sh[r];  // exactly the change of the float shift
          for (int v = 0; v < V; ++v) st[r * V + v] *= std::exp(-lift);
        }
        std::memcpy(sh, lifted, sizeof lifted);
        tile_sums<V>(qt, E, keys, ks, vrows, b0, b1, sh, floor, part);
      }
      for (int r = 0; r < RB; ++r) {
        for (int v = 0; v < V; ++v) st[r * V + v] += part[r * V + v];
        if (st[r * V] > 1) {  // keep the shift >= every log weight seen
          float grown = sh[r] + (float)std::log(st[r * V]);
          double scale = std::exp(-((double)grown - sh[r]));  // exactly the change of the float shift
          for (int v = 0; v < V; ++v) st[r * V + v] *= scale;
          sh[r] = grown;
        }
      }
    }
  }
}

// Run body(task) for task in [0, n) on `threads` threads, each taking the next task in turn.
template <class F>
void parallel(int64_t n, int threads, F body) {
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t t; (t = next.fetch_add(1)) < n;) body(t);
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < std::min<int64_t>(threads, n); ++i) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

}  // namespace

// q (G, Rp, E) float32 contiguous, Rp a multiple of RB; keys (G, E, M) float32 with unit stride
// along M; vrows (V,) int64, vrows[0] = 0 (the ones row); shift (G, Rp) float32 and sums
// (G, Rp, V) float64, the running state, updated in place (start: -inf and 0).
extern "C" void score_chunk(const float* qp, int G, int Rp, int E, const float* kp, int64_t kg, int64_t ks, int64_t M,
                            const int64_t* vr, int V, float* S, double* T, float floor, int64_t block, int threads) {
  const int64_t blocks = (M + block - 1) / block;
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(blocks, (4 * threads + G - 1) / G));
  const int64_t per = (blocks + slices - 1) / slices * block;  // candidates per slice
  std::vector<float> tshift(G * slices * Rp);
  std::vector<double> tsums(G * slices * Rp * V, 0.0);
  parallel(G * slices, threads, [&](int64_t task) {
    const int64_t g = task / slices, s = task % slices;
    const int64_t m0 = s * per, m1 = std::min(M, m0 + per);
    float* sh = tshift.data() + task * Rp;
    double* st = tsums.data() + task * Rp * V;
    if (m0 >= m1) {
      std::fill(sh, sh + Rp, -INFINITY);
      return;
    }
    const float* qg = qp + g * Rp * E;
    const float* kgp = kp + g * kg;
    switch (V) {
      case 2: run_task<2>(qg, Rp, E, kgp, ks, vr, m0, m1, block, (float)floor, sh, st); break;
      case 3: run_task<3>(qg, Rp, E, kgp, ks, vr, m0, m1, block, (float)floor, sh, st); break;
      default: run_task<4>(qg, Rp, E, kgp, ks, vr, m0, m1, block, (float)floor, sh, st); break;
    }
  });
  // merge the slices into the running state: each part scaled to the largest shift of its row
  for (int64_t g = 0; g < G; ++g)
    for (int r = 0; r < Rp; ++r) {
      float top = S[g * Rp + r];
      for (int64_t s = 0; s < slices; ++s) top = std::max(top, tshift[(g * slices + s) * Rp + r]);
      double* out = T + (g * Rp + r) * V;
      double keep = std::isinf(S[g * Rp + r]) ? 0.0 : std::exp((double)S[g * Rp + r] - top);
      for (int v = 0; v < V; ++v) out[v] *= keep;
      for (int64_t s = 0; s < slices; ++s) {
        float sh = tshift[(g * slices + s) * Rp + r];
        if (std::isinf(sh)) continue;
        double f = std::exp((double)sh - top);
        const double* part = tsums.data() + ((g * slices + s) * Rp + r) * V;
        for (int v = 0; v < V; ++v) out[v] += f * part[v];
      }
      S[g * Rp + r] = top;
    }
}

// exp(max(q . keys, floor)) into out (G, Rp, M) float32; q (G, Rp, E) contiguous with Rp a
// multiple of RB, keys (G, E, M) with unit stride along M.
extern "C" void logits_exp(const float* qp, int G, int Rp, int E, const float* kp, int64_t kg, int64_t ks, int64_t M,
                           float* op, float floor, int threads) {
  const int64_t block = std::max<int64_t>(VL, 8192 / E / VL * VL);  // a block of keys stays in L1
  const int64_t blocks = (M + block - 1) / block;
  parallel(G * blocks, threads, [&](int64_t task) {
    const int64_t g = task / blocks, m0 = task % blocks * block, m1 = std::min(M, m0 + block);
    const float* kgp = kp + g * kg;
    float tail[256 * VL];
    for (int r0 = 0; r0 < Rp; r0 += RB) {
      // column 0 of q is the engine's -shift times the keys' row of ones
      float negshift[RB];
      for (int r = 0; r < RB; ++r) negshift[r] = -qp[(g * Rp + r0 + r) * E];
      const float* qt = qp + (g * Rp + r0) * E;
      for (int64_t m = m0; m < m1; m += VL) {
        const float* c = kgp + m;
        int64_t stride = ks;
        int n = std::min<int64_t>(VL, m1 - m);
        if (n < VL) {
          std::memset(tail, 0, sizeof(float) * E * VL);
          for (int e = 0; e < E; ++e)
            for (int j = 0; j < n; ++j) tail[e * VL + j] = kgp[e * ks + m + j];
          c = tail;
          stride = VL;
        }
        vf l[RB];
        logits(qt, E, c, stride, negshift, l);
        for (int r = 0; r < RB; ++r) {
          vf w = vexp(clamp(l[r], floor, 88.0f));
          float* dst = op + (g * Rp + r0 + r) * M + m;
          if (n == VL)
            std::memcpy(dst, &w, sizeof w);
          else
            for (int j = 0; j < n; ++j) dst[j] = w[j];
        }
      }
    }
  });
}

