// C++ container churn: a std::map of std::string to std::shared_ptr<Widget> kept near 1,000
// entries, std::vector growth and std::string building. Every 5,000 iterations leak_widget()
// leaks one Widget (a raw new never deleted): the known leak.
//   cxx_churn ITERATIONS
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

struct Widget {
    std::string name;
    std::vector<int> parts;
};

static Widget *volatile leaked;

__attribute__((noinline)) static void leak_widget(int i) {
    leaked = new Widget{"leaked-" + std::to_string(i), {}};  // never deleted
}

int main(int argc, char **argv) {
    long n = argc > 1 ? std::atol(argv[1]) : 200000;
    std::map<std::string, std::shared_ptr<Widget>> widgets;
    unsigned long long rng = 88172645463325252ull, total = 0;
    for (long i = 0; i < n; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::string key = "widget-" + std::to_string(rng % 2000);
        auto it = widgets.find(key);
        if (it == widgets.end()) {
            auto w = std::make_shared<Widget>();
            w->name = key + "/" + std::to_string(i);
            for (int k = 0; k < int(rng % 16); k++) w->parts.push_back(k);
            widgets.emplace(std::move(key), std::move(w));
        } else {
            std::shared_ptr<Widget> held = it->second;
            total += held->parts.size() + held->name.size();
            widgets.erase(it);
        }
        if (i % 5000 == 4999) leak_widget(int(i));
    }
    std::printf("%zu widgets, %llu\n", widgets.size(), total);
    return 0;
}
