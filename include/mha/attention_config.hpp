// SPDX-License-Identifier: MIT
/// @file
/// What describes a multi-head attention layer apart from its code: its shape and settings
/// (`attention_config`) and its learned parameters (`attention_parameters`).
#pragma once

#include <cmath>
#include <optional>
#include <string>

#include <mha/core.hpp>
#include <mha/detail/score_terms.hpp>
#include <mha/options.hpp>
#include <mha/rotary.hpp>

namespace mha {

/// Shape and settings of a layer. Zero in a width means "the usual default".
struct attention_config {
    Index embed_dim = 0;            ///< E: width of the queries and of the output
    Index num_heads = 1;            ///< H
    Index head_dim = 0;             ///< d_k, per-head query/key width (0: E / H)
    Index value_head_dim = 0;       ///< d_v, per-head value width (0: d_k)
    Index key_input_dim = 0;        ///< width of the key source, PyTorch `kdim` (0: E)
    Index value_input_dim = 0;      ///< width of the value source, PyTorch `vdim` (0: E)
    bool bias = true;               ///< biases on the input and output projections
    attention_options attention{};  ///< scale and normalisation
    /// H_kv: key/value heads, each shared by H / H_kv consecutive query heads (grouped-query
    /// attention; 1 is multi-query). 0: H, one key/value head per query head. Last, so that
    /// configs written in order before it keep their meaning.
    Index num_kv_heads = 0;
    /// Rotary position embedding of Q and K after their projection (none when empty); see
    /// docs/positions.md. A token's position is its index in its sequence, or for decoding its
    /// cache position (kv_cache::position()).
    std::optional<rotary_options> rotary{};

    /// The same config with every default made explicit; throws on invalid values.
    attention_config resolved() const {
        constexpr const char* where = "mha::attention_config";
        attention_config c = *this;
        if (c.embed_dim <= 0) detail::fail<value_error>(where, "embed_dim", ">= 1", c.embed_dim);
        if (c.num_heads <= 0) detail::fail<value_error>(where, "num_heads", ">= 1", c.num_heads);
        if (c.num_kv_heads < 0)
            detail::fail<value_error>(where, "num_kv_heads", ">= 0", c.num_kv_heads);
        if (c.num_kv_heads == 0) c.num_kv_heads = c.num_heads;
        if (c.num_heads % c.num_kv_heads != 0)
            detail::fail<shape_error>(
                where, "num_heads",
                "a multiple of num_kv_heads = " + std::to_string(c.num_kv_heads), c.num_heads);
        if (c.head_dim < 0) detail::fail<value_error>(where, "head_dim", ">= 0", c.head_dim);
        if (c.value_head_dim < 0)
            detail::fail<value_error>(where, "value_head_dim", ">= 0", c.value_head_dim);
        if (c.key_input_dim < 0)
            detail::fail<value_error>(where, "key_input_dim", ">= 0", c.key_input_dim);
        if (c.value_input_dim < 0)
            detail::fail<value_error>(where, "value_input_dim", ">= 0", c.value_input_dim);
        if (c.head_dim == 0) {
            if (c.embed_dim % c.num_heads != 0)
                detail::fail<shape_error>(where, "embed_dim",
                                          "a multiple of num_heads = " +
                                              std::to_string(c.num_heads) + " (or set head_dim)",
                                          c.embed_dim);
            c.head_dim = c.embed_dim / c.num_heads;
        }
        if (c.value_head_dim == 0) c.value_head_dim = c.head_dim;
        if (c.key_input_dim == 0) c.key_input_dim = c.embed_dim;
        if (c.value_input_dim == 0) c.value_input_dim = c.embed_dim;
        // The layer sizes its weights and buffers from these products: refuse them before they
        // wrap around.
        const Index qk = detail::checked_mul<value_error>(where, "num_heads * head_dim",
                                                          c.num_heads, c.head_dim);
        const Index vw = detail::checked_mul<value_error>(where, "num_heads * value_head_dim",
                                                          c.num_heads, c.value_head_dim);
        detail::checked_add<value_error>(
            where, "2 * num_heads * head_dim + num_heads * value_head_dim",
            detail::checked_add<value_error>(where, "2 * num_heads * head_dim", qk, qk), vw);
        if (c.attention.scale && !std::isfinite(*c.attention.scale))
            detail::fail<value_error>(where, "attention.scale", "finite", *c.attention.scale);
        detail::check_score_terms(where, c.attention, c.num_heads, "attention.");
        if (c.rotary) {
            // Checks the rotary settings against d_k now, with their own messages.
            (void)rotary_embedding<double>(*c.rotary, c.head_dim);
            if (c.rotary->rotary_dim == 0) c.rotary->rotary_dim = c.head_dim;
        }
        return c;
    }
};

/// The learned parameters, in PyTorch's `Linear.weight` layout (out × in, y = W·x + b).
template <class Scalar>
struct attention_parameters {
    matrix<Scalar> w_q;  ///< (H·d_k) × E
    matrix<Scalar> w_k;  ///< (H_kv·d_k) × key_input_dim
    matrix<Scalar> w_v;  ///< (H_kv·d_v) × value_input_dim
    matrix<Scalar> w_o;  ///< E × (H·d_v)
    vector<Scalar> b_q;  ///< H·d_k, or size 0 without bias
    vector<Scalar> b_k;  ///< H_kv·d_k, or size 0
    vector<Scalar> b_v;  ///< H_kv·d_v, or size 0
    vector<Scalar> b_o;  ///< E, or size 0
};

}  // namespace mha
