// SPDX-License-Identifier: MIT
/// @file
/// safetensors files: read and write named tensors, and import the weights of a PyTorch
/// `nn.MultiheadAttention` from its state_dict saved in that format.
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
/// Every problem with a file's content (truncated, bad JSON, missing tensor, wrong dtype or shape,
/// offsets out of range, overlapping or leaving gaps) and failure to open or write a file throws
/// `mha::format_error`, which derives from `mha::invalid_argument` and so from
/// `std::invalid_argument` like every other error of the library. Messages have the library's form
/// `<function>: <what> must be <expected>, got <actual>`.
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
#include <mha/multi_head_attention.hpp>

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

/// A parsed safetensors file held in memory. Construction validates the whole header, so every
/// accessor afterwards only checks what the caller asks for (presence, dtype, shape).
class safetensors_file {
public:
    /// Reads and validates the file at `path`.
    static safetensors_file read(const std::string& path) {
        constexpr const char* where = "mha::safetensors_file::read";
        std::ifstream in(path, std::ios::binary);
        if (!in)
            detail::fail<format_error>(where, "'" + path + "'", "a readable file",
                                       "a file that cannot be opened");
        std::vector<unsigned char> bytes = detail::read_all(in, where, path);
        if (in.bad())
            detail::fail<format_error>(where, "'" + path + "'", "a readable file", "a read error");
        return parse(std::move(bytes), path);
    }

    /// Validates `bytes` as a safetensors file; `source` names it in error messages.
    static safetensors_file parse(std::vector<unsigned char> bytes,
                                  const std::string& source = "<memory>") {
        safetensors_file f;
        f.source_ = source;
        f.bytes_ = std::move(bytes);
        f.validate();
        return f;
    }

    /// Where the file came from (its path, or the `source` given to `parse`), as messages name it.
    const std::string& source() const { return source_; }

    /// Whether the file holds a tensor of that name.
    bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

    /// Tensor names in sorted order.
    std::vector<std::string> names() const {
        std::vector<std::string> result;
        for (const auto& entry : tensors_)
            result.push_back(entry.first);
        return result;
    }

    /// The header entry of `name`; throws format_error listing the file's tensors if absent.
    const tensor_info& info(const std::string& name) const {
        const auto it = tensors_.find(name);
        if (it == tensors_.end()) {
            // The names come from the file: a bounded list of bounded names.
            std::string present;
            std::size_t listed = 0;
            for (const auto& entry : tensors_) {
                if (listed++ == 16) {
                    present += ", ...(" + std::to_string(tensors_.size()) + " in all)";
                    break;
                }
                present += (present.empty() ? "" : ", ") + detail::bounded_text(entry.first);
            }
            detail::fail<format_error>(
                where().c_str(), "tensor '" + name + "'", "present",
                "absent (the file has: " + (present.empty() ? std::string("nothing") : present) +
                    ")");
        }
        return it->second;
    }

    /// The `__metadata__` string map (empty when the file has none).
    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    /// The metadata value of `key`, or `fallback` when the file has none.
    std::string metadata(const std::string& key, const std::string& fallback) const {
        const auto it = metadata_.find(key);
        return it == metadata_.end() ? fallback : it->second;
    }

    /// Throws format_error unless `name` has dtype `T` and, when `shape` is not empty, that shape.
    /// `meaning` explains the expected shape in the message (e.g. "(3·embed_dim, embed_dim)").
    template <class T>
    const tensor_info& expect(const std::string& name, const std::vector<std::int64_t>& shape = {},
                              const std::string& meaning = "") const {
        const tensor_info& t = info(name);
        // Half-precision checkpoints widen exactly to float and double.
        constexpr bool widens_half = std::is_floating_point_v<T>;
        const bool half = t.dtype == "F16" || t.dtype == "BF16";
        if (t.dtype != detail::safetensors_dtype<T>::name && !(widens_half && half))
            detail::fail<format_error>(where().c_str(), "dtype of tensor '" + name + "'",
                                       std::string(detail::safetensors_dtype<T>::name) +
                                           (widens_half ? " (or F16, BF16)" : ""),
                                       t.dtype);
        if (!shape.empty() && t.shape != shape)
            detail::fail<format_error>(
                where().c_str(), "shape of tensor '" + name + "'",
                detail::shape_text(shape) + (meaning.empty() ? "" : " " + meaning),
                detail::shape_text(t.shape));
        return t;
    }

    /// The elements of `name` in storage (row-major) order; dtype must be T, or F16 or BF16 when T
    /// is float or double (converted exactly).
    template <class T>
    std::vector<T> values(const std::string& name) const {
        const tensor_info& t = expect<T>(name);
        std::vector<T> result(static_cast<std::size_t>(t.numel()));
        const unsigned char* p = data() + t.begin;
        if constexpr (std::is_floating_point_v<T>) {
            if (t.dtype == "F16" || t.dtype == "BF16") {
                const bool f16 = t.dtype == "F16";
                for (std::size_t i = 0; i < result.size(); ++i) {
                    const auto bits = detail::load_little_endian<std::uint16_t>(p + 2 * i);
                    result[i] = static_cast<T>(f16 ? f16_to_float(bits) : bf16_to_float(bits));
                }
                return result;
            }
        }
        for (std::size_t i = 0; i < result.size(); ++i) {
            if constexpr (std::is_same_v<T, bool>)
                result[i] = p[i] != 0;
            else
                result[i] = detail::load_little_endian<T>(p + i * sizeof(T));
        }
        return result;
    }

    /// A tensor of shape (..., d) as a d × n matrix, n the product of the leading dimensions: one
    /// column per row of the tensor, the same bytes. A (L, E) activation becomes E × L, a
    /// (N, L, E) batch becomes E × (N·L) with the sequences side by side, a (L, S) mask or weight
    /// becomes S × L (keys × queries). A 0-d tensor is 1 × 1.
    template <class T>
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> as_columns(const std::string& name) const {
        const tensor_info& t = expect<T>(name);
        const std::int64_t rows = t.shape.empty() ? 1 : t.shape.back();
        const std::vector<T> v = values<T>(name);
        // Columns from the leading dimensions, not numel / rows, so a (N, 0) tensor is 0 × N.
        Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> m(rows, leading(t));
        std::copy(v.begin(), v.end(), m.data());
        return m;
    }

    /// A 2-D tensor (r, c) as the r × c matrix with the same indexing, as PyTorch's
    /// `Linear.weight` (out, in) is used by the library.
    template <class T>
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> as_matrix(const std::string& name) const {
        const tensor_info& t = expect<T>(name);
        if (t.shape.size() != 2)
            detail::fail<format_error>(where().c_str(), "rank of tensor '" + name + "'", 2,
                                       static_cast<Index>(t.shape.size()));
        // An empty tensor may still have a huge dimension ([0, 2^60]): give its shape without
        // a transpose, whose loops would run over that dimension.
        if (t.numel() == 0)
            return Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>(t.shape[0], t.shape[1]);
        // Row-major (r, c) is the bytes of a column-major c × r matrix: transpose that.
        return as_columns<T>(name).transpose();
    }

    /// A 1-D tensor as a column vector.
    template <class T>
    Eigen::Matrix<T, Eigen::Dynamic, 1> as_vector(const std::string& name) const {
        const tensor_info& t = expect<T>(name);
        if (t.shape.size() != 1)
            detail::fail<format_error>(where().c_str(), "rank of tensor '" + name + "'", 1,
                                       static_cast<Index>(t.shape.size()));
        const std::vector<T> v = values<T>(name);
        Eigen::Matrix<T, Eigen::Dynamic, 1> result(static_cast<Index>(v.size()));
        std::copy(v.begin(), v.end(), result.data());
        return result;
    }

private:
    std::string where() const { return "mha::safetensors_file(" + source_ + ")"; }
    const unsigned char* data() const { return bytes_.data() + data_start_; }

    static std::int64_t leading(const tensor_info& t) {
        std::int64_t n = 1;
        for (std::size_t i = 0; i + 1 < t.shape.size(); ++i)
            n *= t.shape[i];
        return n;
    }

    void validate() {
        const std::string w = where();
        const char* at = w.c_str();
        if (bytes_.size() < 8)
            detail::fail<format_error>(at, "file size", "at least 8 bytes (the header length)",
                                       std::to_string(bytes_.size()) + " bytes");
        const auto header_length = detail::load_little_endian<std::uint64_t>(bytes_.data());
        const std::uint64_t available = bytes_.size() - 8;
        if (header_length > available)
            detail::fail<format_error>(
                at, "header length",
                "at most " + std::to_string(available) + " (the bytes after the length field)",
                header_length);
        if (header_length > safetensors_max_header_bytes)
            detail::fail<format_error>(
                at, "header length",
                "at most " + std::to_string(safetensors_max_header_bytes) + " bytes",
                header_length);
        data_start_ = 8 + static_cast<std::size_t>(header_length);
        const std::size_t data_size = bytes_.size() - data_start_;
        check_nesting(at, bytes_.data() + 8, bytes_.data() + data_start_);

        // nlohmann keeps the last of duplicate keys silently; a file whose second "w" replaces
        // the "w" a checker looked at is an attack, so the parse records every object's keys.
        std::vector<std::set<std::string>> keys;
        std::string duplicate;
        const nlohmann::json::parser_callback_t record_keys =
            [&keys, &duplicate](int, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
                using event_t = nlohmann::json::parse_event_t;
                if (event == event_t::object_start) {
                    keys.emplace_back();
                } else if (event == event_t::object_end) {
                    keys.pop_back();
                } else if (event == event_t::key && !keys.empty()) {
                    const std::string& key = parsed.get_ref<const std::string&>();
                    if (!keys.back().insert(key).second && duplicate.empty()) duplicate = key;
                }
                return true;
            };
        const auto header = nlohmann::json::parse(
            bytes_.begin() + 8, bytes_.begin() + static_cast<std::ptrdiff_t>(data_start_),
            record_keys, /*allow_exceptions=*/false);
        if (!header.is_discarded() && !duplicate.empty())
            detail::fail<format_error>(at, "header keys", "unique within each object",
                                       "\"" + detail::bounded_text(duplicate) + "\" twice");
        if (header.is_discarded()) {
            // Show the start of the text so the reader can tell garbage from a truncated header.
            std::string excerpt(
                bytes_.begin() + 8,
                bytes_.begin() + 8 +
                    static_cast<std::ptrdiff_t>(std::min<std::uint64_t>(header_length, 40)));
            for (char& c : excerpt)
                if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e)
                    c = '?';
            detail::fail<format_error>(at, "header", "valid JSON",
                                       "text that does not parse: \"" + excerpt + "\"");
        }
        if (!header.is_object())
            detail::fail<format_error>(at, "header", "a JSON object", header.type_name());

        for (const auto& item : header.items()) {
            const std::string& name = item.key();
            const auto& entry = item.value();
            if (name == "__metadata__") {
                if (!entry.is_object())
                    detail::fail<format_error>(at, "__metadata__", "an object of strings",
                                               entry.type_name());
                for (const auto& m : entry.items()) {
                    if (!m.value().is_string())
                        detail::fail<format_error>(
                            at, "__metadata__[\"" + detail::bounded_text(m.key()) + "\"]",
                            "a string", m.value().type_name());
                    metadata_[m.key()] = m.value().get<std::string>();
                }
                continue;
            }
            tensors_[name] = parse_entry(at, name, entry, data_size);
        }

        // The tensors must tile the data section: sorted by offset, each starts where the
        // previous one ended, the first at 0 and the last at the end.
        std::vector<std::pair<std::string, const tensor_info*>> order;
        for (const auto& entry : tensors_)
            order.emplace_back(entry.first, &entry.second);
        std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
            return std::make_pair(a.second->begin, a.second->end) <
                   std::make_pair(b.second->begin, b.second->end);
        });
        std::size_t expected_begin = 0;
        std::string previous = "the start of the data section";
        for (const auto& [name, t] : order) {
            if (t->begin < expected_begin)
                detail::fail<format_error>(
                    at, "data_offsets of tensor '" + detail::bounded_text(name) + "'",
                    "not overlapping: begin >= " + std::to_string(expected_begin) + " (end of " +
                        previous + ")",
                    t->begin);
            if (t->begin > expected_begin)
                detail::fail<format_error>(
                    at, "data_offsets of tensor '" + detail::bounded_text(name) + "'",
                    "contiguous: begin == " + std::to_string(expected_begin) + " (end of " +
                        previous + ")",
                    t->begin);
            expected_begin = t->end;
            previous = "tensor '" + detail::bounded_text(name) + "'";
        }
        if (expected_begin != data_size)
            detail::fail<format_error>(
                at, "data section size",
                std::to_string(expected_begin) + " bytes (the end of " + previous + ")",
                std::to_string(data_size) + " bytes");
    }

    // Refuses headers nested deeper than safetensors_max_nesting before the JSON parser sees
    // them: one linear pass over the text, skipping strings.
    static void check_nesting(const char* at, const unsigned char* begin,
                              const unsigned char* end) {
        int depth = 0;
        bool in_string = false, escaped = false;
        for (const unsigned char* p = begin; p != end; ++p) {
            const unsigned char c = *p;
            if (in_string) {
                if (escaped)
                    escaped = false;
                else if (c == '\\')
                    escaped = true;
                else if (c == '"')
                    in_string = false;
            } else if (c == '"') {
                in_string = true;
            } else if (c == '[' || c == '{') {
                if (++depth > safetensors_max_nesting)
                    detail::fail<format_error>(
                        at, "header nesting depth",
                        "at most " + std::to_string(safetensors_max_nesting),
                        "deeper, at byte " + std::to_string(8 + (p - begin)) + " of the file");
            } else if (c == ']' || c == '}') {
                --depth;
            }
        }
    }

    static tensor_info parse_entry(const char* at, const std::string& name,
                                   const nlohmann::json& entry, std::size_t data_size) {
        const std::string label = "tensor '" + detail::bounded_text(name) + "'";
        if (!entry.is_object())
            detail::fail<format_error>(at, label, "an object", entry.type_name());
        tensor_info t;
        const auto dtype = entry.find("dtype");
        if (dtype == entry.end() || !dtype->is_string())
            detail::fail<format_error>(at, label + " dtype", "a string",
                                       dtype == entry.end() ? "nothing" : dtype->type_name());
        t.dtype = dtype->get<std::string>();
        const std::size_t element = detail::safetensors_dtype_size(t.dtype);
        if (element == 0)
            detail::fail<format_error>(at, label + " dtype",
                                       "one of BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, "
                                       "BF16, I32, U32, F32, F64, I64, U64",
                                       "\"" + detail::bounded_text(t.dtype) + "\"");

        const auto shape = entry.find("shape");
        if (shape == entry.end() || !shape->is_array())
            detail::fail<format_error>(at, label + " shape", "an array",
                                       shape == entry.end() ? "nothing" : shape->type_name());
        // Every product of dimensions the accessors form (element count, leading dimensions,
        // bytes) must fit in Index. A 0 makes the element count 0 but not the other dimensions
        // small, so the bound is on the product of the non-zero ones, bytes included.
        const auto limit = static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
        std::uint64_t nonzero_bytes = element;
        bool empty = false;
        for (const auto& d : *shape) {
            if (!d.is_number_unsigned())
                detail::fail<format_error>(at, label + " shape", "non-negative integers",
                                           detail::json_excerpt(d));
            const auto dim = d.get<std::uint64_t>();
            if (dim > limit / nonzero_bytes)
                detail::fail<format_error>(at, label + " shape",
                                           "dimensions whose non-zero product times " +
                                               std::to_string(element) + " bytes is at most " +
                                               std::to_string(limit),
                                           detail::json_excerpt(*shape));
            if (dim == 0)
                empty = true;
            else
                nonzero_bytes *= dim;
            t.shape.push_back(static_cast<std::int64_t>(dim));
        }
        const std::uint64_t numel = empty ? 0 : nonzero_bytes / element;

        const auto offsets = entry.find("data_offsets");
        if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
            !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned())
            detail::fail<format_error>(
                at, label + " data_offsets", "an array of two non-negative integers",
                offsets == entry.end() ? std::string("nothing") : detail::json_excerpt(*offsets));
        const auto begin = (*offsets)[0].get<std::uint64_t>();
        const auto end = (*offsets)[1].get<std::uint64_t>();
        if (begin > end)
            detail::fail<format_error>(at, label + " data_offsets",
                                       "[begin, end] with begin <= end",
                                       detail::json_excerpt(*offsets));
        if (end > data_size)
            detail::fail<format_error>(
                at, label + " data_offsets",
                "within the data section (end <= " + std::to_string(data_size) + ")",
                detail::json_excerpt(*offsets));
        if (end - begin != numel * element)
            detail::fail<format_error>(at, label + " byte size",
                                       std::to_string(numel * element) + " (" + t.dtype + " " +
                                           detail::shape_text(t.shape) + ")",
                                       end - begin);
        t.begin = static_cast<std::size_t>(begin);
        t.end = static_cast<std::size_t>(end);
        return t;
    }

    std::string source_;
    std::vector<unsigned char> bytes_;
    std::size_t data_start_ = 8;
    std::map<std::string, tensor_info> tensors_;
    std::map<std::string, std::string> metadata_;
};

/// Collects named tensors and metadata and writes them as one safetensors file. Tensors are laid
/// out in the order they were added; names must be unique.
class safetensors_writer {
public:
    /// Sets a `__metadata__` entry (replacing one of the same key).
    void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

    /// Stores the float and double tensors added from now on as `dtype`: "F16" or "BF16" (rounded
    /// to nearest even, beyond the range to ±∞), or "" for their own type (F32, F64).
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

    /// `numel` elements of type T (float, double or bool) in row-major order for `shape`.
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

/// The layer whose weights are a PyTorch `nn.MultiheadAttention` state_dict in `file`, names
/// prefixed by `prefix` (e.g. "encoder.self_attn."): `in_proj_weight` (3E × E) when PyTorch
/// packs the projections, else `q_proj_weight` (E × E), `k_proj_weight` (E × kdim) and
/// `v_proj_weight` (E × vdim); `in_proj_bias` (3E) and `out_proj.bias` (E) with bias=True;
/// `out_proj.weight` (E × E). The number of heads is not in a state_dict, so it is an argument.
/// The tensors' dtype must be Scalar's (F32 for float, F64 for double). `bias_k`/`bias_v`
/// (add_bias_kv=True) have no equivalent here and are refused.
///
/// The separate form also accepts what the library allows beyond PyTorch: H·d_k rows in
/// `q_proj_weight`, H_kv·d_k in `k_proj_weight` and H_kv·d_v in `v_proj_weight`, H·d_v columns
/// in `out_proj.weight` (grouped heads: `num_kv_heads` key/value heads, see the overload below).
template <class Scalar>
multi_head_attention<Scalar> load_multi_head_attention(const safetensors_file& file,
                                                       Index num_heads,
                                                       const std::string& prefix = "") {
    return load_multi_head_attention<Scalar>(file, num_heads, num_heads, prefix);
}

/// The layer with `num_kv_heads` key/value heads shared by groups of query heads (grouped-query
/// attention), from the separate form: `k_proj_weight` and `v_proj_weight` have H_kv·d_k and
/// H_kv·d_v rows, `in_proj_bias` has H·d_k + H_kv·(d_k + d_v) entries.
template <class Scalar>
multi_head_attention<Scalar> load_multi_head_attention(const safetensors_file& file,
                                                       Index num_heads, Index num_kv_heads,
                                                       const std::string& prefix = "") {
    constexpr const char* where = "mha::load_multi_head_attention";
    const auto n = [&prefix](const char* name) { return prefix + name; };
    if (num_heads <= 0) detail::fail<value_error>(where, "num_heads", ">= 1", num_heads);
    if (num_kv_heads <= 0) detail::fail<value_error>(where, "num_kv_heads", ">= 1", num_kv_heads);
    if (num_heads % num_kv_heads != 0)
        detail::fail<shape_error>(where, "num_heads",
                                  "a multiple of num_kv_heads = " + std::to_string(num_kv_heads),
                                  num_heads);
    for (const char* unsupported : {"bias_k", "bias_v"})
        if (file.contains(n(unsupported)))
            detail::fail<format_error>(where, "tensor '" + n(unsupported) + "'",
                                       "absent (add_bias_kv=True is not supported)", "present");

    const tensor_info& out_w = file.expect<Scalar>(n("out_proj.weight"));
    if (out_w.shape.size() != 2)
        detail::fail<format_error>(where, "shape of tensor '" + n("out_proj.weight") + "'",
                                   "(embed_dim, H·d_v)", detail::shape_text(out_w.shape));
    const std::int64_t e = out_w.shape[0];
    const std::int64_t vw = out_w.shape[1];
    const auto fail_heads = [&](const std::string& tensor, std::int64_t width) {
        detail::fail<format_error>(where, "rows of tensor '" + tensor + "'",
                                   "a multiple of num_heads = " + std::to_string(num_heads), width);
    };

    attention_config config;
    config.embed_dim = e;
    config.num_heads = num_heads;
    config.num_kv_heads = num_kv_heads;
    config.bias = file.contains(n("in_proj_bias"));
    if (file.contains(n("out_proj.bias")) != config.bias)
        detail::fail<format_error>(
            where, "tensor '" + n("out_proj.bias") + "'",
            config.bias ? "present (in_proj_bias is)" : "absent (in_proj_bias is)",
            config.bias ? "absent" : "present");

    attention_parameters<Scalar> p;
    std::int64_t qk = 0, kw = 0, kvw = 0;
    if (file.contains(n("in_proj_weight"))) {
        if (num_kv_heads != num_heads)
            detail::fail<format_error>(where, "tensor '" + n("in_proj_weight") + "'",
                                       "absent with grouped heads (PyTorch packs only equal "
                                       "Q, K and V widths; give q_, k_, v_proj_weight)",
                                       "present");
        // PyTorch packs only when kdim = vdim = E, and then every block is E × E.
        if (e % num_heads != 0) fail_heads(n("out_proj.weight"), e);
        const Index three_e = detail::checked_mul<format_error>(
            where, "3 * embed_dim (rows of out_proj.weight)", 3, e);
        file.expect<Scalar>(n("in_proj_weight"), {three_e, e}, "(3·embed_dim, embed_dim)");
        file.expect<Scalar>(n("out_proj.weight"), {e, e}, "(embed_dim, embed_dim)");
        const matrix<Scalar> w = file.as_matrix<Scalar>(n("in_proj_weight"));
        qk = kw = kvw = e;
        p.w_q = w.topRows(e);
        p.w_k = w.middleRows(e, e);
        p.w_v = w.bottomRows(e);
    } else {
        if (!file.contains(n("q_proj_weight")))
            detail::fail<format_error>(
                where, "tensor '" + n("in_proj_weight") + "' or '" + n("q_proj_weight") + "'",
                "present", "neither");
        const tensor_info& q = file.expect<Scalar>(n("q_proj_weight"));
        if (q.shape.size() != 2 || q.shape[1] != e)
            detail::fail<format_error>(where, "shape of tensor '" + n("q_proj_weight") + "'",
                                       "(H·d_k, embed_dim = " + std::to_string(e) + ")",
                                       detail::shape_text(q.shape));
        qk = q.shape[0];
        if (qk % num_heads != 0) fail_heads(n("q_proj_weight"), qk);
        if (vw % num_heads != 0) fail_heads(n("v_proj_weight"), vw);
        const tensor_info& k = file.expect<Scalar>(n("k_proj_weight"));
        const tensor_info& v = file.expect<Scalar>(n("v_proj_weight"));
        const bool grouped = num_kv_heads != num_heads;
        kw = qk / num_heads * num_kv_heads;
        kvw = vw / num_heads * num_kv_heads;
        if (k.shape.size() != 2 || k.shape[0] != kw)
            detail::fail<format_error>(
                where, "shape of tensor '" + n("k_proj_weight") + "'",
                "(" + std::to_string(kw) +
                    (grouped ? " (num_kv_heads · d_k)" : " (rows of q_proj_weight)") + ", kdim)",
                detail::shape_text(k.shape));
        if (v.shape.size() != 2 || v.shape[0] != kvw)
            detail::fail<format_error>(
                where, "shape of tensor '" + n("v_proj_weight") + "'",
                "(" + std::to_string(kvw) +
                    (grouped ? " (num_kv_heads · d_v)" : " (columns of out_proj.weight)") +
                    ", vdim)",
                detail::shape_text(v.shape));
        config.head_dim = qk / num_heads;
        config.value_head_dim = vw / num_heads;
        config.key_input_dim = k.shape[1];
        config.value_input_dim = v.shape[1];
        p.w_q = file.as_matrix<Scalar>(n("q_proj_weight"));
        p.w_k = file.as_matrix<Scalar>(n("k_proj_weight"));
        p.w_v = file.as_matrix<Scalar>(n("v_proj_weight"));
    }
    p.w_o = file.as_matrix<Scalar>(n("out_proj.weight"));
    if (config.bias) {
        const Index in_bias = detail::checked_add<format_error>(
            where, "the size of in_proj_bias",
            detail::checked_add<format_error>(where, "the size of in_proj_bias", qk, kw), kvw);
        file.expect<Scalar>(
            n("in_proj_bias"), {in_bias},
            num_kv_heads == num_heads ? "(2·H·d_k + H·d_v)" : "(H·d_k + H_kv·d_k + H_kv·d_v)");
        file.expect<Scalar>(n("out_proj.bias"), {e}, "(embed_dim)");
        const vector<Scalar> b = file.as_vector<Scalar>(n("in_proj_bias"));
        p.b_q = b.head(qk);
        p.b_k = b.segment(qk, kw);
        p.b_v = b.tail(kvw);
        p.b_o = file.as_vector<Scalar>(n("out_proj.bias"));
    }
    // Shapes that agree with each other can still describe no layer (zero widths, a scale...):
    // the layer's own checks decide, and their verdict is a verdict on the file.
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
    try {
        return multi_head_attention<Scalar>(config, p);
    } catch (const format_error&) {
        throw;
    } catch (const invalid_argument& refused) {
        detail::fail<format_error>(where, "the weights in " + file.source(), "a valid layer",
                                   std::string("one the layer refuses (") + refused.what() + ")");
    }
#else
    return multi_head_attention<Scalar>(config, p);
#endif
}

/// The layer whose weights follow the Hugging Face transformers names of an attention module
/// (Llama, Mistral, Qwen2, BART, OPT, Whisper, ...), names prefixed by `prefix` (e.g.
/// "model.layers.0.self_attn."):
///
/// | file | here |
/// |---|---|
/// | `q_proj.weight` (H·d_k × E) | `w_q` |
/// | `k_proj.weight` (H_kv·d_k × kdim) | `w_k` |
/// | `v_proj.weight` (H_kv·d_v × vdim) | `w_v` |
/// | `o_proj.weight` or `out_proj.weight` (E × H·d_v) | `w_o` |
/// | `q_proj.bias`, `k_proj.bias`, `v_proj.bias`, `o_proj.bias` / `out_proj.bias` | `b_q`, `b_k`,
/// `b_v`, `b_o` |
/// | `sinks` (H), optional (gpt-oss) | `config().attention.sinks` |
///
/// Each is an `nn.Linear` weight (out × in, y = W·x + b), the library's convention, so nothing is
/// transposed. Biases are optional one by one: with none the layer has no bias; with some (Qwen2
/// has q, k and v biases but none on o_proj) the absent ones are zero. Exactly one of `o_proj`
/// and `out_proj` must be present. Neither the head counts nor a rotary embedding (Llama applies
/// RoPE to Q and K) are in these tensors: `num_heads` and `num_kv_heads` are arguments, and
/// `base` supplies the settings the file cannot (rotary, scale, normalisation, algorithm); its
/// widths are ignored. Every tensor must be Scalar's dtype (or F16, BF16); a missing or
/// misshapen one is a format_error naming it.
template <class Scalar>
multi_head_attention<Scalar> load_hugging_face_attention(const safetensors_file& file,
                                                         Index num_heads, Index num_kv_heads,
                                                         const std::string& prefix = "",
                                                         const attention_config& base = {}) {
    constexpr const char* where = "mha::load_hugging_face_attention";
    const auto n = [&prefix](const std::string& name) { return prefix + name; };
    if (num_heads <= 0) detail::fail<value_error>(where, "num_heads", ">= 1", num_heads);
    if (num_kv_heads <= 0) detail::fail<value_error>(where, "num_kv_heads", ">= 1", num_kv_heads);
    if (num_heads % num_kv_heads != 0)
        detail::fail<shape_error>(where, "num_heads",
                                  "a multiple of num_kv_heads = " + std::to_string(num_kv_heads),
                                  num_heads);
    const bool o_proj = file.contains(n("o_proj.weight"));
    const bool out_proj = file.contains(n("out_proj.weight"));
    if (o_proj == out_proj)
        detail::fail<format_error>(
            where, "tensors '" + n("o_proj.weight") + "' and '" + n("out_proj.weight") + "'",
            "exactly one present", o_proj ? "both" : "neither");
    const std::string out_name = o_proj ? "o_proj" : "out_proj";

    // A 2-D tensor's shape, after checking its dtype and rank.
    const auto shape_of = [&](const std::string& name) {
        const tensor_info& t = file.expect<Scalar>(n(name));
        if (t.shape.size() != 2)
            detail::fail<format_error>(where, "shape of tensor '" + n(name) + "'",
                                       "2-D (out_features, in_features)",
                                       detail::shape_text(t.shape));
        return t.shape;
    };
    const auto o = shape_of(out_name + ".weight");
    const auto q = shape_of("q_proj.weight");
    const auto k = shape_of("k_proj.weight");
    const auto v = shape_of("v_proj.weight");
    const std::int64_t e = o[0];
    const auto require = [&](const std::string& name, bool ok, const std::string& expected,
                             const std::vector<std::int64_t>& shape) {
        if (!ok)
            detail::fail<format_error>(where, "shape of tensor '" + n(name) + "'", expected,
                                       detail::shape_text(shape));
    };
    require("q_proj.weight", q[1] == e && q[0] % num_heads == 0,
            "(a multiple of num_heads = " + std::to_string(num_heads) +
                ", embed_dim = " + std::to_string(e) + ")",
            q);
    require(out_name + ".weight", o[1] % num_heads == 0,
            "(embed_dim, a multiple of num_heads = " + std::to_string(num_heads) + ")", o);
    const std::int64_t head_dim = q[0] / num_heads, value_head_dim = o[1] / num_heads;
    require("k_proj.weight", k[0] == num_kv_heads * head_dim,
            "(" + std::to_string(num_kv_heads * head_dim) + " (num_kv_heads · d_k), kdim)", k);
    require("v_proj.weight", v[0] == num_kv_heads * value_head_dim,
            "(" + std::to_string(num_kv_heads * value_head_dim) + " (num_kv_heads · d_v), vdim)",
            v);

    attention_config config = base;
    config.embed_dim = e;
    config.num_heads = num_heads;
    config.num_kv_heads = num_kv_heads;
    config.head_dim = head_dim;
    config.value_head_dim = value_head_dim;
    config.key_input_dim = k[1];
    config.value_input_dim = v[1];
    attention_parameters<Scalar> p;
    p.w_q = file.as_matrix<Scalar>(n("q_proj.weight"));
    p.w_k = file.as_matrix<Scalar>(n("k_proj.weight"));
    p.w_v = file.as_matrix<Scalar>(n("v_proj.weight"));
    p.w_o = file.as_matrix<Scalar>(n(out_name + ".weight"));
    const std::string bias_names[] = {"q_proj.bias", "k_proj.bias", "v_proj.bias",
                                      out_name + ".bias"};
    const std::int64_t bias_sizes[] = {q[0], k[0], v[0], e};
    vector<Scalar>* biases[] = {&p.b_q, &p.b_k, &p.b_v, &p.b_o};
    config.bias = false;
    for (const auto& name : bias_names)
        config.bias = config.bias || file.contains(n(name));
    if (config.bias) {
        for (int i = 0; i < 4; ++i) {
            if (!file.contains(n(bias_names[i]))) {
                *biases[i] = vector<Scalar>::Zero(bias_sizes[i]);
                continue;
            }
            file.expect<Scalar>(n(bias_names[i]), {bias_sizes[i]});
            *biases[i] = file.as_vector<Scalar>(n(bias_names[i]));
        }
    }
    // gpt-oss's per-head sink logits: they take part in the softmax normaliser (one value per
    // query head), configuration rather than a parameter here (docs/score_modifiers.md).
    if (file.contains(n("sinks"))) {
        file.expect<Scalar>(n("sinks"), {num_heads});
        const vector<Scalar> sinks = file.as_vector<Scalar>(n("sinks"));
        config.attention.sinks.assign(sinks.data(), sinks.data() + sinks.size());
    }
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
    try {
        return multi_head_attention<Scalar>(config, p);
    } catch (const format_error&) {
        throw;
    } catch (const invalid_argument& refused) {
        detail::fail<format_error>(where, "the weights in " + file.source(), "a valid layer",
                                   std::string("one the layer refuses (") + refused.what() + ")");
    }
#else
    return multi_head_attention<Scalar>(config, p);
#endif
}

/// Adds `layer`'s weights to `out` under PyTorch's state_dict names (prefixed by `prefix`):
/// `in_proj_weight` when PyTorch would pack them (kdim = vdim = E, d_k = d_v = E/H, no grouped
/// heads), else the three separate projections; biases only when the layer has them. The head
/// counts are not stored: load with the same num_heads and num_kv_heads.
template <class Scalar>
void save_multi_head_attention(safetensors_writer& out, const multi_head_attention<Scalar>& layer,
                               const std::string& prefix = "") {
    const attention_config& c = layer.config();
    const attention_parameters<Scalar> p = layer.parameters();
    const bool packed = c.key_input_dim == c.embed_dim && c.value_input_dim == c.embed_dim &&
                        layer.qk_width() == c.embed_dim && layer.v_width() == c.embed_dim &&
                        c.num_kv_heads == c.num_heads;
    if (packed) {
        matrix<Scalar> w(3 * c.embed_dim, c.embed_dim);
        w << p.w_q, p.w_k, p.w_v;
        out.add_matrix(prefix + "in_proj_weight", w);
    } else {
        out.add_matrix(prefix + "q_proj_weight", p.w_q);
        out.add_matrix(prefix + "k_proj_weight", p.w_k);
        out.add_matrix(prefix + "v_proj_weight", p.w_v);
    }
    if (c.bias) {
        vector<Scalar> b(p.b_q.size() + p.b_k.size() + p.b_v.size());
        b << p.b_q, p.b_k, p.b_v;
        out.add_vector(prefix + "in_proj_bias", b);
    }
    out.add_matrix(prefix + "out_proj.weight", p.w_o);
    if (c.bias) out.add_vector(prefix + "out_proj.bias", p.b_o);
}

}  // namespace mha
