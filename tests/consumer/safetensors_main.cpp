// SPDX-License-Identifier: MIT
// Builds against the installed mha::safetensors: a layer's weights written and read back.
#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

int main() {
    const mha::multi_head_attention<float> layer({8, 2}, 1);
    mha::safetensors_writer out;
    mha::save_multi_head_attention(out, layer);
    const auto file = mha::safetensors_file::parse(out.bytes());
    const auto loaded = mha::load_multi_head_attention<float>(file, 2);
    const mha::matrix<float> x = mha::matrix<float>::Ones(8, 3);
    return loaded.forward(x) == layer.forward(x) ? 0 : 1;
}
