// SPDX-License-Identifier: MIT
// Second translation unit of the link test (see two_units_a.cpp).
#include <mha/mha.hpp>

double forward_in_unit_b() {
    mha::attention_config config;
    config.embed_dim = 4;
    const mha::multi_head_attention<double> layer(config, 7);
    return layer.forward(mha::matrix<double>::Ones(4, 2)).sum();
}
