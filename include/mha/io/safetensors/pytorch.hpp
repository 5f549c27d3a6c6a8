// SPDX-License-Identifier: MIT
/// @file
/// A layer's weights under PyTorch `nn.MultiheadAttention`'s state_dict names:
/// `mha::load_multi_head_attention` reads them from a safetensors file,
/// `mha::save_multi_head_attention` writes them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <mha/core.hpp>
#include <mha/io/safetensors/file.hpp>
#include <mha/io/safetensors/format.hpp>
#include <mha/io/safetensors/writer.hpp>
#include <mha/multi_head_attention.hpp>

namespace mha {

/// The layer whose weights are a PyTorch `nn.MultiheadAttention` state_dict in `file`, names
/// prefixed by `prefix` (e.g. "encoder.self_attn."): `in_proj_weight` (3E × E) when PyTorch
/// packs the projections, else `q_proj_weight` (E × E), `k_proj_weight` (E × kdim) and
/// `v_proj_weight` (E × vdim); `in_proj_bias` (3E) and `out_proj.bias` (E) with bias=True;
/// `out_proj.weight` (E × E). The number of heads is not in a state_dict, so it is an argument.
/// The tensors' dtype must be Scalar's (F32 for float, F64 for double). `bias_k`/`bias_v`
/// (add_bias_kv=True) have no equivalent here and are refused.
///
/// The separate form also accepts what the library allows beyond PyTorch: H·d_k rows in
/// `q_proj_weight`, H_kv·d_k in `k_proj_weight` and H_kv·d_v in `v_proj_weight`, H·d_v columns
/// in `out_proj.weight` (grouped heads: `num_kv_heads` key/value heads, see the overload below).
template <class Scalar>
multi_head_attention<Scalar> load_multi_head_attention(const safetensors_file& file,
                                                       Index num_heads,
                                                       const std::string& prefix = "") {
    return load_multi_head_attention<Scalar>(file, num_heads, num_heads, prefix);
}

/// The layer with `num_kv_heads` key/value heads shared by groups of query heads (grouped-query
/// attention), from the separate form: `k_proj_weight` and `v_proj_weight` have H_kv·d_k and
/// H_kv·d_v rows, `in_proj_bias` has H·d_k + H_kv·(d_k + d_v) entries.
template <class Scalar>
multi_head_attention<Scalar> load_multi_head_attention(const safetensors_file& file,
                                                       Index num_heads, Index num_kv_heads,
                                                       const std::string& prefix = "") {
    constexpr const char* where = "mha::load_multi_head_attention";
    const auto n = [&prefix](const char* name) { return prefix + name; };
    if (num_heads <= 0) detail::fail<value_error>(where, "num_heads", ">= 1", num_heads);
    if (num_kv_heads <= 0) detail::fail<value_error>(where, "num_kv_heads", ">= 1", num_kv_heads);
    if (num_heads % num_kv_heads != 0)
        detail::fail<shape_error>(where, "num_heads",
                                  "a multiple of num_kv_heads = " + std::to_string(num_kv_heads),
                                  num_heads);
    for (const char* unsupported : {"bias_k", "bias_v"})
        if (file.contains(n(unsupported)))
            detail::fail<format_error>(where, "tensor '" + n(unsupported) + "'",
                                       "absent (add_bias_kv=True is not supported)", "present");

    const tensor_info& out_w = file.expect<Scalar>(n("out_proj.weight"));
    if (out_w.shape.size() != 2)
        detail::fail<format_error>(where, "shape of tensor '" + n("out_proj.weight") + "'",
                                   "(embed_dim, H·d_v)", detail::shape_text(out_w.shape));
    const std::int64_t e = out_w.shape[0];
    const std::int64_t vw = out_w.shape[1];
    const auto fail_heads = [&](const std::string& tensor, std::int64_t width) {
        detail::fail<format_error>(where, "rows of tensor '" + tensor + "'",
                                   "a multiple of num_heads = " + std::to_string(num_heads), width);
    };

    attention_config config;
    config.embed_dim = e;
    config.num_heads = num_heads;
    config.num_kv_heads = num_kv_heads;
    config.bias = file.contains(n("in_proj_bias"));
    if (file.contains(n("out_proj.bias")) != config.bias)
        detail::fail<format_error>(
            where, "tensor '" + n("out_proj.bias") + "'",
            config.bias ? "present (in_proj_bias is)" : "absent (in_proj_bias is)",
            config.bias ? "absent" : "present");

    attention_parameters<Scalar> p;
    std::int64_t qk = 0, kw = 0, kvw = 0;
    if (file.contains(n("in_proj_weight"))) {
        if (num_kv_heads != num_heads)
            detail::fail<format_error>(where, "tensor '" + n("in_proj_weight") + "'",
                                       "absent with grouped heads (PyTorch packs only equal "
                                       "Q, K and V widths; give q_, k_, v_proj_weight)",
                                       "present");
        // PyTorch packs only when kdim = vdim = E, and then every block is E × E.
        if (e % num_heads != 0) fail_heads(n("out_proj.weight"), e);
        const Index three_e = detail::checked_mul<format_error>(
            where, "3 * embed_dim (rows of out_proj.weight)", 3, e);
        file.expect<Scalar>(n("in_proj_weight"), {three_e, e}, "(3·embed_dim, embed_dim)");
        file.expect<Scalar>(n("out_proj.weight"), {e, e}, "(embed_dim, embed_dim)");
        const matrix<Scalar> w = file.as_matrix<Scalar>(n("in_proj_weight"));
        qk = kw = kvw = e;
        p.w_q = w.topRows(e);
        p.w_k = w.middleRows(e, e);
        p.w_v = w.bottomRows(e);
    } else {
        if (!file.contains(n("q_proj_weight")))
            detail::fail<format_error>(
                where, "tensor '" + n("in_proj_weight") + "' or '" + n("q_proj_weight") + "'",
                "present", "neither");
        const tensor_info& q = file.expect<Scalar>(n("q_proj_weight"));
        if (q.shape.size() != 2 || q.shape[1] != e)
            detail::fail<format_error>(where, "shape of tensor '" + n("q_proj_weight") + "'",
                                       "(H·d_k, embed_dim = " + std::to_string(e) + ")",
                                       detail::shape_text(q.shape));
        qk = q.shape[0];
        if (qk % num_heads != 0) fail_heads(n("q_proj_weight"), qk);
        if (vw % num_heads != 0) fail_heads(n("v_proj_weight"), vw);
        const tensor_info& k = file.expect<Scalar>(n("k_proj_weight"));
        const tensor_info& v = file.expect<Scalar>(n("v_proj_weight"));
        const bool grouped = num_kv_heads != num_heads;
        kw = qk / num_heads * num_kv_heads;
        kvw = vw / num_heads * num_kv_heads;
        if (k.shape.size() != 2 || k.shape[0] != kw)
            detail::fail<format_error>(
                where, "shape of tensor '" + n("k_proj_weight") + "'",
                "(" + std::to_string(kw) +
                    (grouped ? " (num_kv_heads · d_k)" : " (rows of q_proj_weight)") + ", kdim)",
                detail::shape_text(k.shape));
        if (v.shape.size() != 2 || v.shape[0] != kvw)
            detail::fail<format_error>(
                where, "shape of tensor '" + n("v_proj_weight") + "'",
                "(" + std::to_string(kvw) +
                    (grouped ? " (num_kv_heads · d_v)" : " (columns of out_proj.weight)") +
                    ", vdim)",
                detail::shape_text(v.shape));
        config.head_dim = qk / num_heads;
        config.value_head_dim = vw / num_heads;
        config.key_input_dim = k.shape[1];
        config.value_input_dim = v.shape[1];
        p.w_q = file.as_matrix<Scalar>(n("q_proj_weight"));
        p.w_k = file.as_matrix<Scalar>(n("k_proj_weight"));
        p.w_v = file.as_matrix<Scalar>(n("v_proj_weight"));
    }
    p.w_o = file.as_matrix<Scalar>(n("out_proj.weight"));
    if (config.bias) {
        const Index in_bias = detail::checked_add<format_error>(
            where, "the size of in_proj_bias",
            detail::checked_add<format_error>(where, "the size of in_proj_bias", qk, kw), kvw);
        file.expect<Scalar>(
            n("in_proj_bias"), {in_bias},
            num_kv_heads == num_heads ? "(2·H·d_k + H·d_v)" : "(H·d_k + H_kv·d_k + H_kv·d_v)");
        file.expect<Scalar>(n("out_proj.bias"), {e}, "(embed_dim)");
        const vector<Scalar> b = file.as_vector<Scalar>(n("in_proj_bias"));
        p.b_q = b.head(qk);
        p.b_k = b.segment(qk, kw);
        p.b_v = b.tail(kvw);
        p.b_o = file.as_vector<Scalar>(n("out_proj.bias"));
    }
    // Shapes that agree with each other can still describe no layer (zero widths, a scale...):
    // the layer's own checks decide, and their verdict is a verdict on the file.
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

/// Adds `layer`'s weights to `out` under PyTorch's state_dict names (prefixed by `prefix`):
/// `in_proj_weight` when PyTorch would pack them (kdim = vdim = E, d_k = d_v = E/H, no grouped
/// heads), else the three separate projections; biases only when the layer has them. The head
/// counts are not stored: load with the same num_heads and num_kv_heads.
template <class Scalar>
void save_multi_head_attention(safetensors_writer& out, const multi_head_attention<Scalar>& layer,
                               const std::string& prefix = "") {
    const attention_config& c = layer.config();
    const attention_parameters<Scalar> p = layer.parameters();
    const bool packed = c.key_input_dim == c.embed_dim && c.value_input_dim == c.embed_dim &&
                        layer.qk_width() == c.embed_dim && layer.v_width() == c.embed_dim &&
                        c.num_kv_heads == c.num_heads;
    if (packed) {
        matrix<Scalar> w(3 * c.embed_dim, c.embed_dim);
        w << p.w_q, p.w_k, p.w_v;
        out.add_matrix(prefix + "in_proj_weight", w);
    } else {
        out.add_matrix(prefix + "q_proj_weight", p.w_q);
        out.add_matrix(prefix + "k_proj_weight", p.w_k);
        out.add_matrix(prefix + "v_proj_weight", p.w_v);
    }
    if (c.bias) {
        vector<Scalar> b(p.b_q.size() + p.b_k.size() + p.b_v.size());
        b << p.b_q, p.b_k, p.b_v;
        out.add_vector(prefix + "in_proj_bias", b);
    }
    out.add_matrix(prefix + "out_proj.weight", p.w_o);
    if (c.bias) out.add_vector(prefix + "out_proj.bias", p.b_o);
}

}  // namespace mha
