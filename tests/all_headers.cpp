// SPDX-License-Identifier: MIT
// Every header of the library in one translation unit (the generated all_headers.hpp), with
// Eigen's deprecation warnings on, and the main templates instantiated for float and double:
// deprecations only show in instantiated code. Run as a test, it prints the Eigen version the
// headers were compiled against, which CMake compares with the Eigen it found.
#undef EIGEN_NO_DEPRECATED_WARNING

#include "all_headers.hpp"

#include <cstdio>

namespace {

template <class Scalar>
bool run_layer() {
    using mat = mha::matrix<Scalar>;
    const mha::multi_head_attention<Scalar> layer({16, 2}, /*seed=*/3);
    const mat x = mat::Random(16, 70);
    bool ok = layer.forward(x, mha::causal{}).allFinite();
    ok = ok && layer.forward_with_weights(x, mha::weights_mode::per_head).output.allFinite();
    mha::forward_workspace<Scalar> workspace;
    mat out(16, 70);
    layer.forward_into(x, mha::packed_batch({30, 40}), {}, out, workspace);
    ok = ok && out.allFinite();
    for (auto algorithm :
         {mha::attention_algorithm::tiled, mha::attention_algorithm::materialized}) {
        mha::attention_options options;
        options.algorithm = algorithm;
        mat o(8, 70);
        mha::scaled_dot_product_attention(x.topRows(8), x.middleRows(8, 8), x.bottomRows(8), o,
                                          mha::causal{}, options);
        ok = ok && o.allFinite();
    }
    // Two halves of the keys merged by their log-sum-exps, pairwise and as a list.
    const mha::attention_request with_lse{mha::weights_mode::none, true};
    mat a(8, 70), b(8, 70);
    mat la = mha::scaled_dot_product_attention(x.topRows(8), x.middleRows(8, 8).leftCols(35),
                                               x.bottomRows(8).leftCols(35), a, {}, {}, with_lse)
                 .log_sum_exp;
    const mat lb =
        mha::scaled_dot_product_attention(x.topRows(8), x.middleRows(8, 8).rightCols(35),
                                          x.bottomRows(8).rightCols(35), b, {}, {}, with_lse)
            .log_sum_exp;
    mha::merge_attention_states(a, la, b, lb);
    mha::merge_attention_states(std::vector<mha::attention_state<Scalar>>{{a, la}}, a, la);
    ok = ok && a.allFinite() && la.allFinite();
#if defined(MHA_ALL_HEADERS_SAFETENSORS)
    mha::safetensors_writer writer;
    mha::save_multi_head_attention(writer, layer);
    const auto file = mha::safetensors_file::parse(writer.bytes());
    ok = ok && mha::load_multi_head_attention<Scalar>(file, 2).forward(x) == layer.forward(x);
#endif
    return ok;
}

}  // namespace

int main() {
    std::printf(
        "Eigen %d.%d.%d (EIGEN_WORLD_VERSION %d, EIGEN_MAJOR_VERSION %d, EIGEN_MINOR_VERSION %d)\n",
        MHA_EIGEN_VERSION_MAJOR, MHA_EIGEN_VERSION_MINOR, MHA_EIGEN_VERSION_PATCH,
        EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION);
    const bool ok = run_layer<float>() && run_layer<double>();
    std::printf("%s\n", ok ? "layer and kernels: finite results" : "layer and kernels: FAILED");
    return ok ? 0 : 1;
}
