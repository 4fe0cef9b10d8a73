// The native page bridge, judged by what the OS reports: Pss, page frames, mappings, file blocks.
import t from 'tap'
import { loadNative, PageState, Status, NO_POOL } from '../lib/native'
import { rangePss, smapsRollup } from '../lib/procfs'
import { digest, fillRandom, gcUntil, isRoot, MiB, PAGE } from './fixtures/util'

const native = loadNative()
const BUDGET = 1e9 // tests that are not about the budget do not want it in the way

function pair(arena: InstanceType<typeof native.Arena>, bytes: number, seed: number, shared = true) {
  const a = new Uint8Array(arena.alloc(bytes, shared))
  const b = new Uint8Array(arena.alloc(bytes, shared))
  fillRandom(a, seed)
  b.set(a)
  return { a, b }
}

function mergePair(arena: InstanceType<typeof native.Arena>, a: Uint8Array, b: Uint8Array) {
  const pages = a.byteLength / PAGE
  const status = new Int32Array(1)
  const pool = new Uint32Array(1)
  const stabilized = arena.stabilize(new Uint32Array([arena.idOf(a), 0, pages, 1]), status, BUDGET, pool)
  if (stabilized !== pages || status[0] !== Status.OK) throw new Error(`stabilize: ${status[0]}`)
  const merged = arena.merge(new Uint32Array([arena.idOf(b), 0, pool[0]!, pages]), status, BUDGET)
  if (merged !== pages || status[0] !== Status.OK) throw new Error(`merge: ${status[0]}`)
  return pool[0]!
}

/** Reads every page (natively, so the JS heap stays still) so that Pss counts what is mapped. */
const touch = (...bufs: Uint8Array[]) => bufs.forEach((b) => native.hashPages(b, 0, b.byteLength / PAGE, new BigUint64Array(b.byteLength / PAGE), 0))
/** Pss of the mappings over the buffers' address span (each mapping once: neighbours may share one). */
const pssOf = (...bufs: Uint8Array[]) => {
  const lo = bufs.map((b) => native.addressOf(b)).reduce((m, x) => (x < m ? x : m))
  const hi = bufs.map((b) => native.addressOf(b) + BigInt(b.byteLength)).reduce((m, x) => (x > m ? x : m))
  return rangePss(lo, Number(hi - lo))
}

t.test('two identical 32 MiB buffers merge: Pss halves, few mappings, bytes intact', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 32 * MiB, 1)
  const da = digest(a), db = digest(b)
  touch(a, b)
  const before = { pss: smapsRollup().Pss, maps: native.mappingCount() }
  mergePair(arena, a, b)
  const maps = native.mappingCount()
  touch(a, b) // every page mapped again, so that Pss counts what the buffers really use
  const after = { pss: smapsRollup().Pss, maps }
  t.ok(before.pss - after.pss >= 30 * MiB, `Pss fell by ${((before.pss - after.pss) / MiB).toFixed(1)} MiB`)
  t.ok(after.maps - before.maps <= 4, `mappings grew by ${after.maps - before.maps}`)
  t.equal(digest(a), da, 'first buffer reads back its bytes')
  t.equal(digest(b), db, 'second buffer reads back its bytes')
  t.equal(arena.stats().poolPages, 8192, 'one pool page per merged pair')
  t.equal(arena.stats().arenaBytes, 32 * MiB, 'the arena file holds one copy')
  if (!isRoot) {
    t.skip('needs root: reads page frame numbers from /proc/self/pagemap')
    return
  }
  const pa = new BigUint64Array(8192), pb = new BigUint64Array(8192)
  native.pagemap(a, 0, 8192, pa)
  native.pagemap(b, 0, 8192, pb)
  const pfn = (e: bigint) => e & ((1n << 55n) - 1n)
  let same = 0
  for (let i = 0; i < 8192; i++) if (pfn(pa[i]!) !== 0n && pfn(pa[i]!) === pfn(pb[i]!)) same++
  t.equal(same, 8192, 'every page pair shares one page frame')
})

t.test('a write after merging stays in the writer: one page of Pss more', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 4 * MiB, 2)
  mergePair(arena, a, b)
  touch(a, b)
  const db = digest(b)
  const pss = pssOf(a, b)
  a[5 * PAGE + 7] = a[5 * PAGE + 7]! ^ 0xff
  t.not(a[5 * PAGE + 7], b[5 * PAGE + 7], 'the writer sees its write')
  t.equal(digest(b), db, 'the other sharer is untouched')
  t.equal(pssOf(a, b) - pss, PAGE, 'Pss grew by exactly one page')
  const reaped = arena.reapWritten(new Uint32Array([arena.idOf(a), 0, 1024]))
  t.equal(reaped, 1, 'pagemap shows the written page left the pool')
  const refs = new Uint32Array(1)
  const states = new Uint8Array(1), pools = new Uint32Array(1)
  arena.pageStates(a, 5, 1, states, pools)
  arena.poolRefs(arena.stats().poolPages ? pools[0]! : 0, 1, refs)
  t.equal(states[0], PageState.WRITTEN)
  t.equal(pools[0], NO_POOL)
})

for (const shared of [true, false]) {
  t.test(`64 MiB of written zero pages are dropped (${shared ? 'memfd window' : 'private anonymous'})`, async (t) => {
    const arena = new native.Arena()
    const z = new Uint8Array(arena.alloc(64 * MiB, shared))
    for (let i = 0; i < z.length; i += PAGE) z[i] = 1 // really allocate every page
    z.fill(0)
    const pss = smapsRollup().Pss
    const status = new Int32Array(1)
    const maps = native.mappingCount()
    const dropped = arena.dropZero(new Uint32Array([arena.idOf(z), 0, 16384]), status, BUDGET)
    const added = native.mappingCount() - maps // counted at once: reading /proc below grows V8's heap, which maps memory too
    t.equal(dropped, 16384)
    t.equal(status[0], Status.OK)
    t.ok(pss - smapsRollup().Pss >= 60 * MiB, `Pss fell by ${((pss - smapsRollup().Pss) / MiB).toFixed(1)} MiB`)
    t.ok(added <= 2, `at most two more mappings (${added})`)
    t.ok(z.every((x) => x === 0), 'reads return zeros')
    t.equal(arena.stats().arenaBytes, 0, 'the arena holds nothing for them')
    z[3 * PAGE] = 9
    t.equal(z[3 * PAGE], 9, 'writes work')
    t.equal(z[4 * PAGE], 0, 'and stay in their own page')
  })
}

t.test('zero pages of a memfd window with no room in the budget: punched in place, no new mapping', async (t) => {
  const arena = new native.Arena()
  const z = new Uint8Array(arena.alloc(16 * MiB, true))
  for (let i = 0; i < z.length; i += PAGE) z[i] = 1
  z.fill(0)
  const before = arena.stats().arenaBytes
  const status = new Int32Array(64)
  // 64 separate 16-page extents, each of which would cut the window's mapping
  const extents = new Uint32Array(Array.from({ length: 64 }, (_, i) => [arena.idOf(z), i * 64, 16]).flat())
  const maps = native.mappingCount()
  const dropped = arena.dropZero(extents, status, maps)
  const added = native.mappingCount() - maps // counted at once: the heap may grow (and map memory) after
  t.equal(dropped, 64 * 16, 'every extent dropped')
  t.ok(status.every((s) => s === Status.OK), 'each OK')
  t.equal(added, 0, 'not one mapping more')
  t.equal(before - arena.stats().arenaBytes, 64 * 16 * PAGE, 'their pages left the arena file')
  const states = new Uint8Array(16), pools = new Uint32Array(16)
  arena.pageStates(z, 0, 16, states, pools)
  t.ok(states.every((s) => s === PageState.SHARED), 'still the window')
  z[5 * PAGE] = 7
  t.equal(z[5 * PAGE], 7, 'writes work')
  t.ok(z.every((x, i) => x === (i === 5 * PAGE ? 7 : 0)), 'every other byte reads zero')
})

t.test('a merge whose bytes no longer match is refused and reported, nothing changed', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 1 * MiB, 3)
  const status = new Int32Array(2)
  const pool = new Uint32Array(1)
  arena.stabilize(new Uint32Array([arena.idOf(a), 0, 256, 1]), status, BUDGET, pool)
  b[200 * PAGE + 1] = b[200 * PAGE + 1]! ^ 1 // changed after the planner decided
  const db = digest(b)
  const merged = arena.merge(
    new Uint32Array([arena.idOf(b), 0, pool[0]!, 128, arena.idOf(b), 128, pool[0]! + 128, 128]),
    status,
    BUDGET,
  )
  t.equal(merged, 128, 'the matching extent merged')
  t.same([...status], [Status.OK, Status.MISMATCH], 'the changed extent is reported')
  const states = new Uint8Array(256), pools = new Uint32Array(256)
  arena.pageStates(b, 0, 256, states, pools)
  t.ok(states.subarray(128).every((s) => s === PageState.SHARED), 'its pages stay private')
  t.equal(digest(b), db, 'bytes unchanged')
})

t.test('unmerge: Pss back within 2% of before, pool empty, bytes intact', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 32 * MiB, 4)
  const da = digest(a)
  const pss = pssOf(a, b)
  mergePair(arena, a, b)
  const status = new Int32Array(2)
  const unmerged = arena.unmerge(new Uint32Array([arena.idOf(a), 0, 8192, arena.idOf(b), 0, 8192]), status, BUDGET)
  t.equal(unmerged, 16384)
  t.same([...status], [Status.OK, Status.OK])
  t.equal(digest(a), da)
  t.equal(digest(b), da)
  const now = pssOf(a, b)
  t.ok(Math.abs(now - pss) <= pss * 0.02, `Pss ${now} vs ${pss} before merging`)
  t.equal(arena.stats().poolPages, 0, 'no pool pages')
  t.equal(arena.stats().arenaBytes, 0, 'the arena file holds no bytes')
  b[0] = b[0]! ^ 1
  t.not(a[0], b[0], 'pages are private again')
})

t.test('dropping the last reference unmaps the buffer and frees the pool pages only it used', async (t) => {
  const arena = new native.Arena()
  let kept: Uint8Array | undefined
  let { a, b } = pair(arena, 8 * MiB, 5) as { a?: Uint8Array; b?: Uint8Array }
  mergePair(arena, a!, b!)
  kept = a
  a = undefined
  const da = digest(kept!)
  b = undefined
  t.ok(await gcUntil(() => arena.stats().allocations === 1), 'the dropped buffer was collected')
  t.equal(arena.stats().arenaBytes, 8 * MiB, 'pool pages the survivor maps stay')
  t.equal(digest(kept!), da, 'the survivor reads its bytes')
  // A buffer merged with itself: its two halves share pool pages only it uses.
  let self: Uint8Array | undefined = new Uint8Array(arena.alloc(8 * MiB, true))
  fillRandom(self.subarray(0, 4 * MiB), 6)
  self.copyWithin(4 * MiB, 0, 4 * MiB)
  const status = new Int32Array(1), pool = new Uint32Array(1)
  arena.stabilize(new Uint32Array([arena.idOf(self), 0, 1024, 1]), status, BUDGET, pool)
  arena.merge(new Uint32Array([arena.idOf(self), 1024, pool[0]!, 1024]), status, BUDGET)
  t.equal(status[0], Status.OK)
  t.equal(arena.stats().arenaBytes, 12 * MiB)
  self = undefined
  kept = undefined
  t.ok(await gcUntil(() => arena.stats().allocations === 0), 'both buffers were collected')
  t.equal(arena.stats().arenaBytes, 0, 'the arena gave every page back')
  t.equal(arena.stats().poolPages, 0)
})

t.test('a merge that would pass the mapping budget is refused, nothing changed', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 1 * MiB, 7)
  const status = new Int32Array(1), pool = new Uint32Array(1)
  arena.stabilize(new Uint32Array([arena.idOf(a), 0, 256, 1]), status, BUDGET, pool)
  const budget = native.mappingCount() + 1 // an interior extent may cost two
  const db = digest(b)
  t.equal(arena.merge(new Uint32Array([arena.idOf(b), 10, pool[0]! + 10, 5]), status, budget), 0)
  t.equal(status[0], Status.BUDGET, 'the extent is refused for the budget')
  const states = new Uint8Array(256), pools = new Uint32Array(256)
  arena.pageStates(b, 0, 256, states, pools)
  t.ok(states.every((s) => s === PageState.SHARED), 'no page was remapped')
  t.equal(digest(b), db)
  t.equal(arena.merge(new Uint32Array([arena.idOf(b), 10, pool[0]! + 10, 5]), status, native.mappingCount() + 2), 5, 'with room for two more mappings it goes ahead')
  t.equal(status[0], Status.OK)
  t.ok(native.mappingCount() <= budget + 1, 'and stays within that budget')
})

t.test('neighbouring buffers share mappings, and the budget still holds', async (t) => {
  const arena = new native.Arena()
  const bufs = Array.from({ length: 1000 }, (_, i) => fillRandom(new Uint8Array(arena.alloc(8192, true)), 100 + i))
  const budget = native.mappingCount() + 10
  // every other buffer: each remapped one cuts the shared mapping of its neighbours (two more mappings)
  const extents = new Uint32Array(bufs.flatMap((b, i) => (i % 2 ? [] : [arena.idOf(b), 0, 2, 0])))
  const status = new Int32Array(500), pool = new Uint32Array(500)
  const done = arena.stabilize(extents, status, budget, pool)
  t.ok(native.mappingCount() <= budget, `${native.mappingCount()} mappings, budget ${budget}`)
  t.ok(done > 0 && done < 1000, `${done / 2} buffers were remapped, the rest refused`)
  t.equal(status.filter((s) => s === Status.BUDGET).length, 500 - done / 2, 'each refused one says BUDGET')
  t.ok(bufs.every((b, i) => digest(b) === digest(fillRandom(new Uint8Array(8192), 100 + i))), 'bytes intact')
})

t.test('stabilize() keeps room in the budget for the merges that follow it', async (t) => {
  const arena = new native.Arena()
  // 20 pairs of separate 2-page buffers (a gap between each keeps them apart), the same bytes within a pair
  const pairs = Array.from({ length: 20 }, (_, i) => {
    const a = fillRandom(new Uint8Array(arena.alloc(8192, true)), 300 + i), b = new Uint8Array(arena.alloc(8192, true))
    b.set(a)
    arena.alloc(4096, false) // a private page between pairs: its own mapping either way
    return [a, b] as const
  })
  const budget = native.mappingCount() + 20
  const status = new Int32Array(20), pool = new Uint32Array(20)
  // each owner is followed by one merge: 2 cuts for the stable page, 2 held for its merge
  const stable = arena.stabilize(new Uint32Array(pairs.flatMap(([a]) => [arena.idOf(a), 0, 2, 1])), status, budget, pool)
  const taken = stable / 2
  t.ok(taken > 0 && taken < 20, `${taken} of 20 stable pages made, each with room for its merge`)
  const ok = [...status.keys()].filter((i) => status[i] === Status.OK)
  const merges = new Uint32Array(ok.flatMap((i) => [arena.idOf(pairs[i]![1]), 0, pool[i]!, 2]))
  const mstatus = new Int32Array(ok.length)
  t.equal(arena.merge(merges, mstatus, budget), 2 * taken, 'and every one of their merges fits')
  t.ok(native.mappingCount() <= budget, `${native.mappingCount()} mappings, budget ${budget}`)
  t.ok(pairs.every(([a, b], i) => digest(a) === digest(b) && digest(a) === digest(fillRandom(new Uint8Array(8192), 300 + i))), 'bytes intact')
})

t.test('private anonymous buffers merge by copying into the pool', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 16 * MiB, 8, false)
  const da = digest(a)
  touch(a, b)
  const pss = pssOf(a, b)
  mergePair(arena, a, b)
  touch(a, b)
  t.ok(pss - pssOf(a, b) >= 15 * MiB, 'Pss of the two buffers fell by about one buffer')
  t.equal(digest(a), da)
  t.equal(digest(b), da)
})

t.test('ten thousand small buffers cost a handful of mappings', async (t) => {
  const arena = new native.Arena()
  const before = native.mappingCount()
  const bufs = Array.from({ length: 10000 }, (_, i) => new Uint8Array(arena.alloc(100 + (i % 5000), true)))
  bufs.forEach((b, i) => (b[0] = i & 0xff))
  t.ok(native.mappingCount() - before <= 4, `mappings grew by ${native.mappingCount() - before}`)
  t.ok(bufs.every((b, i) => b[0] === (i & 0xff)), 'each buffer holds its own bytes')
})

t.test('freed address ranges are reused once no pool page in them is live', async (t) => {
  const arena = new native.Arena(64 * MiB)
  // Allocate and drop 32 MiB ten times in a 64 MiB arena: it only fits if freed ranges come back.
  for (let i = 0; i < 10; i++) {
    let b: Uint8Array | undefined = new Uint8Array(arena.alloc(32 * MiB, true))
    b[i] = 1
    t.equal(b[i + 1], 0, 'a reused range starts as zeros')
    b = undefined
    t.ok(await gcUntil(() => arena.stats().allocations === 0), `round ${i}: collected`)
  }
  // A range whose pages are pool pages for a survivor is not reused until the survivor goes.
  let a: Uint8Array | undefined = new Uint8Array(arena.alloc(16 * MiB, true))
  let b: Uint8Array | undefined = new Uint8Array(arena.alloc(16 * MiB, true))
  fillRandom(a, 9)
  b.set(a)
  mergePair(arena, a, b)
  const db = digest(b)
  a = undefined
  t.ok(await gcUntil(() => arena.stats().allocations === 1))
  t.throws(() => arena.alloc(48 * MiB, true), { code: 'ERR_PAGEMERGE_ARENA_FULL' }, 'the first range still holds pool pages')
  t.equal(digest(b), db, 'the survivor still reads its bytes')
  b = undefined
  t.ok(await gcUntil(() => arena.stats().allocations === 0))
  const c = new Uint8Array(arena.alloc(64 * MiB, true))
  t.ok(c.every((x) => x === 0), 'the whole arena is usable again, zeroed')
  t.equal(arena.stats().poolPages, 0)
})

t.test('a merged run split by unmerging its middle keeps both ends mapped right', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 64 * PAGE, 10)
  const pool = mergePair(arena, a, b)
  const status = new Int32Array(1)
  t.equal(arena.unmerge(new Uint32Array([arena.idOf(b), 20, 10]), status, BUDGET), 10)
  b[25 * PAGE] = b[25 * PAGE]! ^ 1 // the middle is private now
  b[40 * PAGE] = b[40 * PAGE]! ^ 1 // and one page on the right is written
  t.equal(arena.reapWritten(new Uint32Array([arena.idOf(b), 0, 64])), 1)
  const states = new Uint8Array(64), pools = new Uint32Array(64)
  arena.pageStates(b, 0, 64, states, pools)
  const want = (i: number) => (i >= 20 && i < 30 ? [PageState.ANON, NO_POOL] : i === 40 ? [PageState.WRITTEN, NO_POOL] : [PageState.MERGED, pool + i])
  t.ok([...states].every((s, i) => s === want(i)[0] && pools[i] === want(i)[1]), 'each page says what it maps')
  const refs = new Uint32Array(64)
  arena.poolRefs(pool, 64, refs)
  t.same([...refs], Array.from({ length: 64 }, (_, i) => ((i >= 20 && i < 30) || i === 40 ? 1 : 2)), 'each pool page counts its mappings')
  t.equal(digest(a), digest(fillRandom(new Uint8Array(64 * PAGE), 10)), 'a reads its bytes')
  t.equal(b[25 * PAGE], a[25 * PAGE]! ^ 1)
  t.equal(b[40 * PAGE], a[40 * PAGE]! ^ 1)
  t.equal(Buffer.compare(Buffer.from(a.buffer, 41 * PAGE, 23 * PAGE), Buffer.from(b.buffer, 41 * PAGE, 23 * PAGE)), 0, 'the right end still reads the pool')
})
