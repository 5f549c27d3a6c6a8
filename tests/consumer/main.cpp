// SPDX-License-Identifier: MIT
// Builds against mha as a user would and checks one forward pass runs.
#include <mha/mha.hpp>

#if defined(MHA_CONSUMER_EXPECT_NO_OPENMP) && defined(_OPENMP)
#error "linking mha::mha turned OpenMP on; only mha::openmp may"
#endif
#if defined(MHA_CONSUMER_EXPECT_OPENMP) && !defined(_OPENMP)
#error "linking mha::openmp did not turn OpenMP on"
#endif

#if defined(MHA_CONSUMER_PACKAGE_VERSION)
namespace {
struct version {
    int major, minor, patch;
};
constexpr version package{MHA_CONSUMER_PACKAGE_VERSION};
static_assert(package.major == MHA_VERSION_MAJOR && package.minor == MHA_VERSION_MINOR &&
                  package.patch == MHA_VERSION_PATCH,
              "the CMake package's version differs from MHA_VERSION_* in mha/core.hpp");
}  // namespace
#endif

int main() {
    mha::attention_config config;
    config.embed_dim = 8;
    config.num_heads = 2;
    const mha::multi_head_attention<double> layer(config, 1);
    const mha::matrix<double> x = mha::matrix<double>::Ones(8, 3);
    const mha::matrix<double> y = layer.forward(x, mha::causal{});
    return y.rows() == 8 && y.cols() == 3 && y.allFinite() ? 0 : 1;
}
