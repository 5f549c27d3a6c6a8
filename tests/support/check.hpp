// SPDX-License-Identifier: MIT
// Tolerance checks for comparisons with the long-double reference. Two rules, both from the
// method the project follows (an a-priori bound and a baseline-relative bound); each failure
// prints the worst element, its bound and the shape so a failure can be read without a debugger.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "reference.hpp"

namespace mha_test {

/// Unit roundoff of Scalar: 2^-24 for float, 2^-53 for double.
template <class Scalar>
constexpr long double unit_roundoff() {
    return static_cast<long double>(std::numeric_limits<Scalar>::epsilon()) / 2;
}

/// Check A, the a-priori element-wise bound for single-head attention:
///   |O(c,i) − R(c,i)| ≤ C·u·Vmax_i·(1 + Smax_i) + u·|R(c,i)|
/// with Vmax_i the largest |value| over the keys query i may attend to, Smax_i the largest
/// magnitude of a score's terms, |scale|·Σ_c |q(c,i)·k(c,j)| + |bias(j,i)|, over those keys, and
/// C = 8: rounding analysis of softmax followed by a weighted sum gives errors of order
/// u·Vmax·(1+Smax). The standard dot-product bound is in terms of Σ|q·k|, not |q·k|: when the
/// terms cancel (small score, large entries) the computed score carries an error of order
/// u·Σ|q·k| however small the score is, and so does its weight (a fuzzed case with scores ≈ 0.5
/// built from terms ≈ 50 showed it). A calibration against long-double loops measured at most
/// 1.1 of the bound for float and double up to Lk = 4096, d = 128, so 8 leaves a margin of about
/// 7 without hiding a wrong mask (a leaked or missing key moves the output by O(Vmax), far above).
/// A query with no allowed key must be exactly 0.
template <class Scalar>
void require_attention_close(const mat<Scalar>& out, const mat<long double>& ref,
                             const mat<long double>& q, const mat<long double>& k,
                             const mat<long double>& v, long double scale,
                             const allowed_fn& allowed = allow_all(), const bias_fn& bias = nullptr,
                             const std::string& what = "") {
    REQUIRE(out.rows() == ref.rows());
    REQUIRE(out.cols() == ref.cols());
    const long double u = unit_roundoff<Scalar>();
    constexpr long double C = 8;
    // Largest |value| of each key, and raw column pointers: the same quantities as indexing
    // q(c, i) and v(c, j) for every (i, j), several times faster in a Debug build.
    std::vector<long double> value_max(static_cast<std::size_t>(v.cols()), 0.0L);
    for (Index j = 0; j < v.cols(); ++j)
        for (Index c = 0; c < v.rows(); ++c)
            value_max[static_cast<std::size_t>(j)] = std::max(
                value_max[static_cast<std::size_t>(j)], std::fabs(v.data()[j * v.rows() + c]));
    for (Index i = 0; i < ref.cols(); ++i) {
        long double vmax = 0, smax = 0;
        bool any = false;
        const long double* qi = q.data() + i * q.rows();
        for (Index j = 0; j < k.cols(); ++j) {
            if (!allowed(j, i)) continue;
            long double b = bias ? bias(j, i) : 0.0L;
            if (b == -std::numeric_limits<long double>::infinity()) continue;
            any = true;
            const long double* kj = k.data() + j * k.rows();
            long double magnitude = 0;  // Σ|q·k|: the scale of the dot product's rounding error
            for (Index c = 0; c < q.rows(); ++c)
                magnitude += std::fabs(qi[c] * kj[c]);
            smax = std::max(smax, std::fabs(scale) * magnitude + std::fabs(b));
            vmax = std::max(vmax, value_max[static_cast<std::size_t>(j)]);
        }
        for (Index c = 0; c < ref.rows(); ++c) {
            const long double o = static_cast<long double>(out(c, i));
            if (!any) {
                if (o != 0.0L) {
                    std::ostringstream m;
                    m << what << ": query " << i << " has no key to attend to, but out(" << c
                      << ", " << i << ") = " << o << " (must be exactly 0)";
                    FAIL(m.str());
                }
                continue;
            }
            const long double err = std::fabs(o - ref(c, i));
            const long double bound = C * u * vmax * (1 + smax) + u * std::fabs(ref(c, i));
            if (!(err <= bound)) {
                std::ostringstream m;
                m << what << ": |out - ref| = " << err << " > bound " << bound << " at (" << c
                  << ", " << i << "); out = " << o << ", ref = " << ref(c, i) << ", Vmax = " << vmax
                  << ", Smax = " << smax << ", shape " << ref.rows() << "x" << ref.cols();
                FAIL(m.str());
            }
        }
    }
    SUCCEED();
}

/// The relative error bound of the exp the native bf16 kernel uses for its probabilities
/// (exp_nonpositive_for_bf16: the quadratic's 1.7e-6, the one-constant reduction's 2.4e-7 and a
/// few fp32 roundings; 2.0e-6 measured).
inline constexpr long double bf16_exp_error = 2.5e-6L;

/// Check A for bfloat16 storage (Q, K, V in bf16; scores, softmax and sums in fp32; P rounded to
/// bf16 for P·V), against the long-double reference computed from the same bf16 values, so only
/// the kernel's own roundings count. With u_b = 2^-8 (bf16) and u = 2^-24 (fp32), per query i:
///   |O(c,i) − R(c,i)| ≤ [u_b + γ_{Lk+1} + 2·γ_{dk+1}·Smax_i + 8·u·(1 + Smax_i) + 2·e_x]·Vmax_i
///                       + (u + u_o)·|R(c,i)|
/// Vmax_i, Smax_i as in require_attention_close, γ_n = n·u/(1 − n·u), u_o = u_b for a bf16
/// output (one more rounding) and 0 for fp32. The terms:
///   - P rounded to bf16 (nearest-even): p̃_j = p_j(1 + δ_j), |δ_j| ≤ u_b, while l sums the fp32
///     p_j; the output moves by Σ_j p_j·δ_j·v_j / l, at most u_b·Σ_j p_j|v_j| / l ≤ u_b·Vmax_i;
///   - P·V summed in fp32 over at most Lk keys (plus the rescaling): γ_{Lk+1}·Vmax_i;
///   - the scores: bf16 products are exact in fp32, their sum of d_k terms and the scale err by
///     γ_{dk+1}·Smax_i; an error δ in the scores changes every weight by a factor within
///     exp(±2δ) (numerator and normaliser), hence 2·γ_{dk+1}·Smax_i·Vmax_i to first order;
///   - exp, max, sums and the division in fp32: check A's fp32 term 8·u·(1 + Smax_i)·Vmax_i;
///   - the native kernel's exp for the probabilities it rounds to bf16
///     (exp_nonpositive_for_bf16) errs by at most e_x = 2.5e-6 relative (measured in
///     test_bf16_attention); the same factor enters the numerator and l, so the output moves by at
///     most 2·e_x·Vmax_i.
/// The P term dominates (2^-8 ≈ 0.0039 of Vmax). A leaked or missing key still moves an output
/// by O(Vmax), far above. A query with no allowed key must be exactly 0.
template <class Out>
void require_bf16_attention_close(const mat<Out>& out, const mat<long double>& ref,
                                  const mat<long double>& q, const mat<long double>& k,
                                  const mat<long double>& v, long double scale,
                                  const allowed_fn& allowed = allow_all(),
                                  const bias_fn& bias = nullptr, const std::string& what = "",
                                  bool bf16_output = false) {
    REQUIRE(out.rows() == ref.rows());
    REQUIRE(out.cols() == ref.cols());
    const long double ub = 0x1.0p-8L, u = 0x1.0p-24L;
    const long double uo = bf16_output ? ub : 0.0L;
    auto gamma = [u](Index n) {
        const long double nu = static_cast<long double>(n) * u;
        return nu / (1 - nu);
    };
    const long double g_keys = gamma(k.cols() + 1), g_dot = gamma(q.rows() + 1);
    std::vector<long double> value_max(static_cast<std::size_t>(v.cols()), 0.0L);
    for (Index j = 0; j < v.cols(); ++j)
        for (Index c = 0; c < v.rows(); ++c)
            value_max[static_cast<std::size_t>(j)] =
                std::max(value_max[static_cast<std::size_t>(j)], std::fabs(v(c, j)));
    for (Index i = 0; i < ref.cols(); ++i) {
        const long double* qi = q.data() + i * q.rows();
        long double vmax = 0, smax = 0;
        bool any = false;
        for (Index j = 0; j < k.cols(); ++j) {
            if (!allowed(j, i)) continue;
            const long double b = bias ? bias(j, i) : 0.0L;
            if (b == -std::numeric_limits<long double>::infinity()) continue;
            any = true;
            const long double* kj = k.data() + j * k.rows();
            long double magnitude = 0;
            for (Index c = 0; c < q.rows(); ++c)
                magnitude += std::fabs(qi[c] * kj[c]);
            smax = std::max(smax, std::fabs(scale) * magnitude + std::fabs(b));
            vmax = std::max(vmax, value_max[static_cast<std::size_t>(j)]);
        }
        for (Index c = 0; c < ref.rows(); ++c) {
            const long double o = static_cast<long double>(static_cast<float>(out(c, i)));
            if (!any) {
                if (o != 0.0L) {
                    std::ostringstream m;
                    m << what << ": query " << i << " has no key to attend to, but out(" << c
                      << ", " << i << ") = " << o << " (must be exactly 0)";
                    FAIL(m.str());
                }
                continue;
            }
            const long double err = std::fabs(o - ref(c, i));
            const long double bound =
                (ub + g_keys + 2 * g_dot * smax + 8 * u * (1 + smax) + 2 * bf16_exp_error) * vmax +
                (u + uo) * std::fabs(ref(c, i));
            if (!(err <= bound)) {
                std::ostringstream m;
                m << what << ": |out - ref| = " << err << " > bound " << bound << " at (" << c
                  << ", " << i << "); out = " << o << ", ref = " << ref(c, i) << ", Vmax = " << vmax
                  << ", Smax = " << smax << ", shape " << ref.rows() << "x" << ref.cols();
                FAIL(m.str());
            }
        }
    }
    SUCCEED();
}

/// Check B, the baseline-relative rule: the implementation may be at most `k` times as far from
/// the long-double reference R as the plain-loop evaluation in Scalar (R_lp, same algorithm,
/// every operation rounded to Scalar) is, plus a floor of twice the rounding noise of R itself:
///   max|O − R| ≤ k·max|R_lp − R| + 2·max|fl(fl(R + 0.3) − 0.3) − R|.
/// The floor keeps the rule meaningful when R_lp happens to be exact. k = 2 follows the forward
/// rule used by FlashAttention's and PyTorch's fused-kernel tests.
template <class Scalar>
void require_within_baseline(const mat<Scalar>& out, const mat<long double>& ref,
                             const mat<Scalar>& baseline, long double k = 2,
                             const std::string& what = "") {
    REQUIRE(out.rows() == ref.rows());
    REQUIRE(out.cols() == ref.cols());
    REQUIRE(baseline.rows() == ref.rows());
    REQUIRE(baseline.cols() == ref.cols());
    long double err = 0, base = 0, noise = 0;
    Index wr = 0, wc = 0;
    for (Index c = 0; c < ref.cols(); ++c)
        for (Index r = 0; r < ref.rows(); ++r) {
            const long double e = std::fabs(static_cast<long double>(out(r, c)) - ref(r, c));
            if (!(e <= err)) {  // also catches NaN
                err = e;
                wr = r;
                wc = c;
            }
            base = std::max(base, std::fabs(static_cast<long double>(baseline(r, c)) - ref(r, c)));
            const Scalar shifted =
                static_cast<Scalar>(static_cast<Scalar>(ref(r, c)) + Scalar(0.3));
            const Scalar back = static_cast<Scalar>(shifted - Scalar(0.3));
            noise = std::max(noise, std::fabs(static_cast<long double>(back) - ref(r, c)));
        }
    const long double bound = k * base + 2 * noise;
    std::ostringstream m;
    m << what << ": max|out - ref| = " << err << " at (" << wr << ", " << wc << "), baseline error "
      << base << ", floor " << 2 * noise << ", bound " << bound << ", shape " << ref.rows() << "x"
      << ref.cols();
    INFO(m.str());
    CHECK(err <= bound);
}

/// Largest |a − b| (NaN if any element differs by NaN).
template <class A, class B>
long double max_abs_diff(const A& a, const B& b) {
    long double worst = 0;
    for (Index c = 0; c < a.cols(); ++c)
        for (Index r = 0; r < a.rows(); ++r) {
            const long double d =
                std::fabs(static_cast<long double>(a(r, c)) - static_cast<long double>(b(r, c)));
            if (!(d <= worst)) worst = d;
        }
    return worst;
}

/// Check G, the a-priori bound for a projection y = w·x + b: a dot product of length n summed in
/// any order, with or without FMA, errs by at most γ_n·Σ|w·x| with γ_n = n·u / (1 − n·u)
/// (Higham, Accuracy and Stability of Numerical Algorithms, §3.1); the bias adds one more
/// rounding, hence γ_(n+1)·(Σ_c |w(r,c)·x(c,j)| + |b(r)|) per element. This is a proof, not a
/// calibration, so it holds for every compiler, flag and blocking (check B's ratio to a
/// plain-loop baseline does not: clang's GEMM measured 2.9 times the loops' error on a 5×7 case).
template <class Scalar>
void require_linear_within_bound(const mat<Scalar>& out, const mat<Scalar>& w, const vec<Scalar>& b,
                                 const mat<Scalar>& x, const std::string& what = "") {
    REQUIRE(out.rows() == w.rows());
    REQUIRE(out.cols() == x.cols());
    const long double u = unit_roundoff<Scalar>();
    const long double n = static_cast<long double>(w.cols() + 1);
    const long double gamma = n * u / (1 - n * u);
    for (Index j = 0; j < x.cols(); ++j)
        for (Index r = 0; r < w.rows(); ++r) {
            long double exact = b.size() ? static_cast<long double>(b(r)) : 0.0L;
            long double magnitude = std::fabs(exact);
            for (Index c = 0; c < w.cols(); ++c) {
                const long double t =
                    static_cast<long double>(w(r, c)) * static_cast<long double>(x(c, j));
                exact += t;
                magnitude += std::fabs(t);
            }
            const long double err = std::fabs(static_cast<long double>(out(r, j)) - exact);
            if (!(err <= gamma * magnitude)) {
                std::ostringstream m;
                m << what << ": |out - ref| = " << err << " > " << gamma * magnitude << " at (" << r
                  << ", " << j << "), n = " << w.cols() << ", shape " << out.rows() << "x"
                  << out.cols();
                FAIL(m.str());
            }
        }
    SUCCEED();
}

/// γ_n = n·u/(1 − n·u) for fp32 (u = 2⁻²⁴): the bound of an fp32 sum of n terms, relative to
/// the sum of their magnitudes.
inline long double fp32_gamma(Index n) {
    const long double nu = static_cast<long double>(n) * 0x1.0p-24L;
    return nu / (1 - nu);
}

/// The long-double result w·x + b of a projection on bfloat16 storage, from the same bf16 (or
/// fp32) values, and the magnitude Σ|w·x| + |b| of each output.
struct bf16_linear_reference {
    mat<long double> value, magnitude;
};

/// w: d_out × d_in, b: d_out or size 0, x: d_in × N; any scalar that converts to float exactly
/// (bf16 or float).
template <class W, class B, class X>
bf16_linear_reference bf16_linear_reference_of(const W& w, const B& b, const X& x) {
    auto wide = [](auto v) { return static_cast<long double>(static_cast<float>(v)); };
    const Index m = w.rows(), n = x.cols(), k = w.cols();
    bf16_linear_reference r{mat<long double>::Zero(m, n), mat<long double>::Zero(m, n)};
    // Widened once, W transposed, so that both factors of a sum lie in contiguous columns: the
    // same products in the same order, several times faster in the Debug and sanitizer builds.
    mat<long double> wt(k, m), xl(k, n);
    for (Index i = 0; i < m; ++i)
        for (Index q = 0; q < k; ++q)
            wt(q, i) = wide(w(i, q));
    for (Index j = 0; j < n; ++j)
        for (Index q = 0; q < k; ++q)
            xl(q, j) = wide(x(q, j));
    for (Index j = 0; j < n; ++j)
        for (Index i = 0; i < m; ++i) {
            const long double* wi = wt.data() + i * k;
            const long double* xj = xl.data() + j * k;
            long double s = b.size() != 0 ? wide(b(i)) : 0;
            long double a = std::fabs(s);
            for (Index q = 0; q < k; ++q) {
                const long double t = wi[q] * xj[q];
                s += t;
                a += std::fabs(t);
            }
            r.value(i, j) = s;
            r.magnitude(i, j) = a;
        }
    return r;
}

/// The bound of a projection on bfloat16 storage (mha::linear with bf16 w and x, d_in = `k`)
/// against the long-double reference of the same values. A product of two bf16 is exact in fp32
/// (8 + 8 significand bits), so each output is an fp32 sum of d_in exact products started from
/// the bias: d_in + 1 terms, within γ_{d_in+1}·S of the exact sum, S = Σ_q |w(i,q)·x(q,j)| +
/// |b(i)| (recursive summation in any order or blocking). A bf16 output is that result rounded
/// once more: |bf16(c) − r| ≤ (1 + u_b)·γ·S + u_b·|r|, u_b = 2⁻⁸. A wrong pair, a missed block
/// or a dropped row moves an output by a whole term |w·x|, far above γ·S.
template <class Out>
void require_bf16_linear_close(const Out& out, const bf16_linear_reference& r, Index k,
                               bool bf16_output, const std::string& what) {
    REQUIRE(out.rows() == r.value.rows());
    REQUIRE(out.cols() == r.value.cols());
    const long double ub = bf16_output ? 0x1.0p-8L : 0.0L, g = fp32_gamma(k + 1);
    for (Index j = 0; j < out.cols(); ++j)
        for (Index i = 0; i < out.rows(); ++i) {
            const long double o = static_cast<long double>(static_cast<float>(out(i, j)));
            const long double err = std::fabs(o - r.value(i, j));
            const long double bound =
                (1 + ub) * g * r.magnitude(i, j) + ub * std::fabs(r.value(i, j));
            if (!(err <= bound)) {
                std::ostringstream msg;
                msg << what << ": |out - ref| = " << err << " > " << bound << " at (" << i << ", "
                    << j << "), out = " << o << ", ref = " << r.value(i, j) << ", shape "
                    << out.rows() << "x" << k << "x" << out.cols();
                FAIL(msg.str());
            }
        }
    SUCCEED();
}

}  // namespace mha_test
