// SPDX-License-Identifier: MIT
/// @file
/// safetensors files: read and write named tensors, and import the weights of a PyTorch
/// `nn.MultiheadAttention` from its state_dict saved in that format, or of a Hugging Face
/// transformers attention module.
///
/// Optional part of the library: it needs nlohmann_json (CMake target `mha::safetensors`, created
/// only when nlohmann_json is found), and `mha/mha.hpp` does not include it, so the core keeps
/// depending on Eigen alone.
///
/// The format (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 N, then N
/// bytes of JSON `{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
/// "__metadata__": {"key": "value"}}`, then the data section. Offsets are relative to the data
/// section, tensors are row-major and little-endian, and together they cover the data section
/// exactly, with no gap and no overlap.
///
/// BF16 tensors read into Eigen::bfloat16 matrices with their bits unchanged (the storage of the
/// bfloat16 attention core), F32, F64 and F16 ones rounded once to nearest even; an
/// Eigen::bfloat16 matrix is written as BF16.
///
/// Every problem with a file's content (truncated, bad JSON, missing tensor, wrong dtype or shape,
/// offsets out of range, overlapping or leaving gaps) and failure to open or write a file throws
/// `mha::format_error`, which derives from `mha::invalid_argument` and so from
/// `std::invalid_argument` like every other error of the library. Messages have the library's form
/// `<function>: <what> must be <expected>, got <actual>`.
#pragma once

// The parts, each usable alone:
//   io/safetensors/format.hpp        format_error, tensor_info, limits, byte helpers
//   io/safetensors/file.hpp          safetensors_file: parse, validate, read tensors
//   io/safetensors/writer.hpp        safetensors_writer
//   io/safetensors/pytorch.hpp       load_multi_head_attention, save_multi_head_attention
//   io/safetensors/hugging_face.hpp  load_hugging_face_attention
#include <mha/io/safetensors/file.hpp>
#include <mha/io/safetensors/format.hpp>
#include <mha/io/safetensors/hugging_face.hpp>
#include <mha/io/safetensors/pytorch.hpp>
#include <mha/io/safetensors/writer.hpp>
