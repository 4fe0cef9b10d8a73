#include "registry.h"

#include <map>
#include <mutex>
#include <shared_mutex>

namespace pm {
namespace {

// Process-wide by nature (memory is), so a function-local static: built on first use, thread-safe.
struct Registry {
  std::shared_mutex mu;
  std::map<uintptr_t, size_t> live;  // start -> length
};

Registry& Get() {
  static Registry* r = new Registry();  // never destroyed: deleters may run during process exit
  return *r;
}

}  // namespace

void RegistryAdd(const uint8_t* base, size_t length) {
  Registry& r = Get();
  std::unique_lock<std::shared_mutex> lock(r.mu);
  r.live[reinterpret_cast<uintptr_t>(base)] = length;
}

void RegistryRemove(const uint8_t* base) {
  Registry& r = Get();
  std::unique_lock<std::shared_mutex> lock(r.mu);
  r.live.erase(reinterpret_cast<uintptr_t>(base));
}

size_t WithRegisteredRuns(size_t n, const std::function<std::pair<uintptr_t, size_t>(size_t)>& range,
                          const std::function<void(size_t, const uint8_t*)>& fn) {
  Registry& r = Get();
  std::shared_lock<std::shared_mutex> lock(r.mu);
  auto known = [&](uintptr_t start, size_t length) {
    auto it = r.live.upper_bound(start);
    if (it == r.live.begin()) return false;
    --it;
    return start >= it->first && length <= it->second && start - it->first <= it->second - length;
  };
  for (size_t i = 0; i < n; i++) {
    auto [start, length] = range(i);
    if (!known(start, length)) return i;
  }
  for (size_t i = 0; i < n; i++) fn(i, reinterpret_cast<const uint8_t*>(range(i).first));
  return n;
}

}  // namespace pm
