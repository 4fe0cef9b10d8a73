// Shared by every native file: the page size, the status and error-code tables, and the
// helpers that turn a failure into a JavaScript error shaped like Node's own.
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace pm {

constexpr size_t kPage = 4096;
constexpr uint32_t kNoPool = 0xFFFFFFFFu;

// Per-extent results of arena calls (mirrored by lib/native.ts; test/native.ts checks they agree).
enum Status : int32_t {
  kOk = 0,
  kMismatch = 1,  // bytes differed right before the remap: extent left alone
  kGone = 2,      // the allocation was collected, or a pool page it named was released
  kBudget = 3,    // could take the process's mappings above the budget: extent left alone
};

// What a page of an allocation is mapped to right now (one byte per page).
enum PageState : uint8_t {
  kShared = 0,    // MAP_SHARED window onto the allocation's own arena page
  kAnon = 1,      // private anonymous memory
  kMerged = 2,    // MAP_PRIVATE onto a live pool page (copy-on-write)
  kWritten = 3,   // was kMerged, then written: a private copy inside a file-backed mapping
};

// Error codes the addon throws itself (system errors use the errno name instead).
#define PM_ERROR_CODES(X)                 \
  X(INVALID_ARG, "ERR_PAGEMERGE_INVALID_ARG") \
  X(OUT_OF_RANGE, "ERR_PAGEMERGE_OUT_OF_RANGE") \
  X(MISALIGNED, "ERR_PAGEMERGE_MISALIGNED") \
  X(FOREIGN_BUFFER, "ERR_PAGEMERGE_FOREIGN_BUFFER") \
  X(NOT_POOL_PAGE, "ERR_PAGEMERGE_NOT_POOL_PAGE") \
  X(ARENA_FULL, "ERR_PAGEMERGE_ARENA_FULL") \
  X(NOT_PRIVATE, "ERR_PAGEMERGE_NOT_PRIVATE")

namespace code {
#define PM_DECLARE(name, str) constexpr const char* name = str;
PM_ERROR_CODES(PM_DECLARE)
#undef PM_DECLARE
}  // namespace code

// Each returns an empty value so callers can `return ThrowX(...)`.
Napi::Value ThrowType(Napi::Env env, const char* code, const std::string& msg);
Napi::Value ThrowRange(Napi::Env env, const char* code, const std::string& msg);
Napi::Value ThrowPlain(Napi::Env env, const char* code, const std::string& msg);
// A Node-style system error: code 'EPERM', errno -1, syscall 'mmap'.
Napi::Value ThrowErrno(Napi::Env env, int err, const char* syscall, const std::string& what);

// Reads a non-negative integer argument no larger than `max`; throws and returns false otherwise.
bool ArgIndex(const Napi::CallbackInfo& info, size_t i, const char* name, double max, uint64_t* out);

inline bool IsZeroPage(const uint8_t* p) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc = 0;
  for (size_t i = 0; i < kPage / 8; i += 8)
    acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
  return acc == 0;
}

}  // namespace pm
