// The caller's side of the snippets in README.md and docs/*.md.
//
// tests/docs_test.cpp compiles every ```cpp block of those files; a block may
// rely on the blocks above it in the same file and on this prelude, which
// declares only what a server that uses ratekeeper already has: its own
// functions (how it answers, how it calls the provider, where alerts go) and
// the inputs of the call in hand. Nothing of the library is declared here, so
// a snippet that forgets an #include fails. The functions are templates
// declared, never defined: the snippets are compiled, not linked.
#ifndef RATEKEEPER_TESTS_DOCS_PRELUDE_HPP_
#define RATEKEEPER_TESTS_DOCS_PRELUDE_HPP_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

// How the server answers: a refusal, an error, a plain status code. The
// snippets return what these return from their handler.
template <class... A>
absl::Status reply(const A&...);
template <class... A>
absl::Status reply_429(const A&...);
template <class... A>
absl::Status reply_403(const A&...);
template <class... A>
absl::Status reply_500(const A&...);
// The server's HTTP response under construction.
template <class... A>
void set_header(const A&...);
// The provider call; its response body.
template <class... A>
std::string call_provider(const A&...);
// Reads a whole file (the price catalogue, a configuration).
template <class... A>
std::string read_file(const A&...);
// Where budget alerts go (a pager, a log).
template <class... A>
void alert(const A&...);

// The call in hand, as the server's request handler has it.
inline std::uint64_t prompt_tokens = 1'200;  // counted from the request
inline std::uint64_t max_tokens = 800;       // the request's max_tokens
inline std::string user_key = "user:42";     // the authenticated caller
inline std::string request_id = "req-7f3a";  // made once per provider call
inline std::uint64_t counted_output_tokens = 310;  // counted off a stream
inline std::uint64_t used_tokens = 1'530;  // the provider's usage.total_tokens

#endif  // RATEKEEPER_TESTS_DOCS_PRELUDE_HPP_
