// SPDX-License-Identifier: MIT
// Score modifiers: a T5-style bucketed relative position bias and a prefix-LM mask written as a
// score modifier (compiled into the kernel, no Lk × Lq bias matrix), then ALiBi, soft-capping and
// attention sinks through attention_options. The modifier's result is checked against the same
// bias given as an explicit additive_bias matrix.
#include <algorithm>
#include <cmath>
#include <iostream>
#include <limits>
#include <vector>

#include <mha/mha.hpp>

namespace {

using mha::Index;

/// T5's relative position buckets (bidirectional): exact distances below 4, log-spaced up to
/// 32, one bucket beyond; keys after the query use the upper 8 buckets.
Index t5_bucket(Index query, Index key) {
    const Index d = key - query;
    const Index side = d > 0 ? 8 : 0;
    const Index n = std::abs(d);
    if (n < 4) return side + n;
    const double log_part = std::log(static_cast<double>(n) / 4.0) / std::log(8.0) * 4.0;
    return side + std::min<Index>(7, 4 + static_cast<Index>(log_part));
}

}  // namespace

int main() {
    using mat = mha::matrix<float>;  // column-major, one column per token
    const Index heads = 4, head_dim = 16, length = 40, prefix = 10;
    const mat q = mat::Random(heads * head_dim, length);  // (H·d) × L
    const mat k = mat::Random(heads * head_dim, length);
    const mat v = mat::Random(heads * head_dim, length);
    const mha::packed_batch batch({length});

    // One learned value per head and bucket (random here).
    const mat table = mat::Random(16, heads);  // bucket × head
    const float minus_inf = -std::numeric_limits<float>::infinity();
    // Prefix-LM: every token sees the prefix [0, prefix); after it, attention is causal.
    auto visible = [prefix](Index i, Index j) { return j < prefix || j <= i; };
    auto score = [&](Index /*sequence*/, Index h, Index i, Index j, float s) {
        return visible(i, j) ? s + table(t5_bucket(i, j), h) : minus_inf;
    };
    // Blocks with no visible key: every key after the prefix and after the block's last query.
    auto visit = [prefix](Index /*sequence*/, Index /*head*/, Index /*i0*/, Index i1, Index j0,
                          Index /*j1*/) { return j0 < prefix || j0 < i1; };
    mat out(heads * head_dim, length);
    mha::multi_head_attention_core(q, k, v, heads, heads, batch, out, {}, {}, {},
                                   mha::make_score_modifier(score, visit));

    // The same attention with the bias and mask materialised: one Lk × Lq matrix per head.
    std::vector<mat> bias;
    for (Index h = 0; h < heads; ++h) {
        mat b(length, length);  // Lk × Lq
        for (Index i = 0; i < length; ++i)
            for (Index j = 0; j < length; ++j)
                b(j, i) = visible(i, j) ? table(t5_bucket(i, j), h) : minus_inf;
        bias.push_back(b);
    }
    mat expected(heads * head_dim, length);
    mha::multi_head_attention_core(q, k, v, heads, batch, expected,
                                   mha::additive_bias<float>(bias));
    const float difference = (out - expected).cwiseAbs().maxCoeff();
    std::cout << "T5 bias + prefix-LM as a modifier vs as a bias matrix: max difference "
              << difference << "\n";

    // ALiBi with the standard slopes, Gemma 2's soft-capping at 50, a sink logit per head.
    mha::attention_options options;
    options.alibi_slopes = mha::alibi_slopes(heads);
    options.softcap = 50.0;
    options.sinks = {0.0, 1.0, -1.0, 2.0};
    mat out2(heads * head_dim, length);
    const auto extra = mha::multi_head_attention_core(q, k, v, heads, batch, out2, mha::causal{},
                                                      options, {mha::weights_mode::none, true});
    std::cout << "ALiBi slopes:";
    for (double s : options.alibi_slopes)
        std::cout << ' ' << s;
    std::cout << "\nlog-sum-exp of query 0, head 3 (its one key and the sink 2): "
              << extra.log_sum_exp(3, 0) << "\n";

    // Rounding only: summation orders differ between the two kernels (outputs are of order 1).
    return difference < 1e-5f && out2.allFinite() ? 0 : 1;
}
