// SPDX-License-Identifier: MIT
// Builds against mha as a user would and checks one forward pass runs.
#include <mha/mha.hpp>

int main() {
    mha::attention_config config;
    config.embed_dim = 8;
    config.num_heads = 2;
    const mha::multi_head_attention<double> layer(config, 1);
    const mha::matrix<double> x = mha::matrix<double>::Ones(8, 3);
    const mha::matrix<double> y = layer.forward(x, mha::causal{});
    return y.rows() == 8 && y.cols() == 3 && y.allFinite() ? 0 : 1;
}
