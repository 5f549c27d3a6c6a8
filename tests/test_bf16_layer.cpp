// SPDX-License-Identifier: MIT
// The multi-head attention layer on bfloat16 storage (include/mha/multi_head_attention_bf16.hpp).
//
// Method. The layer is a composition of public pieces: mha::linear on bf16 (Q, K, V rounded to
// bf16), the bf16 core (heads rounded to bf16), mha::linear again (fp32 output). Each case
// recomputes that composition from the pieces and requires the layer's output to equal it bit
// for bit; then checks every stage of the composition against an independent long-double
// reference fed that stage's own bf16 input (the previous stage's rounded output), so a value
// that rounds across a bf16 boundary in one stage cannot spoil the next stage's bound:
//   - projections: tests/support/check.hpp, require_bf16_linear_close (γ_{d_in+1}·Σ|w·x| plus
//     one bf16 rounding for Q, K, V); with rotary positions, Q and K against the long-double
//     projection turned by the formula (support/reference.hpp), bound derived at
//     `input_projection` below;
//   - the core, per sequence and head: require_bf16_attention_close with a bf16 output;
//   - the output projection: require_bf16_linear_close with an fp32 output.
// The whole layer is also compared with the fp32 layer of the same parameters, only as a smoke
// check with a loose documented bound (see the case).
//
// Built twice by tests/CMakeLists.txt, like test_bf16_attention: with the preset's flags (the
// portable kernels) and with -mavx512bf16 where the compiler takes it (the vdpbf16ps kernels).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <mha/multi_head_attention_bf16.hpp>

#include "bf16_kernels.hpp"
#include "check.hpp"
#include "reference.hpp"

namespace {

using mha::Index;
using mha_test::mat;
using mha_test::vec;
using bf16 = Eigen::bfloat16;
using bmat = Eigen::Matrix<bf16, Eigen::Dynamic, Eigen::Dynamic>;

bmat normal_bf16(mha_test::value_source& rnd, Index rows, Index cols, double sigma = 1.0) {
    bmat m(rows, cols);
    for (Index c = 0; c < cols; ++c)
        for (Index r = 0; r < rows; ++r)
            m(r, c) = bf16(static_cast<float>(rnd.normal(sigma)));
    return m;
}

template <class M>
mat<long double> widen(const M& m) {
    mat<long double> r(m.rows(), m.cols());
    for (Index c = 0; c < m.cols(); ++c)
        for (Index i = 0; i < m.rows(); ++i)
            r(i, c) = static_cast<long double>(static_cast<float>(m(i, c)));
    return r;
}

bool same_bits(const mha::matrix<float>& a, const mha::matrix<float>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

// Seeded parameters with non-zero biases (the seeded initialisation's are zero).
mha::attention_parameters<float> parameters_for(const mha::attention_config& c,
                                                std::uint64_t seed) {
    mha::attention_parameters<float> p = mha::multi_head_attention<float>(c, seed).parameters();
    if (c.bias) {
        mha_test::value_source rnd(seed + 100);
        for (auto* b : {&p.b_q, &p.b_k, &p.b_v, &p.b_o})
            for (Index i = 0; i < b->size(); ++i)
                (*b)(i) = static_cast<float>(rnd.normal(0.1));
    }
    return p;
}

// Q, K, V of self-attention over `batch` as the layer computes them, from public pieces, each
// row block checked against its long-double reference; stacked as the layer's workspace holds
// them: (H·d_k + H_kv·d_k + H_kv·d_v) × N.
//
// Without rotary positions: one mha::linear of the stacked bf16 weights, bf16 output.
// With them: Q and K by mha::linear into fp32, turned by mha::rotary_embedding<float> at each
// token's position in its sequence, then rounded once to bf16; V by its own product. The bound for
// a turned row a of pair (a, b), angle θ, against y = μ(cos θ·r_a − sin θ·r_b) of the long-double
// projection r (magnitudes S, see require_bf16_linear_close): the fp32 projection is within
// γ_{k+1}·S; the turn rounds μ·cos and μ·sin to float (one u each, from double values within
// a few 2⁻⁵³), then two products and a sum (three u): within γ_{k+4}·S' with
// S' = |μ cos θ|·S_a + |μ sin θ|·S_b, since (1 + γ_{k+1})(1 + γ_3) ≤ 1 + γ_{k+4}. One more u
// covers the angle formed in double (position·θ_i rounds once; positions here stay below 2^9, so
// its effect is under 2⁻⁴⁰ of |r|). So require_bf16_linear_close with S' and d_in = k + 4
// (γ_{k+5}), plus the bf16 rounding it adds. The cases use no frequency scaling (μ = 1, the
// plain formula). A wrong position turns pair 0 (θ_0 = 1) by a radian per position, far above
// that bound.
bmat input_projection(const mha::multi_head_attention_bf16& layer,
                      const mha::attention_parameters<float>& p, const bmat& x,
                      const mha::packed_batch& batch, const std::string& what) {
    const mha::attention_config& c = layer.config();
    const Index n = x.cols(), e = c.embed_dim;
    const Index qk = layer.qk_width(), kw = layer.key_width(), vw = layer.value_width();
    bmat w_in(qk + kw + vw, e);  // (H·d_k + H_kv·d_k + H_kv·d_v) × E
    w_in << p.w_q.cast<bf16>(), p.w_k.cast<bf16>(), p.w_v.cast<bf16>();
    mha::vector<float> b_in(c.bias ? qk + kw + vw : 0);
    if (c.bias) b_in << p.b_q, p.b_k, p.b_v;
    bmat qkv(qk + kw + vw, n);
    mha::bf16_linear_workspace lw;
    mha::linear(w_in, b_in, x, qkv, lw);
    const auto reference = mha_test::bf16_linear_reference_of(w_in, b_in, x);
    if (!c.rotary) {
        mha_test::require_bf16_linear_close(qkv, reference, e, true, what + ", input projection");
        return qkv;
    }
    // V by its own product, as the layer does with rotary positions.
    bmat v(vw, n);  // H_kv·d_v × N
    mha::linear(bmat(w_in.bottomRows(vw)), p.b_v, x, v, lw);
    qkv.bottomRows(vw) = v;
    mha_test::require_bf16_linear_close(
        qkv.bottomRows(vw), {reference.value.bottomRows(vw), reference.magnitude.bottomRows(vw)}, e,
        true, what + ", V projection");
    mha::matrix<float> qk32(qk + kw, n);  // Q over K, as the layer's two products give them
    mha::matrix<float> q32(qk, n), k32(kw, n);
    mha::linear(bmat(w_in.topRows(qk)), p.b_q, x, q32, lw);
    mha::linear(bmat(w_in.middleRows(qk, kw)), p.b_k, x, k32, lw);
    qk32 << q32, k32;
    const mha::rotary_embedding<float> rope(*c.rotary, c.head_dim);
    mha_test::bf16_linear_reference turned{reference.value.topRows(qk + kw),
                                           reference.magnitude.topRows(qk + kw)};
    const Index dk = c.head_dim, r = rope.rotary_dim();
    const bool interleaved = c.rotary->layout == mha::rotary_layout::interleaved;
    for (Index b = 0; b < batch.size(); ++b) {
        const Index start = batch.query_offset(b), len = batch.query_length(b);
        if (len == 0) continue;
        auto q = qk32.block(0, start, qk, len);
        auto k = qk32.block(qk, start, kw, len);
        rope.apply(q, c.num_heads, 0);
        rope.apply(k, c.num_kv_heads, 0);
        for (Index t = 0; t < len; ++t)
            for (Index h = 0; h < c.num_heads + c.num_kv_heads; ++h) {
                long double* y = &turned.value(h * dk, start + t);
                long double* m = &turned.magnitude(h * dk, start + t);
                mha_test::for_each_rotary_pair(
                    r, c.rotary->base, interleaved, t,
                    [y, m](Index a, Index pb, long double cs, long double sn) {
                        const long double ya = y[a], yb = y[pb], ma = m[a], mb = m[pb];
                        y[a] = cs * ya - sn * yb;
                        y[pb] = cs * yb + sn * ya;
                        m[a] = std::fabs(cs) * ma + std::fabs(sn) * mb;
                        m[pb] = std::fabs(cs) * mb + std::fabs(sn) * ma;
                    });
            }
    }
    qkv.topRows(qk + kw) = qk32.cast<bf16>();
    mha_test::require_bf16_linear_close(qkv.topRows(qk + kw), turned, e + 4, true,
                                        what + ", Q and K turned");
    return qkv;
}

// The core's long-double reference for query head h of a problem of q.cols() queries and
// k.cols() keys, with the score terms of `options` (soft-capping, ALiBi, a sink), and the
// function that adds each score's term magnitudes to the bound's Smax (null without terms), as
// the bf16 core's own case on score terms derives it (test_bf16_attention.cpp).
struct core_reference {
    mat<long double> out;
    mha_test::bias_fn magnitude;
};

core_reference reference_core(const mha::attention_options& options, Index h,
                              const mat<long double>& q, const mat<long double>& k,
                              const mat<long double>& v, long double scale,
                              const mha_test::allowed_fn& allowed) {
    const mha_test::score_terms terms = mha_test::score_terms_of(options, h);
    core_reference r{
        mha_test::reference_attention_terms<long double>(q, k, v, scale, terms, allowed), nullptr};
    if (terms.softcap != 0 || terms.alibi || terms.sink) {
        const Index shift = k.cols() - q.cols();
        r.magnitude = [terms, shift](Index j, Index i) {
            return mha_test::term_magnitude(terms, j, i, shift);
        };
    }
    return r;
}

// Which keys query i of sequence s may see (indices within the sequence).
using allowed_in = std::function<bool(Index s, Index j, Index i)>;

// The composition of public pieces, each stage checked against its long-double reference, and
// the layer's output required to be the same bits. Self-attention over `batch`.
// `p`: the fp32 parameters the layer was made from.
void check_layer(const mha::multi_head_attention_bf16& layer,
                 const mha::attention_parameters<float>& p, const bmat& x,
                 const mha::packed_batch& batch, const mha::attention_mask<float>& mask,
                 const allowed_in& allowed, const std::string& what) {
    INFO(what);
    const mha::attention_config& c = layer.config();
    const Index n = x.cols(), heads = c.num_heads, kv = c.num_kv_heads;
    const Index dk = c.head_dim, dv = c.value_head_dim;
    const Index qk = layer.qk_width(), kw = layer.key_width(), vw = layer.value_width();

    // Stage 1: the input projection as the layer computes it.
    const bmat qkv = input_projection(layer, p, x, batch, what);  // (H·d_k + H_kv·(d_k + d_v)) × N
    // Stage 2: the bf16 core on the stage-1 values, heads rounded to bf16.
    const bmat q = qkv.topRows(qk), k = qkv.middleRows(qk, kw), v = qkv.bottomRows(vw);
    bmat heads16(heads * dv, n);  // H·d_v × N
    mha::multi_head_attention_core(q, k, v, heads, kv, batch, heads16, mask, c.attention);
    const long double scale = 1.0L / std::sqrt(static_cast<long double>(dk));
    const float scale32 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));
    for (Index s = 0; s < batch.size(); ++s) {
        const Index start = batch.query_offset(s), len = batch.query_length(s);
        auto ok = [&allowed, s](Index j, Index i) { return allowed(s, j, i); };
        for (Index h = 0; h < heads; ++h) {
            const Index g = mha_test::reference_kv_head(h, heads, kv);
            const mat<long double> ql = widen(q.block(h * dk, start, dk, len));
            const mat<long double> kl = widen(k.block(g * dk, start, dk, len));
            const mat<long double> vl = widen(v.block(g * dv, start, dv, len));
            const core_reference ref = reference_core(c.attention, h, ql, kl, vl, scale, ok);
            const mat<float> got = heads16.block(h * dv, start, dv, len).cast<float>();
            mha_test::require_bf16_attention_close(
                got, ref.out, ql, kl, vl, scale32, ok, ref.magnitude,
                what + ", core, sequence " + std::to_string(s) + ", head " + std::to_string(h),
                true);
        }
    }

    // Stage 3: the output projection on the stage-2 heads, fp32 output.
    const bmat w_o = p.w_o.cast<bf16>();  // E × H·d_v
    mha::matrix<float> composed(c.embed_dim, n);
    mha::bf16_linear_workspace lw;
    mha::linear(w_o, p.b_o, heads16, composed, lw);
    mha_test::require_bf16_linear_close(composed,
                                        mha_test::bf16_linear_reference_of(w_o, p.b_o, heads16),
                                        heads * dv, false, what + ", output projection");

    // The layer is that composition, bit for bit, by both entries.
    const mha::matrix<float> out = layer.forward(x, batch, mask);
    CHECK(same_bits(out, composed));
    mha::matrix<float> into(c.embed_dim, n);
    mha::bf16_forward_workspace ws;
    layer.forward_into(x, batch, mask, into, ws);
    layer.forward_into(x, batch, mask, into, ws);  // a reused workspace changes nothing
    CHECK(same_bits(into, composed));
}

mha::attention_config config_of(Index e, Index h, Index kv = 0, Index dk = 0, Index dv = 0) {
    mha::attention_config c;
    c.embed_dim = e;
    c.num_heads = h;
    c.num_kv_heads = kv;
    c.head_dim = dk;
    c.value_head_dim = dv;
    return c;
}

}  // namespace

TEST_CASE("bf16 layer: every stage within its bound, the layer equal to the composition") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(7);
    const auto all = [](Index, Index, Index) { return true; };
    const auto causal = [](Index, Index j, Index i) { return j <= i; };
    {
        const mha::attention_config c = config_of(64, 4);
        const mha::attention_parameters<float> p = parameters_for(c, 1);
        const mha::multi_head_attention_bf16 layer(c, p);
        const bmat x = normal_bf16(rnd, 64, 45);
        check_layer(layer, p, x, mha::packed_batch::single(45, 45), {}, all, "64/4, no mask");
        check_layer(layer, p, x, mha::packed_batch::single(45, 45), mha::causal{}, causal,
                    "64/4, causal");
    }
    {
        // A packed batch of unequal lengths, grouped heads, d_k ≠ d_v, causal and key padding.
        const mha::attention_config c = config_of(48, 6, 2, 10, 7);
        const mha::attention_parameters<float> p = parameters_for(c, 2);
        const mha::multi_head_attention_bf16 layer(c, p);
        const mha::packed_batch batch({30, 5, 41}, {30, 5, 41});
        const bmat x = normal_bf16(rnd, 48, 76);
        const std::vector<Index> lengths{30, 3, 17};
        check_layer(layer, p, x, batch, mha::causal{}, causal, "grouped, batch, causal");
        check_layer(
            layer, p, x, batch,
            mha::attention_mask<float>(mha::causal{}, mha::key_lengths{lengths}),
            [&](Index s, Index j, Index i) {
                return j <= i && j < lengths[static_cast<std::size_t>(s)];
            },
            "grouped, batch, causal + key_lengths");
    }
    {
        // Without bias, and long enough for several key blocks of the kernel.
        mha::attention_config c = config_of(32, 2);
        c.bias = false;
        const mha::attention_parameters<float> p = parameters_for(c, 3);
        const mha::multi_head_attention_bf16 layer(c, p);
        const bmat x = normal_bf16(rnd, 32, 300);
        check_layer(layer, p, x, mha::packed_batch({200, 100}, {200, 100}), mha::causal{}, causal,
                    "no bias, 200 + 100");
    }
}

namespace {

mha::rotary_options rope_of(Index rotary_dim, bool interleaved, double base = 10000) {
    mha::rotary_options r;
    r.rotary_dim = rotary_dim;
    r.layout = interleaved ? mha::rotary_layout::interleaved : mha::rotary_layout::half_split;
    r.base = base;
    return r;
}

}  // namespace

TEST_CASE("bf16 layer: rotary positions, every stage within its bound, equal to the composition") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(31);
    const auto causal = [](Index, Index j, Index i) { return j <= i; };
    {
        // The whole head, half-split.
        mha::attention_config c = config_of(64, 4);
        c.rotary = rope_of(0, false);
        const mha::attention_parameters<float> p = parameters_for(c, 32);
        const mha::multi_head_attention_bf16 layer(c, p);
        const bmat x = normal_bf16(rnd, 64, 45);
        check_layer(layer, p, x, mha::packed_batch::single(45, 45), mha::causal{}, causal,
                    "rotary 64/4, causal");
    }
    {
        // Grouped heads, d_k ≠ d_v, 6 of 10 features turned, interleaved, Llama 3's base; a
        // packed batch, each sequence counting from position 0.
        mha::attention_config c = config_of(48, 6, 2, 10, 7);
        c.rotary = rope_of(6, true, 500000);
        const mha::attention_parameters<float> p = parameters_for(c, 33);
        const mha::multi_head_attention_bf16 layer(c, p);
        const bmat x = normal_bf16(rnd, 48, 76);
        check_layer(layer, p, x, mha::packed_batch({30, 5, 41}, {30, 5, 41}), mha::causal{}, causal,
                    "rotary grouped, batch, causal");
    }
}

TEST_CASE("bf16 layer: rotary cross-attention turns query i at Lk - Lq + i, key j at j") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // The composition written with the public pieces, positions placed here (not by the
    // library's helper): Q and K in fp32, turned, rounded once; V in bf16.
    mha_test::value_source rnd(34);
    mha::attention_config c = config_of(32, 4, 2);
    c.key_input_dim = 20;
    c.value_input_dim = 12;
    c.rotary = rope_of(4, false);
    const mha::attention_parameters<float> p = parameters_for(c, 35);
    const mha::multi_head_attention_bf16 layer(c, p);
    const mha::packed_batch batch({9, 14, 3}, {25, 6, 0});
    const bmat xq = normal_bf16(rnd, 32, 26), xk = normal_bf16(rnd, 20, 31),
               xv = normal_bf16(rnd, 12, 31);
    mha::bf16_linear_workspace lw;
    mha::matrix<float> q32(32, 26), k32(16, 31);
    mha::linear(bmat(p.w_q.cast<bf16>()), p.b_q, xq, q32, lw);
    mha::linear(bmat(p.w_k.cast<bf16>()), p.b_k, xk, k32, lw);
    const mha::rotary_embedding<float> rope(*c.rotary, 8);
    for (Index b = 0; b < batch.size(); ++b) {
        const Index lq = batch.query_length(b), lk = batch.key_length(b);
        auto q = q32.middleCols(batch.query_offset(b), lq);
        auto k = k32.middleCols(batch.key_offset(b), lk);
        rope.apply(q, 4, lk > lq ? lk - lq : 0);
        rope.apply(k, 2, 0);
    }
    bmat v(16, 31), heads(32, 26);
    mha::linear(bmat(p.w_v.cast<bf16>()), p.b_v, xv, v, lw);
    mha::multi_head_attention_core(bmat(q32.cast<bf16>()), bmat(k32.cast<bf16>()), v, 4, 2, batch,
                                   heads, mha::attention_mask<float>{});
    mha::matrix<float> composed(32, 26);
    mha::linear(bmat(p.w_o.cast<bf16>()), p.b_o, heads, composed, lw);
    CHECK(same_bits(layer.forward(xq, xk, xv, batch), composed));
}

TEST_CASE("bf16 layer: rotary positions close to the fp32 layer's (smoke check)") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // Not the accuracy claim (the stage-by-stage cases are): the bound of the smoke check above
    // (2⁻⁶ of the largest fp32 output), which the turn does not change (one more rounding of Q
    // and K in fp32). A position off by one turns pair 0 by a whole radian: the output moves by
    // its own scale.
    mha_test::value_source rnd(36);
    mha::attention_config c = config_of(64, 8, 2);
    c.rotary = rope_of(0, true);
    const mha::multi_head_attention<float> fp32(c, parameters_for(c, 37));
    const mha::multi_head_attention_bf16 layer(fp32);
    const auto close = [](const mha::matrix<float>& a, const mha::matrix<float>& b) {
        return (a - b).cwiseAbs().maxCoeff() <= 0x1.0p-6f * b.cwiseAbs().maxCoeff();
    };
    const mha::packed_batch batch({60, 30}, {60, 30});
    const bmat x = normal_bf16(rnd, 64, 90);
    const mha::matrix<float> x32 = x.cast<float>();
    CHECK(close(layer.forward(x, batch, mha::causal{}), fp32.forward(x32, batch, mha::causal{})));
    const mha::packed_batch cross({20, 10}, {60, 30});
    const bmat xq = normal_bf16(rnd, 64, 30);
    const mha::matrix<float> xq32 = xq.cast<float>();
    CHECK(close(layer.forward(xq, x, x, cross), fp32.forward(xq32, x32, x32, cross)));
    // Decoding: a prompt of 50, then single tokens, against the fp32 layer's causal forward over
    // the whole sequence (with and without a window).
    for (const Index window : {Index(0), Index(16)}) {
        INFO("window " << window);
        mha::kv_cache_options options;
        options.window = window;
        mha::kv_cache<bf16> cache = layer.make_cache(options);
        const Index t = 60;
        mha::matrix<float> decoded(64, t);
        decoded.leftCols(50) = layer.decode(x.leftCols(50), cache);
        for (Index j = 50; j < t; ++j)
            decoded.col(j) = layer.decode(x.col(j), cache);
        const mha::attention_mask<float> mask =
            window > 0 ? mha::attention_mask<float>(mha::sliding_window{window - 1, 0})
                       : mha::attention_mask<float>(mha::causal{});
        CHECK(close(decoded, fp32.forward(mha::matrix<float>(x32.leftCols(t)), mask)));
    }
}

TEST_CASE("bf16 layer: soft-capping, ALiBi and sinks, every stage within its bound") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // Gemma 2's soft-capping, BLOOM's ALiBi and gpt-oss's sinks (with rotary positions, as
    // gpt-oss has them): the composition of the public pieces with config.attention's terms,
    // each stage against its long-double reference, the layer equal to it bit for bit.
    mha_test::value_source rnd(41);
    const auto causal = [](Index, Index j, Index i) { return j <= i; };
    mha::attention_config c = config_of(48, 6, 2, 10, 7);
    const mha::packed_batch batch({30, 5, 41}, {30, 5, 41});
    const bmat x = normal_bf16(rnd, 48, 76);
    {
        c.attention.softcap = 1.5;
        const mha::attention_parameters<float> p = parameters_for(c, 42);
        check_layer(mha::multi_head_attention_bf16(c, p), p, x, batch, mha::causal{}, causal,
                    "softcap");
    }
    {
        c.attention.softcap.reset();
        c.attention.alibi_slopes = mha::alibi_slopes(6);
        const mha::attention_parameters<float> p = parameters_for(c, 43);
        check_layer(mha::multi_head_attention_bf16(c, p), p, x, batch, mha::causal{}, causal,
                    "alibi");
    }
    {
        c.attention.alibi_slopes.clear();
        c.attention.sinks = {-0.5, 0.0, 0.5, 1.0, -1.0, 2.0};
        c.rotary = rope_of(0, false);
        const mha::attention_parameters<float> p = parameters_for(c, 44);
        check_layer(mha::multi_head_attention_bf16(c, p), p, x, batch, mha::causal{}, causal,
                    "sinks, rotary");
    }
}

TEST_CASE("bf16 layer: a query with no key gives exactly the output bias") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(8);
    for (bool bias : {false, true}) {
        mha::attention_config c = config_of(32, 4);
        c.bias = bias;
        const mha::attention_parameters<float> p = parameters_for(c, 4);
        const mha::multi_head_attention_bf16 layer(c, p);
        const mha::packed_batch batch({10, 6}, {10, 6});
        const bmat x = normal_bf16(rnd, 32, 16);
        // The second sequence has no key: its heads are exactly 0, so its output is the fp32
        // sum of zero products started from b_o, i.e. b_o (0 without bias).
        const mha::matrix<float> out = layer.forward(x, batch, mha::key_lengths{{10, 0}});
        const mha::vector<float> expected = bias ? p.b_o : mha::vector<float>::Zero(32);
        for (Index j = 10; j < 16; ++j) {
            INFO("bias " << bias << ", column " << j);
            CHECK(out.col(j) == expected);
        }
        CHECK(out.leftCols(10).allFinite());
    }
}

TEST_CASE("bf16 layer: close to the fp32 layer with the same parameters (smoke check)") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // Not the accuracy claim (that is the stage-by-stage case above): bf16 weights, Q, K, V, P
    // and heads each round at 2⁻⁸ relative, which over the layer's three products gives errors
    // of a few 2⁻⁸ of the output scale for these unit-variance inputs. 2⁻⁶ of the largest fp32
    // output (four such roundings) catches a wrong head, weight block or bias, which move the
    // output by its own scale.
    mha_test::value_source rnd(9);
    mha::attention_config c = config_of(64, 8, 4);
    const mha::multi_head_attention<float> fp32(c, parameters_for(c, 5));
    const mha::multi_head_attention_bf16 layer(fp32);
    const mha::packed_batch batch({60, 30}, {60, 30});
    const bmat x = normal_bf16(rnd, 64, 90);
    const mha::matrix<float> a = layer.forward(x, batch, mha::causal{});
    const mha::matrix<float> b = fp32.forward(x.cast<float>(), batch, mha::causal{});
    const float scale = b.cwiseAbs().maxCoeff();
    CHECK((a - b).cwiseAbs().maxCoeff() <= 0x1.0p-6f * scale);
}

TEST_CASE("bf16 layer: 1 and 2 threads give the same bits") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
#if defined(_OPENMP)
    mha_test::value_source rnd(10);
    const mha::attention_config c = config_of(64, 4, 2);
    const mha::multi_head_attention_bf16 layer(c, parameters_for(c, 6));
    const mha::packed_batch batch({130, 70}, {130, 70});
    const bmat x = normal_bf16(rnd, 64, 200);
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const mha::matrix<float> one = layer.forward(x, batch, mha::causal{});
    omp_set_num_threads(2);
    const mha::matrix<float> two = layer.forward(x, batch, mha::causal{});
    omp_set_num_threads(saved);
    CHECK(same_bits(one, two));
#else
    SKIP("built without OpenMP");
#endif
}

TEST_CASE("bf16 layer: cross-attention and unfused weights equal their composition") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(11);
    mha::attention_config c = config_of(32, 4);
    c.key_input_dim = 20;
    c.value_input_dim = 12;
    const mha::attention_parameters<float> p = parameters_for(c, 7);
    const mha::multi_head_attention_bf16 layer(c, p);
    const mha::packed_batch batch({9, 14}, {25, 6});
    const bmat xq = normal_bf16(rnd, 32, 23), xk = normal_bf16(rnd, 20, 31),
               xv = normal_bf16(rnd, 12, 31);
    mha::bf16_linear_workspace lw;
    bmat q(32, 23), k(32, 31), v(32, 31), heads(32, 23);
    mha::linear(bmat(p.w_q.cast<bf16>()), p.b_q, xq, q, lw);
    mha::linear(bmat(p.w_k.cast<bf16>()), p.b_k, xk, k, lw);
    mha::linear(bmat(p.w_v.cast<bf16>()), p.b_v, xv, v, lw);
    mha::multi_head_attention_core(q, k, v, 4, batch, heads, mha::causal{});
    mha::matrix<float> composed(32, 23);
    mha::linear(bmat(p.w_o.cast<bf16>()), p.b_o, heads, composed, lw);
    CHECK(same_bits(layer.forward(xq, xk, xv, batch, mha::causal{}), composed));
    // Cross-attention with fused weights (kdim = vdim = E) takes the three slices of them.
    const mha::attention_config f = config_of(32, 4);
    const mha::attention_parameters<float> pf = parameters_for(f, 8);
    const mha::multi_head_attention_bf16 fused(f, pf);
    const bmat xk32 = normal_bf16(rnd, 32, 31);
    mha::linear(bmat(pf.w_q.cast<bf16>()), pf.b_q, xq, q, lw);
    mha::linear(bmat(pf.w_k.cast<bf16>()), pf.b_k, xk32, k, lw);
    mha::linear(bmat(pf.w_v.cast<bf16>()), pf.b_v, xk32, v, lw);
    mha::multi_head_attention_core(q, k, v, 4, batch, heads, mha::causal{});
    mha::linear(bmat(pf.w_o.cast<bf16>()), pf.b_o, heads, composed, lw);
    CHECK(same_bits(fused.forward(xq, xk32, xk32, batch, mha::causal{}), composed));
}

TEST_CASE("bf16 layer: weights packed once give the composition's bits, and no call packs them") {
    // The layer keeps its weights in the GEMM's pair panels (detail::bf16_packed_matrix); the
    // composition of public mha::linear calls packs them per call. Same bits either way. With
    // E = 128 every stacked block (Q, K, V rows of the fused weights, used whole by
    // self-attention and as blocks by cross-attention) starts on a 64-row panel, so no call
    // packs a weight: the workspace's packing buffer stays empty. With E = 96 the K and V blocks
    // do not, and cross-attention packs those per call (same bits again).
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(12);
    for (const Index e : {Index(128), Index(96)}) {
        INFO("E = " << e);
        const mha::attention_config c = config_of(e, 4);
        const mha::attention_parameters<float> p = parameters_for(c, 9);
        const mha::multi_head_attention_bf16 layer(c, p);
        const mha::packed_batch cross({9, 14}, {25, 6}), self({16, 14}, {16, 14});
        const bmat xq = normal_bf16(rnd, e, 23), xk = normal_bf16(rnd, e, 31),
                   x = normal_bf16(rnd, e, 30);
        mha::bf16_linear_workspace lw;
        bmat q(e, 23), k(e, 31), v(e, 31), heads(e, 23);
        mha::linear(bmat(p.w_q.cast<bf16>()), p.b_q, xq, q, lw);
        mha::linear(bmat(p.w_k.cast<bf16>()), p.b_k, xk, k, lw);
        mha::linear(bmat(p.w_v.cast<bf16>()), p.b_v, xk, v, lw);
        mha::multi_head_attention_core(q, k, v, 4, cross, heads, mha::causal{});
        mha::matrix<float> composed(e, 23);
        mha::linear(bmat(p.w_o.cast<bf16>()), p.b_o, heads, composed, lw);
        mha::bf16_forward_workspace ws_cross, ws_self;
        mha::matrix<float> out(e, 23);
        layer.forward_into(xq, xk, xk, cross, mha::causal{}, out, ws_cross);
        CHECK(same_bits(out, composed));

        bmat qs(e, 30), ks(e, 30), vs(e, 30), heads_self(e, 30);
        mha::linear(bmat(p.w_q.cast<bf16>()), p.b_q, x, qs, lw);
        mha::linear(bmat(p.w_k.cast<bf16>()), p.b_k, x, ks, lw);
        mha::linear(bmat(p.w_v.cast<bf16>()), p.b_v, x, vs, lw);
        mha::multi_head_attention_core(qs, ks, vs, 4, self, heads_self, mha::causal{});
        mha::matrix<float> composed_self(e, 30), out_self(e, 30);
        mha::linear(bmat(p.w_o.cast<bf16>()), p.b_o, heads_self, composed_self, lw);
        layer.forward_into(x, self, mha::causal{}, out_self, ws_self);
        CHECK(same_bits(out_self, composed_self));
        // Where the layer's products take the vdpbf16ps tiles (AMX packs its own tiles).
        const bool native_here =
            mha::detail::default_bf16_kernel != mha::detail::bf16_kernel::portable &&
            mha_test::bf16_native_available() && !mha_test::bf16_amx_available();
        if (native_here) {
            CHECK(ws_self.linear.gemm().packed_a.empty());
            if (e % 64 == 0) CHECK(ws_cross.linear.gemm().packed_a.empty());
        }
    }
}

TEST_CASE("bf16 layer: parameters() gives the weights rounded once and the biases unchanged") {
    mha::attention_config c = config_of(24, 3, 1, 6, 5);
    c.value_input_dim = 10;
    const mha::attention_parameters<float> p = parameters_for(c, 12);
    const mha::attention_parameters<float> s = mha::multi_head_attention_bf16(c, p).parameters();
    const auto rounded = [](const mha::matrix<float>& w) {
        return mha::matrix<float>(w.cast<bf16>().cast<float>());
    };
    CHECK(s.w_q == rounded(p.w_q));
    CHECK(s.w_k == rounded(p.w_k));
    CHECK(s.w_v == rounded(p.w_v));
    CHECK(s.w_o == rounded(p.w_o));
    CHECK(s.b_q == p.b_q);
    CHECK(s.b_k == p.b_k);
    CHECK(s.b_v == p.b_v);
    CHECK(s.b_o == p.b_o);
}

TEST_CASE("bf16 layer: refuses what the bf16 kernels do not run, naming the field") {
    using Catch::Matchers::ContainsSubstring;
    const mha::attention_config base = config_of(16, 2);
    const mha::attention_parameters<float> p = parameters_for(base, 9);
    auto refuses = [&](mha::attention_config c, const char* field) {
        INFO(field);
        CHECK_THROWS_WITH(mha::multi_head_attention_bf16(c, p), ContainsSubstring(field));
        CHECK_THROWS_AS(mha::multi_head_attention_bf16(c, p), mha::value_error);
    };
    mha::attention_config c = base;
    c.attention.normalize = mha::normalization::relu;
    refuses(c, "config.attention.normalize");
    c = base;
    c.attention.algorithm = mha::attention_algorithm::materialized;
    refuses(c, "config.attention.algorithm");
}

TEST_CASE("bf16 layer: shape errors name the argument") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    using Catch::Matchers::ContainsSubstring;
    const mha::attention_config c = config_of(16, 2);
    const mha::multi_head_attention_bf16 layer(c, parameters_for(c, 10));
    const bmat x = bmat::Zero(16, 8), narrow = bmat::Zero(12, 8);
    const mha::packed_batch batch({5, 3}, {5, 3});
    CHECK_THROWS_WITH(layer.forward(narrow, batch), ContainsSubstring("query.rows()"));
    CHECK_THROWS_WITH(layer.forward(x, mha::packed_batch({5, 4}, {5, 4})),
                      ContainsSubstring("query.cols()"));
    mha::matrix<float> out(16, 7);
    mha::bf16_forward_workspace ws;
    CHECK_THROWS_WITH(layer.forward_into(x, batch, {}, out, ws), ContainsSubstring("out.cols()"));
    mha::matrix<float> tall(17, 8);
    CHECK_THROWS_WITH(layer.forward_into(x, batch, {}, tall, ws), ContainsSubstring("out.rows()"));
    CHECK_THROWS_WITH(layer.forward(x, batch, mha::key_lengths{{5}}),
                      ContainsSubstring("key_lengths"));
    mha::attention_parameters<float> bad = parameters_for(c, 11);
    bad.w_o.resize(16, 15);
    CHECK_THROWS_WITH(mha::multi_head_attention_bf16(c, bad), ContainsSubstring("w_o"));
}

// (2) Decoding with a bf16 cache.
//
// Method, as for forward: a step is the composition of the public pieces with the cache's
// columns as keys and values. Each step recomputes that composition from the whole sequence's
// projection (its K and V columns must be the cache's, bit for bit: the projection is column by
// column), requires the step's output to equal it bit for bit, and checks the core of the step
// against the long-double reference with the bf16 core's bound (require_bf16_attention_close),
// the keys each new token may see given by positions: key p is visible from token t when
// t − W < p ≤ t (W = the window, or every earlier token without one).
namespace {

// Decodes x (E × T) in steps of the given sizes through `cache`, checking each step.
void check_decode_steps(const mha::multi_head_attention_bf16& layer,
                        const mha::attention_parameters<float>& p, const bmat& x,
                        const std::vector<Index>& steps, mha::kv_cache<bf16>& cache,
                        const std::string& what) {
    const mha::attention_config& c = layer.config();
    const Index heads = c.num_heads, kv = c.num_kv_heads, dk = c.head_dim, dv = c.value_head_dim;
    const Index qk = layer.qk_width(), kw = layer.key_width(), vw = layer.value_width();
    const Index window = cache.window();
    // Every token's Q, K, V, token t at position t (the cache starts empty and keeps counting
    // positions past its window): (H·d_k + H_kv·d_k + H_kv·d_v) × T.
    const bmat qkv =
        input_projection(layer, p, x, mha::packed_batch::single(x.cols(), x.cols()), what);
    mha::bf16_linear_workspace lw;
    const bmat w_o = p.w_o.cast<bf16>();  // E × H·d_v
    const long double scale = 1.0L / std::sqrt(static_cast<long double>(dk));
    const float scale32 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dk)));
    mha::bf16_forward_workspace ws;
    Index t0 = 0;
    for (const Index n : steps) {
        const std::string step =
            what + ", step of " + std::to_string(n) + " at " + std::to_string(t0);
        INFO(step);
        mha::matrix<float> out(c.embed_dim, n);
        layer.decode_into(x.middleCols(t0, n), cache, out, ws);
        REQUIRE(cache.position() == t0 + n);
        const Index first = cache.first_position(), size = cache.size();
        REQUIRE(first + size == t0 + n);
        CHECK(cache.keys() == qkv.block(qk, first, kw, size));
        CHECK(cache.values() == qkv.block(qk + kw, first, vw, size));

        // The composition: the core over the cached tokens, then the output projection.
        const bmat q = qkv.block(0, t0, qk, n);
        const bmat k = qkv.block(qk, first, kw, size), v = qkv.block(qk + kw, first, vw, size);
        const mha::attention_mask<float> mask =
            window > 0 ? mha::attention_mask<float>(mha::sliding_window{window - 1, 0})
                       : mha::attention_mask<float>(mha::causal{});
        bmat heads16(heads * dv, n);  // H·d_v × n
        mha::multi_head_attention_core(q, k, v, heads, kv, mha::packed_batch::single(n, size),
                                       heads16, mask, c.attention);
        mha::matrix<float> composed(c.embed_dim, n);
        mha::linear(w_o, p.b_o, heads16, composed, lw);
        CHECK(same_bits(out, composed));

        const Index w = window > 0 ? window : t0 + n + 1;
        auto ok = [&](Index j, Index i) {
            const Index key = first + j, token = t0 + i;
            return key <= token && key > token - w;
        };
        for (Index h = 0; h < heads; ++h) {
            const Index g = mha_test::reference_kv_head(h, heads, kv);
            const mat<long double> ql = widen(q.middleRows(h * dk, dk));
            const mat<long double> kl = widen(k.middleRows(g * dk, dk));
            const mat<long double> vl = widen(v.middleRows(g * dv, dv));
            const core_reference ref = reference_core(c.attention, h, ql, kl, vl, scale, ok);
            mha_test::require_bf16_attention_close(
                mat<float>(heads16.middleRows(h * dv, dv).cast<float>()), ref.out, ql, kl, vl,
                scale32, ok, ref.magnitude, step + ", head " + std::to_string(h), true);
        }
        t0 += n;
    }
}

}  // namespace

TEST_CASE("bf16 layer: decode steps equal their composition over the bf16 cache") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(20);
    {
        // Grouped heads, d_k ≠ d_v, biases: a prefill, single tokens, a draft of three.
        const mha::attention_config c = config_of(48, 6, 2, 10, 7);
        const mha::attention_parameters<float> p = parameters_for(c, 21);
        const mha::multi_head_attention_bf16 layer(c, p);
        const bmat x = normal_bf16(rnd, 48, 90);
        mha::kv_cache<bf16> cache = layer.make_cache();
        REQUIRE(cache.key_rows() == 2 * 10);
        REQUIRE(cache.value_rows() == 2 * 7);
        check_decode_steps(layer, p, x, {70, 1, 1, 3, 1, 1, 13}, cache, "grouped, no window");
    }
    {
        // A window of 9 tokens: the cache drops tokens and moves its columns to the front.
        mha::attention_config c = config_of(32, 4);
        c.bias = false;
        const mha::attention_parameters<float> p = parameters_for(c, 22);
        const mha::multi_head_attention_bf16 layer(c, p);
        const bmat x = normal_bf16(rnd, 32, 40);
        mha::kv_cache_options options;
        options.window = 9;
        mha::kv_cache<bf16> cache = layer.make_cache(options);
        cache.reserve(12);
        check_decode_steps(layer, p, x, {5, 1, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6},
                           cache, "window 9");
    }
}

TEST_CASE("bf16 layer: rotary decode steps equal their composition, positions past the window") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(38);
    {
        mha::attention_config c = config_of(48, 6, 2, 10, 7);
        c.rotary = rope_of(6, true);
        const mha::attention_parameters<float> p = parameters_for(c, 39);
        const mha::multi_head_attention_bf16 layer(c, p);
        const bmat x = normal_bf16(rnd, 48, 90);
        mha::kv_cache<bf16> cache = layer.make_cache();
        check_decode_steps(layer, p, x, {70, 1, 1, 3, 1, 13}, cache, "rotary, grouped");
    }
    {
        // A window of 9: the cache drops tokens, the positions keep counting.
        mha::attention_config c = config_of(32, 4);
        c.rotary = rope_of(0, false);
        const mha::attention_parameters<float> p = parameters_for(c, 40);
        const mha::multi_head_attention_bf16 layer(c, p);
        const bmat x = normal_bf16(rnd, 32, 30);
        mha::kv_cache_options options;
        options.window = 9;
        mha::kv_cache<bf16> cache = layer.make_cache(options);
        check_decode_steps(layer, p, x, {5, 1, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6}, cache,
                           "rotary, window 9");
    }
}

TEST_CASE("bf16 layer: decode steps with score terms equal their composition") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    // A one-token step with grouped heads stacks each group's query heads into one problem with
    // soft-capping alone; with ALiBi or sinks one problem per head. Both against the reference.
    mha_test::value_source rnd(45);
    const bmat x = normal_bf16(rnd, 48, 60);
    mha::attention_config c = config_of(48, 6, 2, 10, 7);
    c.attention.softcap = 2.0;
    {
        const mha::attention_parameters<float> p = parameters_for(c, 46);
        const mha::multi_head_attention_bf16 layer(c, p);
        mha::kv_cache<bf16> cache = layer.make_cache();
        check_decode_steps(layer, p, x, {40, 1, 1, 3, 1, 14}, cache, "softcap");
    }
    c.attention.alibi_slopes = mha::alibi_slopes(6);
    c.attention.sinks = {-0.5, 0.0, 0.5, 1.0, -1.0, 2.0};
    {
        const mha::attention_parameters<float> p = parameters_for(c, 47);
        const mha::multi_head_attention_bf16 layer(c, p);
        mha::kv_cache_options options;
        options.window = 9;
        mha::kv_cache<bf16> cache = layer.make_cache(options);
        check_decode_steps(layer, p, x, {20, 1, 1, 2, 1, 1, 1, 1, 1, 1, 30}, cache,
                           "softcap + alibi + sinks, window 9");
    }
}

TEST_CASE("bf16 layer: a batched decode step equals one step per sequence") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    mha_test::value_source rnd(23);
    const mha::attention_config c = config_of(32, 4, 2);
    const mha::multi_head_attention_bf16 layer(c, parameters_for(c, 24));
    const bmat prompt_a = normal_bf16(rnd, 32, 30), prompt_b = normal_bf16(rnd, 32, 7);
    mha::kv_cache<bf16> a = layer.make_cache(), b = layer.make_cache();
    mha::kv_cache<bf16> a1 = layer.make_cache(), b1 = layer.make_cache();
    (void)layer.decode(prompt_a, a);
    (void)layer.decode(prompt_b, b);
    (void)layer.decode(prompt_a, a1);
    (void)layer.decode(prompt_b, b1);
    // Sequence a adds 2 tokens, an idle sequence adds none, sequence b adds 1.
    mha::kv_cache<bf16> idle = layer.make_cache();
    const bmat x = normal_bf16(rnd, 32, 3);
    const mha::matrix<float> both = layer.decode(x, {2, 0, 1}, {&a, &idle, &b});
    const mha::matrix<float> one_a = layer.decode(x.leftCols(2), a1);
    const mha::matrix<float> one_b = layer.decode(x.rightCols(1), b1);
    CHECK(same_bits(mha::matrix<float>(both.leftCols(2)), one_a));
    CHECK(same_bits(mha::matrix<float>(both.rightCols(1)), one_b));
    CHECK(idle.empty());
    CHECK(a.keys() == a1.keys());
    CHECK(b.values() == b1.values());
}

TEST_CASE("bf16 layer: decode errors name the argument and change no cache") {
    MHA_SKIP_UNLESS_BUILD_RUNS_HERE();
    using Catch::Matchers::ContainsSubstring;
    const mha::attention_config c = config_of(16, 2);
    const mha::multi_head_attention_bf16 layer(c, parameters_for(c, 25));
    const bmat x = bmat::Zero(16, 3);
    mha::kv_cache<bf16> cache = layer.make_cache();
    (void)layer.decode(x, cache);
    mha::kv_cache<bf16> narrow(8, 16);
    CHECK_THROWS_WITH(layer.decode(x, narrow), ContainsSubstring("caches[0]->key_rows()"));
    CHECK_THROWS_WITH(layer.decode(bmat::Zero(15, 1), cache), ContainsSubstring("x.rows()"));
    mha::kv_cache<bf16> other = layer.make_cache();
    CHECK_THROWS_WITH(layer.decode(x, {2, 2}, {&cache, &other}), ContainsSubstring("x.cols()"));
    CHECK_THROWS_WITH(layer.decode(x, {2, 1}, {&cache, &cache}), ContainsSubstring("caches[1]"));
    mha::kv_cache_options fixed;
    fixed.growable = false;
    mha::kv_cache<bf16> full(layer.key_width(), layer.value_width(), fixed);
    full.reserve(2);
    CHECK_THROWS_AS(layer.decode(x, full), mha::shape_error);
    CHECK(full.empty());
    CHECK(other.empty());
    CHECK(cache.size() == 3);
    mha::attention_config cross = config_of(16, 2);
    cross.key_input_dim = 12;
    const mha::multi_head_attention_bf16 cross_layer(cross, parameters_for(cross, 26));
    mha::kv_cache<bf16> cross_cache = cross_layer.make_cache();
    CHECK_THROWS_WITH(cross_layer.decode(x, cross_cache), ContainsSubstring("key_input_dim"));
}
