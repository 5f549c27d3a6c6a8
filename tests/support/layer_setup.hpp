// SPDX-License-Identifier: MIT
// What the layer and decoding tests set up the same way: random parameters of a config, the
// parameters in the reference's form, the OpenMP thread count, bitwise comparison.
#pragma once

#include <cmath>
#include <cstring>

#include <mha/multi_head_attention.hpp>

#include "reference.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mha_test {

/// Random parameters for a config (grouped heads included: K and V projections num_kv_heads
/// wide): Xavier-sized uniform weights, so that scores stay O(1) as in a trained layer, and
/// N(0, 0.5) biases, every one nonzero and different, so that a bias read from the wrong place
/// changes the result (the seeded constructor never produces such biases).
template <class Scalar>
mha::attention_parameters<Scalar> random_parameters(const mha::attention_config& config,
                                                    value_source& values) {
    using mha::Index;
    const mha::attention_config c = config.resolved();
    const Index q_width = c.num_heads * c.head_dim;           // query projection rows
    const Index k_width = c.num_kv_heads * c.head_dim;        // key projection rows
    const Index v_width = c.num_kv_heads * c.value_head_dim;  // value projection rows
    const Index o_width = c.num_heads * c.value_head_dim;     // output projection columns
    auto weight = [&values](Index rows, Index cols) {
        const double bound = std::sqrt(6.0 / static_cast<double>(rows + cols));
        return values.uniform_matrix<Scalar>(rows, cols, -bound, bound);
    };
    auto bias = [&](Index size) -> mha::vector<Scalar> {
        if (!c.bias) return {};
        return values.normal_matrix<Scalar>(size, 1, 0.5);
    };
    mha::attention_parameters<Scalar> p;
    p.w_q = weight(q_width, c.embed_dim);
    p.w_k = weight(k_width, c.key_input_dim);
    p.w_v = weight(v_width, c.value_input_dim);
    p.w_o = weight(c.embed_dim, o_width);
    p.b_q = bias(q_width);
    p.b_k = bias(k_width);
    p.b_v = bias(v_width);
    p.b_o = bias(c.embed_dim);
    return p;
}

/// The layer's parameters in the reference's own form, converted to T.
template <class T, class Scalar>
reference_params<T> to_reference(const mha::attention_parameters<Scalar>& p) {
    return {p.w_q.template cast<T>(), p.w_k.template cast<T>(), p.w_v.template cast<T>(),
            p.w_o.template cast<T>(), p.b_q.template cast<T>(), p.b_k.template cast<T>(),
            p.b_v.template cast<T>(), p.b_o.template cast<T>()};
}

/// Sets OpenMP's thread count for the next parallel regions; nothing without OpenMP.
inline void set_threads(int threads) {
#if defined(_OPENMP)
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

/// How many threads a parallel region would run: 1 without OpenMP.
inline int max_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/// Restores OpenMP's thread count when a case ends, even by a failed REQUIRE.
struct thread_guard {
    int saved = max_threads();
    thread_guard() = default;
    thread_guard(const thread_guard&) = delete;
    thread_guard& operator=(const thread_guard&) = delete;
    ~thread_guard() { set_threads(saved); }
};

/// Same shape and the same bits in every element (so NaN equals the same NaN, and −0 ≠ +0).
template <class A, class B>
bool bitwise_equal(const A& a, const B& b) {
    if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
    for (mha::Index c = 0; c < a.cols(); ++c)
        for (mha::Index r = 0; r < a.rows(); ++r) {
            const auto x = a(r, c), y = b(r, c);
            static_assert(sizeof x == sizeof y,
                          "bitwise_equal compares matrices of one scalar type");
            if (std::memcmp(&x, &y, sizeof x) != 0) return false;
        }
    return true;
}

}  // namespace mha_test
