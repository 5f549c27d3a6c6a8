// SPDX-License-Identifier: MIT
/// @file
/// What the fp32 and the bf16 layers' decoding steps share: the checks of a step (every one
/// before any cache changes) and the bookkeeping that appends each sequence's new keys and values
/// to its cache and describes the step to the attention kernel (new tokens as queries, each
/// cache's tokens as that sequence's keys, causal or the caches' window).
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include <mha/attention_config.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/check.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/kv_cache.hpp>
#include <mha/mask.hpp>

namespace mha {
namespace detail {

/// What a decoding step keeps between calls besides the forward buffers: its batch (new tokens
/// as queries, cached tokens as keys), where each sequence's cache is, and its mask. `Scalar`:
/// the cache's element type; `MaskScalar`: the mask's (float for a bf16 cache).
template <class Scalar, class MaskScalar = Scalar>
struct decode_buffers {
    packed_batch batch;
    std::vector<Index> cached_tokens;                  // key length of each sequence
    std::vector<sequence_keys_values<Scalar>> caches;  // where each sequence's keys are
    attention_mask<MaskScalar> mask;                   // causal, or the caches' window
    Index mask_window = -1;                            // the window `mask` was built for
    std::vector<Index> one_length;                     // a single sequence's step
    std::vector<kv_cache<Scalar>*> one_cache;
};

/// Every check of a decoding step of a layer with resolved config `c`, before any cache
/// changes: x is E × Σ new_tokens, out is E × x.cols(), one distinct cache of the layer's widths
/// per sequence, every cache with room for its new tokens and the same window. `fused`: the
/// layer has self-attention weights (decoding is self-attention).
template <class Scalar>
void check_decode_step(const char* where, const attention_config& c, bool fused, Index x_rows,
                       Index x_cols, const std::vector<Index>& new_tokens,
                       const std::vector<kv_cache<Scalar>*>& caches, Index out_rows,
                       Index out_cols) {
    if (!fused)
        fail<value_error>(
            where, "the layer's key_input_dim and value_input_dim",
            "embed_dim = " + std::to_string(c.embed_dim) + " (decoding is self-attention)",
            std::to_string(c.key_input_dim) + " and " + std::to_string(c.value_input_dim));
    // The token count is checked below, against the sum of new_tokens; a width in the columns
    // is hint enough here.
    check_token_rows(where, "x.rows()", c.embed_dim, x_rows, "embed_dim", -1, x_cols);
    check_size(where, "caches.size()", static_cast<Index>(new_tokens.size()),
               static_cast<Index>(caches.size()), "new_tokens.size()");
    const Index key_width = c.num_kv_heads * c.head_dim;
    const Index value_width = c.num_kv_heads * c.value_head_dim;
    // Names are built only on failure: a valid step allocates nothing.
    auto name = [](const char* vector, std::size_t b, const char* member = "") {
        return std::string(vector) + "[" + std::to_string(b) + "]" + member;
    };
    Index total = 0;
    for (std::size_t b = 0; b < caches.size(); ++b) {
        if (new_tokens[b] < 0)
            fail<value_error>(where, name("new_tokens", b), ">= 0", new_tokens[b]);
        total += new_tokens[b];
        if (caches[b] == nullptr) fail<value_error>(where, name("caches", b), "a cache", "null");
        const kv_cache<Scalar>& cache = *caches[b];
        if (cache.key_rows() != key_width)
            check_size(where, name("caches", b, "->key_rows()"), key_width, cache.key_rows(),
                       "the layer's key_width(), H_kv·d_k");
        if (cache.value_rows() != value_width)
            check_size(where, name("caches", b, "->value_rows()"), value_width, cache.value_rows(),
                       "the layer's value_width(), H_kv·d_v");
        if (cache.window() != caches.front()->window())
            check_size(where, name("caches", b, "->window()"), caches.front()->window(),
                       cache.window(), "caches[0]->window(): one step has one mask");
        for (std::size_t o = 0; o < b; ++o)
            if (caches[o] == caches[b])
                fail<value_error>(where, name("caches", b),
                                  "a cache no other sequence of the step uses",
                                  "the cache of sequence " + std::to_string(o));
        cache.check_append(new_tokens[b]);
    }
    check_size(where, "x.cols()", total, x_cols, "the sum of new_tokens");
    check_size(where, "out.rows()", c.embed_dim, out_rows, "embed_dim");
    check_size(where, "out.cols()", x_cols, out_cols, "x.cols()");
    if (c.attention.scale && !std::isfinite(*c.attention.scale))
        fail<value_error>(where, "attention.scale", "finite", *c.attention.scale);
}

/// Appends sequence b's new keys and values (columns column … column + new_tokens[b] − 1 of k_new
/// and v_new, after `before_append(b, column, n, cache)` has had its say, e.g. rotating them) to
/// its cache, then fills `d` with the step's batch, each sequence's cache and the mask. The step
/// must have passed check_decode_step.
template <class Scalar, class MaskScalar, class KNew, class VNew, class BeforeAppend>
void append_decode_step(decode_buffers<Scalar, MaskScalar>& d, const std::vector<Index>& new_tokens,
                        const std::vector<kv_cache<Scalar>*>& caches, const KNew& k_new,
                        const VNew& v_new, BeforeAppend&& before_append) {
    d.cached_tokens.resize(caches.size());
    d.caches.resize(caches.size());
    Index column = 0;
    for (std::size_t b = 0; b < caches.size(); ++b) {
        kv_cache<Scalar>& cache = *caches[b];
        const Index n = new_tokens[b];
        if (n > 0) {
            before_append(b, column, n, cache);
            cache.append(k_new.middleCols(column, n), v_new.middleCols(column, n));
        }
        column += n;
        d.cached_tokens[b] = cache.size();
        d.caches[b] = {cache.keys().data(), cache.values().data(), cache.key_rows(),
                       cache.value_rows()};
    }
    d.batch.assign(new_tokens, d.cached_tokens);
    const Index window = caches.empty() ? 0 : caches.front()->window();
    if (d.mask_window != window) {
        d.mask = window > 0 ? attention_mask<MaskScalar>(sliding_window{window - 1, 0})
                            : attention_mask<MaskScalar>(causal{});
        d.mask_window = window;
    }
}

}  // namespace detail
}  // namespace mha
