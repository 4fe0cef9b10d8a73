// Spans through the coordinator: duplicates fragmented into 3-page runs (the `volatile`
// benchmark's pattern) merge within a tight mapping budget, because the bridge maps each run of
// same-delta extents with small gaps as one mapping instead of one (or two) per extent.
import t from 'tap'
import { PageMerger } from '../lib/index'
import { loadNative } from '../lib/native'
import { digest, fillRandom, MiB, PAGE, pssOf, touch } from './fixtures/util'

const native = loadNative()
const BYTES = 32 * MiB // two buffers: a 64 MiB workload
const PAGES = BYTES / PAGE
const MERGEABLE = (PAGES * 3) / 4 // every 4th page differs between the two

/** Buffers of the warm-up merges: kept, since one collected during a run leaves pagesSharing then. */
const warmed: Buffer[] = []

/** A PageMerger with spans on or off, whose worker threads are up (their stacks are mappings too). */
async function warmMerger(spans: boolean, seed: number): Promise<PageMerger> {
  if (spans) delete process.env.PAGEMERGE_NO_SPANS
  else process.env.PAGEMERGE_NO_SPANS = '1' // read when the PageMerger's arena is made
  const pm = new PageMerger({ workers: 1 })
  delete process.env.PAGEMERGE_NO_SPANS
  const warm = [pm.alloc(MiB), pm.alloc(MiB)]
  fillRandom(warm[0]!, seed)
  warm[1]!.set(warm[0]!)
  await pm.mergeNow()
  warmed.push(...warm)
  return pm
}

async function run(spans: boolean) {
  const pm = await warmMerger(spans, 40)
  try {
    const a = fillRandom(pm.alloc(BYTES), 41), b = fillRandom(pm.alloc(BYTES), 43)
    await pm.mergeNow() // nothing to merge yet: the coordinator's own tables and heap grow (mappings too)
    b.set(a)
    const other = fillRandom(new Uint8Array(BYTES), 42)
    for (let p = 3; p < PAGES; p += 4) b.set(other.subarray(p * PAGE, (p + 1) * PAGE), p * PAGE)
    const da = digest(a), db = digest(b)
    touch(a, b)
    const pss = pssOf(a, b), sharing = pm.stats().pagesSharing
    const budget = native.mappingCount() + 300
    pm.setOptions({ mapBudget: budget })
    const s = await pm.mergeNow()
    const maps = native.mappingCount()
    touch(a, b)
    const freed = pss - pssOf(a, b) // the buffers' own mappings: not the heaps, whose noise is MiBs
    return { merged: s.pagesSharing - sharing, skipped: s.pagesSkippedBudget, freed, maps, budget, intact: digest(a) === da && digest(b) === db }
  } finally {
    await pm.close()
  }
}

t.test(`64 MiB in 3-page runs, mapBudget = mappings + 300: mergeNow() merges >= 95% of the ${MERGEABLE} mergeable pages`, async (t) => {
  const r = await run(true)
  t.comment(`spans: ${r.merged} pages merged, ${r.skipped} skipped for the budget, Pss -${(r.freed / MiB).toFixed(1)} MiB, mappings ${r.maps} of ${r.budget}`)
  t.ok(r.merged >= 0.95 * MERGEABLE, `${r.merged} pages merged`)
  t.ok(Math.abs(r.freed - r.merged * PAGE) <= 0.01 * r.merged * PAGE, `and the buffers' Pss agrees within 1%: ${(r.freed / MiB).toFixed(1)} MiB freed for ${((r.merged * PAGE) / MiB).toFixed(1)} MiB merged`)
  t.ok(r.maps <= r.budget, 'the budget held')
  t.ok(r.intact, 'every byte of both buffers reads back')
})

t.test('the same without spans (PAGEMERGE_NO_SPANS=1): the budget stops it early', async (t) => {
  const r = await run(false)
  t.comment(`no spans: ${r.merged} pages merged, ${r.skipped} skipped for the budget, Pss -${(r.freed / MiB).toFixed(1)} MiB, mappings ${r.maps} of ${r.budget}`)
  t.ok(r.merged < 0.2 * MERGEABLE, `only ${r.merged} pages merged`)
  t.ok(r.skipped > 0, 'the rest were left to the budget')
  t.ok(r.intact, 'every byte of both buffers reads back')
})

// Zero pages the same way: three pages in four zero (the `sparse` benchmark's pattern). Each run
// of zero pages in a memfd window must become anonymous memory to read as the kernel's zero page;
// one anonymous span per up to 4 MiB (the fourth pages copied into it) keeps that within a tight
// budget, where one mapping per run would leave most runs punched in place, which reading allocates.
const ZEROS = (PAGES * 3) / 4

async function sparse(spans: boolean) {
  const pm = await warmMerger(spans, 50)
  try {
    const z = fillRandom(pm.alloc(BYTES), 51)
    await pm.mergeNow() // nothing to drop yet: the coordinator's tables grow first
    for (let p = 0; p < PAGES; p++) if (p % 4 !== 3) z.fill(0, p * PAGE, (p + 1) * PAGE)
    const dz = digest(z)
    touch(z)
    const pss = pssOf(z), zeros = pm.stats().zeroPages
    const budget = native.mappingCount() + 300
    pm.setOptions({ mapBudget: budget })
    const s = await pm.mergeNow()
    const maps = native.mappingCount()
    touch(z) // every byte read back: a dropped page must read as the zero page, not be allocated again
    const freed = pss - pssOf(z)
    const intact = digest(z) === dz
    z[5 * PAGE] = 7 // a write into a dropped page gets a private page of its own
    return { dropped: s.zeroPages - zeros, freed, maps, budget, intact, written: z[5 * PAGE] === 7 && z[4 * PAGE] === 0 && z[6 * PAGE] === 0 }
  } finally {
    await pm.close()
  }
}

t.test(`32 MiB, three pages in four zero, mapBudget = mappings + 300: all ${ZEROS} zero pages dropped, and still free after reading`, async (t) => {
  const r = await sparse(true)
  t.comment(`spans: ${r.dropped} zero pages dropped, Pss -${(r.freed / MiB).toFixed(1)} MiB after reading every byte, mappings ${r.maps} of ${r.budget}`)
  t.equal(r.dropped, ZEROS, 'every zero page dropped')
  t.ok(r.freed >= 0.99 * ZEROS * PAGE, `the buffer's Pss fell by ${(r.freed / MiB).toFixed(1)} MiB of ${((ZEROS * PAGE) / MiB).toFixed(1)} MiB, reads included`)
  t.ok(r.maps <= r.budget, 'the budget held')
  t.ok(r.intact, 'every byte reads back')
  t.ok(r.written, 'a write into a dropped page lands, and only there')
})

t.test('the same without spans (PAGEMERGE_NO_SPANS=1): pages punched in place come back when read', async (t) => {
  const r = await sparse(false)
  t.comment(`no spans: ${r.dropped} zero pages dropped, Pss -${(r.freed / MiB).toFixed(1)} MiB after reading every byte, mappings ${r.maps} of ${r.budget}`)
  t.ok(r.freed < 0.5 * ZEROS * PAGE, `Pss fell by only ${(r.freed / MiB).toFixed(1)} MiB`)
  t.ok(r.intact, 'every byte reads back')
  t.ok(r.written, 'a write into a dropped page lands, and only there')
})
