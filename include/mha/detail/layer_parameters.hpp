// SPDX-License-Identifier: MIT
// The layer's parameters outside the layer: their shapes checked against a resolved config,
// PyTorch's seeded initialisation, and the split of PyTorch's packed input projection. Shared by
// multi_head_attention's constructors and the backward's entry points, so a parameter is judged
// and named the same way everywhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include <Eigen/Core>

#include <mha/attention_config.hpp>
#include <mha/core.hpp>
#include <mha/detail/check.hpp>

namespace mha {
namespace detail {

/// Throws shape_error unless matrix `m` (named `name`) is rows × cols.
template <class M>
void check_matrix_shape(const char* where, const char* name, const M& m, Index rows, Index cols,
                        const char* rows_meaning, const char* cols_meaning) {
    check_size(where, std::string(name) + ".rows()", rows, m.rows(), rows_meaning);
    check_size(where, std::string(name) + ".cols()", cols, m.cols(), cols_meaning);
}

/// Throws shape_error unless bias `b` (named `name`) has `size` entries (0: no bias configured).
template <class V>
void check_bias_size(const char* where, const char* name, const V& b, Index size,
                     const char* meaning) {
    check_size(where, std::string(name) + ".size()", size, b.size(),
               size == 0 ? "no bias configured" : meaning);
}

/// Throws shape_error unless the parameters have the shapes `c` (resolved) gives them.
template <class Scalar>
void check_parameters(const char* where, const attention_config& c,
                      const attention_parameters<Scalar>& p) {
    const Index qk = c.num_heads * c.head_dim, kw = c.num_kv_heads * c.head_dim;
    const Index kvw = c.num_kv_heads * c.value_head_dim, vw = c.num_heads * c.value_head_dim;
    check_matrix_shape(where, "parameters.w_q", p.w_q, qk, c.embed_dim, "num_heads · head_dim",
                       "embed_dim");
    check_matrix_shape(where, "parameters.w_k", p.w_k, kw, c.key_input_dim,
                       "num_kv_heads · head_dim", "key_input_dim");
    check_matrix_shape(where, "parameters.w_v", p.w_v, kvw, c.value_input_dim,
                       "num_kv_heads · value_head_dim", "value_input_dim");
    check_matrix_shape(where, "parameters.w_o", p.w_o, c.embed_dim, vw, "embed_dim",
                       "num_heads · value_head_dim");
    check_bias_size(where, "parameters.b_q", p.b_q, c.bias ? qk : 0, "num_heads · head_dim");
    check_bias_size(where, "parameters.b_k", p.b_k, c.bias ? kw : 0, "num_kv_heads · head_dim");
    check_bias_size(where, "parameters.b_v", p.b_v, c.bias ? kvw : 0,
                    "num_kv_heads · value_head_dim");
    check_bias_size(where, "parameters.b_o", p.b_o, c.bias ? c.embed_dim : 0, "embed_dim");
}

/// Deterministic parameters for config `c` (resolved) from `seed`, with PyTorch's distributions:
/// Xavier-uniform input projections (over the stacked [W_q; W_k; W_v] when all inputs have
/// width E, as PyTorch's `in_proj_weight`), U(±1/√(H·d_v)) for W_o, zero biases.
template <class Scalar>
attention_parameters<Scalar> seeded_parameters(const attention_config& c, std::uint64_t seed) {
    std::mt19937_64 engine(seed);
    // The standard fixes mt19937_64's output but not uniform_real_distribution's, so map the
    // bits to [−bound, bound) here to get the same numbers on every platform. Entries are drawn
    // in column-major order.
    auto uniform = [&engine](matrix<Scalar>& w, double bound) {
        for (Index col = 0; col < w.cols(); ++col)
            for (Index r = 0; r < w.rows(); ++r) {
                const double unit = static_cast<double>(engine() >> 11) * 0x1.0p-53;
                w(r, col) = static_cast<Scalar>((2.0 * unit - 1.0) * bound);
            }
    };
    auto xavier = [](Index fan_out, Index fan_in) {
        return std::sqrt(6.0 / static_cast<double>(fan_in + fan_out));
    };
    const Index qk = c.num_heads * c.head_dim, kw = c.num_kv_heads * c.head_dim;
    const Index kvw = c.num_kv_heads * c.value_head_dim, vw = c.num_heads * c.value_head_dim;
    attention_parameters<Scalar> p;
    if (c.key_input_dim == c.embed_dim && c.value_input_dim == c.embed_dim) {
        matrix<Scalar> stacked(qk + kw + kvw, c.embed_dim);  // [W_q; W_k; W_v], one draw
        uniform(stacked, xavier(stacked.rows(), stacked.cols()));
        p.w_q = stacked.topRows(qk);
        p.w_k = stacked.middleRows(qk, kw);
        p.w_v = stacked.bottomRows(kvw);
    } else {
        p.w_q.resize(qk, c.embed_dim);
        p.w_k.resize(kw, c.key_input_dim);
        p.w_v.resize(kvw, c.value_input_dim);
        uniform(p.w_q, xavier(p.w_q.rows(), p.w_q.cols()));
        uniform(p.w_k, xavier(p.w_k.rows(), p.w_k.cols()));
        uniform(p.w_v, xavier(p.w_v.rows(), p.w_v.cols()));
    }
    p.w_o.resize(c.embed_dim, vw);
    uniform(p.w_o, 1.0 / std::sqrt(static_cast<double>(vw)));
    if (c.bias) {
        p.b_q = vector<Scalar>::Zero(qk);
        p.b_k = vector<Scalar>::Zero(kw);
        p.b_v = vector<Scalar>::Zero(kvw);
        p.b_o = vector<Scalar>::Zero(c.embed_dim);
    }
    return p;
}

/// Sets p's W_q (and W_k, W_v when `weights_stacked`) from the stacked projection
/// [W_q; W_k; W_v] (rows qk, kw, vw) and, when `bias`, b_q, b_k and b_v from the stacked bias,
/// converted to Out: PyTorch's in_proj layout, which the layers keep when kdim = vdim = E.
template <class Out, class Weights, class Bias>
void split_stacked_projection(const Weights& w_in, const Bias& b_in, Index qk, Index kw, Index vw,
                              bool weights_stacked, bool bias, attention_parameters<Out>& p) {
    p.w_q = w_in.topRows(qk).template cast<Out>();
    if (weights_stacked) {
        p.w_k = w_in.middleRows(qk, kw).template cast<Out>();
        p.w_v = w_in.bottomRows(vw).template cast<Out>();
    }
    if (!bias) return;
    p.b_q = b_in.head(qk).template cast<Out>();
    p.b_k = b_in.segment(qk, kw).template cast<Out>();
    p.b_v = b_in.tail(vw).template cast<Out>();
}

/// The parameters in PyTorch's packed form, split: `in_proj_weight` rows [W_q; W_k; W_v] of
/// heights H·d_k, H_kv·d_k and H_kv·d_v, `in_proj_bias` likewise (size 0 without bias), and the
/// output projection. Checked under PyTorch's names. Needs kdim = vdim = E (config `c`
/// resolved), which is when PyTorch packs them.
template <class Scalar>
attention_parameters<Scalar> unpack_packed_parameters(
    const char* where, const attention_config& c,
    const Eigen::Ref<const matrix<Scalar>>& in_proj_weight,
    const Eigen::Ref<const vector<Scalar>>& in_proj_bias,
    const Eigen::Ref<const matrix<Scalar>>& out_weight,
    const Eigen::Ref<const vector<Scalar>>& out_bias) {
    const Index e = c.embed_dim;
    const Index qk = c.num_heads * c.head_dim, kw = c.num_kv_heads * c.head_dim;
    const Index kvw = c.num_kv_heads * c.value_head_dim, vw = c.num_heads * c.value_head_dim;
    // PyTorch packs q, k and v only when they all project from width E; a layer with other key
    // or value widths has separate weights (use the constructor taking them).
    if (c.key_input_dim != e)
        fail<value_error>(where, "config.key_input_dim",
                          "embed_dim = " + std::to_string(e) + " for packed weights",
                          c.key_input_dim);
    if (c.value_input_dim != e)
        fail<value_error>(where, "config.value_input_dim",
                          "embed_dim = " + std::to_string(e) + " for packed weights",
                          c.value_input_dim);
    check_matrix_shape(where, "in_proj_weight", in_proj_weight, qk + kw + kvw, e,
                       "H·d_k + H_kv·(d_k + d_v)", "embed_dim");
    check_matrix_shape(where, "out_proj.weight", out_weight, e, vw, "embed_dim",
                       "num_heads · value_head_dim");
    check_bias_size(where, "in_proj_bias", in_proj_bias, c.bias ? qk + kw + kvw : 0,
                    "in_proj_weight.rows()");
    check_bias_size(where, "out_proj.bias", out_bias, c.bias ? e : 0, "embed_dim");
    attention_parameters<Scalar> p;
    split_stacked_projection(in_proj_weight, in_proj_bias, qk, kw, kvw, true, c.bias, p);
    p.w_o = out_weight;
    if (c.bias) p.b_o = out_bias;
    return p;
}

}  // namespace detail
}  // namespace mha
