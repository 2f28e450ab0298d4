// ratekeeper/budget/catalogue.hpp: LiteLLM's price file into a PriceTable.
//
// Defines load_price_catalogue, which reads the open price catalogue that
// most gateways use (BerriAI/litellm model_prices_and_context_window.json:
// an object keyed by model name, USD prices as JSON numbers), and its
// result, PriceCatalogue: the table of every entry that can be priced and a
// report, per model, of what was not (CatalogueIssue). One odd entry never
// fails the file. Needs nlohmann-json (Debian: nlohmann-json3-dev);
// ratekeeper/budget/json.hpp includes it.
//
//   absl::StatusOr<PriceCatalogue> c = load_price_catalogue(file_text);
//   if (!c.ok()) return c.status();          // not JSON, or not an object
//   for (const CatalogueIssue& i : c->issues) log(i.to_string());
//   Accountant<> acct(std::move(c->table));
//
// Prices are read from their decimal text (nlohmann's SAX interface hands
// over the number as written), never through a double.
#ifndef RATEKEEPER_BUDGET_CATALOGUE_HPP_
#define RATEKEEPER_BUDGET_CATALOGUE_HPP_

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "ratekeeper/budget/money.hpp"
#include "ratekeeper/budget/prices.hpp"
#include "ratekeeper/budget/usage.hpp"
#include "ratekeeper/detail/strings.hpp"

namespace ratekeeper {

// CatalogueIssue: one line of the per-model report.
struct CatalogueIssue {
  enum class Kind : std::uint8_t {
    kRejected,      // the entry was not loaded (`field`: why, if one key)
    kNotPriced,     // a cost key in a unit Usage has no field for
    kRoundedUp,     // float noise, rounded up to the femto-USD
    kMissingPrice,  // loaded without an input or output price: $0 for it
  };
  std::string model;
  std::string field;  // the key concerned; empty for the entry as a whole
  Kind kind = Kind::kRejected;
  std::string reason;

  std::string to_string() const {
    return absl::StrCat(
        "price catalogue: \"", absl::CHexEscape(model), "\"",
        field.empty() ? "" : absl::StrCat(" \"", absl::CHexEscape(field), "\""),
        ": ", reason);
  }
};

// PriceCatalogue: what load_price_catalogue read.
struct PriceCatalogue {
  PriceTable table;                    // every entry that can be priced
  std::vector<CatalogueIssue> issues;  // in file order, per model
  std::size_t entries = 0;  // model entries (distinct names; not sample_spec)

  // Entries not loaded: entries == table.size() + rejected().
  std::size_t rejected() const {
    return static_cast<std::size_t>(
        std::count_if(issues.begin(), issues.end(), [](const auto& i) {
          return i.kind == CatalogueIssue::Kind::kRejected;
        }));
  }
  // The report lines about `model`.
  std::vector<CatalogueIssue> issues_for(std::string_view model) const {
    std::vector<CatalogueIssue> out;
    for (const CatalogueIssue& i : issues) {
      if (i.model == model) out.push_back(i);
    }
    return out;
  }
};

namespace detail {

// A JSON value with numbers kept as written. Containers deeper than
// kCatalogueDepth are not kept (kTooDeep): no entry needs them.
struct CatalogueValue {
  enum class Kind : std::uint8_t {
    kNull,
    kBool,
    kNumber,
    kString,
    kArray,
    kObject,
    kTooDeep
  };
  Kind kind = Kind::kNull;
  std::string text;                    // a number as written, a string
  std::vector<std::string> keys;       // an object's keys, in order
  std::vector<CatalogueValue> values;  // its values, or an array's items
};
inline constexpr std::size_t kCatalogueDepth = 6;

inline const char* kind_name(CatalogueValue::Kind k) {
  switch (k) {
    case CatalogueValue::Kind::kNull:
      return "null";
    case CatalogueValue::Kind::kBool:
      return "boolean";
    case CatalogueValue::Kind::kNumber:
      return "number";
    case CatalogueValue::Kind::kString:
      return "string";
    case CatalogueValue::Kind::kArray:
      return "array";
    case CatalogueValue::Kind::kObject:
      return "object";
    case CatalogueValue::Kind::kTooDeep:
      return "nesting too deep";
  }
  return "value";
}

// SAX handler: builds the CatalogueValue tree of the document.
class CatalogueSax {
 public:
  using json = nlohmann::json;
  using number_integer_t = json::number_integer_t;
  using number_unsigned_t = json::number_unsigned_t;
  using number_float_t = json::number_float_t;
  using string_t = json::string_t;
  using binary_t = json::binary_t;

  std::optional<CatalogueValue> root;
  std::string error;

  bool null() { return scalar(CatalogueValue::Kind::kNull, {}); }
  bool boolean(bool b) {
    return scalar(CatalogueValue::Kind::kBool, b ? "true" : "false");
  }
  bool number_integer(number_integer_t v) {
    return scalar(CatalogueValue::Kind::kNumber, std::to_string(v));
  }
  bool number_unsigned(number_unsigned_t v) {
    return scalar(CatalogueValue::Kind::kNumber, std::to_string(v));
  }
  bool number_float(number_float_t, const string_t& raw) {
    return scalar(CatalogueValue::Kind::kNumber, raw);
  }
  bool string(string_t& s) {
    return scalar(CatalogueValue::Kind::kString, std::move(s));
  }
  bool binary(binary_t&) { return scalar(CatalogueValue::Kind::kNull, {}); }
  bool start_object(std::size_t) { return open(CatalogueValue::Kind::kObject); }
  bool end_object() { return close(); }
  bool start_array(std::size_t) {
    if (stack_.empty() && skip_ == 0) {
      error = "the catalogue is not a JSON object";
      return false;
    }
    return open(CatalogueValue::Kind::kArray);
  }
  bool end_array() { return close(); }
  bool key(string_t& k) {
    if (skip_ == 0) stack_.back().keys.push_back(std::move(k));
    return true;
  }
  bool parse_error(std::size_t pos, const std::string&,
                   const nlohmann::detail::exception&) {
    error = absl::StrCat("not well-formed JSON at byte ", pos);
    return false;
  }

 private:
  bool open(CatalogueValue::Kind k) {
    if (skip_ > 0 || stack_.size() == kCatalogueDepth) {
      ++skip_;
      return true;
    }
    stack_.emplace_back().kind = k;
    return true;
  }
  bool close() {
    if (skip_ > 0) {
      if (--skip_ == 0) {
        CatalogueValue deep;
        deep.kind = CatalogueValue::Kind::kTooDeep;
        add(std::move(deep));
      }
      return true;
    }
    CatalogueValue v = std::move(stack_.back());
    stack_.pop_back();
    if (stack_.empty()) {
      root = std::move(v);
    } else {
      add(std::move(v));
    }
    return true;
  }
  bool scalar(CatalogueValue::Kind k, std::string text) {
    if (skip_ > 0) return true;
    if (stack_.empty()) {
      error = "the catalogue is not a JSON object";
      return false;
    }
    CatalogueValue v;
    v.kind = k;
    v.text = std::move(text);
    add(std::move(v));
    return true;
  }
  void add(CatalogueValue v) { stack_.back().values.push_back(std::move(v)); }

  std::vector<CatalogueValue> stack_;
  std::size_t skip_ = 0;  // depth inside a container that is not kept
};

// The per-token base names of the file, and the price each sets. The
// longest match wins: cache_creation_input_token_cost_above_1hr is a base
// of its own (the 1-hour write), not an `_above_` tier of the 5-minute one.
struct CatalogueBase {
  std::string_view name;
  PriceField field;
};
inline constexpr std::array<CatalogueBase, 10> kCatalogueBases = {{
    {"cache_creation_input_token_cost_above_1hr", &TokenPrices::cache_write_1h},
    {"cache_read_input_audio_token_cost", &TokenPrices::cache_read_audio},
    {"input_cost_per_token_cache_hit", &TokenPrices::cache_read},
    {"cache_creation_input_token_cost", &TokenPrices::cache_write_5m},
    {"output_cost_per_reasoning_token", &TokenPrices::reasoning},
    {"cache_read_input_token_cost", &TokenPrices::cache_read},
    {"output_cost_per_audio_token", &TokenPrices::output_audio},
    {"input_cost_per_audio_token", &TokenPrices::input_audio},
    {"output_cost_per_token", &TokenPrices::output},
    {"input_cost_per_token", &TokenPrices::input},
}};

// A per-token price key split into its base, band and tier.
struct CatalogueKey {
  PriceField field = nullptr;
  std::uint64_t from_input = 0;
  ServiceTier tier = ServiceTier::kStandard;
};

// `rest` after a base name: [_above_<N>k_tokens][_priority|_flex|_batches].
inline bool parse_key_suffix(std::string_view rest, CatalogueKey& k) {
  constexpr std::string_view kAbove = "_above_", kTokens = "k_tokens";
  if (rest.starts_with(kAbove)) {
    rest.remove_prefix(kAbove.size());
    std::uint64_t n = 0;
    std::size_t digits = 0;
    while (digits < rest.size() && digits < 9 && rest[digits] >= '0' &&
           rest[digits] <= '9') {
      n = n * 10 + static_cast<std::uint64_t>(rest[digits] - '0');
      ++digits;
    }
    if (digits == 0 || n == 0) return false;
    rest.remove_prefix(digits);
    if (!rest.starts_with(kTokens)) return false;
    rest.remove_prefix(kTokens.size());
    k.from_input = n * 1000 + 1;  // "above 200k": more than 200,000
  }
  if (rest.empty()) return true;
  if (rest == "_priority") {
    k.tier = ServiceTier::kPriority;
  } else if (rest == "_flex") {
    k.tier = ServiceTier::kFlex;
  } else if (rest == "_batches") {
    k.tier = ServiceTier::kBatch;
  } else {
    return false;
  }
  return true;
}

// nullopt: not a per-token key; `known_base` then says whether it started
// like one (an unknown tier suffix).
inline std::optional<CatalogueKey> parse_price_key(std::string_view key,
                                                   bool& known_base) {
  known_base = false;
  for (const CatalogueBase& b : kCatalogueBases) {
    if (!key.starts_with(b.name)) continue;
    known_base = true;
    CatalogueKey k;
    k.field = b.field;
    if (parse_key_suffix(key.substr(b.name.size()), k)) return k;
  }
  return std::nullopt;
}

// A whole, non-negative token count as a JSON number writes it ("256000",
// "256000.0"); nullopt otherwise.
inline std::optional<std::uint64_t> parse_token_count(std::string_view s) {
  std::uint64_t n = 0;
  std::size_t i = 0;
  for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i) {
    if (i >= 15) return std::nullopt;  // above any context window
    n = n * 10 + static_cast<std::uint64_t>(s[i] - '0');
  }
  if (i == 0) return std::nullopt;
  if (i < s.size() && s[i] == '.') {
    for (++i; i < s.size() && s[i] == '0'; ++i) {
    }
  }
  if (i != s.size()) return std::nullopt;
  return n;
}

// What a cost key the loader does not price is billed in, for the report.
inline std::string unpriced_reason(std::string_view key) {
  if (key.find("dbu") != std::string_view::npos) {
    return "not priced: Databricks DBUs, not USD; a unit Usage has no "
           "field for";
  }
  std::string_view unit = key;
  if (const std::size_t at = key.rfind("_per_"); at != std::string_view::npos) {
    unit = key.substr(at + 5);
  }
  return absl::StrCat("not priced: per ", detail::av(unit),
                      ", a unit Usage has no field for");
}

// Builds one entry's Prices, or says why it cannot.
class EntryReader {
 public:
  EntryReader(std::string_view model, std::vector<CatalogueIssue>& issues)
      : model_(model), issues_(issues) {}

  // Reads the entry; false (with reason()) when it cannot be loaded.
  bool read(const CatalogueValue& e) {
    if (e.kind != CatalogueValue::Kind::kObject) {
      return fail({}, absl::StrCat("the entry is a JSON ", kind_name(e.kind),
                                   ", not an object"));
    }
    absl::flat_hash_map<std::string_view, int> seen;
    for (std::size_t i = 0; i < e.keys.size(); ++i) {
      const std::string_view key = e.keys[i];
      const bool tiered = key == "tiered_pricing";
      if (!tiered && key.find("cost") == std::string_view::npos) continue;
      if (++seen[key] == 2) {
        return fail(key, "the key appears twice in the entry: ambiguous");
      }
      if (tiered) {
        if (!read_tiered(e.values[i])) return false;
      } else if (key == "search_context_cost_per_query") {
        if (!read_search(e.values[i])) return false;
      } else {
        bool known_base = false;
        const std::optional<CatalogueKey> k = parse_price_key(key, known_base);
        if (!k) {
          note(key, CatalogueIssue::Kind::kNotPriced,
               known_base ? std::string("not priced: a tier suffix ratekeeper "
                                        "does not know")
                          : unpriced_reason(key));
          continue;
        }
        if (!set(*k, key, e.values[i])) return false;
      }
    }
    return true;
  }

  // The prices read, or why there are none (after read() returned true).
  std::optional<Prices> prices(SysTime from) {
    const bool any =
        std::any_of(bands_.begin(), bands_.end(), [](const auto& b) {
          return b.second.input.has_value() || b.second.output.has_value();
        });
    if (!any) {
      fail({},
           "no per-token price (input_cost_per_token, output_cost_per_token "
           "or tiered_pricing): nothing ratekeeper can charge");
      return std::nullopt;
    }
    Prices p;
    p.effective_from = from;
    p.web_search = web_search_;
    for (auto& [band, tp] : bands_) {
      if (band.first == ServiceTier::kStandard && band.second == 0) {
        p.base = tp;
      } else {
        p.bands.push_back({band.first, band.second, tp});
      }
    }
    if (!p.base.input) {
      note("input_cost_per_token", CatalogueIssue::Kind::kMissingPrice,
           "not listed: input tokens of the standard tier bill at $0");
    }
    if (!p.base.output) {
      note("output_cost_per_token", CatalogueIssue::Kind::kMissingPrice,
           "not listed: output tokens of the standard tier bill at $0");
    }
    return p;
  }

  bool fail(std::string_view field, std::string reason) {
    issues_.push_back({std::string(model_), std::string(field),
                       CatalogueIssue::Kind::kRejected, std::move(reason)});
    return false;
  }

 private:
  void note(std::string_view field, CatalogueIssue::Kind kind,
            std::string reason) {
    issues_.push_back(
        {std::string(model_), std::string(field), kind, std::move(reason)});
  }

  // A price from a JSON number, float noise rounded up (and reported).
  std::optional<TokenPrice> price(std::string_view field,
                                  const CatalogueValue& v) {
    if (v.kind != CatalogueValue::Kind::kNumber) {
      fail(field, absl::StrCat("a JSON ", kind_name(v.kind),
                               " where a price (a number) was expected"));
      return std::nullopt;
    }
    const absl::StatusOr<ParsedPrice> p =
        parse_usd_per_token_rounding_noise(v.text);
    if (!p.ok()) {
      fail(field, std::string(p.status().message()));
      return std::nullopt;
    }
    if (p->rounded_up) {
      note(
          field, CatalogueIssue::Kind::kRoundedUp,
          absl::StrCat("float noise ", v.text, " (more than ",
                       kFloatNoiseDigits, " significant digits) rounded up to ",
                       p->price.femtos, "e-15 USD"));
    }
    return p->price;
  }

  bool set(const CatalogueKey& k, std::string_view field,
           const CatalogueValue& v) {
    const std::optional<TokenPrice> p = price(field, v);
    if (!p) return false;
    std::optional<TokenPrice>& slot = bands_[{k.tier, k.from_input}].*(k.field);
    if (slot && *slot != *p) {
      return fail(field, absl::StrCat("a second, different price for the same "
                                      "tokens (",
                                      slot->femtos, " vs ", p->femtos,
                                      " e-15 USD): ambiguous"));
    }
    slot = *p;
    return true;
  }

  bool read_search(const CatalogueValue& v) {
    constexpr const char* kField = "search_context_cost_per_query";
    if (v.kind != CatalogueValue::Kind::kObject) {
      return fail(kField, absl::StrCat("a JSON ", kind_name(v.kind),
                                       " where an object of prices by "
                                       "search_context_size was expected"));
    }
    for (std::size_t i = 0; i < v.keys.size(); ++i) {
      const std::string_view size = v.keys[i];
      std::optional<TokenPrice>* slot =
          size == "search_context_size_low"      ? &web_search_.low
          : size == "search_context_size_medium" ? &web_search_.medium
          : size == "search_context_size_high"   ? &web_search_.high
                                                 : nullptr;
      const std::string field = absl::StrCat(kField, ".", detail::av(size));
      if (slot == nullptr) {
        return fail(field, "not a search context size (low, medium, high)");
      }
      if (slot->has_value()) return fail(field, "listed twice: ambiguous");
      *slot = price(field, v.values[i]);
      if (!slot->has_value()) return false;
    }
    return true;
  }

  bool read_tiered(const CatalogueValue& v) {
    constexpr const char* kField = "tiered_pricing";
    if (v.kind != CatalogueValue::Kind::kArray) {
      return fail(kField, absl::StrCat("a JSON ", kind_name(v.kind),
                                       ", not an array of tiers"));
    }
    for (std::size_t t = 0; t < v.values.size(); ++t) {
      const CatalogueValue& item = v.values[t];
      const std::string at = absl::StrCat(kField, "[", t, "]");
      if (item.kind != CatalogueValue::Kind::kObject) {
        return fail(at, absl::StrCat("a JSON ", kind_name(item.kind),
                                     ", not a tier object"));
      }
      std::optional<std::uint64_t> from;
      std::vector<std::pair<PriceField, std::size_t>> token_prices;
      for (std::size_t i = 0; i < item.keys.size(); ++i) {
        const std::string_view key = item.keys[i];
        const std::string field = absl::StrCat(at, ".", detail::av(key));
        if (key == "range") {
          const CatalogueValue& r = item.values[i];
          if (r.kind != CatalogueValue::Kind::kArray || r.values.size() != 2 ||
              r.values[0].kind != CatalogueValue::Kind::kNumber ||
              r.values[1].kind != CatalogueValue::Kind::kNumber) {
            return fail(field, "not a [from, to] pair of token counts");
          }
          from = parse_token_count(r.values[0].text);
          const std::optional<std::uint64_t> to =
              parse_token_count(r.values[1].text);
          if (!from || !to || *to < *from) {
            return fail(field, "not a [from, to] pair of token counts");
          }
          continue;
        }
        if (key.find("cost") == std::string_view::npos) continue;
        bool known_base = false;
        const std::optional<CatalogueKey> k = parse_price_key(key, known_base);
        if (!k || k->from_input != 0 || k->tier != ServiceTier::kStandard) {
          note(field, CatalogueIssue::Kind::kNotPriced,
               known_base ? std::string("not priced: a tier suffix inside "
                                        "tiered_pricing")
                          : unpriced_reason(key));
          continue;
        }
        token_prices.emplace_back(k->field, i);
      }
      if (token_prices.empty()) continue;  // no per-token price in it
      if (!from) {
        return fail(at, "per-token prices without a token \"range\"");
      }
      for (const auto& [f, i] : token_prices) {
        CatalogueKey k;
        k.field = f;
        k.from_input = *from;
        if (!set(k, absl::StrCat(at, ".", item.keys[i]), item.values[i])) {
          return false;
        }
      }
    }
    return true;
  }

  std::string_view model_;
  std::vector<CatalogueIssue>& issues_;
  std::map<std::pair<ServiceTier, std::uint64_t>, TokenPrices> bands_;
  WebSearchPrices web_search_;
};

}  // namespace detail

// load_price_catalogue
//
// LiteLLM's price file (model_prices_and_context_window.json) into a
// PriceTable, every price taking effect at `effective_from`. Each entry is
// loaded or reported (PriceCatalogue::issues, kRejected, with the reason):
// an entry that is not an object, has a price that is not a non-negative
// decimal number or is finer than 1e-15 USD without being float noise,
// lists two different prices for the same tokens, a shape the loader does
// not expect in a key it prices, or no per-token price at all. Read:
//
//   input_cost_per_token, output_cost_per_token,
//   cache_read_input_token_cost (and DeepSeek's
//   input_cost_per_token_cache_hit), cache_creation_input_token_cost (5-minute
//   writes), cache_creation_input_token_cost_above_1hr (1-hour writes),
//   output_cost_per_reasoning_token, input_cost_per_audio_token,
//   cache_read_input_audio_token_cost, output_cost_per_audio_token,
//   each optionally + "_above_<N>k_tokens" (a band from N*1000+1 input
//   tokens) and + "_priority" / "_flex" / "_batches" (a service tier);
//   tiered_pricing: [{"range": [from, to], <per-token keys>}, ...] (a band
//   from `from`; past the last `to`, the last band);
//   search_context_cost_per_query: {search_context_size_low|medium|high}
//   (USD per web search).
//
// Every other key whose name contains "cost" is named in the report
// (kNotPriced: a unit Usage has no field for, such as per image or per
// second); other keys are ignored, whatever their shape. An explicit 0 is
// a price of zero. Float noise (more than 15 significant digits) is
// rounded up to the femto-USD and reported (kRoundedUp). `sample_spec`
// documents the format and is not a model. A model named twice at the top
// level is rejected: which entry is meant is ambiguous. Only a document
// that is not well-formed JSON (a NUL byte included), or not an object, is
// an error (kInvalidArgument): nothing of it can be trusted.
inline absl::StatusOr<PriceCatalogue> load_price_catalogue(
    std::string_view text, SysTime effective_from = SysTime{}) {
  // nlohmann's lexer takes a NUL byte for the end of the input: whatever
  // follows would be dropped without a word. No JSON text holds one.
  if (const std::size_t nul = text.find('\0'); nul != std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "price catalogue: not well-formed JSON (a NUL byte at byte ", nul,
        ")"));
  }
  detail::CatalogueSax sax;
  const bool ok =
      nlohmann::json::sax_parse(text.begin(), text.end(), &sax) && sax.root;
  if (!ok || !sax.error.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("price catalogue: ",
                     sax.error.empty() ? "not well-formed" : sax.error));
  }
  const detail::CatalogueValue& root = *sax.root;
  if (root.kind != detail::CatalogueValue::Kind::kObject) {
    return absl::InvalidArgumentError(
        "price catalogue: the catalogue is not a JSON object");
  }
  absl::flat_hash_map<std::string_view, std::size_t> times;
  for (const std::string& k : root.keys) ++times[k];
  PriceCatalogue out;
  for (std::size_t i = 0; i < root.keys.size(); ++i) {
    const std::string& model = root.keys[i];
    if (model == "sample_spec") continue;
    const std::size_t n = times[model];
    if (n == 0) continue;  // a duplicate already reported
    ++out.entries;
    detail::EntryReader reader(model, out.issues);
    if (n > 1) {
      times[model] = 0;
      reader.fail({}, absl::StrCat("the model has ", n,
                                   " entries in the file: ambiguous"));
      continue;
    }
    if (model.empty()) {
      reader.fail({}, "an empty model name");
      continue;
    }
    if (!reader.read(root.values[i])) continue;
    std::optional<Prices> p = reader.prices(effective_from);
    if (!p) continue;
    if (absl::Status st = out.table.set(model, *p); !st.ok()) {
      reader.fail({}, std::string(st.message()));
    }
  }
  return out;
}

}  // namespace ratekeeper

#endif  // RATEKEEPER_BUDGET_CATALOGUE_HPP_
