// SPDX-License-Identifier: MIT
// Built with -fno-exceptions: the library compiles, runs, and on bad input prints the same
// message an exception would carry, then aborts (the documented fallback).
#include <cstdio>

#include <mha/mha.hpp>

int main() {
    mha::attention_config config;
    config.embed_dim = 8;
    config.num_heads = 2;
    const mha::multi_head_attention<float> layer(config, 3);
    const mha::matrix<float> y = layer.forward(mha::matrix<float>::Ones(8, 4), mha::causal{});
    std::printf("valid forward: %ld x %ld, finite: %d\n", static_cast<long>(y.rows()),
                static_cast<long>(y.cols()), static_cast<int>(y.allFinite()));
    std::fflush(stdout);
    (void)layer.forward(mha::matrix<float>::Ones(7, 4));  // wrong width: prints, then aborts
    std::puts("not reached");
    return 0;
}
