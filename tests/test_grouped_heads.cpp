// SPDX-License-Identifier: MIT
// Grouped-query heads (num_kv_heads < num_heads): the attention core against the long-double
// reference per query head, for both kernels, every normalisation, weights mode and mask kind,
// packed batches, tile boundaries and the split-KV path; the exact equivalence with ordinary
// multi-head attention on repeated K/V; thread-count independence; poisoned excluded keys;
// errors. Then the layer: against reference_layer with key/value heads, its resolved config,
// parameters and packed form.
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <mha/multi_head_attention.hpp>

#include "check.hpp"
#include "layer_setup.hpp"
#include "reference.hpp"

using Catch::Matchers::Equals;
using mha::Index;
using mha_test::mat;
using mha_test::max_threads;
using mha_test::random_parameters;
using mha_test::set_threads;
using mha_test::to_reference;

namespace {

using settings = mha::detail::tiled_settings;
// Per (sequence b, query head h, key j, query i).
using allowed_bh = std::function<bool(Index b, Index h, Index j, Index i)>;
using bias_bh = std::function<long double(Index b, Index h, Index j, Index i)>;

template <class Scalar>
constexpr Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();

template <class Derived>
mat<long double> wide(const Eigen::MatrixBase<Derived>& m) {
    return m.template cast<long double>();
}

mha_test::norm_kind reference_kind(mha::normalization n) {
    switch (n) {
        case mha::normalization::relu:
            return mha_test::norm_kind::relu;
        case mha::normalization::sigmoid:
            return mha_test::norm_kind::sigmoid;
        default:
            return mha_test::norm_kind::softmax;
    }
}

const char* algorithm_name(mha::attention_algorithm a) {
    return a == mha::attention_algorithm::tiled ? "tiled" : "materialized";
}

/// A mask over a packed batch with H query heads, in the library's form and, independently, as
/// the reference's predicate and bias per (sequence, query head).
template <class Scalar>
struct mask_case {
    std::string name;
    mha::attention_mask<Scalar> mask;
    allowed_bh allowed = [](Index, Index, Index, Index) { return true; };
    bias_bh bias = nullptr;
};

/// Every mask kind for `batch` and `heads` query heads. Keep masks and biases per (sequence,
/// query head), B·H matrices, so that two query heads of one group see different keys: a kernel
/// that applied the mask of the key/value head instead would fail. Every 4th query of the keep
/// mask and every 5th of the bias is fully masked (exact zeros are then checked).
template <class Scalar>
std::vector<mask_case<Scalar>> all_masks(const mha::packed_batch& batch, Index heads,
                                         std::uint64_t seed) {
    mha_test::value_source rnd(seed);
    const Index n = batch.size();
    std::vector<Index> valid(static_cast<std::size_t>(n));
    for (Index b = 0; b < n; ++b)
        valid[static_cast<std::size_t>(b)] = batch.key_length(b) * 2 / 3;
    std::vector<mha::bool_matrix> keep_head, keep_seq;
    std::vector<mat<Scalar>> bias_head;
    for (Index b = 0; b < n; ++b) {
        const Index lk = batch.key_length(b), lq = batch.query_length(b);
        mha::bool_matrix ks(lk, lq);
        for (Index i = 0; i < lq; ++i)
            for (Index j = 0; j < lk; ++j)
                ks(j, i) = rnd.uniform(0, 1) < 0.6;
        keep_seq.push_back(ks);
        for (Index h = 0; h < heads; ++h) {
            mha::bool_matrix kh(lk, lq);
            mat<Scalar> bh(lk, lq);
            for (Index i = 0; i < lq; ++i)
                for (Index j = 0; j < lk; ++j) {
                    kh(j, i) = i % 4 != 3 && rnd.uniform(0, 1) < 0.7;
                    bh(j, i) = (i % 5 == 4 || rnd.uniform(0, 1) < 0.15)
                                   ? minus_inf<Scalar>
                                   : static_cast<Scalar>(rnd.normal(1.5));
                }
            keep_head.push_back(kh);
            bias_head.push_back(bh);
        }
    }
    const std::vector<Index> lq = batch.query_lengths(), lk = batch.key_lengths();
    auto bottom_right = [lq, lk](Index b, Index, Index j, Index i) {
        return j <= i + lk[static_cast<std::size_t>(b)] - lq[static_cast<std::size_t>(b)];
    };
    auto window = [lq, lk](Index b, Index, Index j, Index i) {
        const Index c = i + lk[static_cast<std::size_t>(b)] - lq[static_cast<std::size_t>(b)];
        return j >= c - 3 && j <= c + 1;
    };
    auto lengths = [valid](Index b, Index, Index j, Index) {
        return j < valid[static_cast<std::size_t>(b)];
    };
    auto keep_per_head = [keep_head, heads](Index b, Index h, Index j, Index i) {
        return keep_head[static_cast<std::size_t>(b * heads + h)](j, i);
    };
    auto keep_per_sequence = [keep_seq](Index b, Index, Index j, Index i) {
        return keep_seq[static_cast<std::size_t>(b)](j, i);
    };
    bias_bh bias_per_head = [bias_head, heads](Index b, Index h, Index j, Index i) {
        return static_cast<long double>(bias_head[static_cast<std::size_t>(b * heads + h)](j, i));
    };
    std::vector<mask_case<Scalar>> cases;
    cases.push_back({"none", {}});
    cases.push_back({"causal bottom-right", mha::causal{}, bottom_right});
    cases.push_back({"causal top-left", mha::causal{mha::causal_alignment::top_left},
                     [](Index, Index, Index j, Index i) { return j <= i; }});
    cases.push_back({"sliding_window 3,1", mha::sliding_window{3, 1}, window});
    cases.push_back({"key_lengths", mha::key_lengths{valid}, lengths});
    cases.push_back({"keep_mask per head (B*H)", mha::keep_mask(keep_head), keep_per_head});
    cases.push_back({"keep_mask per sequence (B)", mha::keep_mask(keep_seq), keep_per_sequence});
    cases.push_back({"additive_bias per head (B*H)", mha::additive_bias<Scalar>(bias_head),
                     [](Index, Index, Index, Index) { return true; }, bias_per_head});
    cases.push_back({"causal + key_lengths + keep per head + bias per head",
                     mha::attention_mask<Scalar>(mha::causal{}, mha::key_lengths{valid},
                                                 mha::keep_mask(keep_head),
                                                 mha::additive_bias<Scalar>(bias_head)),
                     [=](Index b, Index h, Index j, Index i) {
                         return bottom_right(b, h, j, i) && lengths(b, h, j, i) &&
                                keep_per_head(b, h, j, i);
                     },
                     bias_per_head});
    return cases;
}

/// ReLU divides by Σ max(s, 0) over a query's keys, which can be arbitrarily small: the scores'
/// rounding errors are then amplified by 1/Σ, past check A's bound (derived for softmax, whose
/// normaliser is at least 1 after the max shift); a first run failed by 15 % on a query whose
/// only positive scores were near 0. As in the layer tests' relu cases, a scale of 0.05 and a
/// per-sequence bias of ±4 keep the kept scores away from 0, where check A applies.
constexpr double relu_scale = 0.05;

template <class Scalar>
void add_relu_margin(mask_case<Scalar>& mc, const mha::packed_batch& batch, std::uint64_t seed) {
    mha_test::value_source rnd(seed);
    std::vector<mat<Scalar>> margins;
    for (Index b = 0; b < batch.size(); ++b) {
        mat<Scalar> m(batch.key_length(b), batch.query_length(b));
        for (Index i = 0; i < m.cols(); ++i)
            for (Index j = 0; j < m.rows(); ++j)
                m(j, i) = rnd.uniform(0, 1) < 0.7 ? Scalar(4) : Scalar(-4);
        margins.push_back(m);
    }
    mc.mask.add(mha::additive_bias<Scalar>(margins));
    const bias_bh inner = mc.bias;
    mc.bias = [inner, margins](Index b, Index h, Index j, Index i) {
        return (inner ? inner(b, h, j, i) : 0.0L) +
               static_cast<long double>(margins[static_cast<std::size_t>(b)](j, i));
    };
    mc.name += " + relu margin";
}

/// Q, K and V of a grouped problem: H·d_k, H_kv·d_k and H_kv·d_v rows.
template <class Scalar>
struct grouped_inputs {
    Index heads, kv_heads, dk, dv;
    mat<Scalar> q, k, v;
};

template <class Scalar>
grouped_inputs<Scalar> make_inputs(Index heads, Index kv_heads, Index dk, Index dv,
                                   const mha::packed_batch& batch, std::uint64_t seed) {
    mha_test::value_source rnd(seed);
    // q scaled by 2: logits up to ~10, so check A's (1 + Smax) factor is exercised.
    return {heads,
            kv_heads,
            dk,
            dv,
            rnd.normal_matrix<Scalar>(heads * dk, batch.total_queries(), 2.0),
            rnd.normal_matrix<Scalar>(kv_heads * dk, batch.total_keys()),
            rnd.normal_matrix<Scalar>(kv_heads * dv, batch.total_keys())};
}

/// Each (sequence, query head) of `out` and of the per-head and averaged weights against the
/// long-double reference, computed on the query head's rows of Q and the rows of its key/value
/// head as the reference maps it (reference_kv_head). Tolerance: check A (check.hpp) for the
/// output, and for the weights check A with unit values (Vmax = 1); the averaged weights are the
/// mean of the per-head weights summed in another order: H roundings of terms ≤ 1/H plus the
/// division, (H + 1)·u.
template <class Scalar>
void require_matches_reference(const grouped_inputs<Scalar>& in, const mha::packed_batch& batch,
                               const mask_case<Scalar>& mc, mha::normalization normalize,
                               long double scale, const mat<Scalar>& out,
                               const std::vector<mat<Scalar>>* per_head,
                               const std::vector<mat<Scalar>>* averaged, const std::string& what) {
    const Index heads = in.heads, dk = in.dk, dv = in.dv;
    for (Index b = 0; b < batch.size(); ++b) {
        const Index lq = batch.query_length(b), lk = batch.key_length(b);
        const Index q0 = batch.query_offset(b), k0 = batch.key_offset(b);
        mat<long double> mean = mat<long double>::Zero(lk, lq);
        for (Index h = 0; h < heads; ++h) {
            const Index g = mha_test::reference_kv_head(h, heads, in.kv_heads);
            const mat<long double> Q = wide(in.q.block(h * dk, q0, dk, lq));
            const mat<long double> K = wide(in.k.block(g * dk, k0, dk, lk));
            const mat<long double> V = wide(in.v.block(g * dv, k0, dv, lk));
            const mha_test::allowed_fn a = [&, b, h](Index j, Index i) {
                return mc.allowed(b, h, j, i);
            };
            const mha_test::bias_fn bf =
                mc.bias
                    ? mha_test::bias_fn([&, b, h](Index j, Index i) { return mc.bias(b, h, j, i); })
                    : nullptr;
            mat<long double> ref_w;
            const mat<long double> ref = mha_test::reference_attention<long double>(
                Q, K, V, scale, a, bf, reference_kind(normalize), &ref_w);
            const std::string label = what + ", sequence " + std::to_string(b) + ", head " +
                                      std::to_string(h) + " (kv head " + std::to_string(g) + ")";
            mha_test::require_attention_close<Scalar>(out.block(h * dv, q0, dv, lq), ref, Q, K, V,
                                                      scale, a, bf, label);
            if (per_head == nullptr) continue;
            const mat<Scalar>& w = (*per_head)[static_cast<std::size_t>(b * heads + h)];
            mha_test::require_attention_close<Scalar>(w, ref_w, Q, K, mat<long double>::Ones(1, lk),
                                                      scale, a, bf, label + " (weights)");
            mean += wide(w) / static_cast<long double>(heads);
        }
        if (averaged == nullptr) continue;
        INFO(what << ", sequence " << b << " (averaged weights)");
        CHECK(mha_test::max_abs_diff((*averaged)[static_cast<std::size_t>(b)], mean) <=
              (heads + 1) * mha_test::unit_roundoff<Scalar>());
    }
}

template <class Scalar>
long double library_scale(Index dk) {
    // The library rounds 1/√d_k to Scalar; the reference gets that same value.
    return static_cast<long double>(
        static_cast<Scalar>(1.0L / std::sqrt(static_cast<long double>(dk))));
}

/// The public core with one weights mode; the output is returned through `out`.
template <class Scalar>
std::vector<mat<Scalar>> run_core(const grouped_inputs<Scalar>& in, const mha::packed_batch& batch,
                                  const mha::attention_mask<Scalar>& mask,
                                  const mha::attention_options& options, mha::weights_mode mode,
                                  mat<Scalar>& out) {
    out.resize(in.heads * in.dv, batch.total_queries());
    return mha::multi_head_attention_core(in.q, in.k, in.v, in.heads, in.kv_heads, batch, out, mask,
                                          options, {mode})
        .weights;
}

/// K or V with each of its `kv_heads` row blocks of height d repeated `group` times
/// (PyTorch's repeat_interleave over the head dimension): ordinary multi-head input.
template <class Scalar>
mat<Scalar> repeat_heads(const mat<Scalar>& m, Index kv_heads, Index group) {
    const Index d = m.rows() / kv_heads;
    mat<Scalar> r(m.rows() * group, m.cols());
    for (Index g = 0; g < kv_heads; ++g)
        for (Index c = 0; c < group; ++c)
            r.middleRows((g * group + c) * d, d) = m.middleRows(g * d, d);
    return r;
}

/// The tiled kernel through detail with given tile settings (as test_tiled_attention.cpp does),
/// so that small inputs reach many tile boundaries.
template <class Scalar>
mat<Scalar> run_tiled(const grouped_inputs<Scalar>& in, const mha::packed_batch& batch,
                      const mha::attention_mask<Scalar>& mask, Scalar scale, const settings& cfg,
                      std::vector<mat<Scalar>>* weights) {
    mat<Scalar> out(in.heads * in.dv, batch.total_queries());
    const mha::detail::attention_problem<Scalar> problem{
        in.q,
        in.k,
        in.v,
        out,
        {in.heads, in.kv_heads, in.dk, in.dv},
        batch,
        mask,
        scale,
        mha::normalization::softmax,
        {weights ? mha::weights_mode::per_head : mha::weights_mode::none},
        nullptr};
    mha::attention_outputs<Scalar> outputs;
    mha::detail::size_outputs(problem, outputs);
    mha::detail::tiled_attention(problem, outputs, cfg);
    if (weights) *weights = outputs.weights;
    return out;
}

/// Tiled kernel with `cfg`'s tiles on 1 and on 2 threads (identical bits: tasks never share an
/// output), against the reference, for every mask.
template <class Scalar>
void check_tiled(Index heads, Index kv_heads, Index dk, Index dv, const mha::packed_batch& batch,
                 const settings& cfg, bool with_weights, std::uint64_t seed) {
    const auto in = make_inputs<Scalar>(heads, kv_heads, dk, dv, batch, seed);
    const Scalar scale = static_cast<Scalar>(library_scale<Scalar>(dk));
    for (const auto& mc : all_masks<Scalar>(batch, heads, seed + 1)) {
        const std::string what =
            mc.name + ", H " + std::to_string(heads) + ", H_kv " + std::to_string(kv_heads) +
            ", tiles " + std::to_string(cfg.query_block) + "/" + std::to_string(cfg.key_block) +
            "/" + std::to_string(cfg.split_chunk);
        settings one = cfg, two = cfg;
        one.threads = 1;
        two.threads = 2;
        std::vector<mat<Scalar>> w1, w2;
        const mat<Scalar> out1 =
            run_tiled<Scalar>(in, batch, mc.mask, scale, one, with_weights ? &w1 : nullptr);
        const mat<Scalar> out2 =
            run_tiled<Scalar>(in, batch, mc.mask, scale, two, with_weights ? &w2 : nullptr);
        require_matches_reference<Scalar>(in, batch, mc, mha::normalization::softmax, scale, out1,
                                          with_weights ? &w1 : nullptr, nullptr, what);
        INFO(what);
        REQUIRE(out1 == out2);
        REQUIRE(w1 == w2);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// (1) The core against the reference.
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("grouped core vs reference: H = 6 with 1, 2, 3, 6 key/value heads",
                   "[grouped][reference]", float, double) {
    using Scalar = TestType;
    const Index kv_heads = GENERATE(1, 2, 3, 6);
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    const Index heads = 6, dk = 5, dv = 3;
    // Cross-attention lengths with an empty sequence, Lq < Lk, Lq > Lk and Lq = Lk.
    const mha::packed_batch batch({4, 0, 9, 6}, {7, 3, 5, 6});
    const auto in = make_inputs<Scalar>(heads, kv_heads, dk, dv, batch,
                                        500 + static_cast<std::uint64_t>(kv_heads));
    mha::attention_options options;
    options.normalize = normalize;
    options.algorithm = algorithm;
    const bool relu = normalize == mha::normalization::relu;
    if (relu) options.scale = relu_scale;
    const long double scale = relu ? static_cast<long double>(static_cast<Scalar>(relu_scale))
                                   : library_scale<Scalar>(dk);
    for (auto mc : all_masks<Scalar>(batch, heads, 600)) {
        if (relu) add_relu_margin(mc, batch, 601);
        const std::string what = mc.name + ", H_kv " + std::to_string(kv_heads) + ", " +
                                 mha::to_string(normalize) + ", " + algorithm_name(algorithm);
        mat<Scalar> out, out_avg, out_plain;
        const auto per_head =
            run_core<Scalar>(in, batch, mc.mask, options, mha::weights_mode::per_head, out);
        const auto averaged =
            run_core<Scalar>(in, batch, mc.mask, options, mha::weights_mode::averaged, out_avg);
        run_core<Scalar>(in, batch, mc.mask, options, mha::weights_mode::none, out_plain);
        INFO(what);
        // Asking for weights does not change the computation: the same path, the same bits.
        REQUIRE(out_avg == out);
        REQUIRE(out_plain == out);
        REQUIRE(per_head.size() == static_cast<std::size_t>(batch.size() * heads));
        REQUIRE(averaged.size() == static_cast<std::size_t>(batch.size()));
        require_matches_reference<Scalar>(in, batch, mc, normalize, scale, out, &per_head,
                                          &averaged, what);
    }
}

TEMPLATE_TEST_CASE("grouped core vs reference: H = 4, H_kv = 2, d_k != d_v", "[grouped][reference]",
                   float, double) {
    using Scalar = TestType;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    const Index heads = 4, kv_heads = 2, dk = 7, dv = 2;
    const mha::packed_batch batch({3, 11, 0, 1}, {3, 11, 0, 9});
    const auto in = make_inputs<Scalar>(heads, kv_heads, dk, dv, batch, 700);
    mha::attention_options options;
    options.algorithm = algorithm;
    for (const auto& mc : all_masks<Scalar>(batch, heads, 701)) {
        mat<Scalar> out;
        const auto per_head =
            run_core<Scalar>(in, batch, mc.mask, options, mha::weights_mode::per_head, out);
        require_matches_reference<Scalar>(in, batch, mc, mha::normalization::softmax,
                                          library_scale<Scalar>(dk), out, &per_head, nullptr,
                                          mc.name + ", " + algorithm_name(algorithm));
    }
}

TEST_CASE("grouped tiled kernel: tile-boundary lengths with small tiles, 1 and 2 threads",
          "[grouped][tiled]") {
    // Query block 8, key block 16: lengths tile − 1, tile, tile + 1 and 2·tile ± 1, in one
    // packed batch with an empty sequence.
    const settings small{8, 16, 32, 0};
    const mha::packed_batch batch({7, 8, 9, 0, 17, 1}, {15, 16, 17, 5, 33, 31});
    check_tiled<float>(6, 2, 3, 5, batch, small, true, 800);
    check_tiled<double>(6, 3, 4, 4, batch, small, false, 810);
    check_tiled<float>(6, 1, 9, 2, batch, small, false, 820);
}

TEST_CASE("grouped tiled kernel: split-KV decode path (one query block, >= 2 chunks of keys)",
          "[grouped][tiled][split]") {
    // With split_chunk 32, 64 keys or more and one query block take the split path and its
    // merge; 65 and 97 leave a partial last chunk.
    const settings small{8, 16, 32, 0};
    check_tiled<float>(6, 2, 8, 3, mha::packed_batch({1, 3, 8}, {64, 65, 97}), small, false, 830);
    check_tiled<double>(4, 1, 5, 5, mha::packed_batch({1, 2}, {97, 64}), small, false, 840);
    // The real chunk size: one query over 2·1024 + 3 keys.
    const Index lk = 2 * mha::detail::tiled_split_chunk + 3;
    check_tiled<float>(4, 2, 16, 8, mha::packed_batch({1}, {lk}), settings{}, false, 850);
}

TEST_CASE("grouped tiled kernel: lengths around the real block sizes", "[grouped][tiled]") {
    using mha::detail::tiled_key_block;
    using mha::detail::tiled_query_block;
    const mha::packed_batch batch({tiled_query_block + 1, 2},
                                  {tiled_key_block + 1, tiled_key_block - 1});
    check_tiled<float>(4, 2, 8, 8, batch, settings{}, false, 860);
}

// ---------------------------------------------------------------------------------------------
// (2) Properties.
// ---------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("grouped attention equals multi-head attention on repeated K/V, bit for bit",
                   "[grouped][property]", float, double) {
    // Query head h computes on its own rows of Q and on K/V head h / (H / H_kv). Repeating each
    // K/V head H / H_kv times gives ordinary multi-head inputs in which head h's K/V rows hold
    // exactly those numbers. Both calls then run the same kernel on the same (sequence, head)
    // problems with the same numbers in the same order; only the distance between key columns
    // differs, which no kernel's arithmetic depends on. So the outputs and weights must be
    // identical, not merely close.
    using Scalar = TestType;
    const Index kv_heads = GENERATE(1, 2, 3);
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    const Index heads = 6, dk = 4, dv = 3, group = heads / kv_heads;
    const mha::packed_batch batch({5, 0, 140}, {9, 2, 140});
    const auto in = make_inputs<Scalar>(heads, kv_heads, dk, dv, batch, 900);
    grouped_inputs<Scalar> repeated = in;
    repeated.kv_heads = heads;
    repeated.k = repeat_heads(in.k, kv_heads, group);
    repeated.v = repeat_heads(in.v, kv_heads, group);
    mha::attention_options options;
    options.normalize = normalize;
    options.algorithm = algorithm;
    for (const auto& mc : all_masks<Scalar>(batch, heads, 901)) {
        INFO(mc.name << ", H_kv " << kv_heads << ", " << mha::to_string(normalize) << ", "
                     << algorithm_name(algorithm));
        mat<Scalar> out_grouped, out_repeated;
        const auto w_grouped =
            run_core<Scalar>(in, batch, mc.mask, options, mha::weights_mode::per_head, out_grouped);
        const auto w_repeated = run_core<Scalar>(repeated, batch, mc.mask, options,
                                                 mha::weights_mode::per_head, out_repeated);
        REQUIRE(out_grouped == out_repeated);
        REQUIRE(w_grouped == w_repeated);
    }
}

TEMPLATE_TEST_CASE("grouped core: 1 and 2 OpenMP threads give identical bits", "[grouped][threads]",
                   float, double) {
    using Scalar = TestType;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    // Long enough for several query blocks and, in the second sequence, the split-KV path.
    const mha::packed_batch batch({300, 1, 0}, {300, 2 * mha::detail::tiled_split_chunk + 5, 4});
    const auto in = make_inputs<Scalar>(8, 2, 16, 16, batch, 950);
    mha::attention_options options;
    options.algorithm = algorithm;
    const mha::attention_mask<Scalar> mask(mha::causal{});
    const int saved = max_threads();
    set_threads(1);
    mat<Scalar> one, two;
    const auto w1 = run_core<Scalar>(in, batch, mask, options, mha::weights_mode::averaged, one);
    set_threads(2);
    const auto w2 = run_core<Scalar>(in, batch, mask, options, mha::weights_mode::averaged, two);
    set_threads(saved);
    CAPTURE(algorithm_name(algorithm));
    REQUIRE(one == two);
    REQUIRE(w1 == w2);
}

TEMPLATE_TEST_CASE("grouped core: NaN and 1e30 in excluded keys and values never reach the output",
                   "[grouped][property][poison]", float, double) {
    using Scalar = TestType;
    const Scalar poison = GENERATE(std::numeric_limits<Scalar>::quiet_NaN(), Scalar(1e30),
                                   Scalar(-1e30), std::numeric_limits<Scalar>::infinity());
    const auto normalize = GENERATE(mha::normalization::softmax, mha::normalization::relu,
                                    mha::normalization::sigmoid);
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    const Index heads = 6, kv_heads = 2, dk = 4, dv = 3;
    // Top-left causal: sequence 0's 6 queries never see its keys 6..9, sequence 1's 3 queries
    // never see its key 3; key_lengths {7, 4} exclude keys 7..9 of sequence 0 a second time.
    const mha::packed_batch batch({6, 3}, {10, 4});
    const auto clean = make_inputs<Scalar>(heads, kv_heads, dk, dv, batch, 990);
    const mha::attention_mask<Scalar> mask(mha::causal{mha::causal_alignment::top_left},
                                           mha::key_lengths{{7, 4}});
    mask_case<Scalar> mc{
        "causal top-left + key_lengths", mask,
        [](Index b, Index, Index j, Index i) { return j <= i && j < (b == 0 ? 7 : 4); }};
    mha::attention_options options;
    options.normalize = normalize;
    options.algorithm = algorithm;
    const bool relu = normalize == mha::normalization::relu;
    if (relu) {
        options.scale = relu_scale;
        add_relu_margin(mc, batch, 991);
    }
    const long double scale = relu ? static_cast<long double>(static_cast<Scalar>(relu_scale))
                                   : library_scale<Scalar>(dk);
    auto dirty = clean;
    // Key columns 6..9 of sequence 0 and column 3 of sequence 1 (packed column 13), every
    // key/value head.
    for (const Index column : {6, 7, 8, 9, 13}) {
        dirty.k.col(column).setConstant(poison);
        dirty.v.col(column).setConstant(poison);
    }
    mat<Scalar> out_clean, out_dirty;
    const auto w_clean =
        run_core<Scalar>(clean, batch, mc.mask, options, mha::weights_mode::per_head, out_clean);
    const auto w_dirty =
        run_core<Scalar>(dirty, batch, mc.mask, options, mha::weights_mode::per_head, out_dirty);
    CAPTURE(poison, mha::to_string(normalize), algorithm_name(algorithm));
    REQUIRE(out_dirty.allFinite());
    // Excluded scores become −∞ (or 0 weight) by selection, so every normaliser sees the same
    // column: the weights are bitwise equal. The output is held to check A against the clean
    // reference (a kernel may skip poisoned columns in another order).
    REQUIRE(w_dirty == w_clean);
    require_matches_reference<Scalar>(clean, batch, mc, normalize, scale, out_dirty, nullptr,
                                      nullptr, "poisoned");
}

TEMPLATE_TEST_CASE("grouped core: fully masked queries get exactly 0 output and weights",
                   "[grouped][property]", float, double) {
    using Scalar = TestType;
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    const Index heads = 4, kv_heads = 2, dk = 3, dv = 2;
    const mha::packed_batch batch({3, 2}, {5, 0});
    const auto in = make_inputs<Scalar>(heads, kv_heads, dk, dv, batch, 995);
    // Query 1 of sequence 0 keeps nothing in head 2 only (the other head of its group keeps
    // keys): only that head's output block must be 0. Sequence 1 has no keys at all.
    std::vector<mha::bool_matrix> keep;
    for (Index b = 0; b < 2; ++b)
        for (Index h = 0; h < heads; ++h) {
            mha::bool_matrix m =
                mha::bool_matrix::Constant(batch.key_length(b), batch.query_length(b), true);
            if (b == 0 && h == 2) m.col(1).setConstant(false);
            keep.push_back(m);
        }
    mha::attention_options options;
    options.algorithm = algorithm;
    mat<Scalar> out;
    const auto w = run_core<Scalar>(in, batch, mha::keep_mask(keep), options,
                                    mha::weights_mode::per_head, out);
    CAPTURE(algorithm_name(algorithm));
    REQUIRE((out.block(2 * dv, 1, dv, 1).array() == Scalar(0)).all());
    REQUIRE((w[2].col(1).array() == Scalar(0)).all());
    REQUIRE((out.block(3 * dv, 1, dv, 1).array() != Scalar(0)).any());
    REQUIRE((out.rightCols(2).array() == Scalar(0)).all());
    REQUIRE(w[static_cast<std::size_t>(heads)].size() == 0);
}

// ---------------------------------------------------------------------------------------------
// (3) Errors.
// ---------------------------------------------------------------------------------------------

TEST_CASE("grouped heads: error messages", "[grouped][errors]") {
    using M = mat<float>;
    SECTION("attention_config") {
        mha::attention_config c;
        c.embed_dim = 24;
        c.num_heads = 6;
        c.num_kv_heads = 4;
        REQUIRE_THROWS_AS(c.resolved(), mha::shape_error);
        REQUIRE_THROWS_WITH(c.resolved(), Equals("mha::attention_config: num_heads must be a "
                                                 "multiple of num_kv_heads = 4, got 6"));
        c.num_kv_heads = -1;
        REQUIRE_THROWS_AS(c.resolved(), mha::value_error);
        REQUIRE_THROWS_WITH(c.resolved(),
                            Equals("mha::attention_config: num_kv_heads must be >= 0, got -1"));
        c.num_kv_heads = 7;
        REQUIRE_THROWS_WITH(mha::multi_head_attention<float>(c),
                            Equals("mha::attention_config: num_heads must be a multiple of "
                                   "num_kv_heads = 7, got 6"));
    }
    SECTION("multi_head_attention_core") {
        // H = 6, H_kv = 2, d_k = 3, d_v = 2; one sequence of 4 queries and 5 keys.
        const mha::packed_batch batch({4}, {5});
        const M q = M::Zero(18, 4), k = M::Zero(6, 5), v = M::Zero(4, 5);
        M out(12, 4);
        const std::string where = "mha::multi_head_attention_core: ";
        auto call = [&](const M& kk, const M& vv, Index heads, Index kv_heads, M& oo) {
            mha::multi_head_attention_core(q, kk, vv, heads, kv_heads, batch, oo);
        };
        REQUIRE_NOTHROW(call(k, v, 6, 2, out));
        REQUIRE_THROWS_AS(call(k, v, 6, 4, out), mha::shape_error);
        REQUIRE_THROWS_WITH(call(k, v, 6, 4, out),
                            Equals(where + "num_heads must be a multiple of num_kv_heads = 4, "
                                           "got 6"));
        REQUIRE_THROWS_AS(call(k, v, 6, 0, out), mha::value_error);
        REQUIRE_THROWS_WITH(call(k, v, 6, 0, out),
                            Equals(where + "num_kv_heads must be >= 1, got 0"));
        REQUIRE_THROWS_WITH(
            call(M::Zero(18, 5), v, 6, 2, out),
            Equals(where + "k.rows() must be 6 (num_kv_heads · q.rows() / num_heads), got 18"));
        REQUIRE_THROWS_WITH(
            call(k, M::Zero(5, 5), 6, 2, out),
            Equals(where + "v.rows() must be a multiple of num_kv_heads = 2, got 5"));
        REQUIRE_THROWS_WITH(call(k, M::Zero(4, 6), 6, 2, out),
                            Equals(where + "v.cols() must be 5 (k.cols()), got 6"));
        M wrong(4, 4);
        REQUIRE_THROWS_WITH(
            call(k, v, 6, 2, wrong),
            Equals(where + "out.rows() must be 12 (num_heads · v.rows() / num_kv_heads), got 4"));
    }
}

// ---------------------------------------------------------------------------------------------
// (4) The layer.
// ---------------------------------------------------------------------------------------------

namespace {

mha::attention_config gqa_config(Index kv_heads, bool bias) {
    mha::attention_config c;
    c.embed_dim = 12;
    c.num_heads = 6;
    c.head_dim = 3;
    c.value_head_dim = 5;
    c.num_kv_heads = kv_heads;
    c.bias = bias;
    return c;
}

}  // namespace

TEMPLATE_TEST_CASE("grouped layer matches reference_layer with key/value heads (check B)",
                   "[grouped][layer]", float, double) {
    // Check B with k = 4, the layer tests' rule (test_multi_head_attention.cpp,
    // layer_baseline_k): the same chain of four GEMMs and a softmax, so the same calibration.
    // 64 tokens give 768 outputs and 6·64·64 weights per comparison, the sizes at which the layer
    // tests found the ratio of maxima stable.
    using Scalar = TestType;
    const Index kv_heads = GENERATE(1, 2, 3, 6);
    const bool bias = GENERATE(true, false);
    const auto algorithm =
        GENERATE(mha::attention_algorithm::materialized, mha::attention_algorithm::tiled);
    mha_test::value_source values(1200 + static_cast<std::uint64_t>(kv_heads));
    mha::attention_config config = gqa_config(kv_heads, bias);
    config.attention.algorithm = algorithm;
    const auto params = random_parameters<Scalar>(config, values);
    const mha::multi_head_attention<Scalar> layer(config, params);
    const Index length = 64;
    const mat<Scalar> x = values.normal_matrix<Scalar>(config.embed_dim, length);
    const auto r = layer.forward_with_weights(x, mha::weights_mode::per_head, mha::causal{});
    const Scalar scale = static_cast<Scalar>(library_scale<Scalar>(config.head_dim));
    const auto causal = [](Index, Index j, Index i) { return j <= i; };
    std::vector<mat<long double>> ref_w;
    const mat<long double> ref = mha_test::reference_layer<long double>(
        to_reference<long double>(params), 6, wide(x), wide(x), wide(x),
        static_cast<long double>(scale), causal, nullptr, mha_test::norm_kind::softmax, &ref_w,
        kv_heads);
    std::vector<mat<Scalar>> base_w;
    const mat<Scalar> base =
        mha_test::reference_layer<Scalar>(to_reference<Scalar>(params), 6, x, x, x, scale, causal,
                                          nullptr, mha_test::norm_kind::softmax, &base_w, kv_heads);
    CAPTURE(kv_heads, bias, algorithm_name(algorithm));
    mha_test::require_within_baseline<Scalar>(r.output, ref, base, 4, "output");
    REQUIRE(r.weights.size() == 6);
    mat<Scalar> w(length, 6 * length), wb(length, 6 * length);
    mat<long double> wr(length, 6 * length);
    for (Index h = 0; h < 6; ++h) {
        const auto hh = static_cast<std::size_t>(h);
        w.middleCols(h * length, length) = r.weights[hh];
        wb.middleCols(h * length, length) = base_w[hh];
        wr.middleCols(h * length, length) = ref_w[hh];
    }
    mha_test::require_within_baseline<Scalar>(w, wr, wb, 4, "per-head weights");
}

TEST_CASE("grouped layer: resolved config, widths, parameters and from_packed",
          "[grouped][layer]") {
    SECTION("resolved(): num_kv_heads defaults to num_heads") {
        mha::attention_config c;
        c.embed_dim = 24;
        c.num_heads = 6;
        const mha::attention_config r = c.resolved();
        CHECK(r.num_kv_heads == 6);
        CHECK(r.head_dim == 4);
        CHECK(r.value_head_dim == 4);
        const mha::multi_head_attention<float> layer(c);
        CHECK(layer.qk_width() == 24);
        CHECK(layer.key_width() == 24);
        CHECK(layer.value_width() == 24);
        CHECK(layer.v_width() == 24);
    }
    SECTION("resolved(): an explicit num_kv_heads is kept") {
        mha::attention_config c;
        c.embed_dim = 24;
        c.num_heads = 6;
        c.num_kv_heads = 2;
        c.value_head_dim = 3;
        const mha::attention_config r = c.resolved();
        CHECK(r.num_kv_heads == 2);
        CHECK(r.num_heads == 6);
        CHECK(r.head_dim == 4);
        CHECK(r.value_head_dim == 3);
        const mha::multi_head_attention<float> layer(c);
        CHECK(layer.qk_width() == 24);    // 6 · 4
        CHECK(layer.key_width() == 8);    // 2 · 4
        CHECK(layer.value_width() == 6);  // 2 · 3
        CHECK(layer.v_width() == 18);     // 6 · 3
        const auto p = layer.parameters();
        CHECK(p.w_q.rows() == 24);
        CHECK(p.w_k.rows() == 8);
        CHECK(p.w_v.rows() == 6);
        CHECK(p.w_o.cols() == 18);
        CHECK(p.b_k.size() == 8);
        CHECK(p.b_v.size() == 6);
        c.num_kv_heads = 1;
        CHECK(c.resolved().num_kv_heads == 1);
    }
    SECTION("parameters() returns what the constructor was given") {
        mha_test::value_source values(1300);
        for (const bool bias : {true, false}) {
            const auto config = gqa_config(2, bias);
            const auto p = random_parameters<double>(config, values);
            const mha::multi_head_attention<double> layer(config, p);
            const auto back = layer.parameters();
            CHECK(back.w_q == p.w_q);
            CHECK(back.w_k == p.w_k);
            CHECK(back.w_v == p.w_v);
            CHECK(back.w_o == p.w_o);
            CHECK(back.b_q == p.b_q);
            CHECK(back.b_k == p.b_k);
            CHECK(back.b_v == p.b_v);
            CHECK(back.b_o == p.b_o);
        }
    }
    SECTION("from_packed takes the stacked [W_q; W_k; W_v] of heights H·d_k, H_kv·d_k, H_kv·d_v") {
        mha_test::value_source values(1301);
        const auto config = gqa_config(3, true);
        const auto p = random_parameters<float>(config, values);
        mat<float> stacked(18 + 9 + 15, 12);
        stacked << p.w_q, p.w_k, p.w_v;
        mha::vector<float> stacked_bias(18 + 9 + 15);
        stacked_bias << p.b_q, p.b_k, p.b_v;
        const auto packed = mha::multi_head_attention<float>::from_packed(
            config, stacked, stacked_bias, p.w_o, p.b_o);
        const mha::multi_head_attention<float> separate(config, p);
        const auto back = packed.parameters();
        CHECK(back.w_q == p.w_q);
        CHECK(back.w_k == p.w_k);
        CHECK(back.w_v == p.w_v);
        CHECK(back.b_k == p.b_k);
        CHECK(back.b_v == p.b_v);
        const mat<float> x = values.normal_matrix<float>(12, 9);
        // Both keep the same stacked weights: the same computation, the same bits.
        CHECK(packed.forward(x, mha::causal{}) == separate.forward(x, mha::causal{}));
        // The MHA-sized stack (3E rows) is not the GQA form.
        const mat<float> wrong = mat<float>::Zero(36, 12);
        REQUIRE_THROWS_WITH(
            mha::multi_head_attention<float>::from_packed(config, wrong, stacked_bias, p.w_o,
                                                          p.b_o),
            Equals("mha::multi_head_attention::from_packed: in_proj_weight.rows() must be 42 "
                   "(H·d_k + H_kv·(d_k + d_v)), got 36"));
    }
}
