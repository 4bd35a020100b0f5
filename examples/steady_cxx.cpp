// The steady-load example in C++ (see steady.c): an LRU cache (std::list + std::unordered_map of
// std::string) that fills and stays full, per-request std::string temporaries, and a login path
// whose SessionRegistry::remember() keeps every session in a std::vector<Session*> it never
// trims (the slow leak). --fixed removes the session when the request ends.
//   steady_cxx [--seconds N] [--rate REQUESTS_PER_S] [--fixed]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

struct Session {
    unsigned user;
    char token[40];
};

struct SessionRegistry {
    std::vector<Session *> all;
    __attribute__((noinline)) Session *remember(unsigned user) {
        auto *s = new Session{user, {}};
        all.push_back(s);
        return s;
    }
    void forget(Session *s) {
        all.pop_back();
        delete s;
    }
};

class Cache {
    std::list<std::pair<unsigned, std::string>> lru_;
    std::unordered_map<unsigned, decltype(lru_)::iterator> index_;
    size_t cap_;

  public:
    explicit Cache(size_t cap) : cap_(cap) { index_.reserve(cap * 2); }
    __attribute__((noinline)) const std::string &lookup(unsigned key) {
        auto it = index_.find(key);
        if (it != index_.end()) {
            lru_.splice(lru_.begin(), lru_, it->second);
            return it->second->second;
        }
        if (lru_.size() == cap_) {
            index_.erase(lru_.back().first);
            lru_.pop_back();
        }
        lru_.emplace_front(key, std::string(200, char('a' + key % 26)));
        index_[key] = lru_.begin();
        return lru_.front().second;
    }
};

static unsigned long long rng = 0x9E3779B97F4A7C15ull;
static unsigned next() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return unsigned(rng >> 16);
}

__attribute__((noinline)) static size_t handle_request(const std::string &line, Cache &cache,
                                                       SessionRegistry &reg, bool fixed) {
    std::string verb = line.substr(0, line.find(' '));  // temporaries
    unsigned key = unsigned(std::strtoul(line.c_str() + verb.size() + 1, nullptr, 10)) % 600;
    std::string reply = "200 " + cache.lookup(key);
    if (verb == "LOGIN") {
        Session *s = reg.remember(key);
        if (fixed) reg.forget(s);
    }
    return reply.size();
}

int main(int argc, char **argv) {
    double seconds = 8, rate = 2000;
    bool fixed = false;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = std::atof(argv[++i]);
        else if (!std::strcmp(argv[i], "--rate") && i + 1 < argc) rate = std::atof(argv[++i]);
        else if (!std::strcmp(argv[i], "--fixed")) fixed = true;
        else {
            std::fprintf(stderr, "usage: %s [--seconds N] [--rate R] [--fixed]\n", argv[0]);
            return 2;
        }
    }
    Cache cache(600);
    SessionRegistry reg;
    auto start = std::chrono::steady_clock::now();
    const double tick = 0.005;
    long done = 0;
    size_t bytes = 0;
    for (int t = 0;; t++) {
        double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (el >= seconds) break;
        long due = long((t + 1) * tick * rate);
        for (; done < due; done++) {
            std::string line = (done % 20 == 19 ? "LOGIN " : "GET ") + std::to_string(next());
            bytes += handle_request(line, cache, reg, fixed);
        }
        std::this_thread::sleep_until(start + std::chrono::duration<double>((t + 1) * tick));
    }
    std::printf("%ld requests, %zu bytes of replies\n", done, bytes);
    // The registry's vector and its sessions are still reachable here: a leak under load all
    // the same (it grows without bound); at exit they go with the process.
    std::_Exit(0);
}
