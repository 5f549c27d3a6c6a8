// SPDX-License-Identifier: MIT
/// @file
/// `mha::load_hugging_face_attention`: a layer from the tensors of a Hugging Face transformers
/// attention module (`q_proj`, `k_proj`, `v_proj`, `o_proj` or `out_proj`, optional biases and
/// sinks).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <mha/core.hpp>
#include <mha/io/safetensors/file.hpp>
#include <mha/io/safetensors/format.hpp>
#include <mha/multi_head_attention.hpp>

namespace mha {

/// The layer whose weights follow the Hugging Face transformers names of an attention module
/// (Llama, Mistral, Qwen2, BART, OPT, Whisper, ...), names prefixed by `prefix` (e.g.
/// "model.layers.0.self_attn."):
///
/// | file | here |
/// |---|---|
/// | `q_proj.weight` (H·d_k × E) | `w_q` |
/// | `k_proj.weight` (H_kv·d_k × kdim) | `w_k` |
/// | `v_proj.weight` (H_kv·d_v × vdim) | `w_v` |
/// | `o_proj.weight` or `out_proj.weight` (E × H·d_v) | `w_o` |
/// | `q_proj.bias`, `k_proj.bias`, `v_proj.bias`, `o_proj.bias` / `out_proj.bias` | `b_q`, `b_k`,
/// `b_v`, `b_o` |
/// | `sinks` (H), optional (gpt-oss) | `config().attention.sinks` |
///
/// Each is an `nn.Linear` weight (out × in, y = W·x + b), the library's convention, so nothing is
/// transposed. Biases are optional one by one: with none the layer has no bias; with some (Qwen2
/// has q, k and v biases but none on o_proj) the absent ones are zero. Exactly one of `o_proj`
/// and `out_proj` must be present. Neither the head counts nor a rotary embedding (Llama applies
/// RoPE to Q and K) are in these tensors: `num_heads` and `num_kv_heads` are arguments, and
/// `base` supplies the settings the file cannot (rotary, scale, normalisation, algorithm); its
/// widths are ignored. Every tensor must be Scalar's dtype (or F16, BF16); a missing or
/// misshapen one is a format_error naming it.
template <class Scalar>
multi_head_attention<Scalar> load_hugging_face_attention(const safetensors_file& file,
                                                         Index num_heads, Index num_kv_heads,
                                                         const std::string& prefix = "",
                                                         const attention_config& base = {}) {
    constexpr const char* where = "mha::load_hugging_face_attention";
    const auto n = [&prefix](const std::string& name) { return prefix + name; };
    if (num_heads <= 0) detail::fail<value_error>(where, "num_heads", ">= 1", num_heads);
    if (num_kv_heads <= 0) detail::fail<value_error>(where, "num_kv_heads", ">= 1", num_kv_heads);
    if (num_heads % num_kv_heads != 0)
        detail::fail<shape_error>(where, "num_heads",
                                  "a multiple of num_kv_heads = " + std::to_string(num_kv_heads),
                                  num_heads);
    const bool o_proj = file.contains(n("o_proj.weight"));
    const bool out_proj = file.contains(n("out_proj.weight"));
    if (o_proj == out_proj)
        detail::fail<format_error>(
            where, "tensors '" + n("o_proj.weight") + "' and '" + n("out_proj.weight") + "'",
            "exactly one present", o_proj ? "both" : "neither");
    const std::string out_name = o_proj ? "o_proj" : "out_proj";

    // A 2-D tensor's shape, after checking its dtype and rank.
    const auto shape_of = [&](const std::string& name) {
        const tensor_info& t = file.expect<Scalar>(n(name));
        if (t.shape.size() != 2)
            detail::fail<format_error>(where, "shape of tensor '" + n(name) + "'",
                                       "2-D (out_features, in_features)",
                                       detail::shape_text(t.shape));
        return t.shape;
    };
    const auto o = shape_of(out_name + ".weight");
    const auto q = shape_of("q_proj.weight");
    const auto k = shape_of("k_proj.weight");
    const auto v = shape_of("v_proj.weight");
    const std::int64_t e = o[0];
    const auto require = [&](const std::string& name, bool ok, const std::string& expected,
                             const std::vector<std::int64_t>& shape) {
        if (!ok)
            detail::fail<format_error>(where, "shape of tensor '" + n(name) + "'", expected,
                                       detail::shape_text(shape));
    };
    require("q_proj.weight", q[1] == e && q[0] % num_heads == 0,
            "(a multiple of num_heads = " + std::to_string(num_heads) +
                ", embed_dim = " + std::to_string(e) + ")",
            q);
    require(out_name + ".weight", o[1] % num_heads == 0,
            "(embed_dim, a multiple of num_heads = " + std::to_string(num_heads) + ")", o);
    const std::int64_t head_dim = q[0] / num_heads, value_head_dim = o[1] / num_heads;
    require("k_proj.weight", k[0] == num_kv_heads * head_dim,
            "(" + std::to_string(num_kv_heads * head_dim) + " (num_kv_heads · d_k), kdim)", k);
    require("v_proj.weight", v[0] == num_kv_heads * value_head_dim,
            "(" + std::to_string(num_kv_heads * value_head_dim) + " (num_kv_heads · d_v), vdim)",
            v);

    attention_config config = base;
    config.embed_dim = e;
    config.num_heads = num_heads;
    config.num_kv_heads = num_kv_heads;
    config.head_dim = head_dim;
    config.value_head_dim = value_head_dim;
    config.key_input_dim = k[1];
    config.value_input_dim = v[1];
    attention_parameters<Scalar> p;
    p.w_q = file.as_matrix<Scalar>(n("q_proj.weight"));
    p.w_k = file.as_matrix<Scalar>(n("k_proj.weight"));
    p.w_v = file.as_matrix<Scalar>(n("v_proj.weight"));
    p.w_o = file.as_matrix<Scalar>(n(out_name + ".weight"));
    const std::string bias_names[] = {"q_proj.bias", "k_proj.bias", "v_proj.bias",
                                      out_name + ".bias"};
    const std::int64_t bias_sizes[] = {q[0], k[0], v[0], e};
    vector<Scalar>* biases[] = {&p.b_q, &p.b_k, &p.b_v, &p.b_o};
    config.bias = false;
    for (const auto& name : bias_names)
        config.bias = config.bias || file.contains(n(name));
    if (config.bias) {
        for (int i = 0; i < 4; ++i) {
            if (!file.contains(n(bias_names[i]))) {
                *biases[i] = vector<Scalar>::Zero(bias_sizes[i]);
                continue;
            }
            file.expect<Scalar>(n(bias_names[i]), {bias_sizes[i]});
            *biases[i] = file.as_vector<Scalar>(n(bias_names[i]));
        }
    }
    // gpt-oss's per-head sink logits: they take part in the softmax normaliser (one value per
    // query head), configuration rather than a parameter here (docs/score_modifiers.md).
    if (file.contains(n("sinks"))) {
        file.expect<Scalar>(n("sinks"), {num_heads});
        const vector<Scalar> sinks = file.as_vector<Scalar>(n("sinks"));
        config.attention.sinks.assign(sinks.data(), sinks.data() + sinks.size());
    }
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
    try {
        return multi_head_attention<Scalar>(config, p);
    } catch (const format_error&) {
        throw;
    } catch (const invalid_argument& refused) {
        detail::fail<format_error>(where, "the weights in " + file.source(), "a valid layer",
                                   std::string("one the layer refuses (") + refused.what() + ")");
    }
#else
    return multi_head_attention<Scalar>(config, p);
#endif
}

}  // namespace mha
