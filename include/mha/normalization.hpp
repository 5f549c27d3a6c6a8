// SPDX-License-Identifier: MIT
/// @file
/// The normalisations of attention scores (softmax, ReLU, sigmoid), one column per query.
/// Entries equal to −∞ are excluded keys: they get weight exactly 0, and a column with no other
/// entry becomes all 0 (never NaN).
#pragma once

#include <cmath>
#include <limits>

#include <mha/core.hpp>
#include <mha/options.hpp>

namespace mha {

namespace detail {

// Max that lets NaN win, so a NaN score turns the whole column NaN instead of being skipped.
template <class Scalar>
inline Scalar nan_propagating_max(Scalar acc, Scalar x) {
    return (x > acc || x != x) ? x : acc;
}

}  // namespace detail

/// Numerically stable softmax of each column of `scores_`, in place.
/// `scores_` is `Lk × Lq` (any Eigen matrix, block or Map with writable storage).
template <class Derived>
void softmax_columns(const Eigen::MatrixBase<Derived>& scores_) {
    using Scalar = typename Derived::Scalar;
    static_assert(
        detail::is_supported_scalar_v<Scalar>,
        "mha: scores must hold float, double or long double; integer scores would be truncated");
    // Eigen's idiom for writable temporaries (blocks, Maps) passed by const reference.
    auto& scores = const_cast<Eigen::MatrixBase<Derived>&>(scores_);
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    for (Index i = 0; i < scores.cols(); ++i) {
        auto column = scores.col(i);
        Scalar m = minus_inf;
        for (Index j = 0; j < column.size(); ++j)
            m = detail::nan_propagating_max(m, column(j));
        if (m == minus_inf) {  // no key to attend to (or no key at all)
            column.setZero();
            continue;
        }
        // exp of an excluded key is forced to exactly 0: a vectorised exp(−∞) may return the
        // smallest normal instead, which would let poisoned values leak.
        column =
            (column.array() == minus_inf).select(Scalar(0), (column.array() - m).exp()).matrix();
        const Scalar sum = column.sum();
        column *= Scalar(1) / sum;
    }
}

/// ReLU-normalised weights of each column, in place (see `normalization::relu`).
template <class Derived>
void relu_normalize_columns(const Eigen::MatrixBase<Derived>& scores_) {
    using Scalar = typename Derived::Scalar;
    static_assert(
        detail::is_supported_scalar_v<Scalar>,
        "mha: scores must hold float, double or long double; integer scores would be truncated");
    auto& scores = const_cast<Eigen::MatrixBase<Derived>&>(scores_);
    for (Index i = 0; i < scores.cols(); ++i) {
        auto column = scores.col(i);
        Scalar sum(0);
        for (Index j = 0; j < column.size(); ++j) {
            const Scalar s = column(j);
            const Scalar r = (s > Scalar(0) || s != s) ? s : Scalar(0);  // NaN stays NaN
            column(j) = r;
            sum += r;
        }
        if (sum > Scalar(0) || sum != sum)
            column *= Scalar(1) / sum;
        else
            column.setZero();
    }
}

/// Element-wise logistic sigmoid of the scores, in place (see `normalization::sigmoid`).
template <class Derived>
void sigmoid_columns(const Eigen::MatrixBase<Derived>& scores_) {
    using Scalar = typename Derived::Scalar;
    static_assert(
        detail::is_supported_scalar_v<Scalar>,
        "mha: scores must hold float, double or long double; integer scores would be truncated");
    auto& scores = const_cast<Eigen::MatrixBase<Derived>&>(scores_);
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    for (Index i = 0; i < scores.cols(); ++i)
        for (Index j = 0; j < scores.rows(); ++j) {
            const Scalar s = scores(j, i);
            scores(j, i) = s == minus_inf ? Scalar(0) : Scalar(1) / (Scalar(1) + std::exp(-s));
        }
}

/// Applies the chosen normalisation to each column of `scores_`, in place.
template <class Derived>
void normalize_columns(const Eigen::MatrixBase<Derived>& scores_, normalization kind) {
    switch (kind) {
        case normalization::softmax:
            softmax_columns(scores_);
            return;
        case normalization::relu:
            relu_normalize_columns(scores_);
            return;
        case normalization::sigmoid:
            sigmoid_columns(scores_);
            return;
    }
    detail::fail<value_error>("mha::normalize_columns", "kind", "softmax, relu or sigmoid",
                              static_cast<int>(kind));
}

}  // namespace mha
