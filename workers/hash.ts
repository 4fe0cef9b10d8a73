// Worker thread: hashes shards of pages through the addon and searches the stable table
// read-only. Stateless but for the typed-array views it keeps over the shared arrays it was last
// given (made anew when the engine grows them), since a batch can be as small as 100 pages.
import { loadNative } from '../lib/native'
import { Flag, probeStart, SHARD_FIELDS, type HashResult, type HashTask } from '../lib/protocol'

const native = loadNative()
const { MERGED, ZERO, TOUCHED, HASHED, CHANGED, NEW } = Flag

/** Not hashed: merged pages (their bytes are the pool's), and dropped zero pages nobody touched
 * (reading one could allocate it again). */
const skip = (f: number) => (f & MERGED) !== 0 || (f & (ZERO | TOUCHED)) === ZERO

// Weak: the arrays of a PageMerger that was closed (or that grew them) must not be kept alive here,
// on the coordinator thread too, which hashes small batches with this module.
const views = new WeakMap<SharedArrayBuffer, Uint32Array | Int32Array | Uint8Array | BigUint64Array | Float64Array>()
function view<T extends Uint32Array | Int32Array | Uint8Array | BigUint64Array | Float64Array>(sab: SharedArrayBuffer, make: new (b: SharedArrayBuffer) => T): T {
  let v = views.get(sab)
  if (!(v instanceof make)) views.set(sab, (v = new make(sab)))
  return v as T
}

const wide = new WeakMap<SharedArrayBuffer, BigUint64Array>()

/** The keys a run had before it is hashed again (reused: a new array per run cost more than the run). */
let previous = new Int32Array(2 * 1024)

export default function hash(task: HashTask): HashResult {
  let hashes = wide.get(task.keys) // a second view of the same bytes as `words`
  if (!hashes) wide.set(task.keys, (hashes = new BigUint64Array(task.keys)))
  // Int32 views of the keys: every value stays a small integer, never a heap number, even before
  // the loop is optimized (the engine writes and reads the same bits through Uint32 views)
  const words = view(task.keys, Int32Array)
  const flags = view(task.flags, Uint8Array)
  const candidates = view(task.candidates, Int32Array)
  const table = view(task.stable.table, Int32Array)
  const nodeLo = view(task.stable.keyLo, Int32Array)
  const nodeHi = view(task.stable.keyHi, Int32Array)
  const { secret } = task.stable
  const mask = table.length - 1
  const bits = 31 - Math.clz32(table.length)
  const shards = view(task.shards, Float64Array)
  let hashed = 0
  for (let r = task.from; r < task.to; r++) {
    const o = r * SHARD_FIELDS
    const address = shards[o]!, firstPage = shards[o + 1]!, count = shards[o + 2]!, slot = shards[o + 3]!
    const batchIndex = shards[o + 4]!, mixLo = shards[o + 5]!, mixHi = shards[o + 6]!
    // Every operation below runs for every batch of every scan, so that the loop, optimized in a
    // first scan (nothing merged, no stable page yet), is not thrown away and compiled again when
    // a later scan takes a path the first never took.
    candidates.fill(-1, batchIndex, batchIndex + count) // the answer for pages not hashed
    for (let i = 0, end = 0; i < count; i = end + 1) {
      end = i // each maximal run of pages to hash (up to a page to skip, or the end), in one native call
      while (end < count && !skip(flags[slot + end]!)) end++
      if (end === i) continue
      if (previous.length < 2 * (end - i)) previous = new Int32Array(2 * (end - i))
      const old = previous
      for (let k = 0, from = 2 * (slot + i); k < 2 * (end - i); k++) old[k] = words[from + k]! // no subarray object per run
      native.hashAt(address, firstPage + i, end - i, hashes, slot + i)
      hashed += end - i
      for (let k = i; k < end; k++) {
        const s = slot + k, was = 2 * (k - i)
        const lo = words[2 * s]! ^ mixLo, hi = words[2 * s + 1]! ^ mixHi
        words[2 * s] = lo
        words[2 * s + 1] = hi
        const f = flags[s]!
        const changed = ((old[was]! ^ lo) | (old[was + 1]! ^ hi)) !== 0 // since one scan ago
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
    }
  }
  return { hashed }
}
