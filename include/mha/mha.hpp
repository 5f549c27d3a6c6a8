// SPDX-License-Identifier: MIT
// Umbrella header: everything the library offers. Each header below also compiles on its own.
#pragma once

#include <mha/attention.hpp>
#include <mha/batch.hpp>
#include <mha/config.hpp>
#include <mha/heads.hpp>
#include <mha/mask.hpp>
#include <mha/multi_head_attention.hpp>
#include <mha/projection.hpp>
#include <mha/softmax.hpp>
