// Readers of /proc for the mapping budget and for page-level truth (pagemap).
#include "procfs.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "common.h"
#include "pages.h"
#include "v8_buffers.h"

namespace pm {

int64_t CountMappings() {
  int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  // On the stack: a heap block this large would be mmapped by malloc, and freeing one raises
  // glibc's mmap and trim thresholds for the whole process (then no thread's heap gives back its top).
  char buf[1 << 16];
  int64_t lines = 0;
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      close(fd);
      return -e;
    }
    if (n == 0) break;
    for (const char* p = buf; (p = static_cast<const char*>(memchr(p, '\n', buf + n - p)));) {
      lines++;
      p++;
    }
  }
  close(fd);
  return lines;
}

int64_t MaxMapCount() {
  int fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  char buf[32] = {};
  ssize_t n = read(fd, buf, sizeof buf - 1);
  int e = errno;
  close(fd);
  if (n <= 0) return n < 0 ? -e : -EIO;
  return strtoll(buf, nullptr, 10);
}

namespace {

Napi::Value Mappings(const Napi::CallbackInfo& info) {
  int64_t n = CountMappings();
  if (n < 0) return ThrowErrno(info.Env(), static_cast<int>(-n), "read", "cannot count mappings in /proc/self/maps");
  return Napi::Number::New(info.Env(), static_cast<double>(n));
}

Napi::Value MaxMappings(const Napi::CallbackInfo& info) {
  int64_t n = MaxMapCount();
  if (n < 0) return ThrowErrno(info.Env(), static_cast<int>(-n), "read", "cannot read /proc/sys/vm/max_map_count");
  return Napi::Number::New(info.Env(), static_cast<double>(n));
}

// pagemap(buffer, firstPage, count, out: BigUint64Array) -> count. Raw /proc/self/pagemap entries:
// bit 63 present, 62 swapped, 61 file-page or shared-anon, bits 0-54 the frame number (root only).
Napi::Value Pagemap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t first, count;
  if (!ArgIndex(info, 1, "firstPage", 9007199254740991.0, &first)) return Napi::Value();
  if (!ArgIndex(info, 2, "count", 9007199254740991.0, &count)) return Napi::Value();
  Bytes out;
  if (GetBytes(info[3], &out) != ViewKind::kBigUint64)
    return ThrowType(env, code::INVALID_ARG, "out must be a BigUint64Array");
  if (count > out.length / 8) return ThrowRange(env, code::OUT_OF_RANGE, "out is too short for count entries");
  const uint8_t* p;
  if (!PageRange(info, 0, "buffer", first, count, &p)) return Napi::Value();
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ThrowErrno(env, errno, "open", "cannot open /proc/self/pagemap");
  size_t want = count * 8, got = 0;
  off_t at = static_cast<off_t>(reinterpret_cast<uintptr_t>(p) / kPage * 8);
  while (got < want) {
    ssize_t n = pread(fd, out.data + got, want - got, at + got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int e = n < 0 ? errno : EIO;
      close(fd);
      return ThrowErrno(env, e, "pread", "cannot read /proc/self/pagemap");
    }
    got += n;
  }
  close(fd);
  return Napi::Number::New(env, static_cast<double>(count));
}

// addressOf(buffer) -> bigint: where the buffer's bytes are mapped, to match /proc/self/smaps ranges.
Napi::Value AddressOf(const Napi::CallbackInfo& info) {
  Bytes b;
  if (GetBytes(info[0], &b) == ViewKind::kNone)
    return ThrowType(info.Env(), code::INVALID_ARG, "buffer must be a SharedArrayBuffer, ArrayBuffer or ArrayBufferView");
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(reinterpret_cast<uintptr_t>(b.data)));
}

void Unmap(void* data, size_t length, void* /*deleterData*/) {
  if (data) munmap(data, length);  // rounded up to whole pages by the kernel
}

// mappedBuffer(bytes) -> SharedArrayBuffer over a private anonymous mapping of its own, unmapped
// when V8 frees it. For the engine's large scratch arrays: freed, malloc'd memory of that size
// often stays in the C heap (glibc raises its mmap threshold to the largest block freed), where
// the OS goes on counting it against what a merge gave back.
Napi::Value MappedBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t bytes;
  if (!ArgIndex(info, 0, "bytes", 9007199254740991.0, &bytes)) return Napi::Value();
  if (bytes == 0) return ThrowRange(env, code::OUT_OF_RANGE, "bytes must be at least 1");
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return ThrowErrno(env, errno, "mmap", "cannot map " + std::to_string(bytes) + " bytes");
  return Napi::Value(env, NewSharedArrayBuffer(env, p, bytes, Unmap, nullptr));
}

}  // namespace

void InitProcfs(Napi::Env env, Napi::Object exports) {
  exports.Set("mappingCount", Napi::Function::New(env, Mappings, "mappingCount"));
  exports.Set("maxMapCount", Napi::Function::New(env, MaxMappings, "maxMapCount"));
  exports.Set("pagemap", Napi::Function::New(env, Pagemap, "pagemap"));
  exports.Set("addressOf", Napi::Function::New(env, AddressOf, "addressOf"));
  exports.Set("mappedBuffer", Napi::Function::New(env, MappedBuffer, "mappedBuffer"));
}

}  // namespace pm
