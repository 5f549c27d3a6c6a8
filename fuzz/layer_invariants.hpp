// SPDX-License-Identifier: MIT
// The oracle of the layer-API fuzzer: a layer configuration, a packed batch, masks and settings
// decoded from raw bytes, many of them hostile (lengths and windows up to INT64_MAX, negative
// values, mask matrices of the wrong size, scales out of float's range, outputs that are the
// input), sent through the public calls of multi_head_attention<float>. What must hold:
//   - a call either succeeds or throws an mha::invalid_argument (shape_error, value_error), never
//     anything else;
//   - a call that succeeds gives E × Nq outputs, finite for finite inputs with softmax (the values
//     and weights are small enough that nothing overflows);
//   - forward, forward_with_weights and forward_into (into a separate matrix, into x itself, with
//     a reused workspace) give the same bits.
// Shared by the libFuzzer harness and the corpus replay test.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <mha/mha.hpp>

#include "attention_invariants.hpp"

namespace mha_fuzz {

namespace layer_detail {

// A size from the input: mostly small, sometimes a value at or past an edge.
inline Index hostile_size(byte_reader& in, Index small) {
    const std::uint8_t kind = in.byte();
    switch (kind % 16) {
        case 0:
            return std::numeric_limits<Index>::max();
        case 1:
            return std::numeric_limits<Index>::max() - in.in_range(0, 8);
        case 2:
            return -in.in_range(1, 3);
        case 3:
            return Index(1) << in.in_range(31, 62);
        default:
            return in.in_range(0, small);
    }
}

inline double hostile_scale(byte_reader& in) {
    switch (in.byte() % 8) {
        case 0:
            return 1e39;
        case 1:
            return std::numeric_limits<double>::quiet_NaN();
        case 2:
            return static_cast<double>(std::numeric_limits<float>::max());
        case 3:
            return -0.5;
        case 4:
            return 0.0;
        default:
            return static_cast<double>(in.in_range(1, 100)) / 64.0;
    }
}

}  // namespace layer_detail

/// Runs the layer's public calls on the problem decoded from `data`; returns what went wrong.
inline std::optional<std::string> check_layer(const std::uint8_t* data, std::size_t size) {
    using layer_detail::hostile_size;
    byte_reader in(data, size);
    mha::attention_config config;
    config.embed_dim = hostile_size(in, 12);
    config.num_heads = hostile_size(in, 4);
    config.head_dim = in.flag() ? hostile_size(in, 6) : 0;
    config.value_head_dim = in.flag() ? hostile_size(in, 6) : 0;
    const bool cross = in.flag();
    config.key_input_dim = cross ? in.in_range(1, 8) : 0;
    config.value_input_dim = cross ? in.in_range(1, 8) : 0;
    config.bias = in.flag();
    if (in.flag()) config.attention.scale = layer_detail::hostile_scale(in);
    config.attention.normalize = static_cast<mha::normalization>(in.in_range(0, 2));
    config.attention.algorithm = static_cast<mha::attention_algorithm>(in.in_range(0, 2));

    // Hostile widths meet the config's checks; a valid config whose weights would not fit in a
    // fuzzing run's memory (a head width of 2^40 is valid) is not built.
    try {
        const mha::attention_config r = config.resolved();
        const Index qk = r.num_heads * r.head_dim, vw = r.num_heads * r.value_head_dim;
        const Index limit = 4096;
        if (r.embed_dim > limit || qk > limit || vw > limit ||
            (2 * qk + vw) * std::max(r.embed_dim, std::max(r.key_input_dim, r.value_input_dim)) >
                limit)
            return std::nullopt;
    } catch (const mha::invalid_argument&) {
        return std::nullopt;  // refused settings: what they must get
    } catch (const std::exception& e) {
        return std::string("attention_config::resolved threw something else: ") + e.what();
    }
    std::optional<mha::multi_head_attention<float>> made;
    try {
        made.emplace(config, in.seed());
    } catch (const mha::invalid_argument&) {
        return std::nullopt;  // a scale out of float's range
    } catch (const std::exception& e) {
        return std::string("the layer's constructor threw something else: ") + e.what();
    }
    const mha::multi_head_attention<float>& layer = *made;
    const mha::attention_config& c = layer.config();

    // The batch: lengths mostly small, sometimes hostile; the matrices are sized from the
    // lengths only when those are small, else from a separate small count (so a hostile batch
    // meets real matrices, as it would in a server).
    const Index batch = in.in_range(0, 3);
    std::vector<Index> lq, lk;
    Index nq = 0, nk = 0;
    bool small = true;
    for (Index b = 0; b < batch; ++b) {
        lq.push_back(in.flag() ? hostile_size(in, 9) : in.in_range(0, 9));
        lk.push_back(cross ? (in.flag() ? hostile_size(in, 9) : in.in_range(0, 9)) : lq.back());
        small = small && lq.back() >= 0 && lq.back() <= 9 && lk.back() >= 0 && lk.back() <= 9;
        if (small) {
            nq += lq.back();
            nk += lk.back();
        }
    }
    if (!small) {
        nq = in.in_range(0, 9);
        nk = cross ? in.in_range(0, 9) : nq;
    }
    std::optional<mha::packed_batch> packed;
    try {
        packed.emplace(lq, lk);
    } catch (const mha::invalid_argument&) {
        return std::nullopt;
    }

    mha::attention_mask<float> mask;
    try {
        const std::uint8_t kinds = in.byte();
        if (kinds & 1)
            mask.add(mha::causal{in.flag() ? mha::causal_alignment::top_left
                                           : mha::causal_alignment::bottom_right});
        if (kinds & 2)
            mask.add(mha::sliding_window{
                hostile_size(in, 6), hostile_size(in, 6),
                in.flag() ? mha::causal_alignment::top_left : mha::causal_alignment::bottom_right});
        if (kinds & 4) {
            std::vector<Index> lengths;
            const Index count = in.flag() ? batch : in.in_range(0, 3);
            for (Index b = 0; b < count; ++b)
                lengths.push_back(in.flag() ? hostile_size(in, 9) : in.in_range(0, 9));
            mask.add(mha::key_lengths{lengths});
        }
        if (kinds & 8) {
            // One matrix for the whole batch: right-sized only when every sequence agrees.
            const Index rows = lk.empty() ? 0 : (small ? lk[0] : in.in_range(0, 9));
            const Index cols = lq.empty() ? 0 : (small ? lq[0] : in.in_range(0, 9));
            mha::bool_matrix keep(rows, cols);
            value_stream bits(in.seed());
            for (Index i = 0; i < keep.size(); ++i)
                keep.data()[i] = (bits.next() & 3) != 0;
            mask.add(mha::keep_mask(keep));
        }
    } catch (const mha::invalid_argument&) {
        return std::nullopt;
    }

    value_stream values(in.seed());
    const auto fill = [&values](Index rows, Index cols) {
        mha::matrix<float> m(rows, cols);
        for (Index i = 0; i < m.size(); ++i)
            m.data()[i] = values.uniform(1.0f);
        return m;
    };
    const mha::matrix<float> x = fill(c.embed_dim, nq);
    const mha::matrix<float> key = fill(c.key_input_dim, nk);
    const mha::matrix<float> value = fill(c.value_input_dim, nk);

    mha::matrix<float> out;
    try {
        out = cross ? layer.forward(x, key, value, *packed, mask) : layer.forward(x, *packed, mask);
    } catch (const mha::invalid_argument&) {
        return std::nullopt;
    } catch (const std::exception& e) {
        return std::string("forward threw something other than mha::invalid_argument: ") + e.what();
    }
    if (out.rows() != c.embed_dim || out.cols() != nq) return "forward gave the wrong shape";
    // Weights of Xavier size and inputs in [-1, 1) keep projections and scores small: with
    // softmax and a moderate scale, outputs are convex combinations of projected values, hence
    // finite. (A scale near float's maximum overflows the scores: that is arithmetic, not a bug.)
    const bool moderate_scale = !c.attention.scale || std::fabs(*c.attention.scale) <= 2;
    if (c.attention.normalize == mha::normalization::softmax && moderate_scale && !out.allFinite())
        return "forward gave a non-finite output from finite inputs with softmax";
    const auto same = [](const mha::matrix<float>& a, const mha::matrix<float>& b) {
        return a.rows() == b.rows() && a.cols() == b.cols() &&
               (a.size() == 0 ||
                std::memcmp(a.data(), b.data(),
                            sizeof(float) * static_cast<std::size_t>(a.size())) == 0);
    };
    try {
        const auto with =
            cross ? layer.forward_with_weights(x, key, value, *packed, mha::weights_mode::per_head,
                                               mask)
                  : layer.forward_with_weights(x, *packed, mha::weights_mode::averaged, mask);
        if (!same(with.output, out)) return "forward_with_weights differs from forward";
        mha::forward_workspace<float> workspace;
        mha::matrix<float> into(c.embed_dim, nq);
        if (cross) {
            layer.forward_into(x, key, value, *packed, mask, into, workspace);
        } else {
            layer.forward_into(x, *packed, mask, into, workspace);
            if (!same(into, out)) return "forward_into differs from forward";
            mha::matrix<float> inout = x;  // out aliasing x is allowed for forward_into
            layer.forward_into(inout, *packed, mask, inout, workspace);
            into = inout;
        }
        if (!same(into, out)) return "forward_into (reused workspace or out = x) differs";
    } catch (const std::exception& e) {
        return std::string("a call that forward accepted threw: ") + e.what();
    }
    return std::nullopt;
}

}  // namespace mha_fuzz
