// SPDX-License-Identifier: MIT
// With two_units_b.cpp: two translation units including the whole library must link (every
// function defined in a header is inline or a template).
#include <mha/mha.hpp>

double forward_in_unit_b();

int main() {
    mha::attention_config config;
    config.embed_dim = 4;
    const mha::multi_head_attention<double> layer(config, 7);
    const double a = layer.forward(mha::matrix<double>::Ones(4, 2)).sum();
    return a == forward_in_unit_b() ? 0 : 1;
}
