#pragma once
#include <napi.h>

#include <cstdint>

namespace pm {
// Number of VMAs of this process (lines of /proc/self/maps), or -errno.
int64_t CountMappings();
// vm.max_map_count, or -errno.
int64_t MaxMapCount();
void InitProcfs(Napi::Env env, Napi::Object exports);
}  // namespace pm
