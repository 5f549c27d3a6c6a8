// SPDX-License-Identifier: MIT
// Rotary positions inside the layer (attention_config::rotary): the positions each token gets in
// forward (packed batches, grouped heads, partial width, both layouts) and in decode (the cache's
// positions, a sliding-window cache that keeps counting). The reference below rotates with its
// own plain formula, independent of mha/rotary.hpp (tested alone in test_rotary.cpp), and
// attends with the plain loops of support/reference.hpp.
//
// Tolerance: check B against the long-double reference with the layer's k = 4, whose derivation
// (200 seeds per case, the ratio to the plain-loop baseline) is in test_multi_head_attention.cpp.
// The rotation adds one rotation per feature pair (cos and sin of an angle computed in double,
// then 3 roundings in Scalar), which the baseline R_lp repeats in Scalar: the same order of
// error on both sides, so k is unchanged. A wrong position moves the scores by O(|q|·|k|·Δθ),
// far above that.
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>

#include <mha/multi_head_attention.hpp>

#include "check.hpp"
#include "reference.hpp"

using mha::Index;
using mha_test::mat;
using mha_test::vec;

namespace {

constexpr long double layer_baseline_k = 4;

/// support/reference.hpp's turn of one head's rows [0, r) at position p, the arithmetic in T.
template <class T>
void rotate_head(T* x, Index r, long double base, bool interleaved, Index position) {
    mha_test::for_each_rotary_pair(r, base, interleaved, position,
                                   [x](Index a, Index b, long double cl, long double sl) {
                                       const T c = static_cast<T>(cl), s = static_cast<T>(sl);
                                       const T xa = x[a], xb = x[b];
                                       x[a] = xa * c - xb * s;
                                       x[b] = xb * c + xa * s;
                                   });
}

struct rope_case {
    Index embed, heads, kv_heads, head_dim, rotary_dim;
    bool interleaved;
    std::vector<Index> lengths;  // a packed batch of self-attention sequences
};

/// The layer with rotary positions on a packed batch, causal within each sequence (or a window
/// of `window` keys), with plain loops in T.
template <class T>
mat<T> reference_rotary_layer(const mha_test::reference_params<T>& p, const rope_case& c,
                              const mat<T>& x, Index window) {
    const mat<T> q_all = mha_test::reference_linear(p.w_q, p.b_q, x);
    const mat<T> k_all = mha_test::reference_linear(p.w_k, p.b_k, x);
    const mat<T> v_all = mha_test::reference_linear(p.w_v, p.b_v, x);
    const Index d = c.head_dim, group = c.heads / c.kv_heads;
    mat<T> concat(c.heads * d, x.cols());
    Index at = 0;
    for (const Index len : c.lengths) {
        mat<T> q = q_all.middleCols(at, len), k = k_all.middleCols(at, len);
        for (Index t = 0; t < len; ++t) {
            for (Index h = 0; h < c.heads; ++h)
                rotate_head(&q(h * d, t), c.rotary_dim, 10000.0L, c.interleaved, t);
            for (Index g = 0; g < c.kv_heads; ++g)
                rotate_head(&k(g * d, t), c.rotary_dim, 10000.0L, c.interleaved, t);
        }
        const auto allowed = [window](Index j, Index i) {
            return j <= i && (window == 0 || j > i - window);
        };
        for (Index h = 0; h < c.heads; ++h) {
            const Index g = h / group;
            concat.block(h * d, at, d, len) = mha_test::reference_attention<T>(
                q.middleRows(h * d, d), k.middleRows(g * d, d), v_all.block(g * d, at, d, len),
                T(1) / std::sqrt(T(d)), allowed);
        }
        at += len;
    }
    return mha_test::reference_linear(p.w_o, p.b_o, concat);
}

template <class Scalar>
mha::multi_head_attention<Scalar> make_layer(const rope_case& c) {
    mha::attention_config config;
    config.embed_dim = c.embed;
    config.num_heads = c.heads;
    config.num_kv_heads = c.kv_heads;
    config.head_dim = c.head_dim;
    mha::rotary_options rope;
    rope.rotary_dim = c.rotary_dim;
    rope.layout = c.interleaved ? mha::rotary_layout::interleaved : mha::rotary_layout::half_split;
    config.rotary = rope;
    mha::multi_head_attention<Scalar> layer(config, /*seed=*/11);
    // Non-zero biases, so that a rotation applied before the bias would show.
    mha::attention_parameters<Scalar> p = layer.parameters();
    mha_test::value_source values(5);
    p.b_q = values.normal_matrix<Scalar>(p.b_q.size(), 1, 0.5);
    p.b_k = values.normal_matrix<Scalar>(p.b_k.size(), 1, 0.5);
    p.b_v = values.normal_matrix<Scalar>(p.b_v.size(), 1, 0.5);
    p.b_o = values.normal_matrix<Scalar>(p.b_o.size(), 1, 0.5);
    return mha::multi_head_attention<Scalar>(config, p);
}

template <class T, class Scalar>
mha_test::reference_params<T> params_of(const mha::multi_head_attention<Scalar>& layer) {
    const mha::attention_parameters<Scalar> p = layer.parameters();
    return mha_test::reference_params<Scalar>{p.w_q, p.w_k, p.w_v, p.w_o,
                                              p.b_q, p.b_k, p.b_v, p.b_o}
        .template cast<T>();
}

const std::vector<rope_case> cases = {
    {16, 2, 2, 8, 8, false, {7}},         // whole head, half-split
    {16, 4, 2, 4, 4, true, {5, 9}},       // grouped heads, interleaved, a packed batch
    {24, 3, 1, 8, 6, false, {4, 1, 11}},  // multi-query, partial width 6 of 8
    {32, 4, 4, 8, 2, true, {130}},        // one rotated pair, past a 128-query block
};

}  // namespace

TEMPLATE_TEST_CASE("forward rotates Q and K at each token's position in its sequence",
                   "[rotary][layer]", float, double) {
    using Scalar = TestType;
    for (const rope_case& c : cases) {
        INFO("embed " << c.embed << ", heads " << c.heads << "/" << c.kv_heads << ", r "
                      << c.rotary_dim << (c.interleaved ? " interleaved" : " half-split"));
        const auto layer = make_layer<Scalar>(c);
        Index total = 0;
        for (Index len : c.lengths)
            total += len;
        mha_test::value_source values(3);
        const mat<Scalar> x = values.normal_matrix<Scalar>(c.embed, total);
        const mat<Scalar> out = layer.forward(x, mha::packed_batch(c.lengths), mha::causal{});
        const mat<long double> ref = reference_rotary_layer<long double>(
            params_of<long double>(layer), c, x.template cast<long double>(), 0);
        const mat<Scalar> base = reference_rotary_layer<Scalar>(params_of<Scalar>(layer), c, x, 0);
        mha_test::require_within_baseline(out, ref, base, layer_baseline_k, "forward");
    }
}

TEMPLATE_TEST_CASE("cross-attention rotates query i at Lk - Lq + i and key j at j",
                   "[rotary][layer]", float, double) {
    // Queries are the last Lq tokens of a sequence whose keys are all Lk of them (bottom-right
    // alignment); with more queries than keys they start at position 0. Self-attention cannot
    // tell these apart from position i, so cross-attention with Lq != Lk is checked here.
    using Scalar = TestType;
    const std::vector<Index> lq = {3, 5, 2, 4}, lk = {7, 5, 9, 2};
    const rope_case c{16, 2, 1, 8, 8, false, {}};
    const auto layer = make_layer<Scalar>(c);
    Index nq = 0, nk = 0;
    for (std::size_t b = 0; b < lq.size(); ++b) {
        nq += lq[b];
        nk += lk[b];
    }
    mha_test::value_source values(8);
    const mat<Scalar> xq = values.normal_matrix<Scalar>(c.embed, nq);
    const mat<Scalar> xk = values.normal_matrix<Scalar>(c.embed, nk);
    const mat<Scalar> xv = values.normal_matrix<Scalar>(c.embed, nk);
    const mat<Scalar> out = layer.forward(xq, xk, xv, mha::packed_batch(lq, lk));
    const auto reference = [&](const auto& p, const auto& q_in, const auto& k_in,
                               const auto& v_in) {
        using T = typename std::decay_t<decltype(q_in)>::Scalar;
        const mat<T> q_all = mha_test::reference_linear(p.w_q, p.b_q, q_in);
        const mat<T> k_all = mha_test::reference_linear(p.w_k, p.b_k, k_in);
        const mat<T> v_all = mha_test::reference_linear(p.w_v, p.b_v, v_in);
        const Index d = c.head_dim;
        mat<T> concat(c.heads * d, q_in.cols());
        Index q0 = 0, k0 = 0;
        for (std::size_t b = 0; b < lq.size(); ++b) {
            mat<T> q = q_all.middleCols(q0, lq[b]), k = k_all.middleCols(k0, lk[b]);
            const Index first = lk[b] > lq[b] ? lk[b] - lq[b] : 0;
            for (Index t = 0; t < lq[b]; ++t)
                for (Index h = 0; h < c.heads; ++h)
                    rotate_head(&q(h * d, t), c.rotary_dim, 10000.0L, false, first + t);
            for (Index t = 0; t < lk[b]; ++t)
                rotate_head(&k(0, t), c.rotary_dim, 10000.0L, false, t);
            for (Index h = 0; h < c.heads; ++h)
                concat.block(h * d, q0, d, lq[b]) = mha_test::reference_attention<T>(
                    q.middleRows(h * d, d), k, v_all.block(0, k0, d, lk[b]), T(1) / std::sqrt(T(d)),
                    [](Index, Index) { return true; });
            q0 += lq[b];
            k0 += lk[b];
        }
        return mat<T>(mha_test::reference_linear(p.w_o, p.b_o, concat));
    };
    const mat<long double> ref =
        reference(params_of<long double>(layer), mat<long double>(xq.template cast<long double>()),
                  mat<long double>(xk.template cast<long double>()),
                  mat<long double>(xv.template cast<long double>()));
    const mat<Scalar> base = reference(params_of<Scalar>(layer), xq, xk, xv);
    mha_test::require_within_baseline(out, ref, base, layer_baseline_k, "cross-attention forward");
}

TEMPLATE_TEST_CASE("decode rotates new tokens at the cache's positions", "[rotary][layer][decode]",
                   float, double) {
    using Scalar = TestType;
    for (const rope_case& c : cases) {
        if (c.lengths.size() != 1) continue;  // one sequence, decoded token by token
        for (const Index window : {Index(0), Index(3)}) {
            INFO("heads " << c.heads << "/" << c.kv_heads << ", r " << c.rotary_dim << ", window "
                          << window);
            const auto layer = make_layer<Scalar>(c);
            const Index len = c.lengths[0];
            mha_test::value_source values(9);
            const mat<Scalar> x = values.normal_matrix<Scalar>(c.embed, len);
            mha::kv_cache_options options;
            options.window = window;
            mha::kv_cache<Scalar> cache = layer.make_cache(options);
            // A prompt of 3 tokens, then one token per step.
            mat<Scalar> decoded(c.embed, len);
            decoded.leftCols(3) = layer.decode(x.leftCols(3), cache);
            for (Index t = 3; t < len; ++t)
                decoded.col(t) = layer.decode(x.col(t), cache);
            CHECK(cache.position() == len);
            const mat<long double> ref = reference_rotary_layer<long double>(
                params_of<long double>(layer), c, x.template cast<long double>(), window);
            const mat<Scalar> base =
                reference_rotary_layer<Scalar>(params_of<Scalar>(layer), c, x, window);
            mha_test::require_within_baseline(decoded, ref, base, layer_baseline_k, "decode");
        }
    }
}

TEST_CASE("rotary settings that do not fit the head width are refused by the config",
          "[rotary][layer][errors]") {
    mha::attention_config config;
    config.embed_dim = 16;
    config.num_heads = 2;  // d_k = 8
    mha::rotary_options rope;
    rope.rotary_dim = 10;
    config.rotary = rope;
    REQUIRE_THROWS_AS(config.resolved(), mha::value_error);
    REQUIRE_THROWS_AS(mha::multi_head_attention<float>(config), mha::value_error);
    config.rotary->rotary_dim = 0;  // the whole head
    CHECK(config.resolved().rotary->rotary_dim == 8);
}
