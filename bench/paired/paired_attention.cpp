// SPDX-License-Identifier: MIT
// Two revisions of the attention core or layer in one program, called in turn on the same inputs:
// the driver behind compare_revisions.sh. On a shared, noisy machine two runs of the same binary
// minutes apart differ by up to ±10 %, which hides a 1–2 % change; calls of both revisions
// alternating within a few milliseconds see the same load, so their ratio keeps its digits.
//
//   paired_attention [--what core|layer] [--precision fp32|bf16] [--length L]
//                    [--mask none|causal|window] [--window W] [--d-model D] [--heads H]
//                    [--calls N] [--rounds R]
//
// core: multi_head_attention_core on Q, K and V of d_model rows each; layer: the whole layer's
// forward_into (projections included), seed 1; bf16: bfloat16 inputs, fp32 output.
//
// Each round makes N calls of each revision, alternating which goes first, and keeps each
// revision's fastest call (the one least disturbed by other work); the program prints every
// round's time(base) / time(new) and their median: above 1, the new revision is faster.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "paired.hpp"

namespace {

struct options {
    paired::problem problem;
    bool bf16 = false;
    bool layer = false;
    int calls = 10;
    int rounds = 7;
};

[[noreturn]] void usage(const char* message) {
    std::fprintf(stderr,
                 "paired_attention: %s\nusage: paired_attention [--what core|layer] "
                 "[--precision fp32|bf16] "
                 "[--length L] [--mask none|causal|window] [--window W] [--d-model D] "
                 "[--heads H] [--calls N] [--rounds R]\n",
                 message);
    std::exit(2);
}

long positive(const char* name, const char* text) {
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    if (end == text || *end != '\0' || value < 1) {
        const std::string message =
            std::string(name) + ": expected a positive integer, got '" + text + "'";
        usage(message.c_str());
    }
    return value;
}

options parse(int argc, char** argv) {
    options o;
    for (int i = 1; i < argc; i += 2) {
        const std::string name = argv[i];
        if (i + 1 >= argc) usage((name + ": expected a value after it").c_str());
        const char* value = argv[i + 1];
        if (name == "--what") {
            if (std::strcmp(value, "core") != 0 && std::strcmp(value, "layer") != 0)
                usage((name + ": expected core or layer, got '" + value + "'").c_str());
            o.layer = std::strcmp(value, "layer") == 0;
        } else if (name == "--precision") {
            if (std::strcmp(value, "fp32") != 0 && std::strcmp(value, "bf16") != 0)
                usage((name + ": expected fp32 or bf16, got '" + value + "'").c_str());
            o.bf16 = std::strcmp(value, "bf16") == 0;
        } else if (name == "--mask") {
            if (std::strcmp(value, "none") == 0)
                o.problem.mask = paired::mask_kind::none;
            else if (std::strcmp(value, "causal") == 0)
                o.problem.mask = paired::mask_kind::causal;
            else if (std::strcmp(value, "window") == 0)
                o.problem.mask = paired::mask_kind::window;
            else
                usage((name + ": expected none, causal or window, got '" + value + "'").c_str());
        } else if (name == "--length") {
            o.problem.length = positive("--length", value);
        } else if (name == "--window") {
            o.problem.window = positive("--window", value);
        } else if (name == "--d-model") {
            o.problem.d_model = positive("--d-model", value);
        } else if (name == "--heads") {
            o.problem.heads = positive("--heads", value);
        } else if (name == "--calls") {
            o.calls = static_cast<int>(positive("--calls", value));
        } else if (name == "--rounds") {
            o.rounds = static_cast<int>(positive("--rounds", value));
        } else {
            usage(("unknown option '" + name + "'").c_str());
        }
    }
    if (o.problem.d_model % o.problem.heads != 0)
        usage(("--d-model: expected a multiple of --heads (" + std::to_string(o.problem.heads) +
               "), got " + std::to_string(o.problem.d_model))
                  .c_str());
    return o;
}

// Calls both revisions' core on the same inputs; run(revision, out) returns one call's time.
template <class Run>
int compare(const options& o, Run run) {
    const paired::revision base = paired::revision_base(), fresh = paired::revision_new();
    const paired::problem& p = o.problem;
    Eigen::MatrixXf out_base(p.d_model, p.length), out_new(p.d_model, p.length);
    // The first calls size the workspaces (and fault their pages in); they are not timed. Their
    // outputs tell whether the change kept the results: 0 when it should keep the bits.
    run(base, out_base);
    run(fresh, out_new);
    std::printf("%s %s, L = %ld, %ld heads of %ld, mask %s; max |base - new| = %g\n",
                o.bf16 ? "bf16" : "fp32", o.layer ? "layer" : "core", p.length, p.heads,
                p.d_model / p.heads,
                p.mask == paired::mask_kind::none     ? "none"
                : p.mask == paired::mask_kind::causal ? "causal"
                                                      : "window",
                static_cast<double>((out_base - out_new).cwiseAbs().maxCoeff()));
    std::vector<double> ratios;
    for (int r = 0; r < o.rounds; ++r) {
        double fastest_base = 1e300, fastest_new = 1e300;
        for (int c = 0; c < o.calls; ++c) {
            // Alternating who goes first, so that neither always runs with a warmer cache.
            if (c % 2 == 0) {
                fastest_base = std::min(fastest_base, run(base, out_base));
                fastest_new = std::min(fastest_new, run(fresh, out_new));
            } else {
                fastest_new = std::min(fastest_new, run(fresh, out_new));
                fastest_base = std::min(fastest_base, run(base, out_base));
            }
        }
        ratios.push_back(fastest_base / fastest_new);
        std::printf("round %d: base %.3f ms, new %.3f ms, base/new %.4f\n", r + 1, fastest_base,
                    fastest_new, ratios.back());
    }
    std::sort(ratios.begin(), ratios.end());
    std::printf("median base/new %.4f\n", ratios[ratios.size() / 2]);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const options o = parse(argc, argv);
    const paired::problem& p = o.problem;
    const Eigen::MatrixXf qkv = Eigen::MatrixXf::Random(3 * p.d_model, p.length);
    if (!o.bf16)
        return compare(o, [&](const paired::revision& rev, Eigen::MatrixXf& out) {
            return (o.layer ? rev.layer_fp32 : rev.core_fp32)(qkv, p, out);
        });
    const paired::bf16_matrix qkv_bf16 = qkv.cast<Eigen::bfloat16>();
    return compare(o, [&](const paired::revision& rev, Eigen::MatrixXf& out) {
        return (o.layer ? rev.layer_bf16 : rev.core_bf16)(qkv_bf16, p, out);
    });
}
