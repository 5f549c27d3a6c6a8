// SPDX-License-Identifier: MIT
// Per-head attention weights of a multi-head layer over one five-word sentence, printed as
// tables with the words as labels and drawn as pictures (jane_heads.svg: heat maps;
// jane_lines.svg: lines between words), written to the folder given as the first argument, or
// to the current one.
//
// Nothing here is trained: the word vectors come from a hash of each word and the layer's
// weights from a fixed seed. The patterns in the tables therefore mean nothing about French;
// what the demo shows is the mechanics: how to get every head's weights out of the layer, how
// they are laid out, and that each query's weights form a distribution over the keys.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <mha/mha.hpp>
#include <mha/plot.hpp>

namespace {

using mha::Index;
using Matrix = mha::matrix<float>;

const std::vector<std::string> kWords = {"Jane", "visite", "l'Afrique", "en", "septembre"};
constexpr Index kEmbed = 16;  // E: small, so that the demo stays about the weights
constexpr Index kHeads = 4;   // 4 heads of width 4
constexpr std::uint64_t kLayerSeed = 2024;

// FNV-1a, 64-bit: unlike std::hash its value is fixed by its definition, so every platform
// derives the same vector from the same word.
std::uint64_t fnv1a(const std::string& text) {
    std::uint64_t hash = 14695981039346656037ull;
    for (const unsigned char c : text) {
        hash ^= c;
        hash *= 1099511628211ull;
    }
    return hash;
}

// E × L input, one column per word: uniform values in [-1, 1) seeded by the word's hash, plus the
// sinusoidal position encoding of "Attention Is All You Need" so that word order matters. The
// bits are mapped to floats by hand because std::uniform_real_distribution is not specified
// exactly, and the output must be the same everywhere.
Matrix embed(const std::vector<std::string>& words) {
    const Index length = static_cast<Index>(words.size());
    Matrix x(kEmbed, length);
    for (Index t = 0; t < length; ++t) {
        std::mt19937_64 engine(fnv1a(words[static_cast<std::size_t>(t)]));
        for (Index e = 0; e < kEmbed; ++e) {
            const double unit = static_cast<double>(engine() >> 11) * 0x1.0p-53;
            const double angle =
                static_cast<double>(t) /
                std::pow(10000.0, static_cast<double>(e - e % 2) / static_cast<double>(kEmbed));
            const double position = e % 2 == 0 ? std::sin(angle) : std::cos(angle);
            x(e, t) = static_cast<float>(2.0 * unit - 1.0 + position);
        }
    }
    return x;
}

// The library stores weights as Lk × Lq (column i: query i's weights over the keys). Printed
// here the usual way round: one row per query, one column per key.
void print_weights(const std::string& title, const Matrix& weights) {
    constexpr int label_width = 12;
    constexpr int cell_width = 11;
    std::cout << title << "\n" << std::left << std::setw(label_width) << "query\\key" << std::right;
    for (const std::string& word : kWords)
        std::cout << std::setw(cell_width) << word;
    std::cout << "\n" << std::fixed << std::setprecision(3);
    for (Index query = 0; query < weights.cols(); ++query) {
        std::cout << std::left << std::setw(label_width) << kWords[static_cast<std::size_t>(query)]
                  << std::right;
        for (Index key = 0; key < weights.rows(); ++key)
            std::cout << std::setw(cell_width) << weights(key, query);
        std::cout << "\n";
    }
    std::cout << "\n";
}

}  // namespace

int main(int argc, char** argv) {
    mha::attention_config config;
    config.embed_dim = kEmbed;
    config.num_heads = kHeads;
    const mha::multi_head_attention<float> layer(config, kLayerSeed);
    const Matrix x = embed(kWords);

    std::cout << "Sentence: Jane visite l'Afrique en septembre (" << kWords.size()
              << " tokens), E = " << kEmbed << ", " << kHeads << " heads of width "
              << kEmbed / kHeads << ".\n"
              << "The layer's weights are UNTRAINED (random, seed " << kLayerSeed
              << ") and the word\n"
              << "vectors are hashes of the words, so the patterns below are not meaningful:\n"
              << "near-uniform rows are typical of an untrained layer.\n"
              << "Rows are queries, columns are keys; each row sums to 1.\n\n";

    const auto per_head = layer.forward_with_weights(x, mha::weights_mode::per_head);
    Matrix mean = Matrix::Zero(x.cols(), x.cols());
    for (Index h = 0; h < kHeads; ++h) {
        const Matrix& weights = per_head.weights[static_cast<std::size_t>(h)];
        print_weights("Head " + std::to_string(h), weights);
        mean += weights / static_cast<float>(kHeads);
    }
    const auto averaged = layer.forward_with_weights(x, mha::weights_mode::averaged);
    print_weights("Averaged over the heads (weights_mode::averaged)", averaged.weights.front());
    // With a causal mask each word sees only itself and the words before it: zeros above the
    // diagonal, and the first word attends to itself alone.
    const auto causal = layer.forward_with_weights(x, mha::weights_mode::averaged, mha::causal{});
    print_weights("Averaged, with mha::causal{}", causal.weights.front());

    // The same weights as pictures. Untrained, so the title says so.
    const std::string folder = argc > 1 ? std::string(argv[1]) + "/" : std::string();
    mha::plot::options picture;
    picture.title = "Untrained layer (random weights, seed " + std::to_string(kLayerSeed) + ")";
    mha::plot::save(folder + "jane_heads.svg",
                    mha::plot::heat_maps(per_head.weights, kWords, picture));
    mha::plot::save(folder + "jane_lines.svg",
                    mha::plot::word_lines(per_head.weights, kWords, picture));
    std::cout << "Pictures: " << folder << "jane_heads.svg, " << folder << "jane_lines.svg\n";

    // The demo doubles as a test (ctest runs it): check what the tables claim.
    const float tolerance = 1e-5f;
    for (Index h = 0; h < kHeads; ++h) {
        const Matrix& weights = per_head.weights[static_cast<std::size_t>(h)];
        if (((weights.colwise().sum().array() - 1.0f).abs() > tolerance).any()) {
            std::cerr << "head " << h << ": a query's weights do not sum to 1\n";
            return EXIT_FAILURE;
        }
    }
    const Matrix& causal_weights = causal.weights.front();
    if (causal_weights.triangularView<Eigen::StrictlyLower>().toDenseMatrix().any() ||
        std::abs(causal_weights(0, 0) - 1.0f) > tolerance) {
        std::cerr << "the causal weights let a word attend to a later one\n";
        return EXIT_FAILURE;
    }
    if (!averaged.weights.front().isApprox(mean, tolerance)) {
        std::cerr << "weights_mode::averaged differs from the mean of the per-head weights\n";
        return EXIT_FAILURE;
    }
    if (!averaged.output.isApprox(per_head.output)) {
        std::cerr << "the output depends on the weights mode\n";
        return EXIT_FAILURE;
    }
    return EXIT_SUCCESS;
}
