// SPDX-License-Identifier: MIT
// The tiled (online-softmax) kernel against the long-double reference and the materialised path,
// at tile boundaries, for every mask type, with poisoned excluded keys and values, with and
// without weights, with 1 and 2 threads. Small tile settings reach many boundaries with small
// inputs; a few cases use the real tile sizes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <mha/attention.hpp>
#include <mha/detail/tiled/block_kernels.hpp>
#include <mha/detail/tiled/block_softmax.hpp>

#include "check.hpp"
#include "exp_error.hpp"
#include "instruction_set_build.hpp"
#include "reference.hpp"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#if defined(MHA_TEST_AVX512_BUILD)
// The build for AVX-512 (tests/CMakeLists.txt) exists to run the float kernel's AVX-512 paths.
static_assert(mha::detail::mx_skips_nan<float>() && mha::detail::tiles_mask_boundaries<float>(),
              "compiled for AVX-512, the float kernel must take its AVX-512 paths");
#endif

#if defined(MHA_TEST_AVX2_BUILD)
// The build for AVX2 with FMA (tests/CMakeLists.txt) runs the 8-lane paths: score tiles of 2 × 6
// that mask boundary blocks and skip NaN in their max, the exp pass's exp_above_flush_avx2.
static_assert(mha::detail::block_kernel_traits<float>::width == 8 &&
                  !mha::detail::block_kernel_traits<float>::many_registers &&
                  mha::detail::mx_skips_nan<float>() && mha::detail::tiles_mask_boundaries<float>(),
              "compiled for AVX2, the float kernel must take its 8-lane paths");
#endif

using mha::Index;
using mha_test::mat;
using settings = mha::detail::tiled_settings;

/// A mask given both as the library's type and as the reference's predicates.
template <class Scalar>
struct mask_case {
    std::string name;
    mha::attention_mask<Scalar> mask;
    mha_test::allowed_fn allowed;
    mha_test::bias_fn bias;
};

template <class Scalar>
std::vector<mask_case<Scalar>> all_masks(Index lq, Index lk, std::uint64_t seed) {
    using mha::causal_alignment;
    mha_test::value_source rnd(seed);
    std::vector<mask_case<Scalar>> cases;
    cases.push_back({"none", {}, mha_test::allow_all(), nullptr});
    cases.push_back(
        {"causal bottom-right", mha::causal{}, mha_test::causal_bottom_right(lq, lk), nullptr});
    cases.push_back({"causal top-left", mha::causal{causal_alignment::top_left},
                     mha_test::causal_top_left(), nullptr});
    cases.push_back({"window 5,2 bottom-right", mha::sliding_window{5, 2},
                     [=](Index j, Index i) {
                         const Index c = i + lk - lq;
                         return j >= c - 5 && j <= c + 2;
                     },
                     nullptr});
    cases.push_back({"window 3,0 top-left", mha::sliding_window{3, 0, causal_alignment::top_left},
                     [](Index j, Index i) { return j >= i - 3 && j <= i; }, nullptr});
    const Index len = lk * 2 / 3;
    cases.push_back(
        {"key_lengths", mha::key_lengths{{len}}, [=](Index j, Index) { return j < len; }, nullptr});
    // keep_mask: random, with query 0 and every 5th query fully masked.
    mha::bool_matrix keep(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
            keep(j, i) = i % 5 != 0 && rnd.uniform(0, 1) < 0.7;
    cases.push_back({"keep_mask", mha::keep_mask(keep),
                     [keep](Index j, Index i) { return keep(j, i); }, nullptr});
    // additive_bias: random finite values, some −∞, every 4th query fully −∞.
    mha::matrix<Scalar> bias(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) {
            const double u = rnd.uniform(0, 1);
            bias(j, i) = (i % 4 == 3 || u < 0.2) ? -std::numeric_limits<Scalar>::infinity()
                                                 : static_cast<Scalar>(rnd.normal(2.0));
        }
    auto bias_fn = [bias](Index j, Index i) { return static_cast<long double>(bias(j, i)); };
    cases.push_back(
        {"additive_bias", mha::additive_bias<Scalar>(bias), mha_test::allow_all(), bias_fn});
    cases.push_back({"causal + window + key_lengths + keep + bias",
                     mha::attention_mask<Scalar>(mha::causal{}, mha::sliding_window{7, 0},
                                                 mha::key_lengths{{len}}, mha::keep_mask(keep),
                                                 mha::additive_bias<Scalar>(bias)),
                     [=](Index j, Index i) {
                         const Index c = i + lk - lq;
                         return j <= c && j >= c - 7 && j < len && keep(j, i);
                     },
                     bias_fn});
    return cases;
}

/// Runs the tiled kernel on one head; optionally returns the weights.
template <class Scalar>
mat<Scalar> run_tiled(const mat<Scalar>& q, const mat<Scalar>& k, const mat<Scalar>& v,
                      const mha::attention_mask<Scalar>& mask, Scalar scale, const settings& cfg,
                      mat<Scalar>* weights = nullptr) {
    mat<Scalar> out(v.rows(), q.cols());
    const mha::packed_batch batch = mha::packed_batch::single(q.cols(), k.cols());
    const mha::detail::attention_problem<Scalar> problem{
        q,
        k,
        v,
        out,
        {1, 1, q.rows(), v.rows()},
        batch,
        mask,
        scale,
        mha::normalization::softmax,
        {weights ? mha::weights_mode::per_head : mha::weights_mode::none},
        nullptr};
    mha::attention_outputs<Scalar> outputs;
    mha::detail::size_outputs(problem, outputs);
    mha::detail::tiled_attention(problem, outputs, cfg);
    if (weights) *weights = outputs.weights.front();
    return out;
}

/// Weights are the attention output for values that are unit vectors (V = I, Vmax = 1), so check
/// A's bound applies column by column with Vmax = 1: |W − R| ≤ 8·u·(1 + Smax) + u·|R|.
template <class Scalar>
void require_weights_close(const mat<Scalar>& w, const mat<long double>& ref,
                           const mat<long double>& q, const mat<long double>& k, long double scale,
                           const mha_test::allowed_fn& allowed, const mha_test::bias_fn& bias,
                           const std::string& what) {
    const mat<long double> eye = mat<long double>::Identity(k.cols(), k.cols());
    mha_test::require_attention_close<Scalar>(w, ref, q, k, eye, scale, allowed, bias,
                                              what + " (weights)");
}

/// Tiled vs long-double reference for every mask at one shape; 1 and 2 threads give identical bits.
template <class Scalar>
void check_shape(Index lq, Index lk, Index dk, Index dv, const settings& cfg, bool with_weights,
                 std::uint64_t seed) {
    mha_test::value_source rnd(seed);
    const mat<Scalar> q = rnd.normal_matrix<Scalar>(dk, lq);
    const mat<Scalar> k = rnd.normal_matrix<Scalar>(dk, lk);
    const mat<Scalar> v = rnd.normal_matrix<Scalar>(dv, lk);
    const Scalar scale = Scalar(1) / std::sqrt(Scalar(dk));
    const mat<long double> ql = q.template cast<long double>(), kl = k.template cast<long double>(),
                           vl = v.template cast<long double>();
    for (const auto& mc : all_masks<Scalar>(lq, lk, seed + 1)) {
        const std::string what = mc.name + ", lq " + std::to_string(lq) + ", lk " +
                                 std::to_string(lk) + ", dk " + std::to_string(dk) + ", dv " +
                                 std::to_string(dv);
        mat<long double> ref_w;
        const mat<long double> ref = mha_test::reference_attention<long double>(
            ql, kl, vl, scale, mc.allowed, mc.bias, mha_test::norm_kind::softmax, &ref_w);
        settings one = cfg, two = cfg;
        one.threads = 1;
        two.threads = 2;
        mat<Scalar> w1, w2;
        const mat<Scalar> out1 =
            run_tiled<Scalar>(q, k, v, mc.mask, scale, one, with_weights ? &w1 : nullptr);
        mha_test::require_attention_close<Scalar>(out1, ref, ql, kl, vl, scale, mc.allowed, mc.bias,
                                                  what);
        const mat<Scalar> out2 =
            run_tiled<Scalar>(q, k, v, mc.mask, scale, two, with_weights ? &w2 : nullptr);
        INFO(what);
        REQUIRE(out1 == out2);  // tasks never share outputs: bit-identical for any thread count
        if (!with_weights) continue;
        REQUIRE(w1 == w2);
        require_weights_close<Scalar>(w1, ref_w, ql, kl, scale, mc.allowed, mc.bias, what);
    }
}

const settings small_tiles{8, 16, 32, 0};

}  // namespace

TEST_CASE("tiled attention: tile-boundary lengths with small tiles, every mask", "[tiled]") {
    // Bq = 8, Bk = 16: lengths tile−1, tile, tile+1, 2·tile±1 for both, plus 1 and 0.
    const std::vector<Index> lqs{0, 1, 7, 8, 9, 15, 17};
    const std::vector<Index> lks{0, 1, 15, 16, 17, 31, 33};
    std::uint64_t seed = 100;
    for (Index lq : lqs)
        for (Index lk : lks)
            check_shape<float>(lq, lk, 3, 5, small_tiles, lq % 2 == 1, ++seed);
}

TEST_CASE("tiled attention: head dims not a multiple of the SIMD width", "[tiled]") {
    std::uint64_t seed = 200;
    for (Index d : {1, 3, 17, 64, 65}) {
        check_shape<float>(9, 33, d, d, small_tiles, true, ++seed);
        check_shape<double>(17, 15, d, d == 1 ? 2 : d - 1, small_tiles, false, ++seed);
    }
}

TEST_CASE("tiled attention: real tile sizes", "[tiled]") {
    using mha::detail::tiled_key_block;
    using mha::detail::tiled_query_block;
    const settings real{};
    check_shape<float>(tiled_query_block + 1, tiled_key_block - 1, 16, 16, real, false, 301);
    check_shape<float>(2 * tiled_query_block - 1, tiled_key_block + 1, 65, 17, real, true, 302);
    check_shape<double>(tiled_query_block, 2 * tiled_key_block + 1, 8, 8, real, false, 303);
    check_shape<float>(2 * tiled_key_block + 1, tiled_query_block - 1, 8, 8, real, false, 304);
}

TEST_CASE("tiled attention: decode shapes split over key chunks", "[tiled]") {
    // lk >= 2·split_chunk with one query block triggers the split-KV path and its merge.
    std::uint64_t seed = 400;
    for (Index lq : {1, 3, 8})
        for (Index lk : {64, 65, 95, 97})
            check_shape<float>(lq, lk, 17, 9, small_tiles, false, ++seed);
    check_shape<float>(1, 2 * mha::detail::tiled_split_chunk + 3, 64, 64, settings{}, false, 410);
}

TEST_CASE("tiled attention: poisoned excluded keys and values never leak", "[tiled]") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    for (float poison : {nan, inf, 1e30f}) {
        for (const auto& cfg : {small_tiles, settings{4, 8, 16, 0}}) {
            const Index lq = 13, lk = 70, d = 5;  // lk >= 2·split_chunk: split path as well
            mha_test::value_source rnd(500);
            mat<float> q = rnd.normal_matrix<float>(d, lq);
            mat<float> k = rnd.normal_matrix<float>(d, lk);
            mat<float> v = rnd.normal_matrix<float>(d, lk);
            const float scale = 0.4f;
            // Keys 50.. are past key_lengths; key 3 is excluded by keep_mask for every query,
            // key 20 by a −∞ bias for every query. Poison all three kinds in K and V.
            mha::bool_matrix keep = mha::bool_matrix::Constant(lk, lq, true);
            keep.row(3).setConstant(false);
            mha::matrix<float> bias = mha::matrix<float>::Zero(lk, lq);
            bias.row(20).setConstant(-inf);
            for (Index j : {3, 20, 50, 61, 69}) {
                k.col(j).setConstant(poison);
                v.col(j).setConstant(poison);
            }
            const mha::attention_mask<float> mask(mha::key_lengths{{50}}, mha::keep_mask(keep),
                                                  mha::additive_bias<float>(bias));
            auto allowed = [](Index j, Index) { return j < 50 && j != 3 && j != 20; };
            mat<float> w;
            const mat<float> out = run_tiled<float>(q, k, v, mask, scale, cfg, &w);
            const mat<float> out_nw = run_tiled<float>(q, k, v, mask, scale, cfg);
            REQUIRE(out.allFinite());
            REQUIRE(out_nw == out);
            REQUIRE(w.allFinite());
            const mat<long double> ql = q.cast<long double>(), kl = k.cast<long double>(),
                                   vl = v.cast<long double>();
            const mat<long double> ref =
                mha_test::reference_attention<long double>(ql, kl, vl, scale, allowed);
            mha_test::require_attention_close<float>(out, ref, ql, kl, vl, scale, allowed, nullptr,
                                                     "poison");
            // Causal: value column j is excluded for queries before it but allowed after it;
            // 1e30 keeps the excluded queries exact and the allowed ones are bounded by Vmax.
            if (poison == 1e30f) {
                mat<float> v2 = rnd.normal_matrix<float>(d, lk);
                v2.col(10).setConstant(poison);
                const mat<float> out2 = run_tiled<float>(
                    q, k, v2, mha::causal{mha::causal_alignment::top_left}, scale, cfg);
                const mat<long double> ref2 = mha_test::reference_attention<long double>(
                    ql, kl, v2.cast<long double>(), scale, mha_test::causal_top_left());
                mha_test::require_attention_close<float>(out2, ref2, ql, kl, v2.cast<long double>(),
                                                         scale, mha_test::causal_top_left(),
                                                         nullptr, "causal 1e30");
            }
        }
    }
}

TEST_CASE("tiled attention: NaN in an allowed input propagates only where it is seen", "[tiled]") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const Index lq = 20, lk = 40, d = 4;
    mha_test::value_source rnd(600);
    const mat<float> q = rnd.normal_matrix<float>(d, lq);
    mat<float> k = rnd.normal_matrix<float>(d, lk);
    mat<float> v = rnd.normal_matrix<float>(d, lk);
    k(0, 12) = nan;  // key 12 seen (causal top-left) by queries 12..19
    v(1, 5) = nan;   // value 5 seen by queries 5..19
    const mat<float> out =
        run_tiled<float>(q, k, v, mha::causal{mha::causal_alignment::top_left}, 0.5f, small_tiles);
    for (Index i = 0; i < lq; ++i) {
        INFO("query " << i);
        if (i < 5)
            REQUIRE(out.col(i).allFinite());
        else
            REQUIRE(out.col(i).hasNaN());
    }
}

TEST_CASE("tiled attention: NaN scores on the register tiles' paths", "[tiled]") {
    // Blocks of 4 packets of queries take the register tiles, whose per-query max skips NaN
    // scores on AVX-512 and AVX2 (mx_skips_nan): a NaN must still reach exactly the queries that
    // see it, also when every score of a query in a block is NaN (a max of −∞ there would read as
    // "no key yet"). Interior blocks (no mask) and boundary blocks masked in the tiles (causal).
    // Each query is computed in its own lanes, so the other columns must equal, bit for bit,
    // those of the same inputs without the NaN.
    constexpr Index w = mha::detail::block_kernel_traits<float>::width;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const Index lq = std::max<Index>(4 * w + 3, 40), lk = 49, d = 17;  // 40: one-lane builds
    mha_test::value_source rnd(650);
    const mat<float> q = rnd.normal_matrix<float>(d, lq);
    const mat<float> k = rnd.normal_matrix<float>(d, lk);
    const mat<float> v = rnd.normal_matrix<float>(9, lk);
    const settings cfg{4 * w, 24, 48, 1};
    using mask_t = mha::attention_mask<float>;
    for (const mask_t& mask : {mask_t(), mask_t(mha::causal{mha::causal_alignment::top_left})}) {
        const mat<float> clean = run_tiled<float>(q, k, v, mask, 0.3f, cfg);
        REQUIRE(clean.allFinite());
        // Query 7 all NaN: every score of it NaN, in every block.
        mat<float> q_nan = q;
        q_nan.col(7).setConstant(nan);
        const mat<float> out_q = run_tiled<float>(q_nan, k, v, mask, 0.3f, cfg);
        // Key 30 NaN in one coordinate: one NaN score for each query that sees it.
        mat<float> k_nan = k;
        k_nan(3, 30) = nan;
        const mat<float> out_k = run_tiled<float>(q, k_nan, v, mask, 0.3f, cfg);
        const bool causal = mask.causal_mask().has_value();
        for (Index i = 0; i < lq; ++i) {
            INFO("query " << i << (causal ? ", causal" : ", no mask"));
            if (i == 7)
                REQUIRE(out_q.col(i).array().isNaN().all());
            else
                REQUIRE(out_q.col(i) == clean.col(i));
            if (!causal || i >= 30)
                REQUIRE(out_k.col(i).array().isNaN().all());
            else
                REQUIRE(out_k.col(i) == clean.col(i));
        }
    }
}

TEST_CASE("tiled attention: public API dispatch, packed batch, per-head and averaged weights",
          "[tiled]") {
    const Index heads = 3, dk = 5, dv = 4;
    const mha::packed_batch batch({9, 1, 0, 17}, {17, 33, 4, 16});
    mha_test::value_source rnd(700);
    const mat<double> q = rnd.normal_matrix<double>(heads * dk, batch.total_queries());
    const mat<double> k = rnd.normal_matrix<double>(heads * dk, batch.total_keys());
    const mat<double> v = rnd.normal_matrix<double>(heads * dv, batch.total_keys());
    const mha::attention_mask<double> mask(mha::causal{}, mha::key_lengths{{15, 30, 4, 16}});
    for (auto mode :
         {mha::weights_mode::none, mha::weights_mode::per_head, mha::weights_mode::averaged}) {
        mha::attention_options tiled, materialized;
        tiled.algorithm = mha::attention_algorithm::tiled;
        materialized.algorithm = mha::attention_algorithm::materialized;
        mat<double> out_t(heads * dv, batch.total_queries()), out_m = out_t;
        const std::vector<mha::matrix<double>> w_t =
            mha::multi_head_attention_core(q, k, v, heads, batch, out_t, mask, tiled, {mode})
                .weights;
        const std::vector<mha::matrix<double>> w_m =
            mha::multi_head_attention_core(q, k, v, heads, batch, out_m, mask, materialized, {mode})
                .weights;
        REQUIRE(w_t.size() == w_m.size());
        const long double scale = 1.0L / std::sqrt(static_cast<long double>(dk));
        for (Index b = 0; b < batch.size(); ++b) {
            const Index lq = batch.query_length(b), lk = batch.key_length(b);
            const Index len = mask.lengths()->lengths[static_cast<std::size_t>(b)];
            auto allowed = [=](Index j, Index i) { return j <= i + lk - lq && j < len; };
            mat<long double> avg = mat<long double>::Zero(lk, lq);
            for (Index h = 0; h < heads; ++h) {
                const mat<long double> qh =
                    q.block(h * dk, batch.query_offset(b), dk, lq).cast<long double>();
                const mat<long double> kh =
                    k.block(h * dk, batch.key_offset(b), dk, lk).cast<long double>();
                const mat<long double> vh =
                    v.block(h * dv, batch.key_offset(b), dv, lk).cast<long double>();
                mat<long double> rw;
                const mat<long double> ref = mha_test::reference_attention<long double>(
                    qh, kh, vh, scale, allowed, nullptr, mha_test::norm_kind::softmax, &rw);
                const mat<double> oh = out_t.block(h * dv, batch.query_offset(b), dv, lq);
                mha_test::require_attention_close<double>(oh, ref, qh, kh, vh, scale, allowed,
                                                          nullptr, "packed batch");
                if (mode == mha::weights_mode::per_head)
                    require_weights_close<double>(w_t[static_cast<std::size_t>(b * heads + h)], rw,
                                                  qh, kh, scale, allowed, nullptr, "per-head");
                avg += rw / static_cast<long double>(heads);
            }
            if (mode == mha::weights_mode::averaged) {
                // Mean of H weights, each within 8·u·(1+Smax) of the reference (check A with
                // Vmax = 1); the mean of the per-head errors is below the largest of them, and
                // Smax here is below 5 (normal inputs, d_k = 5), so 8·u·6 plus the mean's own
                // rounding (H·u) bounds it.
                const long double bound = 8 * mha_test::unit_roundoff<double>() * 6 +
                                          heads * mha_test::unit_roundoff<double>();
                REQUIRE(mha_test::max_abs_diff(w_t[static_cast<std::size_t>(b)], avg) <= bound);
            }
        }
    }
}

/// Same shape and the same bits in every element (NaN equals the same NaN, −0 ≠ +0). An empty
/// matrix has no data pointer, which memcmp must not be given.
template <class A, class B>
bool same_bits(const A& a, const B& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           (a.size() == 0 ||
            std::memcmp(a.data(), b.data(),
                        sizeof(typename A::Scalar) * static_cast<std::size_t>(a.size())) == 0);
}

TEST_CASE(
    "multi_head_attention_core: a workspace kept across calls of other shapes and kernels "
    "gives the results of calls without one",
    "[tiled]") {
    // The reference is the same public call without a workspace (checked against the long-double
    // reference above): the same kernels on the same values, so outputs, weights and
    // log-sum-exps must agree bit for bit. What could differ is a buffer left by an earlier call
    // of another shape or kernel: the calls alternate the tiled kernel (long sequences: several
    // query blocks) and the materialised one (ReLU; weights), grow and shrink every buffer, and
    // end with the first call again.
    mha_test::value_source rnd(701);
    struct call {
        Index heads, kv_heads, dk, dv;
        std::vector<Index> lengths;
        mha::attention_mask<float> mask;
        mha::normalization normalize;
        mha::weights_mode weights;
    };
    const call first{4,
                     2,
                     32,
                     32,
                     {300, 40},
                     mha::causal{},
                     mha::normalization::softmax,
                     mha::weights_mode::none};
    const call calls[] = {
        first,
        {2, 2, 16, 8, {50}, {}, mha::normalization::relu, mha::weights_mode::per_head},
        {3,
         3,
         8,
         8,
         {1, 130, 1},
         mha::attention_mask<float>(mha::key_lengths{{1, 100, 0}}),
         mha::normalization::softmax,
         mha::weights_mode::averaged},
        first,
    };
    mha::core_workspace<float> workspace;
    for (std::size_t i = 0; i < std::size(calls); ++i) {
        const call& c = calls[i];
        const mha::packed_batch batch(c.lengths);
        const Index n = batch.total_queries();
        const mat<float> q = rnd.normal_matrix<float>(c.heads * c.dk, n);
        const mat<float> k = rnd.normal_matrix<float>(c.kv_heads * c.dk, n);
        const mat<float> v = rnd.normal_matrix<float>(c.kv_heads * c.dv, n);
        mha::attention_options options;
        options.normalize = c.normalize;
        mha::attention_request request{c.weights};
        request.log_sum_exp = c.normalize == mha::normalization::softmax;
        mat<float> expected(c.heads * c.dv, n), out(c.heads * c.dv, n);
        const mha::attention_outputs<float> without = mha::multi_head_attention_core(
            q, k, v, c.heads, c.kv_heads, batch, expected, c.mask, options, request);
        out.setConstant(std::numeric_limits<float>::quiet_NaN());
        const mha::attention_outputs<float> with = mha::multi_head_attention_core(
            q, k, v, c.heads, c.kv_heads, batch, out, c.mask, options, request, workspace);
        INFO("call " << i);
        CHECK(same_bits(out, expected));
        CHECK(same_bits(with.log_sum_exp, without.log_sum_exp));
        REQUIRE(with.weights.size() == without.weights.size());
        for (std::size_t w = 0; w < with.weights.size(); ++w)
            CHECK(same_bits(with.weights[w], without.weights[w]));
    }
}

TEST_CASE(
    "multi_head_attention_core: a boundary block masked in the score tiles reads only the rows "
    "they wrote",
    "[tiled]") {
    // Where the score tiles mask a causal boundary block themselves (float on AVX-512), they
    // skip the keys outside their queries' ranges and the exp pass must not read those rows. A
    // call without a workspace gets fresh buffers, whose old contents are whatever malloc
    // returns; here one workspace first serves an unmasked call with large scores (sigma 6:
    // |s| up to ~200 at d_k = 64), which fills the score buffer, then causal calls whose skipped
    // rows hold those scores. Compared with the long-double reference under the usual bound;
    // without AVX-512 it checks the masked-by-selection path the same way.
    mha_test::value_source rnd(702);
    const Index dk = 64, dv = 64;
    mha::core_workspace<float> workspace;
    {
        const mha::packed_batch batch({300});
        const mat<float> q = rnd.normal_matrix<float>(dk, 300) * 6.0f;
        const mat<float> k = rnd.normal_matrix<float>(dk, 300) * 6.0f;
        const mat<float> v = rnd.normal_matrix<float>(dv, 300);
        mat<float> out(dv, 300);
        mha::multi_head_attention_core(q, k, v, 1, 1, batch, out, {}, {}, {}, workspace);
    }
    for (const Index len : {Index(300), Index(77), Index(130)}) {
        const mha::packed_batch batch({len});
        const mat<float> q = rnd.normal_matrix<float>(dk, len);
        const mat<float> k = rnd.normal_matrix<float>(dk, len);
        const mat<float> v = rnd.normal_matrix<float>(dv, len);
        mat<float> out(dv, len);
        mha::multi_head_attention_core(q, k, v, 1, 1, batch, out, mha::causal{}, {}, {}, workspace);
        const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
        const mat<long double> ql = q.cast<long double>(), kl = k.cast<long double>(),
                               vl = v.cast<long double>();
        const auto allowed = [](Index j, Index i) { return j <= i; };
        const mat<long double> ref =
            mha_test::reference_attention<long double>(ql, kl, vl, scale, allowed);
        mha_test::require_attention_close<float>(
            out, ref, ql, kl, vl, scale, allowed, nullptr,
            "causal after large scores, L " + std::to_string(len));
    }
}

TEST_CASE("tiled attention: other normalisations fall back to the materialised path", "[tiled]") {
    mha_test::value_source rnd(800);
    const mat<float> q = rnd.normal_matrix<float>(4, 9), k = rnd.normal_matrix<float>(4, 11),
                     v = rnd.normal_matrix<float>(3, 11);
    for (auto norm : {mha::normalization::relu, mha::normalization::sigmoid}) {
        mha::attention_options tiled, materialized;
        tiled.normalize = materialized.normalize = norm;
        tiled.algorithm = mha::attention_algorithm::tiled;
        materialized.algorithm = mha::attention_algorithm::materialized;
        const mat<float> a = mha::scaled_dot_product_attention(q, k, v, mha::causal{}, tiled);
        const mat<float> b =
            mha::scaled_dot_product_attention(q, k, v, mha::causal{}, materialized);
        REQUIRE(a == b);
    }
}

TEST_CASE("tiled attention: empty inputs and the single-head API", "[tiled]") {
    mha::attention_options tiled;
    tiled.algorithm = mha::attention_algorithm::tiled;
    const mat<float> q0(4, 0), k0(4, 0), v0(3, 0), q1 = mat<float>::Ones(4, 2);
    mat<float> w;
    mat<float> out(3, 0);
    w = mha::scaled_dot_product_attention(q0, k0, v0, out, {}, tiled, {mha::weights_mode::per_head})
            .weights.front();
    REQUIRE(w.rows() == 0);
    REQUIRE(w.cols() == 0);
    mat<float> out1(3, 2);
    w = mha::scaled_dot_product_attention(q1, k0, v0, out1, {}, tiled,
                                          {mha::weights_mode::per_head})
            .weights.front();
    REQUIRE(out1 == mat<float>::Zero(3, 2));  // no key at all: exactly 0
    REQUIRE(w.rows() == 0);
    REQUIRE(w.cols() == 2);
}

TEST_CASE("tiled attention: query blocks wide enough for the register-tiled kernels", "[tiled]") {
    // The small tiles above have fewer queries per block than a packet holds, which sends the
    // scores to Eigen; here blocks of 4 packets of queries take the register tiles, with key
    // blocks of 24 (not a multiple of the key tile) and lengths around packet multiples.
    constexpr Index w = mha::detail::block_kernel_traits<float>::width;
    constexpr Index wd = mha::detail::block_kernel_traits<double>::width;
    std::uint64_t seed = 600;
    for (Index lq : {w, 2 * w - 1, 2 * w + 1, 4 * w + 3})
        for (Index lk : {Index(23), Index(25), Index(49)})
            check_shape<float>(lq, lk, 17, 65, settings{4 * w, 24, 48, 0}, lq % 2 == 1, ++seed);
    for (Index d : {1, 3, 64})
        check_shape<double>(3 * wd + 1, 50, d, d + 1, settings{4 * wd, 24, 48, 0}, true, ++seed);
}

TEST_CASE("tiled kernel: exponentials that would be subnormal are exactly 0", "[tiled]") {
    // Differences from the running max swept across the subnormal range of exp(), plus −∞ and
    // NaN: every result is 0, NaN or a normal number, never subnormal (which slows every later
    // multiply-add on many CPUs), and the normal ones are exp() within 4 ulps (Eigen's packet exp
    // is documented to about 1 ulp; the scalar path is std::exp itself).
    const auto check = [](auto zero) {
        using Scalar = decltype(zero);
        const Index width = mha::detail::block_kernel_traits<Scalar>::width;
        const Index nqp = 2 * width, nk = 300;
        const Scalar lowest = std::log(std::numeric_limits<Scalar>::denorm_min());
        std::vector<Scalar> st(static_cast<std::size_t>(nqp * nk)), in;
        for (Index i = 0; i < nqp * nk; ++i)
            st[static_cast<std::size_t>(i)] = lowest * Scalar(1.05) * Scalar(i) / Scalar(nqp * nk);
        st[3] = -std::numeric_limits<Scalar>::infinity();
        st[5] = std::numeric_limits<Scalar>::quiet_NaN();
        in = st;
        const std::vector<Scalar> shift(static_cast<std::size_t>(nqp), Scalar(0));
        std::vector<Scalar> sum(static_cast<std::size_t>(nqp));
        mha::detail::exp_shifted_per_query(st.data(), nqp, nqp, nk, shift.data(), sum.data());
        Index zeros = 0;
        for (std::size_t i = 0; i < st.size(); ++i) {
            const Scalar e = st[i], d = in[i];
            CAPTURE(i, d, e);
            REQUIRE(std::fpclassify(e) != FP_SUBNORMAL);
            if (std::isnan(d)) {
                CHECK(std::isnan(e));
            } else if (e == 0) {
                // Only where exp() is below twice the smallest normal number.
                CHECK(std::exp(static_cast<long double>(d)) <
                      3 * static_cast<long double>(std::numeric_limits<Scalar>::min()));
                ++zeros;
            } else {
                const Scalar exact = std::exp(d);
                CHECK(std::fabs(e - exact) <= 4 * std::numeric_limits<Scalar>::epsilon() * exact);
            }
        }
        // The sweep crosses the range where exp() is subnormal, so the check above can fail.
        Index subnormal_range = 0;
        for (const Scalar d : in) {
            const long double exact = std::exp(static_cast<long double>(d));
            subnormal_range += exact > 0 && exact < std::numeric_limits<Scalar>::min() ? 1 : 0;
        }
        CHECK(subnormal_range > 50);
        CHECK(zeros >= subnormal_range);
        for (Index c = 0; c < nqp; ++c) {  // the sums are of what was written, in key order
            Scalar total = 0;
            for (Index j = 0; j < nk; ++j)
                total += st[static_cast<std::size_t>(j * nqp + c)];
            if (c == 5 % nqp)  // the column of st[5]
                CHECK(std::isnan(sum[static_cast<std::size_t>(c)]));
            else
                CHECK(sum[static_cast<std::size_t>(c)] == total);
        }
    };
    check(0.0f);
    check(0.0);
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
TEST_CASE("tiled kernel: the AVX2 exp pass's exp is within 3 ulp of exp where it is normal",
          "[tiled]") {
    // exp_above_flush_avx2, the AVX-512 exp_above_flush's method in 8 lanes: the table's
    // roundings (half a unit of 2^-24 each), the cubic's 9e-9 and the last multiply-add's
    // rounding. 2^20 differences over [−88, 0], every lane position, plus 0 and NaN.
    const long double worst = mha_test::worst_exp_error<8>([](const float* x, float* y) {
        _mm256_store_ps(y, mha::detail::exp_above_flush_avx2(_mm256_load_ps(x)));
    });
    INFO("worst relative error " << worst);
    CHECK(worst <= 3 * 0x1.0p-24L);
}
#endif

TEST_CASE("tiled kernel: double scores spread by 1e4 agree with the materialised kernel",
          "[tiled]") {
    // Most exp(s − max) of these scores lie in or below the subnormal range, which the tiled
    // kernel flushes to 0. Bound: the tolerance rule of tests/support/check.hpp,
    // 8·u·max|V|·(1 + max|S|), doubled because both kernels may err by it in opposite directions.
    mha_test::value_source source(1504);
    const Index d = 64, lq = 150, lk = 700;
    const mha::matrix<double> q = source.normal_matrix<double>(d, lq, 60.0);
    const mha::matrix<double> k = source.normal_matrix<double>(d, lk, 60.0);
    const mha::matrix<double> v = source.normal_matrix<double>(d, lk);
    mha::attention_options tiled, materialized;
    tiled.algorithm = mha::attention_algorithm::tiled;
    materialized.algorithm = mha::attention_algorithm::materialized;
    const mha::matrix<double> a = mha::scaled_dot_product_attention(q, k, v, mha::causal{}, tiled);
    const mha::matrix<double> b =
        mha::scaled_dot_product_attention(q, k, v, mha::causal{}, materialized);
    const double max_score = ((k.transpose() * q).cwiseAbs().maxCoeff()) / 8.0;
    CHECK(max_score > 5e3);  // the regime this test is about
    const double bound = 2 * 8 * (std::numeric_limits<double>::epsilon() / 2) *
                         v.cwiseAbs().maxCoeff() * (1 + max_score);
    CHECK((a - b).cwiseAbs().maxCoeff() <= bound);
}
