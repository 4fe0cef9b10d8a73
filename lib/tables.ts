/**
 * KSM's two indexes, as open-addressing hash tables over SharedArrayBuffer typed arrays.
 *
 * The kernel orders its trees by page content because it has no hash; we hash every page
 * anyway, so a table keyed by the 64-bit hash finds a page in O(1) instead of O(log n) node
 * visits, which at 262,144 pages per GiB is the difference between milliseconds and a large
 * share of a merge. Like the kernel's colour-balanced unstable tree, a table is unharmed when a
 * key changes under it (the entry is merely stale), and a hash hit is only a candidate: bytes
 * are compared in full before any merge. Equal hashes of different bytes simply sit in the same
 * probe run.
 */
import { probeStart, type StableView } from './protocol'

const EMPTY = 0

function sabInt32(n: number): Int32Array {
  return new Int32Array(new SharedArrayBuffer(n * 4))
}
function sabUint32(n: number): Uint32Array {
  return new Uint32Array(new SharedArrayBuffer(n * 4))
}

/** Smallest power of two ≥ 2n (load factor ≤ 1/2), at least 1024. */
function tableSize(n: number): number {
  let size = 1024
  while (size < 2 * n) size *= 2
  return size
}

/** The stable pages: one node per pool page that pages are merged onto. */
export class StableNodes {
  hashLo = sabUint32(1024)
  hashHi = sabUint32(1024)
  domain = sabUint32(1024)
  pool = sabUint32(1024)
  sharers = sabUint32(1024)
  /** Next node in a chain of dups with the same content (maxPageSharing), or -1. */
  nextDup = sabInt32(1024)
  /** Table of chain heads: node + 1, or 0. */
  table = sabInt32(tableSize(1024))
  /** Nodes in use. */
  live = 0
  private free: number[] = []
  private top = 0

  get capacity(): number {
    return this.hashLo.length
  }

  view(): StableView {
    return {
      table: this.table.buffer as SharedArrayBuffer,
      hashLo: this.hashLo.buffer as SharedArrayBuffer,
      hashHi: this.hashHi.buffer as SharedArrayBuffer,
      domain: this.domain.buffer as SharedArrayBuffer,
    }
  }

  /** A new node, not yet in the table. */
  create(lo: number, hi: number, domain: number, pool: number): number {
    const n = this.free.length ? this.free.pop()! : this.top++
    if (n >= this.capacity) this.grow(this.capacity * 2)
    this.hashLo[n] = lo
    this.hashHi[n] = hi
    this.domain[n] = domain
    this.pool[n] = pool
    this.sharers[n] = 0
    this.nextDup[n] = -1
    this.live++
    return n
  }

  /** Finds the chain head for (hash, domain), or -1. */
  find(lo: number, hi: number, domain: number): number {
    const mask = this.table.length - 1
    for (let p = probeStart(lo, domain, mask); ; p = (p + 1) & mask) {
      const e = this.table[p]!
      if (e === EMPTY) return -1
      const n = e - 1
      if (this.hashLo[n] === lo && this.hashHi[n] === hi && this.domain[n] === domain) return n
    }
  }

  /** Makes `node` the head for its key; the caller knows no head exists. */
  insertHead(node: number): void {
    if (2 * (this.live + 1) > this.table.length) this.rehash(tableSize(this.capacity))
    const mask = this.table.length - 1
    let p = this.home(node, mask)
    while (this.table[p] !== EMPTY) p = (p + 1) & mask
    this.table[p] = node + 1
  }

  /** Replaces the table entry of head `node` with `by` (or removes it when by is -1). */
  replaceHead(node: number, by: number): void {
    const mask = this.table.length - 1
    let hole = this.home(node, mask)
    while (this.table[hole] !== node + 1) hole = (hole + 1) & mask
    if (by >= 0) {
      this.table[hole] = by + 1
      return
    }
    // Backward-shift deletion (Knuth's Algorithm R): probe runs stay unbroken, no tombstones.
    this.table[hole] = EMPTY
    for (let j = (hole + 1) & mask; this.table[j] !== EMPTY; j = (j + 1) & mask) {
      const k = this.home(this.table[j]! - 1, mask)
      const stays = hole <= j ? hole < k && k <= j : hole < k || k <= j
      if (stays) continue
      this.table[hole] = this.table[j]!
      this.table[j] = EMPTY
      hole = j
    }
  }

  private home(node: number, mask: number): number {
    return probeStart(this.hashLo[node]!, this.domain[node]!, mask)
  }

  /** Frees a node that is in no table and no chain. */
  release(node: number): void {
    this.live--
    this.sharers[node] = 0
    this.free.push(node)
  }

  private grow(capacity: number): void {
    const copy = <T extends Uint32Array | Int32Array>(a: T, make: (n: number) => T): T => {
      const b = make(capacity)
      b.set(a)
      return b
    }
    this.hashLo = copy(this.hashLo, sabUint32)
    this.hashHi = copy(this.hashHi, sabUint32)
    this.domain = copy(this.domain, sabUint32)
    this.pool = copy(this.pool, sabUint32)
    this.sharers = copy(this.sharers, sabUint32)
    this.nextDup = copy(this.nextDup, sabInt32)
  }

  private rehash(size: number): void {
    const old = this.table
    this.table = sabInt32(size)
    const mask = size - 1
    for (const e of old) {
      if (e === EMPTY) continue
      let p = this.home(e - 1, mask)
      while (this.table[p] !== EMPTY) p = (p + 1) & mask
      this.table[p] = e
    }
  }

  /** Bytes of metadata held. */
  bytes(): number {
    return this.capacity * 24 + this.table.length * 4
  }
}

/** The unstable index: pages seen this full scan that matched nothing yet. Emptied every scan. */
export class UnstableTable {
  table: Int32Array = sabInt32(tableSize(1024))
  /** Entries this scan. */
  size = 0

  /** Sizes the table for `pages` tracked pages (emptying it). */
  reserve(pages: number): void {
    const want = tableSize(pages)
    if (want > this.table.length) {
      this.table = sabInt32(want)
      this.size = 0
    }
  }

  clear(): void {
    this.table.fill(EMPTY)
    this.size = 0
  }

  /**
   * Finds a slot whose hash equals (lo, hi) and that `accept`s, or inserts `slot` and returns -1.
   * `words` is the page hashes as (lo, hi) pairs per slot.
   */
  findOrInsert(slot: number, lo: number, hi: number, domain: number, words: Uint32Array, accept: (other: number) => boolean): number {
    const mask = this.table.length - 1
    let p = probeStart(lo, domain, mask)
    for (; ; p = (p + 1) & mask) {
      const e = this.table[p]!
      if (e === EMPTY) break
      const other = e - 1
      if (other !== slot && words[2 * other] === lo && words[2 * other + 1] === hi && accept(other)) return other
    }
    if (2 * (this.size + 1) <= this.table.length) {
      this.table[p] = slot + 1
      this.size++
    }
    return -1
  }

  bytes(): number {
    return this.table.length * 4
  }
}
