// SPDX-License-Identifier: MIT
// The score terms applied between the scaled scores and the mask, shared by the materialised
// and tiled kernels so that both compute them the same way: soft-capping, ALiBi and the caller's
// score modifier (in that order), and the attention sink folded into a softmax normaliser.
#pragma once

#include <cmath>
#include <limits>
#include <string>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/check.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/normalization.hpp>
#include <mha/options.hpp>
#include <mha/score_modifiers.hpp>

namespace mha {
namespace detail {

/// Whether problem p changes its scores at all (soft-capping, ALiBi or a modifier).
template <class Scalar, class Mod>
bool modifies_scores(const head_problem<Scalar>& p, const Mod& /*mod*/) {
    return is_active_modifier_v<Mod> || p.softcap != Scalar(0) || p.alibi;
}

/// The score of query i and key j after soft-capping, ALiBi and the modifier, from the scaled
/// score s (one score at a time: the repair of poisoned columns).
template <class Scalar, class Mod>
Scalar modified_score(const head_problem<Scalar>& p, const Mod& mod, Index i, Index j, Scalar s) {
    if (p.softcap != Scalar(0)) {
        const Eigen::Array<Scalar, 1, 1> a(s * (Scalar(1) / p.softcap));
        s = p.softcap * a.tanh()(0);  // Eigen's tanh, as on whole columns below
    }
    if (p.alibi) s += p.alibi_slope * static_cast<Scalar>(j - i - (p.lk - p.lq));
    return call_modifier<Scalar>(mod, p.sequence, p.head, i, j, s);
}

/// s[c] for c < nq: the scaled scores of queries i0 + c against key j, modified in place (the
/// tiled kernel's layout: one key's scores of a block of queries are contiguous).
template <class Scalar, class Mod>
void modify_key_column(const head_problem<Scalar>& p, const Mod& mod, Scalar* s, Index i0, Index nq,
                       Index j) {
    if (p.softcap != Scalar(0)) {
        Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> a(s, nq);
        a = p.softcap * (a * (Scalar(1) / p.softcap)).tanh();
    }
    if (p.alibi) {
        const Index d0 = j - i0 - (p.lk - p.lq);  // key − query position of c = 0
        const Scalar slope = p.alibi_slope;
        for (Index c = 0; c < nq; ++c)
            s[c] += slope * static_cast<Scalar>(d0 - c);
    }
    if constexpr (is_active_modifier_v<Mod>)
        for (Index c = 0; c < nq; ++c)
            s[c] = call_modifier<Scalar>(mod, p.sequence, p.head, i0 + c, j, s[c]);
}

/// s[r] for r < nk: the scaled scores of query i against keys j0 + r, modified in place (the
/// materialised kernel's layout: one query's scores are contiguous).
template <class Scalar, class Mod>
void modify_query_column(const head_problem<Scalar>& p, const Mod& mod, Scalar* s, Index i,
                         Index j0, Index nk) {
    if (p.softcap != Scalar(0)) {
        Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> a(s, nk);
        a = p.softcap * (a * (Scalar(1) / p.softcap)).tanh();
    }
    if (p.alibi) {
        const Index d0 = j0 - i - (p.lk - p.lq);
        const Scalar slope = p.alibi_slope;
        for (Index r = 0; r < nk; ++r)
            s[r] += slope * static_cast<Scalar>(d0 + r);
    }
    if constexpr (is_active_modifier_v<Mod>)
        for (Index r = 0; r < nk; ++r)
            s[r] = call_modifier<Scalar>(mod, p.sequence, p.head, i, j0 + r, s[r]);
}

/// Folds problem p's sink into a query's softmax state: running max m and sum l over its keys
/// (m = −∞ when it has none) become those over its keys and the sink; returns the factor
/// exp(m_old − m_new) by which the unnormalised output must be scaled (0 when m_old = −∞).
template <class Scalar>
Scalar fold_sink(const head_problem<Scalar>& p, Scalar& m, Scalar& l) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    if (!p.has_sink) return Scalar(1);
    if (m == minus_inf) {
        m = p.sink;
        l = Scalar(1);
        return Scalar(0);
    }
    const Scalar m_new = nan_propagating_max(m, p.sink);
    const Scalar alpha = std::exp(m - m_new);
    l = alpha * l + std::exp(p.sink - m_new);
    m = m_new;
    return alpha;
}

/// Throws value_error unless the score terms of `options` fit `num_heads` query heads and the
/// normalisation: soft-capping finite and > 0, one ALiBi slope (finite) and one sink (finite)
/// per head, sinks with softmax only.
inline void check_score_terms(const char* where, const attention_options& options, Index num_heads,
                              const std::string& prefix = "options.") {
    if (options.softcap && !(std::isfinite(*options.softcap) && *options.softcap > 0))
        fail<value_error>(where, prefix + "softcap", "finite and > 0", *options.softcap);
    // The argument's name is built only on failure: a valid call allocates nothing.
    auto per_head = [&](const char* field, const std::vector<double>& values) {
        if (values.empty()) return;
        if (static_cast<Index>(values.size()) != num_heads)
            fail<shape_error>(where, prefix + field,
                              "num_heads = " + std::to_string(num_heads) + " entries (or none)",
                              static_cast<Index>(values.size()));
        for (std::size_t h = 0; h < values.size(); ++h)
            if (!std::isfinite(values[h]))
                fail<value_error>(where, prefix + field + "[" + std::to_string(h) + "]", "finite",
                                  values[h]);
    };
    per_head("alibi_slopes", options.alibi_slopes);
    per_head("sinks", options.sinks);
    if (!options.sinks.empty() && options.normalize != normalization::softmax)
        fail<value_error>(where, prefix + "sinks",
                          "empty unless options.normalize is softmax (a sink is a softmax logit)",
                          std::string("set with ") + to_string(options.normalize));
}

}  // namespace detail
}  // namespace mha
