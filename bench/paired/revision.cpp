// SPDX-License-Identifier: MIT
// One revision of the library behind paired::revision (paired.hpp). compare_revisions.sh compiles
// this file once per revision, with that revision's include/ first on the path and
// -DMHA_PAIRED_REVISION=base or new. The macro below renames the namespace mha to
// mha_paired_<revision> in everything the headers declare, so the two copies of every inline
// function and template link into one program as distinct symbols; header names in #include <...>
// are not macro-expanded, so the headers are found as usual.
#include <chrono>
#include <memory>
#include <vector>

#include <Eigen/Core>

#include "paired.hpp"

#define MHA_PAIRED_CONCAT_(a, b) a##b
#define MHA_PAIRED_CONCAT(a, b) MHA_PAIRED_CONCAT_(a, b)
#define mha MHA_PAIRED_CONCAT(mha_paired_, MHA_PAIRED_REVISION)
#include <mha/mha.hpp>

namespace {

mha::attention_mask<float> mask_of(const paired::problem& p) {
    switch (p.mask) {
        case paired::mask_kind::causal:
            return mha::attention_mask<float>(mha::causal{});
        case paired::mask_kind::window:
            return mha::attention_mask<float>(mha::sliding_window{p.window, 0});
        case paired::mask_kind::none:
            break;
    }
    return mha::attention_mask<float>();
}

template <class QKV, class Workspace>
double time_core(const QKV& qkv, const paired::problem& p, Eigen::MatrixXf& out,
                 Workspace& workspace) {
    const auto q = qkv.topRows(p.d_model);                // d_model × L
    const auto k = qkv.middleRows(p.d_model, p.d_model);  // d_model × L
    const auto v = qkv.bottomRows(p.d_model);             // d_model × L
    const mha::packed_batch batch(std::vector<Eigen::Index>{p.length});
    const mha::attention_mask<float> mask = mask_of(p);
    const auto start = std::chrono::steady_clock::now();
    mha::multi_head_attention_core(q, k, v, p.heads, p.heads, batch, out, mask, {}, {}, workspace);
    const auto stop = std::chrono::steady_clock::now();
    return std::chrono::duration<double, std::milli>(stop - start).count();
}

double core_fp32(const Eigen::MatrixXf& qkv, const paired::problem& p, Eigen::MatrixXf& out) {
    static mha::core_workspace<float> workspace;
    return time_core(qkv, p, out, workspace);
}

double core_bf16(const paired::bf16_matrix& qkv, const paired::problem& p, Eigen::MatrixXf& out) {
    static mha::bf16_core_workspace workspace;
    return time_core(qkv, p, out, workspace);
}

// The layer of d_model / heads with seed 1, built on the first call and again when the shape
// changes, so that its construction is never timed.
template <class Layer, class Make>
const Layer& layer_for(const paired::problem& p, Make make) {
    static std::unique_ptr<Layer> layer;
    static long d_model = 0, heads = 0;
    if (!layer || d_model != p.d_model || heads != p.heads) {
        mha::attention_config config;
        config.embed_dim = p.d_model;
        config.num_heads = p.heads;
        layer = std::make_unique<Layer>(make(config));
        d_model = p.d_model;
        heads = p.heads;
    }
    return *layer;
}

template <class Layer, class Input, class Workspace>
double time_layer(const Layer& layer, const Input& x, const paired::problem& p,
                  Eigen::MatrixXf& out, Workspace& workspace) {
    const mha::packed_batch batch(std::vector<Eigen::Index>{p.length});
    const mha::attention_mask<float> mask = mask_of(p);
    const auto start = std::chrono::steady_clock::now();
    layer.forward_into(x, batch, mask, out, workspace);
    const auto stop = std::chrono::steady_clock::now();
    return std::chrono::duration<double, std::milli>(stop - start).count();
}

double layer_fp32(const Eigen::MatrixXf& qkv, const paired::problem& p, Eigen::MatrixXf& out) {
    using layer_type = mha::multi_head_attention<float>;
    const layer_type& layer = layer_for<layer_type>(
        p, [](const mha::attention_config& config) { return layer_type(config, 1); });
    static mha::forward_workspace<float> workspace;
    return time_layer(layer, qkv.topRows(p.d_model), p, out, workspace);
}

double layer_bf16(const paired::bf16_matrix& qkv, const paired::problem& p, Eigen::MatrixXf& out) {
    using layer_type = mha::multi_head_attention_bf16;
    const layer_type& layer = layer_for<layer_type>(p, [](const mha::attention_config& config) {
        return layer_type(mha::multi_head_attention<float>(config, 1));
    });
    static mha::bf16_forward_workspace workspace;
    return time_layer(layer, qkv.topRows(p.d_model), p, out, workspace);
}

}  // namespace

#undef mha

#define MHA_PAIRED_STRING_(x) #x
#define MHA_PAIRED_STRING(x) MHA_PAIRED_STRING_(x)

namespace paired {
revision MHA_PAIRED_CONCAT(revision_, MHA_PAIRED_REVISION)() {
    return {MHA_PAIRED_STRING(MHA_PAIRED_REVISION), &core_fp32, &core_bf16, &layer_fp32,
            &layer_bf16};
}
}  // namespace paired
