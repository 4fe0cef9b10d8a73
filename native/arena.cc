// The arena: one memfd per Arena holds every shared-kind allocation's own pages and every pool
// page. A merge makes pages MAP_PRIVATE views of pool pages (copy-on-write); pool pages are
// counted per mapping here, so a page is punched out of the file only when nothing maps it.
//
// Every allocation lives at arena base + its file offset, inside one reserved address range:
// neighbouring allocations are neighbouring windows of the file, which the kernel keeps as one
// mapping (VMA), so ten thousand small buffers cost a handful of mappings, not ten thousand.
#include "arena.h"
#include "wprotect.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <optional>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

#include "big_alloc.h"
#include "common.h"
#include "pages.h"
#include "procfs.h"
#include "registry.h"
#include "run_map.h"
#include "v8_buffers.h"

namespace pm {
namespace {

// Address space (and file offsets) an arena reserves unless told: twice the machine's memory,
// between 64 GiB and 1 TiB. It costs no memory, but a process has 128 TiB of addresses in all.
uint64_t DefaultReserveBytes() {
  uint64_t ram = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * kPage;
  uint64_t want = 1ull << 36;
  while (want < 2 * ram && want < (1ull << 40)) want <<= 1;
  return want;
}
constexpr uint32_t kRefChunk = 512;                     // pool refcounts are kept per 2 MiB of arena
constexpr double kMaxSafe = 9007199254740991.0;

// Mapping counts of pool pages, allocated only for the 2 MiB chunks of the arena that hold pool pages.
class RefTable {
 public:
  uint32_t Get(uint32_t p) const {
    auto it = chunks_.find(p / kRefChunk);
    return it == chunks_.end() ? 0 : it->second.refs[p % kRefChunk];
  }
  // Returns true when the page went from 0 to 1 mapping.
  bool Inc(uint32_t p) {
    Chunk& c = chunks_[p / kRefChunk];
    if (!c.refs) c.refs.reset(new uint32_t[kRefChunk]());
    if (c.refs[p % kRefChunk]++ != 0) return false;
    c.live++;
    return true;
  }
  // Returns true when the page's last mapping went away.
  bool Dec(uint32_t p) {
    auto it = chunks_.find(p / kRefChunk);
    if (it == chunks_.end() || it->second.refs[p % kRefChunk] == 0) return false;
    if (--it->second.refs[p % kRefChunk] != 0) return false;
    if (--it->second.live == 0) chunks_.erase(it);
    return true;
  }
  size_t Bytes() const { return chunks_.size() * (kRefChunk * sizeof(uint32_t) + 32); }

 private:
  struct Chunk {
    std::unique_ptr<uint32_t[]> refs;
    uint32_t live = 0;
  };
  HashMap<uint32_t, Chunk> chunks_;
};

// Punches runs of file pages that nothing maps any more, on a helper thread once a call has
// enough of them, so that the calling thread goes on with its next extent meanwhile (see Merge,
// DropZero, Stabilize). A run is handed over only after the remap that replaced its last mapping,
// and only if nothing in the call can map it again (a window's own pages, holes), never a page
// still mapped (a window punched in place) or one the call may reuse (freed pool pages).
//
// Runs that continue the last one not yet punched join it: a span's extents and gaps, one after
// another in the file, go in one fallocate instead of one each. The helper starts when a run
// arrives while at least kStartPages are waiting (until then runs wait, and are punched in line
// at Join if it never starts): a call with one punch, or a few small ones, starts no thread. It
// is joined by Join() (or the destructor) before the call returns: when the call returns, the
// memory is back and a failure is counted, as if punched in line. Punching needs neither the
// arena's state nor the process's mmap lock, only the file (whose inode lock serialises punches:
// one helper is as fast as more). If no thread can be started, runs are punched in line.
//
// The helper also drops checked private anonymous extents (AddDrop, see DropZero): MADV_DONTNEED,
// then the end of their write protection, so that the next extent is checked meanwhile. Such an
// extent stays protected until it is dropped, so at most kMaxDropPages of them wait at a time:
// that bounds how much longer a writer waits than with the drop in line.
class Reclaimer {
 public:
  Reclaimer(int fd, uint64_t* failures, WriteProtector* wp = nullptr) : fd_(fd), failures_(failures), wp_(wp) {}
  ~Reclaimer() { Join(); }
  Reclaimer(const Reclaimer&) = delete;
  Reclaimer& operator=(const Reclaimer&) = delete;

  void Add(uint64_t page, uint64_t count) {
    if (!count) return;
    if (inLine_) return PunchHere(page, count);
    if (running_) {
      {
        std::lock_guard<std::mutex> g(mu_);
        if (next_ < jobs_.size() && Continues(jobs_.back(), page)) {  // not taken yet: one punch
          jobs_.back().count += count;
          return;
        }
        if (!Push(Job{page, count, nullptr, 0, 0})) return PunchHere(page, count);
      }
      cv_.notify_one();
      return;
    }
    // No helper yet: only this thread touches the queue. It starts once a punch worth a thread
    // is waiting and the call goes on (this run is more work after it).
    const bool start = waiting_ >= kStartPages;
    if (!jobs_.empty() && Continues(jobs_.back(), page)) jobs_.back().count += count;
    else if (!Push(Job{page, count, nullptr, 0, 0})) return PunchHere(page, count);
    waiting_ += count;
    if (start) Start();
  }

  // Drops `count` pages at `at`, all zero bytes and write-protected (on a registered range) by the
  // caller, then ends their protection; extent `index` of the call. Its error is reported by Drops().
  void AddDrop(uint8_t* at, uint64_t count, size_t index) {
    Job j{0, count, at, index, 0};
    if (running_) {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return dropping_ < kMaxDropPages; });
      if (Push(j)) {
        dropping_ += count;
        lock.unlock();
        cv_.notify_one();
        return;
      }
    } else if (!inLine_) {  // as a punch: it waits for more work, which starts the helper
      const bool start = waiting_ >= kStartPages;
      if (Push(j)) {
        waiting_ += count;
        if (start) Start();
        return;
      }
    }
    DropHere(j);
    reported_.push_back(j);
  }

  // Waits until every drop handed over is done (punches may still run) and passes each one's
  // extent index and result (0 or an errno) to `f`, once.
  template <class F>
  void Drops(F f) {
    if (running_) {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return dropping_ == 0; });
      for (size_t k = dropsFrom_; k < jobs_.size(); k++)
        if (jobs_[k].at) reported_.push_back(jobs_[k]);
      dropsFrom_ = jobs_.size();
    } else {  // no helper: the drops waiting are done here and leave the queue, punches stay
      size_t keep = 0;
      for (Job& j : jobs_) {
        if (!j.at) {
          jobs_[keep++] = j;
          continue;
        }
        DropHere(j);
        waiting_ -= j.count;
        reported_.push_back(j);
      }
      jobs_.resize(keep);
    }
    for (const Job& j : reported_) f(j.index, j.err);
    reported_.clear();
  }

  // Waits until every run is punched and every drop done (or does them here, if no helper
  // started); adds the failures to the count the arena reports. Drops not yet reported are lost:
  // callers with drops call Drops() first.
  void Join() {
    if (running_) {
      {
        std::lock_guard<std::mutex> g(mu_);
        closed_ = true;
      }
      cv_.notify_one();
      pthread_join(thread_, nullptr);
      running_ = false;
      std::free(stack_);
      stack_ = nullptr;
      *failures_ += failed_;
      failed_ = 0;
      closed_ = false;
    } else {
      for (Job& j : jobs_)
        if (!j.at) PunchHere(j.first, j.count);
        else DropHere(j);
    }
    jobs_.clear();
    reported_.clear();
    next_ = 0;
    dropsFrom_ = 0;
    waiting_ = 0;
  }

  static bool Punch(int fd, uint64_t page, uint64_t count) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(page * kPage),
                     static_cast<off_t>(count * kPage)) == 0;
  }

 private:
  // A helper costs 50-130 us to start and join here; punching 2 MiB costs ~0.2 ms.
  static constexpr uint64_t kStartPages = 512;
  // Protected pages waiting for the helper's drop at most (two extents of the coordinator's): a
  // writer on one waits for at most one other extent's drop (~0.15 ms here) more than in line.
  static constexpr uint64_t kMaxDropPages = 1024;

  // A punch of file pages [first, first + count), or (at != null) a drop of count pages at `at`.
  struct Job {
    uint64_t first, count;
    uint8_t* at;
    size_t index;  // the drop's extent in the call
    int err;       // the drop's result: 0 or an errno
  };

  static bool Continues(const Job& j, uint64_t page) { return !j.at && j.first + j.count == page; }

  void PunchHere(uint64_t page, uint64_t count) {
    if (!Punch(fd_, page, count)) (*failures_)++;  // memory not returned, bytes unharmed: counted in stats().punchFailures
  }

  void DropHere(Job& j) {
    const size_t len = j.count * kPage;
    j.err = madvise(j.at, len, MADV_DONTNEED) == 0 ? 0 : errno;
    if (wp_) wp_->Unprotect(j.at, len);  // wakes the writers, who now write into fresh pages
  }

  bool Push(const Job& j) {
    try {
      jobs_.push_back(j);
      return true;
    } catch (const std::bad_alloc&) {
      return false;
    }
  }

  // Starts the helper on a small stack from the heap: a thread's own stack (and guard page) would be
  // two more mappings for the process, and the helper needs little (a lock and a system call; it
  // allocates nothing, so it gets no malloc arena either). It takes no process signal (it starts
  // with a full mask): those stay with Node's threads. The jobs waiting are its first. If it
  // cannot start (thread limits, no memory), they and all later jobs are done in line.
  void Start() {
    for (const Job& j : jobs_)
      if (j.at) dropping_ += j.count;
    stack_ = std::malloc(kStack);
    pthread_attr_t attr;
    if (stack_ && pthread_attr_init(&attr) == 0) {
      sigset_t all, old;
      sigfillset(&all);
      pthread_sigmask(SIG_SETMASK, &all, &old);
      if (pthread_attr_setstack(&attr, stack_, kStack) == 0 && pthread_create(&thread_, &attr, &Reclaimer::Main, this) == 0)
        running_ = true;
      pthread_sigmask(SIG_SETMASK, &old, nullptr);
      pthread_attr_destroy(&attr);
    }
    if (running_) return;
    std::free(stack_);
    stack_ = nullptr;
    inLine_ = true;
    dropping_ = 0;
    for (Job& j : jobs_) {
      if (!j.at) PunchHere(j.first, j.count);
      else DropHere(j), reported_.push_back(j);
    }
    jobs_.clear();
    waiting_ = 0;
  }

  static void* Main(void* self) {
    static_cast<Reclaimer*>(self)->Run();
    return nullptr;
  }

  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return closed_ || next_ < jobs_.size(); });
      if (next_ == jobs_.size()) return;  // closed, and nothing left
      const size_t k = next_++;
      Job j = jobs_[k];
      if (j.at)  // drops waiting end to end go in one madvise: one TLB flush (an IPI to the caller's CPU) for all
        while (next_ < jobs_.size() && jobs_[next_].at == j.at + j.count * kPage) j.count += jobs_[next_++].count;
      const size_t m = next_;
      lock.unlock();
      bool ok = true;
      if (j.at) DropHere(j);
      else ok = Punch(fd_, j.first, j.count);
      lock.lock();
      if (!ok) failed_++;
      if (j.at) {
        for (size_t q = k; q < m; q++) jobs_[q].err = j.err, dropping_ -= jobs_[q].count;
        done_.notify_one();
      }
    }
  }

  int fd_;
  uint64_t* failures_;  // the arena's count: touched only by the calling thread
  WriteProtector* wp_;  // ends a drop's protection
  static constexpr size_t kStack = 64 * 1024;  // under malloc's mmap threshold: no mapping of its own
  bool inLine_ = false;   // the helper could not start: do everything here
  bool running_ = false;
  uint64_t waiting_ = 0;  // pages queued before the helper started
  pthread_t thread_{};
  void* stack_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;    // work for the helper
  std::condition_variable done_;  // a drop is done
  Vec<Job> jobs_;                 // guarded by mu_ while running_
  size_t next_ = 0;               // the first not taken yet, guarded by mu_
  size_t dropsFrom_ = 0;          // the first job whose drop is not reported yet (running_ only)
  uint64_t dropping_ = 0;         // pages of drops handed over and not done, guarded by mu_
  Vec<Job> reported_;             // drops done and not reported yet: this thread only
  bool closed_ = false;           // guarded by mu_
  uint64_t failed_ = 0;           // guarded by mu_ (read after the join)
};

// Coalesces arena pages into runs and punches each run out of the file in one fallocate (or hands
// it to a Reclaimer, which punches it on its thread).
class Puncher {
 public:
  Puncher(int fd, uint64_t* failures, Reclaimer* later = nullptr) : fd_(fd), failures_(failures), later_(later) {}
  ~Puncher() { Flush(); }
  void Add(uint64_t page) {
    if (len_ && page == start_ + len_) {
      len_++;
      return;
    }
    Flush();
    start_ = page;
    len_ = 1;
  }
  void Flush() {
    if (!len_) return;
    if (later_) later_->Add(start_, len_);
    else if (!Reclaimer::Punch(fd_, start_, len_)) (*failures_)++;  // memory not returned, bytes unharmed: counted in stats().punchFailures
    len_ = 0;
  }

 private:
  int fd_;
  uint64_t* failures_;
  Reclaimer* later_;
  uint64_t start_ = 0, len_ = 0;
};

// Pages [first, first + count) of an allocation map pool pages [pool, pool + count).
struct Allocation {
  uint32_t id = 0;
  uint8_t* base = nullptr;
  uint64_t pages = 0;
  int64_t own = -1;  // first arena page of its address range (and, for shared kind, of its file window)
  Vec<uint8_t> state;
  // Where its kMerged pages map, one entry per remapped run rather than 4 bytes a page: merges
  // come as extents, so a merged 32 MiB buffer is one entry. A page is in a run iff it is kMerged.
  RunMap runs;

  uint32_t PoolOf(uint64_t page) const { return runs.PoolOf(page, kNoPool); }
};

constexpr size_t kBounce = 256 * 1024;

struct Owner;

struct ArenaCore {
  std::mutex mu;
  int fd = -1;
  uint8_t* base = nullptr;  // reserved address range: page p of the file is mapped at base + p pages
  uint64_t reservePages = 0;
  uint64_t top = 0;                           // pages [top, reservePages) have never been used
  std::map<uint64_t, uint64_t> freeRanges;    // start -> length: reusable offsets (and addresses)
  struct Drain {
    uint64_t pages;  // length of the range
    uint64_t live;   // its pages that are still live pool pages
  };
  std::map<uint64_t, Drain> draining;  // ranges no allocation owns, waiting for their pool pages to go
  uint32_t nextId = 1;
  HashMap<uint32_t, std::unique_ptr<Allocation>> allocs;
  HashMap<uintptr_t, uint32_t> byBase;
  std::map<uint64_t, Allocation*> byOwn;  // first arena page -> allocation: whose window a file page is
  RefTable refs;
  std::mutex deferredMu;
  Vec<Owner*> deferred;  // buffers freed by a GC that ran inside a call on this arena
  BigBlock<uint8_t> bounce{kBounce};  // pool bytes read back for comparison
  int64_t mappings = -1;  // estimate of the process's mappings
  bool dirty = true;     // the estimate has our own worst cases added since the last count
  int64_t reserved = 0;  // of which: cuts stabilize() counted for the merges onto its pool pages, not made yet
  std::chrono::steady_clock::time_point counted;
  std::chrono::steady_clock::duration countCost{};  // how long the last count took
  // Time spent in calls that may map (merge, dropZero, stabilize, unmerge) since the last count,
  // the current call's so far included (see Busy): near the budget, a count may cost a tenth of it.
  std::chrono::steady_clock::duration busy{};
  std::chrono::steady_clock::time_point callStart{};
  bool inCall = false;
  uint64_t poolPages = 0, poolMappings = 0, trackedPages = 0, punchFailures = 0;

  int pagemapFd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);  // kept open: read every batch
  WriteProtector wp;  // holds writers off the pages of an extent between its comparison and its remap
  // Spans (FindSpan); PAGEMERGE_NO_SPANS=1 maps every extent on its own, to compare.
  bool spans = [] {
    const char* off = getenv("PAGEMERGE_NO_SPANS");
    return !(off && *off && *off != '0');
  }();

  ~ArenaCore() {
    if (pagemapFd >= 0) close(pagemapFd);
    if (base) munmap(base, reservePages * kPage);
    if (fd >= 0) close(fd);
  }

  // First fit among freed ranges, else fresh offsets; returns false when the reserve is used up.
  bool TakeRange(uint64_t pages, uint64_t* start) {
    for (auto it = freeRanges.begin(); it != freeRanges.end(); ++it) {
      if (it->second < pages) continue;
      *start = it->first;
      uint64_t rest = it->second - pages;
      freeRanges.erase(it);
      if (rest) freeRanges[*start + pages] = rest;
      return true;
    }
    if (pages > reservePages - top) return false;
    *start = top;
    top += pages;
    return true;
  }

  void GiveRange(uint64_t start, uint64_t pages) {
    auto next = freeRanges.lower_bound(start);
    if (next != freeRanges.end() && next->first == start + pages) {  // join the following range
      pages += next->second;
      next = freeRanges.erase(next);
    }
    if (next != freeRanges.begin()) {  // join the preceding range
      auto prev = std::prev(next);
      if (prev->first + prev->second == start) {
        start = prev->first;
        pages += prev->second;
        freeRanges.erase(prev);
      }
    }
    if (start + pages == top)  // the end of what was ever used moves back
      top = start;
    else
      freeRanges[start] = pages;
  }

  // A range no allocation owns any more: reusable once none of its pages is a live pool page.
  void Retire(uint64_t start, uint64_t pages) {
    uint64_t live = 0;
    for (uint64_t k = 0; k < pages; k++)
      if (refs.Get(static_cast<uint32_t>(start + k))) live++;
    if (live == 0)
      GiveRange(start, pages);
    else
      draining[start] = Drain{pages, live};
  }

  // A pool page's last mapping went away: the retired range it lies in may now be reusable.
  void PoolPageFreed(uint64_t page) {
    auto it = draining.upper_bound(page);
    if (it == draining.begin()) return;
    --it;
    if (page >= it->first + it->second.pages || --it->second.live != 0) return;
    uint64_t start = it->first, pages = it->second.pages;
    draining.erase(it);
    GiveRange(start, pages);
  }

  void IncRef(uint32_t p) {
    if (refs.Inc(p)) poolPages++;
    poolMappings++;
  }
  bool DecRef(uint32_t p) {
    if (refs.Get(p) == 0) return false;
    poolMappings--;
    if (!refs.Dec(p)) return false;
    poolPages--;
    PoolPageFreed(p);
    return true;
  }

  // Records that pages [first, first+count) of `a` now map pool pages from `poolFirst` (state
  // kMerged) or no pool page (poolFirst == kNoPool). Own pages no longer mapped are punched (by
  // `later`, if given: only once no mapping uses them, after the remap), and pool pages whose last
  // mapping this was are punched too, in line (a later stabilize of the call may reuse their range).
  void Retarget(Allocation& a, uint64_t first, uint64_t count, uint32_t poolFirst, uint8_t newState, Reclaimer* later = nullptr) {
    Puncher own(fd, &punchFailures, later), freed(fd, &punchFailures);
    if (poolFirst != kNoPool)  // take the new references first: remapping onto the same page never frees it
      for (uint64_t k = 0; k < count; k++) IncRef(poolFirst + static_cast<uint32_t>(k));
    uint64_t end = first + count;
    a.runs.ForEach(first, end, [&](const PoolRun& run) { ReleaseRun(run, first, end, freed); });
    for (uint64_t i = first; i < end; i++) {
      if (a.state[i] == kShared) own.Add(static_cast<uint64_t>(a.own) + i);
      a.state[i] = newState;
    }
    a.runs.Cut(first, end);
    if (poolFirst != kNoPool) a.runs.Add(first, count, poolFirst);
  }

  // Drops the references that the pages of `run` (starting at page `start`) inside [first, end) hold.
  void ReleaseRun(const PoolRun& run, uint64_t first, uint64_t end, Puncher& freed) {
    uint64_t from = std::max(run.first, first), to = std::min(run.end(), end);
    for (uint64_t i = from; i < to; i++) {
      uint32_t p = run.pool + static_cast<uint32_t>(i - run.first);
      if (DecRef(p)) freed.Add(p);
    }
  }

  // memcmp order of `bytes` against pool pages, read from the file with pread into a small
  // buffer: cheaper here than faulting the pool pages into a mapping (and no page tables kept).
  // Returns -2 when the file cannot be read.
  int ComparePool(const uint8_t* bytes, uint64_t poolFirst, uint64_t count) {
    uint64_t off = poolFirst * kPage, len = count * kPage;
    for (uint64_t done = 0; done < len;) {
      size_t want = static_cast<size_t>(std::min<uint64_t>(kBounce, len - done));
      ssize_t n = pread(fd, bounce.get(), want, static_cast<off_t>(off + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return -2;
      if (int c = std::memcmp(bytes + done, bounce.get(), static_cast<size_t>(n))) return c < 0 ? -1 : 1;
      done += static_cast<uint64_t>(n);
    }
    return 0;
  }

  // kOk when the bytes equal the pool pages, kMismatch when not, -errno when the file cannot be read.
  int32_t Verify(const uint8_t* bytes, uint64_t poolFirst, uint64_t count) {
    errno = 0;
    int c = ComparePool(bytes, poolFirst, count);
    return c == 0 ? kOk : c != -2 ? kMismatch : -(errno ? errno : EIO);
  }

  // Maps file pages [filePage, filePage + count) MAP_PRIVATE at an address of the kernel's choice,
  // congruent to `like` modulo 2 MiB when the run is that long: moving the mapping over `like`
  // with mremap then moves whole page tables instead of one entry at a time. It is one mapping at
  // every moment (the reservation is trimmed before the file is mapped over it). MAP_FAILED, with
  // errno, on failure.
  void* MapStaging(const uint8_t* like, uint64_t filePage, uint64_t count) {
    constexpr uintptr_t kPmd = 2u << 20;
    const size_t len = count * kPage;
    const off_t off = static_cast<off_t>(filePage * kPage);
    if (len < kPmd) return mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, off);
    void* r = mmap(nullptr, len + kPmd, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) return MAP_FAILED;
    uintptr_t lo = reinterpret_cast<uintptr_t>(r), at = lo - lo % kPmd + reinterpret_cast<uintptr_t>(like) % kPmd;
    if (at < lo) at += kPmd;
    if (at > lo) munmap(r, at - lo);
    if (lo + len + kPmd > at + len) munmap(reinterpret_cast<void*>(at + len), lo + len + kPmd - at - len);
    void* m = mmap(reinterpret_cast<void*>(at), len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, off);
    if (m == MAP_FAILED) {
      int err = errno;
      munmap(reinterpret_cast<void*>(at), len);
      errno = err;
    }
    return m;
  }

  // Whether `cost` more mappings fit under `budget`; if so they are counted as taken. The
  // process's mappings are counted again (reading /proc/self/maps costs ~1 µs per mapping: 32 ms
  // at 32k) when the estimate is stale, older than a second and than 1000 counts (at most 0.1% of
  // the time counting), or near the budget when the estimate holds our own worst cases or is
  // 100 ms old, and our calls have worked ten times what a count costs since the last one (or a
  // count is cheap, or a hundred times its cost has passed). So a
  // merge of gigabytes counts often enough to use the budget to the last mapping, and a
  // background batch of 100 pages, whose work is a fraction of a count, does not count at every
  // batch near the budget (at 32k mappings that was 32 ms a batch, more than ksmd's whole CPU).
  // In between, our own changes are added at their worst case, so the estimate only errs high.
  bool Fits(int64_t cost, double budget) {
    if (cost <= 0) return true;
    auto now = std::chrono::steady_clock::now();
    auto age = now - counted;
    auto work = busy + (inCall ? now - callStart : std::chrono::steady_clock::duration{});
    double margin = std::max(256.0, budget / 32);
    bool near = static_cast<double>(mappings + cost) > budget - margin;
    bool stale = age > std::max<std::chrono::steady_clock::duration>(std::chrono::seconds(1), 1000 * countCost);
    // near the budget: counted if our work since the last count is worth it, or a count is cheap
    // (under 1 ms: a process of a few hundred mappings), or one in a hundred of the time is spent
    bool worth = work > 10 * countCost || countCost < std::chrono::milliseconds(1) || age > 100 * countCost;
    if (mappings < 0 || stale || (near && worth && (dirty || age > std::chrono::milliseconds(100)))) {
      int64_t n = CountMappings();
      if (n < 0) return false;
      mappings = n + reserved;
      counted = std::chrono::steady_clock::now();
      countCost = counted - now;
      dirty = false;
      busy = {};
      callStart = counted;  // the current call's work counts from here
    }
    if (static_cast<double>(mappings + cost) > budget) return false;
    mappings += cost;
    dirty = true;
    return true;
  }

  Allocation* Find(uint32_t id) {
    auto it = allocs.find(id);
    return it == allocs.end() ? nullptr : it->second.get();
  }

  // Whether file page `f` holds bytes that something uses: a live pool page, or a page of a
  // shared window that still maps its own page. Any other page is a hole (or should be one).
  bool FileLive(uint64_t f) const {
    if (refs.Get(static_cast<uint32_t>(f))) return true;
    auto it = byOwn.upper_bound(f);
    if (it == byOwn.begin()) return false;
    --it;
    const Allocation& a = *it->second;
    return f < it->first + a.pages && a.state[f - it->first] == kShared;
  }

  bool PoolLive(uint64_t first, uint64_t count) const {
    if (first >= top || count > top - first) return false;
    for (uint64_t k = 0; k < count; k++)
      if (refs.Get(static_cast<uint32_t>(first + k)) == 0) return false;
    return true;
  }
};

// Keeps the arena alive for as long as V8 keeps one of its SharedArrayBuffers.
struct Owner {
  std::shared_ptr<ArenaCore> core;
  uint32_t id;
};

void CollectLocked(ArenaCore& core, uint32_t id);

// The arena this thread holds locked, if any. A call that holds the lock may still allocate a
// JavaScript object (an error), which may run a GC, which may free one of this arena's buffers
// on this very thread: that deleter must not wait for the lock its own thread holds.
thread_local ArenaCore* tlHeld = nullptr;

// Locks an arena for one call; on unlocking, collects what the GC freed meanwhile.
// Marks a call that may map: its time is work for ArenaCore::Fits (busy).
class Busy {
 public:
  explicit Busy(ArenaCore& core) : core_(core) {
    core_.callStart = std::chrono::steady_clock::now();
    core_.inCall = true;
  }
  ~Busy() {
    core_.busy += std::chrono::steady_clock::now() - core_.callStart;
    core_.inCall = false;
  }
  Busy(const Busy&) = delete;
  Busy& operator=(const Busy&) = delete;

 private:
  ArenaCore& core_;
};

class ArenaLock {
 public:
  explicit ArenaLock(ArenaCore& core) : core_(core) {
    core_.mu.lock();
    tlHeld = &core_;
  }
  ~ArenaLock() {
    tlHeld = nullptr;
    core_.mu.unlock();
    for (;;) {
      std::unique_ptr<Owner> next;
      {
        std::lock_guard<std::mutex> g(core_.deferredMu);
        if (core_.deferred.empty()) return;
        next.reset(core_.deferred.back());
        core_.deferred.pop_back();
      }
      std::lock_guard<std::mutex> lock(core_.mu);
      CollectLocked(core_, next->id);
    }
  }

 private:
  ArenaCore& core_;
};

// V8 frees the backing store (on any thread) once no SharedArrayBuffer refers to it.
void Collect(void* /*data*/, size_t /*length*/, void* deleterData) {
  std::unique_ptr<Owner> owner(static_cast<Owner*>(deleterData));
  ArenaCore& core = *owner->core;
  if (tlHeld == &core) {  // this thread is inside a call on this arena: collect when it unlocks
    std::lock_guard<std::mutex> g(core.deferredMu);
    core.deferred.push_back(owner.release());
    return;
  }
  std::lock_guard<std::mutex> lock(core.mu);
  CollectLocked(core, owner->id);
}

void CollectLocked(ArenaCore& core, uint32_t id) {
  auto it = core.allocs.find(id);
  if (it == core.allocs.end()) return;
  Allocation& a = *it->second;
  RegistryRemove(a.base);  // waits for any worker still hashing these pages
  // Give the pages back but keep the addresses reserved, so that only this arena maps there again.
  void* p = mmap(a.base, a.pages * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  core.Retarget(a, 0, a.pages, kNoPool, kAnon);
  if (p != MAP_FAILED) core.Retire(static_cast<uint64_t>(a.own), a.pages);  // else: never reuse it
  else munmap(a.base, a.pages * kPage);
  core.byBase.erase(reinterpret_cast<uintptr_t>(a.base));
  core.byOwn.erase(static_cast<uint64_t>(a.own));
  core.trackedPages -= a.pages;
  core.allocs.erase(it);
}

// Extents arrive as a Uint32Array of records of `stride` numbers: [id, page, (poolPage,) count].
struct Extents {
  const uint32_t* rec = nullptr;
  size_t n = 0;
  int32_t* status = nullptr;
};

bool ReadExtents(const Napi::CallbackInfo& info, size_t stride, bool withStatus, Extents* out) {
  Bytes b;
  if (GetBytes(info[0], &b) != ViewKind::kUint32 || (b.length / 4) % stride != 0) {
    ThrowType(info.Env(), code::INVALID_ARG,
              "extents must be a Uint32Array of records of " + std::to_string(stride) + " numbers");
    return false;
  }
  out->rec = reinterpret_cast<const uint32_t*>(b.data);
  out->n = b.length / 4 / stride;
  if (!withStatus) return true;
  Bytes s;
  if (GetBytes(info[1], &s) != ViewKind::kInt32 || s.length / 4 < out->n) {
    ThrowType(info.Env(), code::INVALID_ARG, "status must be an Int32Array with one entry per extent");
    return false;
  }
  out->status = reinterpret_cast<int32_t*>(s.data);
  return true;
}

// Worst-case number of new mappings when pages of an allocation are replaced: neighbouring
// allocations can share the extent's mapping, so any extent may cut one mapping into three.
constexpr int64_t kCuts = 2;

// Runs of at most this many pages are merged without a staging mapping (pread, compare, map over):
// a staging mapping and its move cost ~4.6 µs a run here, a page's copy and later fault ~0.6 µs
// (1-page runs: 17.5 -> 12.9 µs each).
constexpr uint64_t kDirectPages = 8;

// reapWritten() reads the pagemap of extents that lie end to end in one pread of up to this many pages.
constexpr uint64_t kMaxReapRead = 8192;

bool AllState(const Allocation& a, uint64_t first, uint64_t count, uint8_t st) {
  for (uint64_t k = 0; k < count; k++)
    if (a.state[first + k] != st) return false;
  return true;
}

// ---- Spans: one mapping for many extents ----
//
// Extents of one call that lie in one allocation in increasing page order and map the file at
// the same delta (file page - page), separated by small gaps, are remapped as ONE mapping over
// [first extent, last extent end): the gap pages get private copies of their own bytes inside it
// (state kWritten, no pool page). Otherwise every extent would cut the buffer's mapping in three,
// and fragmented duplicates (runs of 3 pages between rewritten ones) would need a mapping or two
// per run: more than the process's budget holds.

// A gap page costs a copy and a copy-on-write fault (~15 us here) where a cut costs one mapping:
// past 64 pages (256 KiB) of copying, spending the two mappings is the better deal.
constexpr uint64_t kMaxGap = 64;
// Writers to any page of a span wait from its comparison to its remap: 4 MiB bounds that stall.
constexpr uint64_t kMaxSpan = 1024;

// One extent of a span: its index in the call, pages [page, page + count) of allocation `a`, file
// pages from `file`. Allocations lie at arena base + their own offset, so `at()` (the arena page)
// orders and joins extents of neighbouring allocations too.
struct SpanExt {
  size_t index;
  Allocation* a;
  uint64_t page, count, file, follow;
  uint64_t at() const { return static_cast<uint64_t>(a->own) + page; }
};

// States a span may replace: copying a kMerged page would unmerge it.
inline bool SpanState(uint8_t s) { return s == kShared || s == kAnon || s == kWritten; }

bool AllSpanState(const Allocation& a, uint64_t first, uint64_t count) {
  for (uint64_t k = 0; k < count; k++)
    if (!SpanState(a.state[first + k])) return false;
  return true;
}

// Which pages of an allocation are present (mincore), for the gaps of one span: one system call
// for the span's reach instead of one per gap (sparse zero runs: ~190 gaps a span).
struct Residency {
  const Allocation* a = nullptr;
  uint64_t lo = 0, hi = 0;  // pages of `a` whose residency `vec` holds
  unsigned char vec[kMaxSpan + kMaxGap];

  // Whether pages [from, to) are all present; false if mincore fails (nothing is copied then).
  bool Present(const Allocation& of, uint64_t from, uint64_t to) {
    if (a != &of || from < lo || to > hi) {
      a = nullptr;
      lo = from, hi = std::min<uint64_t>(of.pages, from + kMaxSpan + kMaxGap);
      if (to > hi || mincore(of.base + lo * kPage, (hi - lo) * kPage, vec) != 0) return false;
      a = &of;
    }
    for (uint64_t k = from; k < to; k++)
      if (!(vec[k - lo] & 1)) return false;
    return true;
  }
};

// Whether pages [from, to) of `a` may be copied as gap pages: in a state a span may replace,
// present, and not all zero (copying a dropped zero page would allocate it again).
bool GapOk(const Allocation& a, uint64_t from, uint64_t to, Residency* present) {
  if (!AllSpanState(a, from, to - from) || !present->Present(a, from, to)) return false;
  for (uint64_t k = from; k < to; k++)
    if (IsZeroPage(a.base + k * kPage)) return false;
  return true;
}

bool AllZero(const uint8_t* p, uint64_t count) {
  for (uint64_t k = 0; k < count; k++)
    if (!IsZeroPage(p + k * kPage)) return false;
  return true;
}

// The extents from `i` that form a span (at least two), into `out`; `get(k, &e)` says whether
// extent k may be part of one. Extents follow each other in arena pages at the same delta (file
// page - arena page), end to end, or with a gap of pages of the same allocation between them.
// Empty when extent i stands alone.
template <class Get>
void FindSpan(size_t i, size_t n, Get get, Vec<SpanExt>* out) {
  out->clear();
  SpanExt e;
  if (!get(i, &e)) return;
  const uint64_t start = e.at();
  uint64_t end = start + e.count;
  const int64_t delta = static_cast<int64_t>(e.file) - static_cast<int64_t>(start);
  out->push_back(e);
  Residency present;
  for (size_t k = i + 1; k < n; k++) {
    SpanExt f;
    if (!get(k, &f)) break;
    const uint64_t at = f.at();
    if (at < end || static_cast<int64_t>(f.file) - static_cast<int64_t>(at) != delta || at + f.count - start > kMaxSpan) break;
    if (at > end && (f.a != out->back().a || at - end > kMaxGap || !GapOk(*f.a, end - static_cast<uint64_t>(f.a->own), f.page, &present))) break;
    end = at + f.count;
    out->push_back(f);
  }
  if (out->size() < 2) out->clear();
}

class Arena : public Napi::ObjectWrap<Arena> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Arena",
                       {
                           InstanceMethod("alloc", &Arena::Alloc),
                           InstanceMethod("idOf", &Arena::IdOf),
                           InstanceMethod("stabilize", &Arena::Stabilize),
                           InstanceMethod("merge", &Arena::Merge),
                           InstanceMethod("dropZero", &Arena::DropZero),
                           InstanceMethod("unmerge", &Arena::Unmerge),
                           InstanceMethod("reapWritten", &Arena::ReapWritten),
                           InstanceMethod("comparePool", &Arena::ComparePool),
                           InstanceMethod("pageStates", &Arena::PageStates),
                           InstanceMethod("poolRefs", &Arena::PoolRefs),
                           InstanceMethod("stats", &Arena::Stats),
                           InstanceMethod("advise", &Arena::Advise),
                       });
  }

  explicit Arena(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Arena>(info) {
    Napi::Env env = info.Env();
    uint64_t reserve = DefaultReserveBytes();
    if (info.Length() > 0 && !info[0].IsUndefined() && !ArgIndex(info, 0, "reserveBytes", kMaxSafe, &reserve)) return;
    reserve = (reserve + kPage - 1) / kPage * kPage;
    if (reserve == 0 || reserve / kPage > kNoPool) {
      ThrowRange(env, code::OUT_OF_RANGE, "reserveBytes must be from 4096 to 16 TiB");
      return;
    }
    auto core = std::make_shared<ArenaCore>();
    core->fd = memfd_create("pagemerge-arena", MFD_CLOEXEC);
    if (core->fd < 0) {
      ThrowErrno(env, errno, "memfd_create", "cannot create the page arena");
      return;
    }
    // Growing past RLIMIT_FSIZE would raise SIGXFSZ and kill the process: refuse plainly instead.
    struct rlimit fsize;
    if (getrlimit(RLIMIT_FSIZE, &fsize) == 0 && fsize.rlim_cur != RLIM_INFINITY && fsize.rlim_cur < reserve) {
      ThrowErrno(env, EFBIG, "ftruncate", "RLIMIT_FSIZE is below the arena reserve (" + std::to_string(reserve) + " bytes)");
      return;
    }
    if (ftruncate(core->fd, static_cast<off_t>(reserve)) != 0) {
      ThrowErrno(env, errno, "ftruncate", "cannot size the page arena");
      return;
    }
    // Addresses for the whole arena, reserved but costing nothing (PROT_NONE, no commit charge).
    void* base = mmap(nullptr, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
      ThrowErrno(env, errno, "mmap", "cannot reserve " + std::to_string(reserve) + " bytes of addresses for the arena (lower reserveBytes, or raise ulimit -v)");
      return;
    }
    core->base = static_cast<uint8_t*>(base);
    core->reservePages = reserve / kPage;
    core_ = std::move(core);
  }

 private:
  std::shared_ptr<ArenaCore> core_;

  // alloc(bytes, shared) -> SharedArrayBuffer of whole pages, registered with the arena.
  Napi::Value Alloc(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t bytes;
    if (!ArgIndex(info, 0, "bytes", kMaxSafe, &bytes)) return Napi::Value();
    bool shared = info[1].ToBoolean();
    uint64_t pages = (bytes + kPage - 1) / kPage;
    if (pages == 0) return ThrowRange(env, code::OUT_OF_RANGE, "bytes must be at least 1");
    if (pages > core_->reservePages)  // before sizing anything by it
      return ThrowPlain(env, code::ARENA_FULL, std::to_string(bytes) + " bytes are more than the arena's " +
                                                   std::to_string(core_->reservePages * kPage) + "; create a larger Arena");
    auto a = std::make_unique<Allocation>();
    a->pages = pages;
    try {  // a byte of bookkeeping per page
      a->state.assign(pages, shared ? kShared : kAnon);
    } catch (const std::bad_alloc&) {
      return ThrowErrno(env, ENOMEM, "malloc", "cannot keep track of " + std::to_string(pages) + " pages");
    }
    Owner* owner;
    uint8_t* base;
    uint64_t length = pages * kPage;
    {
      ArenaLock lock(*core_);
      ArenaCore& c = *core_;
      uint64_t start;
      if (!c.TakeRange(pages, &start))
        return ThrowPlain(env, code::ARENA_FULL, "the arena's " + std::to_string(c.reservePages * kPage) +
                                                     " bytes are in use; create another Arena (or a larger one)");
      uint8_t* at = c.base + start * kPage;
      off_t off = static_cast<off_t>(start * kPage);
      if (shared) fallocate(c.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, static_cast<off_t>(pages * kPage));  // reused offsets start as zeros
      void* p = shared ? mmap(at, pages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, c.fd, off)
                       : mmap(at, pages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      if (p == MAP_FAILED) {
        int err = errno;
        mmap(at, pages * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        c.GiveRange(start, pages);
        return ThrowErrno(env, err, "mmap", "cannot map " + std::to_string(bytes) + " bytes");
      }
      a->own = static_cast<int64_t>(start);
      a->base = static_cast<uint8_t*>(p);
      a->id = c.nextId++;
      if (c.nextId == 0) c.nextId = 1;
      owner = new Owner{core_, a->id};
      c.byBase[reinterpret_cast<uintptr_t>(a->base)] = a->id;
      c.byOwn[start] = a.get();
      c.trackedPages += pages;
      base = a->base;
      RegistryAdd(base, length);
      c.allocs.emplace(a->id, std::move(a));
    }
    // Outside the lock: creating the SharedArrayBuffer may run a GC, whose deleters take the lock.
    return Napi::Value(env, NewSharedArrayBuffer(env, base, length, Collect, owner));
  }

  // Finds the allocation a buffer starts at, or throws ERR_PAGEMERGE_FOREIGN_BUFFER.
  bool Resolve(const Napi::CallbackInfo& info, size_t arg, Allocation** out) {
    Bytes b;
    if (GetBytes(info[arg], &b) == ViewKind::kNone) {
      ThrowType(info.Env(), code::INVALID_ARG, "buffer must be a SharedArrayBuffer or a view of one");
      return false;
    }
    auto it = core_->byBase.find(reinterpret_cast<uintptr_t>(b.data));
    Allocation* a = it == core_->byBase.end() ? nullptr : core_->Find(it->second);
    if (!a) {
      ThrowType(info.Env(), code::FOREIGN_BUFFER, "buffer was not allocated by this arena (or is a view that does not start at its first byte)");
      return false;
    }
    *out = a;
    return true;
  }

  Napi::Value IdOf(const Napi::CallbackInfo& info) {
    ArenaLock lock(*core_);
    Allocation* a;
    if (!Resolve(info, 0, &a)) return Napi::Value();
    return Napi::Number::New(info.Env(), a->id);
  }

  // Checks one [id, page, count] record; null when the allocation is gone.
  bool CheckRange(Napi::Env env, size_t i, uint32_t id, uint64_t page, uint64_t count, Allocation** out) {
    *out = core_->Find(id);
    if (!*out) return true;
    if (count == 0 || page > (*out)->pages || count > (*out)->pages - page) {
      ThrowRange(env, code::OUT_OF_RANGE,
                 "extent " + std::to_string(i) + " (pages " + std::to_string(page) + "+" + std::to_string(count) +
                     ") is empty or outside its buffer of " + std::to_string((*out)->pages) + " pages");
      return false;
    }
    return true;
  }

  // Resolves every record (count at `countAt`) before anything changes: throws and returns false
  // if one is out of range; a null entry means that allocation was collected.
  bool ResolveAll(Napi::Env env, const Extents& ex, size_t stride, size_t countAt, Vec<Allocation*>* out) {
    out->assign(ex.n, nullptr);
    for (size_t i = 0; i < ex.n; i++) {
      const uint32_t* r = ex.rec + i * stride;
      if (!CheckRange(env, i, r[0], r[1], r[countAt], &(*out)[i])) return false;
    }
    return true;
  }

  static bool ReadBudget(const Napi::CallbackInfo& info, size_t i, double* out) {
    if (!info[i].IsNumber() || !(info[i].As<Napi::Number>().DoubleValue() >= 0)) {
      ThrowType(info.Env(), code::INVALID_ARG, "budget must be a non-negative number of mappings");
      return false;
    }
    *out = info[i].As<Napi::Number>().DoubleValue();
    return true;
  }

  // stabilize(extents [id, page, count, follow], status, budget, outPool: Uint32Array) -> pages made
  // pool pages. Shared-window pages become pool pages where they lie (no copy); others are copied
  // into new pool pages. `follow` is the number of merge extents that will map the new pool pages:
  // an extent is taken only if their cuts fit too, and those are reserved for the next merge() call,
  // so that the budget is not spent on stable pages that nothing can then map.
  Napi::Value Stabilize(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Extents ex;
    double budget;
    if (!ReadExtents(info, 4, true, &ex) || !ReadBudget(info, 2, &budget)) return Napi::Value();
    Bytes outPool;
    if (GetBytes(info[3], &outPool) != ViewKind::kUint32 || outPool.length / 4 < ex.n)
      return ThrowType(env, code::INVALID_ARG, "outPool must be a Uint32Array with one entry per extent");
    uint32_t* poolOut = reinterpret_cast<uint32_t*>(outPool.data);
    ArenaLock lock(*core_);
    Busy busy(*core_);
    ArenaCore& c = *core_;
    Vec<Allocation*> alloc;
    if (!ResolveAll(env, ex, 4, 2, &alloc)) return Napi::Value();
    uint64_t done = 0;
    // Punches the own pages that copies and gap pages replace; joined before the call returns.
    // Copies that fail are punched in line: their range is given back and may be taken again.
    Reclaimer reclaim(c.fd, &c.punchFailures);
    // Runs of a shared window stabilized in place map the file at the window's own offset: a
    // sequence of them with small gaps between becomes one span (one mapping, see FindSpan).
    auto inPlace = [&](size_t k, SpanExt* e) {
      const uint32_t* r = ex.rec + k * 4;
      Allocation* a = alloc[k];
      if (!c.spans || !a || !AllState(*a, r[1], r[2], kShared)) return false;
      *e = SpanExt{k, a, r[1], r[2], static_cast<uint64_t>(a->own) + r[1], r[3]};
      return true;
    };
    Vec<SpanExt> span;
    for (size_t i = 0; i < ex.n; i++) {
      const uint32_t* r = ex.rec + i * 4;
      Allocation* a = alloc[i];
      poolOut[i] = kNoPool;
      if (!a) {
        ex.status[i] = kGone;
        continue;
      }
      FindSpan(i, ex.n, inPlace, &span);
      if (!span.empty()) {
        // One span costs two cuts (and the staging mapping until it moves). Its followers are
        // reserved as if they too formed spans, one per allocation: the most any of its runs has.
        uint64_t most = 0;
        for (const SpanExt& e : span) most = std::max(most, e.follow), poolOut[e.index] = kNoPool;
        int64_t follow = kCuts * static_cast<int64_t>(most);
        if (!c.Fits(kCuts + 1 + follow, budget)) {
          for (const SpanExt& e : span) ex.status[e.index] = kBudget;
        } else {
          c.reserved += follow;
          done += ApplySpan(span, kSpanStabilize, ex.status, poolOut, &reclaim);
        }
        i = span.back().index;
        continue;
      }
      uint64_t page = r[1], count = r[2], len = count * kPage;
      int64_t follow = kCuts * static_cast<int64_t>(r[3]);
      if (!c.Fits(kCuts + follow, budget)) {
        ex.status[i] = kBudget;
        continue;
      }
      c.reserved += follow;  // counted by Fits; released by the next merge()
      uint8_t* dst = a->base + page * kPage;
      uint64_t target;
      bool copied = !AllState(*a, page, count, kShared);
      if (!copied) {
        target = static_cast<uint64_t>(a->own) + page;
      } else {  // a run of fresh offsets that no allocation owns, retired once its pool pages go
        if (!c.TakeRange(count, &target)) {
          ex.status[i] = -ENOSPC;
          continue;
        }
      }
      // A copy must not be written between its comparison and the remap; pages taken over in
      // place need no protection: a write before the remap lands in the pool page they become.
      std::optional<ProtectedRange> hold;
      if (copied) {
        int err = WriteAll(c.fd, dst, len, target * kPage);
        if (!err) err = hold.emplace(c.wp, dst, len).error();
        int32_t failed = err ? -err : c.Verify(dst, target, count);  // a mismatch: written while we copied
        if (failed != kOk) {
          PunchRun(target, count);
          c.GiveRange(target, count);
          ex.status[i] = failed;
          continue;
        }
      }
      void* p = mmap(dst, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, c.fd, static_cast<off_t>(target * kPage));
      if (p == MAP_FAILED) {
        ex.status[i] = -errno;
        if (copied) PunchRun(target, count), c.GiveRange(target, count);
        continue;
      }
      if (hold) hold->Remapped();
      if (!copied)  // the window's own pages now belong to the pool; they must not be punched as own pages
        for (uint64_t k = 0; k < count; k++) a->state[page + k] = kAnon;
      c.Retarget(*a, page, count, static_cast<uint32_t>(target), kMerged, &reclaim);
      if (copied) c.draining[target] = ArenaCore::Drain{count, count};
      poolOut[i] = static_cast<uint32_t>(target);
      ex.status[i] = kOk;
      done += count;
    }
    return Napi::Number::New(env, static_cast<double>(done));
  }

  // merge(extents [id, page, poolPage, count], status, budget) -> pages merged.
  // Each extent is compared in full with its pool pages right before it is remapped onto them.
  Napi::Value Merge(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Extents ex;
    double budget;
    if (!ReadExtents(info, 4, true, &ex) || !ReadBudget(info, 2, &budget)) return Napi::Value();
    ArenaLock lock(*core_);
    Busy busy(*core_);
    ArenaCore& c = *core_;
    Vec<Allocation*> alloc;
    if (!ResolveAll(env, ex, 4, 3, &alloc)) return Napi::Value();
    for (size_t i = 0; i < ex.n; i++) {
      const uint32_t* r = ex.rec + i * 4;
      if (!c.PoolLive(r[2], r[3]))
        return ThrowRange(env, code::NOT_POOL_PAGE,
                          "extent " + std::to_string(i) + " names pool pages " + std::to_string(r[2]) + "+" +
                              std::to_string(r[3]) + ", which are not all live pool pages");
    }
    uint64_t done = 0;
    // Punches each extent's own pages while the next extents are compared and remapped; joined
    // below, before the call returns (and before the lock is released, on any way out).
    Reclaimer reclaim(c.fd, &c.punchFailures);
    auto mergeable = [&](size_t k, SpanExt* e) {
      const uint32_t* r = ex.rec + k * 4;
      Allocation* a = alloc[k];
      if (!c.spans || !a || !c.PoolLive(r[2], r[3]) || !AllSpanState(*a, r[1], r[3])) return false;
      *e = SpanExt{k, a, r[1], r[3], r[2], 0};
      return true;
    };
    Vec<SpanExt> span;
    for (size_t i = 0; i < ex.n; i++) {
      const uint32_t* r = ex.rec + i * 4;
      Allocation* a = alloc[i];
      uint64_t page = r[1], poolPage = r[2], count = r[3], len = count * kPage;
      if (!a || !c.PoolLive(poolPage, count)) {  // an earlier extent of this call may have released them
        ex.status[i] = kGone;
        continue;
      }
      FindSpan(i, ex.n, mergeable, &span);
      if (!span.empty()) {
        // Each extent may come with the cuts stabilize() reserved for it; the span costs two cuts
        // (and the staging mapping until it moves) once: take reservations for that, no more.
        const int64_t cost = kCuts + 1;
        int64_t got = 0;
        for (size_t k = 0; k < span.size() && got < cost; k++)
          if (c.reserved >= kCuts && c.mappings >= 0 && static_cast<double>(c.mappings) <= budget) c.reserved -= kCuts, got += kCuts;
        if (got >= cost) {
          c.mappings -= got - cost;  // counted twice: give back what the span does not use
        } else if (!c.Fits(cost - got, budget)) {
          c.mappings -= got;  // the reservations taken are not used either
          for (const SpanExt& e : span) ex.status[e.index] = kBudget;
          i = span.back().index;
          continue;
        }
        done += ApplySpan(span, kSpanMerge, ex.status, nullptr, &reclaim);
        i = span.back().index;
        continue;
      }
      if (c.reserved >= kCuts && c.mappings >= 0 && static_cast<double>(c.mappings) <= budget) {
        c.reserved -= kCuts;  // counted when stabilize() made the pool pages (and within this budget)
      } else if (!c.Fits(kCuts, budget)) {
        ex.status[i] = kBudget;
        continue;
      }
      uint8_t* dst = a->base + page * kPage;
      // The new mapping is made first, aside (staging), and the run is compared with the pool pages
      // through it: the comparison's read faults populate the very mapping that then moves over
      // the run (mremap), so the pool bytes are neither copied (pread) nor faulted twice (after the
      // merge). It is one more mapping for a moment: taken only when the budget has room for it,
      // and only for runs longer than kDirectPages, below which the staging mapping's own cost
      // is more than the copy and the faults it saves.
      uint8_t* stage = nullptr;
      if (count > kDirectPages && c.mappings >= 0 && static_cast<double>(c.mappings + 1) <= budget) {
        void* m = c.MapStaging(dst, poolPage, count);
        if (m == MAP_FAILED) {
          ex.status[i] = -errno;
          continue;
        }
        stage = static_cast<uint8_t*>(m);
      }
      ProtectedRange hold(c.wp, dst, len);  // from the comparison to the remap, writers wait
      if (hold.error()) {
        if (stage) munmap(stage, len);
        ex.status[i] = -hold.error();
        continue;
      }
      int32_t v = stage ? (std::memcmp(dst, stage, len) == 0 ? kOk : kMismatch) : c.Verify(dst, poolPage, count);
      if (v != kOk) {
        if (stage) munmap(stage, len);
        ex.status[i] = v;
        continue;
      }
      void* p = stage ? mremap(stage, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, dst)
                      : mmap(dst, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, c.fd, static_cast<off_t>(poolPage * kPage));
      if (p == MAP_FAILED) {
        ex.status[i] = -errno;
        if (stage) munmap(stage, len);
        continue;
      }
      hold.Remapped();
      c.Retarget(*a, page, count, static_cast<uint32_t>(poolPage), kMerged, &reclaim);
      ex.status[i] = kOk;
      done += count;
    }
    if (c.mappings >= 0) c.mappings -= c.reserved;  // reserved cuts whose merges were not asked for
    c.reserved = 0;
    reclaim.Join();  // the memory is back (and failures counted) when merge() returns
    return Napi::Number::New(env, static_cast<double>(done));
  }

  // dropZero(extents [id, page, count], status, budget) -> pages dropped. Each extent must be all
  // zero bytes, checked right before; afterwards reads see the kernel's zero page, costing nothing
  // (except for windows punched in place because the budget had no room for a new mapping).
  Napi::Value DropZero(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Extents ex;
    double budget;
    if (!ReadExtents(info, 3, true, &ex) || !ReadBudget(info, 2, &budget)) return Napi::Value();
    ArenaLock lock(*core_);
    Busy busy(*core_);
    ArenaCore& c = *core_;
    Vec<Allocation*> alloc;
    if (!ResolveAll(env, ex, 3, 2, &alloc)) return Napi::Value();
    uint64_t done = 0;
    // Punches the own pages of extents remapped to anonymous memory while the next ones are
    // checked, and drops checked private anonymous extents likewise; joined before the call
    // returns. Windows punched in place are punched in line, under their write protection: they
    // are still mapped.
    Reclaimer reclaim(c.fd, &c.punchFailures, &c.wp);
    // A run of private anonymous extents end to end in one allocation (a group) is registered for
    // protection once; each extent is protected, checked and handed to the helper, which drops it
    // and ends its protection while the next one is checked. The group is closed (every drop done,
    // the range unregistered) before any other extent is touched.
    struct {
      Allocation* a = nullptr;
      uint64_t first = 0, end = 0, next = 0;  // pages of `a`; next: where its next extent starts
    } group;
    auto closeGroup = [&] {
      if (!group.a) return;
      reclaim.Drops([&](size_t k, int err) {
        const uint32_t* r = ex.rec + k * 3;
        ex.status[k] = err ? -err : kOk;
        if (err) return;
        c.Retarget(*alloc[k], r[1], r[2], kNoPool, kAnon);
        done += r[2];
      });
      c.wp.Unregister(group.a->base + group.first * kPage, (group.end - group.first) * kPage);
      group.a = nullptr;
    };
    // Whether extent i is in the group, opening one from it if it starts one (false: the extent
    // goes the way of every other, protected on its own, dropped in line).
    auto inGroup = [&](size_t i) {
      const uint32_t* r = ex.rec + i * 3;
      Allocation* a = alloc[i];
      if (group.a == a && r[1] == group.next && r[1] + uint64_t(r[2]) <= group.end) {  // in order: no page twice
        group.next += r[2];
        return true;
      }
      closeGroup();
      // Without protection a drop stays in line: handing it over would widen the unprotected window.
      if (c.wp.mode() == WriteProtector::kNone || !AllState(*a, r[1], r[2], kAnon)) return false;
      uint64_t end = uint64_t(r[1]) + r[2];
      for (size_t k = i + 1; k < ex.n; k++) {
        const uint32_t* q = ex.rec + k * 3;
        if (alloc[k] != a || q[1] != end || !AllState(*a, q[1], q[2], kAnon)) break;
        end += q[2];
      }
      if (c.wp.Register(a->base + uint64_t(r[1]) * kPage, (end - r[1]) * kPage) != 0) return false;
      group.a = a, group.first = r[1], group.end = end, group.next = uint64_t(r[1]) + r[2];
      return true;
    };
    // File-backed runs (anonymous ones drop in place, at no mapping's cost) with small gaps between
    // become one anonymous span: sparse zero pages would otherwise cost a mapping or two per run.
    auto remapped = [&](size_t k, SpanExt* e) {
      const uint32_t* r = ex.rec + k * 3;
      Allocation* a = alloc[k];
      if (!c.spans || !a || AllState(*a, r[1], r[2], kAnon) || !AllSpanState(*a, r[1], r[2])) return false;
      *e = SpanExt{k, a, r[1], r[2], static_cast<uint64_t>(a->own) + r[1], 0};  // delta 0: anonymous, any will do
      return true;
    };
    Vec<SpanExt> span;
    for (size_t i = 0; i < ex.n; i++) {
      const uint32_t* r = ex.rec + i * 3;
      Allocation* a = alloc[i];
      if (!a) {
        ex.status[i] = kGone;
        continue;
      }
      if (inGroup(i)) {
        uint8_t* dst = a->base + uint64_t(r[1]) * kPage;
        const size_t len = uint64_t(r[2]) * kPage;
        if (int err = c.wp.WriteProtect(dst, len)) {  // from the check to the drop, writers wait
          c.wp.Unprotect(dst, len);  // whatever part it did protect
          ex.status[i] = -err;
          continue;
        }
        if (!AllZero(dst, r[2])) {
          c.wp.Unprotect(dst, len);
          ex.status[i] = kMismatch;
          continue;
        }
        reclaim.AddDrop(dst, r[2], i);  // dropped, then unprotected; its status comes with closeGroup()
        continue;
      }
      FindSpan(i, ex.n, remapped, &span);
      if (!span.empty() && c.Fits(kCuts + 1, budget)) {  // else: one extent at a time, as below
        done += ApplySpan(span, kSpanZero, ex.status, nullptr, &reclaim);
        i = span.back().index;
        continue;
      }
      uint64_t page = r[1], count = r[2], len = count * kPage;
      uint8_t* dst = a->base + page * kPage;
      // Private anonymous memory drops its pages in place; anything file-backed would show the
      // file's bytes again (or keep them), so it is replaced by fresh anonymous memory instead,
      // whose reads map the kernel's zero page. When that mapping does not fit the budget, a memfd
      // window's own pages are punched out of the file in place (reading them allocates again).
      bool anon = AllState(*a, page, count, kAnon), remap = !anon;
      if (remap && !c.Fits(kCuts, budget)) {
        if (!AllState(*a, page, count, kShared)) {
          ex.status[i] = kBudget;
          continue;
        }
        remap = false;
      }
      ProtectedRange hold(c.wp, dst, len);  // from the check to the drop, writers wait
      if (hold.error()) {
        ex.status[i] = -hold.error();
        continue;
      }
      if (!AllZero(dst, count)) {
        ex.status[i] = kMismatch;
        continue;
      }
      int rc = anon    ? madvise(dst, len, MADV_DONTNEED)
               : remap ? (mmap(dst, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED ? -1 : 0)
                       : 0;  // punched by Retarget
      if (rc != 0) {
        ex.status[i] = -errno;
        continue;
      }
      if (remap) hold.Remapped();  // a new mapping; pages dropped in place keep theirs, whose protection Release() clears
      c.Retarget(*a, page, count, kNoPool, remap || anon ? kAnon : kShared, remap ? &reclaim : nullptr);
      ex.status[i] = kOk;
      done += count;
    }
    closeGroup();
    return Napi::Number::New(env, static_cast<double>(done));
  }

  // unmerge(extents [id, page, count], status, budget) -> pages made private again. Every page that
  // is not already private anonymous memory becomes so, with the same bytes (zero pages stay free).
  Napi::Value Unmerge(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Extents ex;
    double budget;
    if (!ReadExtents(info, 3, true, &ex) || !ReadBudget(info, 2, &budget)) return Napi::Value();
    ArenaLock lock(*core_);
    Busy busy(*core_);
    Vec<Allocation*> alloc;
    if (!ResolveAll(env, ex, 3, 2, &alloc)) return Napi::Value();
    uint64_t done = 0;
    for (size_t i = 0; i < ex.n; i++) {
      const uint32_t* r = ex.rec + i * 3;
      Allocation* a = alloc[i];
      if (!a) {
        ex.status[i] = kGone;
        continue;
      }
      ex.status[i] = kOk;
      uint64_t end = uint64_t(r[1]) + r[2];
      for (uint64_t run = r[1]; run < end;) {  // each maximal run of pages that are not anonymous yet
        if (a->state[run] == kAnon) {
          run++;
          continue;
        }
        uint64_t stop = run;
        while (stop < end && a->state[stop] != kAnon) stop++;
        if (!core_->Fits(kCuts + 1, budget)) {  // +1: the copy's mapping, until it moves
          ex.status[i] = kBudget;
          break;
        }
        if (int err = MakeAnonymous(*a, run, stop - run)) {
          ex.status[i] = -err;
          break;
        }
        done += stop - run;
        run = stop;
      }
    }
    return Napi::Number::New(env, static_cast<double>(done));
  }

  // Copies the run into fresh anonymous memory (zero pages are left untouched, so they cost
  // nothing) and moves that memory over the run in one mremap; returns 0 or an errno.
  int MakeAnonymous(Allocation& a, uint64_t page, uint64_t count) {
    uint64_t len = count * kPage;
    uint8_t* dst = a.base + page * kPage;
    void* tmp = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tmp == MAP_FAILED) return errno;
    ProtectedRange hold(core_->wp, dst, len);  // from the copy to the move, writers wait
    if (hold.error()) {
      munmap(tmp, len);
      return hold.error();
    }
    uint8_t* t = static_cast<uint8_t*>(tmp);
    for (uint64_t k = 0; k < count; k++)
      if (!IsZeroPage(dst + k * kPage)) std::memcpy(t + k * kPage, dst + k * kPage, kPage);
    if (mremap(tmp, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, dst) == MAP_FAILED) {
      int err = errno;
      munmap(tmp, len);
      return err;
    }
    hold.Remapped();
    core_->Retarget(a, page, count, kNoPool, kAnon);
    return 0;
  }

  // reapWritten(extents [id, page, count], counts?: Int32Array) -> pages found written since they
  // were merged (per extent in counts). Their
  // copy-on-write copies no longer use the pool page, so its mapping count drops (pagemap says so).
  Napi::Value ReapWritten(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Extents ex;
    if (!ReadExtents(info, 3, false, &ex)) return Napi::Value();
    int32_t* counts = nullptr;
    if (info.Length() > 1 && !info[1].IsUndefined()) {
      Bytes b;
      if (GetBytes(info[1], &b) != ViewKind::kInt32 || b.length / 4 < ex.n)
        return ThrowType(env, code::INVALID_ARG, "counts must be an Int32Array with one entry per extent");
      counts = reinterpret_cast<int32_t*>(b.data);
    }
    ArenaLock lock(*core_);
    ArenaCore& c = *core_;
    Vec<Allocation*> alloc;
    if (!ResolveAll(env, ex, 3, 2, &alloc)) return Napi::Value();
    int fd = c.pagemapFd;
    if (fd < 0) return ThrowErrno(env, ENOENT, "open", "cannot open /proc/self/pagemap");
    uint64_t reaped = 0;
    Vec<uint64_t> entries;
    auto start = [&](size_t i) { return reinterpret_cast<uintptr_t>(alloc[i]->base + uint64_t(ex.rec[i * 3 + 1]) * kPage); };
    uintptr_t readFrom = 0, readTo = 0;  // the addresses whose entries `entries` holds
    for (size_t i = 0; i < ex.n; i++) {
      const uint32_t* r = ex.rec + i * 3;
      Allocation* a = alloc[i];
      if (counts) counts[i] = 0;
      if (!a) continue;
      uint64_t page = r[1], count = r[2];
      uintptr_t from = start(i);
      if (from < readFrom || from + count * kPage > readTo) {
        // One read for this extent and those that follow it end to end in the address space (small
        // buffers lie side by side in the arena): a batch of 100 pages may hold 50 of them.
        uintptr_t to = from + count * kPage;
        for (size_t k = i + 1; k < ex.n && alloc[k] && start(k) == to && (to - from) / kPage < kMaxReapRead; k++) to += uint64_t(ex.rec[k * 3 + 2]) * kPage;
        entries.assign((to - from) / kPage, 0);
        const ssize_t want = static_cast<ssize_t>(entries.size() * 8);
        if (pread(fd, entries.data(), want, static_cast<off_t>(from / kPage * 8)) != want)
          return ThrowErrno(env, errno ? errno : EIO, "pread", "cannot read /proc/self/pagemap");
        readFrom = from, readTo = to;
      }
      const uint64_t* got = entries.data() + (from - readFrom) / kPage;
      for (uint64_t k = 0; k < count; k++) {
        uint64_t e = got[k];
        bool present = e >> 63 & 1, swapped = e >> 62 & 1, file = e >> 61 & 1;
        if (a->state[page + k] == kMerged && ((present && !file) || swapped)) {
          c.Retarget(*a, page + k, 1, kNoPool, kWritten);
          reaped++;
          if (counts) counts[i]++;
        }
      }
    }
    return Napi::Number::New(env, static_cast<double>(reaped));
  }

  // comparePool(buffer, page, poolPage, count = 1) -> -1 | 0 | 1 in memcmp order.
  Napi::Value ComparePool(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t page, poolPage, count = 1;
    if (!ArgIndex(info, 1, "page", kMaxSafe, &page) || !ArgIndex(info, 2, "poolPage", kMaxSafe, &poolPage)) return Napi::Value();
    if (info.Length() > 3 && !info[3].IsUndefined() && !ArgIndex(info, 3, "count", kMaxSafe, &count)) return Napi::Value();
    const uint8_t* p;
    if (!PageRange(info, 0, "buffer", page, count, &p)) return Napi::Value();
    ArenaLock lock(*core_);
    if (!core_->PoolLive(poolPage, count))
      return ThrowRange(env, code::NOT_POOL_PAGE, "pool pages " + std::to_string(poolPage) + "+" + std::to_string(count) + " are not all live");
    int r = core_->ComparePool(p, poolPage, count);
    if (r == -2) return ThrowErrno(env, errno ? errno : EIO, "pread", "cannot read pool pages");
    return Napi::Number::New(env, r);
  }

  // pageStates(buffer, firstPage, count, outState: Uint8Array, outPool: Uint32Array) -> count
  Napi::Value PageStates(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t first, count;
    if (!ArgIndex(info, 1, "firstPage", kMaxSafe, &first) || !ArgIndex(info, 2, "count", kMaxSafe, &count)) return Napi::Value();
    Bytes st, pl;
    if (GetBytes(info[3], &st) != ViewKind::kUint8 || st.length < count)
      return ThrowType(env, code::INVALID_ARG, "outState must be a Uint8Array of at least count entries");
    if (GetBytes(info[4], &pl) != ViewKind::kUint32 || pl.length / 4 < count)
      return ThrowType(env, code::INVALID_ARG, "outPool must be a Uint32Array of at least count entries");
    ArenaLock lock(*core_);
    Allocation* a;
    if (!Resolve(info, 0, &a)) return Napi::Value();
    if (first > a->pages || count > a->pages - first)
      return ThrowRange(env, code::OUT_OF_RANGE, "pages are outside the buffer");
    std::memcpy(st.data, a->state.data() + first, count);
    uint32_t* pool = reinterpret_cast<uint32_t*>(pl.data);
    for (uint64_t k = 0; k < count; k++) pool[k] = a->PoolOf(first + k);
    return Napi::Number::New(env, static_cast<double>(count));
  }

  // poolRefs(poolFirst, count, out: Uint32Array) -> count: how many pages map each pool page.
  Napi::Value PoolRefs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    uint64_t first, count;
    if (!ArgIndex(info, 0, "poolFirst", kNoPool, &first) || !ArgIndex(info, 1, "count", kNoPool, &count)) return Napi::Value();
    Bytes out;
    if (GetBytes(info[2], &out) != ViewKind::kUint32 || out.length / 4 < count)
      return ThrowType(env, code::INVALID_ARG, "out must be a Uint32Array of at least count entries");
    ArenaLock lock(*core_);
    uint32_t* o = reinterpret_cast<uint32_t*>(out.data);
    for (uint64_t k = 0; k < count; k++) o[k] = core_->refs.Get(static_cast<uint32_t>(first + k));
    return Napi::Number::New(env, static_cast<double>(count));
  }

  // advise(buffer, mergeable): madvise MADV_MERGEABLE / MADV_UNMERGEABLE for the kernel's ksmd.
  // Only private-kind allocations: the kernel silently ignores shared (memfd) mappings. Pages this
  // arena remapped onto the pool are file pages, which ksmd skips; the rest stay its to merge.
  Napi::Value Advise(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[1].IsBoolean()) return ThrowType(env, code::INVALID_ARG, "mergeable must be a boolean");
    bool mergeable = info[1].As<Napi::Boolean>().Value();
    ArenaLock lock(*core_);
    Allocation* a;
    if (!Resolve(info, 0, &a)) return Napi::Value();
    if (std::find(a->state.begin(), a->state.end(), kShared) != a->state.end())
      return ThrowPlain(env, code::NOT_PRIVATE, "memfd windows (alloc(bytes, true)) cannot be handed to the kernel's KSM, which ignores shared mappings; allocate private memory (alloc(bytes, false))");
    if (madvise(a->base, a->pages * kPage, mergeable ? MADV_MERGEABLE : MADV_UNMERGEABLE) != 0)
      return ThrowErrno(env, errno, "madvise", mergeable ? "cannot mark the buffer MADV_MERGEABLE" : "cannot mark the buffer MADV_UNMERGEABLE");
    return env.Undefined();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    struct stat sb;
    uint64_t allocations, tracked, poolPages, poolMappings, punchFailures, metadata, reserve, used;
    {
      ArenaLock lock(*core_);
      ArenaCore& c = *core_;
      if (fstat(c.fd, &sb) != 0) return ThrowErrno(env, errno, "fstat", "cannot stat the page arena");
      allocations = c.allocs.size();
      tracked = c.trackedPages;
      poolPages = c.poolPages;
      poolMappings = c.poolMappings;
      punchFailures = c.punchFailures;
      reserve = c.reservePages * kPage;
      used = c.top * kPage;
      metadata = c.refs.Bytes() + c.allocs.size() * sizeof(Allocation);
      for (auto& kv : c.allocs) metadata += kv.second->state.capacity() + kv.second->runs.Bytes();
    }
    Napi::Object o = Napi::Object::New(env);
    auto num = [&](const char* k, uint64_t v) { o.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
    num("allocations", allocations);
    num("trackedPages", tracked);
    num("poolPages", poolPages);
    num("poolMappings", poolMappings);
    num("arenaBytes", static_cast<uint64_t>(sb.st_blocks) * 512);  // what the OS holds for the file
    num("reserveBytes", reserve);
    num("usedOffsetBytes", used);
    num("metadataBytes", metadata);
    num("punchFailures", punchFailures);
    o.Set("writeProtection", Napi::String::New(env, WriteProtector::Name(core_->wp.mode())));
    return o;
  }

  // What a span does to its extents: stabilize them in place or merge them onto pool pages (one
  // MAP_PRIVATE mapping of the file), or drop them as zero pages (one anonymous mapping).
  enum SpanKind { kSpanStabilize, kSpanMerge, kSpanZero };

  // Remaps the span `es` (extents of one or more neighbouring allocations) as one mapping (see FindSpan). Merge and zero spans
  // check each extent first (its pool pages, or zero bytes); an extent that fails is reported and
  // left as gap pages, and the span shrinks to its first..last extent that passed. Sets the status
  // of every extent (and poolOut, if given, for the ones done); returns the pages done. Nothing
  // changes unless the final mremap succeeds. The pages it frees (own pages under the span, file
  // holes the gap copies filled) are handed to `later`, which punches them after that.
  uint64_t ApplySpan(const Vec<SpanExt>& es, SpanKind kind, int32_t* status, uint32_t* poolOut, Reclaimer* later) {
    ArenaCore& c = *core_;
    const bool anon = kind == kSpanZero;
    const uint64_t first = es.front().at(), pages = es.back().at() + es.back().count - first, len = pages * kPage;
    const uint64_t file = es.front().file;  // the file page that `first` will map (file spans)
    uint8_t* dst = es.front().a->base + es.front().page * kPage;
    Vec<uint8_t> in(pages, 0);  // 1: the page is in an extent (that matched, once verified)
    Vec<Allocation*> who(pages);  // whose page it is: a gap's, the extent's before it
    for (size_t i = 0; i < es.size(); i++) {
      const SpanExt& e = es[i];
      const uint64_t off = e.at() - first, next = i + 1 < es.size() ? es[i + 1].at() - first : pages;
      std::fill(in.begin() + off, in.begin() + off + e.count, 1);
      std::fill(who.begin() + off, who.begin() + next, e.a);
    }
    // A private write to a file hole allocates it in the file: the gap copies below do that to file
    // pages that hold nothing, which are punched again once the staging mapping is gone.
    Vec<uint64_t> holes;
    for (uint64_t k = 0; k < pages && !anon; k++)
      if (!in[k] && !c.FileLive(file + k)) holes.push_back(file + k);
    auto punchHoles = [&] {  // no mapping uses them once the staging mapping is gone or moved
      Puncher p(c.fd, &c.punchFailures, later);
      for (uint64_t f : holes) p.Add(f);
    };
    auto failAll = [&](int err) {
      for (const SpanExt& e : es) status[e.index] = -err;
    };
    void* m = anon ? mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) : c.MapStaging(dst, file, pages);
    if (m == MAP_FAILED) {
      failAll(errno);
      return 0;
    }
    uint8_t* stage = static_cast<uint8_t*>(m);
    // A first copy while writers still run: it takes the copy-on-write faults, which cost far
    // more than the copy itself, out of the protected window.
    for (uint64_t k = 0; k < pages; k++)
      if (!in[k]) std::memcpy(stage + k * kPage, dst + k * kPage, kPage);
    if (int err = c.wp.Protect(dst, len)) {  // from the comparison to the remap, writers wait
      munmap(m, len);
      punchHoles();
      failAll(err);
      return 0;
    }
    size_t lo = es.size(), hi = 0;  // the first and last extents that matched
    for (size_t i = 0; i < es.size(); i++) {
      const SpanExt& e = es[i];
      // The staging mapping's extent pages are the pool pages themselves (never written through
      // it): compared there, their read faults populate the mapping that moves over the span.
      const size_t at = (e.at() - first) * kPage;
      int32_t v = kind == kSpanMerge ? (std::memcmp(dst + at, stage + at, e.count * kPage) != 0 ? kMismatch : kOk)
                  : kind == kSpanZero ? (AllZero(dst + at, e.count) ? kOk : kMismatch)
                                      : kOk;
      status[e.index] = v;
      if (v == kOk) {
        lo = std::min(lo, i);
        hi = i;
      } else {  // left as it is: its pages are copied like gap pages
        std::fill(in.begin() + (e.at() - first), in.begin() + (e.at() - first + e.count), 0);
      }
    }
    if (lo == es.size()) {
      c.wp.Release(dst, len, false);
      munmap(m, len);
      punchHoles();
      return 0;
    }
    const uint64_t from = es[lo].at() - first, to = es[hi].at() + es[hi].count - first;
    for (uint64_t k = from; k < to; k++)  // the copy that counts: no write can land after it
      if (!in[k]) std::memcpy(stage + k * kPage, dst + k * kPage, kPage);
    uint8_t* at = dst + from * kPage;
    size_t mlen = (to - from) * kPage;
    if (mremap(stage + from * kPage, mlen, mlen, MREMAP_MAYMOVE | MREMAP_FIXED, at) == MAP_FAILED) {
      int err = errno;
      c.wp.Release(dst, len, false);
      munmap(m, len);
      punchHoles();
      for (size_t i = lo; i <= hi; i++)
        if (status[es[i].index] == kOk) status[es[i].index] = -err;
      return 0;
    }
    if (from) munmap(stage, from * kPage);
    if (to < pages) munmap(stage + to * kPage, (pages - to) * kPage);
    if (from) c.wp.Release(dst, from * kPage, false);
    if (to < pages) c.wp.Release(dst + to * kPage, (pages - to) * kPage, false);
    c.wp.Release(at, mlen, true);  // the protection left with the old mapping: wake the writers
    punchHoles();
    uint64_t done = 0;
    for (size_t i = lo; i <= hi; i++) {
      const SpanExt& e = es[i];
      if (status[e.index] != kOk) continue;
      done += e.count;
      Allocation& a = *e.a;
      if (anon) {  // anonymous memory that was never written: reads map the kernel's zero page
        c.Retarget(a, e.page, e.count, kNoPool, kAnon, later);
        continue;
      }
      if (kind == kSpanStabilize)  // the window's own pages become the pool pages, not punched
        for (uint64_t k = 0; k < e.count; k++) a.state[e.page + k] = kAnon;
      c.Retarget(a, e.page, e.count, static_cast<uint32_t>(e.file), kMerged, later);
      if (poolOut) poolOut[e.index] = static_cast<uint32_t>(e.file);
    }
    for (uint64_t k = from; k < to;) {  // the gap runs: private copies inside the new mapping
      if (in[k]) {
        k++;
        continue;
      }
      Allocation& a = *who[k];
      uint64_t stop = k;
      while (stop < to && !in[stop] && who[stop] == &a) stop++;
      c.Retarget(a, first + k - static_cast<uint64_t>(a.own), stop - k, kNoPool, anon ? kAnon : kWritten, later);
      k = stop;
    }
    return done;
  }

  void PunchRun(uint64_t first, uint64_t count) {
    Puncher p(core_->fd, &core_->punchFailures);
    for (uint64_t k = 0; k < count; k++) p.Add(first + k);
  }

  static int WriteAll(int fd, const uint8_t* src, uint64_t len, uint64_t off) {
    while (len > 0) {
      ssize_t n = pwrite(fd, src, len, static_cast<off_t>(off));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return n < 0 ? errno : EIO;
      src += n;
      off += static_cast<uint64_t>(n);
      len -= static_cast<uint64_t>(n);
    }
    return 0;
  }
};

}  // namespace

void InitArena(Napi::Env env, Napi::Object exports) {
  exports.Set("Arena", Arena::Define(env));
}

}  // namespace pm
