// Flash attention on the CPU, forward and backward, for float and double.
//
// Same contract as aten::_scaled_dot_product_flash_attention_for_cpu (and its backward)
// without dropout or masks: q (Z, H, L, D), k and v (Z, H, S, D), any strides with the
// last dimension contiguous; causal is top-left aligned (query i sees keys 0..i).
// Returns out (Z, H, L, D) and lse (Z, H, L) in the input dtype.
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

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <vector>

extern "C" {
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}

namespace {

// C (M x N) = A (M x K) B (K x N) [+ C], all row-major with leading dimensions lda, ldb, ldc.
// float: oneDNN's brgemm micro-kernel through PyTorch (at::native::cpublas::brgemm), which runs
// AVX-512 on any CPU that has it; MKL's sgemm takes its AVX2 path on AMD CPUs, half the rate
// (measured 245-263 against 96-107 GFLOP/s per core on the README's AMD EPYC at this kernel's
// shapes). Where oneDNN's micro-kernel is unavailable, brgemm itself falls back to a BLAS gemm.
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
// which assumes no infinities. exp(kLow - x) is 0 for any finite score x.
template <typename T>
constexpr T kLow = T(-1e30);

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

// dst (cols x rows, leading dimension ld) = the transpose of rows x cols of src.
// Tiles of 16 rows keep the writes to each dst row contiguous and the reads in L1.
template <typename T>
void transpose(const Mat<T>& src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t d = 0; d < cols; ++d)
      for (int64_t i = i0; i < i1; ++i) dst[d * ld + i] = src.p[i * src.row + d];
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
// output per row; and this thread's transposed keys, Kt (D, S) with leading dimension S.
template <typename T>
struct RowState {
  std::vector<T> p, acc, mx, sm, kt;
  const T* Kt = nullptr;
  int64_t S = 0;  // leading dimension of Kt
  int64_t kt_slice = -1, kt_done = 0;  // (z, h) slice whose first kt_done keys are in kt
  RowState(int64_t rows, int64_t cols, int64_t d, int64_t s)
      : p(rows * cols), acc(rows * d), mx(rows), sm(rows), kt(d * keys_ld(s)), Kt(kt.data()), S(keys_ld(s)) {}

  // Make keys [0, n) of slice t (keys K) available transposed in Kt. A thread takes its tasks in
  // order (at::parallel_for hands out contiguous ranges), so each slice's keys are transposed
  // about once per thread, into a buffer that is reused rather than allocated per call.
  void keys_upto(int64_t t, const Mat<T>& K, int64_t n, int64_t D) {
    if (t != kt_slice) kt_slice = t, kt_done = 0;
    if (n <= kt_done) return;
    transpose<T>({K.p + kt_done * K.row, K.row}, n - kt_done, D, kt.data() + kt_done, S);
    kt_done = n;
  }
};

// Rows [a0, a1) of the query block at m (queries Q, state st) against keys [n0, n1), in key
// chunks of kvB columns; a row sees only keys <= itself when causal. The scale is applied in the
// softmax (the max is taken of scaled scores, so a negative scale is right too).
template <typename T>
void attend_rows(const Mat<T>& Q, const Mat<T>& V, int64_t m, int64_t a0, int64_t a1, int64_t n0, int64_t n1,
                 int64_t D, bool causal, T scale, int64_t kvB, RowState<T>& st) {
  const int64_t rows = a1 - a0;
  T* p = st.p.data() + a0 * kvB;
  T* acc = st.acc.data() + a0 * D;
  for (int64_t n = n0; n < n1; n += kvB) {
    const int64_t kb = std::min(kvB, n1 - n);
    mm(rows, kb, D, Q.p + (m + a0) * Q.row, Q.row, st.Kt + n, st.S, p, kvB, false);  // raw scores
    for (int64_t i = 0; i < rows; ++i) {
      T* row = p + i * kvB;
      const int64_t cols = visible(causal, m + a0 + i, n, kb);
      T& mx = st.mx[a0 + i];
      T rmax = mx;
      for (int64_t j = 0; j < cols; ++j) rmax = std::max(rmax, row[j] * scale);
      T s = 0;
      for (int64_t j = 0; j < cols; ++j) {
        row[j] = std::exp(row[j] * scale - rmax);
        s += row[j];
      }
      std::fill(row + cols, row + kb, T(0));
      const T corr = std::exp(mx - rmax);
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
// so the masked scores computed are one sub x sub triangle per sub-block.
template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, T scale, at::Tensor& out,
             at::Tensor& lse, int64_t qB, int64_t kvB, int64_t sub) {
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2);
  const int64_t nqb = (L + qB - 1) / qB;
  at::parallel_for(0, Z * H * nqb, 1, [&](int64_t begin, int64_t end) {
    RowState<T> st(qB, kvB, D, S);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t z = t / (H * nqb), h = (t / nqb) % H, m = (t % nqb) * qB, qb = std::min(qB, L - m);
      const Mat<T> Q = slice<T>(q, z, h), V = slice<T>(v, z, h), O = slice<T>(out, z, h);
      st.keys_upto(t / nqb, slice<T>(k, z, h), key_end(causal, m, qb, S), D);
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
        T* o = O.p + (m + i) * O.row;
        for (int64_t d = 0; d < D; ++d) o[d] = st.acc[i * D + d] * inv;
        lrow[(m + i) * lse.stride(2)] = st.mx[i] + std::log(st.sm[i]);
      }
    }
  });
}

// Per-thread buffers of the backward. Products are taken transposed (keys x queries) so that
// every one is a plain row-major A B: Kt (D, S) is the slice's keys transposed; qT, doT, dqT
// (D, qB) the query block's q, dout and dq transposed; pT, dsT (kvB, qB) probabilities and
// score gradients of one key chunk.
template <typename T>
struct Grads {
  std::vector<T> Kt, qT, doT, dqT, pT, dsT, delta;
  Grads(int64_t L, int64_t S, int64_t D, int64_t qB, int64_t kvB)
      : Kt(D * keys_ld(S)), qT(D * qB), doT(D * qB), dqT(D * qB), pT(kvB * qB), dsT(kvB * qB), delta(L) {}
};

// pT = exp(sT * scale - lse), dsT = pT * (dpT - delta) * scale for the (kb, qb) chunk of keys
// [n, n + kb) and queries [m, m + qb); key j is seen by queries m + i >= n + j when causal.
template <typename T>
void chunk_grads(T* pT, T* dsT, int64_t kb, int64_t qb, int64_t ld, int64_t m, int64_t n, bool causal, T scale,
                 const T* l, int64_t lse_step, const T* delta) {
  for (int64_t j = 0; j < kb; ++j) {
    T* pr = pT + j * ld;
    T* dr = dsT + j * ld;
    const int64_t i0 = causal ? std::min(qb, std::max<int64_t>(0, n + j - m)) : 0;
    std::fill(pr, pr + i0, T(0));
    std::fill(dr, dr + i0, T(0));
    if (lse_step == 1) {
      for (int64_t i = i0; i < qb; ++i) {
        pr[i] = std::exp(pr[i] * scale - l[m + i]);
        dr[i] = pr[i] * (dr[i] - delta[m + i]) * scale;
      }
    } else {
      for (int64_t i = i0; i < qb; ++i) {
        pr[i] = std::exp(pr[i] * scale - l[(m + i) * lse_step]);
        dr[i] = pr[i] * (dr[i] - delta[m + i]) * scale;
      }
    }
  }
}

// Gradients of one (z, h) slice. dq, dk, dv are written in full (dk, dv zeroed here first).
template <typename T>
void backward_slice(const Mat<T>& dO, const Mat<T>& Q, const Mat<T>& K, const Mat<T>& V, const Mat<T>& O,
                    const T* lse, int64_t lse_step, Mat<T> dQ, Mat<T> dK, Mat<T> dV, int64_t L, int64_t S,
                    int64_t D, bool causal, T scale, int64_t qB, int64_t kvB, Grads<T>& g) {
  for (int64_t j = 0; j < S; ++j) {
    std::fill(dK.p + j * dK.row, dK.p + j * dK.row + D, T(0));
    std::fill(dV.p + j * dV.row, dV.p + j * dV.row + D, T(0));
  }
  for (int64_t i = 0; i < L; ++i) {  // delta_i = dO_i . O_i
    T s = 0;
    for (int64_t d = 0; d < D; ++d) s += dO.p[i * dO.row + d] * O.p[i * O.row + d];
    g.delta[i] = s;
  }
  const int64_t ldk = keys_ld(S);
  transpose<T>(K, S, D, g.Kt.data(), ldk);
  for (int64_t m = 0; m < L; m += qB) {
    const int64_t qb = std::min(qB, L - m), kend = key_end(causal, m, qb, S);
    const Mat<T> q{Q.p + m * Q.row, Q.row}, dout{dO.p + m * dO.row, dO.row};
    transpose<T>(q, qb, D, g.qT.data(), qB);
    transpose<T>(dout, qb, D, g.doT.data(), qB);
    for (int64_t n = 0; n < kend; n += kvB) {
      const int64_t kb = std::min(kvB, kend - n);
      mm(kb, qb, D, K.p + n * K.row, K.row, g.qT.data(), qB, g.pT.data(), qB, false);    // scores^T
      mm(kb, qb, D, V.p + n * V.row, V.row, g.doT.data(), qB, g.dsT.data(), qB, false);  // dP^T
      chunk_grads<T>(g.pT.data(), g.dsT.data(), kb, qb, qB, m, n, causal, scale, lse, lse_step, g.delta.data());
      // dV[n:n+kb] += P^T dO;  dK[n:n+kb] += dS^T Q;  dq^T += K[n:n+kb]^T dS^T
      mm(kb, D, qb, g.pT.data(), qB, dout.p, dout.row, dV.p + n * dV.row, dV.row, true);
      mm(kb, D, qb, g.dsT.data(), qB, q.p, q.row, dK.p + n * dK.row, dK.row, true);
      mm(D, qb, kb, g.Kt.data() + n, ldk, g.dsT.data(), qB, g.dqT.data(), qB, n > 0);
    }
    if (kend == 0) std::fill(g.dqT.begin(), g.dqT.end(), T(0));
    for (int64_t i = 0; i < qb; ++i)
      for (int64_t d = 0; d < D; ++d) dQ.p[(m + i) * dQ.row + d] = g.dqT[d * qB + i];
  }
}

template <typename T>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, bool causal, T scale, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv, int64_t qB, int64_t kvB) {
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2);
  at::parallel_for(0, Z * H, 1, [&](int64_t begin, int64_t end) {
    Grads<T> g(L, S, D, qB, kvB);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t z = t / H, h = t % H;
      const T* l = lse.data_ptr<T>() + z * lse.stride(0) + h * lse.stride(1);
      backward_slice<T>(slice<T>(dout, z, h), slice<T>(q, z, h), slice<T>(k, z, h), slice<T>(v, z, h),
                        slice<T>(out, z, h), l, lse.stride(2), slice<T>(dq, z, h), slice<T>(dk, z, h),
                        slice<T>(dv, z, h), L, S, D, causal, scale, qB, kvB, g);
    }
  });
}

void check(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.stride(3) == 1 && t.scalar_type() == q.scalar_type(),
              "longnet flash_cpu: ", name, " must be a 4-D CPU tensor of q's dtype with a contiguous last dimension");
}

}  // namespace

// (out, lse); out laid out (Z, L, H, D) in memory, lse (Z, L, H), like aten's CPU kernel for strided inputs.
std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                            double scale, int64_t qB, int64_t kvB, int64_t sub) {
  check(q, "q", q), check(k, "k", q), check(v, "v", q);
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({Z, L, H, D}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({Z, L, H}, q.options()).transpose(1, 2);
  if (q.scalar_type() == at::kFloat) {
    forward<float>(q, k, v, causal, static_cast<float>(scale), out, lse, qB, kvB, sub);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kDouble, "longnet flash_cpu: float32 or float64 only");
    forward<double>(q, k, v, causal, scale, out, lse, qB, kvB, sub);
  }
  return {out, lse};
}

// (dq, dk, dv), each laid out (Z, L, H, D) in memory like aten's CPU backward.
std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, int64_t qB,
                            int64_t kvB) {
  check(dout, "dout", q), check(q, "q", q), check(k, "k", q), check(v, "v", q), check(out, "out", q);
  TORCH_CHECK(lse.dim() == 3 && lse.scalar_type() == q.scalar_type(), "longnet flash_cpu: lse must be (Z, H, L) of q's dtype");
  auto like = [](const at::Tensor& t) {
    return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
  };
  at::Tensor dq = like(q), dk = like(k), dv = like(v);
  if (q.scalar_type() == at::kFloat) {
    backward<float>(dout, q, k, v, out, lse, causal, static_cast<float>(scale), dq, dk, dv, qB, kvB);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kDouble, "longnet flash_cpu: float32 or float64 only");
    backward<double>(dout, q, k, v, out, lse, causal, scale, dq, dk, dv, qB, kvB);
  }
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "flash attention forward: (out, lse)");
  m.def("bwd", &bwd, "flash attention backward: (dq, dk, dv)");
}
