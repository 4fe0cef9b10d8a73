// Worker thread: hashes shards of pages through the addon and searches the stable table
// read-only. Stateless: everything it needs arrives in the task.
import { loadNative } from '../lib/native'
import { Flag, probeStart, type HashResult, type HashTask } from '../lib/protocol'

const native = loadNative()

/** Not hashed: merged pages (their bytes are the pool's), and dropped zero pages nobody touched
 * (reading one could allocate it again). */
const skip = (f: number) => (f & Flag.MERGED) !== 0 || (f & (Flag.ZERO | Flag.TOUCHED)) === Flag.ZERO

export default function hash(task: HashTask): HashResult {
  const hashes = new BigUint64Array(task.keys)
  const words = new Uint32Array(task.keys)
  const flags = new Uint8Array(task.flags)
  const candidates = new Int32Array(task.candidates)
  const table = new Int32Array(task.stable.table)
  const nodeLo = new Uint32Array(task.stable.keyLo)
  const nodeHi = new Uint32Array(task.stable.keyHi)
  const { secret } = task.stable
  const mask = table.length - 1
  const bits = 31 - Math.clz32(table.length)
  let hashed = 0
  for (const shard of task.shards) {
    for (let i = 0; i < shard.count; ) {
      if (skip(flags[shard.slot + i]!)) {
        candidates[shard.batchIndex + i] = -1
        i++
        continue
      }
      let end = i // each maximal run of pages to hash, in one native call
      while (end < shard.count && !skip(flags[shard.slot + end]!)) end++
      const old = words.slice(2 * (shard.slot + i), 2 * (shard.slot + end))
      native.hashAt(shard.address, shard.firstPage + i, end - i, hashes, shard.slot + i)
      hashed += end - i
      for (let k = i; k < end; k++) {
        const s = shard.slot + k
        const lo = (words[2 * s]! ^ shard.mixLo) >>> 0, hi = (words[2 * s + 1]! ^ shard.mixHi) >>> 0
        words[2 * s] = lo
        words[2 * s + 1] = hi
        const f = flags[s]!
        const same = old[2 * (k - i)] === lo && old[2 * (k - i) + 1] === hi
        flags[s] = (f & ~(Flag.CHANGED | Flag.NEW)) | Flag.HASHED | (!(f & Flag.HASHED) ? Flag.NEW : same ? 0 : Flag.CHANGED)
        let found = -1
        for (let p = probeStart(lo, secret, bits); ; p = (p + 1) & mask) {
          const e = table[p]!
          if (e === 0) break
          if (nodeLo[e - 1] === lo && nodeHi[e - 1] === hi) {
            found = e - 1
            break
          }
        }
        candidates[shard.batchIndex + k] = found
      }
      i = end
    }
  }
  return { hashed }
}
