// Issue #3: after mergeNow(), the OS must see what the counters say was freed. bench/pss-gap.js
// runs `scattered` (1 GiB: ~16k single-page merges, thousands per batch) in a child of plain
// node and reads the child's smaps by kind of mapping from outside. Asserted:
// - the arena's own mappings fell by exactly what was counted (pagesSharing + zeroPages);
// - the C heap ([heap]) grew by little: the batches' scratch (extent lists, the bridge calls'
//   arrays, the unstable index) is given back when mergeNow() returns, in mappings of its own.
//   It used to stay in the C heap, +9.8 MiB here (glibc had raised its mmap threshold when the
//   workload freed a 4 MiB buffer, so later blocks came from the heap and stayed there when freed).
// - other threads' malloc arenas grew by little: when the addon (or the bench) freed a block malloc
//   had mmapped, glibc raised its trim threshold for the process and V8's compiler threads kept
//   the memory they freed after compiling the merge, +8.5 to 9.2 MiB here (native/big_alloc.h).
// - the whole process's anonymous and shmem Pss fell by at least 93% of what was counted. The
//   issue's line is 95%, which npm run bench judges on the median of its runs: a fresh process's
//   first merge also pays for the runtime's first use of the code (JIT code, the compiler
//   threads' malloc arenas), 1.0 to 2.4 MiB here in most runs and 3.5 in one of 16 (96.2-98.4%,
//   once 94.5%). 93% still catches what this file is about: with V8's young generation grown by
//   the merge's garbage (uint32 words as heap numbers, an object per shard) it was 86-88%.
import t from 'tap'
import { execFile } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'

const entry = join(__dirname, '..', 'dist', 'bench', 'pss-gap.js')
const MiB = 1024 * 1024

interface Seen {
  inside: { checkpoint: string; counted?: { pagesSharing: number; zeroPages: number } }
  groups: Record<string, { pssAnon: number; pssShmem: number }>
}

t.test('scattered at 1 GiB: the arena gives back what was counted, the C heaps keep no scratch', { skip: existsSync(entry) ? false : 'npm run build first' }, async (t) => {
  const out = await new Promise<string>((resolve, reject) =>
    execFile(process.execPath, ['--expose-gc', entry, '--workload', 'scattered', '--size', '1024', '--json'], { maxBuffer: 64 * MiB, timeout: 120_000 }, (err, stdout) => (err ? reject(err) : resolve(stdout))),
  )
  const seen = JSON.parse(out) as Seen[]
  const before = seen[0]!, after = seen[seen.length - 1]!
  const pss = (s: Seen, k: string) => (s.groups[k] ? s.groups[k]!.pssAnon + s.groups[k]!.pssShmem : 0)
  const c = after.inside.counted!
  const counted = (c.pagesSharing + c.zeroPages) * 4096
  const arena = pss(before, 'arena memfd') + pss(before, 'arena anon') - pss(after, 'arena memfd') - pss(after, 'arena anon')
  const heap = pss(after, '[heap]') - pss(before, '[heap]')
  const total = (s: Seen) => Object.keys(s.groups).reduce((n, k) => n + pss(s, k), 0)
  const freed = total(before) - total(after)
  const arenas = pss(after, 'malloc arenas') - pss(before, 'malloc arenas')
  t.comment(`counted ${(counted / MiB).toFixed(2)} MiB; the arena's mappings fell ${(arena / MiB).toFixed(2)} MiB; [heap] grew ${(heap / MiB).toFixed(2)} MiB, other threads' malloc arenas ${(arenas / MiB).toFixed(2)} MiB; the process fell ${(freed / MiB).toFixed(2)} MiB`)
  t.ok(c.pagesSharing > 15_000, 'thousands of single pages merged')
  t.ok(Math.abs(arena - counted) <= 0.01 * counted, "the arena's mappings fell by what was counted, within 1%")
  t.ok(heap < 5 * MiB, 'the C heap grew by less than 5 MiB (the arena metadata, ~1 MiB, and the read-back)')
  t.ok(arenas < 4 * MiB, "other threads' malloc arenas grew by less than 4 MiB (measured 0.1-1.5; 8.5-9.2 while glibc's trim threshold was raised)")
  t.ok(freed >= 0.93 * counted, `the process's Pss fell by ${((100 * freed) / counted).toFixed(1)}% of what was counted (at least 93%)`)
})
