// SPDX-License-Identifier: MIT
// The attention core on bfloat16 storage (multi_head_attention_core with Eigen::bfloat16 Q, K,
// V) against the long-double reference computed from the same bf16 values, with the tolerance
// of tests/support/check.hpp (require_bf16_attention_close: bf16's unit roundoff 2^-8 for P
// rounded to bf16, fp32's γ_n for the sums of d_k and Lk terms). Both block kernels run: the
// portable one always, the native vdpbf16ps one when the translation unit is compiled for
// AVX512-BF16 and the CPU has it (SKIP otherwise). This file is built twice by
// tests/CMakeLists.txt: with the preset's flags, and with -mavx512bf16 where the compiler takes
// it (test_bf16_attention_native), so that the native kernel runs in every build on a CPU that
// has the instruction.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <mha/attention.hpp>
#include <mha/detail/bf16_conversions.hpp>

#include "bf16_kernels.hpp"
#include "check.hpp"
#include "exp_error.hpp"
#include "reference.hpp"

namespace {

using mha::Index;
using mha_test::mat;
using bf16 = Eigen::bfloat16;
using bmat = Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic>;
using settings = mha::detail::tiled_settings;
using kernel = mha::detail::bf16_kernel;

/// N(0, sigma) values rounded to bf16.
bmat normal_bf16(mha_test::value_source& rnd, Index rows, Index cols, double sigma = 1.0) {
    bmat m(rows, cols);
    for (Index c = 0; c < cols; ++c)
        for (Index r = 0; r < rows; ++r)
            m(r, c) = bf16(static_cast<float>(rnd.normal(sigma)));
    return m;
}

mat<long double> widen(const bmat& m) {
    mat<long double> r(m.rows(), m.cols());
    for (Index c = 0; c < m.cols(); ++c)
        for (Index i = 0; i < m.rows(); ++i)
            r(i, c) = static_cast<long double>(static_cast<float>(m(i, c)));
    return r;
}

/// One head through the bf16 core with kernel k and tile settings cfg.
mat<float> run(kernel k, const bmat& q, const bmat& kk, const bmat& v,
               const mha::attention_mask<float>& mask, const settings& cfg,
               const mha::attention_options& options = {}) {
    mat<float> out(v.rows(), q.cols());
    const mha::packed_batch batch = mha::packed_batch::single(q.cols(), kk.cols());
    if (k == kernel::native) {
#if defined(MHA_BF16_NATIVE)
        mha::detail::multi_head_attention_core_bf16<kernel::native>(q, kk, v, 1, 1, batch, out,
                                                                    mask, options, {}, cfg);
#endif
    } else if (k == kernel::amx) {
#if defined(MHA_BF16_NATIVE)
        mha::detail::multi_head_attention_core_bf16<kernel::amx>(q, kk, v, 1, 1, batch, out, mask,
                                                                 options, {}, cfg);
#endif
    } else {
        mha::detail::multi_head_attention_core_bf16<kernel::portable>(q, kk, v, 1, 1, batch, out,
                                                                      mask, options, {}, cfg);
    }
    return out;
}

bool same_bits(const mat<float>& a, const mat<float>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

/// A one-query decode output (heads·d_v × 1) checked per query head against the long-double
/// reference over the keys `allowed` admits, under the bound every bf16 test uses; query head h
/// reads key/value head h / (heads / kv_heads) of k (kv_heads·d_k × Lk) and v.
void check_one_query_heads(const mat<float>& out, const bmat& q, const bmat& k, const bmat& v,
                           Index heads, Index kv_heads, const mha_test::allowed_fn& allowed,
                           const std::string& what) {
    const Index dk = q.rows() / heads, dv = out.rows() / heads, lk = k.cols();
    const long double scale = 1.0L / std::sqrt(static_cast<long double>(dk));
    for (Index h = 0; h < heads; ++h) {
        const Index g = h / (heads / kv_heads);
        const mat<long double> qh = widen(q.block(h * dk, 0, dk, 1));
        const mat<long double> kh = widen(k.block(g * dk, 0, dk, lk));
        const mat<long double> vh = widen(v.block(g * dv, 0, dv, lk));
        const mat<long double> ref =
            mha_test::reference_attention<long double>(qh, kh, vh, scale, allowed);
        mha_test::require_bf16_attention_close<float>(out.block(h * dv, 0, dv, 1), ref, qh, kh, vh,
                                                      scale, allowed, nullptr,
                                                      what + "head " + std::to_string(h));
    }
}

struct mask_case {
    std::string name;
    mha::attention_mask<float> mask;
    mha_test::allowed_fn allowed;
    mha_test::bias_fn bias;
};

std::vector<mask_case> all_masks(Index lq, Index lk, std::uint64_t seed) {
    using mha::causal_alignment;
    mha_test::value_source rnd(seed);
    std::vector<mask_case> cases;
    cases.push_back({"none", {}, mha_test::allow_all(), nullptr});
    cases.push_back(
        {"causal bottom-right", mha::causal{}, mha_test::causal_bottom_right(lq, lk), nullptr});
    cases.push_back({"causal top-left", mha::causal{causal_alignment::top_left},
                     mha_test::causal_top_left(), nullptr});
    cases.push_back({"window 5,2", mha::sliding_window{5, 2},
                     [=](Index j, Index i) {
                         const Index c = i + lk - lq;
                         return j >= c - 5 && j <= c + 2;
                     },
                     nullptr});
    const Index len = lk * 2 / 3;
    cases.push_back({"key_lengths (padding)", mha::key_lengths{{len}},
                     [=](Index j, Index) { return j < len; }, nullptr});
    mha::bool_matrix keep(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
            keep(j, i) = i % 5 != 0 && rnd.uniform(0, 1) < 0.7;  // every 5th query fully masked
    cases.push_back({"keep_mask", mha::keep_mask(keep),
                     [keep](Index j, Index i) { return keep(j, i); }, nullptr});
    mha::matrix<float> bias(lk, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
            bias(j, i) = (i % 4 == 3 || rnd.uniform(0, 1) < 0.2)
                             ? -std::numeric_limits<float>::infinity()
                             : static_cast<float>(rnd.normal(2.0));
    auto bias_fn = [bias](Index j, Index i) { return static_cast<long double>(bias(j, i)); };
    cases.push_back(
        {"additive_bias", mha::additive_bias<float>(bias), mha_test::allow_all(), bias_fn});
    cases.push_back(
        {"causal + key_lengths + keep + bias",
         mha::attention_mask<float>(mha::causal{}, mha::key_lengths{{len}}, mha::keep_mask(keep),
                                    mha::additive_bias<float>(bias)),
         [=](Index j, Index i) { return j <= i + lk - lq && j < len && keep(j, i); }, bias_fn});
    return cases;
}

/// Every mask at one shape, every kernel, against the reference; 1 and 2 threads give the same
/// bits; the native and portable kernels agree within the sum of their bounds (each is within
/// its bound of the same reference).
void check_shape(Index lq, Index lk, Index dk, Index dv, const settings& cfg, std::uint64_t seed) {
    mha_test::value_source rnd(seed);
    const bmat q = normal_bf16(rnd, dk, lq), k = normal_bf16(rnd, dk, lk),
               v = normal_bf16(rnd, dv, lk);
    const mat<long double> ql = widen(q), kl = widen(k), vl = widen(v);
    const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
    for (const mask_case& mc : all_masks(lq, lk, seed + 1)) {
        const mat<long double> ref = mha_test::reference_attention<long double>(
            ql, kl, vl, static_cast<long double>(scale), mc.allowed, mc.bias);
        for (kernel kn : mha_test::bf16_kernels_here()) {
            const std::string what = std::string(mha_test::bf16_kernel_name(kn)) + ", " + mc.name +
                                     ", " + std::to_string(lq) + "x" + std::to_string(lk) +
                                     ", dk " + std::to_string(dk) + ", dv " + std::to_string(dv);
            settings one = cfg, two = cfg;
            one.threads = 1;
            two.threads = 2;
            const mat<float> a = run(kn, q, k, v, mc.mask, one);
            mha_test::require_bf16_attention_close(a, ref, ql, kl, vl, scale, mc.allowed, mc.bias,
                                                   what);
            const mat<float> b = run(kn, q, k, v, mc.mask, two);
            INFO(what);
            CHECK(same_bits(a, b));
        }
    }
}

}  // namespace

TEST_CASE("bf16 core: tile boundaries and every mask, against the long-double reference") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // Small tiles reach many boundaries: odd d_k (a zero partner in the pairs), d_v not a
    // multiple of the 16-lane packet, odd key counts, query counts below and above a packet.
    const settings small{16, 24, 1024, 0};
    check_shape(37, 53, 7, 5, small, 11);
    check_shape(33, 70, 16, 20, small, 12);
    check_shape(5, 9, 3, 17, small, 13);
    check_shape(1, 30, 8, 8, small, 14);
    const settings mid{32, 64, 1024, 0};
    check_shape(70, 131, 64, 64, mid, 15);
    // The real tile sizes, several key blocks.
    check_shape(130, 1100, 64, 64, settings{}, 16);
    // More queries than one AMX task takes (amx_query_blocks_per_task query blocks of 128: 520
    // needs two, the second of 8 queries), two key blocks of 256, d_k padded to 64 (the tile
    // kernel that keeps the queries in tile registers); then d_k past 64 (the one that does not).
    check_shape(520, 300, 40, 24, settings{}, 17);
    check_shape(45, 300, 80, 24, mid, 18);
}

TEST_CASE("bf16 core: a boundary block masked in the score tiles reads only the rows they wrote") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // A boundary block whose mask is intervals alone (causal here) is masked in the score tiles,
    // which skip the keys outside their queries' ranges; the exp pass must not read those rows.
    // A call without a workspace gets fresh buffers, whose old contents are whatever malloc
    // returns, so the bug showed only in some test orders. Here one workspace first serves an
    // unmasked call with large scores (sigma 6: |s| up to ~100), which fills the score buffer,
    // then the causal call, whose rows next to its ranges then hold those scores; compared with
    // the long-double reference under the same bound as every bf16 test.
    if (!mha_test::bf16_native_available())
        SKIP("the native kernel is not compiled in, or the CPU lacks it");
#if defined(MHA_BF16_NATIVE)
    mha_test::value_source rnd(23);
    const settings mid{32, 64, 1024, 1};
    const Index dk = 64, dv = 64;
    mha::detail::bf16_workspace workspace;
    const bmat q0 = normal_bf16(rnd, dk, 70, 6.0), k0 = normal_bf16(rnd, dk, 131, 6.0),
               v0 = normal_bf16(rnd, dv, 131);
    mat<float> out0(dv, 70);
    mha::detail::multi_head_attention_core_bf16<kernel::native>(
        q0, k0, v0, 1, 1, mha::packed_batch::single(70, 131), out0, {}, {}, {}, mid, &workspace);
    for (const auto& [lq, lk] : {std::pair<Index, Index>{70, 131}, {45, 45}, {33, 97}}) {
        const bmat q = normal_bf16(rnd, dk, lq), k = normal_bf16(rnd, dk, lk),
                   v = normal_bf16(rnd, dv, lk);
        mat<float> out(dv, lq);
        mha::detail::multi_head_attention_core_bf16<kernel::native>(
            q, k, v, 1, 1, mha::packed_batch::single(lq, lk), out, mha::causal{}, {}, {}, mid,
            &workspace);
        const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
        const auto allowed = mha_test::causal_bottom_right(lq, lk);
        const mat<long double> ql = widen(q), kl = widen(k), vl = widen(v);
        const mat<long double> ref = mha_test::reference_attention<long double>(
            ql, kl, vl, static_cast<long double>(scale), allowed);
        mha_test::require_bf16_attention_close(
            out, ref, ql, kl, vl, scale, allowed, nullptr,
            "native, causal after large scores, " + std::to_string(lq) + "x" + std::to_string(lk));
    }
#endif
}

TEST_CASE("bf16 core: a scale of either sign, or zero") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // The AMX pass folds a positive scale into its exp pass and scales the scores first
    // otherwise: both branches, with and without a partial mask, against the reference (the
    // reference takes the scale as given; the bound is the same bf16 model as above).
    mha_test::value_source rnd(19);
    const Index dk = 64, dv = 32, lq = 90, lk = 300;
    const bmat q = normal_bf16(rnd, dk, lq), k = normal_bf16(rnd, dk, lk),
               v = normal_bf16(rnd, dv, lk);
    const mat<long double> ql = widen(q), kl = widen(k), vl = widen(v);
    for (const float scale : {0.3f, -0.3f, 0.0f})
        for (const bool causal : {false, true}) {
            mha::attention_options options;
            options.scale = scale;
            const mha::attention_mask<float> mask =
                causal ? mha::attention_mask<float>(mha::causal{}) : mha::attention_mask<float>();
            const mha_test::allowed_fn allowed =
                causal ? mha_test::causal_bottom_right(lq, lk) : mha_test::allow_all();
            const mat<long double> ref = mha_test::reference_attention<long double>(
                ql, kl, vl, static_cast<long double>(scale), allowed);
            for (kernel kn : mha_test::bf16_kernels_here()) {
                const std::string what = std::string(mha_test::bf16_kernel_name(kn)) + ", scale " +
                                         std::to_string(scale) + (causal ? ", causal" : "");
                const mat<float> out = run(kn, q, k, v, mask, settings{}, options);
                mha_test::require_bf16_attention_close(out, ref, ql, kl, vl, scale, allowed,
                                                       nullptr, what);
            }
        }
}

TEST_CASE("bf16 core: the native and portable kernels agree within the bound") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    if (!mha_test::bf16_native_available())
        SKIP("the native kernel is not compiled in, or the CPU lacks it");
    mha_test::value_source rnd(21);
    const Index dk = 64, dv = 64, lq = 200, lk = 700;
    const bmat q = normal_bf16(rnd, dk, lq), k = normal_bf16(rnd, dk, lk),
               v = normal_bf16(rnd, dv, lk);
    const mat<long double> ql = widen(q), kl = widen(k), vl = widen(v);
    const float scale = 0.125f;
    const settings cfg{};
    const mat<float> n = run(kernel::native, q, k, v, mha::causal{}, cfg);
    const mat<float> p = run(kernel::portable, q, k, v, mha::causal{}, cfg);
    // Each within its bound of the reference; then their difference is within twice the bound,
    // which is what checking the native output against the portable one, as the reference
    // with the bound doubled, tests.
    const auto allowed = mha_test::causal_bottom_right(lq, lk);
    const mat<long double> ref =
        mha_test::reference_attention<long double>(ql, kl, vl, 0.125L, allowed);
    mha_test::require_bf16_attention_close(n, ref, ql, kl, vl, scale, allowed, nullptr, "native");
    mha_test::require_bf16_attention_close(p, ref, ql, kl, vl, scale, allowed, nullptr, "portable");
    const mat<long double> pl = p.cast<long double>();
    mat<float> half_diff(dv, lq);
    for (Index i = 0; i < lq; ++i)
        for (Index c = 0; c < dv; ++c)
            half_diff(c, i) =
                static_cast<float>((static_cast<long double>(n(c, i)) - pl(c, i)) / 2 + ref(c, i));
    // |n − p|/2 ≤ bound  ⇔  (n − p)/2 + ref within the bound of ref.
    mha_test::require_bf16_attention_close(half_diff, ref, ql, kl, vl, scale, allowed, nullptr,
                                           "native vs portable");
}

TEST_CASE("bf16 core: NaN propagates, poisoned masked keys never leak") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(31);
    const Index dk = 16, dv = 16, lq = 40, lk = 60;
    const settings cfg{16, 24, 1024, 0};
    bmat q = normal_bf16(rnd, dk, lq), k = normal_bf16(rnd, dk, lk), v = normal_bf16(rnd, dv, lk);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    for (kernel kn : mha_test::bf16_kernels_here()) {
        INFO(mha_test::bf16_kernel_name(kn));
        // Keys past key_lengths hold NaN and Inf in K and V: nothing changes.
        const Index len = 37;
        bmat kp = k, vp = v;
        for (Index j = len; j < lk; ++j) {
            kp.col(j).setConstant(bf16(j % 2 ? nan : inf));
            vp.col(j).setConstant(bf16(j % 3 ? -inf : nan));
        }
        const mat<float> clean = run(kn, q, k, v, mha::key_lengths{{len}}, cfg);
        const mat<float> poisoned = run(kn, q, kp, vp, mha::key_lengths{{len}}, cfg);
        CHECK(poisoned.allFinite());
        const mat<long double> ref = mha_test::reference_attention<long double>(
            widen(q), widen(k), widen(v), 0.25L, [=](Index j, Index) { return j < len; });
        mha_test::require_bf16_attention_close(
            poisoned, ref, widen(q), widen(k), widen(v), 0.25f,
            [=](Index j, Index) { return j < len; }, nullptr, "poisoned");
        // Causal: keys above the diagonal poisoned.
        bmat kc = k, vc = v;
        for (Index j = lq; j < lk; ++j) {  // top-left causal: query i sees keys <= i
            kc.col(j).setConstant(bf16(nan));
            vc.col(j).setConstant(bf16(inf));
        }
        const mat<float> causal_out =
            run(kn, q, kc, vc, mha::causal{mha::causal_alignment::top_left}, cfg);
        CHECK(causal_out.allFinite());
        // NaN in an allowed query: its column is NaN, the others are not.
        bmat qn = q;
        qn(3, 7) = bf16(nan);
        const mat<float> qnan = run(kn, qn, k, v, {}, cfg);
        CHECK(qnan.col(7).array().isNaN().all());
        CHECK(qnan.leftCols(7).allFinite());
        CHECK(qnan.rightCols(lq - 8).allFinite());
        // NaN in one allowed key, unmasked: one NaN score per query among finite ones, in a
        // block whose max the score tiles take (which skips NaN); the NaN reaches every column
        // through its own exp and the sum.
        bmat kn1 = k;
        kn1(5, 20) = bf16(nan);
        CHECK(run(kn, q, kn1, v, {}, cfg).array().isNaN().all());
        // NaN in an allowed value: every query that sees it has NaN in that row.
        bmat vn = v;
        vn(2, 11) = bf16(nan);
        const mat<float> vnan =
            run(kn, q, k, vn, mha::causal{mha::causal_alignment::top_left}, cfg);
        CHECK(vnan.row(2).rightCols(lq - 11).array().isNaN().all());
        CHECK(vnan.row(2).leftCols(11).allFinite());
    }
}

TEST_CASE("bf16 core: public entry, heads, grouped heads, batches, bf16 output, log-sum-exp") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(41);
    const Index heads = 4, kv_heads = 2, dk = 24, dv = 16;
    const mha::packed_batch batch({50, 20}, {50, 20});
    const bmat q = normal_bf16(rnd, heads * dk, 70), k = normal_bf16(rnd, kv_heads * dk, 70),
               v = normal_bf16(rnd, kv_heads * dv, 70);
    mat<float> out(heads * dv, 70);
    bmat out16(heads * dv, 70);
    mha::attention_request request;
    request.log_sum_exp = true;
    const mha::attention_outputs<float> r = mha::multi_head_attention_core(
        q, k, v, heads, kv_heads, batch, out, mha::causal{}, {}, request);
    mha::multi_head_attention_core(q, k, v, heads, kv_heads, batch, out16, mha::causal{});
    REQUIRE(r.log_sum_exp.rows() == heads);
    REQUIRE(r.log_sum_exp.cols() == 70);
    const long double scale = 1.0L / std::sqrt(static_cast<long double>(dk));
    for (Index b = 0; b < 2; ++b)
        for (Index h = 0; h < heads; ++h) {
            const Index c0 = batch.query_offset(b), n = batch.query_length(b);
            const Index g = h / (heads / kv_heads);
            const mat<long double> qh = widen(q.block(h * dk, c0, dk, n));
            const mat<long double> kh = widen(k.block(g * dk, c0, dk, n));
            const mat<long double> vh = widen(v.block(g * dv, c0, dv, n));
            const auto allowed = mha_test::causal_bottom_right(n, n);
            const mat<long double> ref =
                mha_test::reference_attention<long double>(qh, kh, vh, scale, allowed);
            const std::string what =
                "sequence " + std::to_string(b) + ", head " + std::to_string(h);
            mha_test::require_bf16_attention_close<float>(out.block(h * dv, c0, dv, n), ref, qh, kh,
                                                          vh, scale, allowed, nullptr, what);
            mha_test::require_bf16_attention_close<bf16>(out16.block(h * dv, c0, dv, n), ref, qh,
                                                         kh, vh, scale, allowed, nullptr,
                                                         what + " (bf16 out)", true);
            // Log-sum-exp: the scores err by at most γ_{dk+1}·Smax in fp32, then a log and an
            // addition in fp32; 4·u·(1 + |lse|) + γ·Smax bounds it, plus the native kernel's exp
            // error, which l carries as a relative error and log l as an absolute one.
            for (Index i = 0; i < n; ++i) {
                long double m = -std::numeric_limits<long double>::infinity(), smax = 0;
                std::vector<long double> s;
                for (Index j = 0; j <= i; ++j) {
                    long double dot = 0, mag = 0;
                    for (Index d = 0; d < dk; ++d) {
                        dot += qh(d, i) * kh(d, j);
                        mag += std::fabs(qh(d, i) * kh(d, j));
                    }
                    s.push_back(dot * scale);
                    m = std::max(m, dot * scale);
                    smax = std::max(smax, mag * scale);
                }
                long double l = 0;
                for (long double x : s)
                    l += std::exp(x - m);
                const long double lse = m + std::log(l);
                const long double u = 0x1.0p-24L;
                const long double bound = (dk + 1) * u * smax * 2 + 4 * u * (1 + std::fabs(lse)) +
                                          2 * s.size() * u + mha_test::bf16_exp_error;
                const long double got = r.log_sum_exp(h, c0 + i);
                INFO(what << ", query " << i << ": lse " << got << " vs " << lse);
                CHECK(std::fabs(got - lse) <= bound);
            }
        }
}

TEST_CASE(
    "bf16 core: a workspace kept across calls of other shapes gives the results of calls "
    "without one") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // The reference is the same public call without a workspace (checked against the long-double
    // reference above): the same kernel on the same values, so the outputs must agree bit for
    // bit. What could differ is a buffer left by an earlier call of another shape: the calls run
    // large, small, grouped and large again, so every buffer is reused both grown and shrunk.
    // The long sequence (300 queries, three query blocks) has its K and V packed once per call.
    mha_test::value_source rnd(43);
    struct call {
        Index heads, kv_heads, dk, dv;
        std::vector<Index> lengths;
        mha::attention_mask<float> mask;
    };
    const call first{4, 4, 32, 32, {300, 40}, mha::causal{}};
    const call calls[] = {
        first,
        {2, 2, 16, 8, {50}, {}},
        {6, 2, 24, 16, {1, 130, 1}, mha::attention_mask<float>(mha::key_lengths{{1, 100, 0}})},
        first,
    };
    mha::bf16_core_workspace workspace;
    mha::attention_request request;
    request.log_sum_exp = true;
    for (std::size_t i = 0; i < std::size(calls); ++i) {
        const call& c = calls[i];
        const mha::packed_batch batch(c.lengths);
        const Index n = batch.total_queries();
        const bmat q = normal_bf16(rnd, c.heads * c.dk, n);
        const bmat k = normal_bf16(rnd, c.kv_heads * c.dk, n);
        const bmat v = normal_bf16(rnd, c.kv_heads * c.dv, n);
        mat<float> expected(c.heads * c.dv, n), out(c.heads * c.dv, n);
        const mha::attention_outputs<float> without = mha::multi_head_attention_core(
            q, k, v, c.heads, c.kv_heads, batch, expected, c.mask, {}, request);
        out.setConstant(std::numeric_limits<float>::quiet_NaN());
        const mha::attention_outputs<float> with = mha::multi_head_attention_core(
            q, k, v, c.heads, c.kv_heads, batch, out, c.mask, {}, request, workspace);
        INFO("call " << i);
        CHECK(same_bits(out, expected));
        CHECK(same_bits(with.log_sum_exp, without.log_sum_exp));
    }
}

TEST_CASE("bf16 core: one-query sequences with grouped heads (the stacked decode problem)") {
    // A sequence of one query with grouped heads runs the query heads of each key/value head as
    // the queries of one problem. Checked against the long-double reference per head, and its
    // output and log-sum-exp against the same call with per-head masks (which cannot be stacked:
    // one problem per query head) bit for bit, since each query's column is computed alike.
    // Keys beyond each sequence's key length hold NaN: excluded keys never reach the output.
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(53);
    const Index heads = 8, kv_heads = 2, dk = 16, dv = 12;
    const std::vector<Index> lq{1, 3, 1}, lk{70, 20, 150}, kept{60, 20, 150};
    const mha::packed_batch batch(lq, lk);
    const Index nq = batch.total_queries(), nk = batch.total_keys();
    const bmat q = normal_bf16(rnd, heads * dk, nq);
    bmat k = normal_bf16(rnd, kv_heads * dk, nk), v = normal_bf16(rnd, kv_heads * dv, nk);
    const bf16 nan(std::numeric_limits<float>::quiet_NaN());
    k.middleCols(kept[0], lk[0] - kept[0]).setConstant(nan);
    v.middleCols(kept[0], lk[0] - kept[0]).setConstant(nan);
    mha::attention_request request;
    request.log_sum_exp = true;
    const mha::attention_mask<float> shared(mha::causal{}, mha::key_lengths{kept});
    mat<float> out(heads * dv, nq), out_per_head(heads * dv, nq);
    const mha::attention_outputs<float> r =
        mha::multi_head_attention_core(q, k, v, heads, kv_heads, batch, out, shared, {}, request);
    std::vector<mha::bool_matrix> keep;
    for (Index b = 0; b < batch.size(); ++b)
        for (Index h = 0; h < heads; ++h)
            keep.push_back(
                mha::bool_matrix::Constant(batch.key_length(b), batch.query_length(b), true));
    mha::attention_mask<float> per_head(mha::causal{}, mha::key_lengths{kept});
    per_head.add(mha::keep_mask(keep));
    const mha::attention_outputs<float> r_per_head = mha::multi_head_attention_core(
        q, k, v, heads, kv_heads, batch, out_per_head, per_head, {}, request);
    CHECK(out.cwiseEqual(out_per_head).all());
    CHECK(r.log_sum_exp.cwiseEqual(r_per_head.log_sum_exp).all());
    const long double scale = 1.0L / std::sqrt(static_cast<long double>(dk));
    for (Index b = 0; b < batch.size(); ++b)
        for (Index h = 0; h < heads; ++h) {
            const Index c0 = batch.query_offset(b), n = batch.query_length(b);
            const Index k0 = batch.key_offset(b), m = kept[static_cast<std::size_t>(b)];
            const Index g = h / (heads / kv_heads);
            const mat<long double> qh = widen(q.block(h * dk, c0, dk, n));
            const mat<long double> kh = widen(k.block(g * dk, k0, dk, m));
            const mat<long double> vh = widen(v.block(g * dv, k0, dv, m));
            const auto allowed = mha_test::causal_bottom_right(n, batch.key_length(b));
            const mat<long double> ref =
                mha_test::reference_attention<long double>(qh, kh, vh, scale, allowed);
            mha_test::require_bf16_attention_close<float>(
                out.block(h * dv, c0, dv, n), ref, qh, kh, vh, scale, allowed, nullptr,
                "sequence " + std::to_string(b) + ", head " + std::to_string(h));
        }
}

TEST_CASE("bf16 core: a decode step reads K and V in place: masked keys poisoned, NaN reaches") {
    // One query per sequence with 4 query heads per key/value head: the few-query path, whose
    // score and value tiles read the bf16 K and V where they lie (widened in registers). Keys
    // a mask excludes inside a key block hold NaN in K and Inf in V: their scores are computed
    // and masked after, their values never read. d_k and d_v = 20 leave a rest after whole
    // packets (8 or 16 lanes) for the scalar tails. Compared per head with the long-double
    // reference under the bound every bf16 test uses.
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(61);
    const Index heads = 8, kv_heads = 2, dk = 20, dv = 20, lk = 700;
    const mha::packed_batch batch({1}, {lk});
    const bmat q = normal_bf16(rnd, heads * dk, 1);
    bmat k = normal_bf16(rnd, kv_heads * dk, lk), v = normal_bf16(rnd, kv_heads * dv, lk);
    auto allowed = [](Index j, Index) { return j % 7 != 3; };
    mha::bool_matrix keep(lk, 1);
    for (Index j = 0; j < lk; ++j)
        keep(j, 0) = allowed(j, 0);
    const float inf = std::numeric_limits<float>::infinity();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    bmat kp = k, vp = v;
    for (Index j = 0; j < lk; ++j)
        if (!allowed(j, 0)) {
            kp.col(j).setConstant(bf16(nan));
            vp.col(j).setConstant(bf16(inf));
        }
    const mha::attention_mask<float> mask{mha::keep_mask(keep)};
    auto run_core = [&](const bmat& kk, const bmat& vv) {
        mat<float> out(heads * dv, 1);
        mha::multi_head_attention_core(q, kk, vv, heads, kv_heads, batch, out, mask);
        return out;
    };
    const mat<float> out = run_core(kp, vp);
    REQUIRE(out.allFinite());
    check_one_query_heads(out, q, k, v, heads, kv_heads, allowed, "");
    // NaN in an allowed key of group 1 (in the scalar tail of d_k): its 4 heads are NaN, the
    // others are not. NaN in an allowed value of group 0 (in the tail of d_v): that row of its
    // heads only.
    bmat kn = kp;
    kn(dk + 18, 501) = bf16(nan);
    const mat<float> key_nan = run_core(kn, vp);
    CHECK(key_nan.topRows(4 * dv).allFinite());
    CHECK(key_nan.bottomRows(4 * dv).array().isNaN().all());
    bmat vn = vp;
    vn(17, 40) = bf16(nan);
    const mat<float> value_nan = run_core(kp, vn);
    for (Index h = 0; h < heads; ++h)
        for (Index e = 0; e < dv; ++e) {
            INFO("head " << h << ", row " << e);
            CHECK(std::isnan(value_nan(h * dv + e, 0)) == (h < 4 && e == 17));
        }
}

namespace {

/// The bf16 core with kernel `kn` on a multi-head problem, returning the log-sum-exp.
mha::attention_outputs<float> run_heads(kernel kn, const bmat& q, const bmat& k, const bmat& v,
                                        Index heads, Index kv_heads, const mha::packed_batch& batch,
                                        mat<float>& out, const mha::attention_mask<float>& mask,
                                        const mha::attention_options& options,
                                        const settings& cfg) {
    mha::attention_request request;
    request.log_sum_exp = true;
#if defined(MHA_BF16_NATIVE)
    if (kn == kernel::native)
        return mha::detail::multi_head_attention_core_bf16<kernel::native>(
            q, k, v, heads, kv_heads, batch, out, mask, options, request, cfg);
    if (kn == kernel::amx)
        return mha::detail::multi_head_attention_core_bf16<kernel::amx>(
            q, k, v, heads, kv_heads, batch, out, mask, options, request, cfg);
#endif
    (void)kn;
    return mha::detail::multi_head_attention_core_bf16<kernel::portable>(
        q, k, v, heads, kv_heads, batch, out, mask, options, request, cfg);
}

}  // namespace

TEST_CASE("bf16 core: score terms and split-KV decodes, every kernel, against the reference") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // Reference: reference_attention_terms in long double on the same bf16 values. Bound:
    // require_bf16_attention_close with each score's term magnitudes added to Smax through its
    // `bias` argument, as test_score_modifiers does for fp32: soft-capping's tanh has derivative
    // at most 1 (score errors do not grow) and its fp32 evaluation errs by a few u·cap; ALiBi adds
    // slope·distance, rounded once; a sink enters l as one more exp, erring as a score of
    // magnitude |sink| does. Log-sum-exp: the bound of the public-entry case above with those
    // magnitudes in Smax. A term applied to the wrong head, key or query, or a sink left out,
    // moves outputs by O(Vmax), far above.
    // The batch: one query against 150 keys (a decode step: the query heads of a group stacked
    // into one problem without terms or with soft-capping alone, one problem per head with ALiBi
    // or sinks), a causal prefill over several key blocks of the small tiles, queries with no key
    // (output exactly 0; log-sum-exp −∞, or exactly the sink), and 2 queries over 90 keys (one
    // problem per head). With split chunks of 32 keys the decode and the 2 queries are split
    // over key chunks whose partial states are merged (the sink joins after the merge); the
    // merge adds a few fp32 roundings per query, far inside the bf16 bound.
    mha_test::value_source rnd(57);
    const Index heads = 4, kv_heads = 2, dk = 24, dv = 16;
    const std::vector<Index> lq{1, 45, 3, 2}, lk{150, 45, 0, 90};
    const mha::packed_batch batch(lq, lk);
    const Index nq = batch.total_queries(), nk = batch.total_keys();
    const bmat q = normal_bf16(rnd, heads * dk, nq), k = normal_bf16(rnd, kv_heads * dk, nk),
               v = normal_bf16(rnd, kv_heads * dv, nk);
    std::vector<std::pair<std::string, mha::attention_options>> sets;
    sets.emplace_back("no terms", mha::attention_options{});
    mha::attention_options softcap;
    softcap.softcap = 1.5;  // scores of N(0, 1) inputs reach the curved part
    sets.emplace_back("softcap", softcap);
    mha::attention_options alibi;
    alibi.alibi_slopes = mha::alibi_slopes(heads);
    sets.emplace_back("alibi", alibi);
    mha::attention_options sinks;
    sinks.sinks = {-0.7, -0.2, 0.3, 0.8};
    sets.emplace_back("sinks", sinks);
    mha::attention_options all = alibi;
    all.softcap = 2.0;
    all.sinks = sinks.sinks;
    sets.emplace_back("softcap + alibi + sinks", all);
    const long double scale = 1.0L / std::sqrt(static_cast<long double>(dk));
    const long double u = 0x1.0p-24L, minus_inf = -std::numeric_limits<long double>::infinity();
    for (const settings& cfg : {settings{16, 24, 1024, 0}, settings{16, 24, 32, 0}, settings{}})
        for (const auto& [name, options] : sets)
            for (kernel kn : mha_test::bf16_kernels_here()) {
                mat<float> out(heads * dv, nq);
                const mha::attention_outputs<float> r = run_heads(
                    kn, q, k, v, heads, kv_heads, batch, out, mha::causal{}, options, cfg);
                for (Index b = 0; b < batch.size(); ++b)
                    for (Index h = 0; h < heads; ++h) {
                        const Index n = lq[static_cast<std::size_t>(b)];
                        const Index m = lk[static_cast<std::size_t>(b)];
                        const Index c0 = batch.query_offset(b),
                                    k0 = m > 0 ? batch.key_offset(b) : 0;
                        const Index g = h / (heads / kv_heads);
                        const mat<long double> qh = widen(q.block(h * dk, c0, dk, n));
                        const mat<long double> kh = widen(k.block(g * dk, k0, dk, m));
                        const mat<long double> vh = widen(v.block(g * dv, k0, dv, m));
                        const mha_test::score_terms terms = mha_test::score_terms_of(options, h);
                        const auto allowed = mha_test::causal_bottom_right(n, m);
                        mha_test::vec<long double> ref_lse;
                        const mat<long double> ref =
                            mha_test::reference_attention_terms<long double>(
                                qh, kh, vh, scale, terms, allowed, nullptr,
                                mha_test::norm_kind::softmax, nullptr, &ref_lse);
                        auto magnitude = [&](Index j, Index i) {
                            return mha_test::term_magnitude(terms, j, i, m - n);
                        };
                        const std::string what = std::string(mha_test::bf16_kernel_name(kn)) +
                                                 ", " + name + ", blocks " +
                                                 std::to_string(cfg.query_block) + ", chunks " +
                                                 std::to_string(cfg.split_chunk) + ", sequence " +
                                                 std::to_string(b) + ", head " + std::to_string(h);
                        mha_test::require_bf16_attention_close<float>(out.block(h * dv, c0, dv, n),
                                                                      ref, qh, kh, vh, scale,
                                                                      allowed, magnitude, what);
                        for (Index i = 0; i < n; ++i) {
                            const long double got = r.log_sum_exp(h, c0 + i);
                            INFO(what << ", query " << i << ": lse " << got << " vs "
                                      << ref_lse(i));
                            if (m == 0) {  // nothing to attend to
                                CHECK(got == (terms.sink ? static_cast<long double>(
                                                               static_cast<float>(terms.sink_logit))
                                                         : minus_inf));
                                continue;
                            }
                            long double smax = 0;
                            Index count = terms.sink ? 1 : 0;
                            for (Index j = 0; j < m; ++j) {
                                if (!allowed(j, i)) continue;
                                long double mag = 0;
                                for (Index d = 0; d < dk; ++d)
                                    mag += std::fabs(qh(d, i) * kh(d, j));
                                smax = std::max(smax, mag * scale + magnitude(j, i));
                                ++count;
                            }
                            const long double bound =
                                (dk + 1) * u * smax * 2 + 4 * u * (1 + std::fabs(ref_lse(i))) +
                                2 * static_cast<long double>(count) * u + mha_test::bf16_exp_error;
                            CHECK(std::fabs(got - ref_lse(i)) <= bound);
                        }
                    }
            }
}

TEST_CASE("bf16 core: with score terms, poisoned masked keys never leak and NaN propagates") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // An output column made non-finite by 0·Inf from an excluded value is recomputed from its
    // allowed keys (repair_column_bf16): with the terms, or it would disagree with (m, l). Bound:
    // the case above on score terms.
    mha_test::value_source rnd(59);
    // Every 7th key excluded by a keep mask: inside the blocks the tiles visit, so its value
    // meets a probability of 0 in P·V.
    const Index dk = 16, dv = 16, lq = 40, lk = 60;
    const settings cfg{16, 24, 1024, 0};
    const bmat q = normal_bf16(rnd, dk, lq), k = normal_bf16(rnd, dk, lk),
               v = normal_bf16(rnd, dv, lk);
    mha::bool_matrix keep = mha::bool_matrix::Constant(lk, lq, true);
    bmat kp = k, vp = v;
    for (Index j = 3; j < lk; j += 7) {
        keep.row(j).setConstant(false);
        kp.col(j).setConstant(bf16(j % 2 ? std::numeric_limits<float>::quiet_NaN()
                                         : std::numeric_limits<float>::infinity()));
        vp.col(j).setConstant(bf16(-std::numeric_limits<float>::infinity()));
    }
    mha::attention_options options;
    options.softcap = 1.5;
    options.alibi_slopes = {0.25};
    options.sinks = {0.5};
    const mha_test::score_terms terms = mha_test::score_terms_of(options, 0);
    const auto allowed = [=](Index j, Index) { return (j - 3) % 7 != 0; };
    const mha::attention_mask<float> mask = mha::keep_mask(keep);
    const mat<long double> ref = mha_test::reference_attention_terms<long double>(
        widen(q), widen(k), widen(v), 0.25L, terms, allowed);
    const auto magnitude = [=](Index j, Index i) {
        return mha_test::term_magnitude(terms, j, i, lk - lq);
    };
    for (kernel kn : mha_test::bf16_kernels_here()) {
        INFO(mha_test::bf16_kernel_name(kn));
        const mat<float> poisoned = run(kn, q, kp, vp, mask, cfg, options);
        CHECK(poisoned.allFinite());
        mha_test::require_bf16_attention_close(poisoned, ref, widen(q), widen(k), widen(v), 0.25f,
                                               allowed, magnitude, "poisoned, terms");
        // NaN in an allowed value: every query has NaN in that row, the other rows stay finite.
        bmat vn = v;
        vn(2, 11) = bf16(std::numeric_limits<float>::quiet_NaN());
        const mat<float> vnan = run(kn, q, k, vn, mask, cfg, options);
        CHECK(vnan.row(2).array().isNaN().all());
        CHECK(vnan.topRows(2).allFinite());
        CHECK(vnan.bottomRows(dv - 3).allFinite());
    }
}

TEST_CASE("bf16 core: a decode split over key chunks: empty chunks, poisoned keys, thread counts") {
    // One query over 300 keys with 4 query heads per key/value head, split into chunks of 32
    // keys (settings: query block 16, key block 24). Keys from 130 on are past the key length
    // and hold NaN in K and Inf in V, so chunks 5 to 9 have no allowed key (their partials are
    // m = −∞, which the merge skips); keys 32–63, chunk 1, are excluded by a keep mask and
    // poisoned too. Checked per head against the long-double reference under the bound every
    // bf16 test uses; 1, 2 and 3 threads give the same bits (the chunks are merged in order
    // whatever thread computed them); a NaN in an allowed value reaches that row of its group's
    // 4 heads only, through the merge.
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(67);
    const Index heads = 8, kv_heads = 2, dk = 20, dv = 20, lk = 300, kept = 130;
    const mha::packed_batch batch({1}, {lk});
    const bmat q = normal_bf16(rnd, heads * dk, 1);
    const bmat k = normal_bf16(rnd, kv_heads * dk, lk), v = normal_bf16(rnd, kv_heads * dv, lk);
    auto allowed = [=](Index j, Index) { return j < kept && (j < 32 || j >= 64); };
    mha::bool_matrix keep(lk, 1);
    for (Index j = 0; j < lk; ++j)
        keep(j, 0) = j < 32 || j >= 64;
    bmat kp = k, vp = v;
    for (Index j = 0; j < lk; ++j)
        if (!allowed(j, 0)) {
            kp.col(j).setConstant(bf16(std::numeric_limits<float>::quiet_NaN()));
            vp.col(j).setConstant(bf16(std::numeric_limits<float>::infinity()));
        }
    const mha::attention_mask<float> mask(mha::key_lengths{{kept}}, mha::keep_mask(keep));
    for (kernel kn : mha_test::bf16_kernels_here()) {
        const std::string name = mha_test::bf16_kernel_name(kn);
        auto run_split = [&](const bmat& vv, int threads) {
            mat<float> out(heads * dv, 1);
            run_heads(kn, q, kp, vv, heads, kv_heads, batch, out, mask, {},
                      settings{16, 24, 32, threads});
            return out;
        };
        const mat<float> out = run_split(vp, 1);
        REQUIRE(out.allFinite());
        CHECK(same_bits(out, run_split(vp, 2)));
        CHECK(same_bits(out, run_split(vp, 3)));
        check_one_query_heads(out, q, k, v, heads, kv_heads, allowed, name + ", ");
        bmat vn = vp;
        vn(dv + 5, 100) = bf16(std::numeric_limits<float>::quiet_NaN());  // group 1, chunk 3
        const mat<float> value_nan = run_split(vn, 2);
        for (Index h = 0; h < heads; ++h)
            for (Index e = 0; e < dv; ++e) {
                INFO(name << ", head " << h << ", row " << e);
                CHECK(std::isnan(value_nan(h * dv + e, 0)) == (h >= 4 && e == 5));
            }
    }
}

TEST_CASE("bf16 core: fully masked queries are exactly 0, requests it cannot serve throw") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(51);
    const bmat q = normal_bf16(rnd, 8, 6), k = normal_bf16(rnd, 8, 9), v = normal_bf16(rnd, 8, 9);
    mha::bool_matrix keep = mha::bool_matrix::Constant(9, 6, true);
    keep.col(2).setConstant(false);
    mat<float> out(8, 6);
    const mha::packed_batch batch = mha::packed_batch::single(6, 9);
    mha::multi_head_attention_core(q, k, v, 1, batch, out, mha::keep_mask(keep));
    CHECK((out.col(2).array() == 0.0f).all());
    CHECK(out.allFinite());
    mha::attention_request weights;
    weights.weights = mha::weights_mode::per_head;
    CHECK_THROWS_AS(mha::multi_head_attention_core(q, k, v, 1, 1, batch, out, {}, {}, weights),
                    mha::value_error);
    mha::attention_options relu;
    relu.normalize = mha::normalization::relu;
    CHECK_THROWS_AS(mha::multi_head_attention_core(q, k, v, 1, batch, out, {}, relu),
                    mha::value_error);
    mat<float> wrong(8, 5);
    CHECK_THROWS_AS(mha::multi_head_attention_core(q, k, v, 1, batch, wrong), mha::shape_error);
}

#if defined(MHA_BF16_NATIVE)
/// mha_test::worst_exp_error of `exp_fn`, an exp of one __m512.
template <class Exp>
long double worst_exp_error(Exp exp_fn) {
    return mha_test::worst_exp_error<16>(
        [&](const float* x, float* y) { _mm512_store_ps(y, exp_fn(_mm512_load_ps(x))); });
}
#endif

TEST_CASE("bf16 core: the native kernel's exp is within 3 ulp of exp over [-88, 0]") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
#if defined(MHA_BF16_NATIVE)
    if (!mha_test::bf16_native_available()) SKIP("the CPU lacks AVX512-BF16");
    const long double worst =
        worst_exp_error([](__m512 d) { return mha::detail::exp_nonpositive(d); });
    INFO("worst relative error " << worst);
    CHECK(worst <= 3 * 0x1.0p-24L);
#else
    SKIP("the native kernel is not compiled in");
#endif
}

TEST_CASE("fp32 core: the exp pass's exp is within 3 ulp of exp where the result is normal") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
#if defined(MHA_BF16_NATIVE)
    if (!mha_test::bf16_native_available()) SKIP("the CPU lacks AVX512-BF16");
    // exp_above_flush: the table's roundings (half a unit of 2^-24 each), the cubic's 9e-9 and
    // the final multiply-add's rounding; 1.9 units measured. Its reduction by ln 2/16 in one
    // constant would show as about 5.3 units near −87.
    const long double worst = worst_exp_error(
        [](__m512 d) { return mha::detail::exp_above_flush(d, static_cast<__mmask16>(0xFFFF)); });
    INFO("worst relative error " << worst);
    CHECK(worst <= 3 * 0x1.0p-24L);
#else
    SKIP("the native kernel is not compiled in");
#endif
}

TEST_CASE("bf16 core: the exp of the probabilities rounded to bf16 is within its stated bound") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
#if defined(MHA_BF16_NATIVE)
    if (!mha_test::bf16_native_available()) SKIP("the CPU lacks AVX512-BF16");
    // The bound the bf16 checks assume (mha_test::bf16_exp_error): the quadratic's 1.7e-6, the
    // one-constant reduction's 2.4e-7 near −87 and fp32 roundings of a few units of 2^-24; about
    // 2.0e-6 shows here. The linear polynomial (e^r ≈ 1 + r) would show as about 2.4e-4.
    const long double worst =
        worst_exp_error([](__m512 d) { return mha::detail::exp_nonpositive_for_bf16(d); });
    INFO("worst relative error " << worst);
    CHECK(worst <= mha_test::bf16_exp_error);
#else
    SKIP("the native kernel is not compiled in");
#endif
}

TEST_CASE("bf16 core build: the float query packing equals the plain scaled transpose") {
    // Here because this file's _native build is the Debug suite's one compiled for AVX-512:
    // there pack_scaled_queries transposes 16 × 16 blocks in registers, elsewhere it runs its
    // scalar loop. Either must give qt(c, d) = scale·q(d, c) exactly (one rounding, the same
    // product), zeros in the padding queries; sizes around the 16 × 16 blocks.
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    const Index q_stride = 97;
    const float scale = 0.125f * 3.0f;
    for (Index nq : {1, 15, 16, 17, 40, 128})
        for (Index dk : {1, 15, 16, 17, 64, 80}) {
            const Index nqp = (nq + 15) / 16 * 16;
            std::vector<float> q(static_cast<std::size_t>(q_stride * nq));
            for (std::size_t i = 0; i < q.size(); ++i)
                q[i] = static_cast<float>(i % 977) - 488.5f;
            std::vector<float> qt(static_cast<std::size_t>(nqp * dk), -1.0f);
            mha::detail::pack_scaled_queries(q.data(), q_stride, dk, nq, nqp, scale, qt.data(),
                                             nqp);
            Index wrong = 0;
            for (Index c = 0; c < nqp; ++c)
                for (Index d = 0; d < dk; ++d) {
                    const float want =
                        c < nq ? scale * q[static_cast<std::size_t>(c * q_stride + d)] : 0.0f;
                    wrong += qt[static_cast<std::size_t>(d * nqp + c)] != want;
                }
            INFO("nq " << nq << ", d_k " << dk);
            CHECK(wrong == 0);
        }
}

TEST_CASE("bf16 core build: the query pair packing equals the plain pair-interleaved layout") {
    // pack_query_pairs moves 16 queries × 16 pairs through registers where the build targets
    // AVX-512 (this file's _native build), the rest word by word. Either must give
    // qp[(d2·nqp + c)·2 + e] = the bits of Q(2·d2 + e, c), 0 for padding queries and for the
    // partner of an odd d_k; sizes around the 16 × 16 blocks, queries a stride apart.
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    const Index q_stride = 99;
    for (Index nq : {1, 15, 16, 17, 40, 128})
        for (Index dk : {1, 2, 31, 32, 33, 40, 64, 80}) {
            const Index nqp = mha::detail::bf16_padded(nq), pairs = (dk + 1) / 2;
            bmat q(q_stride, nq);
            for (Index c = 0; c < nq; ++c)
                for (Index r = 0; r < q_stride; ++r)
                    q(r, c) = bf16(static_cast<float>((r * 131 + c * 7) % 509) - 254.0f);
            std::vector<std::uint16_t> qp(static_cast<std::size_t>(pairs * nqp * 2), 0xffff);
            mha::detail::pack_query_pairs(q.data(), q_stride, dk, nq, nqp, qp.data());
            Index wrong = 0;
            for (Index d2 = 0; d2 < pairs; ++d2)
                for (Index c = 0; c < nqp; ++c)
                    for (Index e = 0; e < 2; ++e) {
                        const Index d = 2 * d2 + e;
                        const std::uint16_t want =
                            c < nq && d < dk ? mha::detail::bf16_bits(q(d, c)) : std::uint16_t(0);
                        wrong += qp[static_cast<std::size_t>((d2 * nqp + c) * 2 + e)] != want;
                    }
            INFO("nq " << nq << ", d_k " << dk);
            CHECK(wrong == 0);
        }
}
