// The engine option: 'kernel' hands private buffers to ksmd (madvise), 'auto' merges them itself and
// leaves to ksmd what the mapping budget refuses. Judged by the kernel's own per-process counters
// (/proc/self/ksm_stat), bytes read back, and the knobs being back where they were.
import t, { type Test } from 'tap'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { ErrorCode, PageMerger } from '../lib/index'
import { KSM_SYSFS } from '../lib/kernel'
import { loadNative } from '../lib/native'
import { digest, fillRandom, isRoot, MiB, PAGE, pssOf } from './fixtures/util'

const native = loadNative()
const needsKsmd = !existsSync(KSM_SYSFS) ? `needs ${KSM_SYSFS} (CONFIG_KSM)` : isRoot ? false : 'needs root: starts ksmd through /sys/kernel/mm/ksm'
const KNOBS = ['run', 'pages_to_scan', 'sleep_millisecs']

/** This process's ksm_merging_pages, as the kernel prints it in /proc/self/ksm_stat. */
function mergingPages(): number {
  return Number(/^ksm_merging_pages (\d+)$/m.exec(readFileSync('/proc/self/ksm_stat', 'utf8'))![1])
}

const knobs = () => Object.fromEntries(KNOBS.map((f) => [f, readFileSync(join(KSM_SYSFS, f), 'utf8').trim()]))

/**
 * Runs `body` with a PageMerger of the engine and ksmd started fast through pm.kernel; then
 * checks that close() gave the knobs back. The teardown puts them back whatever happened.
 */
async function withKsmd(t: Test, engine: 'kernel' | 'auto', body: (pm: PageMerger) => Promise<void>): Promise<void> {
  const before = knobs()
  const pm = new PageMerger({ engine })
  t.teardown(async () => {
    await pm.close()
    for (const [f, v] of Object.entries(knobs())) if (v !== before[f]) writeFileSync(join(KSM_SYSFS, f), before[f]!)
  })
  pm.kernel.tune({ pagesToScan: 20000, sleepMillisecs: 0, run: 1 })
  await body(pm)
  await pm.close()
  t.same(knobs(), before, 'close() gave the knobs back')
}

/** Waits until ksmd has finished `n` more full scans. */
async function ksmdScans(pm: PageMerger, n: number): Promise<void> {
  const start = pm.kernel.counters().fullScans
  while (pm.kernel.counters().fullScans < start + n) await new Promise((r) => setTimeout(r, 20))
}

/** Two buffers of the same `bytes` random bytes. */
function clones(pm: PageMerger, bytes: number, seed: number): [Buffer, Buffer] {
  const a = fillRandom(pm.alloc(bytes), seed), b = pm.alloc(bytes)
  b.set(a)
  return [a, b]
}

t.test("engine 'kernel': ksmd merges 64 MiB of clones, seen in ksm_stat; knobs restored by close()", { skip: needsKsmd }, async (t) => {
  await withKsmd(t, 'kernel', async (pm) => {
  // ksmd waits until the baseline is taken: running, it would merge some pages while the test
  // fills and reads the buffers (pages are mergeable from alloc() on), and the count would miss them
  pm.kernel.tune({ run: 0 })
  const [a, b] = clones(pm, 32 * MiB, 21)
  const want = digest(a)
  const pss = pssOf(a, b) // the buffers' own mappings: the process's heaps move by MiBs under tap
  const before = mergingPages()
  pm.kernel.tune({ run: 1 })
  const s = await pm.mergeNow()
  const merged = mergingPages() - before
  // Both sides of a merge count: the pages of a and of b that map a KSM page.
  t.ok(merged >= 0.95 * 16384, `ksm_merging_pages rose by ${merged} of 16384`)
  t.equal(s.kernelMergingPages, mergingPages(), 'stats() reports the kernel\'s count')
  t.equal(s.pagesSharing, 0, 'pagemerge itself merged nothing')
  const fell = pss - pssOf(a, b)
  t.ok(fell >= 0.95 * 32 * MiB, `the buffers' Pss fell by ${(fell / MiB).toFixed(1)} MiB of 32`)
  t.equal(digest(a), want, 'a reads its bytes')
  t.equal(digest(b), want, 'b reads its bytes')
  a[5] = a[5]! ^ 0xff // copy-on-write: the other buffer keeps its byte
  t.equal(digest(b), want, 'a write to a leaves b alone')
  t.ok(pm.unregister(b), 'unregister()')
  await ksmdScans(pm, 2) // the kernel drops its records of unmerged pages as ksmd passes them
  t.ok(mergingPages() - before <= 8192, `MADV_UNMERGEABLE gave b private pages again (${mergingPages() - before} left merging: a's)`)
  t.equal(digest(b), want, 'b still reads its bytes')
  })
})

t.test("engine 'kernel': mergeNow() with ksmd stopped rejects with KSMD_STOPPED instead of waiting forever", { skip: needsKsmd }, async (t) => {
  await withKsmd(t, 'kernel', async (pm) => {
    pm.alloc(PAGE).fill(1)
    pm.kernel.tune({ run: 0 })
    await t.rejects(pm.mergeNow(), { code: ErrorCode.KSMD_STOPPED })
  })
})

t.test("engine 'kernel' buffers are private anonymous memory; the bridge refuses to advise memfd windows", async (t) => {
  const arena = new native.Arena()
  t.throws(() => arena.advise(arena.alloc(PAGE, true), true), { code: ErrorCode.NOT_PRIVATE }, 'memfd window refused')
  const pm = new PageMerger({ engine: 'kernel' })
  t.teardown(() => pm.close())
  const buf = pm.alloc(4 * PAGE)
  const at = native.addressOf(buf)
  const line = readFileSync('/proc/self/maps', 'utf8').split('\n').find((l) => {
    const [lo, hi] = l.split(' ')[0]!.split('-').map((x) => BigInt('0x' + x))
    return lo! <= at && at < hi!
  })!
  t.match(line, /^\S+ rw-p 00000000 00:00 0\s*$/, `an anonymous private mapping: ${line}`)
  t.equal(pm.running, false)
  pm.start() // ksmd scans by itself: nothing to start
  t.equal(pm.running, false, 'start() is a no-op with the kernel engine')
})

t.test("engine 'auto': pagemerge merges within the mapping budget, ksmd takes what it refused", { skip: needsKsmd }, async (t) => {
  const pairs = 64, bytes = 16 * PAGE
  await withKsmd(t, 'auto', async (pm) => {
  pm.kernel.tune({ run: 0 }) // ksmd starts after pagemerge is done, so that each side's share is clear
  const warm = clones(pm, 4 * MiB, 99) // kept to the end: collected meanwhile, it would leave pagesSharing
  await pm.mergeNow() // the worker threads are up: their stacks are mappings too
  const bufs = Array.from({ length: pairs }, (_, i) => clones(pm, bytes, 100 + i))
  const want = bufs.map(([a]) => digest(a))
  pm.setOptions({ mapBudget: native.mappingCount() + 40 }) // room for about 20 of the 64 merges
  const before = mergingPages(), sharing = pm.stats().pagesSharing
  const s = await pm.mergeNow()
  const own = s.pagesSharing - sharing
  t.ok(own > 0, `pagemerge merged ${own} pages`)
  t.ok(s.pagesSkippedBudget > 0, `and left ${s.pagesSkippedBudget} to the budget`)
  pm.kernel.tune({ run: 1 })
  await ksmdScans(pm, 3) // ksmd merges the rest within a few of its full scans
  const kernel = mergingPages() - before
  t.ok(kernel > 0, `ksmd merged ${kernel} pages`)
  const ideal = pairs * (bytes / PAGE)
  // ksm_merging_pages counts both sides of a kernel merge; pagesSharing only the pages saved
  t.ok(own + kernel / 2 >= 0.95 * ideal, `together ${own} + ${kernel} / 2 of the ${ideal} pages saveable`)
  t.equal(pm.stats().kernelMergingPages, mergingPages(), 'stats() says how many the kernel took')
  t.ok(bufs.every(([a, b], i) => digest(a) === want[i] && digest(b) === want[i]), 'every byte intact')
  t.equal(digest(warm[0]), digest(warm[1]), 'and the warm-up pair too')
  })
})

t.test("engine 'auto' without ksmd: merges like 'userspace', from private memory", async (t) => {
  const pm = new PageMerger({ engine: 'auto' })
  t.teardown(() => pm.close())
  const [a, b] = clones(pm, 4 * MiB, 7)
  const s = await pm.mergeNow()
  t.equal(s.pagesSharing, 1024, 'half the pages saved')
  t.equal(digest(a), digest(b), 'bytes intact')
  await pm.unmergeAll()
  t.equal(pm.stats().pagesSharing, 0, 'unmergeAll()')
  t.equal(digest(a), digest(b), 'bytes intact after unmerging')
})
