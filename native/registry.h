// Every live allocation of every arena in the process, so that a worker thread can hash pages
// by address without holding the buffer (which would keep its memory alive): the read happens
// under a shared lock that the backing-store deleter must take exclusively before unmapping.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>

namespace pm {
void RegistryAdd(const uint8_t* base, size_t length);
// Blocks until no registered read of the range is in progress.
void RegistryRemove(const uint8_t* base);
// Runs fn(i, start) for each of n ranges, range(i), while all are known to stay mapped (under one
// lock), only if all are registered. Returns n, or the index of the first range that is not.
size_t WithRegisteredRuns(size_t n, const std::function<std::pair<uintptr_t, size_t>(size_t)>& range,
                          const std::function<void(size_t, const uint8_t*)>& fn);
}  // namespace pm
