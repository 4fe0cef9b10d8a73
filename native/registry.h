// Every live allocation of every arena in the process, so that a worker thread can hash pages
// by address without holding the buffer (which would keep its memory alive): the read happens
// under a shared lock that the backing-store deleter must take exclusively before unmapping.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

namespace pm {
void RegistryAdd(const uint8_t* base, size_t length);
// Blocks until no registered read of the range is in progress.
void RegistryRemove(const uint8_t* base);
// Runs fn while [start, start+length) is known to stay mapped; false when it is not registered.
bool WithRegistered(uintptr_t start, size_t length, const std::function<void(const uint8_t*)>& fn);
}  // namespace pm
