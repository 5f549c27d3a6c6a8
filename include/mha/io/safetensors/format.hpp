// SPDX-License-Identifier: MIT
/// @file
/// The safetensors format's shared parts: `mha::format_error`, `mha::tensor_info`, the reader's
/// limits, and the byte-level helpers of the reader and the writer (mha/io/safetensors.hpp is the
/// umbrella header and describes the format).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/io/half_precision.hpp>

#include <nlohmann/json.hpp>

namespace mha {

/// A file or buffer is not a valid safetensors file, or does not hold what was asked of it.
class format_error : public invalid_argument {
public:
    using invalid_argument::invalid_argument;
};

/// One tensor's entry in the header.
struct tensor_info {
    std::string dtype;                ///< "F32", "F64", "BOOL", ...
    std::vector<std::int64_t> shape;  ///< row-major, outermost first, as in PyTorch
    std::size_t begin = 0;            ///< byte offset of the first byte in the data section
    std::size_t end = 0;              ///< byte offset one past the last byte

    /// The number of elements: the product of the shape (1 for a scalar).
    std::int64_t numel() const {
        std::int64_t n = 1;
        for (std::int64_t d : shape)
            n *= d;
        return n;
    }
};

namespace detail {

/// Bytes per element of every dtype the format defines, 0 for an unknown name.
inline std::size_t safetensors_dtype_size(const std::string& dtype) {
    static const std::map<std::string, std::size_t> sizes = {
        {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
        {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
        {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
    const auto it = sizes.find(dtype);
    return it == sizes.end() ? 0 : it->second;
}

template <class T>
struct safetensors_dtype;
template <>
struct safetensors_dtype<float> {
    static constexpr const char* name = "F32";
};
template <>
struct safetensors_dtype<double> {
    static constexpr const char* name = "F64";
};
template <>
struct safetensors_dtype<bool> {
    static constexpr const char* name = "BOOL";
};
template <>
struct safetensors_dtype<Eigen::bfloat16> {
    static constexpr const char* name = "BF16";
};

/// The bfloat16 of the bit pattern `bits`, unchanged (a signalling NaN stays one: no arithmetic).
inline Eigen::bfloat16 bf16_from_bits(std::uint16_t bits) {
    static_assert(sizeof(Eigen::bfloat16) == sizeof(std::uint16_t) &&
                      std::is_trivially_copyable_v<Eigen::bfloat16>,
                  "Eigen::bfloat16 is 2 bytes copied as they are");
    Eigen::bfloat16 value;
    // Eigen::bfloat16 has a constructor but is trivially copyable: its bytes may be written.
    std::memcpy(static_cast<void*>(&value), &bits, sizeof bits);
    return value;
}

/// The bit pattern of `value`.
inline std::uint16_t bf16_to_bits(Eigen::bfloat16 value) {
    std::uint16_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

inline bool host_is_little_endian() {
    const std::uint16_t one = 1;
    unsigned char first = 0;
    std::memcpy(&first, &one, 1);
    return first == 1;
}

// The format is little-endian; on a big-endian host every element is reversed on the way.
template <class T>
T load_little_endian(const unsigned char* p) {
    unsigned char bytes[sizeof(T)];
    std::memcpy(bytes, p, sizeof(T));
    if (!host_is_little_endian()) std::reverse(bytes, bytes + sizeof(T));
    T value;
    std::memcpy(&value, bytes, sizeof(T));
    return value;
}

template <class T>
void store_little_endian(T value, std::vector<unsigned char>& out) {
    unsigned char bytes[sizeof(T)];
    std::memcpy(bytes, &value, sizeof(T));
    if (!host_is_little_endian()) std::reverse(bytes, bytes + sizeof(T));
    out.insert(out.end(), bytes, bytes + sizeof(T));
}

/// Text from a file, for an error message: at most `limit` characters, control and non-ASCII
/// bytes shown as '?', so that a message stays short and printable whatever the file holds.
inline std::string bounded_text(const std::string& text, std::size_t limit = 64) {
    std::string out = text.substr(0, limit);
    for (char& c : out)
        if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
    if (text.size() > limit) out += "...(" + std::to_string(text.size()) + " bytes)";
    return out;
}

/// A JSON value from a file, for an error message: scalars as JSON (strings bounded), arrays and
/// objects one level deep with at most 8 members. Never recurses, so neither the depth nor the
/// size of what a file holds bounds the message's cost.
inline std::string json_excerpt(const nlohmann::json& value) {
    const auto scalar = [](const nlohmann::json& v) -> std::string {
        if (v.is_string()) return "\"" + bounded_text(v.get_ref<const std::string&>()) + "\"";
        if (v.is_array()) return "[...]";
        if (v.is_object()) return "{...}";
        return v.dump();  // a number, a boolean or null: short
    };
    if (!value.is_array() && !value.is_object()) return scalar(value);
    std::string out = value.is_array() ? "[" : "{";
    std::size_t shown = 0;
    for (auto it = value.begin(); it != value.end(); ++it) {
        if (shown == 8) {
            out += ",...(" + std::to_string(value.size()) + " in all)";
            break;
        }
        out += shown++ == 0 ? "" : ",";  // separators as nlohmann's dump() writes them
        if (value.is_object()) out += "\"" + bounded_text(it.key()) + "\":";
        out += scalar(*it);
    }
    return out + (value.is_array() ? "]" : "}");
}

/// The rest of `in`. A directory opens, then fails on the first read (libstdc++ throws
/// ios_base::failure from the stream buffer): the reader promises format_error for every
/// unreadable file.
inline std::vector<unsigned char> read_all(std::ifstream& in, const char* where,
                                           const std::string& path) {
    std::vector<unsigned char> bytes;
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
    try {
        bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    } catch (const std::ios_base::failure& e) {
        fail<format_error>(where, "'" + path + "'", "a readable file",
                           std::string("a read error (") + e.what() + ")");
    }
#else
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
#endif
    return bytes;
}

inline std::string shape_text(const std::vector<std::int64_t>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        if (i == 16) {  // a file may give any number of dimensions of size 1
            s += ", ...(" + std::to_string(shape.size()) + " dimensions)";
            break;
        }
        s += (i ? ", " : "") + std::to_string(shape[i]);
    }
    return s + "]";
}

}  // namespace detail

/// The largest header the reader parses, in bytes: the limit of the reference implementation
/// (100 MB), far above what a header of tensor names and shapes needs.
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;
/// The deepest nesting of JSON arrays and objects the reader accepts in a header; a valid header
/// needs 3 (the header, a tensor's entry, its shape).
inline constexpr int safetensors_max_nesting = 16;

}  // namespace mha
