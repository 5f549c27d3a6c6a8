// SPDX-License-Identifier: MIT
/// @file
/// The multi-head attention core on bfloat16 storage: Q, K and V in Eigen::bfloat16, the scores,
/// the softmax and the sums in fp32, the output in float or bfloat16. The shapes and the
/// semantics are those of the float core (mha/attention.hpp, which includes this header); the
/// kernel is detail/tiled/forward_bf16.hpp, with vdpbf16ps register tiles where the compiler
/// targets AVX512-BF16.
#pragma once

#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/call_checks.hpp>
#include <mha/detail/check.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/score_terms.hpp>
#include <mha/detail/tiled/forward_bf16.hpp>
#include <mha/mask.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

/// multi_head_attention_core on bfloat16 Q, K and V with the bf16 block kernels `Kernel` (the
/// public overload takes the one the translation unit is compiled for; tests force either).
/// `workspace`: the kernel's buffers kept between calls (null: local to the call); with a float
/// `out` and no log-sum-exp, a call of a shape the workspace has served allocates nothing.
template <bf16_kernel Kernel, class DQ, class DK, class DV, class DO>
attention_outputs<float> multi_head_attention_core_bf16(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DO>& out_, const attention_mask<float>& mask,
    const attention_options& options, const attention_request& request,
    const tiled_settings& cfg = {}, bf16_workspace* workspace = nullptr) {
    using bf16 = Eigen::bfloat16;
    using OutScalar = typename DO::Scalar;
    static_assert(
        same_scalars_v<bf16, typename DQ::Scalar, typename DK::Scalar, typename DV::Scalar>,
        "mha: bf16 attention takes q, k and v all as Eigen::bfloat16");
    static_assert(std::is_same_v<OutScalar, float> || std::is_same_v<OutScalar, bf16>,
                  "mha: the output of bf16 attention is float or Eigen::bfloat16");
    constexpr const char* where = "mha::multi_head_attention_core (bfloat16)";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    const auto checked =
        check_core_call(where, num_heads, num_kv_heads, batch, q, k, v, "out", out, mask, options);
    const head_layout heads = checked.heads;
    const float scale = checked.scale;
    check_request(where, options, request);
    if (options.normalize != normalization::softmax)
        fail<value_error>(where, "options.normalize", "softmax (the only bf16 kernel)",
                          to_string(options.normalize));
    if (options.algorithm == attention_algorithm::materialized)
        fail<value_error>(where, "options.algorithm",
                          "automatic or tiled (bf16 has no "
                          "materialised kernel)",
                          "materialized");
    if (request.weights != weights_mode::none)
        fail<value_error>(where, "request.weights",
                          "weights_mode::none (bf16 does not return "
                          "weights yet)",
                          "a weights mode");
    attention_outputs<float> outputs;
    if (request.log_sum_exp)
        outputs.log_sum_exp.setConstant(num_heads, q.cols(),
                                        std::numeric_limits<float>::quiet_NaN());
    matrix<float>* lse = request.log_sum_exp ? &outputs.log_sum_exp : nullptr;
    using bf16_ref = Eigen::Ref<const Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic>, 0,
                                Eigen::OuterStride<>>;
    const bf16_ref qr(q.derived()), kr(k.derived()), vr(v.derived());
    auto run = [&](matrix_ref<float> o) {
        check_bytes_apart(where, "out", o, "q", qr);
        check_bytes_apart(where, "out", o, "k", kr);
        check_bytes_apart(where, "out", o, "v", vr);
        const bf16_attention_problem problem{
            qr, kr, vr, o, heads, batch, mask, scale, request.log_sum_exp, nullptr, &options};
        tiled_attention_bf16<Kernel>(problem, lse, cfg, workspace);
    };
    if constexpr (std::is_same_v<OutScalar, float>) {
        with_matrix_ref<float>(out, run);
    } else {
        // A bf16 output: the fp32 result rounded once (nearest-even).
        matrix<float> tmp(out.rows(), out.cols());
        run(matrix_ref<float>(tmp));
        out = tmp.template cast<bf16>();
    }
    return outputs;
}

}  // namespace detail

/// The buffers of the bfloat16 `multi_head_attention_core`, kept between calls (as
/// core_workspace for float): once a call with a float `out` has run with given shapes (and
/// thread count), later calls with those shapes allocate nothing. Among them, the native
/// kernel's keys and values packed once per call (as much memory as K and V): without a
/// workspace, each call takes that memory anew from the system. One workspace per thread.
struct bf16_core_workspace {
    detail::bf16_workspace internal;  ///< the kernel's buffers; internal
};

/// The multi-head attention core on bfloat16 storage: q, k and v are Eigen::bfloat16 matrices
/// (shapes as the float overload), the scores, softmax and sums are computed in fp32, and `out`
/// is float or Eigen::bfloat16 (then the fp32 result rounded once). Masks are fp32. Runs the
/// tiled kernel with vdpbf16ps where the compiler targets AVX512-BF16, with fp32 arithmetic on
/// widened values elsewhere; P is rounded to bf16 for the P·V product (error bound:
/// docs/performance.md, "bfloat16"). Returns the log-sum-exp when `request` asks for it.
/// Soft-capping, ALiBi and sinks (`options`) apply to the fp32 scores as in the float core. Not
/// yet for bf16 (value_error): weights, normalisations other than softmax, the materialised
/// algorithm.
template <class DQ, class DK, class DV, class DO,
          std::enable_if_t<detail::is_bfloat16_v<typename DQ::Scalar>, int> = 0>
attention_outputs<float> multi_head_attention_core(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DO>& out, const attention_mask<float>& mask = {},
    const attention_options& options = {}, const attention_request& request = {}) {
    return detail::multi_head_attention_core_bf16<detail::default_bf16_kernel>(
        q, k, v, num_heads, num_kv_heads, batch, out, mask, options, request);
}

/// The bfloat16 multi-head attention core (see the overload above) with the buffers of
/// `workspace`, kept for the next call.
template <class DQ, class DK, class DV, class DO,
          std::enable_if_t<detail::is_bfloat16_v<typename DQ::Scalar>, int> = 0>
attention_outputs<float> multi_head_attention_core(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DO>& out, const attention_mask<float>& mask,
    const attention_options& options, const attention_request& request,
    bf16_core_workspace& workspace) {
    return detail::multi_head_attention_core_bf16<detail::default_bf16_kernel>(
        q, k, v, num_heads, num_kv_heads, batch, out, mask, options, request, {},
        &workspace.internal);
}

/// The bfloat16 multi-head attention core with as many key/value heads as query heads (see the
/// overload above).
template <class DQ, class DK, class DV, class DO,
          std::enable_if_t<detail::is_bfloat16_v<typename DQ::Scalar>, int> = 0>
attention_outputs<float> multi_head_attention_core(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, const packed_batch& batch, const Eigen::MatrixBase<DO>& out,
    const attention_mask<float>& mask = {}, const attention_options& options = {},
    const attention_request& request = {}) {
    return detail::multi_head_attention_core_bf16<detail::default_bf16_kernel>(
        q, k, v, num_heads, num_heads, batch, out, mask, options, request);
}

}  // namespace mha
