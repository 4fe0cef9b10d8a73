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

bool WithRegistered(uintptr_t start, size_t length, const std::function<void(const uint8_t*)>& fn) {
  Registry& r = Get();
  std::shared_lock<std::shared_mutex> lock(r.mu);
  auto it = r.live.upper_bound(start);
  if (it == r.live.begin()) return false;
  --it;
  if (start < it->first || length > it->second || start - it->first > it->second - length) return false;
  fn(reinterpret_cast<const uint8_t*>(start));
  return true;
}

}  // namespace pm
