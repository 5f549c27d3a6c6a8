// SPDX-License-Identifier: MIT
// Replays every file of the fuzzing corpus through the fuzzing oracle, so the invariants the
// fuzzer checks are checked in every ordinary test run too, without libFuzzer.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "attention_invariants.hpp"
#include "layer_invariants.hpp"

TEST_CASE("every corpus input satisfies the fuzzing invariants", "[fuzz]") {
    const std::filesystem::path corpus = MHA_FUZZ_CORPUS_DIR;
    std::size_t replayed = 0;
    for (const auto& entry : std::filesystem::directory_iterator(corpus)) {
        std::ifstream file(entry.path(), std::ios::binary);
        const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(file)),
                                              std::istreambuf_iterator<char>());
        CAPTURE(entry.path().filename().string());
        const auto violation = mha_fuzz::check(bytes.data(), bytes.size());
        INFO((violation ? *violation : std::string("none")));
        CHECK(!violation);
        ++replayed;
    }
    REQUIRE(replayed >= 10);  // the committed seed corpus; an empty directory must not pass
}

TEST_CASE("corpus inputs decode to grouped heads exactly when they carry the GQ trailer",
          "[fuzz]") {
    // The trailer came after the corpus: earlier files must keep one key/value head per query
    // head, and the grouped seeds must really group (else they would test nothing new).
    std::size_t grouped = 0;
    for (const auto& entry : std::filesystem::directory_iterator(MHA_FUZZ_CORPUS_DIR)) {
        std::ifstream file(entry.path(), std::ios::binary);
        const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(file)),
                                              std::istreambuf_iterator<char>());
        const std::string name = entry.path().filename().string();
        CAPTURE(name);
        const mha_fuzz::problem p = mha_fuzz::decode(bytes.data(), bytes.size());
        if (name.rfind("grouped_", 0) == 0) {
            CHECK(p.kv_heads < p.heads);
            CHECK(p.heads % p.kv_heads == 0);
            ++grouped;
        } else {
            CHECK(p.kv_heads == p.heads);
        }
    }
    REQUIRE(grouped >= 3);
}

TEST_CASE("every layer corpus input satisfies the layer fuzzer's invariants", "[fuzz]") {
    const std::filesystem::path corpus = MHA_LAYER_CORPUS_DIR;
    std::size_t replayed = 0;
    for (const auto& entry : std::filesystem::directory_iterator(corpus)) {
        std::ifstream file(entry.path(), std::ios::binary);
        const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(file)),
                                              std::istreambuf_iterator<char>());
        CAPTURE(entry.path().filename().string());
        const auto violation = mha_fuzz::check_layer(bytes.data(), bytes.size());
        INFO((violation ? *violation : std::string("none")));
        CHECK(!violation);
        ++replayed;
    }
    REQUIRE(replayed >= 10);  // the committed corpus; an empty directory must not pass
}
