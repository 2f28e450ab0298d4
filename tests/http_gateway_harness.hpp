// What the http_gateway tests and its benchmark share: the gateway as a
// child process on a free loopback port, and a fake upstream in this
// process whose answers a test scripts (status, usage, chunks and the
// delays between them), and which records when it sent each chunk.
//
// No Catch2 here (the benchmark has a main of its own): failures throw
// std::runtime_error.
#ifndef RATEKEEPER_TESTS_HTTP_GATEWAY_HARNESS_HPP_
#define RATEKEEPER_TESTS_HTTP_GATEWAY_HARNESS_HPP_

#include <fcntl.h>
#include <httplib.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace rk_gw {

using SteadyTime = std::chrono::steady_clock::time_point;
inline SteadyTime now() { return std::chrono::steady_clock::now(); }

// A directory of its own under $TMPDIR, removed with its files.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/rk-gw-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      throw std::runtime_error("mkdtemp failed");
    }
    path_ = tmpl;
  }
  ~TempDir() {
    for (const std::string& f : files_) unlink(f.c_str());
    rmdir(path_.c_str());
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string write(const std::string& name, const std::string& text) {
    const std::string p = path_ + "/" + name;
    std::ofstream(p, std::ios::binary) << text;
    files_.push_back(p);
    return p;
  }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

// The gateway as a child process, stopped (SIGTERM, then waited for) when
// this goes out of scope.
class GatewayProcess {
 public:
  GatewayProcess(const std::string& binary, std::vector<std::string> args) {
    args.insert(args.begin(), binary);
    args.insert(args.begin() + 1, {"--port", "0"});
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe failed");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    const int spawned =
        posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    if (spawned != 0) {
      close(out[0]);
      throw std::runtime_error("cannot start " + binary);
    }
    // "listening on 127.0.0.1:PORT\n", within 30 s.
    std::string line;
    const SteadyTime deadline = now() + std::chrono::seconds(30);
    while (line.find('\n') == std::string::npos && now() < deadline) {
      pollfd p{out[0], POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      char buf[256];
      const ssize_t n = read(out[0], buf, sizeof(buf));
      if (n <= 0) break;
      line.append(buf, static_cast<std::size_t>(n));
    }
    close(out[0]);
    if (line.rfind("listening on 127.0.0.1:", 0) != 0) {
      stop();
      throw std::runtime_error("the gateway did not start; it said: " + line);
    }
    port_ = std::atoi(line.c_str() + line.rfind(':') + 1);
  }
  ~GatewayProcess() { stop(); }
  GatewayProcess(const GatewayProcess&) = delete;
  GatewayProcess& operator=(const GatewayProcess&) = delete;

  int port() const { return port_; }

  // A keep-alive client with TCP_NODELAY, as SDKs connect.
  std::unique_ptr<httplib::Client> client() const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port_);
    c->set_keep_alive(true);
    c->set_tcp_nodelay(true);
    c->set_read_timeout(std::chrono::seconds(30));
    return c;
  }

 private:
  void stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  pid_t pid_ = -1;
  int port_ = 0;
};

// What the fake upstream answers next.
struct Script {
  int status = 200;
  std::uint64_t prompt_tokens = 10;
  std::uint64_t completion_tokens = 5;
  bool usage = true;  // a usage object (the last chunk of a stream)
  int chunks = 3;     // content chunks of a stream
  std::chrono::milliseconds delay{0};  // between chunks (the benchmark)
  // Each content chunk after the first waits until the client said it has
  // the one before (stream_chat(..., &upstream)): a gateway that buffered
  // the stream would hold the test up to its deadline, never pass it.
  bool lockstep = false;
  std::string request_id = "req_fake";
};

// The fake upstream: POST /v1/chat/completions answers as the script says;
// a request with "stream": true gets an SSE stream of `chunks` content
// chunks (content "c0", "c1", ...) `delay` apart (or in lockstep with the
// client), then (with `usage`) a chunk with empty choices and the usage,
// then [DONE].
class FakeUpstream {
 public:
  FakeUpstream() {
    server_.set_tcp_nodelay(true);
    server_.set_keep_alive_max_count(1'000'000);
    server_.set_keep_alive_timeout(30);
    server_.new_task_queue = [] { return new httplib::ThreadPool(32); };
    server_.Post("/v1/chat/completions",
                 [this](const httplib::Request& req, httplib::Response& res) {
                   answer(req, res);
                 });
    port_ = server_.bind_to_any_port("127.0.0.1");
    if (port_ <= 0) throw std::runtime_error("cannot bind the fake upstream");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    const SteadyTime deadline = now() + std::chrono::seconds(10);
    while (!server_.is_running() && now() < deadline) {
      std::this_thread::yield();
    }
  }
  ~FakeUpstream() {
    server_.stop();
    thread_.join();
  }
  FakeUpstream(const FakeUpstream&) = delete;
  FakeUpstream& operator=(const FakeUpstream&) = delete;

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  void set(const Script& s) {
    std::lock_guard<std::mutex> lock(mu_);
    script_ = s;
  }
  // The request bodies received, in order.
  std::vector<std::string> bodies() const {
    std::lock_guard<std::mutex> lock(mu_);
    return bodies_;
  }
  // When each chunk of the last stream was handed to the socket.
  std::vector<SteadyTime> sent() const {
    std::lock_guard<std::mutex> lock(mu_);
    return sent_;
  }
  // The client has the first `n` content chunks of the stream (lockstep).
  void client_saw(std::size_t n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      seen_ = std::max(seen_, n);
    }
    seen_cv_.notify_all();
  }
  // How many connections the gateway opened to it.
  std::size_t connections() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ports_.size();
  }

  static std::string usage_json(std::uint64_t p, std::uint64_t c) {
    return "{\"prompt_tokens\":" + std::to_string(p) +
           ",\"completion_tokens\":" + std::to_string(c) +
           ",\"total_tokens\":" + std::to_string(p + c) + "}";
  }

 private:
  void answer(const httplib::Request& req, httplib::Response& res) {
    Script s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      s = script_;
      bodies_.push_back(req.body);
      ports_.insert(req.remote_port);
    }
    res.set_header("x-request-id", s.request_id);
    res.set_header("openai-processing-ms", "1");
    // Its own rate-limit view, which the gateway must not pass on.
    res.set_header("x-ratelimit-limit-requests", "999999");
    if (s.status >= 300) {
      res.status = s.status;
      res.set_content(
          "{\"error\":{\"message\":\"upstream trouble\",\"type\":"
          "\"server_error\",\"param\":null,\"code\":null}}",
          "application/json");
      return;
    }
    const nlohmann::json body = nlohmann::json::parse(req.body, nullptr, false);
    const bool stream =
        body.is_object() && body.contains("stream") && body["stream"] == true;
    const std::string usage =
        s.usage ? usage_json(s.prompt_tokens, s.completion_tokens) : "null";
    if (!stream) {
      res.set_content(
          "{\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion\","
          "\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"message\":"
          "{\"role\":\"assistant\",\"content\":\"ok\"},\"finish_reason\":"
          "\"stop\"}],\"usage\":" +
              usage + "}",
          "application/json");
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      sent_.clear();
      seen_ = 0;
    }
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, s, usage, i = 0](std::size_t, httplib::DataSink& sink) mutable {
          if (i > 0 && i < s.chunks) {
            if (s.lockstep) {
              // A deadline, so that a gateway that never forwards fails
              // the test's checks instead of hanging it.
              std::unique_lock<std::mutex> lock(mu_);
              seen_cv_.wait_for(lock, std::chrono::seconds(10), [&] {
                return seen_ >= static_cast<std::size_t>(i);
              });
            } else if (s.delay.count() > 0) {
              std::this_thread::sleep_for(s.delay);  // pacing, measured
            }
          }
          std::string event;
          if (i < s.chunks) {
            event =
                "data: {\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion."
                "chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"c" +
                std::to_string(i) +
                "\"},\"finish_reason\":null}],\"usage\":" + "null}\n\n";
          } else if (i == s.chunks && s.usage) {
            event =
                "data: {\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion."
                "chunk\",\"choices\":[],\"usage\":" +
                usage + "}\n\n";
          } else {
            if (!sink.write("data: [DONE]\n\n", 14)) return false;
            sink.done();
            return true;
          }
          {
            std::lock_guard<std::mutex> lock(mu_);
            sent_.push_back(now());
          }
          ++i;
          return sink.write(event.data(), event.size());
        });
  }

  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
  mutable std::mutex mu_;
  Script script_;
  std::vector<std::string> bodies_;
  std::vector<SteadyTime> sent_;
  std::size_t seen_ = 0;  // guarded by mu_
  std::condition_variable seen_cv_;
  std::set<int> ports_;
};

// A streamed answer as the client saw it: status, headers, the bytes, and
// when the client received each content chunk ("c<i>").
struct Streamed {
  int status = 0;
  httplib::Headers headers;
  std::string body;
  std::vector<SteadyTime> received;  // by chunk index
  bool ok = false;                   // the request completed
};

// POSTs `body` and reads the answer as it arrives. `stop_after` > 0: the
// client hangs up after that many content chunks. `gate`: told of each
// content chunk received (a Script with lockstep waits for it).
inline Streamed stream_chat(httplib::Client& c, const httplib::Headers& h,
                            const std::string& body, int stop_after = 0,
                            FakeUpstream* gate = nullptr) {
  Streamed out;
  httplib::Request q;
  q.method = "POST";
  q.path = "/v1/chat/completions";
  q.headers = h;
  q.headers.emplace("Content-Type", "application/json");
  q.body = body;
  q.response_handler = [&](const httplib::Response& r) {
    out.status = r.status;
    out.headers = r.headers;
    return true;
  };
  q.content_receiver = [&](const char* d, std::size_t n, std::uint64_t,
                           std::uint64_t) {
    const SteadyTime t = now();
    out.body.append(d, n);
    for (;;) {
      const std::string mark =
          "\"content\":\"c" + std::to_string(out.received.size()) + "\"";
      if (out.body.find(mark) == std::string::npos) break;
      out.received.push_back(t);
    }
    if (gate != nullptr) gate->client_saw(out.received.size());
    return stop_after <= 0 ||
           static_cast<int>(out.received.size()) < stop_after;
  };
  const httplib::Result r = c.send(q);
  out.ok = static_cast<bool>(r);
  return out;
}

inline std::string header_of(const httplib::Headers& h, const std::string& k) {
  for (const auto& [name, value] : h) {
    if (name.size() == k.size() &&
        std::equal(name.begin(), name.end(), k.begin(), [](char a, char b) {
          return std::tolower(static_cast<unsigned char>(a)) ==
                 std::tolower(static_cast<unsigned char>(b));
        })) {
      return value;
    }
  }
  return "<absent>";
}

// The "accounts" of a config for `users` users of one tier: key "sk-u<i>",
// user "u<i>", team "t<i / 8>" (8 users a team).
inline std::string accounts_json(int users, const std::string& tier) {
  std::string accounts;
  for (int u = 0; u < users; ++u) {
    if (u > 0) accounts += ",";
    accounts += "\"sk-u" + std::to_string(u) + "\": {\"user\": \"u" +
                std::to_string(u) + "\", \"team\": \"t" +
                std::to_string(u / 8) + "\", \"tier\": \"" + tier + "\"}";
  }
  return accounts;
}

// The `r` of limit `name` in a RateLimit header, or -1.
inline long long ietf_remaining(const std::string& ratelimit,
                                const std::string& name) {
  const std::string key = "\"" + name + "\";r=";
  const std::size_t at = ratelimit.find(key);
  if (at == std::string::npos) return -1;
  return std::atoll(ratelimit.c_str() + at + key.size());
}

// A chat body whose estimate (characters / 4, rounded up, + max_tokens) is
// exactly `estimate` tokens, for a model and optional stream flag.
inline std::string body_with_estimate(std::uint64_t estimate,
                                      const std::string& model, bool stream) {
  for (std::uint64_t max_tokens = 1; max_tokens < estimate; ++max_tokens) {
    const std::string b = "{\"model\":\"" + model + "\"," +
                          (stream ? "\"stream\":true," : "") +
                          "\"max_tokens\":" + std::to_string(max_tokens) +
                          ",\"messages\":[{\"role\":\"user\",\"content\":"
                          "\"hello\"}]}";
    if ((b.size() + 3) / 4 + max_tokens == estimate) return b;
  }
  throw std::runtime_error("no body has that estimate");
}

// Percentile `p` (0..1) of `v` (sorted here), nearest rank.
inline double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const auto rank = static_cast<std::size_t>(
      std::max(0.0, std::ceil(p * static_cast<double>(v.size())) - 1));
  return v[std::min(rank, v.size() - 1)];
}

// One answer of a load run.
struct Answer {
  int status = 0;  // 0: no answer (a transport error)
  httplib::Headers headers;
  std::string body;
  double latency_ms = 0;
  std::string key;  // the API key it was sent with
};

// `clients` keep-alive clients, each on its own thread, send `per_client`
// calls each; client i's call j uses key keys[(i + j * clients) %
// keys.size()] and `body`. Returns every answer, with its latency.
// `accept_encoding` empty: httplib's default (it asks for br and gzip, as
// SDKs ask for gzip), so the gateway compresses its JSON answers.
inline std::vector<Answer> run_load(const GatewayProcess& gw, int clients,
                                    int per_client,
                                    const std::vector<std::string>& keys,
                                    const std::string& body,
                                    double* wall_seconds = nullptr,
                                    const std::string& accept_encoding = "") {
  std::vector<std::vector<Answer>> got(static_cast<std::size_t>(clients));
  std::vector<std::thread> threads;
  const SteadyTime t0 = now();
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([&, i] {
      std::unique_ptr<httplib::Client> c = gw.client();
      auto& out = got[static_cast<std::size_t>(i)];
      out.reserve(static_cast<std::size_t>(per_client));
      for (int j = 0; j < per_client; ++j) {
        Answer a;
        a.key = keys[static_cast<std::size_t>(i + j * clients) % keys.size()];
        const SteadyTime t = now();
        httplib::Headers h = {{"Authorization", "Bearer " + a.key}};
        if (!accept_encoding.empty()) {
          h.emplace("Accept-Encoding", accept_encoding);
        }
        httplib::Result r =
            c->Post("/v1/chat/completions", h, body, "application/json");
        a.latency_ms =
            std::chrono::duration<double, std::milli>(now() - t).count();
        if (r) {
          a.status = r->status;
          a.headers = std::move(r->headers);
          a.body = std::move(r->body);
        }
        out.push_back(std::move(a));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  if (wall_seconds != nullptr) {
    *wall_seconds = std::chrono::duration<double>(now() - t0).count();
  }
  std::vector<Answer> all;
  for (auto& v : got) {
    for (Answer& a : v) all.push_back(std::move(a));
  }
  return all;
}

}  // namespace rk_gw

#endif  // RATEKEEPER_TESTS_HTTP_GATEWAY_HARNESS_HPP_
