#pragma once
#include <napi.h>

#include <cstdint>

namespace pm {
uint64_t HashPage(const uint8_t* page);
// Resolves argument `argBuf` to the bytes of pages [first, first+count), or throws and returns false.
bool PageRange(const Napi::CallbackInfo& info, size_t argBuf, const char* name, uint64_t first,
               uint64_t count, const uint8_t** start);
void InitPages(Napi::Env env, Napi::Object exports);
}  // namespace pm
