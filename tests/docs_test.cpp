// Every C++ block of README.md and docs/*.md compiles, with -Werror.
//
// One translation unit per Markdown file. The blocks fenced ```cpp are taken
// in the order they appear: their `#include` and `using namespace` lines go
// to file scope, everything else goes, block after block, into the body of
// one function returning absl::Status (a block fenced ```cpp file-scope,
// which defines functions, goes whole to file scope, after the prelude and
// before that function). So a block may rely on the blocks
// above it in the same file, and on tests/docs/prelude.hpp, which declares
// the caller's own functions and inputs (reply_429, call_provider, ...) and
// nothing of the library. `#line` directives make the compiler name the
// Markdown file and line of an error.
//
// The compiler is the one CMake builds the tests with (RK_CXX), run on each
// generated file with the project's warning flags and -Werror.
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "catch2/catch.hpp"

namespace {

namespace fs = std::filesystem;

struct Block {
  int first_line = 0;       // 1-based line of the block's first code line
  bool file_scope = false;  // fenced ```cpp file-scope: definitions
  std::vector<std::string> lines;
};

std::vector<Block> cpp_blocks(const std::string& markdown) {
  std::vector<Block> blocks;
  std::istringstream in(markdown);
  std::string line;
  int number = 0;
  bool inside = false;
  bool is_cpp = false;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.rfind("```", 0) == 0) {
      if (!inside) {
        inside = true;
        const std::string info = line.substr(3);
        is_cpp = info == "cpp" || info == "c++" || info == "cxx" ||
                 info.rfind("cpp ", 0) == 0;
        if (is_cpp) {
          blocks.push_back(
              {number + 1, info.find("file-scope") != std::string::npos, {}});
        }
      } else {
        inside = false;
      }
      continue;
    }
    if (inside && is_cpp) blocks.back().lines.push_back(line);
  }
  return blocks;
}

bool file_scope(std::string_view line) {
  return line.rfind("#include", 0) == 0 ||
         line.rfind("using namespace ", 0) == 0;
}

// The translation unit for one Markdown file (`name` as errors show it).
std::string translation_unit(const std::string& markdown,
                             const std::string& name) {
  std::string head;
  std::string defs;  // the file-scope blocks, after the prelude
  std::string body;
  for (const Block& b : cpp_blocks(markdown)) {
    if (b.file_scope) {
      for (std::size_t i = 0; i < b.lines.size(); ++i) {
        const std::string where =
            "#line " + std::to_string(b.first_line + static_cast<int>(i)) +
            " \"" + name + "\"\n";
        (file_scope(b.lines[i]) ? head : defs) += where + b.lines[i] + "\n";
      }
      continue;
    }
    bool body_line_next = true;  // a #line is due before the next body line
    for (std::size_t i = 0; i < b.lines.size(); ++i) {
      const int line = b.first_line + static_cast<int>(i);
      const std::string where =
          "#line " + std::to_string(line) + " \"" + name + "\"\n";
      if (file_scope(b.lines[i])) {
        head += where + b.lines[i] + "\n";
        body_line_next = true;
      } else {
        if (body_line_next) body += where;
        body += b.lines[i] + "\n";
        body_line_next = false;
      }
    }
  }
  return head + "#line 1 \"tests/docs/prelude.hpp\"\n" +
         "#include \"docs/prelude.hpp\"\n" + defs +
         "absl::Status the_snippets_of_this_file() {\n" + body +
         "#line 1 \"(end of the snippets)\"\n"
         "  return absl::OkStatus();\n}\n";
}

struct Compiled {
  int status = -1;
  std::string output;
};

Compiled compile(const std::string& tu, const std::string& stem) {
  const fs::path dir = fs::path(RK_DOCS_OUT);
  fs::create_directories(dir);
  const fs::path src = dir / (stem + ".cpp");
  {
    std::ofstream out(src);
    out << tu;
  }
  const std::string cmd =
      std::string(RK_CXX) + " -std=c++20 -c -Wall -Wextra -Wpedantic" +
      " -Wconversion -Wshadow -Werror -I" + RK_SOURCE_DIR + "/include -I" +
      RK_GENERATED_INCLUDE + " -I" + RK_SOURCE_DIR + "/tests -o " +
      (dir / (stem + ".o")).string() + " " + src.string() + " 2>&1";
  Compiled c;
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::array<char, 4096> buf{};
  std::size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) {
    c.output.append(buf.data(), n);
  }
  c.status = pclose(p);
  return c;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<fs::path> markdown_files() {
  const fs::path root(RK_SOURCE_DIR);
  std::vector<fs::path> files{root / "README.md"};
  for (const auto& e : fs::directory_iterator(root / "docs")) {
    if (e.path().extension() == ".md") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

TEST_CASE("the extractor: includes to file scope, the rest in order, #line",
          "[docs]") {
  const std::string md =
      "text\n```cpp\n#include <vector>\nint a = 1;\n```\n"
      "```sh\nnot code\n```\n```cpp\nusing namespace std;\nint b = a;\n```\n";
  const auto blocks = cpp_blocks(md);
  REQUIRE(blocks.size() == 2);
  CHECK(blocks[0].first_line == 3);
  CHECK(blocks[1].first_line == 10);
  const std::string tu = translation_unit(md, "x.md");
  // Both file-scope lines come before the function; the body keeps order.
  const auto fn = tu.find("absl::Status the_snippets_of_this_file");
  CHECK(tu.find("#include <vector>") < fn);
  CHECK(tu.find("using namespace std;") < fn);
  CHECK(tu.find("int a = 1;") > fn);
  CHECK(tu.find("int b = a;") > tu.find("int a = 1;"));
  CHECK(tu.find("#line 4 \"x.md\"\nint a = 1;") != std::string::npos);
  CHECK(tu.find("#line 11 \"x.md\"\nint b = a;") != std::string::npos);
  CHECK(tu.find("not code") == std::string::npos);
  // A file-scope block's definitions come before the function, after the
  // prelude.
  const std::string defs = translation_unit(
      "```cpp file-scope\nint twice(int x) { return 2 * x; }\n```\n", "d.md");
  CHECK(defs.find("int twice") > defs.find("docs/prelude.hpp\""));
  CHECK(defs.find("int twice") < defs.find("the_snippets_of_this_file"));
}

TEST_CASE("the harness fails a block that does not compile, naming its line",
          "[docs]") {
  // The control: if these compiled, the test below would prove nothing.
  const std::string bad =
      "# t\n\n```cpp\n#include \"ratekeeper/ratekeeper.hpp\"\n"
      "using namespace ratekeeper;\nauto b = TokenBucket::create(per_minute("
      "60), 60);\nundeclared_thing(b);\n```\n";
  const Compiled c = compile(translation_unit(bad, "control.md"), "control");
  INFO(c.output);
  CHECK(c.status != 0);
  CHECK(c.output.find("control.md:7") != std::string::npos);

  // A block may not use what only a later block declares.
  const std::string order =
      "```cpp\nint x = later + 1;\n```\n```cpp\nint later = 2;\n```\n";
  const Compiled o = compile(translation_unit(order, "order.md"), "order");
  INFO(o.output);
  CHECK(o.status != 0);

  // An ignored Status is an error too (-Werror, [[nodiscard]]).
  const std::string ignored =
      "```cpp\n#include \"ratekeeper/ratekeeper.hpp\"\n"
      "using namespace ratekeeper;\nTierTable<> t;\n"
      "t.set_tier(\"free\", {});\n```\n";
  const Compiled i = compile(translation_unit(ignored, "ignored.md"), "ign");
  INFO(i.output);
  CHECK(i.status != 0);
}

TEST_CASE("every C++ block in README.md and docs/*.md compiles with -Werror",
          "[docs]") {
  int compiled = 0;
  for (const fs::path& md : markdown_files()) {
    const std::string text = read_file(md);
    if (cpp_blocks(text).empty()) continue;
    const std::string name =
        fs::relative(md, fs::path(RK_SOURCE_DIR)).generic_string();
    std::string stem = name;
    for (char& ch : stem) {
      if (ch == '/' || ch == '.') ch = '_';
    }
    const Compiled c = compile(translation_unit(text, name), stem);
    INFO(name << ":\n" << c.output);
    CHECK(c.status == 0);
    ++compiled;
  }
  CHECK(compiled >= 4);  // README, budgets, chains, redis at least
}
