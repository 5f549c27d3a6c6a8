// SPDX-License-Identifier: MIT
// Tests aimed at bugs that the rest of the suite could only see by luck: each case is built so
// that one specific plausible mistake changes its result (the mistake is named in the case).
// Defaults checked against hand-written values; the layer over several key and query blocks
// (online-softmax rescaling through the public layer); split-KV decoding with several heads,
// weights and log-sum-exp; projected keys and values compared directly (a bias on K instead of Q
// is invisible to softmax); the threaded GEMM column split at small widths; forward_into and
// decode_into against the independent reference, not only against forward.
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>

#include <mha/detail/gemm.hpp>
#include <mha/multi_head_attention.hpp>

#include "check.hpp"
#include "layer_setup.hpp"
#include "reference.hpp"

using mha::Index;
using mha_test::mat;
using mha_test::random_parameters;
using mha_test::set_threads;
using mha_test::thread_guard;
using mha_test::to_reference;
using mha_test::vec;

namespace {

/// Check B's k for the whole layer: the value calibrated in test_multi_head_attention.cpp
/// (layer_baseline_k: the ratio to the plain-loop baseline measured at most 3.8 over 200 seeds
/// per case, with large logits); the layer here runs the same four GEMMs and kernels.
constexpr long double layer_k = 4;

using head_allowed = std::function<bool(Index h, Index j, Index i)>;

/// The layer's output over a packed batch, computed sequence by sequence by the reference in
/// long double (ref) and in Scalar (base, check B's baseline). `allowed` takes (b, h, j, i).
template <class Scalar>
struct layer_reference {
    mat<long double> ref;
    mat<Scalar> base;
};

template <class Scalar>
layer_reference<Scalar> reference_over_batch(
    const mha::multi_head_attention<Scalar>& layer, const mha::matrix<Scalar>& xq,
    const mha::matrix<Scalar>& xk, const mha::matrix<Scalar>& xv, const mha::packed_batch& batch,
    const std::function<bool(Index b, Index h, Index j, Index i)>& allowed = nullptr) {
    const mha::attention_config& c = layer.config();
    const Scalar scale =
        static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(c.head_dim)));
    const auto p = layer.parameters();
    layer_reference<Scalar> r;
    r.ref.resize(c.embed_dim, xq.cols());
    r.base.resize(c.embed_dim, xq.cols());
    for (Index b = 0; b < batch.size(); ++b) {
        const Index q0 = batch.query_offset(b), lq = batch.query_length(b);
        const Index k0 = batch.key_offset(b), lk = batch.key_length(b);
        if (lq == 0) continue;
        head_allowed a = nullptr;
        if (allowed) a = [&allowed, b](Index h, Index j, Index i) { return allowed(b, h, j, i); };
        const mat<Scalar> q = xq.middleCols(q0, lq), k = xk.middleCols(k0, lk),
                          v = xv.middleCols(k0, lk);
        r.ref.middleCols(q0, lq) = mha_test::reference_layer<long double>(
            to_reference<long double>(p), c.num_heads, q.template cast<long double>(),
            k.template cast<long double>(), v.template cast<long double>(),
            static_cast<long double>(scale), a, nullptr, mha_test::norm_kind::softmax, nullptr,
            c.num_kv_heads);
        r.base.middleCols(q0, lq) = mha_test::reference_layer<Scalar>(
            to_reference<Scalar>(p), c.num_heads, q, k, v, scale, a, nullptr,
            mha_test::norm_kind::softmax, nullptr, c.num_kv_heads);
    }
    return r;
}

/// Inputs whose columns grow in size with their index, so that the largest score of a query
/// lies in a later key block than its first one: a running maximum that is not rescaled when it
/// grows (or is rescaled with the wrong maximum) then moves the output by O(1).
template <class Scalar>
mha::matrix<Scalar> growing_columns(Index rows, Index cols, mha_test::value_source& values) {
    mha::matrix<Scalar> x = values.normal_matrix<Scalar>(rows, cols);
    for (Index j = 0; j < cols; ++j)
        x.col(j) *=
            static_cast<Scalar>(0.5 + 2.0 * static_cast<double>(j) / static_cast<double>(cols));
    return x;
}

}  // namespace

// --- Defaults by value ---------------------------------------------------------------------
// Every expected number below is written by hand from the documented rule (attention_config's
// member comments), not derived from resolved() or from another config.

TEST_CASE("resolved() fills each default with the documented value", "[config][defaults]") {
    mha::attention_config c;
    c.embed_dim = 12;
    c.num_heads = 3;
    mha::attention_config r = c.resolved();
    CHECK(r.head_dim == 4);          // E / H
    CHECK(r.value_head_dim == 4);    // d_k
    CHECK(r.key_input_dim == 12);    // E
    CHECK(r.value_input_dim == 12);  // E
    CHECK(r.num_kv_heads == 3);      // H
    CHECK_FALSE(r.rotary.has_value());

    // d_v follows d_k when only d_k is given, not E / H.
    c.head_dim = 5;
    r = c.resolved();
    CHECK(r.head_dim == 5);
    CHECK(r.value_head_dim == 5);

    // d_v given alone leaves d_k at E / H.
    c.head_dim = 0;
    c.num_heads = 4;
    c.value_head_dim = 7;
    r = c.resolved();
    CHECK(r.head_dim == 3);
    CHECK(r.value_head_dim == 7);

    // kdim and vdim default to E each, independently of the other.
    mha::attention_config k;
    k.embed_dim = 10;
    k.num_heads = 2;
    k.key_input_dim = 6;
    r = k.resolved();
    CHECK(r.key_input_dim == 6);
    CHECK(r.value_input_dim == 10);
    k.key_input_dim = 0;
    k.value_input_dim = 3;
    r = k.resolved();
    CHECK(r.key_input_dim == 10);
    CHECK(r.value_input_dim == 3);

    // num_kv_heads given is kept; E / H uses the query heads, not the key/value heads.
    mha::attention_config g;
    g.embed_dim = 24;
    g.num_heads = 6;
    g.num_kv_heads = 2;
    r = g.resolved();
    CHECK(r.num_kv_heads == 2);
    CHECK(r.head_dim == 4);
    CHECK(r.value_head_dim == 4);

    // rotary_dim 0 means the whole head width; a given width is kept.
    g.rotary = mha::rotary_options{};
    r = g.resolved();
    REQUIRE(r.rotary.has_value());
    CHECK(r.rotary->rotary_dim == 4);
    g.rotary->rotary_dim = 2;
    CHECK(g.resolved().rotary->rotary_dim == 2);
}

TEST_CASE("a layer's parameter shapes follow the defaults", "[config][defaults]") {
    // E = 12, H = 6, H_kv = 2, d_k = 5 given, d_v from d_k, kdim 7, vdim E.
    mha::attention_config c;
    c.embed_dim = 12;
    c.num_heads = 6;
    c.num_kv_heads = 2;
    c.head_dim = 5;
    c.key_input_dim = 7;
    const mha::multi_head_attention<double> layer(c, 3);
    CHECK(layer.qk_width() == 30);
    CHECK(layer.v_width() == 30);
    CHECK(layer.key_width() == 10);
    CHECK(layer.value_width() == 10);
    const auto p = layer.parameters();
    CHECK(p.w_q.rows() == 30);
    CHECK(p.w_q.cols() == 12);
    CHECK(p.w_k.rows() == 10);
    CHECK(p.w_k.cols() == 7);
    CHECK(p.w_v.rows() == 10);
    CHECK(p.w_v.cols() == 12);
    CHECK(p.w_o.rows() == 12);
    CHECK(p.w_o.cols() == 30);
    CHECK(p.b_q.size() == 30);
    CHECK(p.b_k.size() == 10);
    CHECK(p.b_v.size() == 10);
    CHECK(p.b_o.size() == 12);
    const auto cache = layer.make_cache();
    CHECK(cache.keys().rows() == 10);
    CHECK(cache.values().rows() == 10);
}

// --- Shapes that exercise the algorithms ---------------------------------------------------

TEMPLATE_TEST_CASE("the layer over several key and query blocks matches the reference",
                   "[layer][tiled][reference]", float, double) {
    using Scalar = TestType;
    // 1100 tokens: three key blocks of 512 (the last partial) and nine query blocks of 128 at
    // the default tile sizes; keys grow along the sequence (growing_columns), so each query's
    // running maximum changes from block to block and must be rescaled.
    const Index n = 2 * mha::detail::tiled_key_block + 76;
    mha::attention_config c;
    c.embed_dim = 8;
    c.num_heads = 2;
    c.num_kv_heads = 1;
    c.value_head_dim = 3;
    mha_test::value_source values(71);
    const mha::multi_head_attention<Scalar> layer(c, random_parameters<Scalar>(c, values));
    const mha::matrix<Scalar> x = growing_columns<Scalar>(8, n, values);
    const mha::packed_batch batch = mha::packed_batch::single(n, n);
    SECTION("no mask") {
        const auto r = reference_over_batch(layer, x, x, x, batch);
        mha_test::require_within_baseline(layer.forward(x), r.ref, r.base, layer_k, "no mask");
    }
    SECTION("causal") {
        const auto r = reference_over_batch(layer, x, x, x, batch,
                                            [](Index, Index, Index j, Index i) { return j <= i; });
        mha_test::require_within_baseline(layer.forward(x, mha::causal{}), r.ref, r.base, layer_k,
                                          "causal");
    }
    SECTION("cross, three queries over every key block") {
        const mha::matrix<Scalar> q = values.normal_matrix<Scalar>(8, 3);
        const mha::packed_batch cross = mha::packed_batch::single(3, n);
        const auto r = reference_over_batch(layer, q, x, x, cross);
        mha_test::require_within_baseline(layer.forward(q, x, x), r.ref, r.base, layer_k, "cross");
    }
}

namespace {

/// Each query's log Σ exp(score) over all keys, in long double, and the largest magnitude of a
/// score's terms (the scale of its rounding error; see require_lse_close in test_log_sum_exp.cpp,
/// whose bound is used below).
struct lse_reference {
    std::vector<long double> value, smax;
};

lse_reference reference_lse(const mat<long double>& q, const mat<long double>& k,
                            long double scale) {
    lse_reference r;
    for (Index i = 0; i < q.cols(); ++i) {
        std::vector<long double> s;
        long double smax = 0;
        for (Index j = 0; j < k.cols(); ++j) {
            long double dot = 0, terms = 0;
            for (Index d = 0; d < q.rows(); ++d) {
                dot += q(d, i) * k(d, j);
                terms += std::fabs(q(d, i) * k(d, j));
            }
            s.push_back(scale * dot);
            smax = std::max(smax, std::fabs(scale) * terms);
        }
        long double m = -std::numeric_limits<long double>::infinity();
        for (const long double x : s)
            m = std::max(m, x);
        long double sum = 0;
        for (const long double x : s)
            sum += std::exp(x - m);
        r.value.push_back(m + std::log(sum));
        r.smax.push_back(smax);
    }
    return r;
}

}  // namespace

TEMPLATE_TEST_CASE("split-KV decoding with several heads, weights and log-sum-exp",
                   "[tiled][split][reference]", float, double) {
    using Scalar = TestType;
    thread_guard guard;
    // Two queries over 2·split_chunk + 37 keys: one query block and enough keys for the split
    // path (three chunks, the last partial). Four query heads on two key/value heads, every head
    // with its own values, so partials merged into the wrong head or chunk offsets shared
    // between heads change the output by O(1).
    const Index lq = 2, lk = 2 * mha::detail::tiled_split_chunk + 37, dk = 4, dv = 3;
    const Index heads = 4, kv_heads = 2;
    mha_test::value_source values(83);
    const mha::matrix<Scalar> q = values.normal_matrix<Scalar>(heads * dk, lq);
    const mha::matrix<Scalar> k = growing_columns<Scalar>(kv_heads * dk, lk, values);
    const mha::matrix<Scalar> v = values.normal_matrix<Scalar>(kv_heads * dv, lk);
    const mha::packed_batch batch = mha::packed_batch::single(lq, lk);
    const Scalar scale = static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(dk)));

    mha::attention_options options;
    options.algorithm = mha::attention_algorithm::tiled;
    std::vector<mha::matrix<Scalar>> outs;
    for (const mha::weights_mode mode : {mha::weights_mode::none, mha::weights_mode::per_head}) {
        for (const int threads : {1, 2}) {
            set_threads(threads);
            const bool with_weights = mode == mha::weights_mode::per_head;
            INFO("threads " << threads << ", weights " << with_weights);
            mha::matrix<Scalar> out(heads * dv, lq);
            const auto extra =
                mha::multi_head_attention_core(q, k, v, heads, kv_heads, batch, out, {}, options,
                                               mha::attention_request{mode, true});
            if (!with_weights) outs.push_back(out);
            REQUIRE(extra.log_sum_exp.rows() == heads);
            REQUIRE(extra.log_sum_exp.cols() == lq);
            REQUIRE(extra.weights.size() == (with_weights ? std::size_t(heads) : 0u));
            const long double u = mha_test::unit_roundoff<Scalar>();
            for (Index h = 0; h < heads; ++h) {
                INFO("head " << h);
                const Index g = mha_test::reference_kv_head(h, heads, kv_heads);
                const mat<long double> qh = q.middleRows(h * dk, dk).template cast<long double>();
                const mat<long double> kh = k.middleRows(g * dk, dk).template cast<long double>();
                const mat<long double> vh = v.middleRows(g * dv, dv).template cast<long double>();
                mat<long double> w;
                const mat<long double> ref = mha_test::reference_attention<long double>(
                    qh, kh, vh, scale, mha_test::allow_all(), nullptr, mha_test::norm_kind::softmax,
                    &w);
                const mha::matrix<Scalar> oh = out.middleRows(h * dv, dv);
                mha_test::require_attention_close<Scalar>(oh, ref, qh, kh, vh, scale);
                // Bound of test_log_sum_exp.cpp: 8·u·(1 + Smax) + (Lk + 2)·u + u·|L|.
                const lse_reference lse = reference_lse(qh, kh, scale);
                for (Index i = 0; i < lq; ++i) {
                    const long double got = extra.log_sum_exp(h, i);
                    const long double bound = 8 * u * (1 + lse.smax[std::size_t(i)]) +
                                              static_cast<long double>(lk + 2) * u +
                                              u * std::fabs(lse.value[std::size_t(i)]);
                    CHECK(std::fabs(got - lse.value[std::size_t(i)]) <= bound);
                }
                if (with_weights) {
                    // Check B with the forward rule's k = 2 (check.hpp) on the weights, against
                    // the same reference evaluated in Scalar.
                    mat<Scalar> wb;
                    (void)mha_test::reference_attention<Scalar>(
                        q.middleRows(h * dk, dk), k.middleRows(g * dk, dk),
                        v.middleRows(g * dv, dv), scale, mha_test::allow_all(), nullptr,
                        mha_test::norm_kind::softmax, &wb);
                    mha_test::require_within_baseline<Scalar>(extra.weights[std::size_t(h)], w, wb,
                                                              2, "weights");
                }
            }
        }
    }
    // The split's merge order is fixed: the thread count does not change a bit.
    REQUIRE(outs.size() == 2);
    CHECK(outs[0] == outs[1]);
}

// --- Projections seen directly -------------------------------------------------------------

TEMPLATE_TEST_CASE("the cached keys and values are the projected inputs, biases included",
                   "[layer][projection][decode]", float, double) {
    using Scalar = TestType;
    // Softmax cannot see a bias added to K instead of Q (it adds b·q_i to every score of query
    // i), nor one added to Q instead of K; the cache holds K and V as projected, so they are
    // compared with W·x + b directly, under the projection's a-priori bound (check G).
    for (const Index kv_heads : {Index(3), Index(1)}) {
        INFO("kv_heads " << kv_heads);
        mha::attention_config c;
        c.embed_dim = 9;
        c.num_heads = 3;
        c.num_kv_heads = kv_heads;
        c.value_head_dim = 2;
        mha_test::value_source values(97 + static_cast<std::uint64_t>(kv_heads));
        const auto p = random_parameters<Scalar>(c, values);
        const mha::multi_head_attention<Scalar> layer(c, p);
        const mha::matrix<Scalar> x = values.normal_matrix<Scalar>(9, 5);
        auto cache = layer.make_cache();
        (void)layer.decode(x, cache);
        REQUIRE(cache.size() == 5);
        const mat<Scalar> keys = cache.keys(), vals = cache.values();
        mha_test::require_linear_within_bound<Scalar>(keys, p.w_k, p.b_k, x, "keys");
        mha_test::require_linear_within_bound<Scalar>(vals, p.w_v, p.b_v, x, "values");
        // The layer's output, from the same parameters, against the reference as well.
        mha::matrix<Scalar> out(9, 1);
        const mha::matrix<Scalar> next = values.normal_matrix<Scalar>(9, 1);
        out = layer.decode(next, cache);
        mha::matrix<Scalar> all(9, 6);
        all << x, next;
        const auto r = reference_over_batch(layer, all, all, all, mha::packed_batch::single(6, 6),
                                            [](Index, Index, Index j, Index i) { return j <= i; });
        const mat<long double> ref_last = r.ref.rightCols(1);
        const mat<Scalar> base_last = r.base.rightCols(1);
        mha_test::require_within_baseline<Scalar>(out, ref_last, base_last, layer_k, "decode");
    }
}

// --- The threaded GEMM column split ---------------------------------------------------------

TEMPLATE_TEST_CASE("the GEMM column split covers every column at small widths", "[gemm][threads]",
                   float, double) {
    using Scalar = TestType;
    // product_into splits the columns into ranges of whole nr-column tiles, one per thread, the
    // last taking the remainder; a thread takes a range only for 50 000 multiply-adds, so the
    // depth here (m = k = 160: 25 600 per column) lets 2 to 4 threads split widths down to a few
    // tiles. Every width from nr − 1 to 5·nr + 3 covers an empty range, ranges of one tile and
    // remainders of every size. Each result is compared with the plain loops under check G and
    // with the single-threaded product bit for bit (the split must not change the sums' order).
    constexpr Index nr = Eigen::internal::gebp_traits<Scalar, Scalar>::nr;
    const Index m = 160, k = 160;
    mha_test::value_source values(131);
    const mat<Scalar> a = values.normal_matrix<Scalar>(m, k);
    const vec<Scalar> no_bias;
    for (Index n = nr - 1; n <= 5 * nr + 3; ++n) {
        const mat<Scalar> b = values.normal_matrix<Scalar>(k, n);
        std::vector<mha::detail::gemm_buffers<Scalar>> buffers;
        mat<Scalar> serial(m, n);
        mha::detail::product_into(serial, a, b, Scalar(1), &buffers, 1);
        for (const int threads : {2, 3, 4}) {
            INFO("n " << n << ", threads " << threads);
            mat<Scalar> split =
                mat<Scalar>::Constant(m, n, std::numeric_limits<Scalar>::quiet_NaN());
            mha::detail::product_into(split, a, b, Scalar(1), &buffers, threads);
            mha_test::require_linear_within_bound<Scalar>(split, a, no_bias, b, "split product");
            CHECK(mha_test::max_abs_diff(split, serial) == 0);
        }
    }
}

// --- Self-comparisons paired with the reference --------------------------------------------

TEMPLATE_TEST_CASE("forward_into and decode_into match the reference, not only forward",
                   "[layer][workspace][reference]", float, double) {
    using Scalar = TestType;
    thread_guard guard;
    mha::attention_config c;
    c.embed_dim = 12;
    c.num_heads = 6;
    c.num_kv_heads = 2;
    c.value_head_dim = 3;
    mha_test::value_source values(151);
    const mha::multi_head_attention<Scalar> layer(c, random_parameters<Scalar>(c, values));
    for (const int threads : {1, 2}) {
        set_threads(threads);
        INFO("threads " << threads);
        // A packed batch with an empty sequence, causal, self-attention.
        const mha::packed_batch batch({7, 0, 19, 1});
        const mha::matrix<Scalar> x = values.normal_matrix<Scalar>(12, batch.total_queries());
        mha::forward_workspace<Scalar> ws;
        mha::matrix<Scalar> out(12, x.cols());
        const mha::attention_mask<Scalar> mask{mha::causal{}};
        layer.forward_into(x, batch, mask, out, ws);
        layer.forward_into(x, batch, mask, out, ws);  // the reused workspace's result
        CHECK(out == layer.forward(x, batch, mask));
        const auto r = reference_over_batch(layer, x, x, x, batch,
                                            [](Index, Index, Index j, Index i) { return j <= i; });
        mha_test::require_within_baseline<Scalar>(out, r.ref, r.base, layer_k, "forward_into");

        // Cross-attention with kdim = vdim = E through the cross path.
        const mha::packed_batch cross({3, 5}, {11, 2});
        const mha::matrix<Scalar> q = values.normal_matrix<Scalar>(12, 8);
        const mha::matrix<Scalar> kv = values.normal_matrix<Scalar>(12, 13);
        mha::matrix<Scalar> cout(12, 8);
        layer.forward_into(q, kv, kv, cross, {}, cout, ws);
        CHECK(cout == layer.forward(q, kv, kv, cross));
        const auto rc = reference_over_batch(layer, q, kv, kv, cross);
        mha_test::require_within_baseline<Scalar>(cout, rc.ref, rc.base, layer_k, "cross");

        // decode_into token by token (one query over three query heads per key/value head, the
        // stacked decode problem), each step against the reference over the whole prefix; with
        // a plain cache and with a window of 4 tokens, which the window mask must place at the
        // one query's position for every stacked head alike.
        for (const Index window : {Index(0), Index(4)}) {
            auto cache = layer.make_cache(mha::kv_cache_options{window, true});
            const mha::matrix<Scalar> tokens = values.normal_matrix<Scalar>(12, 9);
            mha::matrix<Scalar> step(12, 1);
            for (Index t = 0; t < tokens.cols(); ++t) {
                layer.decode_into(tokens.col(t), cache, step, ws);
                const mha::matrix<Scalar> prefix = tokens.leftCols(t + 1);
                const auto rd = reference_over_batch(
                    layer, prefix, prefix, prefix, mha::packed_batch::single(t + 1, t + 1),
                    [window](Index, Index, Index j, Index i) {
                        return j <= i && (window == 0 || j > i - window);
                    });
                const mat<long double> ref_last = rd.ref.rightCols(1);
                const mat<Scalar> base_last = rd.base.rightCols(1);
                mha_test::require_within_baseline<Scalar>(
                    step, ref_last, base_last, layer_k,
                    "decode_into window " + std::to_string(window) + ", step " + std::to_string(t));
            }
        }
    }
}
