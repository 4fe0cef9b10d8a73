/**
 * The native bridge against the machine's own limit, in one run: `npm run bench:bridge -- [--runs N] [--json] [--verbose]`.
 *
 * - the limit: one core reading 1 GiB (and 768 MiB) once;
 * - batch hashing of 1 GiB on one thread;
 * - merging two identical 512 MiB memfd windows (stabilize the first, merge the second onto it),
 *   full byte verification included, and the remap/reclaim part derived from it. The goals are
 *   judged on the merge as the coordinator sends it: extents of 512 pages (lib/engine.ts's
 *   MAX_EXTENT_PAGES, which bounds how long a writer waits on write protection: a product
 *   decision, not the bridge's), all in one call each. The same merge as one 512 MiB extent is
 *   an extra row, for comparison, with no goal;
 * - dropping 768 MiB of written zero pages, for both kinds of buffer, judged the same way: extents
 *   of at most 512 pages (lib/engine.ts applyZero cuts every run of zero pages at MAX_EXTENT_PAGES,
 *   since a dropped extent is write-protected from its zero check to its drop too), all in one
 *   dropZero call. The engine's mergeNow() batches are 65,536 pages, so it sends 768 MiB in three
 *   calls; one call is the same work with one helper start and join instead of three (the merge
 *   rows are one call each too). The same drops as one 768 MiB extent are extra rows, with no goal.
 *
 * Every measurement runs `--runs` times (default 3), interleaved so that each limit sample is
 * taken near the samples it is compared with; the table shows medians. Buffers are freed between
 * measurements (dropped, then collected), so at most about 2 GiB is allocated at any moment.
 */
import { loadavg } from 'node:os'
import { parseArgs } from 'node:util'
import { defaultMapBudget } from '../lib/budget'
import { loadNative, NativeArena, PAGE_SIZE, Status } from '../lib/native'
import { smapsRollup } from '../lib/procfs'
import { cpuTime, fillRandom, gcUntil, GB, GiB, integerOption, limitBuffer, machine, machineLine, mismatchedHashes, MiB, pagesOf, printTable, readHalves, series, Series, seriesJson, time, type Row } from './common'

const native = loadNative()
const HALF = 512 * MiB // each buffer of the merged pair, and each half of the limit buffer
const ZERO = 768 * MiB // the zero-page workload
const EXTENT_PAGES = 512 // what the coordinator sends at most per extent (lib/engine.ts MAX_EXTENT_PAGES)
const GOAL = {
  hashGBps: 8, // batch hashing, one thread
  mergeVsRead: 2.5, // merge of 2 x 512 MiB against reading 1 GiB once
  remapMs: 60, // remap + reclaim of 2 x 512 MiB
  zeroVsRead: 2, // dropping 768 MiB of zero pages against reading 768 MiB once
}

interface Options {
  runs: number
  json: boolean
  verbose: boolean
}

function options(): Options {
  const { values } = parseArgs({
    options: { runs: { type: 'string', default: '3' }, json: { type: 'boolean', default: false }, verbose: { type: 'boolean', default: false }, help: { type: 'boolean', short: 'h' } },
  })
  if (values.help) {
    console.log('usage: npm run bench:bridge -- [--runs N] [--json] [--verbose]')
    process.exit(0)
  }
  const runs = integerOption('runs', values.runs, 1, 50)
  return { runs, json: values.json === true, verbose: values.verbose === true }
}

/** Progress on stderr with --verbose: where the run's time goes (mostly page faults while filling). */
let trace: (what: string) => void = () => {}

/** The 1-minute load average when the bench started: above ~0.5 on 2 cores, something else was running. */
let loadBefore = 0

/** Drops what V8 can collect and waits until the arena has only `keep` allocations left. */
async function collect(arena: NativeArena, keep: number): Promise<void> {
  if (!(await gcUntil(() => arena.stats().allocations <= keep, 'bench:bridge'))) throw new Error('buffers were not collected; refusing to allocate more')
}

function hashAll(buf: Uint8Array): BigUint64Array {
  const out = new BigUint64Array(pagesOf(buf.byteLength))
  native.hashPages(buf, 0, out.length, out, 0)
  return out
}

function sameHashes(a: BigUint64Array, b: BigUint64Array): boolean {
  return a.length === b.length && mismatchedHashes(a, b) === 0
}

function check(what: string, done: number, want: number, status: Int32Array): void {
  const bad = status.findIndex((s) => s !== Status.OK)
  if (done !== want || bad >= 0) throw new Error(`${what}: ${done} of ${want} pages, status ${bad >= 0 ? `${status[bad]} (extent ${bad})` : 'OK'}`)
}

const m = {
  read1GiBMs: series(),
  read768MiBMs: series(),
  hash1GiBMs: series(),
  mergeMs: series(),
  mergeCpuMs: series(),
  stabilizeMs: series(),
  mergeCallMs: series(),
  verifyMs: series(),
  remapMs: series(),
  refaultMs: series(),
  oneMs: series(), // the same merge as one extent each (extra: no goal)
  oneCpuMs: series(),
  oneStabilizeMs: series(),
  oneMergeCallMs: series(),
  mergePssBefore: series(),
  mergePssAfter: series(),
  mergeMapsBefore: series(),
  mergeMapsAfter: series(),
  mergeArenaBefore: series(),
  mergeArenaAfter: series(),
  zeroSharedMs: series(),
  zeroSharedCpuMs: series(),
  zeroSharedPssFreed: series(),
  zeroSharedMapsDelta: series(),
  zeroPrivateMs: series(),
  zeroPrivateCpuMs: series(),
  zeroPrivatePssFreed: series(),
  zeroPrivateMapsDelta: series(),
  zeroSharedOneMs: series(), // the same drops as one extent (extra: no goal)
  zeroPrivateOneMs: series(),
}

/**
 * The limit. `limit` is one shared-kind 1 GiB buffer whose halves hold the same seeded random
 * bytes; comparing the halves with memcmp (`comparePages`) reads every byte of both, 1 GiB in all,
 * from two distinct address ranges (nothing to short-circuit), writes nothing and maps nothing:
 * a pure read pass. Comparing the first 384 MiB of each half reads 768 MiB the same way.
 * One untimed pass first: after other buffers were mapped and unmapped, the first read of a
 * range can pay for page-table work (seen on VMs with shadow paging), which is not read cost.
 */
function measureLimit(limit: Uint8Array, hashes: BigUint64Array): void {
  const half = pagesOf(HALF)
  readHalves(limit, half)
  m.read1GiBMs.push(readHalves(limit, half))
  m.read768MiBMs.push(readHalves(limit, pagesOf(ZERO / 2)))
  m.hash1GiBMs.push(time(() => native.hashPages(limit, 0, hashes.length, hashes, 0)))
}

/** Records [id, page, (pool,) count, (1)] covering `pages` pages of `id` in extents of `per` pages. */
function extents(id: number, pages: number, per: number, pool?: Uint32Array): Uint32Array {
  const n = pages / per, out = new Uint32Array(n * 4)
  for (let k = 0; k < n; k++) out.set(pool ? [id, k * per, pool[k]!, per] : [id, k * per, per, 1], 4 * k)
  return out
}

/**
 * Two identical 512 MiB memfd windows: stabilize the first, merge the second onto it, in extents of
 * `per` pages (one call each). With `per` = EXTENT_PAGES this is what the goals are judged on; with
 * `per` = the whole buffer, only its time is kept (the extra row).
 */
function measureMerge(arena: NativeArena, seed: number, per: number): void {
  const pages = pagesOf(HALF)
  const n = pages / per
  const extra = per !== EXTENT_PAGES
  const a = new Uint8Array(arena.alloc(HALF, true))
  const b = new Uint8Array(arena.alloc(HALF, true))
  fillRandom(a, seed)
  b.set(a)
  trace('merge: filled')
  const want = hashAll(a) // also the warm-up read of both buffers
  if (!sameHashes(hashAll(b), want)) throw new Error('the copy differs')
  trace('merge: hashed')
  // The verification cost: the same bytes compared by the same memcmp, outside the bridge. The
  // faster of two passes (the steady state, as for the limit); it leaves the larger share to remap + reclaim.
  const verify = Math.min(time(() => native.comparePages(a, 0, b, 0, pages)), time(() => native.comparePages(a, 0, b, 0, pages)))
  const budget = defaultMapBudget()
  const status = new Int32Array(n)
  const pool = new Uint32Array(n)
  const pss = smapsRollup().Pss
  const maps = native.mappingCount()
  const arenaBytes = arena.stats().arenaBytes
  let stabilized = 0, merged = 0, stab = 0, merge = 0
  const cpu = cpuTime(() => {
    const st = extents(arena.idOf(a), pages, per)
    stab = time(() => (stabilized = arena.stabilize(st, status, budget, pool)))
    check('stabilize', stabilized, pages, status)
    const mg = extents(arena.idOf(b), pages, per, pool)
    merge = time(() => (merged = arena.merge(mg, status, budget)))
    check('merge', merged, pages, status)
  })
  const mapsAfter = native.mappingCount()
  // Both buffers now map the pool through new mappings: read them (and check every page's hash)
  // so that Pss counts what they use; this first read pays the faults the remap left behind.
  let ha: BigUint64Array | undefined, hb: BigUint64Array | undefined
  trace('merge: merged')
  const refault = time(() => ((ha = hashAll(a)), (hb = hashAll(b))))
  trace('merge: read back')
  if (!sameHashes(ha!, want) || !sameHashes(hb!, want)) throw new Error('bytes changed by merging')
  if (extra) {
    m.oneMs.push(stab + merge)
    m.oneCpuMs.push(cpu)
    m.oneStabilizeMs.push(stab)
    m.oneMergeCallMs.push(merge)
    return
  }
  m.verifyMs.push(verify)
  m.mergeCpuMs.push(cpu)
  m.mergeMapsAfter.push(mapsAfter)
  m.mergeMapsBefore.push(maps)
  m.stabilizeMs.push(stab)
  m.mergeCallMs.push(merge)
  m.mergeMs.push(stab + merge)
  m.remapMs.push(stab + merge - verify)
  m.refaultMs.push(refault)
  m.mergePssBefore.push(pss)
  m.mergePssAfter.push(smapsRollup().Pss)
  m.mergeArenaBefore.push(arenaBytes)
  m.mergeArenaAfter.push(arena.stats().arenaBytes)
}

/**
 * 768 MiB of zero pages, every page really allocated (one byte written, then all zeroed), dropped
 * in extents of `per` pages in one call. With `per` = EXTENT_PAGES this is what the goals are
 * judged on; with `per` = the whole buffer, only its time is kept (the extra rows).
 */
function measureZero(arena: NativeArena, shared: boolean, per: number): void {
  const pages = pagesOf(ZERO)
  const z = new Uint8Array(arena.alloc(ZERO, shared))
  for (let i = 0; i < z.length; i += PAGE_SIZE) z[i] = 1
  z.fill(0)
  trace(`zero ${shared ? 'shared' : 'private'}: filled`)
  const n = pages / per
  const status = new Int32Array(n)
  const budget = defaultMapBudget()
  const list = new Uint32Array(3 * n)
  for (let k = 0; k < n; k++) list.set([arena.idOf(z), k * per, per], 3 * k)
  const pss = smapsRollup().Pss
  const maps = native.mappingCount()
  let dropped = 0, ms = 0
  const cpu = cpuTime(() => (ms = time(() => (dropped = arena.dropZero(list, status, budget)))))
  check(`dropZero (${shared ? 'shared' : 'private'})`, dropped, pages, status)
  const freed = pss - smapsRollup().Pss
  const mapsDelta = native.mappingCount() - maps
  trace(`zero ${shared ? 'shared' : 'private'}: dropped`)
  // A sample (every 61st page): the first read of each dropped page is a fault, which would cost seconds here.
  const h = new BigUint64Array(1)
  for (let p = 0; p < pages; p += 61) {
    native.hashPages(z, p, 1, h, 0)
    if (h[0] !== native.ZERO_PAGE_HASH) throw new Error(`dropped page ${p} does not read as zeros`)
  }
  trace(`zero ${shared ? 'shared' : 'private'}: checked`)
  if (per !== EXTENT_PAGES) {
    ;(shared ? m.zeroSharedOneMs : m.zeroPrivateOneMs).push(ms)
    return
  }
  if (shared) {
    m.zeroSharedMs.push(ms)
    m.zeroSharedCpuMs.push(cpu)
    m.zeroSharedPssFreed.push(freed)
    m.zeroSharedMapsDelta.push(mapsDelta)
  } else {
    m.zeroPrivateMs.push(ms)
    m.zeroPrivateCpuMs.push(cpu)
    m.zeroPrivatePssFreed.push(freed)
    m.zeroPrivateMapsDelta.push(mapsDelta)
  }
}

async function main(): Promise<void> {
  const opts = options()
  loadBefore = loadavg()[0]!
  const started = process.hrtime.bigint()
  if (opts.verbose) trace = (what) => console.error(`${(Number(process.hrtime.bigint() - started) / 1e9).toFixed(2)} s  ${what}`)
  const arena = new native.Arena()
  const limit = limitBuffer(arena, 2 * HALF)
  const hashes = new BigUint64Array(pagesOf(limit.byteLength))
  trace('limit: filled')
  for (let run = 0; run < opts.runs; run++) {
    measureLimit(limit, hashes)
    trace('limit: measured')
    measureMerge(arena, 100 + run, EXTENT_PAGES)
    await collect(arena, 1)
    trace('merge: collected')
    measureMerge(arena, 200 + run, pagesOf(HALF))
    await collect(arena, 1)
    trace('merge as one extent: collected')
    for (const shared of [true, false]) {
      for (const per of [EXTENT_PAGES, pagesOf(ZERO)]) {
        measureZero(arena, shared, per)
        await collect(arena, 1)
        trace(`zero ${shared ? 'shared' : 'private'}${per === EXTENT_PAGES ? '' : ' as one extent'}: collected`)
      }
    }
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  report(opts, seconds)
}

function report(opts: Options, seconds: number): void {
  const med = (s: Series) => s.median
  const read1 = med(m.read1GiBMs), read768 = med(m.read768MiBMs)
  const hashGBps = GiB / GB / (med(m.hash1GiBMs) / 1e3)
  const merge = med(m.mergeMs), remap = med(m.remapMs)
  const zs = med(m.zeroSharedMs), zp = med(m.zeroPrivateMs)
  const goals = {
    hash: { value: hashGBps, unit: 'GB/s', limit: GOAL.hashGBps, goal: `>= ${GOAL.hashGBps} GB/s`, pass: hashGBps >= GOAL.hashGBps },
    merge: { value: merge, unit: 'ms', limit: GOAL.mergeVsRead * read1, goal: `<= ${GOAL.mergeVsRead} x read 1 GiB`, pass: merge <= GOAL.mergeVsRead * read1 },
    remap: { value: remap, unit: 'ms', limit: GOAL.remapMs, goal: `<= ${GOAL.remapMs} ms`, pass: remap <= GOAL.remapMs },
    zeroShared: { value: zs, unit: 'ms', limit: GOAL.zeroVsRead * read768, goal: `<= ${GOAL.zeroVsRead} x read 768 MiB`, pass: zs <= GOAL.zeroVsRead * read768 },
    zeroPrivate: { value: zp, unit: 'ms', limit: GOAL.zeroVsRead * read768, goal: `<= ${GOAL.zeroVsRead} x read 768 MiB`, pass: zp <= GOAL.zeroVsRead * read768 },
  }
  if (opts.json) {
    console.log(JSON.stringify({ machine: machine(), loadAverage: { before: loadBefore, after: loadavg()[0] }, runs: opts.runs, seconds, measurements: seriesJson(m), goals }, null, 2))
    return
  }
  const ms = (v: number) => `${v.toFixed(1)} ms`
  const mib = (v: number) => `${(v / MiB).toFixed(0)} MiB`
  const list = (s: Series, f: (v: number) => string) => s.samples.map(f).join('  ')
  const num = (v: number) => v.toFixed(1)
  const ratio = (v: number, base: number) => ` (${(v / base).toFixed(2)} x)`
  const rows: Row[] = [
    { name: 'limit: read 1 GiB once (memcmp of 2 x 512 MiB)', value: ms(read1) + ` = ${(GiB / GB / (read1 / 1e3)).toFixed(1)} GB/s`, samples: list(m.read1GiBMs, num) },
    { name: 'limit: read 768 MiB once (memcmp of 2 x 384 MiB)', value: ms(read768), samples: list(m.read768MiBMs, num) },
    { name: 'hash 1 GiB, xxh3-64 per page, one thread', value: `${hashGBps.toFixed(1)} GB/s`, samples: list(m.hash1GiBMs, (v) => (GiB / GB / (v / 1e3)).toFixed(1)), goal: goals.hash.goal, pass: goals.hash.pass },
    { name: `merge 2 x 512 MiB memfd, extents of ${EXTENT_PAGES} pages (stabilize + merge)`, value: ms(merge) + ratio(merge, read1), samples: list(m.mergeMs, num), goal: `${goals.merge.goal} = ${ms(goals.merge.limit)}`, pass: goals.merge.pass },
    { name: '  CPU time (user + system)', value: ms(med(m.mergeCpuMs)), samples: list(m.mergeCpuMs, num) },
    { name: '  stabilize call (first buffer, in place)', value: ms(med(m.stabilizeMs)), samples: list(m.stabilizeMs, num) },
    { name: '  merge call (verify + remap + punch)', value: ms(med(m.mergeCallMs)), samples: list(m.mergeCallMs, num) },
    { name: '  verification: memcmp of the same 1 GiB', value: ms(med(m.verifyMs)), samples: list(m.verifyMs, num) },
    { name: '  remap + reclaim (derived: total - verification)', value: ms(remap), samples: list(m.remapMs, num), goal: goals.remap.goal, pass: goals.remap.pass },
    { name: '  Pss of the process, before -> after', value: `${mib(med(m.mergePssBefore))} -> ${mib(med(m.mergePssAfter))}`, samples: m.mergePssBefore.samples.map((v, i) => `-${mib(v - m.mergePssAfter.samples[i]!)}`).join('  ') },
    { name: '  arena file bytes, before -> after', value: `${mib(med(m.mergeArenaBefore))} -> ${mib(med(m.mergeArenaAfter))}`, samples: '' },
    { name: '  mappings (VMAs), before -> after', value: `${med(m.mergeMapsBefore)} -> ${med(m.mergeMapsAfter)}`, samples: m.mergeMapsBefore.samples.map((v, i) => `${v}->${m.mergeMapsAfter.samples[i]}`).join('  ') },
    { name: '  first read of both buffers after merging', value: ms(med(m.refaultMs)), samples: list(m.refaultMs, num) },
    { name: 'extra, no goal: the same merge as one 512 MiB extent', value: ms(med(m.oneMs)) + ratio(med(m.oneMs), read1), samples: list(m.oneMs, num) },
    { name: '  CPU time (user + system)', value: ms(med(m.oneCpuMs)), samples: list(m.oneCpuMs, num) },
    { name: '  stabilize call; merge call', value: `${ms(med(m.oneStabilizeMs))}; ${ms(med(m.oneMergeCallMs))}`, samples: m.oneStabilizeMs.samples.map((v, i) => `${num(v)};${num(m.oneMergeCallMs.samples[i]!)}`).join('  ') },
    { name: `drop 768 MiB zero pages, memfd window, extents of ${EXTENT_PAGES} pages`, value: ms(zs) + ratio(zs, read768), samples: list(m.zeroSharedMs, num), goal: `${goals.zeroShared.goal} = ${ms(goals.zeroShared.limit)}`, pass: goals.zeroShared.pass },
    { name: '  CPU time (user + system)', value: ms(med(m.zeroSharedCpuMs)), samples: list(m.zeroSharedCpuMs, num) },
    { name: '  Pss freed; mappings added', value: `${mib(med(m.zeroSharedPssFreed))}; ${med(m.zeroSharedMapsDelta)}`, samples: list(m.zeroSharedPssFreed, mib) },
    { name: `drop 768 MiB zero pages, private anonymous, extents of ${EXTENT_PAGES} pages`, value: ms(zp) + ratio(zp, read768), samples: list(m.zeroPrivateMs, num), goal: `${goals.zeroPrivate.goal} = ${ms(goals.zeroPrivate.limit)}`, pass: goals.zeroPrivate.pass },
    { name: '  CPU time (user + system)', value: ms(med(m.zeroPrivateCpuMs)), samples: list(m.zeroPrivateCpuMs, num) },
    { name: '  Pss freed; mappings added', value: `${mib(med(m.zeroPrivatePssFreed))}; ${med(m.zeroPrivateMapsDelta)}`, samples: list(m.zeroPrivatePssFreed, mib) },
    { name: 'extra, no goal: the same drops as one 768 MiB extent, memfd', value: ms(med(m.zeroSharedOneMs)) + ratio(med(m.zeroSharedOneMs), read768), samples: list(m.zeroSharedOneMs, num) },
    { name: '  private anonymous', value: ms(med(m.zeroPrivateOneMs)) + ratio(med(m.zeroPrivateOneMs), read768), samples: list(m.zeroPrivateOneMs, num) },
  ]
  console.log(`pagemerge bridge bench: ${opts.runs} runs, medians; GB = 10^9 bytes`)
  console.log(`${machineLine()}`)
  console.log(`merge and zero-drop goals judged on extents of ${EXTENT_PAGES} pages in one call, as lib/engine.ts sends them (its extent cap bounds a writer's wait); one extent per buffer is shown for comparison only\n`)
  printTable(rows)
  const all = Object.values(goals)
  console.log(`\n${all.filter((g) => g.pass).length} of ${all.length} goals met; ${seconds.toFixed(1)} s in all; load average ${loadBefore.toFixed(2)} before, ${loadavg()[0]!.toFixed(2)} after`)
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
