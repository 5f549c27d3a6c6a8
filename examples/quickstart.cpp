// SPDX-License-Identifier: MIT
// Quickstart: causal self-attention over a buffer laid out like a PyTorch (L, E) tensor.
#include <cstddef>
#include <iostream>
#include <vector>

#include <mha/mha.hpp>

int main() {
    const mha::Index embed = 64, heads = 4, length = 10;
    const mha::multi_head_attention<float> layer(mha::attention_config{embed, heads}, /*seed=*/42);

    // Row-major (L, E) is the same bytes as a column-major E×L matrix: one column per token,
    // so the Map views the buffer without copying it.
    std::vector<float> tokens(static_cast<std::size_t>(length * embed));
    for (std::size_t i = 0; i < tokens.size(); ++i)
        tokens[i] = static_cast<float>(i % 7) * 0.1f;
    const Eigen::Map<const Eigen::MatrixXf> x(tokens.data(), embed, length);

    const Eigen::MatrixXf y = layer.forward(x, mha::causal{});  // E×L, as x
    std::cout << "output " << y.rows() << " x " << y.cols() << "\n"
              << "y(0, 0) = " << y(0, 0) << ", y(E-1, L-1) = " << y(embed - 1, length - 1) << "\n";
}
