// SPDX-License-Identifier: MIT
// Argument checks: every message has the form "<where>: <argument> must be <expected>, got
// <actual>", and the strings are built only when a check fails, so checks on a hot path allocate
// nothing.
#pragma once

#include <cstdio>
#include <cstdlib>
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

/// float and double only. long double is refused at compile time: the kernels would build for
/// it (with one-lane packets), but no reference more precise than it exists in the tests, so
/// nothing could check its results (docs/semantics.md, "Scalar types").
template <class T>
inline constexpr bool is_supported_scalar_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

}  // namespace detail
}  // namespace mha
