// SPDX-License-Identifier: MIT
// Pictures of attention weights as SVG documents: per-head heat maps with the tokens as axis
// labels, and the "lines between words" view in which each line's width is a weight. Standard
// library only (no drawing library); not included by mha.hpp, since most programs never draw.
//
// The weights are the library's own: one `Lk × Lq` matrix per head, column i holding query i's
// weights over the keys (`attention_result::weights` with `weights_mode::per_head`, one
// sequence's H matrices). Pictures show them the usual way round: queries down, keys across.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <fstream>
#include <locale>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <mha/core.hpp>

namespace mha {
namespace plot {

/// How a picture is drawn. The defaults suit 5 to 64 tokens: cell and row sizes shrink as the
/// token count grows, down to a readable minimum.
struct options {
    /// Drawn above the picture; none when empty.
    std::string title{};
    /// One name per head for panel titles and the legend; "head 0", "head 1", … when empty.
    std::vector<std::string> head_names{};
    /// The weight drawn at full colour (heat maps) or at `max_line_width` (lines). Softmax
    /// weights are at most 1; a larger weight (ReLU or sigmoid normalisation) raises the scale to
    /// the largest weight drawn, so that no colour or width is clipped. Must be positive.
    double full_weight = 1.0;
    /// Lines view: weights below this are not drawn (they would only grey the picture). In
    /// [0, full_weight]; 0 draws every nonzero weight.
    double min_weight = 0.05;
    /// Lines view: the width in pixels of a line whose weight is `full_weight` (at most half the
    /// height of a word's row: 15 pixels up to 20 tokens, 5.5 at 64).
    double max_line_width = 10.0;
    /// Heat maps: at most this many panels side by side.
    int panels_per_row = 4;
};

namespace detail {

// A number as SVG wants it whatever the program's locale: a dot, no grouping, 2 decimals.
inline std::string number(double value) {
    std::ostringstream out;
    out.imbue(std::locale::classic());
    out.setf(std::ios::fixed);
    out.precision(2);
    out << value;
    return out.str();
}

// Text for an SVG element's content or an attribute value: the five XML special characters
// escaped, control characters (not allowed in XML 1.0) replaced by '?'.
inline std::string escape(const std::string& text) {
    std::string out;
    out.reserve(text.size());
    for (const char c : text) {
        switch (c) {
            case '&':
                out += "&amp;";
                break;
            case '<':
                out += "&lt;";
                break;
            case '>':
                out += "&gt;";
                break;
            case '"':
                out += "&quot;";
                break;
            case '\'':
                out += "&apos;";
                break;
            default:
                if (static_cast<unsigned char>(c) < 0x20 && c != '\t') {
                    out += '?';
                } else {
                    out += c;
                }
        }
    }
    return out;
}

// Tokens longer than this are cut to it (with "…") on axes, so one long token cannot push the
// picture off the page.
constexpr std::size_t label_chars = 18;

// The number of characters of UTF-8 text (continuation bytes do not count).
inline std::size_t characters(const std::string& text) {
    std::size_t n = 0;
    for (const char c : text)
        if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) ++n;
    return n;
}

// The number of characters an axis label shows.
inline std::size_t shown_chars(const std::string& token) {
    return std::min(characters(token), label_chars + 1);
}

inline std::string label(const std::string& token) {
    std::size_t chars = 0;
    for (std::size_t i = 0; i < token.size(); ++i) {
        if ((static_cast<unsigned char>(token[i]) & 0xC0) != 0x80 && ++chars > label_chars)
            return escape(token.substr(0, i)) + "\xE2\x80\xA6";  // …
    }
    return escape(token);
}

// Head colours: ten hues far apart in hue and lightness, readable on white, in an order where
// neighbours differ most (heads 0 and 1 are blue and orange).
inline const char* head_colour(std::size_t head) {
    static const char* const colours[] = {"#2f6db3", "#e07b1a", "#2e9a4b", "#c63a3a", "#7d56b5",
                                          "#8a5a44", "#d15fa6", "#6f6f6f", "#a3a51d", "#1ea5b8"};
    return colours[head % (sizeof colours / sizeof colours[0])];
}

// The colour a fraction t ∈ [0, 1] of the way from white to `hex` ("#rrggbb").
inline std::string blend_from_white(const char* hex, double t) {
    const auto channel = [hex](int i) {
        return std::stoi(std::string(hex + 1 + 2 * i, 2), nullptr, 16);
    };
    std::ostringstream out;
    out.imbue(std::locale::classic());
    out << "rgb(";
    for (int i = 0; i < 3; ++i) {
        const double v = 255.0 + t * (channel(i) - 255.0);
        out << (i > 0 ? "," : "") << static_cast<int>(std::lround(v));
    }
    out << ")";
    return out.str();
}

template <class Scalar>
void check_inputs(const char* where, const std::vector<matrix<Scalar>>& weights,
                  const std::vector<std::string>& query_tokens,
                  const std::vector<std::string>& key_tokens, const options& opts) {
    using mha::detail::fail;
    if (weights.empty()) fail<shape_error>(where, "weights", "at least one head's matrix", "none");
    for (std::size_t h = 0; h < weights.size(); ++h) {
        const std::string name = "weights[" + std::to_string(h) + "]";
        mha::detail::check_size(where, name + ".rows()", static_cast<Index>(key_tokens.size()),
                                weights[h].rows(), "the number of key tokens");
        mha::detail::check_size(where, name + ".cols()", static_cast<Index>(query_tokens.size()),
                                weights[h].cols(), "the number of query tokens");
    }
    if (!opts.head_names.empty() && opts.head_names.size() != weights.size())
        fail<shape_error>(where, "options.head_names.size()",
                          std::to_string(weights.size()) + " (one name per head) or 0",
                          opts.head_names.size());
    if (!(opts.full_weight > 0) || !std::isfinite(opts.full_weight))
        fail<value_error>(where, "options.full_weight", "positive and finite", opts.full_weight);
    if (!(opts.min_weight >= 0 && opts.min_weight <= opts.full_weight))
        fail<value_error>(
            where, "options.min_weight",
            "in [0, options.full_weight = " + mha::detail::to_text(opts.full_weight) + "]",
            opts.min_weight);
    if (!(opts.max_line_width > 0) || !std::isfinite(opts.max_line_width))
        fail<value_error>(where, "options.max_line_width", "positive and finite",
                          opts.max_line_width);
    if (opts.panels_per_row < 1)
        fail<value_error>(where, "options.panels_per_row", "at least 1", opts.panels_per_row);
}

// The weight drawn at full strength: full_weight, or the largest finite weight if larger.
template <class Scalar>
double full_scale(const std::vector<matrix<Scalar>>& weights, const options& opts) {
    double top = opts.full_weight;
    for (const auto& w : weights)
        for (Index i = 0; i < w.size(); ++i) {
            const double v = static_cast<double>(w.data()[i]);
            if (std::isfinite(v)) top = std::max(top, v);
        }
    return top;
}

inline std::string head_name(const options& opts, std::size_t h) {
    return opts.head_names.empty() ? "head " + std::to_string(h) : opts.head_names[h];
}

// Whole pixels, so that a browser's screenshot of the document has exactly its size.
inline std::string svg_open(double width, double height) {
    width = std::ceil(width);
    height = std::ceil(height);
    return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + number(width) + "\" height=\"" +
           number(height) + "\" viewBox=\"0 0 " + number(width) + " " + number(height) +
           "\" font-family=\"DejaVu Sans, Arial, sans-serif\">\n<rect width=\"100%\" "
           "height=\"100%\" fill=\"white\"/>\n";
}

}  // namespace detail

/// Heat maps of attention weights, one panel per head: row i is query i, column j key j, the
/// cell's colour runs from white (0) to the head's colour (`options::full_weight`), NaN is
/// drawn hatched grey. Axis labels are the tokens; each panel has a colour bar with its scale.
/// `weights`: H matrices `key_tokens.size() × query_tokens.size()` (the library's layout).
/// Returns a standalone SVG document. Throws shape_error / value_error on bad arguments.
template <class Scalar>
std::string heat_maps(const std::vector<matrix<Scalar>>& weights,
                      const std::vector<std::string>& query_tokens,
                      const std::vector<std::string>& key_tokens, const options& opts = {}) {
    using detail::number;
    detail::check_inputs("mha::plot::heat_maps", weights, query_tokens, key_tokens, opts);
    const double scale = detail::full_scale(weights, opts);
    const auto lq = static_cast<double>(query_tokens.size());
    const auto lk = static_cast<double>(key_tokens.size());
    const double cell = std::clamp(360.0 / std::max({lq, lk, 1.0}), 9.0, 40.0);
    const double font = std::clamp(cell * 0.55, 8.0, 13.0);
    std::size_t longest_query = 1, longest_key = 1;
    for (const auto& t : query_tokens)
        longest_query = std::max(longest_query, detail::shown_chars(t));
    for (const auto& t : key_tokens)
        longest_key = std::max(longest_key, detail::shown_chars(t));
    // Key labels stand at 60° above the grid: their height is about 0.87 of their length.
    const double char_width = 0.62 * font;
    const double left = 8 + char_width * static_cast<double>(longest_query);
    const double top = 22 + 0.87 * char_width * static_cast<double>(longest_key);
    const double bar = 34;  // colour bar and its labels under each grid
    const double panel_w = left + cell * lk + 16, panel_h = top + cell * lq + bar;
    const std::size_t heads = weights.size();
    const std::size_t per_row = std::min(heads, static_cast<std::size_t>(opts.panels_per_row));
    const std::size_t rows = (heads + per_row - 1) / per_row;
    const double title_h = opts.title.empty() ? 0 : 30;
    const double width = std::max(panel_w * static_cast<double>(per_row), 160.0);
    const double height = title_h + panel_h * static_cast<double>(rows) + 8;
    const bool values_fit = cell >= 30;  // two decimals fit in the cell from 30 px

    std::string svg = detail::svg_open(width, height);
    svg +=
        "<defs><pattern id=\"nan\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\">"
        "<rect width=\"6\" height=\"6\" fill=\"#dddddd\"/><path d=\"M0,6 L6,0\" "
        "stroke=\"#888888\"/></pattern></defs>\n";
    if (!opts.title.empty())
        svg += "<text class=\"title\" x=\"" + number(width / 2) +
               "\" y=\"20\" font-size=\"15\" "
               "text-anchor=\"middle\">" +
               detail::escape(opts.title) + "</text>\n";
    for (std::size_t h = 0; h < heads; ++h) {
        const double x0 = panel_w * static_cast<double>(h % per_row);
        const double y0 = title_h + panel_h * static_cast<double>(h / per_row);
        const double gx = x0 + left, gy = y0 + top;
        const char* colour = detail::head_colour(h);
        svg += "<g class=\"panel\" data-head=\"" + std::to_string(h) + "\">\n";
        svg += "<text class=\"head\" x=\"" + number(gx) + "\" y=\"" + number(y0 + 14) +
               "\" font-size=\"13\" font-weight=\"bold\" fill=\"" + colour + "\">" +
               detail::escape(detail::head_name(opts, h)) + "</text>\n";
        for (std::size_t j = 0; j < key_tokens.size(); ++j) {
            const double x = gx + cell * (static_cast<double>(j) + 0.5), y = gy - 4;
            svg += "<text class=\"key\" x=\"" + number(x) + "\" y=\"" + number(y) +
                   "\" font-size=\"" + number(font) + "\" transform=\"rotate(-60 " + number(x) +
                   " " + number(y) + ")\">" + detail::label(key_tokens[j]) + "</text>\n";
        }
        for (std::size_t i = 0; i < query_tokens.size(); ++i) {
            svg += "<text class=\"query\" x=\"" + number(gx - 4) + "\" y=\"" +
                   number(gy + cell * (static_cast<double>(i) + 0.5) + font * 0.35) +
                   "\" font-size=\"" + number(font) + "\" text-anchor=\"end\">" +
                   detail::label(query_tokens[i]) + "</text>\n";
        }
        const matrix<Scalar>& w = weights[h];
        for (Index i = 0; i < w.cols(); ++i)
            for (Index j = 0; j < w.rows(); ++j) {
                const double v = static_cast<double>(w(j, i));
                const double x = gx + cell * static_cast<double>(j);
                const double y = gy + cell * static_cast<double>(i);
                const double t = std::isnan(v) ? 0 : std::clamp(v / scale, 0.0, 1.0);
                const std::string fill =
                    std::isnan(v) ? std::string("url(#nan)") : detail::blend_from_white(colour, t);
                svg += "<rect class=\"cell\" x=\"" + number(x) + "\" y=\"" + number(y) +
                       "\" width=\"" + number(cell) + "\" height=\"" + number(cell) + "\" fill=\"" +
                       fill + "\" stroke=\"#ffffff\" stroke-width=\"0.5\"/>\n";
                if (values_fit && !std::isnan(v))
                    svg += "<text class=\"value\" x=\"" + number(x + cell / 2) + "\" y=\"" +
                           number(y + cell / 2 + 3.5) +
                           "\" font-size=\"10\" text-anchor=\"middle\" fill=\"" +
                           (t > 0.55 ? "white" : "#333333") + "\">" + number(v) + "</text>\n";
            }
        // The colour bar: the scale of this panel, white at 0 to the head's colour at `scale`.
        const double by = gy + cell * lq + 10, bw = std::min(cell * lk, 160.0);
        const std::string gradient = "scale" + std::to_string(h);
        svg += "<defs><linearGradient id=\"" + gradient +
               "\"><stop offset=\"0\" stop-color=\"white\"/>"
               "<stop offset=\"1\" stop-color=\"" +
               colour + "\"/></linearGradient></defs>\n";
        svg += "<rect class=\"bar\" x=\"" + number(gx) + "\" y=\"" + number(by) + "\" width=\"" +
               number(bw) + "\" height=\"8\" fill=\"url(#" + gradient +
               ")\" stroke=\"#999999\" stroke-width=\"0.5\"/>\n";
        svg += "<text class=\"tick\" x=\"" + number(gx) + "\" y=\"" + number(by + 20) +
               "\" font-size=\"10\">0</text>\n";
        svg += "<text class=\"tick\" x=\"" + number(gx + bw) + "\" y=\"" + number(by + 20) +
               "\" font-size=\"10\" text-anchor=\"end\">" + number(scale) + "</text>\n";
        svg += "</g>\n";
    }
    svg += "</svg>\n";
    return svg;
}

/// The same for self-attention: one token list for queries and keys.
template <class Scalar>
std::string heat_maps(const std::vector<matrix<Scalar>>& weights,
                      const std::vector<std::string>& tokens, const options& opts = {}) {
    return heat_maps(weights, tokens, tokens, opts);
}

/// Attention as lines between words: the queries in a column on the left, the keys on the
/// right, and a line from query i to key j for every weight of at least `options::min_weight`,
/// its width proportional to the weight (`options::max_line_width` at `options::full_weight`,
/// or half a row's height if that is less: many tokens make rows narrow),
/// one colour per head, with a legend. Lines of different heads between the same two words are
/// drawn side by side, so that none hides another. NaN weights are not drawn.
/// `weights`: H matrices `key_tokens.size() × query_tokens.size()` (the library's layout).
/// Returns a standalone SVG document. Throws shape_error / value_error on bad arguments.
template <class Scalar>
std::string word_lines(const std::vector<matrix<Scalar>>& weights,
                       const std::vector<std::string>& query_tokens,
                       const std::vector<std::string>& key_tokens, const options& opts = {}) {
    using detail::number;
    detail::check_inputs("mha::plot::word_lines", weights, query_tokens, key_tokens, opts);
    const double scale = detail::full_scale(weights, opts);
    const std::size_t heads = weights.size();
    const double tokens = static_cast<double>(std::max(query_tokens.size(), key_tokens.size()));
    const double row = std::clamp(600.0 / std::max(tokens, 1.0), 11.0, 30.0);
    const double font = std::clamp(row * 0.6, 8.0, 14.0);
    std::size_t longest_query = 1, longest_key = 1;
    for (const auto& t : query_tokens)
        longest_query = std::max(longest_query, detail::shown_chars(t));
    for (const auto& t : key_tokens)
        longest_key = std::max(longest_key, detail::shown_chars(t));
    const double char_width = 0.62 * font;
    const double query_w = 10 + char_width * static_cast<double>(longest_query);
    const double key_w = 10 + char_width * static_cast<double>(longest_key);
    const double gap = std::clamp(tokens * 12.0, 200.0, 420.0);  // room for the lines
    const double title_h = opts.title.empty() ? 0 : 28;
    const double width = std::max(query_w + gap + key_w + 20, 420.0);
    // Legend entries (a swatch and the head's name, 12 px text) flow left to right and wrap.
    std::vector<double> legend_x(heads), legend_y(heads);
    double lx = 10, ly = title_h + 8;
    for (std::size_t h = 0; h < heads; ++h) {
        const double entry_w =
            48 + 7.5 * static_cast<double>(detail::characters(detail::head_name(opts, h)));
        if (lx > 10 && lx + entry_w > width) {
            lx = 10;
            ly += 22;
        }
        legend_x[h] = lx;
        legend_y[h] = ly;
        lx += entry_w;
    }
    const double top = ly + 22 + 18;  // under the legend, room for the column captions
    const double height = top + row * tokens + 14;
    const double x_query = (width - (query_w + gap + key_w)) / 2 + query_w, x_key = x_query + gap;
    // Lines of different heads leave and reach a word at offsets spread over half a row.
    const double spread = heads > 1 ? row * 0.5 / static_cast<double>(heads - 1) : 0;
    // At most half a row wide, so that the lines of neighbouring words stay apart.
    const double line_width = std::min(opts.max_line_width, 0.5 * row);

    std::string svg = detail::svg_open(width, height);
    if (!opts.title.empty())
        svg += "<text class=\"title\" x=\"" + number(width / 2) +
               "\" y=\"20\" font-size=\"15\" "
               "text-anchor=\"middle\">" +
               detail::escape(opts.title) + "</text>\n";
    for (std::size_t h = 0; h < heads; ++h) {
        svg += "<g class=\"legend\"><rect x=\"" + number(legend_x[h]) + "\" y=\"" +
               number(legend_y[h]) + "\" width=\"22\" height=\"6\" fill=\"" +
               detail::head_colour(h) + "\"/><text x=\"" + number(legend_x[h] + 28) + "\" y=\"" +
               number(legend_y[h] + 7) + "\" font-size=\"12\">" +
               detail::escape(detail::head_name(opts, h)) + "</text></g>\n";
    }
    svg += "<text class=\"caption\" x=\"" + number(x_query) + "\" y=\"" + number(top - 6) +
           "\" font-size=\"11\" fill=\"#666666\" text-anchor=\"end\">query</text>\n";
    svg += "<text class=\"caption\" x=\"" + number(x_key) + "\" y=\"" + number(top - 6) +
           "\" font-size=\"11\" fill=\"#666666\">key</text>\n";
    const auto row_y = [&](std::size_t i) { return top + row * (static_cast<double>(i) + 0.5); };
    for (std::size_t h = 0; h < heads; ++h) {
        const matrix<Scalar>& w = weights[h];
        const double offset =
            (static_cast<double>(h) - static_cast<double>(heads - 1) / 2) * spread;
        svg += "<g class=\"head\" data-head=\"" + std::to_string(h) + "\" stroke=\"" +
               detail::head_colour(h) + "\" stroke-opacity=\"0.6\" stroke-linecap=\"round\">\n";
        for (Index i = 0; i < w.cols(); ++i)
            for (Index j = 0; j < w.rows(); ++j) {
                const double v = static_cast<double>(w(j, i));
                if (std::isnan(v) || v <= 0 || v < opts.min_weight) continue;
                svg += "<line class=\"weight\" data-query=\"" + std::to_string(i) +
                       "\" data-key=\"" + std::to_string(j) + "\" x1=\"" + number(x_query + 4) +
                       "\" y1=\"" + number(row_y(static_cast<std::size_t>(i)) + offset) +
                       "\" x2=\"" + number(x_key - 4) + "\" y2=\"" +
                       number(row_y(static_cast<std::size_t>(j)) + offset) + "\" stroke-width=\"" +
                       number(line_width * v / scale) + "\"/>\n";
            }
        svg += "</g>\n";
    }
    for (std::size_t i = 0; i < query_tokens.size(); ++i)
        svg += "<text class=\"query\" x=\"" + number(x_query - 4) + "\" y=\"" +
               number(row_y(i) + font * 0.35) + "\" font-size=\"" + number(font) +
               "\" text-anchor=\"end\">" + detail::label(query_tokens[i]) + "</text>\n";
    for (std::size_t j = 0; j < key_tokens.size(); ++j)
        svg += "<text class=\"key\" x=\"" + number(x_key + 4) + "\" y=\"" +
               number(row_y(j) + font * 0.35) + "\" font-size=\"" + number(font) + "\">" +
               detail::label(key_tokens[j]) + "</text>\n";
    svg += "</svg>\n";
    return svg;
}

/// The same for self-attention: one token list for queries and keys.
template <class Scalar>
std::string word_lines(const std::vector<matrix<Scalar>>& weights,
                       const std::vector<std::string>& tokens, const options& opts = {}) {
    return word_lines(weights, tokens, tokens, opts);
}

/// Writes `svg` to the file at `path`, replacing it. Throws std::runtime_error naming the path
/// when the file cannot be written.
inline void save(const std::string& path, const std::string& svg) {
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    file << svg;
    file.flush();
    if (!file) mha::detail::raise<std::runtime_error>("mha::plot::save: cannot write " + path);
}

}  // namespace plot
}  // namespace mha
