// SPDX-License-Identifier: MIT
// Umbrella header: everything the library offers but the safetensors reader (mha/io/), which
// needs nlohmann_json. Each header below also compiles on its own.
#pragma once

#include <mha/attention.hpp>
#include <mha/attention_backward.hpp>
#include <mha/attention_config.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/layer_backward.hpp>
#include <mha/mask.hpp>
#include <mha/multi_head_attention.hpp>
#include <mha/normalization.hpp>
#include <mha/options.hpp>
#include <mha/projection.hpp>
#include <mha/rotary.hpp>
