// SPDX-License-Identifier: MIT
// Scaled dot-product attention: the score and weighted-sum kernels, single-head attention on any
// Q/K/V views, and the multi-head core over a packed batch.
//
// Shapes (one column per token):
//   q : d_k × Lq      k : d_k × Lk      v : d_v × Lk
//   scores, weights : Lk × Lq (column i holds query i's view of every key)
//   out : d_v × Lq
//
// Order inside the scores: scale → additive bias → mask → normalise. Masks are applied by
// selection (an excluded score becomes −∞ whatever K held, so NaN in excluded keys never leaks).
// A query with no key to attend to gets output 0 and weights 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <mha/batch.hpp>
#include <mha/config.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/detail/tiled_attention.hpp>
#include <mha/mask.hpp>
#include <mha/softmax.hpp>

namespace mha {

/// Which kernel computes the attention core.
enum class attention_algorithm {
    /// tiled for softmax, materialized for the other normalisations.
    automatic,
    /// Scores Lk × Lq in full, then normalise, then V·P: the simple reference path.
    materialized,
    /// Online-softmax tiles (detail/tiled_attention.hpp): memory linear in L, multi-threaded with
    /// OpenMP. Softmax only: relu and sigmoid have no online form here and use materialized.
    tiled,
};

/// Settings of the attention core.
struct attention_options {
    /// Multiplies Kᵀ·Q; 1/√d_k when not set. Must be finite.
    std::optional<double> scale;
    /// How scores become weights.
    normalization normalize = normalization::softmax;
    /// Which kernel runs (the results agree to rounding; see attention_algorithm).
    attention_algorithm algorithm = attention_algorithm::automatic;
};

/// Which attention weights a multi-head call returns.
enum class weights_mode {
    none,      ///< do not return weights
    per_head,  ///< one `Lk × Lq` matrix per sequence and head, index b·H + h
    averaged,  ///< one `Lk × Lq` matrix per sequence: the mean over heads (PyTorch's default)
};

/// scores = scale · kᵀ·q   (Lk × Lq).
template <class DK, class DQ, class DS>
void attention_scores(const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DQ>& q,
                      typename DQ::Scalar scale, const Eigen::MatrixBase<DS>& scores_) {
    constexpr const char* where = "mha::attention_scores";
    auto& scores = const_cast<Eigen::MatrixBase<DS>&>(scores_);
    detail::check_size(where, "k.rows()", q.rows(), k.rows(), "q.rows(), the key width d_k");
    detail::check_size(where, "scores.rows()", k.cols(), scores.rows(), "k.cols()");
    detail::check_size(where, "scores.cols()", q.cols(), scores.cols(), "q.cols()");
    scores.noalias() = scale * (k.transpose() * q);
}

/// out = v · weights   (d_v × Lq): each query's weighted sum of the value columns.
template <class DV, class DW, class DO>
void weighted_sum_of_values(const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DW>& weights,
                            const Eigen::MatrixBase<DO>& out_) {
    constexpr const char* where = "mha::weighted_sum_of_values";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    detail::check_size(where, "weights.rows()", v.cols(), weights.rows(), "v.cols()");
    detail::check_size(where, "out.rows()", v.rows(), out.rows(), "v.rows()");
    detail::check_size(where, "out.cols()", weights.cols(), out.cols(), "weights.cols()");
    out.noalias() = v * weights;
}

namespace detail {

/// Whether the options select the tiled kernel.
inline bool use_tiled(const attention_options& options) {
    return options.normalize == normalization::softmax &&
           options.algorithm != attention_algorithm::materialized;
}

/// Runs fn on a writable, inner-stride-1 view of `out`, through a temporary if `out` cannot be
/// viewed that way (e.g. a Map with an inner stride).
template <class Scalar, class DO, class Fn>
void with_matrix_ref(Eigen::MatrixBase<DO>& out, Fn&& fn) {
    if constexpr (std::is_constructible_v<matrix_ref<Scalar>, DO&>) {
        fn(matrix_ref<Scalar>(out.derived()));
    } else {
        matrix<Scalar> tmp(out.rows(), out.cols());
        fn(matrix_ref<Scalar>(tmp));
        out = tmp;
    }
}

template <class Scalar>
Scalar resolve_scale(const char* where, const attention_options& options, Index key_width) {
    if (options.scale) {
        if (!std::isfinite(*options.scale))
            fail<value_error>(where, "options.scale", "finite", *options.scale);
        return static_cast<Scalar>(*options.scale);
    }
    if (key_width <= 0)
        fail<shape_error>(where, "the key width d_k", ">= 1 (or set options.scale)", key_width);
    return static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(key_width)));
}

/// Sets excluded scores to −∞ and adds biases, for one (sequence, head).
template <class Scalar, class DS>
void apply_mask(const typename attention_mask<Scalar>::slice& mask, Eigen::MatrixBase<DS>& s) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    const Index lk = s.rows();
    for (Index i = 0; i < s.cols(); ++i) {
        const auto range = mask.key_range(i);
        s.col(i).head(range.first).setConstant(minus_inf);
        s.col(i).tail(lk - range.second).setConstant(minus_inf);
        // A −∞ bias excludes the key by selection: adding it would turn a NaN or ±∞ score
        // (poisoned K at that key) into NaN and leak it into the whole column.
        if (mask.has_bias())
            for (Index j = range.first; j < range.second; ++j) {
                const Scalar b = mask.bias(j, i);
                s(j, i) = b == minus_inf ? minus_inf : s(j, i) + b;
            }
        if (mask.has_keep())
            for (Index j = range.first; j < range.second; ++j)
                if (!mask.keeps(j, i)) s(j, i) = minus_inf;
    }
}

/// P·V by GEMM lets 0·NaN from an excluded value column into a query's output. Such outputs are
/// the only non-finite ones that can be wrong; recompute them from the allowed keys alone.
template <class Scalar, class DV, class DW, class DO>
void repair_excluded_values(const typename attention_mask<Scalar>::slice& mask,
                            const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DW>& weights,
                            Eigen::MatrixBase<DO>& out) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    for (Index i = 0; i < out.cols(); ++i) {
        if (out.col(i).allFinite()) continue;
        out.col(i).setZero();
        const auto range = mask.key_range(i);
        for (Index j = range.first; j < range.second; ++j) {
            if (!mask.keeps(j, i)) continue;
            if (mask.has_bias() && mask.bias(j, i) == minus_inf) continue;
            out.col(i) += weights(j, i) * v.col(j);
        }
    }
}

/// The materialised attention of one (sequence, head); `scores` (Lk × Lq) is scratch and ends
/// holding the weights. The two products pack into `gemm` when given (see product_into).
template <class Scalar, class DQ, class DK, class DV, class DO, class DS>
void attend_one_head(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                     const Eigen::MatrixBase<DV>& v,
                     const typename attention_mask<Scalar>::slice& mask, Scalar scale,
                     normalization normalize, Eigen::MatrixBase<DO>& out,
                     Eigen::MatrixBase<DS>& scores,
                     std::vector<gemm_buffers<Scalar>>* gemm = nullptr) {
    const Index lq = q.cols();
    const Index lk = k.cols();
    if (lq == 0) return;
    if (lk == 0) {
        out.setZero();
        return;
    }
    product_into(scores.derived(), k.derived().transpose(), q.derived(), scale, gemm);
    const bool masked = !mask.is_unmasked();
    if (masked) apply_mask<Scalar>(mask, scores);
    normalize_columns(scores, normalize);
    product_into(out.derived(), v.derived(), scores.derived(), Scalar(1), gemm);
    if (masked) repair_excluded_values<Scalar>(mask, v, scores, out);
}

/// The buffers of a multi-head attention-core call, kept for the next call (see attention_core).
template <class Scalar>
struct attention_workspace {
    tiled_workspace<Scalar> tiled;
    vector<Scalar> scores;  // materialised path: one head's Lk × Lq, grown to the largest
    std::vector<gemm_buffers<Scalar>> gemm;  // GEMM packing, one per thread (see product_into)
};

}  // namespace detail

/// Single-head attention on any Q/K/V views (see the shapes at the top of this header).
/// Writes `out` (d_v × Lq); if `weights` is given it is resized to Lk × Lq and receives the
/// normalised attention weights.
template <class DQ, class DK, class DV, class DO>
void scaled_dot_product_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                  const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DO>& out_,
                                  const attention_mask<typename DQ::Scalar>& mask = {},
                                  const attention_options& options = {},
                                  matrix<typename DQ::Scalar>* weights = nullptr) {
    using Scalar = typename DQ::Scalar;
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");
    constexpr const char* where = "mha::scaled_dot_product_attention";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    detail::check_size(where, "k.rows()", q.rows(), k.rows(), "q.rows(), the key width d_k");
    detail::check_size(where, "v.cols()", k.cols(), v.cols(), "k.cols(), the number of keys");
    detail::check_size(where, "out.rows()", v.rows(), out.rows(), "v.rows(), the value width");
    detail::check_size(where, "out.cols()", q.cols(), out.cols(), "q.cols(), the number of queries");
    const Scalar scale = detail::resolve_scale<Scalar>(where, options, q.rows());
    mask.validate(where, 1, {q.cols()}, {k.cols()});
    if (detail::use_tiled(options)) {
        std::vector<matrix<Scalar>> w;
        if (weights != nullptr) w.push_back(matrix<Scalar>::Zero(k.cols(), q.cols()));
        detail::with_matrix_ref<Scalar>(out, [&](detail::matrix_ref<Scalar> o) {
            detail::tiled_multi_head_attention<Scalar>(
                q, k, v, 1, packed_batch::single(q.cols(), k.cols()), o, mask, scale,
                weights != nullptr ? detail::tiled_weights::per_head : detail::tiled_weights::none,
                &w);
        });
        if (weights != nullptr) *weights = std::move(w.front());
        return;
    }
    const auto slice = mask.for_head(0, 0, 1, 1, q.cols(), k.cols());
    matrix<Scalar> scratch;
    matrix<Scalar>& scores = weights != nullptr ? *weights : scratch;
    scores.resize(k.cols(), q.cols());
    detail::attend_one_head<Scalar>(q, k, v, slice, scale, options.normalize, out, scores);
}

/// Returns the single-head attention output (d_v × Lq).
template <class DQ, class DK, class DV>
matrix<typename DQ::Scalar> scaled_dot_product_attention(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const attention_mask<typename DQ::Scalar>& mask = {}, const attention_options& options = {}) {
    matrix<typename DQ::Scalar> out(v.rows(), q.cols());
    scaled_dot_product_attention(q, k, v, out, mask, options);
    return out;
}

namespace detail {

/// multi_head_attention_core (below) with its buffers in `workspace`: with the shapes of an
/// earlier call on the same workspace, and without weights, a call allocates nothing. Null: the
/// buffers are the call's own, and the materialised path's products are Eigen's (which may run
/// on Eigen's own OpenMP threads).
template <class DQ, class DK, class DV, class DO>
void attention_core(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                    const Eigen::MatrixBase<DV>& v, Index num_heads, const packed_batch& batch,
                    const Eigen::MatrixBase<DO>& out_,
                    const attention_mask<typename DQ::Scalar>& mask,
                    const attention_options& options, weights_mode mode,
                    std::vector<matrix<typename DQ::Scalar>>* weights,
                    attention_workspace<typename DQ::Scalar>* workspace) {
    using Scalar = typename DQ::Scalar;
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");
    constexpr const char* where = "mha::multi_head_attention_core";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    if (num_heads <= 0) detail::fail<value_error>(where, "num_heads", ">= 1", num_heads);
    if (q.rows() % num_heads != 0)
        detail::fail<shape_error>(where, "q.rows()",
                                  "a multiple of num_heads = " + std::to_string(num_heads),
                                  q.rows());
    if (v.rows() % num_heads != 0)
        detail::fail<shape_error>(where, "v.rows()",
                                  "a multiple of num_heads = " + std::to_string(num_heads),
                                  v.rows());
    detail::check_size(where, "k.rows()", q.rows(), k.rows(), "q.rows()");
    detail::check_size(where, "q.cols()", batch.total_queries(), q.cols(),
                       "the batch's total query count");
    detail::check_size(where, "k.cols()", batch.total_keys(), k.cols(),
                       "the batch's total key count");
    detail::check_size(where, "v.cols()", k.cols(), v.cols(), "k.cols()");
    detail::check_size(where, "out.rows()", v.rows(), out.rows(), "v.rows()");
    detail::check_size(where, "out.cols()", q.cols(), out.cols(), "q.cols()");
    const Index dk = q.rows() / num_heads;
    const Index dv = v.rows() / num_heads;
    const Scalar scale = detail::resolve_scale<Scalar>(where, options, dk);
    mask.validate(where, num_heads, batch.query_lengths(), batch.key_lengths());

    const bool want_weights = weights != nullptr && mode != weights_mode::none;
    if (want_weights) {
        weights->clear();
        for (Index b = 0; b < batch.size(); ++b) {
            const Index copies = mode == weights_mode::per_head ? num_heads : 1;
            for (Index h = 0; h < copies; ++h)
                weights->push_back(
                    matrix<Scalar>::Zero(batch.key_length(b), batch.query_length(b)));
        }
    }
    if (detail::use_tiled(options)) {
        const auto tiled_mode = !want_weights ? detail::tiled_weights::none
                                : mode == weights_mode::per_head ? detail::tiled_weights::per_head
                                                                 : detail::tiled_weights::averaged;
        detail::with_matrix_ref<Scalar>(out, [&](detail::matrix_ref<Scalar> o) {
            detail::tiled_multi_head_attention<Scalar>(
                q, k, v, num_heads, batch, o, mask, scale, tiled_mode, weights, {},
                workspace != nullptr ? &workspace->tiled : nullptr);
        });
        return;
    }
    // One head's scores at a time, in a buffer sized once for the largest sequence.
    vector<Scalar> local_scores;
    vector<Scalar>& scores_buffer = workspace != nullptr ? workspace->scores : local_scores;
    Index largest = 0;
    for (Index b = 0; b < batch.size(); ++b)
        largest = std::max(largest, batch.key_length(b) * batch.query_length(b));
    if (scores_buffer.size() < largest) scores_buffer.resize(largest);
    auto* gemm = workspace != nullptr ? &workspace->gemm : nullptr;
    for (Index b = 0; b < batch.size(); ++b) {
        const Index lq = batch.query_length(b);
        const Index lk = batch.key_length(b);
        const Index q0 = batch.query_offset(b);
        const Index k0 = batch.key_offset(b);
        // Empty sequences create no blocks: a block of an empty matrix offsets a null pointer.
        if (lq == 0) continue;
        if (lk == 0) {  // no key: the output is 0 and the weights (0 × Lq) are already set
            out.derived().middleCols(q0, lq).setZero();
            continue;
        }
        Eigen::Map<matrix<Scalar>> scores(scores_buffer.data(), lk, lq);
        for (Index h = 0; h < num_heads; ++h) {
            const auto slice = mask.for_head(b, h, batch.size(), num_heads, lq, lk);
            auto out_bh = out.derived().block(h * dv, q0, dv, lq);
            detail::attend_one_head<Scalar>(
                q.derived().block(h * dk, q0, dk, lq), k.derived().block(h * dk, k0, dk, lk),
                v.derived().block(h * dv, k0, dv, lk), slice, scale, options.normalize, out_bh,
                scores, gemm);
            if (!want_weights) continue;
            if (mode == weights_mode::per_head)
                (*weights)[static_cast<std::size_t>(b * num_heads + h)] = scores;
            else
                (*weights)[static_cast<std::size_t>(b)] += scores / Scalar(num_heads);
        }
    }
}

}  // namespace detail

/// The multi-head attention core over a packed batch, on already projected Q, K and V:
///   q : (H·d_k) × Nq,  k : (H·d_k) × Nk,  v : (H·d_v) × Nk,  out : (H·d_v) × Nq
/// with Nq and Nk the batch's total query and key counts. Head h of sequence b attends with
/// rows [h·d_k, (h+1)·d_k) of the columns of sequence b only. If `weights` is given and `mode`
/// is not `none`, it receives the weights (see `weights_mode`).
template <class DQ, class DK, class DV, class DO>
void multi_head_attention_core(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                               const Eigen::MatrixBase<DV>& v, Index num_heads,
                               const packed_batch& batch, const Eigen::MatrixBase<DO>& out_,
                               const attention_mask<typename DQ::Scalar>& mask = {},
                               const attention_options& options = {},
                               weights_mode mode = weights_mode::none,
                               std::vector<matrix<typename DQ::Scalar>>* weights = nullptr) {
    detail::attention_core(q, k, v, num_heads, batch, out_, mask, options, mode, weights,
                           static_cast<detail::attention_workspace<typename DQ::Scalar>*>(nullptr));
}

}  // namespace mha
