// Reading another process's memory, for the estimator: which pages are resident
// (/proc/PID/pagemap), the xxh3 of each page read with process_vm_readv through a per-thread
// bounce buffer (nothing of the target is kept), and byte comparison of pages against reference
// pages. A failure of the target (gone, not permitted, a mapping that vanished) is a status per
// range or page, never a throw, so one bad process does not stop the others; only bad arguments
// throw. Safe on any thread: the only state is thread_local.
#include "remote.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "common.h"
#include "pages.h"
#include "v8_buffers.h"

namespace pm {
namespace {

// Pages per process_vm_readv when reading a run: 2 MiB, large enough that the syscall's own cost
// disappears, small enough to stay in cache while it is hashed.
constexpr size_t kRunChunkPages = 512;
// Remote iovecs per process_vm_readv for scattered pages (the kernel allows UIO_MAXIOV = 1024).
constexpr size_t kMaxIov = 512;
// pagemap entries read per pread.
constexpr size_t kPagemapChunk = 4096;
constexpr pid_t kMaxPid = 4194304;  // PID_MAX_LIMIT

// Per-page flags written by pagemapPresent (mirrored in lib/native.ts).
enum PageFlag : uint8_t {
  kPresent = 1,   // mapped in the process's page table now
  kSwapped = 2,   // in swap (not read: reading would bring it back)
  kZeroPfn = 4,   // maps the kernel's shared zero page (known only when frame numbers are visible)
  kPfnKnown = 8,  // frame numbers were visible (CAP_SYS_ADMIN), so kZeroPfn is meaningful
};

constexpr uint64_t kPmPresent = 1ull << 63;
constexpr uint64_t kPmSwapped = 1ull << 62;
constexpr uint64_t kPmPfnMask = (1ull << 55) - 1;

// A thread's scratch memory, reused by every call on that thread.
std::vector<uint8_t>& Scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < bytes) buf.resize(bytes);
  return buf;
}

// The frame number of the kernel's zero page as this thread can see it, or 0 when frame numbers
// are hidden (no CAP_SYS_ADMIN). Found by reading an untouched private page, which maps it.
uint64_t ZeroPfn() {
  thread_local int64_t cached = -1;
  if (cached >= 0) return static_cast<uint64_t>(cached);
  cached = 0;
  void* p = mmap(nullptr, kPage, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 0;
  volatile uint8_t sink = *static_cast<volatile uint8_t*>(p);
  (void)sink;
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    uint64_t entry = 0;
    if (pread(fd, &entry, 8, static_cast<off_t>(reinterpret_cast<uintptr_t>(p) / kPage * 8)) == 8 &&
        (entry & kPmPresent))
      cached = static_cast<int64_t>(entry & kPmPfnMask);
    close(fd);
  }
  munmap(p, kPage);
  return static_cast<uint64_t>(cached);
}

ssize_t ReadV(pid_t pid, const iovec* local, unsigned long nlocal, const iovec* remote, unsigned long nremote) {
  for (;;) {
    ssize_t n = process_vm_readv(pid, local, nlocal, remote, nremote, 0);
    if (n >= 0 || errno != EINTR) return n;
  }
}

// Reads one page; 0 or the errno.
int ReadOne(pid_t pid, uint64_t addr, uint8_t* dst) {
  iovec local{dst, kPage}, remote{reinterpret_cast<void*>(addr), kPage};
  ssize_t n = ReadV(pid, &local, 1, &remote, 1);
  return n == static_cast<ssize_t>(kPage) ? 0 : n < 0 ? errno : EFAULT;
}

// Errors after which nothing more of the process can be read.
bool ProcessWide(int err) { return err == ESRCH || err == EPERM || err == EACCES; }

// Reads the pages at addrs[0..n) (stride words apart) into dst, page i at dst + i*kPage; status[i]
// becomes 0 or -errno. Adjacent addresses go into one remote iovec.
void ReadScattered(pid_t pid, const uint64_t* addrs, size_t stride, size_t n, uint8_t* dst, int32_t* status) {
  thread_local std::vector<iovec> remote;
  remote.resize(kMaxIov);
  size_t i = 0;
  while (i < n) {
    // One batch: up to kMaxIov iovecs from page i on.
    size_t end = i, iovs = 0;
    while (end < n) {
      uint64_t a = addrs[end * stride];
      if (iovs > 0 && a == reinterpret_cast<uint64_t>(remote[iovs - 1].iov_base) + remote[iovs - 1].iov_len) {
        remote[iovs - 1].iov_len += kPage;
      } else {
        if (iovs == kMaxIov) break;
        remote[iovs++] = iovec{reinterpret_cast<void*>(a), kPage};
      }
      end++;
    }
    iovec local{dst + i * kPage, (end - i) * kPage};
    ssize_t got = ReadV(pid, &local, 1, remote.data(), iovs);
    size_t ok = got > 0 ? static_cast<size_t>(got) / kPage : 0;
    for (size_t k = i; k < i + ok; k++) status[k] = 0;
    i += ok;
    if (i == end) continue;
    // Page i stopped the read: read it alone to learn why (or find it readable after all).
    int err = got < 0 ? errno : ReadOne(pid, addrs[i * stride], dst + i * kPage);
    if (got < 0 && !ProcessWide(err)) err = ReadOne(pid, addrs[i * stride], dst + i * kPage);
    status[i] = -err;
    i++;
    if (ProcessWide(err)) {
      for (; i < n; i++) status[i] = -err;
      return;
    }
  }
}

pid_t PidArg(const Napi::CallbackInfo& info, size_t i, bool allowZero) {
  uint64_t pid;
  if (!ArgIndex(info, i, "pid", kMaxPid, &pid)) return -1;
  if (pid == 0 && !allowZero) {
    ThrowRange(info.Env(), code::OUT_OF_RANGE, "pid must be an integer from 1 to 4194304");
    return -1;
  }
  return static_cast<pid_t>(pid);
}

bool Typed(const Napi::CallbackInfo& info, size_t i, const char* name, ViewKind want, const char* type, Bytes* out) {
  if (GetBytes(info[i], out) != want) {
    ThrowType(info.Env(), code::INVALID_ARG, std::string(name) + " must be a " + type);
    return false;
  }
  return true;
}

bool AddressArg(const Napi::CallbackInfo& info, size_t i, uint64_t* out) {
  bool lossless;
  if (!info[i].IsBigInt()) {
    ThrowType(info.Env(), code::INVALID_ARG, "address must be a bigint");
    return false;
  }
  *out = info[i].As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless || *out % kPage) {
    ThrowRange(info.Env(), code::MISALIGNED, "address must be a page-aligned address");
    return false;
  }
  return true;
}

// pagemapPresent(pid, address: bigint, pages, out: Uint8Array) -> pages, or -errno.
// Per page: PageFlag bits from /proc/PID/pagemap. -ESRCH when the process is gone (or exits while
// it is read: the file then ends early).
Napi::Value PagemapPresent(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = PidArg(info, 0, false);
  if (pid < 0) return Napi::Value();
  uint64_t addr, pages;
  if (!AddressArg(info, 1, &addr)) return Napi::Value();
  if (!ArgIndex(info, 2, "pages", 9007199254740991.0, &pages)) return Napi::Value();
  Bytes out;
  if (!Typed(info, 3, "out", ViewKind::kUint8, "Uint8Array", &out)) return Napi::Value();
  if (pages > out.length) return ThrowRange(env, code::OUT_OF_RANGE, "out is too short for pages entries");
  if (pages > (UINT64_MAX - addr) / kPage) return ThrowRange(env, code::OUT_OF_RANGE, "address + pages overflows");
  char path[48];
  snprintf(path, sizeof path, "/proc/%d/pagemap", static_cast<int>(pid));
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Napi::Number::New(env, errno == ENOENT ? -ESRCH : -errno);
  uint64_t zero = ZeroPfn();
  uint8_t known = zero ? kPfnKnown : 0;
  std::vector<uint8_t>& scratch = Scratch(kPagemapChunk * 8);
  uint64_t* entries = reinterpret_cast<uint64_t*>(scratch.data());
  uint64_t done = 0;
  int err = 0;
  while (done < pages) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(kPagemapChunk, pages - done));
    off_t at = static_cast<off_t>((addr / kPage + done) * 8);
    ssize_t n = pread(fd, entries, want * 8, at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : ESRCH;  // the file ends early once the process has no memory
      break;
    }
    size_t got = static_cast<size_t>(n) / 8;
    for (size_t k = 0; k < got; k++) {
      uint64_t e = entries[k];
      uint8_t f = known;
      if (e & kPmPresent) {
        f |= kPresent;
        if (zero && (e & kPmPfnMask) == zero) f |= kZeroPfn;
      } else if (e & kPmSwapped) {
        f |= kSwapped;
      }
      out.data[done + k] = f;
    }
    done += got;
  }
  close(fd);
  return Napi::Number::New(env, err ? -err : static_cast<double>(done));
}

// remoteHash(pid, ranges: BigUint64Array [address, pages]..., out: BigUint64Array,
//            status: Int32Array [pagesRead, -errno]...) -> pages hashed.
// The hashes of range i follow those of range i-1 in out. A range stops at its first page that
// cannot be read: status says how many were read, and why it stopped (0 if it did not).
Napi::Value RemoteHash(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  pid_t pid = PidArg(info, 0, false);
  if (pid < 0) return Napi::Value();
  Bytes ranges, out, status;
  if (!Typed(info, 1, "ranges", ViewKind::kBigUint64, "BigUint64Array", &ranges) ||
      !Typed(info, 2, "out", ViewKind::kBigUint64, "BigUint64Array", &out) ||
      !Typed(info, 3, "status", ViewKind::kInt32, "Int32Array", &status))
    return Napi::Value();
  const uint64_t* r = reinterpret_cast<const uint64_t*>(ranges.data);
  size_t n = ranges.length / 16;
  if (ranges.length % 16) return ThrowRange(env, code::OUT_OF_RANGE, "ranges must hold [address, pages] pairs");
  if (status.length / 4 < 2 * n) return ThrowRange(env, code::OUT_OF_RANGE, "status is too short: 2 entries per range");
  uint64_t total = 0;
  for (size_t i = 0; i < n; i++) {
    if (r[2 * i] % kPage) return ThrowRange(env, code::MISALIGNED, "range " + std::to_string(i) + " is not page-aligned");
    if (r[2 * i + 1] > (UINT64_MAX - r[2 * i]) / kPage || r[2 * i + 1] > out.length / 8 - total)
      return ThrowRange(env, code::OUT_OF_RANGE, "out is too short for the pages of the ranges");
    total += r[2 * i + 1];
  }
  uint64_t* hashes = reinterpret_cast<uint64_t*>(out.data);
  int32_t* st = reinterpret_cast<int32_t*>(status.data);
  uint8_t* buf = Scratch(kRunChunkPages * kPage).data();
  // Small ranges share a process_vm_readv: one remote iovec per piece of a range, up to the
  // buffer's kRunChunkPages and kMaxIov pieces (a syscall per range dominated with many small ones).
  struct Piece {
    size_t range;
    uint64_t from;  // page within the range
    size_t pages;
  };
  thread_local std::vector<Piece> pieces;
  thread_local std::vector<iovec> remote;
  pieces.resize(kMaxIov);
  remote.resize(kMaxIov);
  uint64_t hashed = 0, slot = 0;  // slot: the first hash of range i in out
  size_t i = 0;
  uint64_t done = 0;  // pages of range i read so far
  int wide = 0;       // a process-wide error: the remaining ranges get it without a syscall each
  auto finish = [&](int err) {  // range i ends: after `done` pages, for `err` (0: read in full)
    st[2 * i] = static_cast<int32_t>(done);
    st[2 * i + 1] = -err;
    hashed += done;
    slot += r[2 * i + 1];
    i++;
    done = 0;
  };
  while (i < n) {
    if (wide) {
      finish(wide);
      continue;
    }
    if (done == r[2 * i + 1]) {
      finish(0);
      continue;
    }
    // Gather pieces from (i, done) on.
    size_t np = 0, bufPages = 0, ri = i;
    uint64_t from = done;
    while (ri < n && bufPages < kRunChunkPages && np < kMaxIov) {
      uint64_t left = r[2 * ri + 1] - from;
      if (left > 0) {
        size_t take = static_cast<size_t>(std::min<uint64_t>(left, kRunChunkPages - bufPages));
        pieces[np] = Piece{ri, from, take};
        remote[np++] = iovec{reinterpret_cast<void*>(r[2 * ri] + from * kPage), take * kPage};
        bufPages += take;
        from += take;
        if (from < r[2 * ri + 1]) break;  // the buffer is full
      }
      ri++;
      from = 0;
    }
    iovec local{buf, bufPages * kPage};
    ssize_t got = ReadV(pid, &local, 1, remote.data(), np);
    size_t ok = got > 0 ? static_cast<size_t>(got) / kPage : 0;
    // Hash what was read, piece by piece; ranges read in full end with status 0.
    size_t at = 0;
    for (size_t p = 0; p < np && at < ok; p++) {
      const Piece& pc = pieces[p];
      while (i < pc.range) finish(0);  // empty ranges between pieces
      size_t k = std::min(pc.pages, ok - at);
      for (size_t j = 0; j < k; j++) hashes[slot + pc.from + j] = HashPage(buf + (at + j) * kPage);
      at += k;
      done = pc.from + k;
      if (done == r[2 * i + 1] && k == pc.pages) finish(0);
    }
    if (ok == bufPages) continue;
    // Stopped at page `done` of range i: read it alone, to learn why or to go on if it reads now.
    uint64_t addr = r[2 * i] + done * kPage;
    int e = got < 0 ? errno : 0;
    if (!ProcessWide(e)) e = ReadOne(pid, addr, buf);
    if (e) {
      if (ProcessWide(e)) wide = e;
      finish(e);
    } else {
      hashes[slot + done] = HashPage(buf);
      done++;
    }
  }
  return Napi::Number::New(env, static_cast<double>(hashed));
}

// remoteCompare(refs: BigUint64Array [pid, address]..., members: BigUint64Array [ref, pid, address]...,
//               status: Int32Array, hashes: BigUint64Array) -> members compared.
// Reads every reference page (pid 0: a page of zeros), then every member, and compares each member
// with its reference byte for byte. status and hashes hold the refs first, then the members:
// for a ref, 0 or -errno; for a member, 0 equal, 1 different, 2 not compared (its ref could not be
// read), or -errno. hashes: the xxh3 of each page as it was read now (0 if it was not read).
// Members of one process next to each other are read together, adjacent pages in one iovec.
Napi::Value RemoteCompare(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes refsB, membersB, statusB, hashesB;
  if (!Typed(info, 0, "refs", ViewKind::kBigUint64, "BigUint64Array", &refsB) ||
      !Typed(info, 1, "members", ViewKind::kBigUint64, "BigUint64Array", &membersB) ||
      !Typed(info, 2, "status", ViewKind::kInt32, "Int32Array", &statusB) ||
      !Typed(info, 3, "hashes", ViewKind::kBigUint64, "BigUint64Array", &hashesB))
    return Napi::Value();
  if (refsB.length % 16) return ThrowRange(env, code::OUT_OF_RANGE, "refs must hold [pid, address] pairs");
  if (membersB.length % 24) return ThrowRange(env, code::OUT_OF_RANGE, "members must hold [ref, pid, address] triples");
  const uint64_t* refs = reinterpret_cast<const uint64_t*>(refsB.data);
  const uint64_t* members = reinterpret_cast<const uint64_t*>(membersB.data);
  size_t nr = refsB.length / 16, nm = membersB.length / 24;
  if (statusB.length / 4 < nr + nm || hashesB.length / 8 < nr + nm)
    return ThrowRange(env, code::OUT_OF_RANGE, "status and hashes need one entry per ref and per member");
  for (size_t i = 0; i < nr; i++)
    if (refs[2 * i] > static_cast<uint64_t>(kMaxPid) || refs[2 * i + 1] % kPage)
      return ThrowRange(env, code::OUT_OF_RANGE, "ref " + std::to_string(i) + " has a bad pid or an unaligned address");
  for (size_t i = 0; i < nm; i++)
    if (members[3 * i] >= nr || members[3 * i + 1] == 0 || members[3 * i + 1] > static_cast<uint64_t>(kMaxPid) ||
        members[3 * i + 2] % kPage)
      return ThrowRange(env, code::OUT_OF_RANGE,
                        "member " + std::to_string(i) + " has a bad ref, a bad pid or an unaligned address");
  int32_t* status = reinterpret_cast<int32_t*>(statusB.data);
  uint64_t* hashes = reinterpret_cast<uint64_t*>(hashesB.data);

  // The reference pages, kept for the call only (the caller bounds how many it sends at once).
  thread_local std::vector<uint8_t> refPages;
  refPages.resize(std::max<size_t>(nr, 1) * kPage);
  for (size_t i = 0; i < nr;) {
    pid_t pid = static_cast<pid_t>(refs[2 * i]);
    size_t end = i + 1;
    while (end < nr && refs[2 * end] == refs[2 * i]) end++;
    if (pid == 0) {
      std::memset(refPages.data() + i * kPage, 0, (end - i) * kPage);
      std::fill(status + i, status + end, 0);
    } else {
      ReadScattered(pid, refs + 2 * i + 1, 2, end - i, refPages.data() + i * kPage, status + i);
    }
    for (size_t k = i; k < end; k++) hashes[k] = status[k] == 0 ? HashPage(refPages.data() + k * kPage) : 0;
    i = end;
  }

  uint8_t* buf = Scratch(kMaxIov * kPage).data();
  for (size_t i = 0; i < nm;) {
    uint64_t pid = members[3 * i + 1];
    size_t end = i + 1;
    while (end < nm && end - i < kMaxIov && members[3 * end + 1] == pid) end++;
    int32_t* st = status + nr + i;
    ReadScattered(static_cast<pid_t>(pid), members + 3 * i + 2, 3, end - i, buf, st);
    for (size_t k = 0; k < end - i; k++) {
      uint64_t* h = hashes + nr + i + k;
      if (st[k] != 0) {
        *h = 0;
        continue;
      }
      const uint8_t* page = buf + k * kPage;
      size_t ref = static_cast<size_t>(members[3 * (i + k)]);
      st[k] = status[ref] != 0 ? 2 : std::memcmp(page, refPages.data() + ref * kPage, kPage) == 0 ? 0 : 1;
      // Equal bytes have the reference's hash: hash only a page that differs (or had no reference).
      *h = st[k] == 0 ? hashes[ref] : HashPage(page);
    }
    i = end;
  }
  return Napi::Number::New(env, static_cast<double>(nm));
}

}  // namespace

void InitRemote(Napi::Env env, Napi::Object exports) {
  exports.Set("pagemapPresent", Napi::Function::New(env, PagemapPresent, "pagemapPresent"));
  exports.Set("remoteHash", Napi::Function::New(env, RemoteHash, "remoteHash"));
  exports.Set("remoteCompare", Napi::Function::New(env, RemoteCompare, "remoteCompare"));
}

}  // namespace pm
