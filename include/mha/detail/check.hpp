// SPDX-License-Identifier: MIT
// Argument checks: every message has the form "<where>: <argument> must be <expected>, got
// <actual>", and the strings are built only when a check fails, so checks on a hot path allocate
// nothing.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>

#include <mha/core.hpp>

namespace mha {
namespace detail {

template <class Exception>
[[noreturn]] inline void raise(const std::string& message) {
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
    throw Exception(message);
#else
    // Built with -fno-exceptions: there is no way to report to the caller, so say why and stop.
    std::fputs(message.c_str(), stderr);
    std::fputc('\n', stderr);
    std::abort();
#endif
}

template <class T>
std::string to_text(const T& value) {
    std::ostringstream out;
    out << value;
    return out.str();
}

/// Every message has the form "<where>: <argument> must be <expected>, got <actual>".
template <class Exception = shape_error, class Expected, class Actual>
[[noreturn]] void fail(const char* where, const std::string& argument, const Expected& expected,
                       const Actual& actual) {
    raise<Exception>(std::string(where) + ": " + argument + " must be " + to_text(expected) +
                     ", got " + to_text(actual));
}

/// Throws shape_error unless `actual == expected`.
inline void check_size(const char* where, const std::string& argument, Index expected, Index actual,
                       const char* expected_meaning = nullptr) {
    if (actual == expected) return;
    std::string expectation = to_text(expected);
    if (expected_meaning != nullptr) expectation += std::string(" (") + expected_meaning + ")";
    fail<shape_error>(where, argument, expectation, actual);
}

/// The same for an argument named by a literal: no std::string is built unless the check fails,
/// so checks on a hot path allocate nothing.
inline void check_size(const char* where, const char* argument, Index expected, Index actual,
                       const char* expected_meaning = nullptr) {
    if (actual == expected) return;
    check_size(where, std::string(argument), expected, actual, expected_meaning);
}

/// check_size for the rows (the feature width) of an input holding one column per token. The
/// common mistake is a PyTorch-style row-major (L, E) buffer mapped as an L × E matrix: then the
/// rows are the token count, or the columns the width. When the shape looks like that
/// (`actual_cols == expected_rows`, or `actual_rows == expected_tokens`), the message says so.
inline void check_token_rows(const char* where, const char* argument, Index expected_rows,
                             Index actual_rows, const char* expected_meaning, Index expected_tokens,
                             Index actual_cols) {
    if (actual_rows == expected_rows) return;
    const bool looks_transposed = actual_cols == expected_rows || actual_rows == expected_tokens;
    if (!looks_transposed)
        check_size(where, argument, expected_rows, actual_rows, expected_meaning);
    fail<shape_error>(where, argument, to_text(expected_rows) + " (" + expected_meaning + ")",
                      to_text(actual_rows) +
                          "; did you map a row-major (L, E) buffer as L × E? columns are tokens");
}

/// a + b for sizes that come from files and from users: throws Exception (the message above,
/// naming `argument`) rather than wrap around when the sum leaves Index. Overflow of a signed
/// type is undefined behaviour, so the test happens before the addition.
template <class Exception = shape_error>
Index checked_add(const char* where, const char* argument, Index a, Index b) {
    constexpr Index max = std::numeric_limits<Index>::max();
    constexpr Index min = std::numeric_limits<Index>::lowest();
    if ((b > 0 && a > max - b) || (b < 0 && a < min - b))
        fail<Exception>(where, argument,
                        "in Index's range [" + to_text(min) + ", " + to_text(max) + "]",
                        to_text(a) + " + " + to_text(b));
    return a + b;
}

/// a · b for sizes (a, b >= 0): throws Exception naming `argument` when the product exceeds Index.
template <class Exception = shape_error>
Index checked_mul(const char* where, const char* argument, Index a, Index b) {
    constexpr Index max = std::numeric_limits<Index>::max();
    if (a < 0 || b < 0)
        fail<Exception>(where, argument, "a product of non-negative sizes",
                        to_text(a) + " * " + to_text(b));
    if (a != 0 && b > max / a)
        fail<Exception>(where, argument, "at most " + to_text(max) + " (Index)",
                        to_text(a) + " * " + to_text(b));
    return a * b;
}

/// Whether two column-major views share an element: `a` has ra × ca elements at
/// a + i + j·sa (sa >= ra, the outer stride), `b` likewise. Disjoint row blocks of one matrix do
/// not overlap although their address ranges interleave; views with different strides whose
/// address ranges meet count as overlapping (no library call needs them).
template <class Scalar>
bool views_overlap(const Scalar* a, Index ra, Index ca, Index sa, const Scalar* b, Index rb,
                   Index cb, Index sb) {
    if (ra <= 0 || ca <= 0 || rb <= 0 || cb <= 0) return false;
    // Addresses as integers: relational comparison of pointers into different objects is not
    // meaningful in C++.
    const auto pa = reinterpret_cast<std::uintptr_t>(a);
    const auto pb = reinterpret_cast<std::uintptr_t>(b);
    const auto size = sizeof(Scalar);
    const auto end_a = pa + static_cast<std::uintptr_t>((ca - 1) * sa + ra) * size;
    const auto end_b = pb + static_cast<std::uintptr_t>((cb - 1) * sb + rb) * size;
    if (end_a <= pb || end_b <= pa) return false;
    if (ca == 1 && cb == 1) return true;  // two contiguous ranges that meet
    if (ca == 1) sa = sb;                 // one column: any stride describes it
    if (cb == 1) sb = sa;
    const Index s = sa;
    if (sa != sb || ra > s || rb > s) return true;
    const auto bytes = static_cast<std::intptr_t>(pb - pa);  // two's complement difference
    if (bytes % static_cast<std::intptr_t>(size) != 0) return true;
    const auto d = static_cast<Index>(bytes / static_cast<std::intptr_t>(size));
    // b's element (i', j') is a's (i' + r, j' + q) in the grid of stride s, with 0 <= r < s.
    Index q = d / s;
    Index r = d % s;
    if (r < 0) {
        r += s;
        --q;
    }
    // Same column offset q with rows i = i' + r, or q + 1 with i = i' + r - s.
    const bool shifted_down = r < ra && -cb < q && q < ca;
    const bool shifted_up = r > 0 && s - r < rb && -cb < q + 1 && q + 1 < ca;
    return shifted_down || shifted_up;
}

/// Throws value_error when `out` shares an element with `input` (both viewed as in views_overlap).
template <class Out, class In>
void check_no_overlap(const char* where, const char* out_name, const Out& out,
                      const char* input_name, const In& input) {
    if (views_overlap(out.data(), out.rows(), out.cols(), out.outerStride(), input.data(),
                      input.rows(), input.cols(), input.outerStride()))
        fail<value_error>(where, out_name,
                          std::string("memory that ") + input_name + " does not use",
                          std::string("a view overlapping ") + input_name);
}

/// float and double only. long double is refused at compile time: the kernels would build for
/// it (with one-lane packets), but no reference more precise than it exists in the tests, so
/// nothing could check its results (docs/semantics.md, "Scalar types").
template <class T>
inline constexpr bool is_supported_scalar_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

/// Whether T is Eigen::bfloat16 (the bf16 storage of multi_head_attention_core).
template <class T>
inline constexpr bool is_bfloat16_v = std::is_same_v<T, Eigen::bfloat16>;

/// Whether every operand of a kernel call has the scalar type T: mixing float and double would
/// otherwise fail deep inside Eigen's product code.
template <class T, class... Others>
inline constexpr bool same_scalars_v = (std::is_same_v<T, Others> && ...);

}  // namespace detail
}  // namespace mha
