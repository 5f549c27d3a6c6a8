// SPDX-License-Identifier: MIT
// Gradients: the attention core's backward on projected Q, K, V, then one gradient step of a
// whole layer on a packed batch of two sequences.
#include <iostream>

#include <mha/attention_backward.hpp>
#include <mha/multi_head_attention.hpp>

int main() {
    using mat = mha::matrix<double>;  // column-major, one column per token

    // The core: 4 query heads sharing 2 key/value heads, d_k = 8, d_v = 4, one sequence of 6.
    const mha::packed_batch one = mha::packed_batch::single(6, 6);
    const mat q = mat::Random(4 * 8, 6), k = mat::Random(2 * 8, 6), v = mat::Random(2 * 4, 6);
    const mat d_out = mat::Random(4 * 4, 6);  // ∂loss/∂output, (H·d_v) × N
    const mha::attention_gradients<double> g = mha::multi_head_attention_core_backward(
        q, k, v, /*num_heads=*/4, /*num_kv_heads=*/2, one, d_out, mha::causal{});
    std::cout << "dQ " << g.dq.rows() << "x" << g.dq.cols() << ", dK " << g.dk.rows() << "x"
              << g.dk.cols() << ", dV " << g.dv.rows() << "x" << g.dv.cols() << "\n";

    // The layer: forward keeping what backward needs, backward, a plain gradient step on W_o.
    mha::attention_config config;
    config.embed_dim = 16;
    config.num_heads = 4;
    const mha::multi_head_attention<double> layer(config, /*seed=*/1);
    const mha::packed_batch batch({5, 3});  // two sequences, 8 columns
    const mat x = mat::Random(16, 8);
    const mha::layer_saved_state<double> saved = layer.forward_for_backward(x, batch);
    const mat d_output = saved.output;  // the loss ½·|output|² has this gradient
    const mha::layer_gradients<double> grads = layer.backward(saved, d_output);
    mha::attention_parameters<double> p = layer.parameters();
    p.w_o -= 0.1 * grads.parameters.w_o;
    const mha::multi_head_attention<double> stepped(config, p);
    const double before = 0.5 * saved.output.squaredNorm();
    const double after = 0.5 * stepped.forward(x, batch).squaredNorm();
    std::cout << "loss " << before << " -> " << after << "\n";
    return after < before ? 0 : 1;  // a small step against the gradient lowers the loss
}
