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

inline vf load(const float* p) {
  vf v;
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

inline vf splat(float s) { return s - vf{}; }  // s - 0 = s for every s (0 + s is not: -0), so it folds to a broadcast

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
