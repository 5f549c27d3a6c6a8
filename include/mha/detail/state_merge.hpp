// SPDX-License-Identifier: MIT
// The one log-sum-exp merge of the library: partial softmax results of a query over disjoint key
// sets become the result over their union. The split-KV decode path (detail/tiled/plan.hpp)
// merges its unnormalised chunk partials with it, and mha::merge_attention_states
// (attention_states.hpp) merges normalised states with it.
#pragma once

#include <cmath>
#include <limits>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/normalization.hpp>  // detail::nan_propagating_max: NaN from allowed inputs wins

namespace mha {
namespace detail {

/// One part of a query's state: max shift m, normaliser l and accumulator acc (d_v entries),
/// so that the part's output is acc / l and its log-sum-exp m + log l. A normalised state
/// (output O, log-sum-exp L) is the part {L, 1, O}.
template <class Scalar>
struct state_part {
    Scalar m = Scalar(0);
    Scalar l = Scalar(0);
    const Scalar* acc = nullptr;
};

/// Merges parts(0), ..., parts(count − 1) of one query, in that order:
///   m = max_k m_k,  l = Σ_k exp(m_k − m)·l_k,  acc = Σ_k exp(m_k − m)·acc_k
/// and returns m (l into `l`, acc into the d_v entries at `acc`, which must not alias a part).
/// Shifting by the largest m keeps every factor in (0, 1], so nothing overflows. A part with
/// m_k = −∞ (its keys were all masked for this query) is skipped rather than multiplied by 0:
/// its accumulator may hold 0·NaN from poisoned excluded values. When every part is −∞ the
/// result is m = −∞, l = 0, acc = 0, which the callers turn into an output of exactly 0.
template <class Scalar, class Parts>
Scalar merge_state_parts(Index count, const Parts& parts, Index dv, Scalar* acc, Scalar& l) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    Scalar m = minus_inf;
    for (Index k = 0; k < count; ++k)
        m = nan_propagating_max(m, parts(k).m);
    Eigen::Map<vector<Scalar>> sum(acc, dv);  // d_v
    sum.setZero();
    l = Scalar(0);
    if (m == minus_inf) return m;
    for (Index k = 0; k < count; ++k) {
        const state_part<Scalar> part = parts(k);
        if (part.m == minus_inf) continue;
        const Scalar alpha = std::exp(part.m - m);
        l += alpha * part.l;
        sum += alpha * Eigen::Map<const vector<Scalar>>(part.acc, dv);
    }
    return m;
}

}  // namespace detail
}  // namespace mha
