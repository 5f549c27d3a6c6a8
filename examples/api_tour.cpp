// SPDX-License-Identifier: MIT
// A tour of the public API: the layer in its forms, masks, batches, weights, and the kernels.
#include <iostream>

#include <mha/mha.hpp>

int main() {
    using mat = mha::matrix<float>;  // column-major, one column per token
    mha::attention_config config;
    config.embed_dim = 64;        // E
    config.num_heads = 4;         // H; head_dim defaults to E / H = 16
    config.value_head_dim = 8;    // optional: d_v different from d_k
    config.key_input_dim = 32;    // optional: PyTorch's kdim, width of the key source
    config.value_input_dim = 48;  // optional: PyTorch's vdim
    config.attention.normalize = mha::normalization::softmax;           // or relu, sigmoid
    const mha::multi_head_attention<float> cross(config, /*seed=*/42);  // Xavier like PyTorch

    const mat query = mat::Random(64, 5), key = mat::Random(32, 9), value = mat::Random(48, 9);
    mat y = cross.forward(query, key, value);             // cross-attention: 64 × 5
    y = cross.forward(query, key, value, mha::causal{});  // bottom-right: query 4 sees all keys

    const mha::multi_head_attention<float> self({64, 4}, /*seed=*/7);
    const mat x = mat::Random(64, 3 + 7 + 5);  // three sequences packed side by side
    const mha::packed_batch batch({3, 7, 5});
    y = self.forward(x, batch,
                     mha::attention_mask<float>(mha::causal{}, mha::key_lengths{{3, 6, 5}}));

    const auto r = self.forward_with_weights(x.leftCols(3), mha::weights_mode::per_head);
    std::cout << "head 0 weights (keys x queries):\n" << r.weights[0] << "\n";

    // Kernels on their own, on views of one fused projection (no copies).
    const auto p = self.parameters();
    mat w_qkv(3 * 64, 64);
    w_qkv << p.w_q, p.w_k, p.w_v;
    mat qkv(3 * 64, 3);
    mha::linear(w_qkv, mha::vector<float>(), x.leftCols(3), qkv);
    auto views = mha::split_qkv(qkv, 64, 64);
    mat head0(16, 3);
    mha::scaled_dot_product_attention(mha::head_view(views.q, 0, 4), mha::head_view(views.k, 0, 4),
                                      mha::head_view(views.v, 0, 4), head0, mha::causal{});
    mat scores(3, 3);
    mha::attention_scores(views.k.topRows(16), views.q.topRows(16), 0.25f, scores);
    mha::softmax_columns(scores);  // each column now sums to 1
    std::cout << "column sums: " << scores.colwise().sum() << "\n";
}
