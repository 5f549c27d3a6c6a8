// SPDX-License-Identifier: MIT
/// @file
/// `mha::safetensors_file`: a safetensors file parsed and validated in memory (or mapped), and
/// its tensors read as Eigen matrices and vectors (F32, F64, F16, BF16, BOOL; float, double,
/// Eigen::bfloat16, bool).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/io/half_precision.hpp>
#include <mha/io/safetensors/format.hpp>

#include <nlohmann/json.hpp>

namespace mha {

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

    /// Throws format_error unless `name` has a dtype T reads and, when `shape` is not empty, that
    /// shape. T reads its own dtype; float and double also read F16 and BF16 (exactly);
    /// Eigen::bfloat16 also reads F32, F64 and F16 (rounded). `meaning` explains the expected
    /// shape in the message (e.g. "(3·embed_dim, embed_dim)").
    template <class T>
    const tensor_info& expect(const std::string& name, const std::vector<std::int64_t>& shape = {},
                              const std::string& meaning = "") const {
        const tensor_info& t = info(name);
        // Half-precision checkpoints widen exactly to float and double.
        constexpr bool widens_half = std::is_floating_point_v<T>;
        constexpr bool narrows = std::is_same_v<T, Eigen::bfloat16>;
        const bool half = t.dtype == "F16" || t.dtype == "BF16";
        const bool wider = t.dtype == "F32" || t.dtype == "F64" || t.dtype == "F16";
        if (t.dtype != detail::safetensors_dtype<T>::name && !(widens_half && half) &&
            !(narrows && wider))
            detail::fail<format_error>(
                where().c_str(), "dtype of tensor '" + name + "'",
                std::string(detail::safetensors_dtype<T>::name) +
                    (widens_half ? " (or F16, BF16)"
                     : narrows   ? " (or F32, F64, F16, rounded to nearest even)"
                                 : ""),
                t.dtype);
        if (!shape.empty() && t.shape != shape)
            detail::fail<format_error>(
                where().c_str(), "shape of tensor '" + name + "'",
                detail::shape_text(shape) + (meaning.empty() ? "" : " " + meaning),
                detail::shape_text(t.shape));
        return t;
    }

    /// The elements of `name` in storage (row-major) order; dtype must be T, or F16 or BF16 when T
    /// is float or double (converted exactly), or F32, F64 or F16 when T is Eigen::bfloat16
    /// (rounded once to nearest, ties to even, beyond the range to ±∞, NaN kept quiet). A BF16
    /// tensor read as Eigen::bfloat16 is its bits unchanged, NaN payloads included.
    template <class T>
    std::vector<T> values(const std::string& name) const {
        const tensor_info& t = expect<T>(name);
        std::vector<T> result(static_cast<std::size_t>(t.numel()));
        const unsigned char* p = data() + t.begin;
        if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
            read_bf16(t, p, result);
            return result;
        }
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

    // A BF16 tensor is copied, never widened and narrowed again (which would quieten a
    // signalling NaN); the wider dtypes are rounded once, F64 directly (no double rounding
    // through float).
    static void read_bf16(const tensor_info& t, const unsigned char* p,
                          std::vector<Eigen::bfloat16>& out) {
        const std::size_t n = out.size();
        if (t.dtype == "BF16" && detail::host_is_little_endian()) {
            // The file's byte order is the host's; bfloat16 is trivially copyable (format.hpp).
            if (n != 0) std::memcpy(static_cast<void*>(out.data()), p, 2 * n);
            return;
        }
        for (std::size_t i = 0; i < n; ++i) {
            std::uint16_t bits = 0;
            if (t.dtype == "BF16")
                bits = detail::load_little_endian<std::uint16_t>(p + 2 * i);
            else if (t.dtype == "F16")
                bits = float_to_bf16(
                    f16_to_float(detail::load_little_endian<std::uint16_t>(p + 2 * i)));
            else if (t.dtype == "F32")
                bits = float_to_bf16(detail::load_little_endian<float>(p + 4 * i));
            else
                bits = double_to_bf16(detail::load_little_endian<double>(p + 8 * i));
            out[i] = detail::bf16_from_bits(bits);
        }
    }
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

}  // namespace mha
