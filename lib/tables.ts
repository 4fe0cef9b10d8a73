/**
 * KSM's two indexes, as open-addressing hash tables (linear probing) over SharedArrayBuffer
 * typed arrays, keyed by each page's 64-bit key (its hash XOR its domain's mix).
 *
 * The kernel orders its trees by page content because it has no hash; we hash every page
 * anyway, so a table finds a page in O(1) instead of the ~17 node visits per page of a tree at
 * 262,144 pages per GiB, which in JavaScript was a large share of a merge. Like the kernel's
 * colour-balanced unstable tree, a table is unharmed when a key changes under it (the entry is
 * merely stale), and a hit is only a candidate: bytes are compared in full before any merge.
 * Equal keys of different bytes simply sit in the same probe run.
 */
import { randomInt } from 'node:crypto'
import { loadNative } from './native'
import { probeStart, type StableView } from './protocol'

const EMPTY = 0
const MIN_BITS = 10

/** From this size up, the engine's arrays get a mapping of their own: see sharedBytes(). */
const OWN_MAPPING_BYTES = 64 * 1024

/**
 * Zeroed shared bytes for the engine's tables and scratch arrays. Large ones are mapped on their
 * own (the addon's mappedBuffer) rather than malloc'd by V8: glibc raises its mmap threshold to
 * the largest block freed (up to 32 MiB), so after an application has freed one large buffer, the
 * MiBs that a merge's arrays grow to and give back stay in the C heap, and the OS counts them
 * against what the merge freed (scattered at 1 GiB: 5 MiB); and freeing one raises the trim
 * threshold, after which other threads' heaps keep what they free (native/big_alloc.h). A mapping
 * of their own is unmapped when V8 frees the buffer. The bench's own large arrays come from here too.
 */
export function sharedBytes(bytes: number): SharedArrayBuffer {
  return bytes < OWN_MAPPING_BYTES ? new SharedArrayBuffer(bytes) : loadNative().mappedBuffer(bytes)
}

const sabInt32 = (n: number) => new Int32Array(sharedBytes(n * 4))
const sabUint32 = (n: number) => new Uint32Array(sharedBytes(n * 4))

/** Bits of the smallest table for n entries at a load of at most 1/2. */
function bitsFor(n: number): number {
  let bits = MIN_BITS
  while (1 << bits < 2 * n) bits++
  return bits
}

/** Linear probing over `table`, keys looked up through `keyLo`/`keyHi` of the entry's index. */
abstract class Table {
  table: Int32Array
  bits: number
  /** Entries in the table. */
  size = 0
  readonly secret = randomInt(2 ** 32 - 1) | 0 // int32, as the keys it mixes with

  constructor(bits = MIN_BITS) {
    this.bits = bits
    this.table = sabInt32(1 << bits)
  }

  protected abstract lo(index: number): number
  protected abstract hi(index: number): number

  protected home(index: number): number {
    return probeStart(this.lo(index), this.secret, this.bits)
  }

  /**
   * The first entry with this key, or -1. Both words are compared at every probe, an empty slot's
   * against entry 0 (read, not used): code that V8 optimized before the first hit would
   * otherwise lack feedback for the comparison, and be thrown away at the first hit.
   */
  protected lookup(lo: number, hi: number): number {
    const mask = this.table.length - 1
    for (let p = probeStart(lo, this.secret, this.bits); ; ) {
      const i = this.table[p]! - 1 // EMPTY is 0
      const k = i & ~(i >> 31)
      const same = ((this.lo(k) ^ lo) | (this.hi(k) ^ hi)) === 0
      const next = (p + 1) & mask // likewise, though needed only after a collision
      if (i < 0) return -1
      if (same) return i
      p = next
    }
  }

  protected put(index: number): void {
    if (2 * (this.size + 1) > this.table.length) this.resize(this.bits + 1)
    const mask = this.table.length - 1
    let p = this.home(index)
    while (this.table[p] !== EMPTY) p = (p + 1) & mask
    this.table[p] = index + 1
    this.size++
  }

  /** Removes `index` (or replaces it by `by`), keeping every probe run unbroken (Knuth's Algorithm R). */
  protected take(index: number, by = -1): void {
    const mask = this.table.length - 1
    let hole = this.home(index)
    while (this.table[hole] !== index + 1) hole = (hole + 1) & mask
    if (by >= 0) {
      this.table[hole] = by + 1
      return
    }
    this.table[hole] = EMPTY
    this.size--
    for (let j = (hole + 1) & mask; this.table[j] !== EMPTY; j = (j + 1) & mask) {
      const k = this.home(this.table[j]! - 1)
      const stays = hole <= j ? hole < k && k <= j : hole < k || k <= j
      if (stays) continue
      this.table[hole] = this.table[j]!
      this.table[j] = EMPTY
      hole = j
    }
  }

  /** Rebuilds the table with 2^bits entries (to grow, or to give memory back). */
  protected resize(bits: number): void {
    const old = this.table
    this.bits = bits
    this.table = sabInt32(1 << bits)
    const mask = this.table.length - 1
    for (let i = 0; i < old.length; i++) {
      const e = old[i]!
      if (e === EMPTY) continue
      let p = this.home(e - 1)
      while (this.table[p] !== EMPTY) p = (p + 1) & mask
      this.table[p] = e
    }
  }

  bytes(): number {
    return this.table.length * 4
  }
}

/** The stable pages: one node per pool page that pages are merged onto. */
export class StableNodes extends Table {
  /** Each node's key, as Int32 words like the pages' (see PageArrays in lib/engine.ts). */
  keyLo = sabInt32(1024)
  keyHi = sabInt32(1024)
  pool = sabUint32(1024)
  /** Pages mapping each node, planned ones included (maxPageSharing ≤ 65535 keeps it in 16 bits). */
  sharers: Uint16Array<ArrayBufferLike> = new Uint16Array(1024)
  /** Next node in a chain of dups with the same content (maxPageSharing): rare, so a Map. */
  private readonly dups = new Map<number, number>()
  /** Nodes in use. */
  live = 0
  private free: number[] = []
  private top = 0

  protected lo(n: number): number {
    return this.keyLo[n]!
  }
  protected hi(n: number): number {
    return this.keyHi[n]!
  }

  get capacity(): number {
    return this.keyLo.length
  }

  view(): StableView {
    return {
      table: this.table.buffer as SharedArrayBuffer,
      keyLo: this.keyLo.buffer as SharedArrayBuffer,
      keyHi: this.keyHi.buffer as SharedArrayBuffer,
      secret: this.secret,
    }
  }

  /** A new node, not yet in the table. */
  create(lo: number, hi: number, pool: number): number {
    const n = this.free.length ? this.free.pop()! : this.top++
    if (n >= this.capacity) this.grow(this.capacity * 2)
    this.keyLo[n] = lo
    this.keyHi[n] = hi
    this.pool[n] = pool
    this.sharers[n] = 0
    this.live++
    return n
  }

  /** The chain head for a key, or -1. */
  find(lo: number, hi: number): number {
    return this.lookup(lo, hi)
  }

  /** Makes `node` the last dup of the chain of `head`, or the head for its key when head is -1. */
  insert(node: number, head: number): void {
    if (head < 0) return this.put(node)
    let last = head
    while (this.nextDup(last) >= 0) last = this.nextDup(last)
    this.dups.set(last, node)
  }

  nextDup(node: number): number {
    return this.dups.get(node) ?? -1
  }

  /** Unlinks a node from the table or its chain and frees it. */
  remove(node: number): void {
    const head = this.find(this.keyLo[node]!, this.keyHi[node]!)
    const next = this.nextDup(node)
    if (head === node) {
      if (next >= 0) this.take(node, next)
      else this.take(node)
    } else
      for (let n = head; n >= 0; n = this.nextDup(n))
        if (this.nextDup(n) === node) {
          if (next >= 0) this.dups.set(n, next)
          else this.dups.delete(n)
          break
        }
    this.dups.delete(node)
    this.live--
    this.sharers[node] = 0
    this.free.push(node)
  }

  /**
   * Chains (contents with more than one stable page) and the nodes in them, from the links alone
   * (a chain of k nodes has k - 1; its head is the one no link points to): stats() is polled, and
   * a walk of the whole table cost ~150 µs a call at 16k stable pages.
   */
  chains(): { chains: number; dups: number } {
    if (this.dups.size === 0) return { chains: 0, dups: 0 }
    const linked = new Set(this.dups.values())
    let chains = 0
    for (const node of this.dups.keys()) if (!linked.has(node)) chains++
    return { chains, dups: this.dups.size + chains }
  }

  private grow(capacity: number): void {
    const copy = <T extends Int32Array | Uint32Array>(a: T, make: (n: number) => T): T => {
      const b = make(capacity)
      b.set(a)
      return b
    }
    this.keyLo = copy(this.keyLo, sabInt32)
    this.keyHi = copy(this.keyHi, sabInt32)
    this.pool = copy(this.pool, sabUint32)
    const sharers = new Uint16Array(sharedBytes(2 * capacity))
    sharers.set(this.sharers)
    this.sharers = sharers
  }

  override bytes(): number {
    return super.bytes() + this.capacity * 14 + this.dups.size * 16
  }
}

/**
 * The unstable index: pages seen this full scan that matched nothing yet. Emptied every scan,
 * and sized then for the pages that may enter it, so that it costs nothing once all is merged.
 */
export class UnstableTable extends Table {
  /** Page keys, as (lo, hi) words per slot: the page arrays' own. */
  words: Int32Array<ArrayBufferLike> = new Int32Array(0)

  protected lo(slot: number): number {
    return this.words[2 * slot]!
  }
  protected hi(slot: number): number {
    return this.words[2 * slot + 1]!
  }

  /** Empties the table, sized for `expected` entries. */
  reset(expected: number): void {
    const bits = bitsFor(expected)
    if (bits === this.bits) this.table.fill(EMPTY)
    else {
      this.bits = bits
      this.table = sabInt32(1 << bits)
    }
    this.size = 0
  }

  /**
   * Another slot with the same key whose flags have all of `need` and none of `busy`, or -1
   * after inserting `slot`.
   */
  findOrInsert(slot: number, flags: Uint8Array, need: number, busy: number): number {
    const { words, table } = this
    const lo = words[2 * slot]!, hi = words[2 * slot + 1]!
    const mask = table.length - 1
    for (let p = this.home(slot); ; ) {
      const o = table[p]! - 1 // EMPTY is 0
      // every test on every probe, an empty slot's against slot 0 (as lookup() does, and why)
      const k = o & ~(o >> 31)
      const same = ((words[2 * k]! ^ lo) | (words[2 * k + 1]! ^ hi)) === 0
      const free = (flags[k]! & (busy | need)) === need
      const self = k === slot
      const next = (p + 1) & mask
      if (o < 0) break
      if (same && free && !self) return o
      p = next
    }
    this.put(slot)
    return -1
  }
}

/**
 * A growable list of uint32 numbers, kept and reused from batch to batch: the per-batch lists of
 * extents and stable-page owners, which as JavaScript arrays made a few hundred bytes of garbage
 * per page, enough to grow V8's young generation by tens of MiB during a large merge.
 */
export class U32List {
  data: Uint32Array<ArrayBufferLike> = new Uint32Array(1024)
  length = 0

  clear(): this {
    this.length = 0
    return this
  }

  push(v: number): void {
    if (this.length === this.data.length) this.reserve(this.length + 1)
    this.data[this.length++] = v
  }

  /** One record of three numbers (fixed arities: no array made per call). */
  push3(a: number, b: number, c: number): void {
    if (this.length + 3 > this.data.length) this.reserve(this.length + 3)
    const x = this.data, n = this.length
    x[n] = a, x[n + 1] = b, x[n + 2] = c
    this.length = n + 3
  }

  /** One record of four numbers. */
  push4(a: number, b: number, c: number, d: number): void {
    if (this.length + 4 > this.data.length) this.reserve(this.length + 4)
    const x = this.data, n = this.length
    x[n] = a, x[n + 1] = b, x[n + 2] = c, x[n + 3] = d
    this.length = n + 4
  }

  /** One record of six numbers. */
  push6(a: number, b: number, c: number, d: number, e: number, f: number): void {
    if (this.length + 6 > this.data.length) this.reserve(this.length + 6)
    const x = this.data, n = this.length
    x[n] = a, x[n + 1] = b, x[n + 2] = c, x[n + 3] = d, x[n + 4] = e, x[n + 5] = f
    this.length = n + 6
  }

  /** Appends another list's numbers. */
  append(other: U32List): void {
    this.reserve(this.length + other.length)
    this.data.set(other.data.subarray(0, other.length), this.length)
    this.length += other.length
  }

  /** Empties the list and gives back what it grew to (a large batch's records: MiBs). */
  release(): void {
    this.length = 0
    if (this.data.length > 1024) this.data = new Uint32Array(1024)
  }

  /** The numbers, as a view (valid until the list grows). */
  view(): Uint32Array {
    return this.data.subarray(0, this.length)
  }

  private reserve(n: number): void {
    if (n <= this.data.length) return
    const d = sabUint32(Math.max(n, 2 * this.data.length))
    d.set(this.data.subarray(0, this.length))
    this.data = d
  }
}
