// SPDX-License-Identifier: MIT
// The library's float and double instantiations, compiled once. A program whose other
// translation units define MHA_EXTERN_TEMPLATES (so that they only declare these) adds this file
// to exactly one of its targets, compiled with the same flags as the rest (OpenMP, -march,
// MHA_NO_OPENMP): the functions here are the ones the whole program runs. See docs/cmake.md.
#include <mha/mha.hpp>

template class mha::multi_head_attention<float>;
template class mha::multi_head_attention<double>;

template mha::attention_outputs<float> mha::detail::attend<float, mha::detail::no_score_modifier>(
    const mha::detail::attention_problem<float>&, mha::attention_algorithm,
    mha::detail::attention_workspace<float>*, const mha::detail::no_score_modifier&);
template mha::attention_outputs<double> mha::detail::attend<double, mha::detail::no_score_modifier>(
    const mha::detail::attention_problem<double>&, mha::attention_algorithm,
    mha::detail::attention_workspace<double>*, const mha::detail::no_score_modifier&);
