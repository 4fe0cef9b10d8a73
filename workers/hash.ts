// Worker thread: hashes shards of pages through the addon and searches the stable table
// read-only. Stateless but for the typed-array views it keeps over the shared arrays it was last
// given (made anew when the engine grows them), since a batch can be as small as 100 pages.
import { loadNative } from '../lib/native'
import { Flag, notHashed, notHashedRun, probeStart, Shard, shardAddress, SHARD_FIELDS, type HashResult, type HashTask } from '../lib/protocol'

const native = loadNative()
const { HASHED, CHANGED, NEW } = Flag

// Weak: the arrays of a PageMerger that was closed (or that grew them) must not be kept alive here,
// on the coordinator thread too, which hashes small batches with this module.
const views = new WeakMap<SharedArrayBuffer, Uint32Array | Int32Array | Uint8Array | BigUint64Array | Float64Array>()
function view<T extends Uint32Array | Int32Array | Uint8Array | BigUint64Array | Float64Array>(sab: SharedArrayBuffer, make: new (b: SharedArrayBuffer) => T): T {
  let v = views.get(sab)
  if (!(v instanceof make)) views.set(sab, (v = new make(sab)))
  return v as T
}

const wide = new WeakMap<SharedArrayBuffer, BigUint64Array>()

/** Pages per hashRuns() call: bounds the scratch below, allocated once (a scratch sized for each
 * task and let go, or regrown, stayed in this thread's heaps, which no GC of the application's
 * thread empties: 2-10 MiB that the OS counted against a merge). */
const CHUNK = 2048
/** The keys the chunk's runs had before they are hashed again, one run after another. */
const previous = new Int32Array(2 * CHUNK)
/** The chunk's runs of pages to hash: [address, firstPage, count, slot] each (a run has a page at least). */
const runs = new Float64Array(4 * CHUNK)
/** And for settle(): [batchIndex, mixLo, mixHi, where its old keys start in `previous`] each. */
const meta = new Int32Array(4 * CHUNK)

export default function hash(task: HashTask): HashResult {
  let hashes = wide.get(task.keys) // a second view of the same bytes as `words`
  if (!hashes) wide.set(task.keys, (hashes = new BigUint64Array(task.keys)))
  // Int32 views of the keys, as the engine's: every value stays a small integer, never a heap
  // number, even before the loop is optimized
  const words = view(task.keys, Int32Array)
  const flags = view(task.flags, Uint8Array)
  const candidates = view(task.candidates, Int32Array)
  const table = view(task.stable.table, Int32Array)
  const nodeLo = view(task.stable.keyLo, Int32Array)
  const nodeHi = view(task.stable.keyHi, Int32Array)
  const { secret } = task.stable
  const mask = table.length - 1
  const bits = 31 - Math.clz32(table.length)
  const shards = view(task.shards, Int32Array)
  let n = 0, saved = 0, hashed = 0
  // ... the chunk's runs hashed in one native call (a batch of small buffers has a run per buffer), and settled
  const flush = () => {
    if (n > 0) native.hashRuns(runs, n, hashes)
    for (let j = 0; j < n; j++)
      settle(words, flags, previous, meta[4 * j + 3]!, candidates, table, nodeLo, nodeHi, runs[4 * j + 3]! | 0, meta[4 * j]!, runs[4 * j + 2]! | 0, meta[4 * j + 1]!, meta[4 * j + 2]!, secret, bits, mask)
    hashed += saved
    n = saved = 0
  }
  // The runs of pages to hash (up to a page to skip, a shard's end or a full chunk), their old keys saved ...
  for (let r = task.from; r < task.to; r++) {
    const o = r * SHARD_FIELDS
    const address = shardAddress(shards, o), firstPage = shards[o + Shard.FIRST_PAGE]!, count = shards[o + Shard.COUNT]!
    const slot = shards[o + Shard.SLOT]!, batchIndex = shards[o + Shard.BATCH_INDEX]!
    const mixLo = shards[o + Shard.MIX_LO]!, mixHi = shards[o + Shard.MIX_HI]!
    candidates.fill(-1, batchIndex, batchIndex + count) // the answer for pages not hashed
    for (let i = notHashedRun(flags, slot, count); i < count; ) {
      const k = Math.min(toHash(flags, slot + i, count - i), CHUNK - saved)
      runs[4 * n] = address, runs[4 * n + 1] = firstPage + i, runs[4 * n + 2] = k, runs[4 * n + 3] = slot + i
      meta[4 * n] = batchIndex + i, meta[4 * n + 1] = mixLo, meta[4 * n + 2] = mixHi, meta[4 * n + 3] = 2 * saved
      saveKeys(words, previous, 2 * (slot + i), 2 * k, 2 * saved)
      n++, saved += k
      if (saved === CHUNK) flush()
      i += k
      i += notHashedRun(flags, slot + i, count - i)
    }
  }
  flush()
  return { hashed }
}

// The loops over pages are leaf functions that return a number: V8 optimizes a long loop while
// it runs (on-stack replacement), before the code after it has ever run; code after the loop in
// the same function would then have no type feedback, and the first time it ran it would throw
// the optimized code away, to be compiled again (--trace-deopt: hash() was compiled 5 times in a
// process's first mergeNow(), 3 of them thrown away at code after a loop).

/** How many pages from `slot` on, at most `most`, are to be hashed before one to skip. */
function toHash(flags: Uint8Array, slot: number, most: number): number {
  let n = 0
  while (n < most && !notHashed(flags[slot + n]!)) n++
  return n
}

/** Copies `count` key words from `from` into `old` at `at` (no subarray object per run). */
function saveKeys(words: Int32Array, old: Int32Array, from: number, count: number, at: number): number {
  for (let k = 0; k < count; k++) old[at + k] = words[from + k]!
  return count
}

/**
 * Mixes the domain into the new keys of `count` pages from `slot`, flags each page new, changed
 * or not since one scan ago (`old` from `oldAt`), and looks each one up in the stable table. Every operation
 * runs for every page of every scan, so that the loop, optimized in a first scan (nothing
 * merged, no stable page yet), is not thrown away when a later scan takes a path the first
 * never took.
 */
function settle(words: Int32Array, flags: Uint8Array, old: Int32Array, oldAt: number, candidates: Int32Array, table: Int32Array, nodeLo: Int32Array, nodeHi: Int32Array, slot: number, batchIndex: number, count: number, mixLo: number, mixHi: number, secret: number, bits: number, mask: number): number {
  for (let k = 0; k < count; k++) {
    const s = slot + k
    const lo = words[2 * s]! ^ mixLo, hi = words[2 * s + 1]! ^ mixHi
    words[2 * s] = lo
    words[2 * s + 1] = hi
    const f = flags[s]!
    const changed = ((old[oldAt + 2 * k]! ^ lo) | (old[oldAt + 2 * k + 1]! ^ hi)) !== 0 // since one scan ago
    flags[s] = (f & ~(CHANGED | NEW)) | HASHED | ((f & HASHED) === 0 ? NEW : changed ? CHANGED : 0)
    let found = -1
    for (let p = probeStart(lo, secret, bits); ; ) {
      const n = table[p]! - 1 // the entry's node, or -1 for an empty slot
      const node = n & ~(n >> 31) // node 0 in place of -1: read, not used
      const other = ((nodeLo[node]! ^ lo) | (nodeHi[node]! ^ hi)) !== 0
      const next = (p + 1) & mask // computed on every page, though needed only after a collision
      if (n < 0 || !other) {
        found = n
        break
      }
      p = next
    }
    candidates[batchIndex + k] = found
  }
  return count
}
