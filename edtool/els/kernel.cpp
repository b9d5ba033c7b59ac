// Fused CPU kernels for the ELS engine (edtool/els/kernel.py builds and loads this file).
//
// score_chunk: for queries q (G, R, E) and one chunk of candidate keys (G, E, M), the logits
// q[r] . keys[:, m] (E = D + 3 rows [1; P; |P|^2; log count], q[r, 0] unused: the shift takes its
// place), clamped at `floor`, exponentiated and summed against the value rows `vrows` of the keys
// without ever leaving registers; sums are flushed to float64 per block of candidates. The shift
// logic is the engine's (edtool.els.engine.posterior_moments): a task starts at the exact max of
// its first block, rows whose block sum would overflow are lifted to the block's max, and the
// shift grows by log(sum) whenever the running sum exceeds 1. The chunk's result is merged into
// the running state (shift (G, R) float32, sums (G, R, V) float64) passed in.
//
// moments_chunk: the same for the Jacobian's moments, sums of w c_v P_j over the outer product of the
// value rows [1, c] and the key rows [1, P], in one pass (the band needs nothing else).
//
// Plain C ABI (no torch headers: it builds in about a second), called through ctypes, which
// releases the GIL; the work is spread over `threads` std::threads taking tasks from a counter.
// Vectors are GCC vector extensions of VL floats (below: the width of the CPU's registers);
// exp is a Cephes-style polynomial (relative error ~2e-7) valid on [floor, 88].

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace {

// The register tiles below must fit the CPU's vector registers, or they spill to memory (measured on
// an AVX2 CPU with 16-float vectors, two registers each: 5-7x slower). VL: floats per vector; KT: key
// rows per tile of the Jacobian's dot products (RB x KT accumulators, plus KT + 1 loads).
#ifdef __AVX512F__
constexpr int VL = 16, KT = 4;  // one of 32 AVX-512 registers per vector
#else
constexpr int VL = 8, KT = 2;  // one of 16 AVX2 registers (two SSE or NEON ones)
#endif
constexpr int RB = 6;  // query rows per register tile
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int vi __attribute__((vector_size(VL * 4)));

template <class F = vf>
inline F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Keep v in a register: GCC would otherwise fold its load into each multiply-add that uses it (a memory
// operand apiece), and the Jacobian's dot tile would be bound by loads (measured on AVX2: 1.13-1.33x).
inline void in_register(vf& v) {
#if defined(__AVX__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// s - 0 = s for every s (0 + s is not: -0), so it folds to a broadcast
template <class F = vf>
inline F splat(float s) { return s - F{}; }

// exp(x) for x in [floor, 88] (callers clamp): 2^n * p(r), n = round(x / ln 2), |r| <= ln 2 / 2.
template <class F>
inline F vexp(F x) {
  typedef int I __attribute__((vector_size(sizeof(F))));
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  F t = x * 1.44269504088896341f + magic;
  F n = t - magic;
  I ni = (I)t - (I)splat<F>(magic);
  F r = x - n * 0.693359375f + n * 2.12194440e-4f;
  F p = splat<F>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  F y = p * (r * r) + r + 1.0f;
  I scale = (ni + 127) << 23;
  return y * (F)scale;
}

template <class F>
inline F clamp(F x, float lo, float hi) {
  x = x > lo ? x : splat<F>(lo);
  return x < hi ? x : splat<F>(hi);
}

// Logits of RB rows against VL candidates (keys column pointer kp, row stride ks), minus shift.
inline void logits(const float* q, int E, const float* kp, int64_t ks, const float* shift, vf* l) {
  for (int r = 0; r < RB; ++r) l[r] = splat(-shift[r]);
  for (int e = 1; e < E; ++e) {
    vf kv = load(kp + e * ks);
    for (int r = 0; r < RB; ++r) l[r] += q[r * E + e] * kv;
  }
}

// The same for 2 VL candidates: each broadcast query entry meets two key vectors, so a register tile of
// RB x 2 vectors does 2 FMAs per load (the one-vector tile is bound by its loads at large E).
inline void logits2(const float* q, int E, const float* kp, int64_t ks, const float* shift, vf* l0, vf* l1) {
  for (int r = 0; r < RB; ++r) l0[r] = l1[r] = splat(-shift[r]);
  for (int e = 1; e < E; ++e) {
    vf k0 = load(kp + e * ks), k1 = load(kp + e * ks + VL);
    for (int r = 0; r < RB; ++r) {
      vf qe = splat(q[r * E + e]);
      l0[r] += qe * k0;
      l1[r] += qe * k1;
    }
  }
}

// Sums of exp(clamp(logit - shift)) * value over candidates [m0, m1) for RB rows, in float64.
template <int V>
void tile_sums(const float* q, int E, const float* keys, int64_t ks, const int64_t* vrows, int64_t m0, int64_t m1,
               const float* shift, float floor, double* out) {
  vf acc[RB][V];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vf{};
  int64_t m = m0;
  for (; m + 2 * VL <= m1; m += 2 * VL) {  // pairs of whole vectors
    vf l0[RB], l1[RB], v0[V], v1[V];
    logits2(q, E, keys + m, ks, shift, l0, l1);
    for (int v = 1; v < V; ++v) v0[v] = load(keys + vrows[v] * ks + m), v1[v] = load(keys + vrows[v] * ks + m + VL);
    for (int r = 0; r < RB; ++r) {
      vf w0 = vexp(clamp(l0[r], floor, 88.0f)), w1 = vexp(clamp(l1[r], floor, 88.0f));
      acc[r][0] += w0 + w1;
      for (int v = 1; v < V; ++v) acc[r][v] += w0 * v0[v] + w1 * v1[v];
    }
  }
  float tail[256 * VL];  // the last partial vector, zero-padded (E <= 256 is checked by the caller)
  for (; m < m1; m += VL) {
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
  int64_t m = m0;
  for (; m + 2 * VL <= m1; m += 2 * VL) {
    vf l0[RB], l1[RB];
    logits2(q, E, keys + m, ks, zero, l0, l1);
    for (int r = 0; r < RB; ++r) top[r] = top[r] > l0[r] ? top[r] : l0[r], top[r] = top[r] > l1[r] ? top[r] : l1[r];
  }
  float tail[256 * VL];
  for (; m < m1; m += VL) {
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

// Weighted moments of RB rows over candidates [m0, m1) for the Jacobian: part[r][v][j] =
// sum_m w_rm c_vm key_jm (j < J = D + 1, c_0 = 1, c_v = keys[vrows[v]]), w = exp(clamp(logit - shift)).
// Sub-block by sub-block (SUB candidates, so their weights and keys stay in L1): the weights (C1 x RB
// rows: w and w c_v) go into wbuf, then meet the key rows in register tiles of RB rows x KT key rows,
// dot products along the candidates in vector accumulators kept in acc between sub-blocks; their lanes
// are summed in float64 once per block.
constexpr int SUB = 256;

template <int NJ>
void tile_dot(const float* w, const float* k, int64_t ks, int64_t nv, vf* acc) {
  vf a[RB][NJ];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NJ; ++j) a[r][j] = acc[r * KT + j];
  for (int64_t m = 0; m < nv * VL; m += VL) {
    vf kv[NJ];
    for (int j = 0; j < NJ; ++j) kv[j] = load(k + j * ks + m);
    for (int r = 0; r < RB; ++r) {
      vf wv = load(w + r * SUB + m);
      in_register(wv);
      for (int j = 0; j < NJ; ++j) a[r][j] += wv * kv[j];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NJ; ++j) acc[r * KT + j] = a[r][j];
}

void tile_moments(const float* q, int E, const float* keys, int64_t ks, const int64_t* vrows, int C1, int J,
                  int64_t m0, int64_t m1, const float* shift, float floor, float* wbuf, vf* acc, double* part) {
  const int JT = (J + KT - 1) / KT;
  std::fill(acc, acc + C1 * JT * RB * KT, vf{});
  float tail[256 * VL];  // the last partial vector of keys, zero-padded
  for (int64_t s0 = m0; s0 < m1; s0 += SUB) {
    const int64_t s1 = std::min(m1, s0 + SUB), nv = (s1 - s0 + VL - 1) / VL;
    bool partial = false;
    int64_t m = s0;
    for (; m + 2 * VL <= s1; m += 2 * VL) {  // pairs of whole vectors
      vf l0[RB], l1[RB];
      logits2(q, E, keys + m, ks, shift, l0, l1);
      for (int r = 0; r < RB; ++r) {
        vf w0 = vexp(clamp(l0[r], floor, 88.0f)), w1 = vexp(clamp(l1[r], floor, 88.0f));
        std::memcpy(wbuf + r * SUB + (m - s0), &w0, sizeof w0);
        std::memcpy(wbuf + r * SUB + (m - s0) + VL, &w1, sizeof w1);
        for (int v = 1; v < C1; ++v) {
          vf wc0 = w0 * load(keys + vrows[v] * ks + m), wc1 = w1 * load(keys + vrows[v] * ks + m + VL);
          std::memcpy(wbuf + (v * RB + r) * SUB + (m - s0), &wc0, sizeof wc0);
          std::memcpy(wbuf + (v * RB + r) * SUB + (m - s0) + VL, &wc1, sizeof wc1);
        }
      }
    }
    for (; m < s1; m += VL) {
      const float* kp = keys + m;
      int64_t stride = ks;
      vf live = splat(1.0f);
      if (m + VL > s1) {
        std::memset(tail, 0, sizeof(float) * E * VL);
        for (int e = 0; e < E; ++e)
          for (int j = 0; j < s1 - m; ++j) tail[e * VL + j] = keys[e * ks + m + j];
        for (int j = s1 - m; j < VL; ++j) live[j] = 0.0f;
        kp = tail;
        stride = VL;
        partial = true;
      }
      vf l[RB];
      logits(q, E, kp, stride, shift, l);
      for (int r = 0; r < RB; ++r) {
        vf w = vexp(clamp(l[r], floor, 88.0f)) * live;
        std::memcpy(wbuf + r * SUB + (m - s0), &w, sizeof w);
        for (int v = 1; v < C1; ++v) {
          vf wc = w * load(kp + vrows[v] * stride);
          std::memcpy(wbuf + (v * RB + r) * SUB + (m - s0), &wc, sizeof wc);
        }
      }
    }
    const int64_t full = partial ? nv - 1 : nv;
    for (int v = 0; v < C1; ++v)
      for (int t = 0; t < JT; ++t) {
        const float* w = wbuf + v * RB * SUB;
        vf* a = acc + (v * JT + t) * RB * KT;
        const int nj = std::min(KT, J - KT * t);
        const float* k = keys + KT * t * ks + s0;
        for (int pass = 0; pass < (partial ? 2 : 1); ++pass) {  // whole vectors from keys, then the tail
          const float* kk = pass ? tail + KT * t * VL : k;
          const float* ww = pass ? w + full * VL : w;
          const int64_t n = pass ? 1 : full, st = pass ? VL : ks;
          switch (nj) {
            case 4: tile_dot<4>(ww, kk, st, n, a); break;
            case 3: tile_dot<3>(ww, kk, st, n, a); break;
            case 2: tile_dot<2>(ww, kk, st, n, a); break;
            default: tile_dot<1>(ww, kk, st, n, a); break;
          }
        }
      }
  }
  const int64_t V = (int64_t)C1 * J;
  for (int v = 0; v < C1; ++v)
    for (int j = 0; j < J; ++j)
      for (int r = 0; r < RB; ++r) {
        const vf& a = acc[((v * JT + j / KT) * RB + r) * KT + j % KT];
        double s = 0;
        for (int l = 0; l < VL; ++l) s += a[l];
        part[r * V + v * J + j] = s;
      }
}

// One task: RB-row tiles x candidates [m0, m1) of one group; state shift (Rp,), sums (Rp, V);
// tile(q rows, b0, b1, shift, part (RB, V)) gives one block's weighted sums, column 0 the sum of w.
template <class Tile>
void run_task(const float* q, int Rp, int E, const float* keys, int64_t ks, int64_t m0, int64_t m1, int64_t block,
              int V, float* shift, double* sums, Tile tile) {
  for (int r0 = 0; r0 < Rp; r0 += RB) tile_max(q + r0 * E, E, keys, ks, m0, std::min(m0 + block, m1), shift + r0);
  std::vector<double> partv(RB * V);
  double* part = partv.data();
  float lifted[RB], top[RB];
  for (int64_t b0 = m0; b0 < m1; b0 += block) {
    int64_t b1 = std::min(b0 + block, m1);
    for (int r0 = 0; r0 < Rp; r0 += RB) {
      const float* qt = q + r0 * E;
      float* sh = shift + r0;
      double* st = sums + r0 * V;
      tile(qt, b0, b1, sh, part);
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
        tile(qt, b0, b1, sh, part);
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


// One chunk of keys for every group: tasks are (group, slice of the candidates), each run by
// run_task with the tile that make_tile(group) returns; the slices' states are then merged into the
// running state (shift S (G, Rp) float32, sums T (G, Rp, V) float64).
template <class MakeTile>
void chunk(const float* qp, int G, int Rp, int E, const float* kp, int64_t kg, int64_t ks, int64_t M, int V, float* S,
           double* T, int64_t block, int threads, MakeTile make_tile) {
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
    run_task(qp + g * Rp * E, Rp, E, kp + g * kg, ks, m0, m1, block, V, sh, st, make_tile(kp + g * kg));
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

}  // namespace

// q (G, Rp, E) float32 contiguous, Rp a multiple of RB; keys (G, E, M) float32 with unit stride
// along M; vrows (V,) int64, vrows[0] = 0 (the ones row); shift (G, Rp) float32 and sums
// (G, Rp, V) float64, the running state, updated in place (start: -inf and 0).
extern "C" void score_chunk(const float* qp, int G, int Rp, int E, const float* kp, int64_t kg, int64_t ks, int64_t M,
                            const int64_t* vr, int V, float* S, double* T, float floor, int64_t block, int threads) {
  chunk(qp, G, Rp, E, kp, kg, ks, M, V, S, T, block, threads, [&](const float* keys) {
    return [=](const float* qt, int64_t b0, int64_t b1, const float* sh, double* part) {
      switch (V) {
        case 2: tile_sums<2>(qt, E, keys, ks, vr, b0, b1, sh, floor, part); break;
        case 3: tile_sums<3>(qt, E, keys, ks, vr, b0, b1, sh, floor, part); break;
        default: tile_sums<4>(qt, E, keys, ks, vr, b0, b1, sh, floor, part); break;
      }
    };
  });
}

// The Jacobian's moments: as score_chunk, with sums (G, Rp, C1 * J) holding for each row
// sum_m w_m keys[vrows[v]][m] keys[j][m], v < C1 (vrows[0] = 0: the ones row), j < J.
extern "C" void moments_chunk(const float* qp, int G, int Rp, int E, const float* kp, int64_t kg, int64_t ks, int64_t M,
                              const int64_t* vr, int C1, int J, float* S, double* T, float floor, int64_t block,
                              int threads) {
  chunk(qp, G, Rp, E, kp, kg, ks, M, C1 * J, S, T, block, threads, [&](const float* keys) {
    struct Buffers {  // one task's scratch: a sub-block's weights, the vector accumulators
      std::vector<float> w;
      std::vector<vf> acc;
    };
    auto buf = std::make_shared<Buffers>();
    buf->w.resize(C1 * RB * SUB);
    buf->acc.resize(C1 * ((J + KT - 1) / KT) * RB * KT);
    return [=](const float* qt, int64_t b0, int64_t b1, const float* sh, double* part) {
      tile_moments(qt, E, keys, ks, vr, C1, J, b0, b1, sh, floor, buf->w.data(), buf->acc.data(), part);
    };
  });
}

// ---- Building the candidate keys (the one-off cost of a machine's first call at each patch size) ----
//
// A window is number m = i * L + l: image i of train (N, F) at the offsets cell[l] (L, D). Windows are
// compared by the bit patterns of their D floats, as the torch path does.

namespace {

inline uint64_t window_hash(const float* image, const int64_t* offsets, int D) {
  uint64_t h[4] = {0x243F6A8885A308D3ull, 0x13198A2E03707344ull, 0xA4093822299F31D0ull, 0x082EFA98EC4E6C89ull};
  for (int d = 0; d < D; ++d) {  // four independent chains (entry d feeds chain d % 4): no long dependency
    uint32_t bits;
    std::memcpy(&bits, image + offsets[d], 4);
    h[d & 3] = (h[d & 3] ^ bits) * 0x9E3779B97F4A7C15ull;
  }
  uint64_t out = 0;
  for (int c = 0; c < 4; ++c) out = (out ^ (h[c] ^ (h[c] >> 29))) * 0xBF58476D1CE4E5B9ull;
  return out ^ (out >> 32);
}

inline bool same_window(const float* a, const int64_t* oa, const float* b, const int64_t* ob, int D) {
  for (int d = 0; d < D; ++d)
    if (std::memcmp(a + oa[d], b + ob[d], 4) != 0) return false;
  return true;
}

}  // namespace

// The distinct windows of one cell, in order of first occurrence: first[u] (the number of its first
// occurrence) and count[u]; returns U, or -1 as soon as there are more than `limit` (first and count
// hold room for min(M, limit + 1)). An open-addressing table keyed by a 64-bit hash (the low
// `hash_bits` bits of it: tests pass 0 to make every window collide) and compared entry by entry, so
// equal hashes never merge different windows.
extern "C" int64_t merge_windows(const float* train, int64_t N, int64_t F, const int64_t* cell, int64_t L, int D,
                                 int64_t limit, int hash_bits, int64_t* first, int64_t* count) {
  const int64_t M = N * L, room = std::min(M, limit + 1);
  int64_t size = 16;
  while (size < 2 * room) size *= 2;
  const uint64_t keep = hash_bits >= 64 ? ~0ull : (1ull << hash_bits) - 1;
  std::vector<uint32_t> tags(size);      // the hash's upper half, compared before the windows
  std::vector<uint32_t> slots(size, 0);  // u + 1 (the caller keeps U < 2^32 - 1), or 0: empty
  int64_t U = 0;
  for (int64_t i = 0; i < N; ++i) {
    const float* image = train + i * F;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t* off = cell + l * D;
      const uint64_t h = window_hash(image, off, D) & keep;
      int64_t s = (int64_t)((h * 0x9E3779B97F4A7C15ull) >> 20) & (size - 1);
      const uint32_t tag = (uint32_t)(h >> 32);
      for (;; s = (s + 1) & (size - 1)) {
        if (slots[s] == 0) {  // a new window
          if (U == limit) return -1;
          slots[s] = (uint32_t)(U + 1);
          tags[s] = tag;
          first[U] = i * L + l;
          count[U++] = 1;
          break;
        }
        const int64_t u = slots[s] - 1, f = first[u];
        if (tags[s] == tag && same_window(image, off, train + f / L * F, cell + f % L * D, D)) {
          ++count[u];
          break;
        }
      }
    }
  }
  return U;
}

// Keys [1; P; |P|^2] of windows idx[0..n) (all windows 0..n-1 when idx is null) into rows 0..D+1 of
// out (row stride os, one column per window); row D+2 (log count) is the caller's.
extern "C" void window_keys(const float* train, int64_t F, const int64_t* cell, int64_t L, int D, const int64_t* idx,
                            int64_t n, float* out, int64_t os, int threads) {
  const int64_t per = 4096;
  parallel((n + per - 1) / per, threads, [&](int64_t task) {
    for (int64_t j = task * per, end = std::min(n, j + per); j < end; ++j) {
      const int64_t m = idx ? idx[j] : j;
      const float* image = train + m / L * F;
      const int64_t* off = cell + m % L * D;
      out[j] = 1.0f;
      double sq = 0;
      for (int d = 0; d < D; ++d) {
        const float p = image[off[d]];
        out[(d + 1) * os + j] = p;
        sq += (double)p * p;
      }
      out[(D + 1) * os + j] = (float)sq;
    }
  });
}

// ---- The score with every patch inner product from box sums (a cost per candidate that does not grow with k) ----
//
// For query b, pixel p and candidate window (image n, centre q), the logit is
//   u = scale_b <X_p, Y_nq> + bias_b |Y_nq|^2   (scale = a / b^2, bias = -a^2 / (2 b^2); the |X_p|^2
// term is the same for every candidate of p and cancels). For a fixed offset d = q - p the inner products
// of all pixels p are k x k box sums of one product image z_d = X * shift_d(Y_n): a sliding sum down the
// columns (2 adds per entry) and a k-term sum along the rows (k adds per BL candidates). Nothing is merged:
// every (p, candidate) pair costs one exp, and the box sums a few operations, whatever k is.
//
// A cell is a pair of rectangles of window centres (pixels p, candidates q, both in image coordinates);
// X (C, Hp, Wp) and Y (N, C, Hp, Wp) are padded by k / 2 (zeros or a circular wrap, as the machine pads),
// so the window at centre c covers padded rows c .. c + k - 1, columns likewise.

namespace {

struct Rect {
  int y0, y1, x0, x1;  // [y0, y1) x [x0, x1)
};

// Vectors of 8 floats here whatever the CPU: lanes run along a row of candidates, a few dozen wide, and
// wider vectors would carry more dead lanes (on the AVX-512 CPUs measured, 8 floats per op at twice the
// ops per cycle cost the same per lane).
constexpr int BL = 8;
typedef float vb __attribute__((vector_size(BL * 4)));
typedef int vbi __attribute__((vector_size(BL * 4)));

// One task: query image X, one cell (pixels P, candidates Q), images [n0, n1) of Y. For a row offset dy and
// pixel row py, T[ux][v] = sum over the k window rows of X[ux] * Y[v] (ux: P's window columns, v: Q's,
// padded coordinates) slides down one row per py (2 multiply-adds per entry); the inner product of pixel
// (py, px) with candidate (py + dy, qx) is then the diagonal sum T[px + e][qx + e], e < k, taken for BL
// candidates at once. State per pixel of P: shift (the largest logit seen, or at most LIFT below it) and
// float64 sums of w, w c_0 .. w c_{C-1}; float32 sums (BL lanes per pixel) are flushed after every dy.
struct BoxTask {
  const float *X, *Y, *ynorm;
  int C, H, W, k, Hp, Wp;
  Rect P, Q;
  bool same_row;  // candidates only from the pixel's own row (dy = 0)
  float scale, bias, floor;
  std::vector<float> T, acc, top;
  std::vector<double> lanes;  // float64 sums per pixel, value and lane, flushed from acc
  float* shift;
  double* sums;  // (pixels of P, 1 + C)

  static constexpr float LIFT = 60.0f;  // float32 sums of a few hundred weights below e^60 cannot overflow

  int npx() const { return P.x1 - P.x0; }
  int nqx() const { return Q.x1 - Q.x0; }
  int ts() const { return (nqx() + k - 1 + 2 * BL - 1) / BL * BL; }  // T's row stride (room for the tail)

  // Slide T down one row: += the products of padded row uy of X and row uy + dy of Y_n, -= those of row out
  void slide_row(const float* Yn, int uy, int dy, int out) {
    const int64_t plane = (int64_t)Hp * Wp;
    const int nv = nqx() + k - 1, stride = ts();
    for (int c = 0; c < C; ++c) {
      const float *xr = X + c * plane + (int64_t)uy * Wp + P.x0, *yr = Yn + c * plane + (int64_t)(uy + dy) * Wp + Q.x0;
      const float *xo = X + c * plane + (int64_t)out * Wp + P.x0, *yo = Yn + c * plane + (int64_t)(out + dy) * Wp + Q.x0;
      for (int ux = 0; ux < npx() + k - 1; ++ux) {
        float* t = T.data() + (int64_t)ux * stride;
        for (int v = 0; v < nv; v += BL) {
          const vb s = load<vb>(t + v) + xr[ux] * load<vb>(yr + v) - xo[ux] * load<vb>(yo + v);
          std::memcpy(t + v, &s, sizeof s);
        }
      }
    }
  }

  // The weights of NP neighbouring pixels px .. px + NP - 1 of row py against the candidates of row py + dy
  // (yn: their |y|^2, centre: their centre pixels): (Max) the largest logit per pixel into top, or (Sum) the
  // sums into acc, and the largest logit minus shift into most. The pixels are interleaved: one pixel's chain
  // (diagonal sums, exp, sums) is too long for the out-of-order core to overlap with the next one's.
  template <bool Max, int NP>
  void weigh(int py, int px, const float* yn, const float* centre, vb& most) {
    const int stride = ts(), nq = nqx();
    const int64_t diag = stride + 1, plane = (int64_t)Hp * Wp;
    vbi lane;
    for (int j = 0; j < BL; ++j) lane[j] = j;
    int64_t st[NP];
    float sh[NP], tmax[NP];
    vb a[NP][4] = {};  // w, w c_0, .. (C <= 3: box_score is not called for more channels)
    for (int p = 0; p < NP; ++p) {
      st[p] = (int64_t)(py - P.y0) * npx() + px + p;
      sh[p] = shift[st[p]];
      tmax[p] = -INFINITY;
    }
    for (int j = 0; j < nq; j += BL) {
      const vb yb = bias * load<vb>(yn + j);
      const vbi live = lane < nq - j;
      for (int p = 0; p < NP; ++p) {
        const float* t = T.data() + (int64_t)(px + p) * stride + j;
        vb d0 = load<vb>(t), d1 = {}, d2 = {}, d3 = {};  // four chains: the adds' latency would bind
        int e = 1;
        for (; e + 3 < k; e += 4) {
          d1 += load<vb>(t + e * diag);
          d2 += load<vb>(t + (e + 1) * diag);
          d3 += load<vb>(t + (e + 2) * diag);
          d0 += load<vb>(t + (e + 3) * diag);
        }
        for (; e < k; ++e) d1 += load<vb>(t + e * diag);
        const vb u = scale * ((d0 + d1) + (d2 + d3)) + yb;
        if (Max) {
          const vb m = live ? u : splat<vb>(-INFINITY);
          for (int l = 0; l < BL; ++l) tmax[p] = std::max(tmax[p], m[l]);
          continue;
        }
        const vb l = live ? u - sh[p] : splat<vb>(-INFINITY);
        most = most > l ? most : l;
        vb w = vexp(clamp(l, floor, LIFT));
        w = live ? w : vb{};
        a[p][0] += w;
        for (int c = 0; c < C; ++c) a[p][1 + c] += w * load<vb>(centre + c * plane + j);
      }
    }
    for (int p = 0; p < NP; ++p) {
      if (Max) {
        top[st[p]] = std::max(top[st[p]], tmax[p]);
        continue;
      }
      for (int v = 0; v <= C; ++v) {
        float* sums = acc.data() + (st[p] * (C + 1) + v) * BL;
        const vb s = load<vb>(sums) + a[p][v];
        std::memcpy(sums, &s, sizeof s);
      }
    }
  }

  // T from scratch for the window rows uy .. uy + k - 1: each entry summed in registers over the k rows and the
  // channels and stored once (adding the rows one by one would load and store all of T k times); NB vectors of one
  // row of T at a time share each broadcast of X.
  template <int NB>
  void sum_rows(float* t, const float* Yn, int uy, int dy, int ux, int v) const {
    const int64_t plane = (int64_t)Hp * Wp;
    vb s[NB] = {};
    for (int c = 0; c < C; ++c)
      for (int ey = 0; ey < k; ++ey) {
        const float x = X[c * plane + (int64_t)(uy + ey) * Wp + P.x0 + ux];
        const float* yr = Yn + c * plane + (int64_t)(uy + ey + dy) * Wp + Q.x0 + v;
        for (int b = 0; b < NB; ++b) s[b] += x * load<vb>(yr + b * BL);
      }
    std::memcpy(t + v, s, sizeof s);
  }

  void fill_rows(const float* Yn, int uy, int dy) {
    const int nvec = (nqx() + k - 1 + BL - 1) / BL, stride = ts();
    for (int ux = 0; ux < npx() + k - 1; ++ux) {
      float* t = T.data() + (int64_t)ux * stride;
      int i = 0;
      for (; i + 4 <= nvec; i += 4) sum_rows<4>(t, Yn, uy, dy, ux, i * BL);
      for (; i < nvec; ++i) sum_rows<1>(t, Yn, uy, dy, ux, i * BL);
    }
  }

  // One row offset dy of image n: (Max) the largest logit per pixel into top, or (Sum) the weights and
  // weighted centres into acc; returns the largest logit minus shift seen (Sum).
  template <bool Max>
  float pass(int n, int dy) {
    const int r = k / 2, nq = nqx();
    const int ylo = std::max(P.y0, Q.y0 - dy), yhi = std::min(P.y1, Q.y1 - dy);
    const int64_t plane = (int64_t)Hp * Wp;
    const float* Yn = Y + (int64_t)n * C * plane;
    vb most = splat<vb>(-INFINITY);
    vbi lane;
    for (int j = 0; j < BL; ++j) lane[j] = j;
    const bool single = npx() == 1 && nq == 1;  // one pair per image (a corner): T would cost k^3, the dot k^2
    // T is summed afresh every `fresh` pixel rows, else slid: a float32 running sum drifts with its length (at
    // k = 3 near t = 0, slid over 30 rows: 4x the direct products' error; summed afresh every 8: 3x), and a fresh
    // sum costs k row products to a slide's 2: once per 2k rows it adds about a quarter, and els-borders' cells
    // from k = 11 on (32-row images) never need one
    const int fresh = std::max(8, 2 * k);
    for (int py = ylo; py < yhi; ++py) {
      if (single) {  // T[e][e] alone, summed straight from the images into lane 0
        vb d[2] = {};  // two chains (even and odd rows): the adds' latency would bind
        for (int c = 0; c < C; ++c)
          for (int ey = 0; ey < k; ++ey) {
            const float* xr = X + c * plane + (int64_t)(py + ey) * Wp + P.x0;
            const float* yr = Yn + c * plane + (int64_t)(py + dy + ey) * Wp + Q.x0;
            for (int e = 0; e < k; e += BL) {
              const vb prod = load<vb>(xr + e) * load<vb>(yr + e);
              d[ey & 1] += lane < k - e ? prod : vb{};
            }
          }
        float dot = 0;
        for (int l = 0; l < BL; ++l) dot += d[0][l] + d[1][l];
        std::fill(T.begin(), T.begin() + BL, 0.0f);
        T[0] = dot;
      } else if ((py - ylo) % fresh == 0) {
        fill_rows(Yn, py, dy);
      } else {  // slide the window rows down by one
        slide_row(Yn, py + k - 1, dy, py - 1);
      }
      const float* yn = ynorm + ((int64_t)n * H + py + dy) * W + Q.x0;
      const float* centre = Yn + (int64_t)(py + dy + r) * Wp + Q.x0 + r;
      int px = 0;
      for (; px + 4 <= npx(); px += 4) weigh<Max, 4>(py, px, yn, centre, most);
      for (; px < npx(); ++px) weigh<Max, 1>(py, px, yn, centre, most);
    }
    float m = -INFINITY;
    for (int j = 0; j < BL; ++j) m = std::max(m, most[j]);
    return m;
  }

  void run(int n0, int n1) {
    const int V = 1 + C, np = (P.y1 - P.y0) * npx();
    T.assign((int64_t)(npx() + k) * ts() + BL, 0.0f);
    acc.assign((int64_t)np * V * BL, 0.0f);
    lanes.assign((int64_t)np * V * BL, 0.0);
    top.assign(np, -INFINITY);
    const int dy0 = same_row ? 0 : Q.y0 - P.y1 + 1, dy1 = same_row ? 1 : Q.y1 - P.y0;
    for (int n = n0; n < n1; ++n)
      for (int dy = dy0; dy < dy1; ++dy) {
        const int ylo = std::max(P.y0, Q.y0 - dy), yhi = std::min(P.y1, Q.y1 - dy);
        if (ylo >= yhi) continue;
        const int64_t a0 = (int64_t)(ylo - P.y0) * npx(), a1 = (int64_t)(yhi - P.y0) * npx();
        if (pass<false>(n, dy) > LIFT) {  // some logit is far above its pixel's shift: raise the shifts, redo
          std::fill(acc.begin() + a0 * V * BL, acc.begin() + a1 * V * BL, 0.0f);
          std::fill(top.begin() + a0, top.begin() + a1, -INFINITY);
          pass<true>(n, dy);
          for (int64_t i = a0; i < a1; ++i)
            if (top[i] > shift[i]) {
              const double keep = std::isinf(shift[i]) ? 0.0 : std::exp((double)shift[i] - top[i]);
              for (int64_t j = i * V * BL; j < (i + 1) * V * BL; ++j) lanes[j] *= keep;
              shift[i] = top[i];
            }
          pass<false>(n, dy);  // every logit now <= its shift
        }
        for (int64_t i = a0 * V * BL; i < a1 * V * BL; ++i) {  // flush: float32 sums of one row of candidates
          lanes[i] += acc[i];
          acc[i] = 0.0f;
        }
      }
    for (int64_t i = 0; i < np * V; ++i)
      for (int l = 0; l < BL; ++l) sums[i] += lanes[i * BL + l];
  }
};

}  // namespace

// The score's posterior moments from box sums. X (B, C, Hp, Wp) padded queries; Y (N, C, Hp, Wp) padded
// training images; ynorm (N, H, W) each candidate window's |Y_nq|^2 (all three readable 8 floats past
// their end); cells (ncells, 9) int32 rectangles [py0, py1, px0, px1, qy0, qy1, qx0, qx1, same], same = 1:
// each pixel's candidates are those in its own row only, else all of the cell's; scale, bias
// (B,). out (B, H * W, 1 + C) float64: E_w[1, c_0, ..] per pixel of every cell (first column 1).
extern "C" void box_score(const float* X, int B, int C, int H, int W, int k, const float* Y, int64_t N,
                          const float* ynorm, const int* cells, int ncells, const float* scale, const float* bias,
                          float floor, double* out, int threads) {
  const int Hp = H + k - 1, Wp = W + k - 1, V = 1 + C;
  // tasks: (b, cell, slice of the images), slices in proportion to the cell's pairs
  struct Part {
    int b, cell, n0, n1;
  };
  std::vector<Part> parts;
  std::vector<int64_t> pairs(ncells);
  int64_t total = 0;
  for (int c = 0; c < ncells; ++c) {
    const int* r = cells + 9 * c;
    pairs[c] = (int64_t)(r[1] - r[0]) * (r[3] - r[2]) * (r[8] ? 1 : r[5] - r[4]) * (r[7] - r[6]);
    total += pairs[c];
  }
  for (int b = 0; b < B; ++b)
    for (int c = 0; c < ncells; ++c) {
      const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(N, 8 * threads * pairs[c] / std::max<int64_t>(1, total * B) + 1));
      for (int64_t s = 0; s < slices; ++s) parts.push_back({b, c, (int)(N * s / slices), (int)(N * (s + 1) / slices)});
    }
  std::vector<std::vector<float>> shifts(parts.size());
  std::vector<std::vector<double>> sums(parts.size());
  parallel((int64_t)parts.size(), threads, [&](int64_t i) {
    const Part& pt = parts[i];
    const int* r = cells + 9 * pt.cell;
    BoxTask task{X + (int64_t)pt.b * C * Hp * Wp, Y, ynorm, C, H, W, k, Hp, Wp, {r[0], r[1], r[2], r[3]},
                 {r[4], r[5], r[6], r[7]}, r[8] == 1, scale[pt.b], bias[pt.b], floor};
    shifts[i].assign((int64_t)(r[1] - r[0]) * (r[3] - r[2]), -INFINITY);
    sums[i].assign((int64_t)(r[1] - r[0]) * (r[3] - r[2]) * V, 0.0);
    task.shift = shifts[i].data();
    task.sums = sums[i].data();
    task.run(pt.n0, pt.n1);
  });
  // merge the slices of each (b, cell), each scaled to the largest shift, and normalize
  for (size_t i0 = 0; i0 < parts.size();) {
    size_t i1 = i0;
    while (i1 < parts.size() && parts[i1].b == parts[i0].b && parts[i1].cell == parts[i0].cell) ++i1;
    const int* r = cells + 9 * parts[i0].cell;
    const int S = r[3] - r[2];
    for (int y = r[0]; y < r[1]; ++y)
      for (int x = r[2]; x < r[3]; ++x) {
        const int64_t st = (int64_t)(y - r[0]) * S + (x - r[2]);
        float top = -INFINITY;
        for (size_t i = i0; i < i1; ++i) top = std::max(top, shifts[i][st]);
        double* o = out + ((int64_t)parts[i0].b * H * W + (int64_t)y * W + x) * V;
        std::fill(o, o + V, 0.0);
        for (size_t i = i0; i < i1; ++i) {
          if (std::isinf(shifts[i][st])) continue;
          const double f = std::exp((double)shifts[i][st] - top);
          for (int v = 0; v < V; ++v) o[v] += f * sums[i][st * V + v];
        }
        for (int v = V - 1; v >= 0; --v) o[v] /= o[0];
      }
    i0 = i1;
  }
}
