// SPDX-License-Identifier: MIT
// The fuzzing oracle: decodes a problem (shapes ≤ 64, grouped key/value heads, masks, values,
// tile sizes, soft-capping, ALiBi and sinks) from raw bytes, runs the attention core through the
// tiled and the materialised kernels, and checks invariants that hold for every input, among
// them agreement with the long-double reference of tests/support/reference.hpp. Shared by the
// libFuzzer harness and the corpus replay test, so every corpus file is also checked in the
// ordinary test run.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <mha/mha.hpp>

#include "reference.hpp"

namespace mha_fuzz {

using mha::Index;

/// Reads bytes from the input; past its end it yields zeros, so every input decodes to a problem.
class byte_reader {
public:
    byte_reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
    std::uint8_t byte() { return at_ < size_ ? data_[at_++] : 0; }
    /// An integer in [lo, hi].
    Index in_range(Index lo, Index hi) { return lo + static_cast<Index>(byte()) % (hi - lo + 1); }
    bool flag() { return (byte() & 1) != 0; }
    std::uint64_t seed() {
        std::uint64_t s = 0;
        for (int i = 0; i < 8; ++i)
            s = (s << 8) | byte();
        return s;
    }

private:
    const std::uint8_t* data_;
    std::size_t size_;
    std::size_t at_ = 0;
};

/// splitmix64: cheap, portable values from a seed taken from the input.
class value_stream {
public:
    explicit value_stream(std::uint64_t seed) : state_(seed) {}
    std::uint64_t next() {
        std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    /// Uniform in [-amplitude, amplitude).
    float uniform(float amplitude) {
        const double unit = static_cast<double>(next() >> 11) * 0x1.0p-53;
        return static_cast<float>((2 * unit - 1) * amplitude);
    }

private:
    std::uint64_t state_;
};

/// The decoded problem, with the mask kept both as library types and as plain parameters from
/// which `allowed` recomputes permissions by explicit formulas.
struct problem {
    Index heads = 1, dk = 1, dv = 1;
    /// Divides heads; query head h reads key/value head h / (heads / kv_heads).
    Index kv_heads = 1;
    std::vector<Index> lq, lk;
    bool causal = false, top_left = false;
    std::optional<std::pair<Index, Index>> window;
    std::vector<Index> key_len;            // empty: no key_lengths mask
    std::vector<mha::bool_matrix> keep;    // per sequence, or empty
    std::vector<mha::matrix<float>> bias;  // per sequence, or empty
    float amplitude = 1;
    std::uint64_t seed = 0;
    mha::detail::tiled_settings tiles;
    // Score terms (attention_options): soft-capping, one ALiBi slope and one sink per query head.
    std::optional<double> softcap;
    std::vector<double> alibi, sinks;

    bool has_terms() const { return softcap || !alibi.empty() || !sinks.empty(); }

    /// The options carrying the score terms (softmax, the rest default).
    mha::attention_options options() const {
        mha::attention_options o;
        o.softcap = softcap;
        o.alibi_slopes = alibi;
        o.sinks = sinks;
        return o;
    }

    /// The largest magnitude the score terms add to the score of query i and key j of sequence b
    /// (check A's Smax, as tests/test_score_modifiers.cpp counts them): the cap, |ALiBi| and
    /// |sink|, each of which adds O(u) relative to its magnitude.
    float term_magnitude(std::size_t b, Index h, Index j, Index i) const {
        float m = softcap ? static_cast<float>(*softcap) : 0.f;
        if (!alibi.empty())
            m += std::fabs(static_cast<float>(alibi[static_cast<std::size_t>(h)]) *
                           static_cast<float>(j - i - (lk[b] - lq[b])));
        if (!sinks.empty()) m += std::fabs(static_cast<float>(sinks[static_cast<std::size_t>(h)]));
        return m;
    }

    Index kv_head(Index h) const { return h / (heads / kv_heads); }

    bool allowed(std::size_t b, Index j, Index i) const {
        const Index offset = top_left ? 0 : lk[b] - lq[b];
        if (causal && j > i + offset) return false;
        if (window && (j < i + offset - window->first || j > i + offset + window->second))
            return false;
        if (!key_len.empty() && j >= key_len[b]) return false;
        if (!keep.empty() && !keep[b](j, i)) return false;
        if (!bias.empty() && bias[b](j, i) == -std::numeric_limits<float>::infinity()) return false;
        return true;
    }

    mha::attention_mask<float> mask() const {
        mha::attention_mask<float> m;
        if (causal)
            m.add(mha::causal{top_left ? mha::causal_alignment::top_left
                                       : mha::causal_alignment::bottom_right});
        if (window)
            m.add(mha::sliding_window{
                window->first, window->second,
                top_left ? mha::causal_alignment::top_left : mha::causal_alignment::bottom_right});
        if (!key_len.empty()) m.add(mha::key_lengths{key_len});
        if (!keep.empty()) m.add(mha::keep_mask(keep));
        if (!bias.empty()) m.add(mha::additive_bias<float>(bias));
        return m;
    }
};

inline problem decode(const std::uint8_t* data, std::size_t size) {
    byte_reader in(data, size);
    problem p;
    const Index batch = in.in_range(0, 3);
    p.heads = in.in_range(1, 4);
    p.dk = in.in_range(1, 16);
    p.dv = in.in_range(1, 16);
    const bool self = in.flag();
    for (Index b = 0; b < batch; ++b) {
        p.lq.push_back(in.in_range(0, 40));
        p.lk.push_back(self ? p.lq.back() : in.in_range(0, 64));
    }
    const std::uint8_t masks = in.byte();
    p.causal = (masks & 1) != 0;
    p.top_left = (masks & 2) != 0;
    if ((masks & 4) != 0) p.window = std::make_pair(in.in_range(0, 9), in.in_range(0, 9));
    if ((masks & 8) != 0)
        for (Index b = 0; b < batch; ++b)
            p.key_len.push_back(in.in_range(0, p.lk[static_cast<std::size_t>(b)]));
    const std::uint64_t mask_seed = in.seed();
    value_stream bits(mask_seed);
    if ((masks & 16) != 0)
        for (Index b = 0; b < batch; ++b) {
            const auto s = static_cast<std::size_t>(b);
            mha::bool_matrix k(p.lk[s], p.lq[s]);
            for (Index i = 0; i < k.size(); ++i)
                k(i) = (bits.next() % 4) != 0;  // 3/4 kept
            p.keep.push_back(k);
        }
    if ((masks & 32) != 0)
        for (Index b = 0; b < batch; ++b) {
            const auto s = static_cast<std::size_t>(b);
            mha::matrix<float> m(p.lk[s], p.lq[s]);
            for (Index i = 0; i < m.size(); ++i)
                m(i) = (bits.next() % 8) == 0 ? -std::numeric_limits<float>::infinity()
                                              : bits.uniform(3);
            p.bias.push_back(m);
        }
    // Amplitudes up to 64 give logits in the thousands: the online max must keep exp in range.
    static const float amplitudes[] = {0.5f, 1, 2, 4, 8, 64};
    p.amplitude = amplitudes[in.in_range(0, 5)];
    p.tiles.query_block = in.in_range(1, 9);
    p.tiles.key_block = in.in_range(1, 17);
    p.tiles.split_chunk = p.tiles.key_block * in.in_range(1, 3);
    p.seed = in.seed();
    // Grouped heads came after the corpus: the trailer "GQ" and a byte choosing num_kv_heads among
    // the divisors of heads. Without it (as in every earlier corpus file, checked when this was
    // added) an input decodes as before, one key/value head per query head.
    p.kv_heads = p.heads;
    if (in.byte() == 'G' && in.byte() == 'Q') {
        std::vector<Index> divisors;
        for (Index d = 1; d <= p.heads; ++d)
            if (p.heads % d == 0) divisors.push_back(d);
        p.kv_heads = divisors[static_cast<std::size_t>(in.byte()) % divisors.size()];
    }
    // Score terms came after grouped heads: the trailer "ST" (after the grouped-heads trailer or
    // one byte that does not start it), a byte of flags (1 soft-capping, 2 ALiBi, 4 sinks) and a
    // byte per term. Without it (every earlier corpus file, checked when this was added) an input
    // decodes as before, with no score terms.
    if (in.byte() == 'S' && in.byte() == 'T') {
        const std::uint8_t terms = in.byte();
        value_stream term_values(p.seed ^ 0x7E4A5C0FFEEull);
        if ((terms & 1) != 0) {
            static const double caps[] = {0.25, 1, 2.5, 5, 20, 50};
            p.softcap = caps[in.in_range(0, 5)];
        }
        if ((terms & 2) != 0) {
            // The standard slopes (mha::alibi_slopes), or any in [-1, 1).
            if (in.flag())
                p.alibi = mha::alibi_slopes(p.heads);
            else
                for (Index h = 0; h < p.heads; ++h)
                    p.alibi.push_back(static_cast<double>(term_values.uniform(1)));
        }
        if ((terms & 4) != 0) {
            static const float sink_amplitudes[] = {0.5f, 2, 8, 40};
            const float amplitude = sink_amplitudes[in.in_range(0, 3)];
            for (Index h = 0; h < p.heads; ++h)
                p.sinks.push_back(static_cast<double>(term_values.uniform(amplitude)));
        }
    }
    return p;
}

struct inputs {
    mha::matrix<float> q, k, v;
};

inline inputs make_inputs(const problem& p) {
    value_stream values(p.seed);
    Index nq = 0, nk = 0;
    for (std::size_t b = 0; b < p.lq.size(); ++b) {
        nq += p.lq[b];
        nk += p.lk[b];
    }
    inputs x{mha::matrix<float>(p.heads * p.dk, nq), mha::matrix<float>(p.kv_heads * p.dk, nk),
             mha::matrix<float>(p.kv_heads * p.dv, nk)};
    for (Index i = 0; i < x.q.size(); ++i)
        x.q(i) = values.uniform(p.amplitude);
    for (Index i = 0; i < x.k.size(); ++i)
        x.k(i) = values.uniform(p.amplitude);
    for (Index i = 0; i < x.v.size(); ++i)
        x.v(i) = values.uniform(4);
    return x;
}

struct run_result {
    mha::matrix<float> out;
    std::vector<mha::matrix<float>> weights;
};

inline run_result run_tiled(const problem& p, const inputs& x, bool with_weights) {
    const mha::packed_batch batch(p.lq, p.lk);
    run_result r{mha::matrix<float>(p.heads * p.dv, x.q.cols()), {}};
    const float scale = 1.0f / std::sqrt(static_cast<float>(p.dk));
    const mha::attention_mask<float> mask = p.mask();
    const mha::attention_options options = p.options();
    const mha::detail::attention_problem<float> problem{
        x.q,
        x.k,
        x.v,
        r.out,
        {p.heads, p.kv_heads, p.dk, p.dv},
        batch,
        mask,
        scale,
        mha::normalization::softmax,
        {with_weights ? mha::weights_mode::per_head : mha::weights_mode::none},
        nullptr,
        p.has_terms() ? &options : nullptr};
    mha::attention_outputs<float> outputs;
    mha::detail::size_outputs(problem, outputs);
    mha::detail::tiled_attention(problem, outputs, p.tiles);
    r.weights = std::move(outputs.weights);
    return r;
}

inline run_result run_materialized(const problem& p, const inputs& x) {
    run_result r{mha::matrix<float>(p.heads * p.dv, x.q.cols()), {}};
    mha::attention_options options = p.options();
    options.algorithm = mha::attention_algorithm::materialized;
    r.weights = mha::multi_head_attention_core(x.q, x.k, x.v, p.heads, p.kv_heads,
                                               mha::packed_batch(p.lq, p.lk), r.out, p.mask(),
                                               options, {mha::weights_mode::per_head})
                    .weights;
    return r;
}

/// Entries of m's block (row, col, rows × cols) as T, copied one by one: a block of a matrix
/// without storage would offset a null pointer.
template <class T>
mha_test::mat<T> copy_block(const mha::matrix<float>& m, Index row, Index col, Index rows,
                            Index cols) {
    mha_test::mat<T> r(rows, cols);
    for (Index c = 0; c < cols; ++c)
        for (Index i = 0; i < rows; ++i)
            r(i, c) = static_cast<T>(m(row + i, col + c));
    return r;
}

/// q_i·k_j of query head h (column `qc` of Q) and key/value head g (column `kc` of K) in long
/// double, and Σ_c |q_c·k_c|, the size its rounding is proportional to.
inline std::pair<long double, long double> query_key_product(const inputs& x, const problem& p,
                                                             Index h, Index g, Index qc, Index kc) {
    long double dot = 0, magnitude = 0;
    for (Index c = 0; c < p.dk; ++c) {
        const long double t = static_cast<long double>(x.q(h * p.dk + c, qc)) *
                              static_cast<long double>(x.k(g * p.dk + c, kc));
        dot += t;
        magnitude += std::fabs(t);
    }
    return {dot, magnitude};
}

/// dW_ij = Σ_c dO_ci·v_cj, the gradient of attention weight (i, j), of query head h (column `qc`
/// of d_out) and key/value head g (column `kc` of V) in long double, and Σ_c |dO_ci·v_cj|, the
/// size its rounding is proportional to.
inline std::pair<long double, long double> value_gradient_product(const inputs& x,
                                                                  const mha::matrix<float>& d_out,
                                                                  const problem& p, Index h,
                                                                  Index g, Index qc, Index kc) {
    long double dot = 0, magnitude = 0;
    for (Index c = 0; c < p.dv; ++c) {
        const long double t = static_cast<long double>(d_out(h * p.dv + c, qc)) *
                              static_cast<long double>(x.v(g * p.dv + c, kc));
        dot += t;
        magnitude += std::fabs(t);
    }
    return {dot, magnitude};
}

/// max_c |m(row + c, col)| over c < rows, in long double: the size of one head's slice of a column.
inline long double column_max_abs(const mha::matrix<float>& m, Index row, Index rows, Index col) {
    long double r = 0;
    for (Index c = 0; c < rows; ++c)
        r = std::max(r, std::fabs(static_cast<long double>(m(row + c, col))));
    return r;
}

/// γ_n = n·u / (1 − n·u) for float's unit roundoff u: the relative bound of n rounded operations.
inline long double rounding_gamma(Index n) {
    const long double u = std::numeric_limits<float>::epsilon() / 2;
    return static_cast<long double>(n) * u / (1 - static_cast<long double>(n) * u);
}

/// The first-order bound on what the tiled softmax backward adds to a head's gradients by
/// recomputing each weight as P̂_ij = exp(Ŝ_ij − lse_i) from the forward's float log-sum-exp
/// instead of normalising its own scores (FlashAttention-2's scheme). Ŝ_ij and the forward's S_ij
/// are each within γ_dk·scale·Σ_c|q_c·k_c| (+ u·|bias|) of the exact score, and lse_i, stored in
/// float, within u·|lse_i| more; so P̂_ij = P_ij·(1 + ε_ij) with |ε_ij| <= E_i = 2·γ_dk·scale·
/// max_j Σ_c|q_c·k_c| + 2u·max_j|bias_ij| + 2u·|lse_i| (first order). A normalisation of its own
/// would cancel ε (the float chain rule's weights sum to 1 whatever its scores' rounding), which
/// is why check B's baseline does not see it: with logits of 10^4 the float chain rule's dV
/// error was 1e-7 where the recomputed weights' was 3e-4. Through the gradients, with
/// W_i = |dO_i|_1·Vmax (|dP_ij|, |D_i| and the forward output's share of D's error are each at
/// most W_i times their relative error):
///   dV_j: Σ_i E_i·P_ij·max_c|dO_ci|        (accumulated per key/value head in floor_v)
///   dK_j: Σ_i scale·max|q_i|·E_i·P_ij·3W_i (floor_k)
///   dQ_i: scale·max_j|k_j|·E_i·3W_i        (returned)
/// The bound is an a-priori worst case (γ_dk, not √dk·u), about 100 times the error measured on
/// the corpus input that showed the effect; at ordinary logits E_i is a few ulp and the floor
/// stays far below a wrong term's size.
template <class Allowed, class Bias>
long double softmax_recompute_bound(const inputs& x, const mha::matrix<float>& d_out,
                                    const problem& p, std::size_t b, Index h, Index q0, Index k0,
                                    float scale, const Allowed& allowed, const Bias& bias,
                                    mha_test::mat<long double>& floor_k,
                                    mha_test::mat<long double>& floor_v) {
    using ld = long double;
    const ld u = std::numeric_limits<float>::epsilon() / 2;
    const ld gamma = rounding_gamma(p.dk);
    const ld sc = static_cast<ld>(scale);
    const Index lq = p.lq[b], lk = p.lk[b], g = p.kv_head(h);
    ld v_max = 0, k_max = 0;
    for (Index j = 0; j < lk; ++j) {
        v_max = std::max(v_max, column_max_abs(x.v, g * p.dv, p.dv, k0 + j));
        k_max = std::max(k_max, column_max_abs(x.k, g * p.dk, p.dk, k0 + j));
    }
    ld dq_floor = 0;
    std::vector<ld> s(static_cast<std::size_t>(lk)), w(static_cast<std::size_t>(lk));
    for (Index i = 0; i < lq; ++i) {
        ld m = -std::numeric_limits<ld>::infinity(), worst = 0;
        const ld q_max = column_max_abs(x.q, h * p.dk, p.dk, q0 + i);
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            if (!allowed(j, i)) continue;
            const auto [dot, magnitude] = query_key_product(x, p, h, g, q0 + i, k0 + j);
            const ld b_ij = bias ? bias(j, i) : 0.0L;
            s[jj] = sc * dot + b_ij;
            worst = std::max(worst, gamma * sc * magnitude + u * std::fabs(b_ij));
            m = std::max(m, s[jj]);
        }
        if (m == -std::numeric_limits<ld>::infinity()) continue;  // no allowed key
        ld sum = 0;
        for (Index j = 0; j < lk; ++j)
            if (allowed(j, i)) sum += std::exp(s[static_cast<std::size_t>(j)] - m);
        const ld lse = m + std::log(sum);
        const ld e = 2 * worst + 2 * u * std::fabs(lse);
        ld do_max = 0, do_sum = 0;
        for (Index c = 0; c < p.dv; ++c) {
            const ld d = std::fabs(static_cast<ld>(d_out(h * p.dv + c, q0 + i)));
            do_max = std::max(do_max, d);
            do_sum += d;
        }
        const ld w_i = do_sum * v_max;
        for (Index j = 0; j < lk; ++j) {
            if (!allowed(j, i)) continue;
            const ld pij = std::exp(s[static_cast<std::size_t>(j)] - lse);
            floor_v(g, k0 + j) += e * pij * do_max;
            floor_k(g, k0 + j) += sc * q_max * e * pij * 3 * w_i;
        }
        dq_floor = std::max(dq_floor, sc * k_max * e * 3 * w_i);
    }
    return dq_floor;
}

/// The first-order bound on what rounding the scores adds to sigmoid's gradients. The float chain
/// rule of check B's baseline rounds the same scores, but in its own order, and may be lucky: a
/// corpus input (amplitude 64, d_k = 8) had one allowed key with s = 2.2 out of terms of size
/// scale·Σ|q_c·k_c| = 2247, where the plain float dot product was 5e-7 from the exact score and
/// the library's (another summation order, with FMA) 3.4e-5, both well inside γ·2247 = 1e-3; dQ
/// then differed from the long-double rule by 37 times the float rule's error. The terms, with
/// w = σ(s) and σ' = w·(1 − w):
///   Δs_ij = γ_{dk+2}·(scale·Σ_c|q_c·k_c| + |bias_ij|)     (the dot product, scale and bias add)
///   δw_ij = σ'_ij·Δs_ij + 4u·w_ij                        (exp, 1 + e and the division)
///   ΔdS_ij = |dW_ij|·(|1 − 2w_ij|·δw_ij + 3u·σ'_ij) + σ'_ij·γ_dv·Σ_c|dO_ci·v_cj|
/// (dS = dW·w·(1 − w), whose 1 − w cancels as w → 1), and through the gradients
///   dV_j: Σ_i δw_ij·max_c|dO_ci|            (accumulated per key/value head in floor_v)
///   dK_j: scale·Σ_i ΔdS_ij·max_c|q_ci|      (floor_k)
///   dQ_i: scale·Σ_j ΔdS_ij·max_c|k_cj|      (returned, the largest over queries)
/// Like softmax_recompute_bound's, an a-priori worst case: at ordinary logits Δs is a few ulp of
/// the score and the floor stays far below a wrong term's size, a fraction of the gradient.
template <class Allowed, class Bias>
long double sigmoid_rounding_bound(const inputs& x, const mha::matrix<float>& d_out,
                                   const problem& p, std::size_t b, Index h, Index q0, Index k0,
                                   float scale, const Allowed& allowed, const Bias& bias,
                                   mha_test::mat<long double>& floor_k,
                                   mha_test::mat<long double>& floor_v) {
    using ld = long double;
    const ld u = std::numeric_limits<float>::epsilon() / 2;
    const ld sc = static_cast<ld>(scale);
    const Index lq = p.lq[b], lk = p.lk[b], g = p.kv_head(h);
    ld dq_floor = 0;
    for (Index i = 0; i < lq; ++i) {
        const ld q_max = column_max_abs(x.q, h * p.dk, p.dk, q0 + i);
        const ld do_max = column_max_abs(d_out, h * p.dv, p.dv, q0 + i);
        ld dq_i = 0;
        for (Index j = 0; j < lk; ++j) {
            if (!allowed(j, i)) continue;
            const auto [dot, magnitude] = query_key_product(x, p, h, g, q0 + i, k0 + j);
            const ld b_ij = bias ? bias(j, i) : 0.0L;
            const ld s = sc * dot + b_ij;
            const ld w = 1 / (1 + std::exp(-s));
            const ld derivative = w * (1 - w);
            const ld ds = rounding_gamma(p.dk + 2) * (sc * magnitude + std::fabs(b_ij));
            const ld dw = derivative * ds + 4 * u * w;
            const auto [d_weight, d_weight_size] =
                value_gradient_product(x, d_out, p, h, g, q0 + i, k0 + j);
            const ld d_score =
                std::fabs(d_weight) * (std::fabs(1 - 2 * w) * dw + 3 * u * derivative) +
                derivative * rounding_gamma(p.dv) * d_weight_size;
            floor_v(g, k0 + j) += dw * do_max;
            floor_k(g, k0 + j) += sc * d_score * q_max;
            dq_i += sc * d_score * column_max_abs(x.k, g * p.dk, p.dk, k0 + j);
        }
        dq_floor = std::max(dq_floor, dq_i);
    }
    return dq_floor;
}

/// The first-order bound on what rounding the scores adds to ReLU's gradients. A query whose
/// positive scores sum to little against their terms' magnitudes is ill-conditioned: with
/// r_j = max(s_j, 0), R = Σ_j r_j and D = Σ_j r_j·dW_j, dS_l = (dW_l·R − D) / R², so a score
/// rounded by Δ_j moves dS_l by Δ_j·(dW_l − dW_j) / R² − 2·dS_l·Δ_j / R. The float chain rule of
/// check B's baseline rounds the same scores in another order and may be lucky: a fuzzed input
/// (d_k = 8, amplitude 0.5) had two positive scores, 9.3e-4 and 3.3e-4, out of terms of size
/// 0.21 and 0.16 (`regression_relu_small_positive_scores`); dQ was 14 times as far from the
/// long-double rule as the float rule, 3 times the floor of dS's own rounding, and the float scores
/// alone, summed in three orders (forward, backward, with FMA) and carried on exactly, moved dQ by
/// 1.2e-4 to 5.9e-4. The terms, over the positive keys P of query i, with t_i =
/// (max|dW| + Σ_j r_j·|dW_j| / R) / R (so |dS_l| <= t_i and max|dW| / R <= t_i):
///   Δs_j  = γ_{dk+2}·(scale·Σ_c|q_c·k_c| + |bias_ij|)   (the dot product, scale and bias add)
///   ΔR    = Σ_{j∈P} Δs_j
///   ΔdS_l = 4·t_i·ΔR / R + 2·γ_dv·max_j Σ_c|dO_ci·v_cj| / R   (the scores, then dW's rounding)
///   ΔW_l  = (Δs_l + W_l·ΔR) / R                               (W_l = r_l / R)
/// and through the gradients
///   dV_l: Σ_i ΔW_li·max_c|dO_ci|           (accumulated per key/value head in floor_v)
///   dK_l: scale·Σ_i ΔdS_li·max_c|q_ci|     (floor_k)
///   dQ_i: scale·Σ_{l∈P} ΔdS_li·max_c|k_cl| (returned, the largest over queries)
/// Like sigmoid_rounding_bound's, an a-priori worst case: where Σr is not small against its
/// terms' magnitudes ΔR / R is a few ulp and the floor stays far below a wrong term's size.
template <class Allowed, class Bias>
long double relu_rounding_bound(const inputs& x, const mha::matrix<float>& d_out, const problem& p,
                                std::size_t b, Index h, Index q0, Index k0, float scale,
                                const Allowed& allowed, const Bias& bias,
                                mha_test::mat<long double>& floor_k,
                                mha_test::mat<long double>& floor_v) {
    using ld = long double;
    const ld sc = static_cast<ld>(scale);
    const Index lq = p.lq[b], lk = p.lk[b], g = p.kv_head(h);
    const ld gamma_s = rounding_gamma(p.dk + 2), gamma_w = rounding_gamma(p.dv);
    ld dq_floor = 0;
    std::vector<ld> r(static_cast<std::size_t>(lk)), rounding(static_cast<std::size_t>(lk));
    for (Index i = 0; i < lq; ++i) {
        ld sum = 0, sum_rounding = 0, max_dw = 0, weighted_dw = 0, dw_size = 0;
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            r[jj] = 0;
            if (!allowed(j, i)) continue;
            const auto [dot, magnitude] = query_key_product(x, p, h, g, q0 + i, k0 + j);
            const ld b_ij = bias ? bias(j, i) : 0.0L;
            const ld s = sc * dot + b_ij;
            if (!(s > 0)) continue;
            const auto [dw, size] = value_gradient_product(x, d_out, p, h, g, q0 + i, k0 + j);
            r[jj] = s;
            rounding[jj] = gamma_s * (sc * magnitude + std::fabs(b_ij));
            sum += s;
            sum_rounding += rounding[jj];
            max_dw = std::max(max_dw, std::fabs(dw));
            weighted_dw += s * std::fabs(dw);
            dw_size = std::max(dw_size, size);
        }
        if (!(sum > 0)) continue;  // no positive score: the weights and dS are the constant 0
        const ld t = (max_dw + weighted_dw / sum) / sum;
        const ld d_score = 4 * t * sum_rounding / sum + 2 * gamma_w * dw_size / sum;
        const ld q_max = column_max_abs(x.q, h * p.dk, p.dk, q0 + i);
        const ld do_max = column_max_abs(d_out, h * p.dv, p.dv, q0 + i);
        ld dq_i = 0;
        for (Index j = 0; j < lk; ++j) {
            const auto jj = static_cast<std::size_t>(j);
            if (!(r[jj] > 0)) continue;
            const ld d_weight = (rounding[jj] + r[jj] / sum * sum_rounding) / sum;
            floor_v(g, k0 + j) += d_weight * do_max;
            floor_k(g, k0 + j) += sc * d_score * q_max;
            dq_i += sc * d_score * column_max_abs(x.k, g * p.dk, p.dk, k0 + j);
        }
        dq_floor = std::max(dq_floor, dq_i);
    }
    return dq_floor;
}

/// The backward of the attention core (multi_head_attention_core_backward) for softmax, ReLU and
/// sigmoid on the decoded problem, for a d_out drawn from its seed: finite; a query with no
/// allowed key gets dQ exactly 0; 1 and 2 threads give the same bits; and dQ, dK, dV are within
/// check B (tests/support/check.hpp) of the long-double chain rule (reference_attention_backward,
/// key/value heads summed over their query heads) with k = 6, the rule and factor of
/// tests/test_attention_backward.cpp: at most 6 times as far from it as the same chain rule in
/// float, plus twice the rounding noise of the reference. That test applies the rule to hundreds
/// of outputs stacked over its cases, since a maximum over few outputs is unstable (the float
/// chain rule may be lucky); a fuzzed problem may have a handful. So here the rule runs over dQ,
/// dK and dV stacked, and its floor also holds 8 units in the last place of the largest
/// reference gradient: a seed of the committed corpus (3 sequences, 2 heads, d_k = 10) had dQ
/// off by 1 ulp
/// where the float chain rule happened to be exact. A wrong term moves a gradient by a fraction
/// of its largest entry, far above. ReLU's dS_l = [s_l > 0]·(dW_l − Σ_j r_j·dW_j / Σr) / Σr
/// cancels its terms, of size t = (max|dW| + Σ_j r_j·|dW_j| / Σr) / Σr, which grow without bound
/// as Σr falls (one positive score: dS is exactly 0, computed as the difference of two terms of
/// size |dW| / Σr); a fuzzed input with Σr = 0.008 and d_k = 1 gave dQ 25 times the float chain
/// rule's error, which computes the same difference in another order and happened to cancel. So
/// for ReLU the floor also holds 8·u·scale times the largest t·Σ_l max|k_l| (dQ) and
/// Σ_i t_i·max|q_i| (dK) over queries and heads: the a-priori size of that rounding through
/// dQ = scale·K·dS and dK = scale·Q·dSᵀ, and relu_rounding_bound's first-order effect of the
/// scores' own rounding, which is large where Σr is small against its terms' magnitudes (a sum of
/// 1.3e-3 from terms of size 0.2: `regression_relu_small_positive_scores`). ReLU is not compared
/// when a score lies within 64·u of its terms' magnitude from the kink at 0, where float and long
/// double may take different sides. The reference is quadratic in Lk per query, so larger problems
/// are skipped (backward_checked says which are checked).
inline bool backward_checked(const problem& p) {
    if (p.has_terms()) return false;  // the chain-rule reference has no score terms
    double cost = 0;
    for (std::size_t b = 0; b < p.lq.size(); ++b)
        cost += static_cast<double>(p.heads * p.lq[b] * p.lk[b] * p.lk[b] * (p.dk + p.dv));
    // At 4e6 a 60 s fuzzing run on a loaded 2-core machine managed 7 inputs/s, at 1e6 20/s.
    return cost <= 1e6;
}

inline std::optional<std::string> check_backward(const problem& p, const inputs& x) {
    using ld = long double;
    if (!backward_checked(p)) return std::nullopt;
    const float scale = 1.0f / std::sqrt(static_cast<float>(p.dk));
    const float u = std::numeric_limits<float>::epsilon() / 2;
    value_stream values(p.seed ^ 0xBAC3'4A2D'0F1E'5B7Cull);
    mha::matrix<float> d_out(p.heads * p.dv, x.q.cols());
    for (Index i = 0; i < d_out.size(); ++i)
        d_out(i) = values.uniform(1);
    const mha::packed_batch batch(p.lq, p.lk);
    const mha::attention_mask<float> mask = p.mask();
    const mha::normalization kinds[] = {mha::normalization::softmax, mha::normalization::relu,
                                        mha::normalization::sigmoid};
    const mha_test::norm_kind reference_kinds[] = {
        mha_test::norm_kind::softmax, mha_test::norm_kind::relu, mha_test::norm_kind::sigmoid};
    for (int n = 0; n < 3; ++n) {
        const std::string name = mha::to_string(kinds[n]);
        mha::attention_options options;
        options.normalize = kinds[n];
        mha::backward_request request;
        request.threads = 1;
        const auto got = mha::multi_head_attention_core_backward(
            x.q, x.k, x.v, p.heads, p.kv_heads, batch, d_out, mask, options, request);
        if (got.dq.rows() != x.q.rows() || got.dq.cols() != x.q.cols() ||
            got.dk.rows() != x.k.rows() || got.dk.cols() != x.k.cols() ||
            got.dv.rows() != x.v.rows() || got.dv.cols() != x.v.cols())
            return "backward (" + name + "): gradients of the wrong shape";
        if (!got.dq.allFinite() || !got.dk.allFinite() || !got.dv.allFinite())
            return "backward (" + name + "): finite inputs gave a non-finite gradient";
        request.threads = 2;
        const auto two = mha::multi_head_attention_core_backward(
            x.q, x.k, x.v, p.heads, p.kv_heads, batch, d_out, mask, options, request);
        const auto same = [](const mha::matrix<float>& a, const mha::matrix<float>& b) {
            return a.size() == b.size() &&
                   (a.size() == 0 ||
                    std::memcmp(a.data(), b.data(), sizeof(float) * std::size_t(a.size())) == 0);
        };
        if (!same(got.dq, two.dq) || !same(got.dk, two.dk) || !same(got.dv, two.dv))
            return "backward (" + name + "): 1 and 2 threads give different bits";

        mha_test::mat<ld> ref[3] = {mha_test::mat<ld>::Zero(x.q.rows(), x.q.cols()),
                                    mha_test::mat<ld>::Zero(x.k.rows(), x.k.cols()),
                                    mha_test::mat<ld>::Zero(x.v.rows(), x.v.cols())};
        mha_test::mat<float> base[3] = {mha_test::mat<float>::Zero(x.q.rows(), x.q.cols()),
                                        mha_test::mat<float>::Zero(x.k.rows(), x.k.cols()),
                                        mha_test::mat<float>::Zero(x.v.rows(), x.v.cols())};
        bool near_kink = false;
        ld relu_floor = 0;     // see the comment of check_backward
        ld softmax_floor = 0;  // likewise: the tiled backward's weights from the forward's lse
        ld sigmoid_floor = 0;  // sigmoid_rounding_bound's dQ term
        ld relu_rounding = 0;  // relu_rounding_bound's dQ term
        mha_test::mat<ld> floor_k = mha_test::mat<ld>::Zero(p.kv_heads, x.k.cols());
        mha_test::mat<ld> floor_v = mha_test::mat<ld>::Zero(p.kv_heads, x.k.cols());
        Index q0 = 0, k0 = 0;
        for (std::size_t b = 0; b < p.lq.size(); ++b) {
            const Index lq = p.lq[b], lk = p.lk[b];
            const mha_test::allowed_fn allowed = [&p, b](Index j, Index i) {
                return p.allowed(b, j, i);
            };
            mha_test::bias_fn bias = nullptr;
            if (!p.bias.empty())
                bias = [&p, b](Index j, Index i) { return static_cast<ld>(p.bias[b](j, i)); };
            for (Index h = 0; h < p.heads; ++h) {
                const Index g = p.kv_head(h);
                const auto r = mha_test::reference_attention_backward<ld>(
                    copy_block<ld>(x.q, h * p.dk, q0, p.dk, lq),
                    copy_block<ld>(x.k, g * p.dk, k0, p.dk, lk),
                    copy_block<ld>(x.v, g * p.dv, k0, p.dv, lk),
                    copy_block<ld>(d_out, h * p.dv, q0, p.dv, lq), static_cast<ld>(scale), allowed,
                    bias, reference_kinds[n]);
                const auto f = mha_test::reference_attention_backward<float>(
                    copy_block<float>(x.q, h * p.dk, q0, p.dk, lq),
                    copy_block<float>(x.k, g * p.dk, k0, p.dk, lk),
                    copy_block<float>(x.v, g * p.dv, k0, p.dv, lk),
                    copy_block<float>(d_out, h * p.dv, q0, p.dv, lq), scale, allowed, bias,
                    reference_kinds[n]);
                if (kinds[n] == mha::normalization::softmax)
                    softmax_floor = std::max(
                        softmax_floor, softmax_recompute_bound(x, d_out, p, b, h, q0, k0, scale,
                                                               allowed, bias, floor_k, floor_v));
                if (kinds[n] == mha::normalization::relu)
                    relu_rounding = std::max(relu_rounding,
                                             relu_rounding_bound(x, d_out, p, b, h, q0, k0, scale,
                                                                 allowed, bias, floor_k, floor_v));
                if (kinds[n] == mha::normalization::sigmoid)
                    sigmoid_floor = std::max(
                        sigmoid_floor, sigmoid_rounding_bound(x, d_out, p, b, h, q0, k0, scale,
                                                              allowed, bias, floor_k, floor_v));
                ld relu_dk = 0;  // Σ_i t_i·max|q_i|, this head's dK scale
                for (Index i = 0; i < lq; ++i) {
                    bool any = false;
                    // ReLU's terms: Σr, max|dW_l| and Σ r_j·|dW_j| over the positive scores,
                    // and Σ max|k_l| over their keys.
                    ld sum_r = 0, max_dw = 0, weighted_dw = 0, key_sizes = 0;
                    for (Index j = 0; j < lk; ++j) {
                        if (!allowed(j, i)) continue;
                        any = true;
                        const auto [dot, magnitude] = query_key_product(x, p, h, g, q0 + i, k0 + j);
                        const ld b_ij = bias ? bias(j, i) : 0.0L;
                        const ld score = static_cast<ld>(scale) * dot + b_ij;
                        if (std::fabs(score) <=
                            64 * static_cast<ld>(u) *
                                (static_cast<ld>(scale) * magnitude + std::fabs(b_ij)))
                            near_kink = true;
                        if (score > 0) {
                            const ld dw =
                                value_gradient_product(x, d_out, p, h, g, q0 + i, k0 + j).first;
                            sum_r += score;
                            max_dw = std::max(max_dw, std::fabs(dw));
                            weighted_dw += score * std::fabs(dw);
                            key_sizes += column_max_abs(x.k, g * p.dk, p.dk, k0 + j);
                        }
                    }
                    if (sum_r > 0) {
                        const ld t = (max_dw + weighted_dw / sum_r) / sum_r;
                        const ld query_size = column_max_abs(x.q, h * p.dk, p.dk, q0 + i);
                        relu_floor = std::max(relu_floor, t * key_sizes);
                        relu_dk += t * query_size;
                    }
                    for (Index c = 0; c < p.dk; ++c) {
                        ref[0](h * p.dk + c, q0 + i) = r.dq(c, i);
                        base[0](h * p.dk + c, q0 + i) = f.dq(c, i);
                        if (!any && got.dq(h * p.dk + c, q0 + i) != 0)
                            return "backward (" + name +
                                   "): a query with no allowed key has a non-zero dQ";
                    }
                }
                relu_floor = std::max(relu_floor, relu_dk);
                for (Index j = 0; j < lk; ++j) {
                    for (Index c = 0; c < p.dk; ++c) {
                        ref[1](g * p.dk + c, k0 + j) += r.dk(c, j);
                        base[1](g * p.dk + c, k0 + j) += f.dk(c, j);
                    }
                    for (Index c = 0; c < p.dv; ++c) {
                        ref[2](g * p.dv + c, k0 + j) += r.dv(c, j);
                        base[2](g * p.dv + c, k0 + j) += f.dv(c, j);
                    }
                }
            }
            q0 += lq;
            k0 += lk;
        }
        if (kinds[n] == mha::normalization::relu && near_kink) continue;
        const mha::matrix<float>* ours[3] = {&got.dq, &got.dk, &got.dv};
        const char* names[3] = {"dQ", "dK", "dV"};
        ld err = 0, baseline = 0, noise = 0, largest = 0;
        int worst = 0;
        for (int t = 0; t < 3; ++t)
            for (Index i = 0; i < ref[t].size(); ++i) {
                const ld want = ref[t](i);
                const ld e = std::fabs(static_cast<ld>((*ours[t])(i)) - want);
                if (!(e <= err)) {  // also catches NaN
                    err = e;
                    worst = t;
                }
                baseline = std::max(baseline, std::fabs(static_cast<ld>(base[t](i)) - want));
                const float shifted = static_cast<float>(static_cast<float>(want) + 0.3f);
                noise = std::max(noise, std::fabs(static_cast<ld>(shifted - 0.3f) - want));
                largest = std::max(largest, std::fabs(want));
            }
        ld floor = 2 * noise + 8 * 2 * static_cast<ld>(u) * largest;
        if (kinds[n] == mha::normalization::relu)
            floor += 8 * static_cast<ld>(u) * static_cast<ld>(scale) * relu_floor;
        // Each normalisation's a-priori bound of rounding the scores (the others' terms are 0).
        floor += std::max({softmax_floor, sigmoid_floor, relu_rounding,
                           floor_k.size() ? floor_k.maxCoeff() : 0.0L,
                           floor_v.size() ? floor_v.maxCoeff() : 0.0L});
        if (!(err <= 6 * baseline + floor)) {
            std::ostringstream why;
            why << "backward (" << name << "): " << names[worst]
                << " differs from the long-double chain rule beyond check B (error "
                << static_cast<double>(err) << ", float chain rule "
                << static_cast<double>(baseline) << ", floor " << static_cast<double>(floor) << ")";
            return why.str();
        }
    }
    return std::nullopt;
}

/// Checks every invariant on the input; returns a description of the first violation.
inline std::optional<std::string> check(const std::uint8_t* data, std::size_t size) {
    const problem p = decode(data, size);
    const inputs x = make_inputs(p);
    std::ostringstream why;
    auto violation = [&](const std::string& what) {
        why << what << " (batch " << p.lq.size() << ", heads " << p.heads << ", kv heads "
            << p.kv_heads << ", dk " << p.dk << ", dv " << p.dv << ", tiles " << p.tiles.query_block
            << "x" << p.tiles.key_block << ")";
        return std::optional<std::string>(why.str());
    };

    const run_result tiled = run_tiled(p, x, false);
    const run_result tiled_w = run_tiled(p, x, true);
    // The decoded query blocks (1 to 9) are mostly narrower than a packet, which sends the scores
    // to Eigen's GEMV; blocks of 4 packets take the register-tiled kernels.
    problem wide = p;
    wide.tiles.query_block = 4 * mha::detail::block_kernel_traits<float>::width;
    const run_result tiled_wide = run_tiled(wide, x, false);
    const run_result reference = run_materialized(p, x);
    const float u = std::numeric_limits<float>::epsilon() / 2;
    const float scale = 1.0f / std::sqrt(static_cast<float>(p.dk));

    // Per-output tolerance: the rule of tests/support/check.hpp (C·u·Vmax·(1 + Smax), C = 8,
    // Smax from the score's term magnitudes),
    // doubled because both kernels may err by that much in opposite directions. Weights use the
    // same rule with Vmax = 1 (they lie in [0, 1]).
    mha::matrix<float> out_bound = mha::matrix<float>::Zero(tiled.out.rows(), tiled.out.cols());
    Index q0 = 0, k0 = 0;
    for (std::size_t b = 0; b < p.lq.size(); ++b) {
        const std::size_t head0 = b * static_cast<std::size_t>(p.heads);
        for (Index h = 0; h < p.heads; ++h) {
            const Index g = p.kv_head(h);
            const auto& wt = tiled_w.weights[head0 + static_cast<std::size_t>(h)];
            const auto& wr = reference.weights[head0 + static_cast<std::size_t>(h)];
            for (Index i = 0; i < p.lq[b]; ++i) {
                float vmax = 0, smax = 0;
                bool any = false;
                for (Index j = 0; j < p.lk[b]; ++j) {
                    if (!p.allowed(b, j, i)) continue;
                    any = true;
                    // Score magnitude as in check.hpp: Σ|q·k| bounds the dot product's rounding.
                    const float magnitude = x.k.block(g * p.dk, k0 + j, p.dk, 1)
                                                .cwiseProduct(x.q.block(h * p.dk, q0 + i, p.dk, 1))
                                                .cwiseAbs()
                                                .sum();
                    const float s = scale * magnitude +
                                    (p.bias.empty() ? 0.f : std::fabs(p.bias[b](j, i))) +
                                    p.term_magnitude(b, h, j, i);
                    smax = std::max(smax, std::fabs(s));
                    vmax =
                        std::max(vmax, x.v.block(g * p.dv, k0 + j, p.dv, 1).cwiseAbs().maxCoeff());
                }
                const float bound = 2 * 8 * u * vmax * (1 + smax);
                out_bound.block(h * p.dv, q0 + i, p.dv, 1).setConstant(bound);
                for (Index c = 0; c < p.dv; ++c) {
                    const float a = tiled.out(h * p.dv + c, q0 + i);
                    const float w = tiled_w.out(h * p.dv + c, q0 + i);
                    const float r = reference.out(h * p.dv + c, q0 + i);
                    const float t = tiled_wide.out(h * p.dv + c, q0 + i);
                    if (!std::isfinite(a) || !std::isfinite(w) || !std::isfinite(r) ||
                        !std::isfinite(t))
                        return violation("finite inputs gave a non-finite output");
                    if (!any && (a != 0 || r != 0 || w != 0 || t != 0))
                        return violation("a query with no allowed key has a non-zero output");
                    if (std::fabs(a - r) > bound || std::fabs(w - r) > bound ||
                        std::fabs(t - r) > bound)
                        return violation("tiled and materialised outputs differ beyond the bound");
                }
                for (Index j = 0; j < p.lk[b]; ++j) {
                    if (!p.allowed(b, j, i) && (wt(j, i) != 0 || wr(j, i) != 0))
                        return violation("an excluded key has a non-zero weight");
                    if (std::fabs(wt(j, i) - wr(j, i)) > 2 * 8 * u * (1 + smax))
                        return violation("tiled and materialised weights differ beyond the bound");
                }
            }
        }
        q0 += p.lq[b];
        k0 += p.lk[b];
    }

    // Both kernels against the long-double reference with the score terms
    // (reference_attention_terms), by check A of tests/support/check.hpp: |O − R| <= C·u·Vmax·
    // (1 + Smax) + u·|R| with the C, Vmax and Smax of out_bound (which is twice that first term).
    {
        using ld = long double;
        // Copies entry by entry: a block of a matrix without storage would offset a null pointer.
        const auto copy = [](const mha::matrix<float>& m, Index row, Index col, Index rows,
                             Index cols) {
            mha_test::mat<ld> r(rows, cols);
            for (Index c = 0; c < cols; ++c)
                for (Index i = 0; i < rows; ++i)
                    r(i, c) = static_cast<ld>(m(row + i, col + c));
            return r;
        };
        Index qs = 0, ks = 0;
        for (std::size_t b = 0; b < p.lq.size(); ++b) {
            for (Index h = 0; h < p.heads; ++h) {
                const Index g = p.kv_head(h);
                mha_test::score_terms terms;
                if (p.softcap) terms.softcap = static_cast<ld>(*p.softcap);
                if (!p.alibi.empty()) {
                    terms.alibi = true;
                    terms.slope = static_cast<ld>(p.alibi[static_cast<std::size_t>(h)]);
                }
                if (!p.sinks.empty()) {
                    terms.sink = true;
                    terms.sink_logit = static_cast<ld>(p.sinks[static_cast<std::size_t>(h)]);
                }
                mha_test::bias_fn bias = nullptr;
                if (!p.bias.empty())
                    bias = [&p, b](Index j, Index i) { return static_cast<ld>(p.bias[b](j, i)); };
                const mha_test::mat<ld> r = mha_test::reference_attention_terms<ld>(
                    copy(x.q, h * p.dk, qs, p.dk, p.lq[b]), copy(x.k, g * p.dk, ks, p.dk, p.lk[b]),
                    copy(x.v, g * p.dv, ks, p.dv, p.lk[b]), static_cast<ld>(scale), terms,
                    [&p, b](Index j, Index i) { return p.allowed(b, j, i); }, bias);
                for (Index i = 0; i < p.lq[b]; ++i)
                    for (Index c = 0; c < p.dv; ++c) {
                        const Index row = h * p.dv + c, col = qs + i;
                        const ld want = r(c, i);
                        const ld bound = static_cast<ld>(out_bound(row, col)) / 2 +
                                         static_cast<ld>(u) * std::fabs(want);
                        if (!(std::fabs(static_cast<ld>(tiled.out(row, col)) - want) <= bound))
                            return violation(
                                "the tiled output differs from the long-double "
                                "reference beyond check A");
                        if (!(std::fabs(static_cast<ld>(reference.out(row, col)) - want) <= bound))
                            return violation(
                                "the materialised output differs from the "
                                "long-double reference beyond check A");
                    }
            }
            qs += p.lq[b];
            ks += p.lk[b];
        }
    }

    // Poison: keys that no query of their sequence may see get NaN and 1e30 in K and V. Nothing
    // may change beyond the same bound (a repaired column is recomputed and may round differently).
    inputs poisoned = x;
    k0 = 0;
    bool any_poisoned = false;
    for (std::size_t b = 0; b < p.lq.size(); ++b) {
        for (Index j = 0; j < p.lk[b]; ++j) {
            bool seen = false;
            for (Index i = 0; i < p.lq[b] && !seen; ++i)
                seen = p.allowed(b, j, i);
            if (seen) continue;
            poisoned.k.col(k0 + j).setConstant(std::numeric_limits<float>::quiet_NaN());
            poisoned.v.col(k0 + j).setConstant(j % 2 ? 1e30f
                                                     : std::numeric_limits<float>::quiet_NaN());
            any_poisoned = true;
        }
        k0 += p.lk[b];
    }
    if (any_poisoned) {
        const run_result a = run_tiled(p, poisoned, false);
        const run_result r = run_materialized(p, poisoned);
        for (Index i = 0; i < a.out.size(); ++i)
            if (!(std::fabs(a.out(i) - tiled.out(i)) <= out_bound(i)) ||
                !(std::fabs(r.out(i) - reference.out(i)) <= out_bound(i)))
                return violation("a poisoned excluded key changed an output");
    }

    // Grouped heads read K/V by index: the same as ordinary heads on K and V with each key/value
    // head repeated heads / kv_heads times, bit for bit (the same kernel sees the same numbers in
    // the same order; only the distance between key columns differs), except for the queries of
    // one-query sequences: there the tiled kernel stacks a group's query heads into one product
    // (make_stacked_problem in detail/head_problem.hpp), whose sums run in another order, so they
    // are held to out_bound (twice check A) instead.
    if (p.kv_heads != p.heads) {
        const Index group = p.heads / p.kv_heads;
        inputs repeated{x.q, mha::matrix<float>(p.heads * p.dk, x.k.cols()),
                        mha::matrix<float>(p.heads * p.dv, x.v.cols())};
        // Without keys the matrices have no storage, and a block of them would offset a null
        // pointer: there is nothing to repeat.
        for (Index h = 0; h < p.heads; ++h) {
            if (x.k.size() > 0)
                repeated.k.middleRows(h * p.dk, p.dk) = x.k.middleRows((h / group) * p.dk, p.dk);
            if (x.v.size() > 0)
                repeated.v.middleRows(h * p.dv, p.dv) = x.v.middleRows((h / group) * p.dv, p.dv);
        }
        problem ungrouped = p;
        ungrouped.kv_heads = p.heads;
        const run_result r = run_tiled(ungrouped, repeated, false);
        if (r.out.rows() != tiled.out.rows() || r.out.cols() != tiled.out.cols())
            return violation("grouped heads differ from ordinary heads on repeated K/V");
        Index column = 0;
        for (std::size_t b = 0; b < p.lq.size(); ++b)
            for (Index i = 0; i < p.lq[b]; ++i, ++column)
                for (Index row = 0; row < r.out.rows(); ++row) {
                    const float grouped = tiled.out(row, column), plain = r.out(row, column);
                    // Bit for bit by memcmp: a NaN equals the same NaN, −0 differs from +0.
                    const bool same = p.lq[b] == 1
                                          ? std::fabs(grouped - plain) <= out_bound(row, column) ||
                                                (std::isnan(grouped) && std::isnan(plain))
                                          : std::memcmp(&grouped, &plain, sizeof grouped) == 0;
                    if (!same)
                        return violation(
                            "grouped heads differ from ordinary heads on repeated K/V");
                }
    }

    // Split and merge: each sequence's keys cut at a point drawn from the seed, both parts
    // attended (the masks restricted to their keys, as a keep mask and a bias) and their states
    // merged with mha::merge_attention_states. Both the merge and the one-shot tiled output are
    // within check A of the exact result, so they differ by at most out_bound (twice check A).
    // Score terms: soft-capping as it is; the sinks in the second part only (a sink is one term
    // of the normaliser); ALiBi in both parts, where the second part's positions j − i − (Lk −
    // Lq) are the whole sequence's, and the first part's (Lk = the cut) exceed them by
    // Lk − cut: its scores are shifted by slope·(Lk − cut), which leaves its output as it is
    // and its log-sum-exp larger by as much, taken off before the merge.
    {
        std::vector<Index> cut(p.lq.size()), first_lk(p.lq.size()), second_lk(p.lq.size());
        value_stream cuts(p.seed ^ 0x5EED5EED5EED5EEDull);
        for (std::size_t b = 0; b < p.lq.size(); ++b) {
            cut[b] = static_cast<Index>(cuts.next() % static_cast<std::uint64_t>(p.lk[b] + 1));
            first_lk[b] = cut[b];
            second_lk[b] = p.lk[b] - cut[b];
        }
        mha::matrix<float> merged(p.heads * p.dv, x.q.cols()), lse;
        for (int part = 0; part < 2; ++part) {
            const std::vector<Index>& lengths = part == 0 ? first_lk : second_lk;
            Index nk = 0;
            for (const Index l : lengths)
                nk += l;
            mha::matrix<float> k(x.k.rows(), nk), v(x.v.rows(), nk);
            std::vector<mha::bool_matrix> keep;
            std::vector<mha::matrix<float>> bias;
            Index from = 0, to = 0;
            for (std::size_t b = 0; b < p.lq.size(); ++b) {
                const Index lo = part == 0 ? 0 : cut[b], n = lengths[b];
                k.middleCols(to, n) = x.k.middleCols(from + lo, n);
                v.middleCols(to, n) = x.v.middleCols(from + lo, n);
                mha::bool_matrix allowed(n, p.lq[b]);
                for (Index i = 0; i < p.lq[b]; ++i)
                    for (Index j = 0; j < n; ++j)
                        allowed(j, i) = p.allowed(b, lo + j, i);
                keep.push_back(allowed);
                // An empty bias has no storage: no block of it, even an empty one, is taken
                // (Eigen would offset a null pointer).
                bias.push_back(p.bias.empty() || p.bias[b].size() == 0
                                   ? mha::matrix<float>::Zero(n, p.lq[b])
                                   : mha::matrix<float>(p.bias[b].middleRows(lo, n)));
                from += p.lk[b];
                to += n;
            }
            mha::attention_mask<float> mask{mha::keep_mask(keep)};
            mask.add(mha::additive_bias<float>(bias));
            mha::matrix<float> out(p.heads * p.dv, x.q.cols());
            mha::attention_options options = p.options();
            if (part == 0) options.sinks.clear();
            auto extra = mha::multi_head_attention_core(x.q, k, v, p.heads, p.kv_heads,
                                                        mha::packed_batch(p.lq, lengths), out, mask,
                                                        options, {mha::weights_mode::none, true});
            if (part == 0 && !p.alibi.empty()) {
                Index column = 0;
                for (std::size_t b = 0; b < p.lq.size(); ++b)
                    for (Index i = 0; i < p.lq[b]; ++i, ++column)
                        for (Index h = 0; h < p.heads; ++h)
                            extra.log_sum_exp(h, column) -=
                                static_cast<float>(p.alibi[static_cast<std::size_t>(h)] *
                                                   static_cast<double>(p.lk[b] - cut[b]));
            }
            if (part == 0) {
                merged = out;
                lse = std::move(extra.log_sum_exp);
            } else {
                mha::merge_attention_states(merged, lse, out, extra.log_sum_exp);
            }
        }
        for (Index i = 0; i < merged.size(); ++i)
            if (!(std::fabs(merged(i) - tiled.out(i)) <= out_bound(i)))
                return violation(
                    "split keys merged by log-sum-exp differ from the one-shot output");
    }

    // Determinism: the same input gives the same bits.
    const run_result again = run_tiled(p, x, false);
    // (Outputs are finite here, checked above, so == compares every bit that matters.)
    if (again.out.size() != tiled.out.size() || !(again.out.array() == tiled.out.array()).all())
        return violation("two runs of the same input differ");

    // The backward pass (for the problems backward_checked accepts).
    if (const auto wrong = check_backward(p, x)) return violation(*wrong);

    // Bad shapes throw the documented exception and nothing else.
    if (!p.lq.empty()) {
        mha::matrix<float> out(p.heads * p.dv, x.q.cols());
        try {
            mha::multi_head_attention_core(x.q, x.k.topRows(x.k.rows() - 1), x.v, p.heads,
                                           p.kv_heads, mha::packed_batch(p.lq, p.lk), out,
                                           p.mask());
            return violation("mismatched key width was accepted");
        } catch (const mha::shape_error&) {
        } catch (...) {
            return violation("mismatched key width threw something other than mha::shape_error");
        }
    }
    return std::nullopt;
}

}  // namespace mha_fuzz
