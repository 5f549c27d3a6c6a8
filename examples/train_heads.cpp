// SPDX-License-Identifier: MIT
// A tiny model trained with this library's backward pass, in which two attention heads come to
// ask two different questions.
//
// The language: a sentence is a few words, a name (its subject), then six more words, drawn at
// random from a small French vocabulary. Each word after the first one following the name is
// tagged with a compound label: (the word before it, the sentence's subject). Predicting a tag
// therefore needs two relations at once: "which word came just before me?" (a question of
// position) and "who is this sentence about?" (a question of content: the subject stands
// anywhere from the first to the third place). Words are random, so the word itself says nothing
// about either.
//
// The model: word embeddings plus learned position embeddings, one causal multi-head attention
// layer with two heads, and an output projection to the 64 labels; no residual connection and
// no feed-forward layer, so everything a prediction knows comes through the two heads.
// Training: cross-entropy, gradients from mha::layer_backward, Adam written below.
//
// It prints the loss curve (and writes it to train_heads_loss.csv), then each head's average
// weight on "the word before" and on "the subject" over held-out sentences, and draws the
// heads on one held-out sentence (train_heads_heads.svg, train_heads_lines.svg). Files go to the
// folder given as the first argument, or to the current one. Exit status 1 unless the loss fell
// at least 10× and each relation is carried by its own head with an average weight of at least
// 0.8: as a test (ctest runs it), "the heads specialise" is a checked fact.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <mha/layer_backward.hpp>
#include <mha/mha.hpp>
#include <mha/plot.hpp>

namespace {

using mha::Index;
using Matrix = mha::matrix<float>;
using Vector = mha::vector<float>;

const std::vector<std::string> kWords = {
    "visite", "l'Afrique", "en",   "septembre", "aime", "Paris", "voit",  "la",
    "mer",    "part",      "pour", "Rome",      "lit",  "un",    "livre", "demain"};
const std::vector<std::string> kNames = {"Jane", "Paul", "Marie", "Omar"};
const Index kWordCount = static_cast<Index>(kWords.size());  // 16
const Index kNameCount = static_cast<Index>(kNames.size());  // 4
const Index kVocabulary = kWordCount + kNameCount;           // token ids: words, then names
const Index kLabels = kWordCount * kNameCount;               // (word before, subject)
constexpr Index kMaxPrefix = 2;                              // words before the subject
constexpr Index kWordsAfter = 6;                             // words after the subject
constexpr Index kMaxLength = kMaxPrefix + 1 + kWordsAfter;   // 9 positions
constexpr Index kEmbed = 32;
constexpr Index kHeads = 2;
constexpr int kSteps = 300;
constexpr Index kBatch = 32;  // sentences per step
constexpr std::uint64_t kSeed = 7;

struct sentence {
    std::vector<Index> tokens;  // ids into words, then names
    Index subject_position = 0;
    std::vector<Index> labels;  // per position: −1 (no tag) or (word before)·kNameCount + name
};

// Uniform integer in [0, n) from the engine's bits (std::uniform_int_distribution is not
// specified exactly: the same seed must give the same run everywhere).
Index draw(std::mt19937_64& engine, Index n) {
    return static_cast<Index>(engine() % static_cast<std::uint64_t>(n));
}

float uniform(std::mt19937_64& engine, float bound) {
    const double unit = static_cast<double>(engine() >> 11) * 0x1.0p-53;
    return static_cast<float>((2 * unit - 1) * bound);
}

sentence make_sentence(std::mt19937_64& engine) {
    sentence s;
    const Index prefix = draw(engine, kMaxPrefix + 1);
    for (Index i = 0; i < prefix; ++i)
        s.tokens.push_back(draw(engine, kWordCount));
    const Index name = draw(engine, kNameCount);
    s.subject_position = prefix;
    s.tokens.push_back(kWordCount + name);
    for (Index i = 0; i < kWordsAfter; ++i)
        s.tokens.push_back(draw(engine, kWordCount));
    s.labels.assign(s.tokens.size(), -1);
    // Tagged: the words whose previous word is a word after the subject.
    for (auto t = static_cast<std::size_t>(prefix + 2); t < s.tokens.size(); ++t)
        s.labels[t] = s.tokens[t - 1] * kNameCount + name;
    return s;
}

std::string label_text(Index label) {
    return "(" + kWords[static_cast<std::size_t>(label / kNameCount)] + ", " +
           kNames[static_cast<std::size_t>(label % kNameCount)] + ")";
}

std::string token_text(Index token) {
    return token < kWordCount ? kWords[static_cast<std::size_t>(token)]
                              : kNames[static_cast<std::size_t>(token - kWordCount)];
}

// Everything the model learns besides the attention layer.
struct model {
    Matrix embedding;  // E × vocabulary
    Matrix position;   // E × kMaxLength
    Matrix readout;    // labels × E
    Vector readout_bias;
    mha::attention_parameters<float> attention;
};

// Adam (Kingma and Ba) over one tensor: its moments live beside it.
struct adam_slot {
    Eigen::Map<Eigen::ArrayXf> value;
    Eigen::ArrayXf m, v;
    template <class Tensor>
    explicit adam_slot(Tensor& t)
        : value(t.data(), t.size()),
          m(Eigen::ArrayXf::Zero(t.size())),
          v(Eigen::ArrayXf::Zero(t.size())) {}
};

struct adam {
    float learning_rate = 0.01f, beta1 = 0.9f, beta2 = 0.999f, epsilon = 1e-8f;
    int step = 0;
    std::vector<adam_slot> slots;

    template <class Tensor>
    void add(Tensor& t) {
        slots.emplace_back(t);
    }
    // grads[i] is the gradient of slots[i]'s tensor, as a flat array of the same size.
    void update(const std::vector<Eigen::ArrayXf>& grads) {
        ++step;
        const float c1 = 1 - std::pow(beta1, static_cast<float>(step));
        const float c2 = 1 - std::pow(beta2, static_cast<float>(step));
        for (std::size_t i = 0; i < slots.size(); ++i) {
            adam_slot& s = slots[i];
            s.m = beta1 * s.m + (1 - beta1) * grads[i];
            s.v = beta2 * s.v + (1 - beta2) * grads[i].square();
            s.value -= learning_rate * (s.m / c1) / ((s.v / c2).sqrt() + epsilon);
        }
    }
};

template <class Tensor>
Eigen::ArrayXf flat(const Tensor& t) {
    return Eigen::Map<const Eigen::ArrayXf>(t.data(), t.size());
}

mha::attention_config layer_config() {
    mha::attention_config c;
    c.embed_dim = kEmbed;
    c.num_heads = kHeads;
    return c.resolved();
}

// The layer's input for a batch of sentences packed side by side: E × (total tokens).
Matrix embed(const model& m, const std::vector<sentence>& batch) {
    Index total = 0;
    for (const sentence& s : batch)
        total += static_cast<Index>(s.tokens.size());
    Matrix x(kEmbed, total);
    Index column = 0;
    for (const sentence& s : batch)
        for (std::size_t t = 0; t < s.tokens.size(); ++t, ++column)
            x.col(column) = m.embedding.col(s.tokens[t]) + m.position.col(static_cast<Index>(t));
    return x;
}

mha::packed_batch pack(const std::vector<sentence>& batch) {
    std::vector<Index> lengths;
    for (const sentence& s : batch)
        lengths.push_back(static_cast<Index>(s.tokens.size()));
    return mha::packed_batch(lengths);
}

// One training step on `batch`: returns the mean cross-entropy over the tagged words.
float train_step(model& m, adam& optimiser, const std::vector<sentence>& batch) {
    const mha::attention_config config = layer_config();
    const Matrix x = embed(m, batch);  // E × N
    const mha::packed_batch packed = pack(batch);
    const mha::layer_saved_state<float> saved = mha::layer_forward_for_backward<float>(
        config, m.attention, x, x, x, true, packed, mha::causal{});
    Matrix logits = m.readout * saved.output;  // labels × N
    logits.colwise() += m.readout_bias;

    // Cross-entropy of the softmax over labels; its gradient is (softmax − one-hot) / count.
    Matrix d_logits = Matrix::Zero(kLabels, x.cols());
    double loss = 0;
    Index tagged = 0, column = 0;
    for (const sentence& s : batch)
        for (const Index label : s.labels) {
            if (label >= 0) {
                const float top = logits.col(column).maxCoeff();
                const Eigen::ArrayXf e = (logits.col(column).array() - top).exp();
                const float sum = e.sum();
                loss += std::log(sum) - (logits(label, column) - top);
                d_logits.col(column) = (e / sum).matrix();
                d_logits(label, column) -= 1;
                ++tagged;
            }
            ++column;
        }
    d_logits /= static_cast<float>(tagged);

    const Matrix d_readout = d_logits * saved.output.transpose();  // labels × E
    const Vector d_readout_bias = d_logits.rowwise().sum();
    const Matrix d_output = m.readout.transpose() * d_logits;  // E × N
    const mha::layer_gradients<float> g =
        mha::layer_backward<float>(config, m.attention, saved, d_output);

    // The input x = embedding[token] + position[t]: both receive x's gradient.
    Matrix d_embedding = Matrix::Zero(kEmbed, kVocabulary);
    Matrix d_position = Matrix::Zero(kEmbed, kMaxLength);
    column = 0;
    for (const sentence& s : batch)
        for (std::size_t t = 0; t < s.tokens.size(); ++t, ++column) {
            d_embedding.col(s.tokens[t]) += g.d_query.col(column);
            d_position.col(static_cast<Index>(t)) += g.d_query.col(column);
        }

    const mha::attention_parameters<float>& d = g.parameters;
    optimiser.update({flat(d_embedding), flat(d_position), flat(d_readout), flat(d_readout_bias),
                      flat(d.w_q), flat(d.w_k), flat(d.w_v), flat(d.w_o), flat(d.b_q), flat(d.b_k),
                      flat(d.b_v), flat(d.b_o)});
    return static_cast<float>(loss / static_cast<double>(tagged));
}

// Per-head weights of one sentence (the layer's layout: Lk × Lq, column i is query i's).
std::vector<Matrix> head_weights(const model& m, const sentence& s) {
    const mha::multi_head_attention<float> layer(layer_config(), m.attention);
    const Matrix x = embed(m, {s});
    return layer.forward_with_weights(x, mha::weights_mode::per_head, mha::causal{}).weights;
}

}  // namespace

int main(int argc, char** argv) {
    const std::string folder = argc > 1 ? std::string(argv[1]) + "/" : std::string();
    std::mt19937_64 engine(kSeed);

    model m;
    const auto init = [&engine](Index rows, Index cols, float bound) {
        Matrix w(rows, cols);
        for (Index i = 0; i < w.size(); ++i)
            w.data()[i] = uniform(engine, bound);
        return w;
    };
    m.embedding = init(kEmbed, kVocabulary, 1.0f);
    m.position = init(kEmbed, kMaxLength, 1.0f);
    m.readout = init(kLabels, kEmbed, 1.0f / std::sqrt(static_cast<float>(kEmbed)));
    m.readout_bias = Vector::Zero(kLabels);
    m.attention = mha::multi_head_attention<float>(layer_config(), kSeed).parameters();

    adam optimiser;
    for (auto* t : {&m.embedding, &m.position, &m.readout})
        optimiser.add(*t);
    optimiser.add(m.readout_bias);
    mha::attention_parameters<float>& a = m.attention;
    for (auto* t : {&a.w_q, &a.w_k, &a.w_v, &a.w_o})
        optimiser.add(*t);
    for (auto* t : {&a.b_q, &a.b_k, &a.b_v, &a.b_o})
        optimiser.add(*t);

    std::ofstream csv(folder + "train_heads_loss.csv");
    csv << "step,loss\n";
    std::cout << "Training 1 attention layer (" << kHeads << " heads, E = " << kEmbed
              << ") to tag each word with (the word before it, the sentence's subject).\n"
              << "step   loss\n";
    float first_loss = 0, last_loss = 0;
    for (int step = 0; step < kSteps; ++step) {
        std::vector<sentence> batch;
        for (Index b = 0; b < kBatch; ++b)
            batch.push_back(make_sentence(engine));
        const float loss = train_step(m, optimiser, batch);
        if (step == 0) first_loss = loss;
        last_loss = loss;
        csv << step << "," << loss << "\n";
        if ((step < 100 && step % 10 == 0) || step % 100 == 0 || step == kSteps - 1)
            std::cout << std::setw(4) << step << "   " << std::setprecision(3) << loss << "\n";
    }

    // Held out: sentences from another seed, never trained on (6 random words after the subject
    // make a repeat of a training sentence unlikely, and no check depends on one).
    std::mt19937_64 held_out(kSeed + 1000);
    constexpr int kHeldOut = 200;
    double on_previous[kHeads] = {}, on_subject[kHeads] = {};
    Index queries = 0, correct = 0;
    for (int n = 0; n < kHeldOut; ++n) {
        const sentence s = make_sentence(held_out);
        const std::vector<Matrix> w = head_weights(m, s);
        const mha::multi_head_attention<float> layer(layer_config(), m.attention);
        const Matrix out = layer.forward(embed(m, {s}), mha::causal{});
        for (std::size_t t = 0; t < s.tokens.size(); ++t) {
            if (s.labels[t] < 0) continue;
            const auto i = static_cast<Index>(t);
            for (Index h = 0; h < kHeads; ++h) {
                on_previous[h] += w[static_cast<std::size_t>(h)](i - 1, i);
                on_subject[h] += w[static_cast<std::size_t>(h)](s.subject_position, i);
            }
            Index predicted = 0;
            (m.readout * out.col(i) + m.readout_bias).maxCoeff(&predicted);
            correct += predicted == s.labels[t] ? 1 : 0;
            ++queries;
        }
    }
    std::cout << "Loss: " << first_loss << " at the first step, " << last_loss << " at the last\n"
              << "\nHeld-out sentences: " << kHeldOut << ", tagged words: " << queries
              << ", tags right: " << std::fixed << std::setprecision(1)
              << 100.0 * static_cast<double>(correct) / static_cast<double>(queries) << " %\n"
              << "Average weight of each head, over the tagged words:\n"
              << "head   on the word before   on the subject\n";
    for (Index h = 0; h < kHeads; ++h) {
        on_previous[h] /= static_cast<double>(queries);
        on_subject[h] /= static_cast<double>(queries);
        std::cout << std::setw(4) << h << "   " << std::setprecision(3) << std::setw(18)
                  << on_previous[h] << "   " << std::setw(14) << on_subject[h] << "\n";
    }

    // One held-out sentence, drawn: the first whose subject is not its first word (the picture
    // then shows the subject head finding the name by what it is, not where it stands) and whose
    // words are all different (so that each line is read without doubt).
    const auto readable = [](const sentence& s) {
        std::vector<Index> sorted = s.tokens;
        std::sort(sorted.begin(), sorted.end());
        return s.subject_position > 0 &&
               std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end();
    };
    sentence example = make_sentence(held_out);
    while (!readable(example))
        example = make_sentence(held_out);
    std::vector<std::string> tokens;
    for (const Index t : example.tokens)
        tokens.push_back(token_text(t));
    const std::vector<Matrix> w = head_weights(m, example);
    const Index previous_head = on_previous[0] >= on_previous[1] ? 0 : 1;
    mha::plot::options picture;
    picture.title = "Trained heads on a held-out sentence";
    picture.head_names.assign(kHeads, "");
    picture.head_names[static_cast<std::size_t>(previous_head)] =
        "head " + std::to_string(previous_head) + ": the word before";
    picture.head_names[static_cast<std::size_t>(1 - previous_head)] =
        "head " + std::to_string(1 - previous_head) + ": the subject";
    mha::plot::save(folder + "train_heads_heads.svg", mha::plot::heat_maps(w, tokens, picture));
    mha::plot::save(folder + "train_heads_lines.svg", mha::plot::word_lines(w, tokens, picture));
    std::cout << "\nPictures of one held-out sentence (" << folder << "train_heads_heads.svg, "
              << folder << "train_heads_lines.svg); its tags:";
    for (std::size_t t = 0; t < example.tokens.size(); ++t)
        if (example.labels[t] >= 0)
            std::cout << " " << tokens[t] << "=" << label_text(example.labels[t]);
    std::cout << "\n";

    // The claims, checked.
    bool ok = true;
    if (!(last_loss * 10 <= first_loss)) {
        std::cerr << "the loss fell from " << first_loss << " to " << last_loss
                  << ", less than 10×\n";
        ok = false;
    }
    const Index subject_head = 1 - previous_head;
    if (on_previous[previous_head] < 0.8 || on_subject[subject_head] < 0.8) {
        std::cerr << "the relations are not each carried by one head with weight >= 0.8 (head "
                  << previous_head << " on the word before: " << on_previous[previous_head]
                  << ", head " << subject_head << " on the subject: " << on_subject[subject_head]
                  << ")\n";
        ok = false;
    }
    return ok ? EXIT_SUCCESS : EXIT_FAILURE;
}
