// Read-only page primitives, safe on any thread and any buffer: batch hashing and compare.
#define XXH_INLINE_ALL
#include "xxhash.h"

#include <cstring>

#include "common.h"
#include "pages.h"
#include "registry.h"
#include "v8_buffers.h"

namespace pm {

Napi::Value ThrowType(Napi::Env env, const char* code, const std::string& msg) {
  Napi::TypeError err = Napi::TypeError::New(env, msg);
  err.Set("code", Napi::String::New(env, code));
  err.ThrowAsJavaScriptException();
  return Napi::Value();
}

Napi::Value ThrowRange(Napi::Env env, const char* code, const std::string& msg) {
  Napi::RangeError err = Napi::RangeError::New(env, msg);
  err.Set("code", Napi::String::New(env, code));
  err.ThrowAsJavaScriptException();
  return Napi::Value();
}

Napi::Value ThrowPlain(Napi::Env env, const char* code, const std::string& msg) {
  Napi::Error err = Napi::Error::New(env, msg);
  err.Set("code", Napi::String::New(env, code));
  err.ThrowAsJavaScriptException();
  return Napi::Value();
}

Napi::Value ThrowErrno(Napi::Env env, int err, const char* syscall, const std::string& what) {
  const char* name = strerrorname_np(err);
  std::string msg = what + ": " + syscall + " failed: " + std::strerror(err);
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, name ? name : "EUNKNOWN"));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("syscall", Napi::String::New(env, syscall));
  e.ThrowAsJavaScriptException();
  return Napi::Value();
}

bool ArgIndex(const Napi::CallbackInfo& info, size_t i, const char* name, double max, uint64_t* out) {
  Napi::Value v = info[i];
  if (!v.IsNumber()) {
    ThrowType(info.Env(), code::INVALID_ARG, std::string(name) + " must be a number");
    return false;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d != static_cast<double>(static_cast<uint64_t>(d)) || d > max) {
    ThrowRange(info.Env(), code::OUT_OF_RANGE,
               std::string(name) + " must be an integer from 0 to " + std::to_string(static_cast<uint64_t>(max)));
    return false;
  }
  *out = static_cast<uint64_t>(d);
  return true;
}

bool PageRange(const Napi::CallbackInfo& info, size_t argBuf, const char* name, uint64_t first,
               uint64_t count, const uint8_t** start) {
  Bytes b;
  ViewKind kind = GetBytes(info[argBuf], &b);
  if (kind == ViewKind::kNone) {
    ThrowType(info.Env(), code::INVALID_ARG,
              std::string(name) + " must be a SharedArrayBuffer, ArrayBuffer or ArrayBufferView");
    return false;
  }
  if (reinterpret_cast<uintptr_t>(b.data) % kPage != 0) {
    ThrowRange(info.Env(), code::MISALIGNED, std::string(name) + " does not start on a page boundary");
    return false;
  }
  uint64_t pages = b.length / kPage;
  if (first > pages || count > pages - first) {
    ThrowRange(info.Env(), code::OUT_OF_RANGE,
               std::string(name) + " has " + std::to_string(pages) + " whole pages; pages " +
                   std::to_string(first) + "+" + std::to_string(count) + " are outside it");
    return false;
  }
  *start = b.data + first * kPage;
  return true;
}

uint64_t HashPage(const uint8_t* page) { return XXH3_64bits(page, kPage); }

namespace {

// The arguments of hashPages: (_, firstPage, count, out: BigUint64Array, outIndex).
// Sets where the count hashes go; throws and returns false on bad input.
bool HashArgs(const Napi::CallbackInfo& info, uint64_t* first, uint64_t* count, uint64_t** hashes) {
  uint64_t outIndex;
  if (!ArgIndex(info, 1, "firstPage", 9007199254740991.0, first)) return false;
  if (!ArgIndex(info, 2, "count", 9007199254740991.0, count)) return false;
  if (!ArgIndex(info, 4, "outIndex", 9007199254740991.0, &outIndex)) return false;
  Bytes out;
  if (GetBytes(info[3], &out) != ViewKind::kBigUint64) {
    ThrowType(info.Env(), code::INVALID_ARG, "out must be a BigUint64Array");
    return false;
  }
  if (outIndex > out.length / 8 || *count > out.length / 8 - outIndex) {
    ThrowRange(info.Env(), code::OUT_OF_RANGE, "out is too short for count hashes at outIndex");
    return false;
  }
  *hashes = reinterpret_cast<uint64_t*>(out.data) + outIndex;
  return true;
}

// hashPages(buffer, firstPage, count, out: BigUint64Array, outIndex) -> count
Napi::Value HashPages(const Napi::CallbackInfo& info) {
  uint64_t first, count, *h;
  const uint8_t* p;
  if (!HashArgs(info, &first, &count, &h) || !PageRange(info, 0, "buffer", first, count, &p)) return Napi::Value();
  for (uint64_t i = 0; i < count; i++) h[i] = HashPage(p + i * kPage);
  return Napi::Number::New(info.Env(), static_cast<double>(count));
}

// comparePages(a, pageA, b, pageB, count = 1) -> -1 | 0 | 1, in memcmp order
Napi::Value ComparePages(const Napi::CallbackInfo& info) {
  uint64_t pa, pb, count = 1;
  if (!ArgIndex(info, 1, "pageA", 9007199254740991.0, &pa)) return Napi::Value();
  if (!ArgIndex(info, 3, "pageB", 9007199254740991.0, &pb)) return Napi::Value();
  if (info.Length() > 4 && !info[4].IsUndefined() && !ArgIndex(info, 4, "count", 9007199254740991.0, &count))
    return Napi::Value();
  const uint8_t *a, *b;
  if (!PageRange(info, 0, "a", pa, count, &a)) return Napi::Value();
  if (!PageRange(info, 2, "b", pb, count, &b)) return Napi::Value();
  int c = std::memcmp(a, b, count * kPage);
  return Napi::Number::New(info.Env(), c < 0 ? -1 : c > 0 ? 1 : 0);
}

// hashRuns(runs: Float64Array, n, out: BigUint64Array) -> pages hashed. Each of the n runs is a
// record of four numbers [address, firstPage, count, outIndex]: pages of a live arena allocation,
// hashed by address (as worker threads do, so as not to keep buffers alive) into
// out[outIndex...]. One call for a batch's runs: a batch of small buffers has one run per buffer,
// and a call per run cost more than hashing its page. Every run is checked before any is hashed.
Napi::Value HashRuns(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes runs, out;
  if (GetBytes(info[0], &runs) != ViewKind::kFloat64) return ThrowType(env, code::INVALID_ARG, "runs must be a Float64Array");
  uint64_t n;
  if (!ArgIndex(info, 1, "n", static_cast<double>(runs.length / 32), &n)) return Napi::Value();
  if (GetBytes(info[2], &out) != ViewKind::kBigUint64) return ThrowType(env, code::INVALID_ARG, "out must be a BigUint64Array");
  const double* r = reinterpret_cast<const double*>(runs.data);
  const uint64_t slots = out.length / 8;
  constexpr double kMaxSafe = 9007199254740991.0;
  auto whole = [](double d) { return d >= 0 && d <= kMaxSafe && d == static_cast<double>(static_cast<uint64_t>(d)); };
  auto runAt = [](uint64_t i) { return "run " + std::to_string(i) + ": "; };  // built only for an error
  for (uint64_t i = 0; i < n; i++) {
    const double* q = r + 4 * i;
    if (!whole(q[0]) || static_cast<uint64_t>(q[0]) % kPage) return ThrowRange(env, code::MISALIGNED, runAt(i) + "address must be a page-aligned address");
    if (!whole(q[1]) || !whole(q[2]) || !whole(q[3])) return ThrowRange(env, code::OUT_OF_RANGE, runAt(i) + "firstPage, count and outIndex must be integers from 0 to 2^53 - 1");
    const uint64_t address = static_cast<uint64_t>(q[0]), first = static_cast<uint64_t>(q[1]), count = static_cast<uint64_t>(q[2]), at = static_cast<uint64_t>(q[3]);
    const uint64_t room = (UINT64_MAX - address) / kPage;
    if (first > room || count > room - first) return ThrowRange(env, code::MISALIGNED, runAt(i) + "the pages lie past the end of the address space");
    if (at > slots || count > slots - at) return ThrowRange(env, code::OUT_OF_RANGE, runAt(i) + "out is too short for count hashes at outIndex");
  }
  uint64_t* h = reinterpret_cast<uint64_t*>(out.data);
  uint64_t pages = 0;
  const size_t bad = WithRegisteredRuns(
      n,
      [&](size_t i) {
        const double* q = r + 4 * i;
        return std::make_pair(static_cast<uintptr_t>(q[0] + q[1] * kPage), static_cast<size_t>(q[2]) * kPage);
      },
      [&](size_t i, const uint8_t* p) {
        const double* q = r + 4 * i;
        const uint64_t count = static_cast<uint64_t>(q[2]), at = static_cast<uint64_t>(q[3]);
        for (uint64_t k = 0; k < count; k++) h[at + k] = HashPage(p + k * kPage);
        pages += count;
      });
  if (bad < n) return ThrowType(env, code::FOREIGN_BUFFER, runAt(bad) + "the pages are not in a live pagemerge allocation");
  return Napi::Number::New(env, static_cast<double>(pages));
}

}  // namespace

void InitPages(Napi::Env env, Napi::Object exports) {
  exports.Set("hashPages", Napi::Function::New(env, HashPages, "hashPages"));
  exports.Set("comparePages", Napi::Function::New(env, ComparePages, "comparePages"));
  exports.Set("hashRuns", Napi::Function::New(env, HashRuns, "hashRuns"));
  static const uint8_t zero[kPage] = {};
  exports.Set("ZERO_PAGE_HASH", Napi::BigInt::New(env, HashPage(zero)));
}

}  // namespace pm
