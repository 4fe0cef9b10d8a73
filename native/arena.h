#pragma once
#include <napi.h>

namespace pm {
// The Arena class: mergeable memory, the stable page pool and the copy-on-write remaps.
void InitArena(Napi::Env env, Napi::Object exports);
}  // namespace pm
