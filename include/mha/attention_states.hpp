// SPDX-License-Identifier: MIT
// Attention states: an attention output together with its per-query log-sum-exp, and their
// merge. Softmax attention over a key set K = K_1 ∪ K_2 (disjoint) is recovered exactly from
// the results over K_1 and over K_2, so keys can be processed in pieces that never meet: split
// across processes (ring attention), streamed from storage, or cached and extended.
#pragma once

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/state_merge.hpp>

namespace mha {

/// A partial softmax attention result over some of the keys, as the kernels write it:
///   output      : (H·d_v) × Nq, rows [h·d_v, (h+1)·d_v) of column i are head h of query i
///   log_sum_exp : H × Nq, entry (h, i) is log Σ_j exp(s_ij) over the keys this part covered,
///                 −∞ for a query that had no key in it (its output is then 0)
/// exactly what `multi_head_attention_core` (or `scaled_dot_product_attention`, H = 1) returns
/// with `attention_request{..., true}`. Both refer to the caller's matrices (or column and row
/// blocks of them) without copying; the matrices must outlive the state.
template <class Scalar>
struct attention_state {
    Eigen::Ref<const matrix<Scalar>> output;       ///< (H·d_v) × Nq
    Eigen::Ref<const matrix<Scalar>> log_sum_exp;  ///< H × Nq
};

namespace detail {

/// Throws shape_error unless `output` and `log_sum_exp` form a state of H = log_sum_exp.rows()
/// heads: as many columns, and output rows a multiple of H.
inline void check_state_shape(const char* where, const std::string& output_name,
                              const std::string& lse_name, Index output_rows, Index output_cols,
                              Index lse_rows, Index lse_cols) {
    check_size(where, lse_name + ".cols()", output_cols, lse_cols,
               (output_name + ".cols(), the number of queries").c_str());
    const bool divisible = lse_rows > 0 ? output_rows % lse_rows == 0 : output_rows == 0;
    if (!divisible)
        fail<shape_error>(
            where, output_name + ".rows()",
            "a multiple of " + lse_name + ".rows() = " + to_text(lse_rows) + " (H·d_v for H heads)",
            output_rows);
}

/// out, lse ← the merge of `parts` (count of them), query by query and head by head. Each
/// (head, query) reads every part before it writes, so out and lse may be the same matrices as
/// one part's (element for element); no other overlap is allowed.
template <class Scalar>
void merge_states_into(const attention_state<Scalar>* parts, Index count,
                       Eigen::Ref<matrix<Scalar>> out, Eigen::Ref<matrix<Scalar>> lse) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    const Index heads = lse.rows();
    if (heads == 0) return;
    const Index dv = out.rows() / heads;
    vector<Scalar> acc(dv);  // d_v: the merged accumulator of one (head, query)
    for (Index i = 0; i < out.cols(); ++i)
        for (Index h = 0; h < heads; ++h) {
            // A normalised state is the part {L, 1, O}: its output already divided by its sum.
            const auto part = [&](Index k) {
                const attention_state<Scalar>& s = parts[k];
                return state_part<Scalar>{s.log_sum_exp(h, i), Scalar(1),
                                          s.output.data() + i * s.output.outerStride() + h * dv};
            };
            Scalar l = Scalar(0);
            const Scalar m = merge_state_parts(count, part, dv, acc.data(), l);
            auto o = out.col(i).segment(h * dv, dv);
            if (m == minus_inf) {
                // No part saw a key: the library's rule for a query with nothing to attend to.
                o.setZero();
                lse(h, i) = minus_inf;
                continue;
            }
            o = acc / l;
            lse(h, i) = m + std::log(l);
        }
}

/// Whether two views are the same elements in the same order (a merge in place).
template <class A, class B>
bool same_view(const A& a, const B& b) {
    return a.data() == b.data() && a.rows() == b.rows() && a.cols() == b.cols() &&
           (a.cols() <= 1 || a.outerStride() == b.outerStride());
}

/// Throws value_error when the merge's output (out, lse) shares an element with a part, or out
/// with lse. With `allow_same`, a part may be the output itself: a merge reads every part of a
/// (head, query) before it writes that (head, query), and nothing else.
template <class Scalar>
void check_merge_apart(const char* where, const char* out_name, const char* lse_name,
                       const Eigen::Ref<matrix<Scalar>>& out, const Eigen::Ref<matrix<Scalar>>& lse,
                       const attention_state<Scalar>* parts, Index count,
                       const char* const* part_names, bool allow_same) {
    check_no_overlap(where, lse_name, lse, out_name, out);
    for (Index k = 0; k < count; ++k) {
        const char* output = part_names[2 * k];
        const char* log_sum_exp = part_names[2 * k + 1];
        const attention_state<Scalar>& s = parts[k];
        if (!allow_same || !same_view(out, s.output))
            check_no_overlap(where, out_name, out, output, s.output);
        if (!allow_same || !same_view(lse, s.log_sum_exp))
            check_no_overlap(where, lse_name, lse, log_sum_exp, s.log_sum_exp);
        check_no_overlap(where, out_name, out, log_sum_exp, s.log_sum_exp);
        check_no_overlap(where, lse_name, lse, output, s.output);
    }
}

/// Runs fn on a writable inner-stride-1 view of `m` holding its values, through a copy written
/// back afterwards if `m` cannot be viewed that way (e.g. a Map with an inner stride).
template <class Scalar, class D, class Fn>
void with_updatable_ref(Eigen::MatrixBase<D>& m, Fn&& fn) {
    if constexpr (std::is_constructible_v<Eigen::Ref<matrix<Scalar>>, D&>) {
        fn(Eigen::Ref<matrix<Scalar>>(m.derived()));
    } else {
        matrix<Scalar> copy = m;
        fn(Eigen::Ref<matrix<Scalar>>(copy));
        m = copy;
    }
}

}  // namespace detail

/// Merges attention states over disjoint key sets into the state over their union:
///   L = M + log Σ_k exp(L_k − M),  O = Σ_k exp(L_k − L)·O_k
/// per head and query, M = max_k L_k (the shift that keeps every exponential ≤ 1; computed as
/// O = Σ_k exp(L_k − M)·O_k / Σ_k exp(L_k − M)). Parts whose
/// L_k is −∞ contribute nothing (not even a NaN their output might hold); when every part is −∞,
/// `output` is exactly 0 and `log_sum_exp` −∞, as for any query with no key to attend to. NaN
/// in a part's log-sum-exp propagates to the merged query. The parts are combined in one pass in
/// list order; the result does not depend on the order beyond rounding. Zero parts give the
/// state over no keys (0 and −∞).
///
/// `output` ((H·d_v) × Nq) and `log_sum_exp` (H × Nq) receive the result; they may be the very
/// matrices of one of the parts (merging in place) but must not otherwise overlap them or each
/// other (value_error). Throws shape_error when a part's shape differs from theirs or
/// output.rows() is not a multiple of H.
template <class Scalar, class DO, class DL>
void merge_attention_states(const std::vector<attention_state<Scalar>>& parts,
                            const Eigen::MatrixBase<DO>& output,
                            const Eigen::MatrixBase<DL>& log_sum_exp) {
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");
    static_assert(detail::same_scalars_v<Scalar, typename DO::Scalar, typename DL::Scalar>,
                  "mha: every matrix of one call must have the same scalar type (all float or all "
                  "double); convert with .template cast<T>()");
    constexpr const char* where = "mha::merge_attention_states";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(output);
    auto& lse = const_cast<Eigen::MatrixBase<DL>&>(log_sum_exp);
    detail::check_state_shape(where, "output", "log_sum_exp", out.rows(), out.cols(), lse.rows(),
                              lse.cols());
    for (std::size_t k = 0; k < parts.size(); ++k) {
        const std::string name = "parts[" + std::to_string(k) + "]";
        const attention_state<Scalar>& s = parts[k];
        detail::check_size(where, name + ".output.rows()", out.rows(), s.output.rows(),
                           "output.rows()");
        detail::check_size(where, name + ".output.cols()", out.cols(), s.output.cols(),
                           "output.cols()");
        detail::check_size(where, name + ".log_sum_exp.rows()", lse.rows(), s.log_sum_exp.rows(),
                           "log_sum_exp.rows(), the number of heads");
        detail::check_size(where, name + ".log_sum_exp.cols()", lse.cols(), s.log_sum_exp.cols(),
                           "log_sum_exp.cols()");
    }
    detail::with_updatable_ref<Scalar>(out, [&](Eigen::Ref<matrix<Scalar>> o) {
        detail::with_updatable_ref<Scalar>(lse, [&](Eigen::Ref<matrix<Scalar>> l) {
            std::vector<std::string> names;
            names.reserve(2 * parts.size());
            for (std::size_t k = 0; k < parts.size(); ++k) {
                names.push_back("parts[" + std::to_string(k) + "].output");
                names.push_back("parts[" + std::to_string(k) + "].log_sum_exp");
            }
            std::vector<const char*> name_pointers;
            name_pointers.reserve(names.size());
            for (const std::string& name : names)
                name_pointers.push_back(name.c_str());
            detail::check_merge_apart(where, "output", "log_sum_exp", o, l, parts.data(),
                                      static_cast<Index>(parts.size()), name_pointers.data(), true);
            detail::merge_states_into(parts.data(), static_cast<Index>(parts.size()), o, l);
        });
    });
}

/// Merges state b into state a, in place: (out_a, lse_a) ← the merge of (out_a, lse_a) and
/// (out_b, lse_b), with the formula and the −∞ rule of the list form above. Shapes: out_a and
/// out_b (H·d_v) × Nq, lse_a and lse_b H × Nq. a starts as the state over no keys when out_a is
/// 0 and lse_a −∞, so a running state can absorb parts as they arrive. b must not overlap a, nor
/// out_a lse_a (value_error). Throws shape_error when b's shapes differ from a's or out_a.rows() is
/// not a multiple of H.
template <class DA, class DLA, class DB, class DLB>
void merge_attention_states(const Eigen::MatrixBase<DA>& out_a, const Eigen::MatrixBase<DLA>& lse_a,
                            const Eigen::MatrixBase<DB>& out_b,
                            const Eigen::MatrixBase<DLB>& lse_b) {
    using Scalar = typename DA::Scalar;
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");
    static_assert(detail::same_scalars_v<Scalar, typename DLA::Scalar, typename DB::Scalar,
                                         typename DLB::Scalar>,
                  "mha: every matrix of one call must have the same scalar type (all float or all "
                  "double); convert with .template cast<T>()");
    constexpr const char* where = "mha::merge_attention_states";
    auto& a = const_cast<Eigen::MatrixBase<DA>&>(out_a);
    auto& la = const_cast<Eigen::MatrixBase<DLA>&>(lse_a);
    detail::check_state_shape(where, "out_a", "lse_a", a.rows(), a.cols(), la.rows(), la.cols());
    detail::check_size(where, "out_b.rows()", a.rows(), out_b.rows(), "out_a.rows()");
    detail::check_size(where, "out_b.cols()", a.cols(), out_b.cols(), "out_a.cols()");
    detail::check_size(where, "lse_b.rows()", la.rows(), lse_b.rows(), "lse_a.rows()");
    detail::check_size(where, "lse_b.cols()", la.cols(), lse_b.cols(), "lse_a.cols()");
    detail::with_updatable_ref<Scalar>(a, [&](Eigen::Ref<matrix<Scalar>> o) {
        detail::with_updatable_ref<Scalar>(la, [&](Eigen::Ref<matrix<Scalar>> l) {
            const attention_state<Scalar> parts[2] = {{o, l}, {out_b, lse_b}};
            // Part 0 is a itself (the merge in place); b must be apart from it.
            const char* const names[] = {"out_a", "lse_a", "out_b", "lse_b"};
            detail::check_merge_apart(where, "out_a", "lse_a", o, l, parts + 1, 1, names + 2,
                                      false);
            detail::merge_states_into(parts, 2, o, l);
        });
    });
}

}  // namespace mha
