// SPDX-License-Identifier: MIT
// The oracle of the safetensors fuzzer: any bytes go to the reader and, when they parse, through
// every accessor and the state-dict loader. Shared by the libFuzzer harness and the corpus replay
// test. What must hold for every input:
//   - the only exception is mha::format_error (the documented one for a bad file);
//   - what parses is self-consistent: values() has numel() elements, as_columns/as_matrix/
//     as_vector have the shape's sizes, every tensor lies inside the data section;
//   - a float tensor read as Eigen::bfloat16 is its BF16 bytes, or each element rounded once,
//     and writing it back as BF16 keeps every bit;
//   - a layer that loads runs a forward pass, and saving it and loading it back gives the same
//     parameters.
// Crashes, hangs and sanitizer reports are the fuzzer's own findings.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

namespace mha_fuzz {

namespace detail {

template <class T>
std::optional<std::string> check_accessors(const mha::safetensors_file& f, const std::string& name,
                                           const mha::tensor_info& t) {
    const auto numel = t.numel();
    if (f.values<T>(name).size() != static_cast<std::size_t>(numel))
        return "values() size differs from numel() for '" + name + "'";
    const auto columns = f.as_columns<T>(name);
    if (columns.size() != numel) return "as_columns() size differs from numel() for '" + name + "'";
    if (t.shape.size() == 2) {
        const auto m = f.as_matrix<T>(name);
        if (m.rows() != t.shape[0] || m.cols() != t.shape[1])
            return "as_matrix() shape differs from the header for '" + name + "'";
    }
    if (t.shape.size() == 1 && f.as_vector<T>(name).size() != t.shape[0])
        return "as_vector() size differs from the header for '" + name + "'";
    return std::nullopt;
}

// The bfloat16 reads of a float tensor: BF16 is the file's bits unchanged (compared with the
// bytes of the input itself), F32, F64 and F16 are each element rounded once (the float or double
// read, rounded by half_precision.hpp); and what is read, written back as BF16, reads back the
// same bits.
inline std::optional<std::string> check_bf16(const mha::safetensors_file& f,
                                             const std::string& name, const mha::tensor_info& t,
                                             const std::uint8_t* file, std::size_t data_start) {
    using bf16 = Eigen::bfloat16;
    if (auto bad = check_accessors<bf16>(f, name, t)) return bad;
    const std::vector<bf16> b = f.values<bf16>(name);
    const auto is_nan = [](std::uint16_t x) { return (x & 0x7fffu) > 0x7f80u; };
    const std::vector<double> wide_double =
        t.dtype == "F64" ? f.values<double>(name) : std::vector<double>();
    const std::vector<float> wide_float =
        t.dtype == "F32" || t.dtype == "F16" ? f.values<float>(name) : std::vector<float>();
    for (std::size_t i = 0; i < b.size(); ++i) {
        const std::uint16_t got = mha::detail::bf16_to_bits(b[i]);
        std::uint16_t expected = 0;
        if (t.dtype == "BF16") {
            const std::uint8_t* p = file + data_start + t.begin + 2 * i;
            expected = static_cast<std::uint16_t>(p[0] | (p[1] << 8));
        } else if (t.dtype == "F64") {
            expected = mha::double_to_bf16(wide_double[i]);
        } else {
            expected = mha::float_to_bf16(wide_float[i]);
        }
        // A wider NaN may reach the rounding through a float copy that quietens it: any NaN.
        const bool same = got == expected || (t.dtype != "BF16" && is_nan(got) && is_nan(expected));
        if (!same) return "bfloat16 read of '" + name + "' differs at element " + std::to_string(i);
    }
    mha::safetensors_writer writer;
    writer.add_raw(name, t.shape, b.data());
    const auto again =
        mha::safetensors_file::parse(writer.bytes(), "bf16 again").values<bf16>(name);
    if (again.size() != b.size() ||
        (!b.empty() && std::memcmp(static_cast<const void*>(again.data()),
                                   static_cast<const void*>(b.data()), 2 * b.size()) != 0))
        return "bfloat16 tensor '" + name + "' changes when written and read back";
    return std::nullopt;
}

template <class Scalar>
std::optional<std::string> check_loader(const mha::safetensors_file& f, mha::Index heads) {
    std::optional<mha::multi_head_attention<Scalar>> loaded;
    try {
        loaded.emplace(mha::load_multi_head_attention<Scalar>(f, heads));
    } catch (const mha::format_error&) {
        return std::nullopt;  // not a state_dict this layer can take
    }
    const mha::multi_head_attention<Scalar>& layer = *loaded;
    const mha::attention_config& c = layer.config();
    const mha::matrix<Scalar> x = mha::matrix<Scalar>::Ones(c.embed_dim, 2);
    const mha::matrix<Scalar> key = mha::matrix<Scalar>::Ones(c.key_input_dim, 3);
    const mha::matrix<Scalar> value = mha::matrix<Scalar>::Ones(c.value_input_dim, 3);
    const mha::matrix<Scalar> out = layer.forward(x, key, value, mha::causal{});
    if (out.rows() != c.embed_dim || out.cols() != 2) return "forward() gave the wrong shape";
    mha::safetensors_writer writer;
    mha::save_multi_head_attention(writer, layer);
    std::optional<mha::multi_head_attention<Scalar>> again;
    try {
        again.emplace(mha::load_multi_head_attention<Scalar>(
            mha::safetensors_file::parse(writer.bytes(), "saved"), heads));
    } catch (const mha::format_error& e) {
        return std::string("a saved layer does not load back: ") + e.what();
    }
    const auto p = layer.parameters(), q = again->parameters();
    // Bit patterns survive the round trip, NaN included, so compare them as bytes.
    const auto same = [](const auto& a, const auto& b) {
        // memcmp's pointers must not be null, even for 0 bytes: empty matrices may have none.
        return a.size() == b.size() &&
               (a.size() == 0 ||
                std::memcmp(a.data(), b.data(),
                            sizeof(Scalar) * static_cast<std::size_t>(a.size())) == 0);
    };
    if (!same(p.w_q, q.w_q) || !same(p.w_k, q.w_k) || !same(p.w_v, q.w_v) || !same(p.w_o, q.w_o) ||
        !same(p.b_q, q.b_q) || !same(p.b_o, q.b_o))
        return "parameters differ after save and load";
    return std::nullopt;
}

}  // namespace detail

/// Runs the reader, the accessors and the loader on `data`; returns what went wrong, if anything.
inline std::optional<std::string> check_safetensors(const std::uint8_t* data, std::size_t size) {
    try {
        mha::safetensors_file f;
        try {
            f = mha::safetensors_file::parse(std::vector<unsigned char>(data, data + size), "fuzz");
        } catch (const mha::format_error&) {
            return std::nullopt;  // a refused file: the expected outcome for most inputs
        }
        // The data section starts after the 8-byte length and the header (parse checked both).
        std::uint64_t header_length = 0;
        for (int i = 0; i < 8; ++i)
            header_length |= static_cast<std::uint64_t>(data[i]) << (8 * i);
        const auto data_start = static_cast<std::size_t>(8 + header_length);
        for (const auto& name : f.names()) {
            const mha::tensor_info& t = f.info(name);
            if (t.begin > t.end) return "tensor '" + name + "' ends before it begins";
            std::optional<std::string> bad;
            if (t.dtype == "F32")
                bad = detail::check_accessors<float>(f, name, t);
            else if (t.dtype == "F64")
                bad = detail::check_accessors<double>(f, name, t);
            else if (t.dtype == "BOOL")
                bad = detail::check_accessors<bool>(f, name, t);
            if (bad) return bad;
            if (t.dtype == "BF16" || t.dtype == "F16" || t.dtype == "F32" || t.dtype == "F64")
                if ((bad = detail::check_bf16(f, name, t, data, data_start))) return bad;
        }
        for (const mha::Index heads : {1, 2}) {
            if (auto bad = detail::check_loader<float>(f, heads)) return bad;
            if (auto bad = detail::check_loader<double>(f, heads)) return bad;
        }
    } catch (const mha::format_error&) {
        return std::nullopt;
    } catch (const std::exception& e) {
        return std::string("an exception other than format_error: ") + e.what();
    }
    return std::nullopt;
}

}  // namespace mha_fuzz
