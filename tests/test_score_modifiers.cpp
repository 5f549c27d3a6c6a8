// SPDX-License-Identifier: MIT
// Score modifiers (soft-capping, ALiBi, attention sinks, a caller's score modifier with a block
// predicate) in both kernels against the long-double reference: at tile boundaries with small
// tiles, every mask kind, packed batches, grouped heads, 1 and 2 threads, fully masked queries,
// the log-sum-exp with sinks, skipped blocks that are never read, bad input, and the layer.
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <mha/attention.hpp>
#include <mha/multi_head_attention.hpp>
#include <mha/score_modifiers.hpp>

#include "check.hpp"
#include "reference.hpp"

namespace {

using mha::Index;
using mha_test::mat;
using mha_test::vec;
using settings = mha::detail::tiled_settings;
constexpr long double minus_inf_ld = -std::numeric_limits<long double>::infinity();

enum class kernel { tiled, materialized };

/// A T5-style relative position bias: the signed distance j − i put in logarithmic buckets
/// (exact up to 4, then log-spaced up to 32, shared beyond), one learned value per bucket and
/// head. The same table serves the library's modifier and the reference.
struct t5_bias {
    std::vector<double> table;  // head h, bucket k at h·16 + k
    static Index bucket(Index i, Index j) {
        const Index d = j - i;
        const Index side = d > 0 ? 8 : 0;
        const Index n = d > 0 ? d : -d;
        if (n < 4) return side + n;
        const double lg = std::log(static_cast<double>(n) / 4.0) / std::log(32.0 / 4.0) * 4.0;
        return side + std::min<Index>(7, 4 + static_cast<Index>(lg));
    }
    double operator()(Index h, Index i, Index j) const {
        return table[static_cast<std::size_t>(h * 16 + bucket(i, j))];
    }
};

/// A multi-head problem over a packed batch with its terms.
template <class Scalar>
struct problem_case {
    Index heads, kv_heads, dk, dv;
    mha::packed_batch batch;
    mat<Scalar> q, k, v;
};

template <class Scalar>
problem_case<Scalar> make_case(Index heads, Index kv_heads, Index dk, Index dv,
                               const std::vector<Index>& lq, const std::vector<Index>& lk,
                               std::uint64_t seed) {
    mha_test::value_source rnd(seed);
    problem_case<Scalar> c{heads, kv_heads, dk, dv, mha::packed_batch(lq, lk), {}, {}, {}};
    c.q = rnd.normal_matrix<Scalar>(heads * dk, c.batch.total_queries());
    c.k = rnd.normal_matrix<Scalar>(kv_heads * dk, c.batch.total_keys());
    c.v = rnd.normal_matrix<Scalar>(kv_heads * dv, c.batch.total_keys());
    return c;
}

/// Runs one kernel on the case, with the log-sum-exp; returns (out, lse).
template <class Scalar, class Mod = mha::detail::no_score_modifier>
std::pair<mat<Scalar>, mat<Scalar>> run(kernel which, const problem_case<Scalar>& c,
                                        const mha::attention_mask<Scalar>& mask,
                                        const mha::attention_options& options, const settings& cfg,
                                        const Mod& mod = Mod{}) {
    const char* where = "test";
    const auto layout =
        mha::detail::make_head_layout(where, c.heads, c.kv_heads, c.q.rows(), c.v.rows());
    mha::detail::check_score_terms(where, options, c.heads);
    mask.validate(where, c.heads, c.batch.query_lengths(), c.batch.key_lengths());
    mat<Scalar> out(c.heads * c.dv, c.q.cols());
    const Scalar scale = Scalar(1) / std::sqrt(Scalar(c.dk));
    const mha::detail::attention_problem<Scalar> problem{c.q,
                                                         c.k,
                                                         c.v,
                                                         out,
                                                         layout,
                                                         c.batch,
                                                         mask,
                                                         scale,
                                                         options.normalize,
                                                         {mha::weights_mode::none, true},
                                                         nullptr,
                                                         &options};
    mha::attention_outputs<Scalar> outputs;
    mha::detail::size_outputs(problem, outputs);
    if (which == kernel::tiled) {
        mha::detail::tiled_attention<Scalar>(problem, outputs, cfg, nullptr, mod);
    } else {
        mha::detail::materialized_workspace<Scalar> ws;
        mha::detail::materialized_attention<Scalar>(problem, outputs, ws, nullptr, mod);
    }
    return {out, outputs.log_sum_exp};
}

/// How the reference sees a mask of one sequence: may query i see key j, and its bias.
struct ref_mask {
    std::string name;
    std::function<bool(Index b, Index j, Index i)> allowed;
    std::function<long double(Index b, Index j, Index i)> bias;  // null: none
};

/// The test's modifier, in the library's form and the reference's.
struct test_modifier {
    t5_bias t5;
    Index prefix = -1;  // >= 0: prefix-LM, keys < prefix for every query, else causal
    template <class Scalar>
    Scalar operator()(Index /*b*/, Index h, Index i, Index j, Scalar s) const {
        if (prefix >= 0 && j >= prefix && j > i) return -std::numeric_limits<Scalar>::infinity();
        return t5.table.empty() ? s : s + static_cast<Scalar>(t5(h, i, j));
    }
};

/// Compares the kernel's output and log-sum-exp of every (sequence, head) with the reference.
/// Check A (tests/support/check.hpp) bounds the output: the terms enter Smax, the largest
/// magnitude of a score's terms, through the bias argument (soft-capping adds cap, ALiBi and the
/// T5 bias their magnitude, the sink |sink|), since each adds O(u) relative to its magnitude and
/// the capping's tanh has derivative at most 1. The log-sum-exp has derivative w_j <= 1 in each
/// score, so its error is at most the largest score error plus the rounding of m + log l: the
/// same C·u·(1 + Smax) with Vmax = 1, plus u·|lse|.
template <class Scalar>
void compare(const problem_case<Scalar>& c, const mat<Scalar>& out, const mat<Scalar>& lse,
             const ref_mask& rm, const mha::attention_options& options,
             const test_modifier* modifier, const std::string& what) {
    // The scale the kernel used, rounded to Scalar, so that the reference sees the same one.
    const Scalar scale_s = Scalar(1) / std::sqrt(Scalar(c.dk));
    const long double scale_used = static_cast<long double>(scale_s);
    const Index group = c.heads / c.kv_heads;
    for (Index b = 0; b < c.batch.size(); ++b) {
        const Index q0 = c.batch.query_offset(b), k0 = c.batch.key_offset(b);
        const Index lq = c.batch.query_length(b), lk = c.batch.key_length(b);
        for (Index h = 0; h < c.heads; ++h) {
            const Index g = h / group;
            const mat<long double> q =
                c.q.block(h * c.dk, q0, c.dk, lq).template cast<long double>();
            const mat<long double> k =
                c.k.block(g * c.dk, k0, c.dk, lk).template cast<long double>();
            const mat<long double> v =
                c.v.block(g * c.dv, k0, c.dv, lk).template cast<long double>();
            mha_test::score_terms terms = mha_test::score_terms_of(options, h);
            if (modifier != nullptr)
                terms.modifier = [=](Index i, Index j, long double s) {
                    return (*modifier)(b, h, i, j, s);
                };
            auto allowed = [&](Index j, Index i) { return rm.allowed(b, j, i); };
            mha_test::bias_fn bias = nullptr;
            if (rm.bias) bias = [&](Index j, Index i) { return rm.bias(b, j, i); };
            vec<long double> ref_lse;
            const mat<long double> ref = mha_test::reference_attention_terms<long double>(
                q, k, v, scale_used, terms, allowed, bias, mha_test::norm_kind::softmax, nullptr,
                &ref_lse);
            auto magnitude = [&](Index j, Index i) -> long double {
                long double m = bias ? bias(j, i) : 0.0L;
                if (m == minus_inf_ld) return minus_inf_ld;
                if (terms.modifier && terms.modifier(i, j, 0.0L) == minus_inf_ld)
                    return minus_inf_ld;
                m = std::fabs(m) + mha_test::term_magnitude(terms, j, i, lk - lq);
                if (terms.modifier) m += std::fabs(terms.modifier(i, j, 0.0L));
                return m;
            };
            const std::string at =
                what + ", sequence " + std::to_string(b) + ", head " + std::to_string(h);
            const mat<Scalar> o = out.block(h * c.dv, q0, c.dv, lq);
            mha_test::require_attention_close<Scalar>(o, ref, q, k, v, scale_used, allowed,
                                                      magnitude, at);
            // Log-sum-exp: the bound above with Vmax = 1 (see the comment of this function).
            const long double u = mha_test::unit_roundoff<Scalar>();
            for (Index i = 0; i < lq; ++i) {
                const long double got = static_cast<long double>(lse(h, q0 + i));
                const long double want = ref_lse(i);
                INFO(at << ", query " << i << ": lse " << got << ", reference " << want);
                if (want == minus_inf_ld ||
                    (terms.sink && ref.col(i).isZero(0) &&
                     want == static_cast<long double>(static_cast<Scalar>(terms.sink_logit)))) {
                    // Nothing to attend to: exactly −∞, or exactly the sink logit.
                    REQUIRE(got == (terms.sink ? static_cast<long double>(
                                                     static_cast<Scalar>(terms.sink_logit))
                                               : minus_inf_ld));
                    continue;
                }
                long double smax = 0;
                for (Index j = 0; j < lk; ++j) {
                    if (!allowed(j, i)) continue;
                    const long double mg = magnitude(j, i);
                    if (mg == minus_inf_ld) continue;
                    long double dot = 0;
                    for (Index d = 0; d < c.dk; ++d)
                        dot += std::fabs(q(d, i) * k(d, j));
                    smax = std::max(smax, scale_used * dot + mg);
                }
                REQUIRE(std::fabs(got - want) <= 8 * u * (1 + smax) + u * std::fabs(want));
            }
        }
    }
}

/// Every mask kind on one sequence (Lq × Lk), as the library's mask and the reference's.
template <class Scalar>
std::vector<std::pair<mha::attention_mask<Scalar>, ref_mask>> single_sequence_masks(
    Index lq, Index lk, std::uint64_t seed) {
    mha_test::value_source rnd(seed);
    std::vector<std::pair<mha::attention_mask<Scalar>, ref_mask>> masks;
    auto all = [](Index, Index, Index) { return true; };
    masks.push_back({{}, {"none", all, nullptr}});
    masks.push_back({mha::causal{},
                     {"causal bottom-right",
                      [=](Index, Index j, Index i) { return j <= i + (lk - lq); }, nullptr}});
    masks.push_back({mha::causal{mha::causal_alignment::top_left},
                     {"causal top-left", [](Index, Index j, Index i) { return j <= i; }, nullptr}});
    masks.push_back({mha::sliding_window{5, 2},
                     {"window 5,2",
                      [=](Index, Index j, Index i) {
                          const Index d = i + lk - lq;
                          return j >= d - 5 && j <= d + 2;
                      },
                      nullptr}});
    const Index len = lk * 2 / 3;
    masks.push_back({mha::key_lengths{{len}},
                     {"key_lengths", [=](Index, Index j, Index) { return j < len; }, nullptr}});
    // keep_mask with query 0 and every 5th query fully masked; additive bias with every 4th
    // query fully −∞.
    mha::bool_matrix keep(lk, lq);
    mha::matrix<Scalar> bias(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) {
            keep(j, i) = i % 5 != 0 && rnd.uniform(0, 1) < 0.7;
            bias(j, i) = (i % 4 == 3 || rnd.uniform(0, 1) < 0.2)
                             ? -std::numeric_limits<Scalar>::infinity()
                             : static_cast<Scalar>(rnd.normal(2.0));
        }
    masks.push_back(
        {mha::keep_mask(keep),
         {"keep_mask", [keep](Index, Index j, Index i) { return keep(j, i); }, nullptr}});
    masks.push_back(
        {mha::additive_bias<Scalar>(bias), {"additive_bias", all, [bias](Index, Index j, Index i) {
                                                return static_cast<long double>(bias(j, i));
                                            }}});
    return masks;
}

/// The option sets under test for `heads` query heads.
std::vector<std::pair<std::string, mha::attention_options>> term_sets(Index heads) {
    std::vector<std::pair<std::string, mha::attention_options>> sets;
    mha::attention_options softcap;
    softcap.softcap = 1.5;  // small enough that scores of N(0,1) inputs reach the curved part
    sets.emplace_back("softcap", softcap);
    mha::attention_options alibi;
    alibi.alibi_slopes = mha::alibi_slopes(heads);
    sets.emplace_back("alibi", alibi);
    mha::attention_options sinks;
    for (Index h = 0; h < heads; ++h)
        sinks.sinks.push_back(0.5 * static_cast<double>(h) - 0.7);
    sets.emplace_back("sinks", sinks);
    mha::attention_options all = alibi;
    all.softcap = 2.0;
    all.sinks = sinks.sinks;
    sets.emplace_back("softcap + alibi + sinks", all);
    return sets;
}

test_modifier make_t5(Index heads, std::uint64_t seed) {
    mha_test::value_source rnd(seed);
    test_modifier m;
    for (Index n = 0; n < heads * 16; ++n)
        m.t5.table.push_back(rnd.normal(1.0));
    return m;
}

const settings small_tiles{8, 16, 32, 0};

/// Both kernels, tiled with 1 and 2 threads (identical bits), against the reference.
template <class Scalar, class Mod = mha::detail::no_score_modifier>
void check_all(const problem_case<Scalar>& c, const mha::attention_mask<Scalar>& mask,
               const ref_mask& rm, const mha::attention_options& options, const settings& cfg,
               const std::string& what, const test_modifier* tm = nullptr, const Mod& mod = Mod{}) {
    settings one = cfg, two = cfg;
    one.threads = 1;
    two.threads = 2;
    const auto t1 = run<Scalar>(kernel::tiled, c, mask, options, one, mod);
    const auto t2 = run<Scalar>(kernel::tiled, c, mask, options, two, mod);
    {
        INFO(what);
        REQUIRE(t1.first == t2.first);  // tasks never share outputs: the same bits
        REQUIRE(t1.second == t2.second);
    }
    compare<Scalar>(c, t1.first, t1.second, rm, options, tm, what + " (tiled)");
    const auto m = run<Scalar>(kernel::materialized, c, mask, options, cfg, mod);
    compare<Scalar>(c, m.first, m.second, rm, options, tm, what + " (materialized)");
}

}  // namespace

TEST_CASE("score terms: every mask kind at tile boundaries, grouped heads, both kernels",
          "[score_modifiers]") {
    // Bq = 8, Bk = 16: lengths tile−1, tile, tile+1 and 2·tile+1 reach every boundary.
    std::uint64_t seed = 1000;
    for (Index lq : {1, 7, 9, 17})
        for (Index lk : {1, 15, 16, 33}) {
            const auto c = make_case<float>(4, 2, 5, 3, {lq}, {lk}, ++seed);
            const test_modifier t5 = make_t5(4, seed);
            const auto mod = mha::make_score_modifier(t5);
            for (const auto& [mask, rm] : single_sequence_masks<float>(lq, lk, seed)) {
                const std::string shape =
                    rm.name + ", lq " + std::to_string(lq) + ", lk " + std::to_string(lk);
                for (const auto& [name, options] : term_sets(4))
                    check_all<float>(c, mask, rm, options, small_tiles, name + ", " + shape);
                check_all<float>(c, mask, rm, mha::attention_options{}, small_tiles,
                                 "T5 modifier, " + shape, &t5, mod);
                mha::attention_options all = term_sets(4).back().second;
                check_all<float>(c, mask, rm, all, small_tiles, "everything, " + shape, &t5, mod);
            }
        }
}

TEST_CASE("score terms: packed batches, double, split-KV decode shapes", "[score_modifiers]") {
    std::uint64_t seed = 2000;
    // Three sequences, one of them a decode-like step over a long cache (split-KV with
    // small tiles: lk >= 2·split_chunk), one empty of queries.
    const std::vector<Index> lq{9, 1, 0, 17}, lk{17, 70, 5, 17};
    const auto c = make_case<double>(3, 3, 4, 6, lq, lk, ++seed);
    const test_modifier t5 = make_t5(3, seed);
    const ref_mask causal{
        "causal",
        [&](Index b, Index j, Index i) {
            return j <= i + (lk[static_cast<std::size_t>(b)] - lq[static_cast<std::size_t>(b)]);
        },
        nullptr};
    for (const auto& [name, options] : term_sets(3)) {
        check_all<double>(c, mha::causal{}, causal, options, small_tiles, name + ", packed");
        check_all<double>(c, mha::causal{}, causal, options, small_tiles, name + " + T5, packed",
                          &t5, mha::make_score_modifier(t5));
    }
    // A decode step with grouped heads (one query, 4 query heads on 1 key/value head): the
    // kernel must not stack the heads, which see different slopes and sinks.
    const auto d = make_case<float>(4, 1, 8, 8, {1}, {70}, ++seed);
    const ref_mask all{"none", [](Index, Index, Index) { return true; }, nullptr};
    for (const auto& [name, options] : term_sets(4))
        check_all<float>(d, {}, all, options, small_tiles, name + ", grouped decode");
}

TEST_CASE("score terms: real tile sizes", "[score_modifiers]") {
    const auto c = make_case<float>(2, 1, 16, 16, {130}, {520}, 3001);
    const ref_mask causal{"causal", [](Index, Index j, Index i) { return j <= i + (520 - 130); },
                          nullptr};
    for (const auto& [name, options] : term_sets(2))
        check_all<float>(c, mha::causal{}, causal, options, settings{}, name + ", real tiles");
}

TEST_CASE("sinks: a fully masked query gives exactly 0 and the sink as log-sum-exp",
          "[score_modifiers]") {
    const auto c = make_case<float>(2, 2, 4, 4, {6}, {10}, 4001);
    mha::bool_matrix keep = mha::bool_matrix::Constant(10, 6, true);
    keep.col(2).setConstant(false);
    mha::attention_options options;
    options.sinks = {0.25, -3.0};
    for (kernel which : {kernel::tiled, kernel::materialized}) {
        const auto [out, lse] = run<float>(which, c, mha::keep_mask(keep), options, small_tiles);
        REQUIRE((out.col(2).array() == 0.0f).all());
        REQUIRE(lse(0, 2) == 0.25f);
        REQUIRE(lse(1, 2) == -3.0f);
        // Other queries: the sink takes weight, so the keys' weights sum to less than 1.
        REQUIRE(lse(0, 0) > 0.25f);
    }
}

TEST_CASE("score terms: columns repaired around a poisoned excluded key keep every term",
          "[score_modifiers]") {
    // NaN in an excluded key's K and V makes the tiled kernel's value product non-finite (0·NaN),
    // and such output columns are recomputed one score at a time (repair_column through
    // modified_score): a second code path for soft-capping and ALiBi. Lq ≠ Lk so that ALiBi's
    // bottom-right offset matters, allowed keys on both sides of every query so that its sign
    // does. Tolerance: compare's check A, as for the clean inputs.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const Index lq = 6, lk = 11, poisoned = 4;
    auto c = make_case<float>(2, 1, 4, 4, {lq}, {lk}, 7001);
    c.k.col(poisoned).setConstant(nan);
    c.v.col(poisoned).setConstant(nan);
    mha::bool_matrix keep = mha::bool_matrix::Constant(lk, lq, true);
    keep.row(poisoned).setConstant(false);
    const ref_mask rm{"every key but 4", [](Index, Index j, Index) { return j != poisoned; },
                      nullptr};
    for (const auto& [name, options] : term_sets(2))
        for (kernel which : {kernel::tiled, kernel::materialized}) {
            const auto result = run<float>(which, c, mha::keep_mask(keep), options, small_tiles);
            REQUIRE(result.first.allFinite());
            compare<float>(c, result.first, result.second, rm, options, nullptr,
                           name + (which == kernel::tiled ? " (tiled)" : " (materialized)") +
                               ", poisoned excluded key");
        }
}

TEST_CASE("block predicate: skipped blocks are never read", "[score_modifiers]") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const Index lq = 40, lk = 64, prefix = 12;
    auto c = make_case<float>(2, 2, 4, 4, {lq}, {lk}, 5001);
    // Prefix-LM: every query sees the prefix keys [0, 12) and causally the rest (top-left).
    test_modifier plm;
    plm.prefix = prefix;
    // With Bq = 8, Bk = 16, the key block [48, 64) matters to no query < 48: all of them. Keys
    // there are poisoned in K and V; the predicate skips their block for every query block.
    for (Index j = 48; j < lk; ++j) {
        c.k.col(j).setConstant(nan);
        c.v.col(j).setConstant(nan);
    }
    Index skipped = 0;
    auto visit = [&](Index, Index, Index i0, Index i1, Index j0, Index) {
        const bool any = j0 < prefix || j0 <= i1 - 1;
        (void)i0;
#pragma omp atomic
        skipped += any ? 0 : 1;
        return any;
    };
    const auto mod = mha::make_score_modifier(plm, visit);
    const ref_mask all{"none", [](Index, Index, Index) { return true; }, nullptr};
    mha::attention_options options;
    options.sinks = {0.1, 0.2};
    const auto tiled = run<float>(kernel::tiled, c, {}, options, small_tiles, mod);
    REQUIRE(skipped > 0);
    REQUIRE(tiled.first.allFinite());
    compare<float>(c, tiled.first, tiled.second, all, options, &plm, "prefix-LM (tiled)");
    // The materialised kernel ignores the predicate; the modifier's −∞ excludes the poisoned
    // keys by selection there.
    const auto mat_run = run<float>(kernel::materialized, c, {}, options, small_tiles, mod);
    REQUIRE(mat_run.first.allFinite());
    compare<float>(c, mat_run.first, mat_run.second, all, options, &plm,
                   "prefix-LM (materialized)");

    // A predicate that skips a block the scores do not exclude shows that the block is really
    // left out: the result is the reference over the other keys, and its NaN never appears.
    auto c2 = make_case<float>(1, 1, 4, 4, {8}, {48}, 5002);
    for (Index j = 16; j < 32; ++j)
        c2.k.col(j).setConstant(nan);
    const auto skip_middle = mha::make_score_modifier(
        [](Index, Index, Index, Index, float s) { return s; },
        [](Index, Index, Index, Index, Index j0, Index) { return j0 != 16; });
    const auto out = run<float>(kernel::tiled, c2, {}, {}, small_tiles, skip_middle).first;
    REQUIRE(out.allFinite());
    const ref_mask outside{"keys outside [16, 32)",
                           [](Index, Index j, Index) { return j < 16 || j >= 32; }, nullptr};
    const auto lse = run<float>(kernel::tiled, c2, {}, {}, small_tiles, skip_middle).second;
    compare<float>(c2, out, lse, outside, {}, nullptr, "skipped middle block");
}

TEST_CASE("alibi_slopes: the standard construction", "[score_modifiers]") {
    // A power of two: the geometric sequence 2^(−8/n), 2^(−16/n), ...
    const auto s8 = mha::alibi_slopes(8);
    REQUIRE(s8.size() == 8);
    for (std::size_t h = 0; h < 8; ++h)
        REQUIRE(s8[h] == std::ldexp(1.0, -static_cast<int>(h + 1)));
    // 12 heads: the 8-head slopes, then every other slope of 16 heads (2^−0.5, 2^−1.5, ...).
    const auto s12 = mha::alibi_slopes(12);
    REQUIRE(s12.size() == 12);
    for (std::size_t h = 0; h < 8; ++h)
        REQUIRE(s12[h] == s8[h]);
    const auto s16 = mha::alibi_slopes(16);
    for (std::size_t k = 0; k < 4; ++k)
        REQUIRE(s12[8 + k] == s16[2 * k]);
    REQUIRE(mha::alibi_slopes(1) == std::vector<double>{std::ldexp(1.0, -8)});
    REQUIRE(mha::alibi_slopes(0).empty());
}

TEST_CASE("score terms: bad input throws naming the argument", "[score_modifiers]") {
    const mat<float> q = mat<float>::Ones(8, 3), k = mat<float>::Ones(8, 4),
                     v = mat<float>::Ones(8, 4);
    mat<float> out(8, 3);
    const auto batch = mha::packed_batch::single(3, 4);
    auto call = [&](const mha::attention_options& o) {
        mha::multi_head_attention_core(q, k, v, 2, batch, out, {}, o);
    };
    auto expect = [&](const mha::attention_options& o, const std::string& argument, bool shape) {
        try {
            call(o);
            FAIL("no exception for " << argument);
        } catch (const mha::shape_error& e) {
            REQUIRE(shape);
            REQUIRE(std::string(e.what()).find(argument) != std::string::npos);
        } catch (const mha::value_error& e) {
            REQUIRE(!shape);
            REQUIRE(std::string(e.what()).find(argument) != std::string::npos);
        }
    };
    for (double cap : {-1.0, 0.0, std::numeric_limits<double>::infinity(),
                       std::numeric_limits<double>::quiet_NaN()}) {
        mha::attention_options o;
        o.softcap = cap;
        expect(o, "options.softcap", false);
    }
    mha::attention_options sinks;
    sinks.sinks = {1.0};
    expect(sinks, "options.sinks", true);
    sinks.sinks = {1.0, std::numeric_limits<double>::quiet_NaN()};
    expect(sinks, "options.sinks[1]", false);
    sinks.sinks = {1.0, 2.0};
    sinks.normalize = mha::normalization::relu;
    expect(sinks, "options.sinks", false);
    mha::attention_options alibi;
    alibi.alibi_slopes = {0.5, 0.25, 0.125};
    expect(alibi, "options.alibi_slopes", true);
    mha::attention_config config{16, 2};
    config.attention.alibi_slopes = {0.5};
    REQUIRE_THROWS_AS(config.resolved(), mha::shape_error);
}

TEST_CASE("score terms: relu and sigmoid take soft-capping and ALiBi", "[score_modifiers]") {
    // Both go to the materialised kernel; compared with the reference's normalisation.
    const auto c = make_case<double>(2, 2, 4, 4, {7}, {9}, 6001);
    for (auto norm : {mha::normalization::relu, mha::normalization::sigmoid}) {
        mha::attention_options o;
        o.normalize = norm;
        o.softcap = 1.0;
        o.alibi_slopes = mha::alibi_slopes(2);
        mat<double> out(8, 7);
        mha::multi_head_attention_core(c.q, c.k, c.v, 2, c.batch, out, {}, o);
        for (Index h = 0; h < 2; ++h) {
            mha_test::score_terms t;
            t.softcap = 1.0;
            t.alibi = true;
            t.slope = o.alibi_slopes[static_cast<std::size_t>(h)];
            const mat<long double> q = c.q.middleRows(h * 4, 4).cast<long double>();
            const mat<long double> k = c.k.middleRows(h * 4, 4).cast<long double>();
            const mat<long double> v = c.v.middleRows(h * 4, 4).cast<long double>();
            const mat<long double> ref = mha_test::reference_attention_terms<long double>(
                q, k, v, 0.5L, t, mha_test::allow_all(), nullptr,
                norm == mha::normalization::relu ? mha_test::norm_kind::relu
                                                 : mha_test::norm_kind::sigmoid);
            // Check B against the same loops in double (tests/support/check.hpp): no a-priori
            // bound is written for these normalisations.
            const mat<double> base = mha_test::reference_attention_terms<double>(
                c.q.middleRows(h * 4, 4), c.k.middleRows(h * 4, 4), c.v.middleRows(h * 4, 4), 0.5,
                t, mha_test::allow_all(), nullptr,
                norm == mha::normalization::relu ? mha_test::norm_kind::relu
                                                 : mha_test::norm_kind::sigmoid);
            mha_test::require_within_baseline<double>(out.middleRows(h * 4, 4), ref, base, 2,
                                                      mha::to_string(norm));
        }
    }
}

namespace {

/// The layer's output on tokens x (E × L), causal, computed with the reference: projections by
/// plain loops, per query head reference_attention_terms with that head's slope and sink, heads
/// concatenated, output projection. In T = long double it is R, in T = Scalar R_lp (check B).
template <class T, class Scalar>
mat<T> layer_reference(
    const mha::attention_config& c, const mha::attention_parameters<Scalar>& p,
    const mat<Scalar>& x_s, T scale,
    const mha_test::allowed_fn& allowed = mha_test::causal_top_left(),
    const std::function<long double(Index h, Index i, Index j, long double s)>& modifier = {}) {
    const mat<T> x = x_s.template cast<T>();
    const mat<T> q =
        mha_test::reference_linear<T>(p.w_q.template cast<T>(), p.b_q.template cast<T>(), x);
    const mat<T> k =
        mha_test::reference_linear<T>(p.w_k.template cast<T>(), p.b_k.template cast<T>(), x);
    const mat<T> v =
        mha_test::reference_linear<T>(p.w_v.template cast<T>(), p.b_v.template cast<T>(), x);
    const Index group = c.num_heads / c.num_kv_heads, dk = c.head_dim, dv = c.value_head_dim;
    mat<T> concat(c.num_heads * dv, x.cols());
    for (Index h = 0; h < c.num_heads; ++h) {
        mha_test::score_terms t;
        if (c.attention.softcap) t.softcap = *c.attention.softcap;
        t.alibi = true;
        t.slope = c.attention.alibi_slopes[static_cast<std::size_t>(h)];
        t.sink = true;
        t.sink_logit = c.attention.sinks[static_cast<std::size_t>(h)];
        if (modifier)
            t.modifier = [&modifier, h](Index i, Index j, long double s) {
                return modifier(h, i, j, s);
            };
        const Index g = h / group;
        concat.middleRows(h * dv, dv) = mha_test::reference_attention_terms<T>(
            q.middleRows(h * dk, dk), k.middleRows(g * dk, dk), v.middleRows(g * dv, dv), scale, t,
            allowed);
    }
    return mha_test::reference_linear<T>(p.w_o.template cast<T>(), p.b_o.template cast<T>(),
                                         concat);
}

/// The layer of the layer tests below: E = 16, 4 query heads of d_k 4 and d_v 3 sharing 2
/// key/value heads, soft-capping 2, the standard ALiBi slopes and a sink per head.
mha::attention_config terms_config() {
    mha::attention_config c;
    c.embed_dim = 16;
    c.num_heads = 4;
    c.head_dim = 4;
    c.value_head_dim = 3;
    c.num_kv_heads = 2;
    c.attention.softcap = 2.0;
    c.attention.alibi_slopes = mha::alibi_slopes(4);
    c.attention.sinks = {0.5, -0.5, 1.0, 0.0};
    return c;
}

/// Its parameters: the layer's own from `seed` (biases), weights U(−0.6, 0.6) from `values`.
template <class Scalar>
mha::attention_parameters<Scalar> terms_parameters(const mha::attention_config& c,
                                                   std::uint64_t seed,
                                                   mha_test::value_source& values) {
    auto params = mha::multi_head_attention<Scalar>(c, seed).parameters();
    for (auto* w : {&params.w_q, &params.w_k, &params.w_v, &params.w_o})
        *w = values.uniform_matrix<Scalar>(w->rows(), w->cols(), -0.6, 0.6);
    return params;
}

}  // namespace

TEST_CASE("score terms in the layer: forward and decoding steps against the reference",
          "[score_modifiers][layer]") {
    using Scalar = float;
    const mha::attention_config c = terms_config();
    mha_test::value_source values(7001);
    const auto params = terms_parameters<Scalar>(c, 7, values);
    const mha::multi_head_attention<Scalar> layer(c, params);
    const Index length = 40;
    const mat<Scalar> x = values.normal_matrix<Scalar>(16, length);
    const Scalar scale = Scalar(1) / std::sqrt(Scalar(4));
    const mat<long double> ref =
        layer_reference<long double>(c.resolved(), params, x, static_cast<long double>(scale));
    const mat<Scalar> base = layer_reference<Scalar>(c.resolved(), params, x, scale);
    // Check B with k = 4: the layer tests' rule for the chain of four products and a softmax
    // (layer_baseline_k in test_multi_head_attention.cpp, decode_k in test_kv_cache.cpp).
    const mat<Scalar> forwarded = layer.forward(x, mha::causal{});
    mha_test::require_within_baseline<Scalar>(forwarded, ref, base, 4, "forward");
    // Decoding token by token through the KV cache (split-KV is not reached at this length; the
    // kernel tests above cover it): each step's queries are the cache's last positions.
    mha::kv_cache<Scalar> cache = layer.make_cache();
    mat<Scalar> decoded(16, length);
    decoded.leftCols(5) = layer.decode(x.leftCols(5), cache);
    for (Index t = 5; t < length; ++t)
        decoded.col(t) = layer.decode(x.col(t), cache);
    mha_test::require_within_baseline<Scalar>(decoded, ref, base, 4, "decode");
}

TEST_CASE("score modifier in the layer: forward, forward_into and weights on a packed batch",
          "[score_modifiers][layer]") {
    // The caller's modifier through the layer, on top of soft-capping, ALiBi and sinks: sequence
    // 0 is a prefix-LM (its first 6 tokens see each other, the rest is causal), both sequences
    // get a T5-style bucketed bias per head. The reference applies the same modifier to its own
    // long-double scores, sequence by sequence.
    using Scalar = float;
    const mha::attention_config c = terms_config();
    mha_test::value_source values(7101);
    const auto params = terms_parameters<Scalar>(c, 11, values);
    const mha::multi_head_attention<Scalar> layer(c, params);
    const std::vector<Index> lengths{23, 17};
    const mha::packed_batch batch(lengths);
    const mat<Scalar> x = values.normal_matrix<Scalar>(16, batch.total_queries());
    const test_modifier t5 = make_t5(4, 7102);
    constexpr Index prefix = 6;
    auto score = [&t5](Index b, Index h, Index i, Index j, auto s) {
        using S = decltype(s);
        if (b == 0 && j >= prefix && j > i) return -std::numeric_limits<S>::infinity();
        return static_cast<S>(s + static_cast<S>(t5.t5(h, i, j)));
    };
    const auto modifier = mha::make_score_modifier(
        [&score](Index b, Index h, Index i, Index j, Scalar s) { return score(b, h, i, j, s); });
    const Scalar scale = Scalar(1) / std::sqrt(Scalar(4));
    mat<long double> ref(16, x.cols());
    mat<Scalar> base(16, x.cols());
    for (Index b = 0; b < 2; ++b) {
        const Index n = lengths[static_cast<std::size_t>(b)], at = batch.query_offset(b);
        auto ref_modifier = [&score, b](Index h, Index i, Index j, long double s) {
            return score(b, h, i, j, s);
        };
        const mat<Scalar> xb = x.middleCols(at, n);
        ref.middleCols(at, n) =
            layer_reference<long double>(c.resolved(), params, xb, static_cast<long double>(scale),
                                         mha_test::allow_all(), ref_modifier);
        base.middleCols(at, n) = layer_reference<Scalar>(c.resolved(), params, xb, scale,
                                                         mha_test::allow_all(), ref_modifier);
    }
    // Check B with k = 4, the layer tests' rule (as in the test above).
    const mat<Scalar> forwarded = layer.forward(x, batch, {}, modifier);
    mha_test::require_within_baseline<Scalar>(forwarded, ref, base, 4, "forward");
    // forward_into and the cross-attention form with weights compute the same thing the same way.
    mha::forward_workspace<Scalar> ws;
    mat<Scalar> into(16, x.cols());
    for (int repeat = 0; repeat < 2; ++repeat) {
        into.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
        layer.forward_into(x, batch, {}, into, ws, modifier);
        mha_test::require_within_baseline<Scalar>(into, ref, base, 4, "forward_into");
    }
    const auto with_weights =
        layer.forward_with_weights(x, x, x, batch, mha::weights_mode::per_head, {}, modifier);
    mha_test::require_within_baseline<Scalar>(with_weights.output, ref, base, 4,
                                              "forward_with_weights");
    // Sequence 0's prefix-LM: every weight on a key past both the prefix and the query is 0.
    REQUIRE(with_weights.weights.size() == 8);  // sequence b, head h at b·H + h
    for (Index h = 0; h < 4; ++h) {
        const mat<Scalar>& w = with_weights.weights[static_cast<std::size_t>(h)];
        REQUIRE(w.rows() == 23);
        for (Index i = 0; i < 23; ++i)
            for (Index j = std::max(prefix, i + 1); j < 23; ++j)
                REQUIRE(w(j, i) == Scalar(0));
    }
    // Without the modifier the layer gives a different result (the modifier is not ignored).
    const mat<Scalar> plain = layer.forward(x, batch);
    REQUIRE((plain - forwarded).cwiseAbs().maxCoeff() > Scalar(1e-2));
}

TEST_CASE("score terms: returned weights of both kernels against the reference",
          "[score_modifiers]") {
    // Weights are the output for values that are unit vectors (V = I, Vmax = 1), so check A's
    // bound applies to them column by column, as in test_tiled_attention.cpp. With a sink the
    // weights of a query sum to less than 1.
    const Index lq = 13, lk = 21, heads = 2;
    const auto c = make_case<float>(heads, 1, 4, 4, {lq}, {lk}, 8001);
    mha::attention_options options;
    options.softcap = 1.5;
    options.alibi_slopes = mha::alibi_slopes(heads);
    options.sinks = {0.3, -0.4};
    const test_modifier t5 = make_t5(heads, 8002);
    for (auto algorithm :
         {mha::attention_algorithm::tiled, mha::attention_algorithm::materialized}) {
        options.algorithm = algorithm;
        mat<float> out(heads * 4, lq);
        const auto extra = mha::multi_head_attention_core(
            c.q, c.k, c.v, heads, 1, c.batch, out, mha::causal{}, options,
            {mha::weights_mode::per_head, false}, mha::make_score_modifier(t5));
        REQUIRE(extra.weights.size() == 2);
        for (Index h = 0; h < heads; ++h) {
            mha_test::score_terms terms;
            terms.softcap = 1.5;
            terms.alibi = true;
            terms.slope = options.alibi_slopes[static_cast<std::size_t>(h)];
            terms.sink = true;
            terms.sink_logit = options.sinks[static_cast<std::size_t>(h)];
            terms.modifier = [&t5, h](Index i, Index j, long double s) {
                return t5(0, h, i, j, s);
            };
            const mat<long double> q = c.q.middleRows(h * 4, 4).cast<long double>();
            const mat<long double> k = c.k.cast<long double>();
            const mat<long double> eye = mat<long double>::Identity(lk, lk);
            const long double scale = static_cast<long double>(1.0f / std::sqrt(4.0f));
            auto causal = mha_test::causal_bottom_right(lq, lk);
            mat<long double> ref_w;
            mha_test::reference_attention_terms<long double>(
                q, k, eye, scale, terms, causal, nullptr, mha_test::norm_kind::softmax, &ref_w);
            auto magnitude = [&](Index j, Index i) {
                return mha_test::term_magnitude(terms, j, i, lk - lq) +
                       std::fabs(t5(0, h, i, j, 0.0L));
            };
            mha_test::require_attention_close<float>(
                extra.weights[static_cast<std::size_t>(h)], ref_w, q, k, eye, scale, causal,
                magnitude,
                std::string(algorithm == mha::attention_algorithm::tiled ? "tiled"
                                                                         : "materialized") +
                    " weights, head " + std::to_string(h));
        }
    }
}
