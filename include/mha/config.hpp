// SPDX-License-Identifier: MIT
// Version, error types, matrix aliases and argument checks shared by every public header.
#pragma once

#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#define MHA_VERSION_MAJOR 0
#define MHA_VERSION_MINOR 1
#define MHA_VERSION_PATCH 0

// The masked-row and NaN guarantees rest on IEEE comparisons with infinities and NaN, which
// -ffast-math (-ffinite-math-only) lets the compiler fold away. Refuse such builds loudly rather
// than return NaN rows silently; define MHA_ALLOW_FINITE_MATH_ONLY to build anyway at your risk.
#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__ && !defined(MHA_ALLOW_FINITE_MATH_ONLY)
#error "mha: -ffinite-math-only (part of -ffast-math) breaks masked-row handling; see README"
#endif

namespace mha {

using Eigen::Index;

/// Column-major dynamic matrix: one column per token, `d × L`. Storage order is stated so that
/// `EIGEN_DEFAULT_TO_ROW_MAJOR` in a user's build cannot change the meaning of our buffers.
template <class Scalar>
using matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

/// Column vector (biases).
template <class Scalar>
using vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// Boolean matrix used by `keep_mask` (rows: keys, columns: queries).
using bool_matrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

/// Base of every exception the library throws on bad input. Derives from
/// `std::invalid_argument`, so callers may catch either.
class invalid_argument : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

/// A matrix, vector or length list has the wrong size.
class shape_error : public invalid_argument {
public:
    using invalid_argument::invalid_argument;
};

/// A setting has a value outside its domain (a negative window, zero heads, a NaN scale...).
class value_error : public invalid_argument {
public:
    using invalid_argument::invalid_argument;
};

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
inline void check_size(const char* where, const std::string& argument, Index expected,
                       Index actual, const char* expected_meaning = nullptr) {
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

template <class T>
inline constexpr bool is_supported_scalar_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, long double>;

}  // namespace detail
}  // namespace mha
