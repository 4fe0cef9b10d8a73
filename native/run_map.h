// Where an allocation's merged pages map: runs of consecutive pages onto consecutive pool pages,
// ordered by first page. 16 bytes a run, in blocks of up to kBlockRuns: a std::map spent a 64-byte
// node per run, and a buffer merged page by page (scattered contents) has a run per page, so
// its tree cost 4 bytes per tracked page and a MiB of C heap in a 1 GiB merge. Blocks keep an
// insert or a cut in the middle to a copy within one block, and grow as runs come: a buffer
// merged whole (one run) costs one small block.
#pragma once
#include <algorithm>
#include <cstdint>

#include "big_alloc.h"

namespace pm {

struct PoolRun {
  uint64_t first;  // first page of the run, in its allocation
  uint32_t count;
  uint32_t pool;  // the pool page its first page maps
  uint64_t end() const { return first + count; }
};

class RunMap {
 public:
  static constexpr size_t kBlockRuns = 256;

  // The pool page that `page` maps, or `none`.
  uint32_t PoolOf(uint64_t page, uint32_t none) const {
    Pos p = FirstEndingAfter(page);
    if (p.b == blocks_.size()) return none;
    const PoolRun& r = blocks_[p.b][p.i];
    return r.first <= page ? r.pool + static_cast<uint32_t>(page - r.first) : none;
  }

  // fn(run) for each run with pages in [first, end), in order; fn must not change the map.
  template <class F>
  void ForEach(uint64_t first, uint64_t end, F fn) const {
    for (Pos p = FirstEndingAfter(first); p.b < blocks_.size(); p = {p.b + 1, 0}) {
      const Vec<PoolRun>& k = blocks_[p.b];
      for (size_t i = p.i; i < k.size(); i++) {
        if (k[i].first >= end) return;
        fn(k[i]);
      }
    }
  }

  // Removes pages [first, end), keeping the parts of the runs that straddle either end.
  void Cut(uint64_t first, uint64_t end) {
    if (first >= end) return;
    PoolRun keep[2];  // only the first run cut can start before `first`, only the last end after `end`
    int kept = 0;
    Pos p = FirstEndingAfter(first);
    while (p.b < blocks_.size()) {
      Vec<PoolRun>& k = blocks_[p.b];
      size_t j = p.i;
      for (; j < k.size() && k[j].first < end; j++) {
        const PoolRun& r = k[j];
        if (r.first < first) keep[kept++] = PoolRun{r.first, static_cast<uint32_t>(first - r.first), r.pool};
        if (r.end() > end) keep[kept++] = PoolRun{end, static_cast<uint32_t>(r.end() - end), r.pool + static_cast<uint32_t>(end - r.first)};
      }
      const bool last = j < k.size();  // a run at or past `end` is left in this block
      k.erase(k.begin() + static_cast<std::ptrdiff_t>(p.i), k.begin() + static_cast<std::ptrdiff_t>(j));
      size_ -= j - p.i;
      if (k.empty()) blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(p.b));  // the next block takes its index
      else p.b++;
      if (last) break;
      p.i = 0;
    }
    for (int m = 0; m < kept; m++) InsertAt(FirstEndingAfter(keep[m].first), keep[m]);
  }

  // Records that pages [first, first + count), in no run (Cut first), map pool pages from `pool`:
  // the run before them grows instead when they continue it.
  void Add(uint64_t first, uint64_t count, uint32_t pool) {
    while (count > 0) {  // a run counts at most 2^32 - 1 pages
      const uint32_t take = static_cast<uint32_t>(std::min<uint64_t>(count, UINT32_MAX));
      const Pos p = FirstEndingAfter(first);
      PoolRun* before = p.i > 0 ? &blocks_[p.b][p.i - 1] : p.b > 0 ? &blocks_[p.b - 1].back() : nullptr;
      if (before && before->end() == first && before->pool + before->count == pool && before->count <= UINT32_MAX - take)
        before->count += take;
      else
        InsertAt(p, PoolRun{first, take, pool});
      first += take, pool += take, count -= take;
    }
  }

  size_t size() const { return size_; }
  size_t Bytes() const {
    size_t bytes = blocks_.capacity() * sizeof(Vec<PoolRun>);
    for (const Vec<PoolRun>& k : blocks_) bytes += k.capacity() * sizeof(PoolRun);
    return bytes;
  }

 private:
  // A run: block b, index i (i < its size), or the end: b == blocks_.size().
  struct Pos {
    size_t b;
    size_t i;
  };

  // The first run that ends after `page` (runs are disjoint and sorted, so their ends are too).
  Pos FirstEndingAfter(uint64_t page) const {
    // the last block whose first run starts at or before `page` (no block is empty); the runs of
    // the blocks before it end at or before that run's start
    size_t lo = 0, hi = blocks_.size();
    while (lo < hi) {
      const size_t mid = (lo + hi) / 2;
      if (blocks_[mid][0].first <= page) lo = mid + 1;
      else hi = mid;
    }
    const size_t b = lo == 0 ? 0 : lo - 1;
    if (b == blocks_.size()) return {b, 0};
    const Vec<PoolRun>& k = blocks_[b];
    const size_t i = static_cast<size_t>(std::partition_point(k.begin(), k.end(), [&](const PoolRun& r) { return r.end() <= page; }) - k.begin());
    return i < k.size() ? Pos{b, i} : Pos{b + 1, 0};  // the next block's first run starts after `page`
  }

  // Inserts `run` before position p (which must keep the order). Blocks grow as runs come (a
  // buffer merged whole is one run: one small block), up to kBlockRuns.
  void InsertAt(Pos p, const PoolRun& run) {
    if (p.b == blocks_.size()) {  // at the end: into the last block, or a new one when it is full
      if (blocks_.empty() || blocks_.back().size() == kBlockRuns) blocks_.emplace_back();
      p = {blocks_.size() - 1, blocks_.back().size()};
    } else if (blocks_[p.b].size() == kBlockRuns) {  // full: split it in halves
      constexpr size_t h = kBlockRuns / 2;
      Vec<PoolRun>& k = blocks_[p.b];
      Vec<PoolRun> second(k.begin() + h, k.end());
      k.resize(h);
      blocks_.insert(blocks_.begin() + static_cast<std::ptrdiff_t>(p.b) + 1, std::move(second));
      if (p.i > h) p = {p.b + 1, p.i - h};
    }
    Vec<PoolRun>& k = blocks_[p.b];
    k.insert(k.begin() + static_cast<std::ptrdiff_t>(p.i), run);
    size_++;
  }

  Vec<Vec<PoolRun>> blocks_;
  size_t size_ = 0;
};

}  // namespace pm
