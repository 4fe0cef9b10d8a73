// Worker thread: hashes shards of pages through the addon and searches the stable table
// read-only. Stateless: everything it needs arrives in the task.
import { loadNative } from '../lib/native'
import { Flag, probeStart, type HashResult, type HashTask } from '../lib/protocol'

const native = loadNative()

const skip = (f: number) => (f & Flag.MERGED) !== 0 || (f & (Flag.ZERO | Flag.TOUCHED)) === Flag.ZERO

export default function hash(task: HashTask): HashResult {
  const hashes = new BigUint64Array(task.hashes)
  const words = new Uint32Array(task.hashes)
  const flags = new Uint8Array(task.flags)
  const candidates = new Int32Array(task.candidates)
  const table = new Int32Array(task.stable.table)
  const nodeLo = new Uint32Array(task.stable.hashLo)
  const nodeHi = new Uint32Array(task.stable.hashHi)
  const nodeDomain = new Uint32Array(task.stable.domain)
  const mask = table.length - 1
  let hashed = 0
  for (const shard of task.shards) {
    let i = 0
    while (i < shard.count) {
      // each maximal run of pages to hash: not merged (their bytes are the pool's), and not dropped
      // zero pages that nobody touched (reading those could allocate them again)
      if (skip(flags[shard.slot + i]!)) {
        candidates[shard.batchIndex + i] = -1
        i++
        continue
      }
      let end = i
      while (end < shard.count && !skip(flags[shard.slot + end]!)) end++
      const old = words.slice(2 * (shard.slot + i), 2 * (shard.slot + end))
      native.hashAt(shard.address, shard.firstPage + i, end - i, hashes, shard.slot + i)
      hashed += end - i
      for (let k = i; k < end; k++) {
        const s = shard.slot + k
        const lo = words[2 * s]!, hi = words[2 * s + 1]!
        const f = flags[s]!
        const seen = f & Flag.HASHED
        const same = old[2 * (k - i)] === lo && old[2 * (k - i) + 1] === hi
        flags[s] = (f & ~(Flag.CHANGED | Flag.NEW)) | Flag.HASHED | (!seen ? Flag.NEW : same ? 0 : Flag.CHANGED)
        let found = -1
        for (let p = probeStart(lo, shard.domain, mask); ; p = (p + 1) & mask) {
          const e = table[p]!
          if (e === 0) break
          const n = e - 1
          if (nodeLo[n] === lo && nodeHi[n] === hi && nodeDomain[n] === shard.domain) {
            found = n
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
