// SPDX-License-Identifier: MIT
// Runs the layer on a call exported from PyTorch by examples/export_pytorch.py and writes what it
// computed, so that the script can compare it with torch.nn.MultiheadAttention:
//
//   pytorch_check case.safetensors result.safetensors [--tolerance T]
//
// The input holds the module's state_dict, `query` (and `key`, `value` unless self-attention),
// optional `attn_mask` and `key_padding_mask`, and metadata saying how the module is called.
// The result holds `output` (shaped as PyTorch's) and `weights` when need_weights is set. When
// the input also holds PyTorch's `output`/`weights` (export --with-reference, or a golden case
// from tests/data), the largest difference is printed; with --tolerance, exceeding it or having
// no reference fails.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <mha/io/safetensors.hpp>
#include <mha/mha.hpp>

namespace {

using shape_t = std::vector<std::int64_t>;

// How PyTorch's tensors map to the library's packed columns.
struct layout {
    bool batched = false;      // rank-3 inputs
    bool batch_first = true;   // (N, L, E) rather than (L, N, E)
    std::int64_t batch = 1;    // N
    std::int64_t queries = 0;  // L
    std::int64_t keys = 0;     // S
};

// A (N, L, d) tensor is already N sequences side by side; a (L, N, d) one interleaves them, so
// its column l·N + n moves to n·L + l.
template <class T>
mha::matrix<T> to_packed(const mha::matrix<T>& columns, const layout& f, std::int64_t length) {
    if (!f.batched || f.batch_first) return columns;
    mha::matrix<T> packed(columns.rows(), columns.cols());
    for (std::int64_t l = 0; l < length; ++l)
        for (std::int64_t n = 0; n < f.batch; ++n)
            packed.col(n * length + l) = columns.col(l * f.batch + n);
    return packed;
}

template <class T>
mha::matrix<T> from_packed(const mha::matrix<T>& packed, const layout& f, std::int64_t length) {
    if (!f.batched || f.batch_first) return packed;
    mha::matrix<T> columns(packed.rows(), packed.cols());
    for (std::int64_t l = 0; l < length; ++l)
        for (std::int64_t n = 0; n < f.batch; ++n)
            columns.col(l * f.batch + n) = packed.col(n * length + l);
    return columns;
}

// A (count, L, S) or (L, S) tensor as `count` matrices S × L (keys × queries).
template <class T>
std::vector<mha::matrix<T>> split_queries(const mha::matrix<T>& columns, std::int64_t queries) {
    std::vector<mha::matrix<T>> result;
    for (std::int64_t c = 0; c + queries <= columns.cols(); c += queries)
        result.push_back(columns.middleCols(c, queries));
    return result;
}

template <class Scalar>
mha::attention_mask<Scalar> masks(const mha::safetensors_file& in, const layout& f) {
    mha::attention_mask<Scalar> mask;
    const std::string causal = in.metadata("causal", "");
    if (causal == "top_left" || causal == "bottom_right") {
        // PyTorch's triu(1) mask is a causal mask aligned top-left; no L × S matrix needed.
        mask.add(mha::causal{causal == "top_left" ? mha::causal_alignment::top_left
                                                  : mha::causal_alignment::bottom_right});
    } else if (in.contains("attn_mask") && in.info("attn_mask").dtype == "BOOL") {
        // nn.MultiheadAttention: true = may NOT attend. keep_mask: true = may attend. Invert.
        mha::keep_mask keep;
        for (const auto& m : split_queries<bool>(in.as_columns<bool>("attn_mask"), f.queries))
            keep.masks.push_back(m.unaryExpr([](bool masked) { return !masked; }));
        mask.add(std::move(keep));
    } else if (in.contains("attn_mask")) {
        mask.add(mha::additive_bias<Scalar>(
            split_queries<Scalar>(in.as_columns<Scalar>("attn_mask"), f.queries)));
    }
    if (in.contains("key_padding_mask")) {
        // (N, S) or (S): true = padding = excluded, for every query of the sequence.
        const bool boolean = in.info("key_padding_mask").dtype == "BOOL";
        mha::keep_mask keep;
        mha::additive_bias<Scalar> bias;
        // S × N: column n is sequence n's padding. Kept in variables: a column view of a
        // temporary matrix would dangle.
        const mha::bool_matrix pad =
            boolean ? in.as_columns<bool>("key_padding_mask") : mha::bool_matrix();
        const mha::matrix<Scalar> add =
            boolean ? mha::matrix<Scalar>() : in.as_columns<Scalar>("key_padding_mask");
        for (std::int64_t n = 0; n < f.batch; ++n) {
            if (boolean)
                keep.masks.push_back(pad.col(n)
                                         .unaryExpr([](bool padded) { return !padded; })
                                         .replicate(1, f.queries));
            else
                bias.biases.push_back(add.col(n).replicate(1, f.queries));
        }
        if (boolean)
            mask.add(std::move(keep));
        else
            mask.add(std::move(bias));
    }
    return mask;
}

// Largest |ours − theirs| where PyTorch is finite (PyTorch 1.13 returns NaN for a fully masked
// query, this library 0), and how many entries that skipped.
template <class Scalar>
double max_abs_difference(const mha::matrix<Scalar>& ours, const mha::matrix<Scalar>& theirs,
                          std::int64_t& skipped) {
    double worst = 0;
    skipped = 0;
    for (mha::Index i = 0; i < theirs.size(); ++i) {
        if (!std::isfinite(theirs(i))) {
            ++skipped;
            continue;
        }
        worst = std::max(worst, std::abs(static_cast<double>(ours(i) - theirs(i))));
    }
    return worst;
}

template <class Scalar>
int run(const mha::safetensors_file& in, const std::string& out_path,
        std::optional<double> tolerance) {
    const mha::Index heads = std::stoll(in.metadata("num_heads", "1"));
    const auto layer = mha::load_multi_head_attention<Scalar>(in, heads);
    const bool self = in.metadata("self_attention", "0") == "1";
    const shape_t q_shape = in.info("query").shape;
    const shape_t k_shape = in.info(self ? "query" : "key").shape;

    layout f;
    f.batched = q_shape.size() == 3;
    f.batch_first = in.metadata("batch_first", "1") == "1";
    if (f.batched) f.batch = q_shape[f.batch_first ? 0 : 1];
    f.queries = q_shape[f.batched && f.batch_first ? 1 : 0];
    f.keys = k_shape[f.batched && f.batch_first ? 1 : 0];

    const mha::matrix<Scalar> query = to_packed(in.as_columns<Scalar>("query"), f, f.queries);
    const mha::matrix<Scalar> key =
        self ? query : to_packed(in.as_columns<Scalar>("key"), f, f.keys);
    const mha::matrix<Scalar> value =
        self ? query : to_packed(in.as_columns<Scalar>("value"), f, f.keys);
    const mha::packed_batch batch(std::vector<mha::Index>(f.batch, f.queries),
                                  std::vector<mha::Index>(f.batch, f.keys));
    const bool need_weights = in.metadata("need_weights", "1") == "1";
    const bool average = in.metadata("average_attn_weights", "1") == "1";
    const auto mode = !need_weights ? mha::weights_mode::none
                      : average     ? mha::weights_mode::averaged
                                    : mha::weights_mode::per_head;
    const auto r = layer.forward_with_weights(query, key, value, batch, mode, masks<Scalar>(in, f));

    mha::safetensors_writer out;
    shape_t out_shape = q_shape;
    out_shape.back() = layer.config().embed_dim;
    out.add_columns("output", from_packed(r.output, f, f.queries), out_shape);
    mha::matrix<Scalar> weights;
    if (need_weights) {
        // N (or N·H) matrices S × L side by side: the bytes of (N, L, S) or (N, H, L, S).
        weights.resize(f.keys, static_cast<mha::Index>(r.weights.size()) * f.queries);
        for (std::size_t i = 0; i < r.weights.size(); ++i)
            weights.middleCols(static_cast<mha::Index>(i) * f.queries, f.queries) = r.weights[i];
        shape_t w_shape;
        if (f.batched) w_shape.push_back(f.batch);
        if (!average) w_shape.push_back(heads);
        w_shape.push_back(f.queries);
        w_shape.push_back(f.keys);
        out.add_columns("weights", weights, w_shape);
    }
    out.set_metadata("produced_by", "mha pytorch_check");
    out.write(out_path);
    std::cout << "wrote " << out_path << "\n";

    bool compared = false;
    double worst = 0;
    auto compare = [&](const char* name, const mha::matrix<Scalar>& ours) {
        if (!in.contains(name)) return;
        std::int64_t skipped = 0;
        const mha::matrix<Scalar> theirs = in.as_columns<Scalar>(name);
        if (theirs.size() != ours.size()) {
            std::cout << name << ": " << ours.size() << " elements here, " << theirs.size()
                      << " in the reference\n";
            worst = INFINITY;
            return;
        }
        const double d = max_abs_difference<Scalar>(ours.reshaped(theirs.rows(), theirs.cols()),
                                                    theirs, skipped);
        std::cout << name << ": max abs difference " << d;
        if (skipped) std::cout << " (" << skipped << " NaN entries of PyTorch's skipped)";
        std::cout << "\n";
        worst = std::max(worst, d);
        compared = true;
    };
    compare("output", from_packed(r.output, f, f.queries));
    if (need_weights) compare("weights", weights);
    if (!tolerance) return 0;
    if (!compared) {
        std::cerr << "--tolerance given but the input has no reference output\n";
        return 1;
    }
    if (!(worst <= *tolerance)) {
        std::cerr << "max abs difference " << worst << " exceeds tolerance " << *tolerance << "\n";
        return 1;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3 && !(argc == 5 && std::string(argv[3]) == "--tolerance")) {
        std::cerr << "usage: " << argv[0]
                  << " case.safetensors result.safetensors [--tolerance T]\n";
        return 2;
    }
    std::optional<double> tolerance;
    if (argc == 5) tolerance = std::strtod(argv[4], nullptr);
    try {
        const auto in = mha::safetensors_file::read(argv[1]);
        const std::string dtype = in.info("query").dtype;
        if (dtype == "F64") return run<double>(in, argv[2], tolerance);
        return run<float>(in, argv[2], tolerance);
    } catch (const std::exception& e) {
        std::cerr << "pytorch_check: " << e.what() << "\n";
        return 1;
    }
}
