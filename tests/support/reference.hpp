// SPDX-License-Identifier: MIT
// An independent, deliberately plain reference for every kernel: triple loops, no Eigen products,
// masks given as explicit predicates (never through the library's mask types), a max-subtracted
// softmax, and a fully masked query giving 0. Templated on the arithmetic type T so that the same
// code yields the high-precision reference R (T = long double) and the low-precision baseline
// R_lp (T = the tested Scalar) that the tolerance rule of tests/support/check.hpp compares with.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include <Eigen/Core>

namespace mha_test {

using Eigen::Index;

template <class T>
using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
template <class T>
using vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// allowed(j, i): may query i attend to key j. bias(j, i): added to the scaled score.
using allowed_fn = std::function<bool(Index j, Index i)>;
using bias_fn = std::function<long double(Index j, Index i)>;

inline allowed_fn allow_all() {
    return [](Index, Index) { return true; };
}
/// Bottom-right causal: query i of Lq sees key j of Lk iff j <= i + (Lk - Lq).
inline allowed_fn causal_bottom_right(Index lq, Index lk) {
    return [=](Index j, Index i) { return j <= i + (lk - lq); };
}
/// Top-left causal: j <= i.
inline allowed_fn causal_top_left() {
    return [](Index j, Index i) { return j <= i; };
}

enum class norm_kind { softmax, relu, sigmoid };

/// Normalises one query's scores over its allowed keys (written with plain loops).
template <class T>
void reference_normalize(std::vector<T>& s, const std::vector<bool>& ok, norm_kind kind) {
    const std::size_t n = s.size();
    bool any = false;
    for (std::size_t j = 0; j < n; ++j)
        any = any || ok[j];
    if (!any) {
        for (auto& x : s)
            x = T(0);
        return;
    }
    if (kind == norm_kind::softmax) {
        T m = -std::numeric_limits<T>::infinity();
        for (std::size_t j = 0; j < n; ++j)
            if (ok[j] && (s[j] > m || std::isnan(s[j]))) m = s[j];
        T sum = 0;
        for (std::size_t j = 0; j < n; ++j) {
            s[j] = ok[j] ? std::exp(s[j] - m) : T(0);
            sum += s[j];
        }
        for (auto& x : s)
            x /= sum;
    } else if (kind == norm_kind::relu) {
        T sum = 0;
        for (std::size_t j = 0; j < n; ++j) {
            s[j] = ok[j] ? (s[j] > T(0) || std::isnan(s[j]) ? s[j] : T(0)) : T(0);
            sum += s[j];
        }
        if (sum > T(0) || std::isnan(sum))
            for (auto& x : s)
                x /= sum;
        else
            for (auto& x : s)
                x = T(0);
    } else {
        for (std::size_t j = 0; j < n; ++j)
            s[j] = ok[j] ? T(1) / (T(1) + std::exp(-s[j])) : T(0);
    }
}

/// Single-head attention: q (dk × Lq), k (dk × Lk), v (dv × Lk) → dv × Lq; optionally the
/// Lk × Lq weights. A key whose bias is −∞ counts as excluded.
template <class T>
mat<T> reference_attention(const mat<T>& q, const mat<T>& k, const mat<T>& v, T scale,
                           const allowed_fn& allowed = allow_all(), const bias_fn& bias = nullptr,
                           norm_kind kind = norm_kind::softmax, mat<T>* weights = nullptr) {
    const Index lq = q.cols(), lk = k.cols(), dk = q.rows(), dv = v.rows();
    mat<T> out = mat<T>::Zero(dv, lq);
    if (weights) *weights = mat<T>::Zero(lk, lq);
    for (Index i = 0; i < lq; ++i) {
        // Pointers to the columns q(:, i), k(:, j), v(:, j) and out(:, i): the same entries as
        // indexing, several times faster in the Debug and sanitizer builds.
        const T* qi = q.data() + i * dk;
        T* oi = out.data() + i * dv;
        std::vector<T> s(static_cast<std::size_t>(lk), T(0));
        std::vector<bool> ok(static_cast<std::size_t>(lk), false);
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            ok[jj] = allowed(j, i);
            if (!ok[jj]) continue;
            const T* kj = k.data() + j * dk;
            T dot = 0;
            for (Index c = 0; c < dk; ++c)
                dot += qi[c] * kj[c];
            s[jj] = dot * scale;
            if (bias) {
                const long double b = bias(j, i);
                if (b == -std::numeric_limits<long double>::infinity())
                    ok[jj] = false;
                else
                    s[jj] += static_cast<T>(b);
            }
        }
        reference_normalize(s, ok, kind);
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            if (weights) (*weights)(j, i) = s[jj];
            if (!ok[jj]) continue;  // excluded values are never read
            const T* vj = v.data() + j * dv;
            for (Index c = 0; c < dv; ++c)
                oi[c] += s[jj] * vj[c];
        }
    }
    return out;
}

/// Changes to the scores between scale and mask, as the reference applies them: soft-capping
/// (cap·tanh(s/cap), cap 0: none), an ALiBi slope (slope·(j − i − (Lk − Lq))), a caller's
/// modifier (i, j, s) → s (−∞ excludes the key), and a sink logit in the softmax normaliser.
struct score_terms {
    long double softcap = 0;
    bool alibi = false;
    long double slope = 0;
    std::function<long double(Index i, Index j, long double s)> modifier = nullptr;
    bool sink = false;
    long double sink_logit = 0;
};

/// The score terms of query head h under `options` (an mha::attention_options: soft-capping,
/// ALiBi slopes and sinks, each absent when unset or empty); a template so that this reference
/// does not include the library.
template <class Options>
score_terms score_terms_of(const Options& options, Index h) {
    score_terms terms;
    if (options.softcap) terms.softcap = *options.softcap;
    terms.alibi = !options.alibi_slopes.empty();
    if (terms.alibi) terms.slope = options.alibi_slopes[static_cast<std::size_t>(h)];
    terms.sink = !options.sinks.empty();
    if (terms.sink) terms.sink_logit = options.sinks[static_cast<std::size_t>(h)];
    return terms;
}

/// What soft-capping, ALiBi and the sink add to the magnitude of the score of key j for query
/// i, where shift = Lk − Lq: cap + |slope·(j − i − shift)| + |sink|. The bounds add it to Smax,
/// since each term adds O(u) of its own magnitude to a score's error. The modifier is not
/// included: its magnitude depends on the score.
inline long double term_magnitude(const score_terms& terms, Index j, Index i, Index shift) {
    long double m = terms.softcap + std::fabs(terms.sink_logit);
    if (terms.alibi) m += std::fabs(terms.slope * static_cast<long double>(j - i - shift));
    return m;
}

/// Single-head attention with score terms, in the order scale → soft-cap → ALiBi → modifier →
/// bias → mask → normalise (sink in the softmax normaliser). Written apart from
/// reference_attention so that the plain path stays as it was. A query with no allowed key gets
/// output 0 and weights 0; its log-sum-exp is the sink logit (−∞ without a sink).
template <class T>
mat<T> reference_attention_terms(const mat<T>& q, const mat<T>& k, const mat<T>& v, T scale,
                                 const score_terms& terms, const allowed_fn& allowed = allow_all(),
                                 const bias_fn& bias = nullptr, norm_kind kind = norm_kind::softmax,
                                 mat<T>* weights = nullptr, vec<T>* lse = nullptr) {
    const Index lq = q.cols(), lk = k.cols(), dk = q.rows(), dv = v.rows();
    const T minus_inf = -std::numeric_limits<T>::infinity();
    mat<T> out = mat<T>::Zero(dv, lq);
    if (weights) *weights = mat<T>::Zero(lk, lq);
    if (lse) *lse = vec<T>::Constant(lq, minus_inf);
    for (Index i = 0; i < lq; ++i) {
        // Pointers to the columns q(:, i), k(:, j), v(:, j) and out(:, i): the same entries as
        // indexing, several times faster in the Debug and sanitizer builds.
        const T* qi = q.data() + i * dk;
        T* oi = out.data() + i * dv;
        std::vector<T> s(static_cast<std::size_t>(lk), T(0));
        std::vector<bool> ok(static_cast<std::size_t>(lk), false);
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            ok[jj] = allowed(j, i);
            if (!ok[jj]) continue;
            const T* kj = k.data() + j * dk;
            T dot = 0;
            for (Index c = 0; c < dk; ++c)
                dot += qi[c] * kj[c];
            T x = dot * scale;
            if (terms.softcap != 0) {
                const T cap = static_cast<T>(terms.softcap);
                x = cap * std::tanh(x / cap);
            }
            if (terms.alibi) x += static_cast<T>(terms.slope) * static_cast<T>(j - i - (lk - lq));
            if (terms.modifier) x = static_cast<T>(terms.modifier(i, j, x));
            if (bias) x += static_cast<T>(bias(j, i));
            if (x == minus_inf) ok[jj] = false;
            s[jj] = x;
        }
        if (kind == norm_kind::softmax) {
            T m = terms.sink ? static_cast<T>(terms.sink_logit) : minus_inf;
            for (Index j = 0; j < lk; ++j) {
                const auto jj = static_cast<std::size_t>(j);
                if (ok[jj] && (s[jj] > m || std::isnan(s[jj]))) m = s[jj];
            }
            if (m == minus_inf) {  // nothing to attend to and no sink
                for (auto& x : s)
                    x = T(0);
            } else {
                T sum = terms.sink ? std::exp(static_cast<T>(terms.sink_logit) - m) : T(0);
                for (Index j = 0; j < lk; ++j) {
                    const auto jj = static_cast<std::size_t>(j);
                    s[jj] = ok[jj] ? std::exp(s[jj] - m) : T(0);
                    sum += s[jj];
                }
                for (auto& x : s)
                    x /= sum;
                if (lse) (*lse)(i) = m + std::log(sum);
            }
        } else {
            reference_normalize(s, ok, kind);
        }
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            if (weights) (*weights)(j, i) = s[jj];
            if (!ok[jj]) continue;  // excluded values are never read
            const T* vj = v.data() + j * dv;
            for (Index c = 0; c < dv; ++c)
                oi[c] += s[jj] * vj[c];
        }
    }
    return out;
}

/// y = w·x + b with plain loops (b may be empty).
template <class T>
mat<T> reference_linear(const mat<T>& w, const vec<T>& b, const mat<T>& x) {
    // Read through pointers (column-major, no padding): the unoptimised sanitizer builds spend
    // most of this function in Eigen's coefficient accessors otherwise.
    const Index rows = w.rows(), width = w.cols();
    eigen_assert(x.rows() == width && (b.size() == 0 || b.size() == rows));
    mat<T> y(rows, x.cols());
    for (Index n = 0; n < x.cols(); ++n) {
        const T* xn = x.data() + n * width;
        for (Index r = 0; r < rows; ++r) {
            T acc = b.size() ? b(r) : T(0);
            for (Index c = 0; c < width; ++c)
                acc += w.data()[r + c * rows] * xn[c];
            y(r, n) = acc;
        }
    }
    return y;
}

/// The rotary turn of one head's rows [0, r) at `position`, written from the formula,
/// independent of mha/rotary.hpp: pair (a, b) = (i, i + r/2) in the half-split layout,
/// (2i, 2i + 1) interleaved, turned by the angle position·base^(−2i/r), formed in long double.
/// Calls turn(a, b, cos, sin) once per pair, in long double.
template <class Turn>
void for_each_rotary_pair(Index r, long double base, bool interleaved, Index position,
                          Turn&& turn) {
    for (Index i = 0; i < r / 2; ++i) {
        const long double angle =
            static_cast<long double>(position) *
            std::pow(base, -2.0L * static_cast<long double>(i) / static_cast<long double>(r));
        turn(interleaved ? 2 * i : i, interleaved ? 2 * i + 1 : i + r / 2, std::cos(angle),
             std::sin(angle));
    }
}

/// Parameters of a layer in the reference's own form.
template <class T>
struct reference_params {
    mat<T> w_q, w_k, w_v, w_o;
    vec<T> b_q, b_k, b_v, b_o;

    template <class U>
    reference_params<U> cast() const {
        return {w_q.template cast<U>(), w_k.template cast<U>(), w_v.template cast<U>(),
                w_o.template cast<U>(), b_q.template cast<U>(), b_k.template cast<U>(),
                b_v.template cast<U>(), b_o.template cast<U>()};
    }
};

/// The key/value head that query head h of `heads` reads when `kv_heads` key/value heads are
/// shared (grouped-query attention): consecutive query heads form groups of heads / kv_heads,
/// and group g reads key/value head g. Written as a search over the groups, not as the
/// library's division, so that the two are independent.
inline Index reference_kv_head(Index h, Index heads, Index kv_heads) {
    const Index group_size = heads / kv_heads;
    for (Index g = 0; g < kv_heads; ++g)
        if (h >= g * group_size && h < (g + 1) * group_size) return g;
    return -1;  // h out of range: the caller's slicing then fails loudly
}

/// The layer on one sequence: per query head h, attention of its rows of Q on the rows of its
/// key/value head (reference_kv_head; kv_heads = 0 means one per query head); heads
/// concatenated; projected. W_k and W_v have kv_heads·d_k and kv_heads·d_v rows. allowed/bias
/// take (query head, j, i). Optionally returns each query head's weights.
template <class T>
mat<T> reference_layer(const reference_params<T>& p, Index heads, const mat<T>& xq,
                       const mat<T>& xk, const mat<T>& xv, T scale,
                       const std::function<bool(Index, Index, Index)>& allowed = nullptr,
                       const std::function<long double(Index, Index, Index)>& bias = nullptr,
                       norm_kind kind = norm_kind::softmax,
                       std::vector<mat<T>>* head_weights = nullptr, Index kv_heads = 0) {
    if (kv_heads == 0) kv_heads = heads;
    const mat<T> q = reference_linear(p.w_q, p.b_q, xq);
    const mat<T> k = reference_linear(p.w_k, p.b_k, xk);
    const mat<T> v = reference_linear(p.w_v, p.b_v, xv);
    const Index dk = q.rows() / heads, dv = v.rows() / kv_heads;
    mat<T> concat(heads * dv, xq.cols());
    if (head_weights) head_weights->clear();
    // Rows [start, start + n) as a copy. A matrix without columns may have a null data pointer,
    // and a row block of it would offset that pointer (undefined; clang's UBSan reports it).
    const auto rows = [](const mat<T>& m, Index start, Index n) {
        return m.cols() == 0 ? mat<T>(n, 0) : mat<T>(m.middleRows(start, n));
    };
    for (Index h = 0; h < heads; ++h) {
        const Index g = reference_kv_head(h, heads, kv_heads);
        allowed_fn a = allowed ? allowed_fn([&, h](Index j, Index i) { return allowed(h, j, i); })
                               : allow_all();
        bias_fn bf = bias ? bias_fn([&, h](Index j, Index i) { return bias(h, j, i); }) : nullptr;
        mat<T> w;
        const mat<T> head = reference_attention<T>(rows(q, h * dk, dk), rows(k, g * dk, dk),
                                                   rows(v, g * dv, dv), scale, a, bf, kind, &w);
        if (concat.cols() != 0) concat.middleRows(h * dv, dv) = head;
        if (head_weights) head_weights->push_back(w);
    }
    return reference_linear(p.w_o, p.b_o, concat);
}

/// The gradients of single-head attention (reference_attention) for an output gradient d_out.
template <class T>
struct reference_gradients {
    mat<T> dq;      // dk × Lq
    mat<T> dk;      // dk × Lk
    mat<T> dv;      // dv × Lk
    mat<T> dscore;  // Lk × Lq: ∂loss/∂(scaled score + bias), 0 where a key is excluded
};

/// ∂w_j/∂s_l of one query's normalisation at its scores s (allowed keys ok, weights w), written
/// out entry by entry from the definitions (not from the library's vectorised forms):
///   softmax: w_j·(δ_jl − w_l);  sigmoid: δ_jl·w_j·(1 − w_j);
///   relu: with r = max(s, 0) and Σ = Σ r > 0, [s_l > 0]·(δ_jl/Σ − r_j/Σ²), and 0 if Σ ≤ 0
///   (the weights are then the constant 0).
template <class T>
T reference_weight_derivative(const std::vector<T>& s, const std::vector<bool>& ok,
                              const std::vector<T>& w, std::size_t j, std::size_t l,
                              norm_kind kind) {
    if (!ok[j] || !ok[l]) return T(0);
    const T delta = j == l ? T(1) : T(0);
    if (kind == norm_kind::softmax) return w[j] * (delta - w[l]);
    if (kind == norm_kind::sigmoid) return delta * w[j] * (T(1) - w[j]);
    T sum = 0;
    for (std::size_t m = 0; m < s.size(); ++m)
        if (ok[m] && s[m] > T(0)) sum += s[m];
    if (!(sum > T(0)) || !(s[l] > T(0))) return T(0);
    const T r_j = s[j] > T(0) ? s[j] : T(0);
    return delta / sum - r_j / (sum * sum);
}

/// The chain rule through reference_attention, per query: recompute its scores and weights,
/// dW_j = Σ_c d_out(c,i)·v(c,j), dS_l = Σ_j dW_j·∂w_j/∂s_l, then dV(·,j) += w_j·d_out(·,i),
/// dQ(·,i) += scale·Σ_l dS_l·k(·,l), dK(·,l) += scale·dS_l·q(·,i). Quadratic in Lk per query:
/// small shapes only.
template <class T>
reference_gradients<T> reference_attention_backward(const mat<T>& q, const mat<T>& k,
                                                    const mat<T>& v, const mat<T>& d_out, T scale,
                                                    const allowed_fn& allowed = allow_all(),
                                                    const bias_fn& bias = nullptr,
                                                    norm_kind kind = norm_kind::softmax) {
    const Index lq = q.cols(), lk = k.cols(), dk = q.rows(), dv = v.rows();
    reference_gradients<T> g{mat<T>::Zero(dk, lq), mat<T>::Zero(dk, lk), mat<T>::Zero(dv, lk),
                             mat<T>::Zero(lk, lq)};
    const auto n = static_cast<std::size_t>(lk);
    for (Index i = 0; i < lq; ++i) {
        std::vector<T> s(n, T(0));
        std::vector<bool> ok(n, false);
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            ok[jj] = allowed(j, i);
            if (!ok[jj]) continue;
            T dot = 0;
            for (Index c = 0; c < dk; ++c)
                dot += q(c, i) * k(c, j);
            s[jj] = dot * scale;
            if (bias) {
                const long double b = bias(j, i);
                if (b == -std::numeric_limits<long double>::infinity())
                    ok[jj] = false;
                else
                    s[jj] += static_cast<T>(b);
            }
        }
        std::vector<T> w = s;
        reference_normalize(w, ok, kind);
        std::vector<T> dw(n, T(0));
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            if (!ok[jj]) continue;
            for (Index c = 0; c < dv; ++c) {
                dw[jj] += d_out(c, i) * v(c, j);
                g.dv(c, j) += w[jj] * d_out(c, i);
            }
        }
        for (Index l = 0; l < lk; ++l) {
            const auto ll = static_cast<std::size_t>(l);
            T ds = 0;
            for (std::size_t j = 0; j < n; ++j)
                ds += dw[j] * reference_weight_derivative(s, ok, w, j, ll, kind);
            g.dscore(l, i) = ds;
            if (!ok[ll]) continue;  // an excluded key's columns are never read
            for (Index c = 0; c < dk; ++c) {
                g.dq(c, i) += scale * ds * k(c, l);
                g.dk(c, l) += scale * ds * q(c, i);
            }
        }
    }
    return g;
}

/// The gradients of y = w·x + b for dy, with plain loops: dw = dy·xᵀ, db = dy·1 (empty when
/// `bias` is false), dx = wᵀ·dy.
template <class T>
void reference_linear_backward(const mat<T>& w, bool bias, const mat<T>& x, const mat<T>& dy,
                               mat<T>& dw, vec<T>& db, mat<T>& dx) {
    dw = mat<T>::Zero(w.rows(), w.cols());
    db = bias ? vec<T>(vec<T>::Zero(w.rows())) : vec<T>();
    dx = mat<T>::Zero(w.cols(), x.cols());
    for (Index n = 0; n < x.cols(); ++n)
        for (Index r = 0; r < w.rows(); ++r) {
            if (bias) db(r) += dy(r, n);
            for (Index c = 0; c < w.cols(); ++c) {
                dw(r, c) += dy(r, n) * x(c, n);
                dx(c, n) += w(r, c) * dy(r, n);
            }
        }
}

/// The gradients of reference_layer on one sequence for an output gradient d_out: inputs
/// (separately for the query, key and value sources) and parameters.
template <class T>
struct reference_layer_gradients {
    mat<T> d_query, d_key, d_value;
    reference_params<T> d_params;
};

/// The chain rule through reference_layer (same arguments, and d_out, E × Lq): the output
/// projection's backward, each query head through reference_attention_backward (a key/value
/// head summing its query heads), then the input projections' backward.
template <class T>
reference_layer_gradients<T> reference_layer_backward(
    const reference_params<T>& p, Index heads, const mat<T>& xq, const mat<T>& xk, const mat<T>& xv,
    T scale, const mat<T>& d_out, const std::function<bool(Index, Index, Index)>& allowed = nullptr,
    const std::function<long double(Index, Index, Index)>& bias = nullptr,
    norm_kind kind = norm_kind::softmax, Index kv_heads = 0) {
    if (kv_heads == 0) kv_heads = heads;
    const bool has_bias = p.b_q.size() != 0;
    const mat<T> q = reference_linear(p.w_q, p.b_q, xq);
    const mat<T> k = reference_linear(p.w_k, p.b_k, xk);
    const mat<T> v = reference_linear(p.w_v, p.b_v, xv);
    const Index dk = q.rows() / heads, dv = v.rows() / kv_heads, lq = xq.cols();
    mat<T> concat(heads * dv, lq);
    for (Index h = 0; h < heads; ++h) {
        const Index g = reference_kv_head(h, heads, kv_heads);
        allowed_fn a = allowed ? allowed_fn([&, h](Index j, Index i) { return allowed(h, j, i); })
                               : allow_all();
        bias_fn bf = bias ? bias_fn([&, h](Index j, Index i) { return bias(h, j, i); }) : nullptr;
        concat.middleRows(h * dv, dv) =
            reference_attention<T>(q.middleRows(h * dk, dk), k.middleRows(g * dk, dk),
                                   v.middleRows(g * dv, dv), scale, a, bf, kind);
    }
    reference_layer_gradients<T> r;
    mat<T> d_concat;
    reference_linear_backward(p.w_o, has_bias, concat, d_out, r.d_params.w_o, r.d_params.b_o,
                              d_concat);
    mat<T> dq = mat<T>::Zero(q.rows(), q.cols()), dk_all = mat<T>::Zero(k.rows(), k.cols()),
           dv_all = mat<T>::Zero(v.rows(), v.cols());
    for (Index h = 0; h < heads; ++h) {
        const Index g = reference_kv_head(h, heads, kv_heads);
        allowed_fn a = allowed ? allowed_fn([&, h](Index j, Index i) { return allowed(h, j, i); })
                               : allow_all();
        bias_fn bf = bias ? bias_fn([&, h](Index j, Index i) { return bias(h, j, i); }) : nullptr;
        const auto hg = reference_attention_backward<T>(
            q.middleRows(h * dk, dk), k.middleRows(g * dk, dk), v.middleRows(g * dv, dv),
            d_concat.middleRows(h * dv, dv), scale, a, bf, kind);
        dq.middleRows(h * dk, dk) = hg.dq;
        dk_all.middleRows(g * dk, dk) += hg.dk;
        dv_all.middleRows(g * dv, dv) += hg.dv;
    }
    reference_linear_backward(p.w_q, has_bias, xq, dq, r.d_params.w_q, r.d_params.b_q, r.d_query);
    reference_linear_backward(p.w_k, has_bias, xk, dk_all, r.d_params.w_k, r.d_params.b_k, r.d_key);
    reference_linear_backward(p.w_v, has_bias, xv, dv_all, r.d_params.w_v, r.d_params.b_v,
                              r.d_value);
    return r;
}

/// Seeded N(0, sigma) or U(lo, hi) values generated in double (std distributions are not
/// portable, so the mapping is written here).
class value_source {
public:
    explicit value_source(std::uint64_t seed) : engine_(seed) {}

    double uniform(double lo, double hi) {
        const double unit = static_cast<double>(engine_() >> 11) * 0x1.0p-53;
        return lo + (hi - lo) * unit;
    }
    double normal(double sigma = 1.0) {  // Box-Muller
        const double u1 = uniform(0x1.0p-53, 1.0), u2 = uniform(0.0, 1.0);
        return sigma * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }
    /// A matrix of Scalar values: N(0, sigma) rounded to Scalar.
    template <class Scalar>
    mat<Scalar> normal_matrix(Index rows, Index cols, double sigma = 1.0) {
        mat<Scalar> m(rows, cols);
        for (Index c = 0; c < cols; ++c)
            for (Index r = 0; r < rows; ++r)
                m(r, c) = static_cast<Scalar>(normal(sigma));
        return m;
    }
    template <class Scalar>
    mat<Scalar> uniform_matrix(Index rows, Index cols, double lo, double hi) {
        mat<Scalar> m(rows, cols);
        for (Index c = 0; c < cols; ++c)
            for (Index r = 0; r < rows; ++r)
                m(r, c) = static_cast<Scalar>(uniform(lo, hi));
        return m;
    }
    std::uint64_t next() { return engine_(); }

private:
    std::mt19937_64 engine_;
};

}  // namespace mha_test
