// SPDX-License-Identifier: MIT
// The interface between paired_attention.cpp (the driver) and revision.cpp (one revision of the
// library, compiled once per revision): plain functions that time one attention-core call, so
// that two revisions can be linked into one program and called in turn.
#pragma once

#include <Eigen/Core>

namespace paired {

using bf16_matrix = Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>;

enum class mask_kind { none, causal, window };

/// One sequence of `length` tokens, `heads` heads of d_model / heads; `window` is the number of
/// keys before each query that it sees with mask_kind::window.
struct problem {
    long d_model = 512;
    long heads = 8;
    long length = 2048;
    mask_kind mask = mask_kind::none;
    long window = 256;
};

/// One revision's attention core and whole layer. qkv is (3·d_model) × length: Q, K and V
/// stacked by rows, of which the layer takes the first d_model rows as its input; out is
/// d_model × length. Each returns the call's wall time in milliseconds, measured around the call
/// alone (the workspace, and the layer built on the first call, are kept between calls, so no
/// allocation is timed).
struct revision {
    using fp32_call = double (*)(const Eigen::MatrixXf& qkv, const problem& p,
                                 Eigen::MatrixXf& out);
    using bf16_call = double (*)(const bf16_matrix& qkv, const problem& p, Eigen::MatrixXf& out);
    const char* name;
    fp32_call core_fp32;
    bf16_call core_bf16;
    fp32_call layer_fp32;  // multi_head_attention<float>::forward_into, seed 1
    bf16_call layer_bf16;  // multi_head_attention_bf16 of the same parameters, fp32 output
};

revision revision_base();  // compiled with -DMHA_PAIRED_REVISION=base
revision revision_new();   // compiled with -DMHA_PAIRED_REVISION=new

}  // namespace paired
