// SPDX-License-Identifier: MIT
/// @file
/// What every public header shares: the version, the matrix aliases of the data layout, and the
/// error types (with the argument checks that raise them, in detail/check.hpp).
#pragma once

// Before any include, so that an older standard gets this message rather than errors from deep
// inside the headers. MSVC reports __cplusplus as 199711L unless /Zc:__cplusplus is given.
#if !((defined(_MSVC_LANG) && _MSVC_LANG >= 201703L) || __cplusplus >= 201703L)
#error "mha needs C++17 or later: compile with -std=c++17 (or /std:c++17)"
#endif

#include <stdexcept>

#include <Eigen/Core>

// Eigen's version (MHA_EIGEN_VERSION_*) and the refusal of Eigen older than 3.4.
#include <mha/detail/eigen_compat.hpp>

/// The library's major version: before 1.0 a minor version may change the API (CHANGELOG.md).
#define MHA_VERSION_MAJOR 0
/// The library's minor version.
#define MHA_VERSION_MINOR 1
/// The library's patch version: a patch release does not change the API.
#define MHA_VERSION_PATCH 0

/// @page configuration_macros Configuration macros
/// Macros a program may define before including any mha header (or with `-D`), all off by default:
///
/// - `MHA_NO_OPENMP`: the kernels run on one thread even when the program is compiled with
///   OpenMP (`-fopenmp`). Without OpenMP they are serial anyway. The CMake target `mha::openmp`
///   (or `find_package(mha COMPONENTS openmp)`) turns OpenMP on for the kernels.
/// - `MHA_ALLOW_FINITE_MATH_ONLY`: lets a translation unit compiled with `-ffinite-math-only` (part
///   of `-ffast-math`) include the library, which otherwise stops with an `#error`: the guarantees
///   for fully masked queries and NaN inputs (see docs/semantics.md) rest on comparisons with
///   infinities and NaN that such builds may fold away. At your risk.
/// - `MHA_EXTERN_TEMPLATES`: declares the library's `float` and `double` instantiations
///   `extern template`, so that including translation units do not compile them; exactly one
///   translation unit of the program must then define them (see docs/cmake.md).

// The masked-row and NaN guarantees rest on IEEE comparisons with infinities and NaN, which
// -ffast-math (-ffinite-math-only) lets the compiler fold away. Refuse such builds loudly rather
// than return NaN rows silently; define MHA_ALLOW_FINITE_MATH_ONLY to build anyway at your risk.
#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__ && !defined(MHA_ALLOW_FINITE_MATH_ONLY)
#error \
    "mha: -ffinite-math-only (part of -ffast-math) breaks masked-row handling; see docs/semantics.md"
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

}  // namespace mha

// The argument checks every public header uses to report bad input.
#include <mha/detail/check.hpp>
