// SPDX-License-Identifier: MIT
// Replays every file of the fuzzing corpus through the fuzzing oracle, so the invariants the
// fuzzer checks are checked in every ordinary test run too, without libFuzzer.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include "attention_invariants.hpp"
#include "layer_invariants.hpp"

namespace {

/// Calls visit(file name, bytes) for every file of a corpus directory; returns how many.
template <class Visit>
std::size_t for_each_corpus_file(const std::filesystem::path& corpus, Visit visit) {
    std::size_t files = 0;
    for (const auto& entry : std::filesystem::directory_iterator(corpus)) {
        std::ifstream file(entry.path(), std::ios::binary);
        const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(file)),
                                              std::istreambuf_iterator<char>());
        visit(entry.path().filename().string(), bytes);
        ++files;
    }
    return files;
}

}  // namespace

TEST_CASE("every corpus input satisfies the fuzzing invariants", "[fuzz]") {
    const std::size_t replayed = for_each_corpus_file(
        MHA_FUZZ_CORPUS_DIR, [](const std::string& name, const std::vector<std::uint8_t>& bytes) {
            CAPTURE(name);
            const auto violation = mha_fuzz::check(bytes.data(), bytes.size());
            INFO((violation ? *violation : std::string("none")));
            CHECK(!violation);
        });
    REQUIRE(replayed >= 10);  // the committed seed corpus; an empty directory must not pass
}

TEST_CASE("corpus inputs decode to grouped heads exactly when they carry the GQ trailer",
          "[fuzz]") {
    // The trailer came after the corpus: earlier files must keep one key/value head per query
    // head, and the grouped seeds must really group (else they would test nothing new).
    std::size_t grouped = 0;
    for_each_corpus_file(MHA_FUZZ_CORPUS_DIR, [&grouped](const std::string& name,
                                                         const std::vector<std::uint8_t>& bytes) {
        CAPTURE(name);
        const mha_fuzz::problem p = mha_fuzz::decode(bytes.data(), bytes.size());
        if (name.rfind("grouped_", 0) == 0) {
            CHECK(p.kv_heads < p.heads);
            CHECK(p.heads % p.kv_heads == 0);
            ++grouped;
        } else {
            CHECK(p.kv_heads == p.heads);
        }
    });
    REQUIRE(grouped >= 3);
}

TEST_CASE("corpus inputs decode to score terms exactly when their name says so", "[fuzz]") {
    // The score-terms trailer came after the corpus: earlier files must keep decoding without
    // soft-capping, ALiBi or sinks, and the files named for them must have them.
    std::size_t with_terms = 0, softcap = 0, alibi = 0, sinks = 0;
    for_each_corpus_file(
        MHA_FUZZ_CORPUS_DIR, [&](const std::string& name, const std::vector<std::uint8_t>& bytes) {
            CAPTURE(name);
            const mha_fuzz::problem p = mha_fuzz::decode(bytes.data(), bytes.size());
            const bool named = name.find("terms") != std::string::npos;
            CHECK(p.has_terms() == named);
            with_terms += named;
            softcap += p.softcap.has_value();
            alibi += !p.alibi.empty();
            sinks += !p.sinks.empty();
        });
    REQUIRE(with_terms >= 6);
    CHECK(softcap >= 2);
    CHECK(alibi >= 2);
    CHECK(sinks >= 2);
}

TEST_CASE("enough corpus inputs are small enough for the backward oracle", "[fuzz]") {
    std::size_t checked = 0, total = 0;
    for_each_corpus_file(
        MHA_FUZZ_CORPUS_DIR, [&](const std::string&, const std::vector<std::uint8_t>& bytes) {
            checked += mha_fuzz::backward_checked(mha_fuzz::decode(bytes.data(), bytes.size()));
            ++total;
        });
    INFO(checked << " of " << total);
    REQUIRE(checked >= 10);
}

TEST_CASE("every layer corpus input satisfies the layer fuzzer's invariants", "[fuzz]") {
    const std::size_t replayed = for_each_corpus_file(
        MHA_LAYER_CORPUS_DIR, [](const std::string& name, const std::vector<std::uint8_t>& bytes) {
            CAPTURE(name);
            const auto violation = mha_fuzz::check_layer(bytes.data(), bytes.size());
            INFO((violation ? *violation : std::string("none")));
            CHECK(!violation);
        });
    REQUIRE(replayed >= 10);  // the committed corpus; an empty directory must not pass
}
