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
    for (let i = 0; i < count; ) {
      if (skip(flags[slot + i]!)) {
        candidates[batchIndex + i] = -1
        i++
        continue
      }
      let end = i // each maximal run of pages to hash, in one native call
      while (end < count && !skip(flags[slot + end]!)) end++
      if (previous.length < 2 * (end - i)) previous = new Int32Array(2 * (end - i))
      const old = previous
      for (let k = 0, from = 2 * (slot + i); k < 2 * (end - i); k++) old[k] = words[from + k]! // no subarray object per run
      native.hashAt(address, firstPage + i, end - i, hashes, slot + i)
      hashed += end - i
      for (let k = i; k < end; k++) {
        const s = slot + k
        const lo = words[2 * s]! ^ mixLo, hi = words[2 * s + 1]! ^ mixHi
        words[2 * s] = lo
        words[2 * s + 1] = hi
        const f = flags[s]!
        const same = old[2 * (k - i)] === lo && old[2 * (k - i) + 1] === hi
        flags[s] = (f & ~(CHANGED | NEW)) | HASHED | (!(f & HASHED) ? NEW : same ? 0 : CHANGED)
        let found = -1
        for (let p = probeStart(lo, secret, bits); ; p = (p + 1) & mask) {
          const e = table[p]!
          if (e === 0) break
          if (nodeLo[e - 1] === lo && nodeHi[e - 1] === hi) {
            found = e - 1
            break
          }
        }
        candidates[batchIndex + k] = found
      }
      i = end
    }
  }
  return { hashed }
}
