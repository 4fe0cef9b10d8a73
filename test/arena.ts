// The native page bridge, judged by what the OS reports: Pss, page frames, mappings, file blocks.
import t from 'tap'
import { readFileSync } from 'node:fs'
import { loadNative, PageState, Status, NO_POOL } from '../lib/native'
import { smapsRollup } from '../lib/procfs'
import { digest, fillRandom, gcUntil, isRoot, MiB, PAGE, pssOf, touch } from './fixtures/util'

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


t.test('two identical 32 MiB buffers merge: Pss halves, few mappings, bytes intact', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 32 * MiB, 1)
  const da = digest(a), db = digest(b)
  touch(a, b)
  const mapsBefore = mappingsOverAll(a, b) // read outside the Pss window: reading /proc/self/maps makes garbage
  const before = { pss: smapsRollup().Pss, maps: mapsBefore }
  mergePair(arena, a, b)
  touch(a, b) // every page mapped again, so that Pss counts what the buffers really use
  const after = { pss: smapsRollup().Pss, maps: mappingsOverAll(a, b) }
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

t.test('private zero pages dropped in many extents of one call: a written extent is left alone, the rest dropped', async (t) => {
  const arena = new native.Arena()
  const z = new Uint8Array(arena.alloc(32 * MiB, false))
  for (let i = 0; i < z.length; i += PAGE) z[i] = 1
  z.fill(0)
  z[5 * 512 * PAGE + 77] = 42 // the 6th of 16 extents of 512 pages is not all zero
  const pss = smapsRollup().Pss
  const n = 16, per = 512, status = new Int32Array(n + 1)
  // end to end, then the first extent once more: a page named twice is checked (and dropped) again
  const list = new Uint32Array([...Array.from({ length: n }, (_, k) => [arena.idOf(z), k * per, per]).flat(), arena.idOf(z), 0, per])
  const dropped = arena.dropZero(list, status, BUDGET)
  t.equal(dropped, (n - 1) * per + per, 'every other extent dropped, the first twice')
  t.same([...status], [...Array.from({ length: n }, (_, k) => (k === 5 ? Status.MISMATCH : Status.OK)), Status.OK])
  t.ok(pss - smapsRollup().Pss >= 29 * MiB, `Pss fell by ${((pss - smapsRollup().Pss) / MiB).toFixed(1)} MiB`)
  t.equal(z[5 * 512 * PAGE + 77], 42, 'the written extent keeps its byte')
  t.ok(z.every((x, i) => x === (i === 5 * 512 * PAGE + 77 ? 42 : 0)), 'every other byte reads zero')
  z[3 * PAGE] = 9
  t.equal(z[3 * PAGE], 9, 'writes work')
  t.equal(z[4 * PAGE], 0, 'and stay in their own page')
})

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

/** The mappings (lines of /proc/self/maps) that cover part of `buf`. */
/**
 * Mappings over the buffers' ranges: what a merge of theirs creates. The process's own count also
 * moves with V8, which maps and unmaps heap pages on its threads meanwhile (seen: -11 to +5 over
 * one merge call that added 1).
 */
function mappingsOverAll(...bufs: Uint8Array[]): number {
  return bufs.reduce((n, b) => n + mappingsOver(b), 0)
}

function mappingsOver(buf: Uint8Array): number {
  const lo = native.addressOf(buf), hi = lo + BigInt(buf.byteLength)
  return readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => {
    if (!l) return false
    const [s, e] = l.split(' ')[0]!.split('-').map((x) => BigInt('0x' + x))
    return s! < hi && e! > lo
  }).length
}

/** Stabilizes `a` and merges `b` onto it as the coordinator sends them: extents of `per` pages, one call each. */
function mergeExtents(arena: InstanceType<typeof native.Arena>, a: Uint8Array, b: Uint8Array, per: number) {
  const n = a.byteLength / PAGE / per
  const st = new Uint32Array(n * 4), mg = new Uint32Array(n * 4), pool = new Uint32Array(n)
  for (let k = 0; k < n; k++) st.set([arena.idOf(a), k * per, per, 1], 4 * k)
  const stStatus = new Int32Array(n), status = new Int32Array(n)
  if (arena.stabilize(st, stStatus, BUDGET, pool) !== n * per || !stStatus.every((s) => s === Status.OK)) throw new Error('stabilize')
  for (let k = 0; k < n; k++) mg.set([arena.idOf(b), k * per, pool[k]!, per], 4 * k)
  const file = arena.stats().arenaBytes
  const merged = arena.merge(mg, status, BUDGET)
  return { merged, status, pool, file, fileAfter: arena.stats().arenaBytes }
}

t.test('a long extent whose last pages differ is left alone entirely and reported', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 24 * MiB, 22)
  const pages = b.byteLength / PAGE
  const status = new Int32Array(1), pool = new Uint32Array(1)
  arena.stabilize(new Uint32Array([arena.idOf(a), 0, pages, 1]), status, BUDGET, pool)
  const changed = pages - 7 // near the end: every page before it matches
  b[changed * PAGE + 9] = b[changed * PAGE + 9]! ^ 1
  const db = digest(b)
  const file = arena.stats().arenaBytes
  const merged = arena.merge(new Uint32Array([arena.idOf(b), 0, pool[0]!, pages]), status, BUDGET)
  t.equal(status[0], Status.MISMATCH, 'the extent is reported')
  t.equal(merged, 0, 'no page of it merged')
  const states = new Uint8Array(pages), pools = new Uint32Array(pages)
  arena.pageStates(b, 0, pages, states, pools)
  t.ok(states.every((s) => s === PageState.SHARED), 'every page keeps its own page')
  t.equal(arena.stats().arenaBytes, file, 'nothing punched')
  t.equal(mappingsOver(b), 1, 'its window is one mapping, as before')
  t.equal(digest(b), db, 'bytes unchanged')
})

for (const spans of [true, false]) {
  t.test(`many extents in one merge call${spans ? '' : ' (PAGEMERGE_NO_SPANS=1: one mapping per extent)'}: all merged, their pages punched by the time merge() returns, few mappings, bytes intact`, async (t) => {
    if (!spans) process.env.PAGEMERGE_NO_SPANS = '1' // read when an arena is made
    const arena = new native.Arena()
    delete process.env.PAGEMERGE_NO_SPANS
    const { a, b } = pair(arena, 32 * MiB, 23)
    const da = digest(a), pages = b.byteLength / PAGE
    touch(a, b)
    const before = { pss: pssOf(a, b), maps: mappingsOverAll(a, b) }
    const { merged, status, pool, file, fileAfter } = mergeExtents(arena, a, b, 512)
    const maps = mappingsOverAll(a, b)
    t.equal(merged, pages, 'every page merged')
    t.ok(status.every((s) => s === Status.OK), 'every extent OK')
    t.equal(fileAfter, file - b.byteLength, "the second buffer's own pages are punched when merge() returns")
    t.equal(arena.stats().punchFailures, 0)
    touch(a, b)
    const freed = before.pss - pssOf(a, b)
    t.ok(Math.abs(freed - b.byteLength) <= 0.01 * b.byteLength, `Pss of the buffers fell by ${(freed / MiB).toFixed(2)} MiB (32 MiB merged)`)
    t.ok(maps - before.maps <= 4, `mappings over the buffers grew by ${maps - before.maps}`)
    t.ok(mappingsOver(b) <= (spans ? 16 : 64), `b is ${mappingsOver(b)} mappings`)
    const states = new Uint8Array(pages), pools = new Uint32Array(pages)
    arena.pageStates(b, 0, pages, states, pools)
    t.ok(states.every((s) => s === PageState.MERGED), 'every page maps the pool')
    t.ok(pools.every((p, k) => p === pool[k >> 9]! + (k & 511)), 'at its own pool page')
    t.equal(digest(a), da, 'first buffer reads back its bytes')
    t.equal(digest(b), da, 'second buffer reads back its bytes')
  })
}

t.test('many extents in one merge call, a middle one differs: only it is left alone', async (t) => {
  const arena = new native.Arena()
  const { a, b } = pair(arena, 16 * MiB, 24)
  const pages = b.byteLength / PAGE, bad = 3 // extents of 512 pages: the 4th of 8
  b[(bad * 512 + 100) * PAGE + 3] = b[(bad * 512 + 100) * PAGE + 3]! ^ 1
  const db = digest(b)
  const { merged, status, file, fileAfter } = mergeExtents(arena, a, b, 512)
  t.same([...status], [0, 1, 2, 3, 4, 5, 6, 7].map((k) => (k === bad ? Status.MISMATCH : Status.OK)), 'that extent is reported, the others merged')
  t.equal(merged, pages - 512, 'the other extents merged in full')
  const states = new Uint8Array(pages), pools = new Uint32Array(pages)
  arena.pageStates(b, 0, pages, states, pools)
  t.ok(states.every((s, p) => s === ((p >> 9) === bad ? PageState.SHARED : PageState.MERGED)), 'its pages keep their own pages, the rest map the pool')
  t.equal(fileAfter, file - (pages - 512) * PAGE, 'only the merged pages were punched')
  t.equal(arena.stats().punchFailures, 0)
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

t.test('thousands of runs, merged and unmerged in random order, each page maps what a model says', async (t) => {
  // native/run_map.h keeps a buffer's runs in blocks of 256: single-page runs in random order
  // split blocks, and unmerged ranges cut runs, empty blocks and cross block ends
  const arena = new native.Arena()
  const pages = 3000
  const { a, b } = pair(arena, pages * PAGE, 12)
  const status = new Int32Array(pages)
  const firstPool = new Uint32Array(1)
  t.equal(arena.stabilize(new Uint32Array([arena.idOf(a), 0, pages, 1]), status, BUDGET, firstPool), pages)
  const pool = firstPool[0]!
  const model = new Uint32Array(pages).fill(NO_POOL) // b's page -> the pool page it maps
  let seed = 7
  const rand = (n: number) => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) >>> 8) % n
  // extents [first page, count] of b onto the pool pages of a's same pages
  const merge = (list: Array<[number, number]>) => {
    const ext = new Uint32Array(list.flatMap(([k, n]) => [arena.idOf(b), k, pool + k, n]))
    arena.merge(ext, status, BUDGET)
    list.forEach(([k, n], i) => {
      if (status[i] === Status.OK) for (let j = k; j < k + n; j++) model[j] = pool + j
    })
  }
  const check = (what: string) => {
    const states = new Uint8Array(pages), pools = new Uint32Array(pages)
    arena.pageStates(b, 0, pages, states, pools)
    let wrong = 0
    for (let k = 0; k < pages; k++) if (pools[k] !== model[k] || (states[k] === PageState.MERGED) !== (model[k] !== NO_POOL)) wrong++
    t.equal(wrong, 0, `${what}: every page maps the pool page the model says`)
  }
  // even pages in random order: 1500 runs of a page, inserted anywhere
  const even = Array.from({ length: pages / 2 }, (_, j) => 2 * j)
  for (let i = even.length - 1; i > 0; i--) {
    const j = rand(i + 1)
    ;[even[i], even[j]] = [even[j]!, even[i]!]
  }
  merge(even.map((k) => [k, 1]))
  check('even pages merged in random order')
  for (let round = 0; round < 40; round++) {
    const first = rand(pages), count = 1 + rand(Math.min(300, pages - first))
    t.ok(arena.unmerge(new Uint32Array([arena.idOf(b), first, count]), status, BUDGET) >= 0)
    model.fill(NO_POOL, first, first + count)
    // the range merged again as extents of 1 to 40 pages with gaps (runs that later unmerges cut
    // in their middle), in random order; consecutive extents join into one run
    const ext: Array<[number, number]> = []
    for (let k = first; k < first + count; ) {
      const n = Math.min(1 + rand(40), first + count - k)
      if (rand(4) !== 0) ext.push([k, n])
      k += n
    }
    for (let i = ext.length - 1; i > 0; i--) {
      const j = rand(i + 1)
      ;[ext[i], ext[j]] = [ext[j]!, ext[i]!]
    }
    merge(ext)
  }
  check('after 40 rounds of random unmerges and merges')
  const refs = new Uint32Array(pages)
  arena.poolRefs(pool, pages, refs)
  t.same([...refs], [...model].map((p) => (p === NO_POOL ? 1 : 2)), 'each pool page counts its mappings')
  t.equal(digest(b), digest(a), 'b reads its bytes')
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

t.test('reapWritten() over many small buffers side by side finds exactly the pages written', async (t) => {
  // Small buffers lie end to end in the arena, and one pagemap read serves a run of them: each
  // extent must still read its own entries.
  const arena = new native.Arena()
  const source = fillRandom(new Uint8Array(arena.alloc(2 * PAGE, true)), 61)
  const small = Array.from({ length: 40 }, () => new Uint8Array(arena.alloc(2 * PAGE, true)))
  const apart = new Uint8Array(arena.alloc(64 * MiB, true)) // between them and the last one: a gap
  const last = new Uint8Array(arena.alloc(2 * PAGE, true))
  const all = [...small, last]
  const at = (b: Uint8Array) => Number(native.addressOf(b))
  t.ok(small.every((b, i) => i === 0 || at(b) === at(small[i - 1]!) + 2 * PAGE), 'the small buffers lie end to end')
  t.ok(at(last) >= at(apart) + apart.byteLength, 'and the last one apart from them')
  const status = new Int32Array(1), pool = new Uint32Array(1)
  arena.stabilize(new Uint32Array([arena.idOf(source), 0, 2, all.length]), status, BUDGET, pool)
  for (const b of all) {
    b.set(source)
    t.equal(arena.merge(new Uint32Array([arena.idOf(b), 0, pool[0]!, 2]), status, BUDGET), 2)
  }
  const written = new Map([[17, 1], [30, 0], [40, 1]]) // buffer -> page
  for (const [i, p] of written) all[i]![p * PAGE + 9] = all[i]![p * PAGE + 9]! ^ 0x5a
  const extents = new Uint32Array(all.flatMap((b) => [arena.idOf(b), 0, 2]))
  const counts = new Int32Array(all.length)
  t.equal(arena.reapWritten(extents, counts), 3, 'three pages were written')
  t.same([...counts], all.map((_, i) => (written.has(i) ? 1 : 0)), 'each in the buffer that was written')
  const states = new Uint8Array(2), pools = new Uint32Array(2)
  t.ok(
    all.every((b, i) => {
      arena.pageStates(b, 0, 2, states, pools)
      return [0, 1].every((p) => states[p] === (written.get(i) === p ? PageState.WRITTEN : PageState.MERGED))
    }),
    'and at the page that was written',
  )
})

// ---- spans: many extents of one buffer, one mapping ----

/**
 * Two buffers of `bytes` with equal random bytes except page 4k of each, which differs (the
 * `volatile` benchmark's pattern): duplicates come in runs of 3 pages, [4k + 1, 4k + 4).
 */
function fragmentedPair(arena: InstanceType<typeof native.Arena>, bytes: number, seed: number) {
  const { a, b } = pair(arena, bytes, seed)
  const other = fillRandom(new Uint8Array(bytes), seed + 1)
  for (let p = 0; p < bytes / PAGE; p += 4) b.set(other.subarray(p * PAGE, (p + 1) * PAGE), p * PAGE)
  return { a, b }
}

/** What the coordinator does with a fragmented pair: stabilizes a's 3-page runs, merges b's onto them. */
function mergeRuns(arena: InstanceType<typeof native.Arena>, a: Uint8Array, b: Uint8Array, budget = BUDGET) {
  const runs = a.byteLength / PAGE / 4
  const st = new Uint32Array(runs * 4), mg = new Uint32Array(runs * 4), pool = new Uint32Array(runs)
  for (let k = 0; k < runs; k++) st.set([arena.idOf(a), 4 * k + 1, 3, 1], 4 * k)
  const stStatus = new Int32Array(runs), mgStatus = new Int32Array(runs)
  const stabilized = arena.stabilize(st, stStatus, budget, pool)
  for (let k = 0; k < runs; k++) mg.set([arena.idOf(b), 4 * k + 1, pool[k]!, 3], 4 * k)
  const made = mg.filter((_, i) => i % 4 !== 2 || pool[i >> 2] !== NO_POOL)
  const merged = arena.merge(made.length === mg.length ? mg : made, mgStatus, budget)
  return { stabilized, merged, stStatus, mgStatus, pool }
}

const statesOf = (arena: InstanceType<typeof native.Arena>, buf: Uint8Array, first: number, count: number) => {
  const states = new Uint8Array(count), pools = new Uint32Array(count)
  arena.pageStates(buf, first, count, states, pools)
  return { states, pools }
}

for (const spans of [true, false]) {
  t.test(`32 MiB duplicates in 3-page runs merge as ${spans ? 'spans: a few mappings' : 'separate extents (PAGEMERGE_NO_SPANS=1): a mapping or two per run'}`, async (t) => {
    if (spans) delete process.env.PAGEMERGE_NO_SPANS
    else process.env.PAGEMERGE_NO_SPANS = '1'
    const arena = new native.Arena()
    delete process.env.PAGEMERGE_NO_SPANS
    const { a, b } = fragmentedPair(arena, 32 * MiB, 11)
    const da = digest(a), db = digest(b)
    touch(a, b)
    const mapsBefore = mappingsOverAll(a, b) // read outside the Pss window: reading /proc/self/maps makes garbage
    const before = { pss: smapsRollup().Pss, maps: mapsBefore }
    const { stabilized, merged, stStatus, mgStatus } = mergeRuns(arena, a, b)
    touch(a, b)
    const freed = before.pss - smapsRollup().Pss
    const maps = mappingsOverAll(a, b)
    t.comment(`mappings ${before.maps} -> ${maps} (+${maps - before.maps}); Pss -${(freed / MiB).toFixed(1)} MiB`)
    t.equal(digest(a), da, 'first buffer reads back its bytes')
    t.equal(digest(b), db, 'second buffer reads back its bytes')
    if (!spans) {
      // Before spans: 2048 runs in each buffer, each its own mapping between two more.
      t.ok(maps - before.maps > 4000, 'thousands of mappings')
      return
    }
    t.equal(stabilized, 6144, 'every run stabilized')
    t.equal(merged, 6144, 'every run merged')
    t.ok(stStatus.every((s) => s === Status.OK) && mgStatus.every((s) => s === Status.OK), 'every extent OK')
    // A span is at most 1024 pages (writers wait while it is protected) and a span whose gap
    // pages hold private copies does not join its neighbour: 8 spans in each buffer, each
    // between two pieces of the old mapping.
    t.ok(maps - before.maps <= 34, `mappings grew by ${maps - before.maps} (<= 34: 16 spans of 4 MiB)`)
    t.ok(freed >= 0.7 * 24 * MiB, `Pss fell by ${(freed / MiB).toFixed(1)} MiB (>= 0.7 x 24 MiB)`)
    // plus the gap pages before each span (pages 0, 1024, ... of each buffer), still in their windows
    t.equal(arena.stats().arenaBytes, 24 * MiB + 16 * PAGE, 'the file holds the pool pages and no gap copy: those are anonymous, no hole was filled')
    t.equal(arena.stats().poolPages, 6144, 'a pool page per merged pair')
    const sa = statesOf(arena, a, 0, 8192), sb = statesOf(arena, b, 0, 8192)
    let gapsWritten = 0, runsMerged = 0
    for (let p = 0; p < 8192; p++) {
      if (p % 4 === 0) gapsWritten += +(sa.states[p] === PageState.WRITTEN && sb.states[p] === PageState.WRITTEN)
      else runsMerged += +(sa.states[p] === PageState.MERGED && sb.states[p] === PageState.MERGED && sa.pools[p] === sb.pools[p])
    }
    // gaps at a span's edge (page 0 and between spans) keep their old mapping
    t.ok(gapsWritten >= 2048 - 16, `${gapsWritten} gap pages are private copies inside spans`)
    t.equal(runsMerged, 6144, 'every run maps its pool pages in both buffers')
    if (isRoot) {
      const pa = new BigUint64Array(8192), pb = new BigUint64Array(8192)
      native.pagemap(a, 0, 8192, pa)
      native.pagemap(b, 0, 8192, pb)
      const pfn = (e: bigint) => e & ((1n << 55n) - 1n)
      let same = 0, gapsApart = 0
      for (let i = 0; i < 8192; i++) {
        if (i % 4 !== 0) same += +(pfn(pa[i]!) !== 0n && pfn(pa[i]!) === pfn(pb[i]!))
        else gapsApart += +(pfn(pa[i]!) !== pfn(pb[i]!))
      }
      t.equal(same, 6144, 'every merged pair shares one page frame')
      t.equal(gapsApart, 2048, 'no gap page shares one')
    }

    // writes stay private: into a gap page and into a merged page of each buffer
    const ea = new Uint8Array(a), eb = new Uint8Array(b) // what each should read
    for (const [buf, shadow, at] of [[a, ea, 8 * PAGE + 5], [b, eb, 8 * PAGE + 6], [a, ea, 9 * PAGE + 7], [b, eb, 10 * PAGE + 8]] as const) {
      buf[at] = buf[at]! ^ 0x5a
      shadow[at] = buf[at]!
    }
    t.equal(Buffer.compare(a, ea), 0, 'a reads its own writes, in a gap page and a merged page')
    t.equal(Buffer.compare(b, eb), 0, 'b reads its own writes, and none of a\'s')
    t.equal(arena.reapWritten(new Uint32Array([arena.idOf(a), 0, 8192, arena.idOf(b), 0, 8192])), 2, 'the two written merged pages leave the pool; gap pages were never in it')

    // gap pages merge, drop and unmerge later like any page
    b.set(a.subarray(12 * PAGE, 13 * PAGE), 12 * PAGE) // b's gap page 12 = a's
    eb.set(a.subarray(12 * PAGE, 13 * PAGE), 12 * PAGE)
    const status = new Int32Array(1), pool = new Uint32Array(1)
    t.equal(arena.stabilize(new Uint32Array([arena.idOf(a), 12, 1, 1]), status, BUDGET, pool), 1, 'a gap page becomes a pool page (copied)')
    t.equal(arena.merge(new Uint32Array([arena.idOf(b), 12, pool[0]!, 1]), status, BUDGET), 1, 'and the other\'s gap page merges onto it')
    t.equal(statesOf(arena, b, 12, 1).states[0], PageState.MERGED, 'merged')
    b.fill(0, 16 * PAGE, 17 * PAGE)
    eb.fill(0, 16 * PAGE, 17 * PAGE)
    t.equal(arena.dropZero(new Uint32Array([arena.idOf(b), 16, 1]), status, BUDGET), 1, 'a gap page written with zeros is dropped')
    t.equal(statesOf(arena, b, 16, 1).states[0], PageState.ANON, 'as fresh anonymous memory')
    t.equal(Buffer.compare(a, ea), 0, 'a reads right')
    t.equal(Buffer.compare(b, eb), 0, 'b reads right')
    t.equal(arena.unmerge(new Uint32Array([arena.idOf(a), 0, 8192, arena.idOf(b), 0, 8192]), new Int32Array(2), BUDGET), 16384 - 1, 'unmerge makes every page private again')
    t.equal(Buffer.compare(a, ea), 0, 'a reads its bytes after unmerging')
    t.equal(Buffer.compare(b, eb), 0, 'b reads its bytes after unmerging')
    t.equal(arena.stats().poolPages, 0, 'no pool page left')
    t.equal(arena.stats().arenaBytes, 0, 'and the file is empty')
  })
}

t.test('a span with extents that no longer match: those are reported and keep their bytes', async (t) => {
  const arena = new native.Arena()
  const { a, b } = fragmentedPair(arena, 4 * MiB, 12)
  const runs = 256
  const st = new Uint32Array(runs * 4), pool = new Uint32Array(runs)
  for (let k = 0; k < runs; k++) st.set([arena.idOf(a), 4 * k + 1, 3, 1], 4 * k)
  arena.stabilize(st, new Int32Array(runs), BUDGET, pool)
  // b changes in runs 5 (inside the span), 0 and 255 (its ends, so the span shrinks to 1..254)
  for (const k of [0, 5, 255]) b[(4 * k + 2) * PAGE + 9] = b[(4 * k + 2) * PAGE + 9]! ^ 1
  const db = digest(b), da = digest(a)
  const mg = new Uint32Array(runs * 4), status = new Int32Array(runs)
  for (let k = 0; k < runs; k++) mg.set([arena.idOf(b), 4 * k + 1, pool[k]!, 3], 4 * k)
  const maps = native.mappingCount()
  t.equal(arena.merge(mg, status, BUDGET), 3 * (runs - 3), 'every matching run merged')
  t.same([status[0], status[5], status[255]], [Status.MISMATCH, Status.MISMATCH, Status.MISMATCH], 'the changed runs are reported')
  t.equal(status.filter((s) => s === Status.OK).length, runs - 3, 'the others are OK')
  t.ok(native.mappingCount() - maps <= 2, `one span: ${native.mappingCount() - maps} mappings more`)
  t.equal(digest(b), db, 'b reads back its bytes, changed runs included')
  t.equal(digest(a), da, 'a too')
  const s = statesOf(arena, b, 0, 1024)
  t.same([s.states[1], s.states[21], s.states[1021]], [PageState.SHARED, PageState.WRITTEN, PageState.SHARED], 'a run inside the span became private copies; those outside it are untouched')
  const refs = new Uint32Array(3)
  arena.poolRefs(pool[5]!, 3, refs)
  t.same([...refs], [1, 1, 1], 'the refused run\'s pool pages are mapped by their owner only')
  // a's 768 pool pages and its page 0 (before its span), b's pages 0-4 and 1020-1023 (outside its span)
  t.equal(arena.stats().arenaBytes, (768 + 1 + 9) * PAGE, 'the file holds pool pages and the window pages outside the spans only')
})
