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
// query block of QB rows stops at its own last key, so the waste is the QB x QB diagonal
// triangle alone (QB / 2 scores per row).
//
// The matrix products go to the BLAS that libtorch_cpu exports (sgemm_/dgemm_, MKL in
// PyTorch's x86 wheels), called with column-major arguments: a row-major r x c matrix with
// leading dimension ld is, to BLAS, its c x r transpose with the same ld.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
}

namespace {

void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
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

// Keys a query row sees inside the key block [n, n + kb): all of them, or up to itself.
inline int64_t visible(bool causal, int64_t row, int64_t n, int64_t kb) {
  return causal ? std::max<int64_t>(0, std::min(kb, row - n + 1)) : kb;
}

// Last key (exclusive) a query block [m, m + qb) needs.
inline int64_t key_end(bool causal, int64_t m, int64_t qb, int64_t s) {
  return causal ? std::min(m + qb, s) : s;
}

// Online-softmax state of one query block: running max, sum and unnormalised output per row.
template <typename T>
struct RowState {
  std::vector<T> p, acc, mx, sm;
  RowState(int64_t rows, int64_t cols, int64_t d) : p(rows * cols), acc(rows * d), mx(rows), sm(rows) {}
};

// Rows [a0, a1) of the query block at m (queries Q, state st) against keys [n0, n1), in key
// chunks of kvB columns; a row sees only keys <= itself when causal.
template <typename T>
void attend_rows(const Mat<T>& Q, const Mat<T>& K, const Mat<T>& V, int64_t m, int64_t a0, int64_t a1,
                 int64_t n0, int64_t n1, int64_t D, bool causal, T scale, int64_t kvB, RowState<T>& st) {
  const int64_t rows = a1 - a0;
  T* p = st.p.data() + a0 * kvB;
  T* acc = st.acc.data() + a0 * D;
  for (int64_t n = n0; n < n1; n += kvB) {
    const int64_t kb = std::min(kvB, n1 - n);
    // p = scale * Q[m+a0 : m+a1] K[n : n+kb]^T, (rows, kb) row-major with leading dimension kvB
    gemm('T', 'N', kb, rows, D, scale, K.p + n * K.row, K.row, Q.p + (m + a0) * Q.row, Q.row, T(0), p, kvB);
    for (int64_t i = 0; i < rows; ++i) {
      T* row = p + i * kvB;
      const int64_t cols = visible(causal, m + a0 + i, n, kb);
      T& mx = st.mx[a0 + i];
      T rmax = mx;
      for (int64_t j = 0; j < cols; ++j) rmax = std::max(rmax, row[j]);
      T s = 0;
      for (int64_t j = 0; j < cols; ++j) {
        row[j] = std::exp(row[j] - rmax);
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
    // acc += p V[n : n+kb]
    gemm('N', 'N', D, rows, kb, T(1), V.p + n * V.row, V.row, p, kvB, T(1), acc, D);
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
    RowState<T> st(qB, kvB, D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t z = t / (H * nqb), h = (t / nqb) % H, m = (t % nqb) * qB, qb = std::min(qB, L - m);
      const Mat<T> Q = slice<T>(q, z, h), K = slice<T>(k, z, h), V = slice<T>(v, z, h), O = slice<T>(out, z, h);
      T* lrow = lse.data_ptr<T>() + z * lse.stride(0) + h * lse.stride(1);
      std::fill(st.acc.begin(), st.acc.end(), T(0));
      std::fill(st.mx.begin(), st.mx.end(), kLow<T>);
      std::fill(st.sm.begin(), st.sm.end(), T(0));
      const int64_t shared = causal ? std::min(m + 1, S) : S;  // keys < shared: seen by every row
      attend_rows<T>(Q, K, V, m, 0, qb, 0, shared, D, causal, scale, kvB, st);
      if (causal) {
        for (int64_t a = 0; a < qb; a += sub) {
          const int64_t a1 = std::min(a + sub, qb);
          attend_rows<T>(Q, K, V, m, a, a1, shared, key_end(true, m + a, a1 - a, S), D, true, scale, kvB, st);
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

// Gradients of one (z, h) slice. dq, dk, dv are written in full (zeroed here first).
template <typename T>
void backward_slice(const Mat<T>& dO, const Mat<T>& Q, const Mat<T>& K, const Mat<T>& V, const Mat<T>& O,
                    const T* lse, int64_t lse_step, Mat<T> dQ, Mat<T> dK, Mat<T> dV, int64_t L, int64_t S,
                    int64_t D, bool causal, T scale, int64_t qB, int64_t kvB, std::vector<T>& p,
                    std::vector<T>& dp, std::vector<T>& delta) {
  for (int64_t i = 0; i < L; ++i) std::fill(dQ.p + i * dQ.row, dQ.p + i * dQ.row + D, T(0));
  for (int64_t j = 0; j < S; ++j) {
    std::fill(dK.p + j * dK.row, dK.p + j * dK.row + D, T(0));
    std::fill(dV.p + j * dV.row, dV.p + j * dV.row + D, T(0));
  }
  for (int64_t i = 0; i < L; ++i) {  // delta_i = dO_i . O_i
    T s = 0;
    for (int64_t d = 0; d < D; ++d) s += dO.p[i * dO.row + d] * O.p[i * O.row + d];
    delta[i] = s;
  }
  for (int64_t m = 0; m < L; m += qB) {
    const int64_t qb = std::min(qB, L - m), kend = key_end(causal, m, qb, S);
    const T* q = Q.p + m * Q.row;
    const T* dout = dO.p + m * dO.row;
    for (int64_t n = 0; n < kend; n += kvB) {
      const int64_t kb = std::min(kvB, kend - n);
      gemm('T', 'N', kb, qb, D, scale, K.p + n * K.row, K.row, q, Q.row, T(0), p.data(), kvB);
      gemm('T', 'N', kb, qb, D, T(1), V.p + n * V.row, V.row, dout, dO.row, T(0), dp.data(), kvB);
      for (int64_t i = 0; i < qb; ++i) {
        T* prow = p.data() + i * kvB;
        T* dprow = dp.data() + i * kvB;
        const int64_t cols = visible(causal, m + i, n, kb);
        const T l = lse[(m + i) * lse_step], di = delta[m + i];
        for (int64_t j = 0; j < cols; ++j) {
          prow[j] = std::exp(prow[j] - l);        // the probabilities
          dprow[j] = prow[j] * (dprow[j] - di);   // the score gradients
        }
        std::fill(prow + cols, prow + kb, T(0));
        std::fill(dprow + cols, dprow + kb, T(0));
      }
      // dV[n:n+kb] += p^T dO;  dQ[m:m+qb] += scale ds K;  dK[n:n+kb] += scale ds^T Q
      gemm('N', 'T', D, kb, qb, T(1), dout, dO.row, p.data(), kvB, T(1), dV.p + n * dV.row, dV.row);
      gemm('N', 'N', D, qb, kb, scale, K.p + n * K.row, K.row, dp.data(), kvB, T(1), dQ.p + m * dQ.row, dQ.row);
      gemm('N', 'T', D, kb, qb, scale, q, Q.row, dp.data(), kvB, T(1), dK.p + n * dK.row, dK.row);
    }
  }
}

template <typename T>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, bool causal, T scale, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv, int64_t qB, int64_t kvB) {
  const int64_t Z = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2);
  at::parallel_for(0, Z * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(qB * kvB), dp(qB * kvB), delta(L);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t z = t / H, h = t % H;
      const T* l = lse.data_ptr<T>() + z * lse.stride(0) + h * lse.stride(1);
      backward_slice<T>(slice<T>(dout, z, h), slice<T>(q, z, h), slice<T>(k, z, h), slice<T>(v, z, h),
                        slice<T>(out, z, h), l, lse.stride(2), slice<T>(dq, z, h), slice<T>(dk, z, h),
                        slice<T>(dv, z, h), L, S, D, causal, scale, qB, kvB, p, dp, delta);
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
