// SPDX-License-Identifier: MIT
/// @file
/// Umbrella header: everything the library offers but the safetensors reader (mha/io/), which
/// needs nlohmann_json. Each header below also compiles on its own.
#pragma once

/// @mainpage mha: multi-head attention on Eigen
/// The reference of every public entity, built from the headers. Data layout: one column per
/// token, column-major; Q is d_k × Lq, K d_k × Lk, V d_v × Lk, scores and weights Lk × Lq.
///
/// Where to start:
/// - the layer: mha::multi_head_attention, configured by mha::attention_config;
/// - the attention kernels: mha::scaled_dot_product_attention and
///   mha::multi_head_attention_core, with mha::attention_options;
/// - masks: mha::attention_mask and the masks it composes (mha::causal, mha::sliding_window,
///   mha::key_lengths, mha::padded_keys, mha::keep_mask, mha::additive_bias);
/// - batches of sequences of different lengths: mha::packed_batch;
/// - decoding: mha::kv_cache; positions: mha::rotary_embedding;
/// - files: mha::safetensors_file, mha::safetensors_writer, mha::load_multi_head_attention
///   (mha/io/safetensors.hpp);
/// - macros a program may define: @ref configuration_macros.
///
/// The guides (API tour, semantics, PyTorch mapping, CMake use, decoding, performance) are the
/// Markdown files in the repository's docs/ folder.

#include <mha/attention.hpp>
#include <mha/attention_backward.hpp>
#include <mha/attention_bf16.hpp>
#include <mha/attention_config.hpp>
#include <mha/attention_states.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/layer_backward.hpp>
#include <mha/mask.hpp>
#include <mha/multi_head_attention.hpp>
#include <mha/multi_head_attention_bf16.hpp>
#include <mha/normalization.hpp>
#include <mha/options.hpp>
#include <mha/projection.hpp>
#include <mha/projection_bf16.hpp>
#include <mha/rotary.hpp>
#include <mha/score_modifiers.hpp>
