// Flash attention on the CPU, forward and backward, for float, double, bfloat16 and half (the
// last two computed in float).
//
// Same contract as aten::_scaled_dot_product_flash_attention_for_cpu (and its backward)
// without dropout or masks: q (Z, H, L, D), k and v (Z, H, S, D), any strides with the
// last dimension contiguous; causal is top-left aligned (query i sees keys 0..i).
// Returns out (Z, H, L, D) in the input dtype and lse (Z, H, L) in the compute type.
//
// Why it exists: aten's kernel skips masked scores only in whole key tiles of 512, so a
// causal problem of S rows still computes about S * 256 masked scores. The dilated op runs
// causal problems of only w/r (2K-3K) kept rows, where that is 25% extra work. Here every
// query block stops at its own last key (the forward takes its diagonal in smaller
// sub-blocks), so the waste is one small triangle per block. And its float products run on
// oneDNN's AVX-512 micro-kernel where aten's call MKL's sgemm, which runs AVX2 code on AMD CPUs.
//
// Every product is a plain row-major C = A B [+ C] (see mm): the keys are transposed once per
// call for q k^T, and the backward takes its products keys x queries, so that P^T and dS^T are
// the A operands of dV and dK, and dq is accumulated transposed.
//
// Band mode (band_fwd, band_bwd; see Band) computes several r = 1 patterns of short segments, the
// local window, in one pass over the whole sequence, merged into the mixture's buffers.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" {
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}

namespace {

// C (M x N) = A (M x K) B (K x N) [+ C], all row-major with leading dimensions lda, ldb, ldc.
// float: oneDNN's brgemm micro-kernel through PyTorch (at::native::cpublas::brgemm), which runs
// AVX-512 on any CPU that has it; MKL's sgemm takes its AVX2 path on AMD CPUs, about half the rate
// at this kernel's shapes (docs/cpu-kernel.md). Where oneDNN's micro-kernel is unavailable, brgemm
// itself falls back to a BLAS gemm.
void mm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
        int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}

// double: BLAS dgemm, column-major: C^T = B^T A^T.
void mm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
        int64_t ldc, bool add) {
  const char n = 'N';
  const double one = 1, beta = add ? 1 : 0;
  int m_ = N, n_ = M, k_ = K, la = ldb, lb = lda, lc = ldc;
  dgemm_(&n, &n, &m_, &n_, &k_, &one, B, &la, A, &lb, &beta, C, &lc);
}

// Finite stand-in for -inf: the file is compiled with -ffast-math (so that exp vectorises),
// which assumes no infinities. The lowest finite value, so that scaled scores below -1e30 (huge
// scales) still count as scores; it is never an operand of exp.
template <typename T>
constexpr T kLow = std::numeric_limits<T>::lowest();

// Row-major view of one (z, h) slice: element (i, d) at p[i * row + d].
template <typename T>
struct Mat {
  T* p;
  int64_t row;
};

template <typename T>
Mat<T> slice(const at::Tensor& t, int64_t z, int64_t h) {
  return {t.data_ptr<T>() + z * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// dst (cols x rows, leading dimension ld) = the transpose of rows x cols of src, converted to T.
// Tiles of 16 rows keep the writes to each dst row contiguous and the reads in L1.
template <typename S, typename T>
void transpose(const Mat<S>& src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t d = 0; d < cols; ++d)
      for (int64_t i = i0; i < i1; ++i) dst[d * ld + i] = static_cast<T>(src.p[i * src.row + d]);
  }
}

// dst (rows x cols, leading dimension cols) = rows x cols of src, converted to T.
template <typename S, typename T>
void convert(const Mat<S>& src, int64_t rows, int64_t cols, T* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < cols; ++d) dst[i * cols + d] = static_cast<T>(src.p[i * src.row + d]);
}

// rows x cols of src in the compute type T: src itself when it is of type T, else a converted
// copy in buf (leading dimension cols). bf16/fp16 inputs are multiplied in float this way.
template <typename T, typename S>
Mat<T> computed(const Mat<S>& src, int64_t rows, int64_t cols, std::vector<T>& buf) {
  if constexpr (std::is_same_v<S, T>) {
    return src;
  } else {
    convert(src, rows, cols, buf.data());
    return {buf.data(), cols};
  }
}

// Leading dimension of a transposed-keys buffer for S keys. oneDNN generates (and caches, per
// thread, for good) one micro-kernel per distinct shape and leading dimensions, so S itself would
// make a new one for every key count a caller brings (a decode loop brings a new one every step);
// rounded up, key counts share them.
inline int64_t keys_ld(int64_t s) {
  constexpr int64_t kRound = 256;
  return (s + kRound - 1) / kRound * kRound;
}

// Keys a query row sees inside the key block [n, n + kb): all of them, or up to itself.
inline int64_t visible(bool causal, int64_t row, int64_t n, int64_t kb) {
  return causal ? std::max<int64_t>(0, std::min(kb, row - n + 1)) : kb;
}

// Last key (exclusive) a query block [m, m + qb) needs.
inline int64_t key_end(bool causal, int64_t m, int64_t qb, int64_t s) {
  return causal ? std::min(m + qb, s) : s;
}

// Online-softmax state of one query block: scores, and running max, sum and unnormalised
// output per row; and this thread's transposed keys, kt (D, S) with leading dimension ldk, and
// (inputs not of type T only) its query block and values converted to T.
template <typename T>
struct RowState {
  std::vector<T> p, acc, mx, sm, kt, qc, vc;
  int64_t ldk;
  int64_t kt_slice = -1, kt_done = 0;  // (z, h) slice whose first kt_done keys are in kt (and vc)
  RowState(int64_t rows, int64_t cols, int64_t d, int64_t s, bool converts)
      : p(rows * cols), acc(rows * d), mx(rows), sm(rows), kt(d * keys_ld(s)), qc(converts ? rows * d : 0),
        vc(converts ? s * d : 0), ldk(keys_ld(s)) {}

  // Make keys [0, n) of slice t (keys K, values V) available transposed in kt (and values in vc).
  // A thread takes its tasks in order (at::parallel_for hands out contiguous ranges), so each
  // slice's keys are transposed about once per thread, into a buffer reused rather than allocated.
  template <typename Tin>
  void keys_upto(int64_t t, const Mat<Tin>& K, const Mat<Tin>& V, int64_t n, int64_t D) {
    if (t != kt_slice) kt_slice = t, kt_done = 0;
    if (n <= kt_done) return;
    transpose<Tin, T>({K.p + kt_done * K.row, K.row}, n - kt_done, D, kt.data() + kt_done, ldk);
    if constexpr (!std::is_same_v<Tin, T>) convert(Mat<Tin>{V.p + kt_done * V.row, V.row}, n - kt_done, D,
                                                   vc.data() + kt_done * D);
    kt_done = n;
  }

  // The slice's values in T: the input itself, or vc.
  template <typename Tin>
  Mat<T> values(const Mat<Tin>& V, int64_t D) {
    if constexpr (std::is_same_v<Tin, T>) {
      return V;
    } else {
      return {vc.data(), D};
    }
  }
};

// Rows [a0, a1) of the query block at m (its queries Q, row 0 = query m; state st) against keys [n0, n1), in key
// chunks of kvB columns; a row sees only keys <= itself when causal. The scaled scores are stored once
// and the max is taken of those very values, so exp's argument is exactly 0 at the max: computed as
// score * scale - max, -ffast-math contracts it into one fma whose result at the max is the product's
// rounding error, which overflows exp once |score * scale| passes about 1.5e9 (a negative scale is
// right too, the max being of scaled scores).
template <typename T>
void attend_rows(const Mat<T>& Q, const Mat<T>& V, int64_t m, int64_t a0, int64_t a1, int64_t n0, int64_t n1,
                 int64_t D, bool causal, T scale, int64_t kvB, RowState<T>& st) {
  const int64_t rows = a1 - a0;
  T* p = st.p.data() + a0 * kvB;
  T* acc = st.acc.data() + a0 * D;
  for (int64_t n = n0; n < n1; n += kvB) {
    const int64_t kb = std::min(kvB, n1 - n);
    mm(rows, kb, D, Q.p + a0 * Q.row, Q.row, st.kt.data() + n, st.ldk, p, kvB, false);  // raw scores
    for (int64_t i = 0; i < rows; ++i) {
      T* row = p + i * kvB;
      const int64_t cols = visible(causal, m + a0 + i, n, kb);
      T& mx = st.mx[a0 + i];
      T rmax = mx;
      for (int64_t j = 0; j < cols; ++j) {
        row[j] *= scale;
        rmax = std::max(rmax, row[j]);
      }
      T s = 0;
      for (int64_t j = 0; j < cols; ++j) {
        row[j] = std::exp(row[j] - rmax);
        s += row[j];
      }
      std::fill(row + cols, row + kb, T(0));
      // Before the row's first key mx is kLow and acc, sm are 0: any finite factor will do, and
      // exp(kLow - rmax) could overflow to -inf first.
      const T corr = mx == kLow<T> ? T(0) : std::exp(mx - rmax);
      if (corr != T(1)) {
        T* a = acc + i * D;
        for (int64_t d = 0; d < D; ++d) a[d] *= corr;
      }
      st.sm[a0 + i] = st.sm[a0 + i] * corr + s;
      mx = rmax;
    }
    mm(rows, D, kb, p, kvB, V.p + n * V.row, V.row, acc, D, true);  // acc += p V[n : n+kb]
  }
}

// Query blocks of qB rows take the keys every row of the block sees in products of qB rows;
// causal blocks then take their diagonal in sub-blocks of sub rows, each up to its own last key,
// so the masked scores computed are one sub x sub triangle per sub-block. Inputs and out are
// of type Tin; products, softmax and lse are in T (float for bf16/fp16 inputs).
template <typename Tin, typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, T scale, at::Tensor& out,
             at::Tensor& lse, int64_t qB, int64_t kvB, int64_t sub) {
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2);
  const int64_t nqb = (L + qB - 1) / qB;
  at::parallel_for(0, Z * H * nqb, 1, [&](int64_t begin, int64_t end) {
    RowState<T> st(qB, kvB, D, S, !std::is_same_v<Tin, T>);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t z = t / (H * nqb), h = (t / nqb) % H, m = (t % nqb) * qB, qb = std::min(qB, L - m);
      const Mat<Tin> Qin = slice<Tin>(q, z, h), Vin = slice<Tin>(v, z, h), O = slice<Tin>(out, z, h);
      st.keys_upto(t / nqb, slice<Tin>(k, z, h), Vin, key_end(causal, m, qb, S), D);
      const Mat<T> Q = computed<T>(Mat<Tin>{Qin.p + m * Qin.row, Qin.row}, qb, D, st.qc), V = st.values(Vin, D);
      T* lrow = lse.data_ptr<T>() + z * lse.stride(0) + h * lse.stride(1);
      std::fill(st.acc.begin(), st.acc.end(), T(0));
      std::fill(st.mx.begin(), st.mx.end(), kLow<T>);
      std::fill(st.sm.begin(), st.sm.end(), T(0));
      const int64_t shared = causal ? std::min(m + 1, S) : S;  // keys < shared: seen by every row
      attend_rows<T>(Q, V, m, 0, qb, 0, shared, D, causal, scale, kvB, st);
      if (causal) {
        for (int64_t a = 0; a < qb; a += sub) {
          const int64_t a1 = std::min(a + sub, qb);
          attend_rows<T>(Q, V, m, a, a1, shared, key_end(true, m + a, a1 - a, S), D, true, scale, kvB, st);
        }
      }
      for (int64_t i = 0; i < qb; ++i) {
        const T inv = T(1) / st.sm[i];
        Tin* o = O.p + (m + i) * O.row;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<Tin>(st.acc[i * D + d] * inv);
        lrow[(m + i) * lse.stride(2)] = st.mx[i] + std::log(st.sm[i]);
      }
    }
  });
}

// Per-thread buffers of the backward. Products are taken transposed (keys x queries) so that
// every one is a plain row-major A B: Kt (D, S) is the slice's keys transposed; qT, doT, dqT
// (D, qB) the query block's q, dout and dq transposed; pT, dsT (kvB, qB) probabilities and
// score gradients of one key chunk; lblk the query block's lse. Inputs not of type T also get converted copies (kc, vc of
// the slice, qc, dc of the query block) and accumulators for dk and dv (dkc, dvc).
template <typename T>
struct Grads {
  std::vector<T> Kt, qT, doT, dqT, pT, dsT, delta, lblk, kc, vc, qc, dc, dkc, dvc;
  Grads(int64_t L, int64_t S, int64_t D, int64_t qB, int64_t kvB, bool convert)
      : Kt(D * keys_ld(S)), qT(D * qB), doT(D * qB), dqT(D * qB), pT(kvB * qB), dsT(kvB * qB), delta(L), lblk(qB),
        kc(convert ? S * D : 0), vc(convert ? S * D : 0), qc(convert ? qB * D : 0), dc(convert ? qB * D : 0),
        dkc(convert ? S * D : 0), dvc(convert ? S * D : 0) {}
};

// A zeroed (S, D) accumulator in T for the gradient out: out itself, or buf.
template <typename T, typename Tin>
Mat<T> accumulator(const Mat<Tin>& out, int64_t S, int64_t D, std::vector<T>& buf) {
  if constexpr (std::is_same_v<Tin, T>) {
    for (int64_t j = 0; j < S; ++j) std::fill(out.p + j * out.row, out.p + j * out.row + D, T(0));
    return out;
  } else {
    std::fill(buf.begin(), buf.begin() + S * D, T(0));
    return {buf.data(), D};
  }
}

// out = acc, converted, when acc is a buffer of its own (see accumulator).
template <typename T, typename Tin>
void store(const Mat<T>& acc, const Mat<Tin>& out, int64_t S, int64_t D) {
  if constexpr (!std::is_same_v<Tin, T>) {
    for (int64_t j = 0; j < S; ++j)
      for (int64_t d = 0; d < D; ++d) out.p[j * out.row + d] = static_cast<Tin>(acc.p[j * acc.row + d]);
  }
}

// pT = exp(sT * scale - lse), dsT = pT * (dpT - delta) * scale for the (kb, qb) chunk of keys
// [n, n + kb) and queries [m, m + qb) (l: the block's lse, contiguous); key j is seen by queries
// m + i >= n + j when causal. The scaled scores are stored before exp reads them (see attend_rows),
// and exp's argument is clamped to <= 0: p <= 1 holds exactly (lse is at least every score it sums),
// so only rounding can pass 0, and at huge scores that rounding would overflow exp.
template <typename T>
void chunk_grads(T* pT, T* dsT, int64_t kb, int64_t qb, int64_t ld, int64_t m, int64_t n, bool causal, T scale,
                 const T* l, const T* delta) {
  for (int64_t j = 0; j < kb; ++j) {
    T* pr = pT + j * ld;
    T* dr = dsT + j * ld;
    const int64_t i0 = causal ? std::min(qb, std::max<int64_t>(0, n + j - m)) : 0;
    std::fill(pr, pr + i0, T(0));
    std::fill(dr, dr + i0, T(0));
    for (int64_t i = i0; i < qb; ++i) pr[i] *= scale;
    for (int64_t i = i0; i < qb; ++i) {
      pr[i] = std::exp(std::min(pr[i] - l[i], T(0)));
      dr[i] = pr[i] * (dr[i] - delta[m + i]) * scale;
    }
  }
}

// Gradients of one (z, h) slice, inputs and gradients of type Tin, computed in T. dq, dk, dv
// are written in full.
template <typename Tin, typename T>
void backward_slice(const Mat<Tin>& dO, const Mat<Tin>& Qin, const Mat<Tin>& Kin, const Mat<Tin>& Vin,
                    const Mat<Tin>& O, const T* lse, int64_t lse_step, Mat<Tin> dQ, Mat<Tin> dKout, Mat<Tin> dVout,
                    int64_t L, int64_t S, int64_t D, bool causal, T scale, int64_t qB, int64_t kvB, Grads<T>& g) {
  const Mat<T> dK = accumulator<T>(dKout, S, D, g.dkc), dV = accumulator<T>(dVout, S, D, g.dvc);
  for (int64_t i = 0; i < L; ++i) {  // delta_i = dO_i . O_i
    T s = 0;
    for (int64_t d = 0; d < D; ++d) s += static_cast<T>(dO.p[i * dO.row + d]) * static_cast<T>(O.p[i * O.row + d]);
    g.delta[i] = s;
  }
  const Mat<T> K = computed<T>(Kin, S, D, g.kc), V = computed<T>(Vin, S, D, g.vc);
  const int64_t ldk = keys_ld(S);
  transpose<T, T>(K, S, D, g.Kt.data(), ldk);
  for (int64_t m = 0; m < L; m += qB) {
    const int64_t qb = std::min(qB, L - m), kend = key_end(causal, m, qb, S);
    const Mat<T> q = computed<T>(Mat<Tin>{Qin.p + m * Qin.row, Qin.row}, qb, D, g.qc);
    const Mat<T> dout = computed<T>(Mat<Tin>{dO.p + m * dO.row, dO.row}, qb, D, g.dc);
    transpose<T, T>(q, qb, D, g.qT.data(), qB);
    transpose<T, T>(dout, qb, D, g.doT.data(), qB);
    for (int64_t i = 0; i < qb; ++i) g.lblk[i] = lse[(m + i) * lse_step];
    for (int64_t n = 0; n < kend; n += kvB) {
      const int64_t kb = std::min(kvB, kend - n);
      mm(kb, qb, D, K.p + n * K.row, K.row, g.qT.data(), qB, g.pT.data(), qB, false);    // scores^T
      mm(kb, qb, D, V.p + n * V.row, V.row, g.doT.data(), qB, g.dsT.data(), qB, false);  // dP^T
      chunk_grads<T>(g.pT.data(), g.dsT.data(), kb, qb, qB, m, n, causal, scale, g.lblk.data(), g.delta.data());
      // dV[n:n+kb] += P^T dO;  dK[n:n+kb] += dS^T Q;  dq^T += K[n:n+kb]^T dS^T
      mm(kb, D, qb, g.pT.data(), qB, dout.p, dout.row, dV.p + n * dV.row, dV.row, true);
      mm(kb, D, qb, g.dsT.data(), qB, q.p, q.row, dK.p + n * dK.row, dK.row, true);
      mm(D, qb, kb, g.Kt.data() + n, ldk, g.dsT.data(), qB, g.dqT.data(), qB, n > 0);
    }
    if (kend == 0) std::fill(g.dqT.begin(), g.dqT.end(), T(0));
    for (int64_t i = 0; i < qb; ++i)
      for (int64_t d = 0; d < D; ++d) dQ.p[(m + i) * dQ.row + d] = static_cast<Tin>(g.dqT[d * qB + i]);
  }
  store<T>(dK, dKout, S, D);
  store<T>(dV, dVout, S, D);
}

template <typename Tin, typename T>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, bool causal, T scale, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv, int64_t qB, int64_t kvB) {
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2);
  at::parallel_for(0, Z * H, 1, [&](int64_t begin, int64_t end) {
    Grads<T> g(L, S, D, qB, kvB, !std::is_same_v<Tin, T>);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t z = t / H, h = t % H;
      const T* l = lse.data_ptr<T>() + z * lse.stride(0) + h * lse.stride(1);
      backward_slice<Tin, T>(slice<Tin>(dout, z, h), slice<Tin>(q, z, h), slice<Tin>(k, z, h), slice<Tin>(v, z, h),
                             slice<Tin>(out, z, h), l, lse.stride(2), slice<Tin>(dq, z, h), slice<Tin>(dk, z, h),
                             slice<Tin>(dv, z, h), L, S, D, causal, scale, qB, kvB, g);
    }
  });
}

// ---------------------------------------------------------------------------- band mode
// Several r = 1 patterns of short segments (the local window: length w, phases 0 and w / 2) in
// one pass over the sequence. Their merge is itself one softmax in which key j of query i counts
// c_ij times, c_ij being the number of these patterns in which i and j share a segment (and
// j <= i when causal): the merged out is sum_j c_ij e^{s_ij} v_j / sum_j c_ij e^{s_ij}, the merged
// lse the log of that sum, and each pattern's backward at the merged (out, lse) adds its share, so
// together they are one backward with p_ij = c_ij e^{s_ij - lse_i}. A query block of qB rows takes
// the keys any of its rows sees in one product. The forward merges its (out, lse) into those of the
// mixture's other patterns (or writes fresh ones), the backward adds into their gradients: in T.
struct Band {
  std::vector<int64_t> w, phase;  // clipped to L (phase <= w)
  int64_t L;
  bool causal;

  // [s, e): pattern p's segment holding position x (the leading one [0, phase) below the phase).
  void segment(size_t p, int64_t x, int64_t& s, int64_t& e) const {
    if (x < phase[p]) {
      s = 0, e = phase[p];
    } else {
      s = x - (x - phase[p]) % w[p], e = std::min(s + w[p], L);
    }
  }

  // [lo, hi): the keys some row of the query block [m, m + qb) sees (segments move with x).
  void keys(int64_t m, int64_t qb, int64_t& lo, int64_t& hi) const {
    lo = L, hi = 0;
    for (size_t p = 0; p < w.size(); ++p) {
      int64_t s, e;
      segment(p, m, s, e);
      lo = std::min(lo, s);
      segment(p, m + qb - 1, s, e);
      hi = std::max(hi, e);
    }
    if (causal) hi = std::min(hi, m + qb);
  }

  // c_ij for rows [m, m + qb) and keys [lo, lo + kb): at c[i * ld + j - lo], or at
  // c[(j - lo) * ld + i] when keys_major.
  template <typename T>
  void counts(T* c, int64_t m, int64_t qb, int64_t lo, int64_t kb, int64_t ld, bool keys_major) const {
    const int64_t rows = keys_major ? kb : qb, cols = keys_major ? qb : kb, step = keys_major ? ld : 1;
    for (int64_t r = 0; r < rows; ++r) std::fill(c + r * ld, c + r * ld + cols, T(0));
    for (int64_t i = 0; i < qb; ++i) {
      T* ci = keys_major ? c + i : c + i * ld;
      for (size_t p = 0; p < w.size(); ++p) {
        int64_t s, e;
        segment(p, m + i, s, e);
        if (causal) e = std::min(e, m + i + 1);
        for (int64_t j = s; j < e; ++j) ci[(j - lo) * step] += T(1);
      }
    }
  }

  // Most keys a query block of qB rows sees: its rows and a segment on either side.
  int64_t max_keys(int64_t qB) const { return qB + 2 * *std::max_element(w.begin(), w.end()); }
};

// x (n raw scores) -> c_j e^{x_j * scale - mx}; returns mx, the max of the scaled scores with c_j > 0,
// and writes the row sum. Scaled once and stored, so exp's argument is exactly 0 at the max (see
// attend_rows); clamped to <= 0 so that keys no pattern shares (c_j = 0, possibly above the max)
// give 0 * e^0 rather than 0 times an overflow.
template <typename T>
T weighted_softmax(T* x, const T* c, int64_t n, T scale, T& sum) {
  T mx = kLow<T>;
  for (int64_t j = 0; j < n; ++j) {
    x[j] *= scale;
    mx = std::max(mx, c[j] > T(0) ? x[j] : kLow<T>);
  }
  T s = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = c[j] * std::exp(std::min(x[j] - mx, T(0)));
    s += x[j];
  }
  sum = s;
  return mx;
}

// Per-thread buffers of the band: keys transposed kt (D, ldk); scores or probabilities p and
// counts c, (qB, ldk) forward and (ldk, qB) backward; the forward's unnormalised out o (qB, D); the backward's score gradients ds (ldk, qB),
// dsq (qB, ldk) and query block, dout transposed qT, doT (D, qB), with delta and lse of its rows;
// and (inputs not of type T) converted copies of the query and dout blocks and the block's keys
// and values.
template <typename T>
struct BandBufs {
  std::vector<T> kt, p, c, o, ds, dsq, qT, doT, delta, l, qc, dc, kc, vc;
  BandBufs(int64_t qB, int64_t ldk, int64_t D, bool converts, bool backward)
      : kt(D * ldk), p(qB * ldk), c(qB * ldk), o(qB * D), ds(backward ? qB * ldk : 0), dsq(backward ? qB * ldk : 0),
        qT(backward ? D * qB : 0), doT(backward ? D * qB : 0), delta(qB), l(qB), qc(converts ? qB * D : 0),
        dc(converts ? qB * D : 0), kc(converts ? ldk * D : 0), vc(converts ? ldk * D : 0) {}
};

// Whether x is -inf (a row no pattern has reached yet), read from its bits: -ffast-math lets the
// compiler take any comparison with an infinity as false.
template <typename T>
bool minus_infinity(T x) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const T inf = -std::numeric_limits<T>::infinity();
  Bits a, b;
  std::memcpy(&a, &x, sizeof(T));
  std::memcpy(&b, &inf, sizeof(T));
  return a == b;
}

// Row o (D), lse l of the mixture so far <- merged with the band's row: unnormalised ob with sum
// sm and lse lb. The stable update of the op's merge: the larger lse keeps weight 1 / (1 + e).
template <typename T>
void merge_row(T* o, T& l, const T* ob, T sm, T lb, int64_t D, bool fresh) {
  const T inv = T(1) / sm;
  if (fresh || minus_infinity(l)) {
    for (int64_t d = 0; d < D; ++d) o[d] = ob[d] * inv;
    l = lb;
    return;
  }
  const T e = std::exp(-std::abs(l - lb)), w_big = T(1) / (T(1) + e), w_small = e * w_big;
  const T w_old = l >= lb ? w_big : w_small, w_band = (l >= lb ? w_small : w_big) * inv;
  for (int64_t d = 0; d < D; ++d) o[d] = w_old * o[d] + w_band * ob[d];
  l = std::max(l, lb) + std::log1p(e);
}

template <typename Tin, typename T>
void band_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Band& band, T scale,
                  at::Tensor& out, at::Tensor& lse, int64_t qB, bool fresh) {
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t nqb = (L + qB - 1) / qB, ldk = band.max_keys(qB);
  at::parallel_for(0, Z * H * nqb, 1, [&](int64_t begin, int64_t end) {
    BandBufs<T> b(qB, ldk, D, !std::is_same_v<Tin, T>, false);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t z = t / (H * nqb), h = (t / nqb) % H, m = (t % nqb) * qB, qb = std::min(qB, L - m);
      int64_t lo, hi;
      band.keys(m, qb, lo, hi);
      const int64_t kb = hi - lo;
      const Mat<Tin> Qin = slice<Tin>(q, z, h), Kin = slice<Tin>(k, z, h), Vin = slice<Tin>(v, z, h);
      transpose<Tin, T>({Kin.p + lo * Kin.row, Kin.row}, kb, D, b.kt.data(), ldk);
      const Mat<T> Q = computed<T>(Mat<Tin>{Qin.p + m * Qin.row, Qin.row}, qb, D, b.qc);
      const Mat<T> V = computed<T>(Mat<Tin>{Vin.p + lo * Vin.row, Vin.row}, kb, D, b.vc);
      mm(qb, kb, D, Q.p, Q.row, b.kt.data(), ldk, b.p.data(), ldk, false);  // raw scores
      band.counts(b.c.data(), m, qb, lo, kb, ldk, false);
      for (int64_t i = 0; i < qb; ++i)  // b.l: the row sums, then the rows' lse
        b.l[i] = weighted_softmax(b.p.data() + i * ldk, b.c.data() + i * ldk, kb, scale, b.delta[i]);
      mm(qb, D, kb, b.p.data(), ldk, V.p, V.row, b.o.data(), D, false);  // unnormalised out
      const Mat<T> O = slice<T>(out, z, h);
      T* lrow = lse.data_ptr<T>() + z * lse.stride(0) + h * lse.stride(1);
      for (int64_t i = 0; i < qb; ++i)
        merge_row(O.p + (m + i) * O.row, lrow[(m + i) * lse.stride(2)], b.o.data() + i * D, b.delta[i],
                  b.l[i] + std::log(b.delta[i]), D, fresh);
    }
  });
}

// One query block [m, m + qb) of the band backward of slice (z, h): added to dq of its rows and to
// dk and dv of its keys (of type T, in dQ, dK, dV).
template <typename Tin, typename T>
void band_block_grads(const Mat<Tin>& dO, const Mat<Tin>& Qin, const Mat<Tin>& Kin, const Mat<Tin>& Vin,
                      const Mat<Tin>& O, const T* lse, int64_t lse_step, const Mat<T>& dQ, const Mat<T>& dK,
                      const Mat<T>& dV, const Band& band, int64_t m, int64_t qb, int64_t D, T scale, int64_t qB,
                      int64_t ldk, BandBufs<T>& b) {
  int64_t lo, hi;
  band.keys(m, qb, lo, hi);
  const int64_t kb = hi - lo;
  const Mat<T> q = computed<T>(Mat<Tin>{Qin.p + m * Qin.row, Qin.row}, qb, D, b.qc);
  const Mat<T> dout = computed<T>(Mat<Tin>{dO.p + m * dO.row, dO.row}, qb, D, b.dc);
  const Mat<T> K = computed<T>(Mat<Tin>{Kin.p + lo * Kin.row, Kin.row}, kb, D, b.kc);
  const Mat<T> V = computed<T>(Mat<Tin>{Vin.p + lo * Vin.row, Vin.row}, kb, D, b.vc);
  transpose<T, T>(q, qb, D, b.qT.data(), qB);
  transpose<T, T>(dout, qb, D, b.doT.data(), qB);
  for (int64_t i = 0; i < qb; ++i) {  // delta_i = dO_i . O_i
    T s = 0;
    const Tin* o = O.p + (m + i) * O.row;
    for (int64_t d = 0; d < D; ++d) s += dout.p[i * dout.row + d] * static_cast<T>(o[d]);
    b.delta[i] = s;
    b.l[i] = lse[(m + i) * lse_step];
  }
  mm(kb, qb, D, K.p, K.row, b.qT.data(), qB, b.p.data(), qB, false);    // scores^T
  mm(kb, qb, D, V.p, V.row, b.doT.data(), qB, b.ds.data(), qB, false);  // dP^T
  band.counts(b.c.data(), m, qb, lo, kb, qB, true);
  for (int64_t j = 0; j < kb; ++j) {  // p = c e^{s * scale - lse} (see chunk_grads), ds = p (dp - delta) scale
    T* pr = b.p.data() + j * qB;
    T* dr = b.ds.data() + j * qB;
    const T* cr = b.c.data() + j * qB;
    for (int64_t i = 0; i < qb; ++i) pr[i] *= scale;
    for (int64_t i = 0; i < qb; ++i) {
      pr[i] = cr[i] * std::exp(std::min(pr[i] - b.l[i], T(0)));
      dr[i] = pr[i] * (dr[i] - b.delta[i]) * scale;
    }
  }
  transpose<T, T>(Mat<T>{b.ds.data(), qB}, kb, qb, b.dsq.data(), ldk);
  // dV[lo:hi] += P^T dO;  dK[lo:hi] += dS^T Q;  dQ = dS K
  mm(kb, D, qb, b.p.data(), qB, dout.p, dout.row, dV.p + lo * dV.row, dV.row, true);
  mm(kb, D, qb, b.ds.data(), qB, q.p, q.row, dK.p + lo * dK.row, dK.row, true);
  mm(qb, D, kb, b.dsq.data(), ldk, K.p, K.row, dQ.p + m * dQ.row, dQ.row, true);
}

// Rows are taken in ranges of R rows (a multiple of qB, at least twice the widest segment, so that
// the keys of ranges two apart never overlap): the even ranges of every slice in parallel, then
// the odd ones, so that no two threads add to one row of dk or dv.
template <typename Tin, typename T>
void band_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const Band& band, T scale, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, int64_t qB, int64_t R) {
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t ldk = band.max_keys(qB), nr = (L + R - 1) / R;
  for (int64_t parity = 0; parity < 2; ++parity) {
    const int64_t per_slice = (nr - parity + 1) / 2;
    at::parallel_for(0, Z * H * per_slice, 1, [&](int64_t begin, int64_t end) {
      BandBufs<T> b(qB, ldk, D, !std::is_same_v<Tin, T>, true);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t z = t / (H * per_slice), h = (t / per_slice) % H, r0 = (2 * (t % per_slice) + parity) * R;
        const T* l = lse.data_ptr<T>() + z * lse.stride(0) + h * lse.stride(1);
        for (int64_t m = r0; m < std::min(r0 + R, L); m += qB)
          band_block_grads<Tin, T>(slice<Tin>(dout, z, h), slice<Tin>(q, z, h), slice<Tin>(k, z, h),
                                   slice<Tin>(v, z, h), slice<Tin>(out, z, h), l, lse.stride(2), slice<T>(dq, z, h),
                                   slice<T>(dk, z, h), slice<T>(dv, z, h), band, m, std::min(qB, L - m), D, scale,
                                   qB, ldk, b);
      }
    });
  }
}

void check(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && (t.stride(3) == 1 || t.size(3) == 1) &&
                  t.scalar_type() == q.scalar_type(),
              "longnet flash_cpu: ", name, " must be a 4-D CPU tensor of q's dtype with a contiguous last dimension");
}

}  // namespace

namespace {

// The type products, softmax and lse are computed in: double for double, float otherwise.
at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls f(Tin{}, T{}) with the input type of q and its compute type.
template <typename F>
void dispatch(const at::Tensor& q, F&& f) {
  switch (q.scalar_type()) {
    case at::kFloat: return f(float{}, float{});
    case at::kDouble: return f(double{}, double{});
    case at::kBFloat16: return f(at::BFloat16{}, float{});
    case at::kHalf: return f(at::Half{}, float{});
    default: TORCH_CHECK(false, "longnet flash_cpu: float32, float64, bfloat16 or float16 only, got ", q.scalar_type());
  }
}

}  // namespace

// (out, lse); out laid out (Z, L, H, D) in memory, lse (Z, L, H), like aten's CPU kernel for
// strided inputs; lse in the compute type (float32, or float64 for float64 inputs).
std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            double scale, int64_t qB, int64_t kvB, int64_t sub) {
  check(q, "q", q), check(k, "k", q), check(v, "v", q);
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({Z, L, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({Z, L, H}, q.options().dtype(compute_type(q))).transpose(1, 2);
  dispatch(q, [&](auto in, auto acc) {
    using T = decltype(acc);
    forward<decltype(in), T>(q, k, v, causal, static_cast<T>(scale), out, lse, qB, kvB, sub);
  });
  return {out, lse};
}

// (dq, dk, dv), each laid out (Z, L, H, D) in memory like aten's CPU backward.
std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, int64_t qB,
                            int64_t kvB) {
  check(dout, "dout", q), check(q, "q", q), check(k, "k", q), check(v, "v", q), check(out, "out", q);
  TORCH_CHECK(lse.dim() == 3 && lse.scalar_type() == compute_type(q),
              "longnet flash_cpu: lse must be (Z, H, L) in float32 (float64 for float64 inputs)");
  auto like = [](const at::Tensor& t) {
    return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
  };
  at::Tensor dq = like(q), dk = like(k), dv = like(v);
  dispatch(q, [&](auto in, auto acc) {
    using T = decltype(acc);
    backward<decltype(in), T>(dout, q, k, v, out, lse, causal, static_cast<T>(scale), dq, dk, dv, qB, kvB);
  });
  return {dq, dk, dv};
}

namespace {

Band make_band(const at::Tensor& q, const at::Tensor& k, bool causal, const std::vector<int64_t>& windows,
               const std::vector<int64_t>& phases) {
  const int64_t L = q.size(2);
  TORCH_CHECK(k.size(2) == L, "longnet flash_cpu: band mode needs as many keys as queries, got ", k.size(2),
              " and ", L);
  TORCH_CHECK(!windows.empty() && windows.size() == phases.size(),
              "longnet flash_cpu: band mode needs one phase per window, at least one window");
  for (size_t p = 0; p < windows.size(); ++p)
    TORCH_CHECK(windows[p] >= 1 && windows[p] <= L && phases[p] >= 0 && phases[p] <= windows[p],
                "longnet flash_cpu: band windows must be clipped to 1 <= w <= L and 0 <= phase <= w, got w = ",
                windows[p], ", phase = ", phases[p], " at L = ", L);
  return Band{windows, phases, L, causal};
}

}  // namespace

// A tensor of the compute type shaped like like (4-D) or its first three dims, to add into.
void check_target(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t dims) {
  bool ok = t.device().is_cpu() && t.dim() == dims && t.scalar_type() == compute_type(like) &&
            (dims == 3 || t.stride(3) == 1);
  for (int64_t i = 0; ok && i < dims; ++i) ok = t.size(i) == like.size(i);
  TORCH_CHECK(ok, "longnet flash_cpu: ", name, " must be a CPU tensor shaped like q", dims == 3 ? "'s first three dims" : "",
              " in the compute type", dims == 4 ? " with a contiguous last dimension" : "");
}

// Laid out (Z, L, H, D) (or (Z, L, H)) in memory like the kernels' outputs, in the compute type.
at::Tensor fresh_like(const at::Tensor& q, int64_t dims, bool zero) {
  std::vector<int64_t> shape = {q.size(0), q.size(2), q.size(1)};
  if (dims == 4) shape.push_back(q.size(3));
  const auto opts = q.options().dtype(compute_type(q));
  return (zero ? at::zeros(shape, opts) : at::empty(shape, opts)).transpose(1, 2);
}

// Band mode (see Band): (out, lse) in the compute type, merged into the given out (Z, H, L, D) and
// lse (Z, H, L) in place, or fresh ones laid out (Z, L, H, D) and (Z, L, H). windows, phases: clipped to L.
std::vector<at::Tensor> band_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                 double scale, std::vector<int64_t> windows, std::vector<int64_t> phases,
                                 int64_t qB, c10::optional<at::Tensor> out, c10::optional<at::Tensor> lse) {
  check(q, "q", q), check(k, "k", q), check(v, "v", q);
  const Band band = make_band(q, k, causal, windows, phases);
  TORCH_CHECK(out.has_value() == lse.has_value(), "longnet flash_cpu: give both out and lse, or neither");
  const bool fresh = !out.has_value();
  at::Tensor o = fresh ? fresh_like(q, 4, false) : *out, l = fresh ? fresh_like(q, 3, false) : *lse;
  check_target(o, "out", q, 4), check_target(l, "lse", q, 3);
  dispatch(q, [&](auto in, auto acc) {
    using T = decltype(acc);
    band_forward<decltype(in), T>(q, k, v, band, static_cast<T>(scale), o, l, qB, fresh);
  });
  return {o, l};
}

// Band mode: (dq, dk, dv) in the compute type, added into the given ones (Z, H, L, D) in place, or
// fresh ones laid out (Z, L, H, D).
std::vector<at::Tensor> band_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                                 double scale, std::vector<int64_t> windows, std::vector<int64_t> phases, int64_t qB,
                                 c10::optional<std::vector<at::Tensor>> grads) {
  check(dout, "dout", q), check(q, "q", q), check(k, "k", q), check(v, "v", q), check(out, "out", q);
  TORCH_CHECK(lse.dim() == 3 && lse.scalar_type() == compute_type(q),
              "longnet flash_cpu: lse must be (Z, H, L) in float32 (float64 for float64 inputs)");
  const Band band = make_band(q, k, causal, windows, phases);
  std::vector<at::Tensor> g = grads.has_value() ? *grads : std::vector<at::Tensor>{};
  TORCH_CHECK(g.empty() || g.size() == 3, "longnet flash_cpu: grads must be (dq, dk, dv)");
  if (g.empty()) g = {fresh_like(q, 4, true), fresh_like(q, 4, true), fresh_like(q, 4, true)};
  check_target(g[0], "dq", q, 4), check_target(g[1], "dk", q, 4), check_target(g[2], "dv", q, 4);
  const int64_t widest = *std::max_element(windows.begin(), windows.end());
  const int64_t R = std::max<int64_t>(8, (2 * widest + qB - 1) / qB) * qB;
  dispatch(q, [&](auto in, auto acc) {
    using T = decltype(acc);
    band_backward<decltype(in), T>(dout, q, k, v, out, lse, band, static_cast<T>(scale), g[0], g[1], g[2], qB, R);
  });
  return g;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "flash attention forward: (out, lse)");
  m.def("bwd", &bwd, "flash attention backward: (dq, dk, dv)");
  m.def("band_fwd", &band_fwd, "band mode forward: (out, lse), merged into out and lse if given", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("causal"), py::arg("scale"), py::arg("windows"), py::arg("phases"),
        py::arg("qB"), py::arg("out") = py::none(), py::arg("lse") = py::none());
  m.def("band_bwd", &band_bwd, "band mode backward: (dq, dk, dv), added into grads if given", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("causal"),
        py::arg("scale"), py::arg("windows"), py::arg("phases"), py::arg("qB"), py::arg("grads") = py::none());
}
