// SPDX-License-Identifier: MIT
// The argument checks that every entry point of the attention core runs before a kernel sees a
// problem: the shapes of Q, K, V and the output (or its gradient) against the head layout and the
// batch, the scale, and what a request may ask for. Shared by the fp32/double core, the bfloat16
// core and the backward pass, so one call's arguments are judged, and named, the same way in all
// three.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/check.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/score_terms.hpp>
#include <mha/mask.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

/// Throws shape_error unless q, k, v and `out` (named `out_name`: the output, or the output's
/// gradient) have the shapes the head layout and the batch ask for:
///   q : (H·d_k) × Nq,  k : (H_kv·d_k) × Nk,  v : (H_kv·d_v) × Nk,  out : (H·d_v) × Nq
template <class DQ, class DK, class DV, class DO>
void check_core_shapes(const char* where, const head_layout& heads, const packed_batch& batch,
                       const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                       const Eigen::MatrixBase<DV>& v, const char* out_name,
                       const Eigen::MatrixBase<DO>& out) {
    const bool grouped = heads.num_kv_heads != heads.num_heads;
    check_size(where, "k.rows()", heads.num_kv_heads * heads.dk, k.rows(),
               grouped ? "num_kv_heads · q.rows() / num_heads" : "q.rows()");
    check_size(where, "q.cols()", batch.total_queries(), q.cols(), "the batch's total query count");
    check_size(where, "k.cols()", batch.total_keys(), k.cols(), "the batch's total key count");
    check_size(where, "v.cols()", k.cols(), v.cols(), "k.cols()");
    check_size(where, std::string(out_name) + ".rows()", heads.num_heads * heads.dv, out.rows(),
               grouped ? "num_heads · v.rows() / num_kv_heads" : "v.rows()");
    check_size(where, std::string(out_name) + ".cols()", q.cols(), out.cols(), "q.cols()");
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

/// Throws value_error unless `scale` is finite in Scalar: a double such as 1e39 is finite, but
/// becomes +inf in a float layer (converting it is even undefined behaviour), and the outputs
/// NaN. Checked before the conversion.
template <class Scalar>
void check_scale(const char* where, const char* argument, const std::optional<double>& scale) {
    if (!scale) return;
    if (!std::isfinite(*scale)) fail<value_error>(where, argument, "finite", *scale);
    const auto largest = static_cast<double>(std::numeric_limits<Scalar>::max());
    if (std::fabs(*scale) > largest) {
        // Enough digits to tell the bound from a value just past it.
        std::ostringstream bound, actual;
        bound.precision(std::numeric_limits<double>::max_digits10);
        actual.precision(std::numeric_limits<double>::max_digits10);
        bound << "finite in the scalar type: |" << argument << "| <= " << largest;
        actual << *scale;
        fail<value_error>(where, argument, bound.str(), actual.str());
    }
}

/// The scale of the scores: options.scale when set (checked), else 1/√d_k.
template <class Scalar>
Scalar resolve_scale(const char* where, const attention_options& options, Index key_width) {
    if (options.scale) {
        check_scale<Scalar>(where, "options.scale", options.scale);
        return static_cast<Scalar>(*options.scale);
    }
    if (key_width <= 0)
        fail<shape_error>(where, "the key width d_k", ">= 1 (or set options.scale)", key_width);
    return static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(key_width)));
}

/// Refuses requests the options cannot serve.
inline void check_request(const char* where, const attention_options& options,
                          const attention_request& request) {
    if (request.log_sum_exp && options.normalize != normalization::softmax)
        fail<value_error>(where, "request.log_sum_exp",
                          "false unless options.normalize is softmax (it has no log-sum-exp)",
                          std::string("true with ") + to_string(options.normalize));
}

/// Throws value_error when the bytes of `out` meet those of `input` (views of different scalar
/// types: any shared byte range is refused).
template <class Out, class In>
void check_bytes_apart(const char* where, const char* out_name, const Out& out,
                       const char* input_name, const In& input) {
    if (out.size() == 0 || input.size() == 0) return;
    const auto span = [](const auto& m) {
        const auto begin = reinterpret_cast<std::uintptr_t>(m.data());
        const auto bytes =
            static_cast<std::uintptr_t>((m.cols() - 1) * m.outerStride() + m.rows()) *
            sizeof(*m.data());
        return std::make_pair(begin, begin + bytes);
    };
    const auto a = span(out), b = span(input);
    if (a.second <= b.first || b.second <= a.first) return;
    fail<value_error>(where, out_name, std::string("memory that ") + input_name + " does not use",
                      std::string("a view overlapping ") + input_name);
}

/// What the common checks of a core call establish: the head layout and the scale of the scores.
template <class Scalar>
struct checked_core_call {
    head_layout heads;
    Scalar scale;
};

/// The checks every core entry (forward in any precision, backward) runs first, in one order so
/// that one bad argument gets the same error from each: the head counts against the rows, the
/// shapes (check_core_shapes), the scale, the score terms, then the mask against the batch.
template <class Scalar, class DQ, class DK, class DV, class DO>
checked_core_call<Scalar> check_core_call(const char* where, Index num_heads, Index num_kv_heads,
                                          const packed_batch& batch, const Eigen::MatrixBase<DQ>& q,
                                          const Eigen::MatrixBase<DK>& k,
                                          const Eigen::MatrixBase<DV>& v, const char* out_name,
                                          const Eigen::MatrixBase<DO>& out,
                                          const attention_mask<Scalar>& mask,
                                          const attention_options& options) {
    const head_layout heads = make_head_layout(where, num_heads, num_kv_heads, q.rows(), v.rows());
    check_core_shapes(where, heads, batch, q, k, v, out_name, out);
    const Scalar scale = resolve_scale<Scalar>(where, options, heads.dk);
    check_score_terms(where, options, num_heads);
    mask.validate(where, num_heads, batch.query_lengths(), batch.key_lengths());
    return {heads, scale};
}

}  // namespace detail
}  // namespace mha
