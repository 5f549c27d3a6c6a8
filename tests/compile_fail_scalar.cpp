// SPDX-License-Identifier: MIT
// Must not compile with MHA_TEST_SCALAR = long double (the default here): every public class and
// kernel refuses scalar types other than float and double with the documented static_assert
// message. Compiled by tests/expect_compile_error.cmake, once with float as the control.
#include <mha/mha.hpp>

#ifndef MHA_TEST_SCALAR
#define MHA_TEST_SCALAR long double
#endif

using scalar = MHA_TEST_SCALAR;

int main() {
    mha::attention_config config;
    config.embed_dim = 4;
    config.num_heads = 2;
    const mha::multi_head_attention<scalar> layer(config);
    mha::kv_cache<scalar> cache(4, 4);
    const mha::rotary_embedding<scalar> rotary(mha::rotary_options{}, 2);
    const mha::matrix<scalar> x = mha::matrix<scalar>::Ones(4, 3);
    const mha::matrix<scalar> out = mha::scaled_dot_product_attention(x, x, x);
    return layer.forward(x).cols() == out.cols() && cache.empty() ? 0 : 1;
}
