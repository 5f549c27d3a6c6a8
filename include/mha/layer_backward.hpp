// SPDX-License-Identifier: MIT
// The backward pass of the multi-head attention layer: a forward that keeps what the backward
// needs (`layer_saved_state`), and the backward that turns the gradient of a loss with respect
// to the layer's output into gradients with respect to its inputs and parameters. The layer's
// member functions `forward_for_backward` and `backward` call these with its configuration and
// parameters.
//
// With X_q, X_k, X_v the inputs, Q = W_q·X_q + b_q (likewise K, V), A = attention(Q, K, V) the
// concatenated heads and Y = W_o·A + b_o the output, the backward for dY is
//   dW_o = dY·Aᵀ,  db_o = dY·1,  dA = W_oᵀ·dY,  (dQ, dK, dV) = the core's backward for dA,
//   dW_q = dQ·X_qᵀ,  db_q = dQ·1,  dX_q = W_qᵀ·dQ  (likewise for K and V).
// With rotary positions Q and K are turned after the projection (Q = μR·(W_q·X_q + b_q)), so dQ
// and dK are turned back by the transpose μRᵀ before the projections' backward.
#pragma once

#include <utility>
#include <vector>

#include <mha/attention.hpp>
#include <mha/attention_backward.hpp>
#include <mha/attention_config.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/detail/layer_parameters.hpp>
#include <mha/detail/rotary_positions.hpp>
#include <mha/mask.hpp>
#include <mha/options.hpp>
#include <mha/projection.hpp>
#include <mha/rotary.hpp>

namespace mha {

/// What a forward keeps for the backward: the inputs (the weight gradients are products with
/// them), the projected Q, K and V, the concatenated heads before the output projection, the
/// per-query log-sum-exp (softmax), the batch, the mask and the output. Memory, in scalars:
/// E·Nq (+ (kdim + vdim)·Nk for cross-attention) for the inputs, (H·d_k + H·d_v + E + H)·Nq
/// for Q, the heads, the output and the log-sum-exp, H_kv·(d_k + d_v)·Nk for K and V; nothing
/// grows with Lq·Lk.
template <class Scalar>
struct layer_saved_state {
    /// Whether one input served as query, key and value (then key_input and value_input are
    /// empty and query_input holds it).
    bool self_attention = false;
    matrix<Scalar> query_input;  ///< E × Nq
    matrix<Scalar> key_input;    ///< key_input_dim × Nk (empty for self-attention)
    matrix<Scalar> value_input;  ///< value_input_dim × Nk (empty for self-attention)
    matrix<Scalar> q;            ///< H·d_k × Nq, projected
    matrix<Scalar> k;            ///< H_kv·d_k × Nk, projected
    matrix<Scalar> v;            ///< H_kv·d_v × Nk, projected
    matrix<Scalar> heads;        ///< H·d_v × Nq: the attention output before W_o
    /// H × Nq for softmax (see attention_outputs::log_sum_exp), else empty. The tiled backward
    /// recomputes each head's weights from Q, K and it (with `heads`, the forward's output).
    matrix<Scalar> log_sum_exp;
    matrix<Scalar> output;        ///< E × Nq: the layer's output
    packed_batch batch;           ///< the forward's batch
    attention_mask<Scalar> mask;  ///< the forward's mask
};

/// The gradients of a loss with respect to a layer's inputs and parameters.
template <class Scalar>
struct layer_gradients {
    /// ∂loss/∂(query input), E × Nq. For self-attention it is the gradient with respect to the
    /// one input x: the three uses (query, key, value) summed.
    matrix<Scalar> d_query;
    /// ∂loss/∂(key input) for cross-attention; empty for self-attention (its share is in
    /// d_query).
    matrix<Scalar> d_key;
    /// ∂loss/∂(value input) for cross-attention; empty for self-attention (its share is in
    /// d_query).
    matrix<Scalar> d_value;
    /// ∂loss/∂ each parameter, shaped like `attention_parameters` (biases of size 0 when the
    /// layer has none).
    attention_parameters<Scalar> parameters;
    /// With `config().attention.sinks`: ∂loss/∂sinks[h] for every query head h. Else empty.
    std::vector<Scalar> d_sinks;
};

namespace detail {

/// y = w·x + b into `out`, by the product the layer's forward projects with (linear_into), so
/// that the saved activations are the forward's bits.
template <class Scalar>
void project(const matrix<Scalar>& w, const vector<Scalar>& b, const matrix<Scalar>& x,
             matrix<Scalar>& out, std::vector<gemm_buffers<Scalar>>& gemm) {
    out.resize(w.rows(), x.cols());
    linear_into(w, b, x, out, &gemm);
}

/// dW = dY·Xᵀ, db = dY·1, and dX = Wᵀ·dY of y = w·x + b.
template <class Scalar>
void project_backward(const matrix<Scalar>& w, bool bias, const matrix<Scalar>& x,
                      const matrix<Scalar>& dy, matrix<Scalar>& dw, vector<Scalar>& db,
                      matrix<Scalar>& dx, std::vector<gemm_buffers<Scalar>>& gemm, int threads) {
    dw.resize(w.rows(), w.cols());
    product_into(dw, dy, x.transpose(), Scalar(1), &gemm, threads);
    if (bias)
        db = dy.rowwise().sum();
    else
        db.resize(0);
    dx.resize(w.cols(), dy.cols());
    product_into(dx, w.transpose(), dy, Scalar(1), &gemm, threads);
}

}  // namespace detail

/// The layer's forward (config and parameters as the layer holds them, `config` resolved) on
/// query, key and value inputs, keeping what `layer_backward` needs. `self_attention`: the three
/// inputs are one (only `query` is kept). With `config.rotary`, the saved Q and K are the
/// turned ones, as the core saw them.
template <class Scalar>
layer_saved_state<Scalar> layer_forward_for_backward(const attention_config& config,
                                                     const attention_parameters<Scalar>& p,
                                                     const Eigen::Ref<const matrix<Scalar>>& query,
                                                     const Eigen::Ref<const matrix<Scalar>>& key,
                                                     const Eigen::Ref<const matrix<Scalar>>& value,
                                                     bool self_attention, const packed_batch& batch,
                                                     const attention_mask<Scalar>& mask = {}) {
    constexpr const char* where = "mha::layer_forward_for_backward";
    detail::check_parameters(where, config, p);
    detail::check_size(where, "query.rows()", config.embed_dim, query.rows(), "embed_dim");
    detail::check_size(where, "key.rows()", config.key_input_dim, key.rows(), "key_input_dim");
    detail::check_size(where, "value.rows()", config.value_input_dim, value.rows(),
                       "value_input_dim");
    detail::check_size(where, "query.cols()", batch.total_queries(), query.cols(),
                       "the batch's total query count");
    detail::check_size(where, "key.cols()", batch.total_keys(), key.cols(),
                       "the batch's total key count");
    detail::check_size(where, "value.cols()", key.cols(), value.cols(), "key.cols()");
    layer_saved_state<Scalar> s;
    s.self_attention = self_attention;
    s.query_input = query;
    if (!self_attention) {
        s.key_input = key;
        s.value_input = value;
    }
    s.batch = batch;
    s.mask = mask;
    std::vector<detail::gemm_buffers<Scalar>> gemm;
    detail::project(p.w_q, p.b_q, s.query_input, s.q, gemm);
    detail::project(p.w_k, p.b_k, self_attention ? s.query_input : s.key_input, s.k, gemm);
    detail::project(p.w_v, p.b_v, self_attention ? s.query_input : s.value_input, s.v, gemm);
    if (config.rotary)
        detail::rotate_packed(rotary_embedding<Scalar>(*config.rotary, config.head_dim), s.q, s.k,
                              batch, config.num_heads, config.num_kv_heads);
    s.heads.resize(config.num_heads * config.value_head_dim, query.cols());
    attention_request request;
    request.log_sum_exp = config.attention.normalize == normalization::softmax;
    auto outputs = multi_head_attention_core(s.q, s.k, s.v, config.num_heads, config.num_kv_heads,
                                             batch, s.heads, mask, config.attention, request);
    s.log_sum_exp = std::move(outputs.log_sum_exp);
    detail::project(p.w_o, p.b_o, s.heads, s.output, gemm);
    return s;
}

/// The layer's backward: the gradients of a loss with respect to the inputs and parameters of
/// the forward that produced `saved`, given `d_output` = ∂loss/∂output (E × Nq). `threads`: 0
/// for OpenMP's default; the results do not depend on it.
template <class Scalar>
layer_gradients<Scalar> layer_backward(const attention_config& config,
                                       const attention_parameters<Scalar>& p,
                                       const layer_saved_state<Scalar>& saved,
                                       const Eigen::Ref<const matrix<Scalar>>& d_output,
                                       int threads = 0) {
    constexpr const char* where = "mha::layer_backward";
    detail::check_parameters(where, config, p);
    // The saved state must come from a forward of a layer of this shape.
    detail::check_size(where, "saved.query_input.rows()", config.embed_dim,
                       saved.query_input.rows(), "embed_dim");
    detail::check_size(where, "saved.heads.rows()", config.num_heads * config.value_head_dim,
                       saved.heads.rows(), "num_heads · value_head_dim");
    if (!saved.self_attention) {
        detail::check_size(where, "saved.key_input.rows()", config.key_input_dim,
                           saved.key_input.rows(), "key_input_dim");
        detail::check_size(where, "saved.value_input.rows()", config.value_input_dim,
                           saved.value_input.rows(), "value_input_dim");
    }
    detail::check_size(where, "d_output.rows()", config.embed_dim, d_output.rows(), "embed_dim");
    detail::check_size(where, "d_output.cols()", saved.output.cols(), d_output.cols(),
                       "the saved forward's query count");
    layer_gradients<Scalar> g;
    std::vector<detail::gemm_buffers<Scalar>> gemm;
    const matrix<Scalar> dy = d_output;
    matrix<Scalar> d_heads;  // H·d_v × Nq
    detail::project_backward(p.w_o, config.bias, saved.heads, dy, g.parameters.w_o,
                             g.parameters.b_o, d_heads, gemm, threads);
    backward_request request;
    request.threads = threads;
    // The forward's output and log-sum-exp, so that the tiled backward runs no forward of its
    // own (the materialised one does not read them).
    attention_forward_results<Scalar> forward;
    if (saved.log_sum_exp.rows() == config.num_heads &&
        saved.log_sum_exp.cols() == saved.heads.cols()) {
        forward.output = &saved.heads;
        forward.log_sum_exp = &saved.log_sum_exp;
    }
    const attention_gradients<Scalar> core = multi_head_attention_core_backward(
        saved.q, saved.k, saved.v, config.num_heads, config.num_kv_heads, saved.batch, d_heads,
        forward, saved.mask, config.attention, request);
    g.d_sinks = core.d_sinks;
    const matrix<Scalar>& key_input = saved.self_attention ? saved.query_input : saved.key_input;
    const matrix<Scalar>& value_input =
        saved.self_attention ? saved.query_input : saved.value_input;
    matrix<Scalar> d_key, d_value;
    // Through the rotation: gradients of the projected (unturned) Q and K.
    matrix<Scalar> dq_turned, dk_turned;
    if (config.rotary) {
        dq_turned = core.dq;
        dk_turned = core.dk;
        detail::rotate_packed(rotary_embedding<Scalar>(*config.rotary, config.head_dim), dq_turned,
                              dk_turned, saved.batch, config.num_heads, config.num_kv_heads, true);
    }
    const matrix<Scalar>& dq = config.rotary ? dq_turned : core.dq;
    const matrix<Scalar>& dk = config.rotary ? dk_turned : core.dk;
    detail::project_backward(p.w_q, config.bias, saved.query_input, dq, g.parameters.w_q,
                             g.parameters.b_q, g.d_query, gemm, threads);
    detail::project_backward(p.w_k, config.bias, key_input, dk, g.parameters.w_k, g.parameters.b_k,
                             d_key, gemm, threads);
    detail::project_backward(p.w_v, config.bias, value_input, core.dv, g.parameters.w_v,
                             g.parameters.b_v, d_value, gemm, threads);
    if (saved.self_attention) {
        g.d_query += d_key;  // query, then key, then value: a fixed order
        g.d_query += d_value;
    } else {
        g.d_key = std::move(d_key);
        g.d_value = std::move(d_value);
    }
    return g;
}

}  // namespace mha
