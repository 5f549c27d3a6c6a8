// SPDX-License-Identifier: MIT
/// @file
/// `mha::safetensors_writer`: named tensors and metadata collected, then written as one
/// safetensors file (floats as themselves, or stored as F16 or BF16; Eigen::bfloat16 as BF16).
#pragma once

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/io/half_precision.hpp>
#include <mha/io/safetensors/format.hpp>

#include <nlohmann/json.hpp>

namespace mha {

/// Collects named tensors and metadata and writes them as one safetensors file. Tensors are laid
/// out in the order they were added; names must be unique.
class safetensors_writer {
public:
    /// Sets a `__metadata__` entry (replacing one of the same key).
    void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

    /// Stores the float and double tensors added from now on as `dtype`: "F16" or "BF16" (rounded
    /// to nearest even, beyond the range to ±∞), or "" for their own type (F32, F64).
    /// Eigen::bfloat16 tensors are BF16 whatever this says.
    void set_float_dtype(const std::string& dtype) {
        if (!dtype.empty() && dtype != "F16" && dtype != "BF16")
            detail::fail<value_error>("mha::safetensors_writer::set_float_dtype", "dtype",
                                      "\"\", \"F16\" or \"BF16\"", "\"" + dtype + "\"");
        float_dtype_ = dtype;
    }

    /// A d × n matrix as a tensor of shape `shape` whose last dimension is d and whose leading
    /// dimensions multiply to n (default: (n, d)); the inverse of `safetensors_file::as_columns`.
    template <class Derived>
    void add_columns(const std::string& name, const Eigen::MatrixBase<Derived>& m,
                     std::vector<std::int64_t> shape = {}) {
        using T = typename Derived::Scalar;
        if (shape.empty())
            shape = {static_cast<std::int64_t>(m.cols()), static_cast<std::int64_t>(m.rows())};
        std::int64_t numel = 1;
        for (std::int64_t d : shape)
            numel *= d;
        if (numel != m.size() || (!shape.empty() && shape.back() != m.rows() && m.size() != 0))
            detail::fail<shape_error>("mha::safetensors_writer::add_columns",
                                      "shape of tensor '" + name + "'",
                                      "(..., " + std::to_string(m.rows()) + ") with " +
                                          std::to_string(m.size()) + " elements",
                                      detail::shape_text(shape));
        const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> column_major = m;
        add_raw(name, shape, column_major.data());
    }

    /// An r × c matrix as a (r, c) tensor with the same indexing (a PyTorch weight).
    template <class Derived>
    void add_matrix(const std::string& name, const Eigen::MatrixBase<Derived>& m) {
        add_columns(name, m.transpose(),
                    {static_cast<std::int64_t>(m.rows()), static_cast<std::int64_t>(m.cols())});
    }

    /// A vector as a 1-D tensor.
    template <class Derived>
    void add_vector(const std::string& name, const Eigen::MatrixBase<Derived>& v) {
        using T = typename Derived::Scalar;
        const Eigen::Matrix<T, Eigen::Dynamic, 1> copy = v.reshaped();
        add_raw(name, {static_cast<std::int64_t>(copy.size())}, copy.data());
    }

    /// `numel` elements of type T (float, double, Eigen::bfloat16 or bool) in row-major order for
    /// `shape`. Eigen::bfloat16 is stored as BF16, its bits unchanged (set_float_dtype does not
    /// apply to it).
    template <class T>
    void add_raw(const std::string& name, const std::vector<std::int64_t>& shape, const T* data) {
        for (const auto& t : tensors_)
            if (t.name == name)
                detail::fail<value_error>("mha::safetensors_writer", "tensor name '" + name + "'",
                                          "unique", "a second tensor of that name");
        if (name == "__metadata__")
            detail::fail<value_error>("mha::safetensors_writer", "tensor name",
                                      "anything but __metadata__", name);
        entry e;
        e.name = name;
        e.dtype = detail::safetensors_dtype<T>::name;
        e.shape = shape;
        std::int64_t numel = 1;
        for (std::int64_t d : shape)
            numel *= d;
        if constexpr (std::is_floating_point_v<T>) {
            if (!float_dtype_.empty()) {
                e.dtype = float_dtype_;
                const bool f16 = float_dtype_ == "F16";
                for (std::int64_t i = 0; i < numel; ++i) {
                    const auto x = static_cast<double>(data[i]);
                    detail::store_little_endian(f16 ? double_to_f16(x) : double_to_bf16(x),
                                                e.bytes);
                }
                tensors_.push_back(std::move(e));
                return;
            }
        }
        for (std::int64_t i = 0; i < numel; ++i) {
            if constexpr (std::is_same_v<T, bool>)
                e.bytes.push_back(data[i] ? 1 : 0);
            else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
                detail::store_little_endian(detail::bf16_to_bits(data[i]), e.bytes);
            else
                detail::store_little_endian(data[i], e.bytes);
        }
        tensors_.push_back(std::move(e));
    }

    /// The whole file. The header is padded with spaces to a multiple of 8 bytes so that the
    /// data section, and every 8-byte element in it, is aligned when the file is mapped.
    std::vector<unsigned char> bytes() const {
        nlohmann::ordered_json header = nlohmann::ordered_json::object();
        if (!metadata_.empty()) header["__metadata__"] = metadata_;
        std::size_t offset = 0;
        for (const auto& t : tensors_) {
            header[t.name] = {{"dtype", t.dtype},
                              {"shape", t.shape},
                              {"data_offsets", {offset, offset + t.bytes.size()}}};
            offset += t.bytes.size();
        }
        std::string text = header.dump();
        text.append((8 - text.size() % 8) % 8, ' ');
        std::vector<unsigned char> out;
        detail::store_little_endian(static_cast<std::uint64_t>(text.size()), out);
        out.insert(out.end(), text.begin(), text.end());
        for (const auto& t : tensors_)
            out.insert(out.end(), t.bytes.begin(), t.bytes.end());
        return out;
    }

    /// Writes the file (`bytes()`) to `path`; format_error if it cannot be written.
    void write(const std::string& path) const {
        const std::vector<unsigned char> b = bytes();
        std::ofstream out(path, std::ios::binary);
        out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
        out.close();
        if (!out)
            detail::fail<format_error>("mha::safetensors_writer::write", "'" + path + "'",
                                       "a writable file", "a write error");
    }

private:
    struct entry {
        std::string name;
        std::string dtype;
        std::vector<std::int64_t> shape;
        std::vector<unsigned char> bytes;
    };
    std::vector<entry> tensors_;
    std::map<std::string, std::string> metadata_;
    std::string float_dtype_;  ///< "" (each type as itself), "F16" or "BF16"
};

}  // namespace mha
