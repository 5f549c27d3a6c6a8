// SPDX-License-Identifier: MIT
// Rotary positions: Q and K of a prompt, a decode step after it, a GPT-J style partial rotation.
#include <cmath>
#include <iostream>
#include <vector>

#include <mha/rotary.hpp>

int main() {
    using mat = mha::matrix<double>;  // column-major, one column per token
    const mha::Index heads = 4, kv_heads = 2, head_dim = 64;

    // Llama 3.1: half-split pairs over the whole head, base 500000, Llama 3 frequency scaling.
    mha::rotary_options llama;
    llama.base = 500000;
    llama.scaling = mha::rotary_scaling::llama3(/*factor=*/8, /*low_freq_factor=*/1,
                                                /*high_freq_factor=*/4,
                                                /*original_max_positions=*/8192);
    const mha::rotary_embedding<double> rope(llama, head_dim);

    // A prompt of 5 tokens at positions 0..4: Q with 4 heads, K with 2 (grouped-query).
    mat q = mat::Random(heads * head_dim, 5);     // 256 × 5
    mat k = mat::Random(kv_heads * head_dim, 5);  // 128 × 5
    const mat q0 = q, k0 = k;
    rope.apply(q, heads, /*first_position=*/0);
    rope.apply(k, kv_heads, /*first_position=*/0);

    // A decode step: the new token's position is the number of tokens already in the cache.
    mat q_step = mat::Random(heads * head_dim, 1);  // 256 × 1
    rope.apply(q_step, heads, /*first_position=*/5);

    // Scores depend on positions only through their difference: query 4 against key 1 scores
    // the same at positions (4, 1) as at (100004, 100001).
    mat q_far = q0.col(4), k_far = k0.col(1);
    rope.apply(q_far, heads, 100004);
    rope.apply(k_far, kv_heads, 100001);
    const double near = q.col(4).head(head_dim).dot(k.col(1).head(head_dim));
    const double far = q_far.col(0).head(head_dim).dot(k_far.col(0).head(head_dim));
    std::cout << "head 0 score at distance 3: " << near << " near, " << far << " far\n";

    // GPT-J: interleaved pairs on the first 64 of 256 features; each column its own position.
    mha::rotary_options gptj;
    gptj.layout = mha::rotary_layout::interleaved;
    gptj.rotary_dim = 64;
    const mha::rotary_embedding<float> gptj_rope(gptj, 256);
    mha::matrix<float> x = mha::matrix<float>::Random(16 * 256, 3);  // 16 heads × 3 tokens
    gptj_rope.apply(x, 16, std::vector<mha::Index>{7, 8, 100000});

    // Equal to within the rounding of the angle p·θ in double, about 10^5·2^-53 per feature.
    return std::fabs(near - far) <= 1e-8 ? 0 : 1;
}
