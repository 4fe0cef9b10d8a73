/**
 * The scanner against the machine's own limit, in one run:
 * `npm run bench:scanner -- [--size MiB] [--runs N] [--background-size MiB] [--background-runs N] [--no-background] [--json]`.
 *
 * - the limit: one core reading `--size` bytes once;
 * - `clones` (docs: /work/shared/WORKLOADS.md) at `--size` (default 1024 MiB): `mergeNow()` on a
 *   fresh PageMerger, its wall and CPU time, the stats, and the memory freed as the OS counts it
 *   (Pss and MemAvailable), every page read back and checked against its hash before merging;
 * - the background scanner at ksmd's default knobs (pagesToScan 100, sleepMillisecs 20) on
 *   `--background-size` (default 128 MiB) of clones: time and CPU until every copy is merged.
 *
 * `clones` runs `--runs` times (default 3), each run right after a limit sample so that the two
 * are compared under the same load; the background part runs `--background-runs` times (default
 * 1: a run takes two full scans at 100 pages per 20 ms, about 14 s for 128 MiB). The table shows
 * medians. The goals are the issue's, for 1 GiB, scaled linearly with `--size`.
 */
import { readFileSync } from 'node:fs'
import { loadavg } from 'node:os'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { parseArgs } from 'node:util'
import { loadNative, PAGE_SIZE } from '../lib/native'
import { PageMerger } from '../lib/page-merger'
import type { Stats } from '../lib/engine'
import { meminfo, smapsRollup } from '../lib/procfs'
import { fillRandom, gcRounds, gcUntil, GiB, integerOption, limitBuffer, machine, machineLine, mismatchedHashes, MiB, pagesOf, printTable, readHalves, series, Series, seriesJson, time, type Row } from './common'

const native = loadNative()
const BLOB = 32 * MiB // each blob of random bytes, present in two buffers
const KSM_DEFAULTS = { pagesToScan: 100, sleepMillisecs: 20 } // ksmd's pages_to_scan and sleep_millisecs
/** Worker threads start at a PageMerger's first alloc(); this lets them finish starting before anything is timed. */
const SETTLE_MS = 300
const TIMEOUT_MS = 120_000
const GOAL = {
  wallMsPerGiB: 400, // mergeNow() wall time
  cpuMsPerGiB: 800, // mergeNow() CPU time, all threads
  freedOfIdeal: 0.95, // Pss freed against half the bytes
}
const NOT_MEASURED = 'not measured (needs the ksmd harness)'

interface Options {
  sizeMiB: number
  runs: number
  backgroundSizeMiB: number
  backgroundRuns: number
  background: boolean
  json: boolean
}

const USAGE = 'usage: npm run bench:scanner -- [--size MiB (1024)] [--runs N (3)] [--background-size MiB (128)] [--background-runs N (1)] [--no-background] [--json]'

function options(): Options {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '1024' },
      runs: { type: 'string', default: '3' },
      'background-size': { type: 'string', default: '128' },
      'background-runs': { type: 'string', default: '1' },
      'no-background': { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h' },
    },
  })
  if (values.help) {
    console.log(USAGE)
    process.exit(0)
  }
  const clonesSize = (name: string, value: string | undefined) => {
    const mib = integerOption(name, value, 64, 65536)
    if (mib % 64) throw new RangeError(`--${name} must be a multiple of 64 (MiB): every 32 MiB blob is in two buffers`)
    return mib
  }
  return {
    sizeMiB: clonesSize('size', values.size),
    runs: integerOption('runs', values.runs, 1, 50),
    backgroundSizeMiB: clonesSize('background-size', values['background-size']),
    backgroundRuns: integerOption('background-runs', values['background-runs'], 1, 50),
    background: values['no-background'] !== true,
    json: values.json === true,
  }
}

/** The 1-minute load average when the bench started: above ~0.5 on 2 cores, something else was running. */
let loadBefore = 0

const m = {
  limitMs: series(),
  mergeNowMs: series(),
  mergeNowCpuMs: series(),
  pagesSharing: series(),
  pagesShared: series(),
  fullScans: series(),
  metadataBytesPerPage: series(),
  pagesSkippedBudget: series(),
  pssBefore: series(),
  pssAfter: series(),
  pssFreed: series(),
  pssShmemFreed: series(),
  pssAnonGrown: series(),
  memAvailableGained: series(),
  perCpuListsGained: series(),
  mapsBefore: series(),
  mapsAfter: series(),
  readBackMs: series(),
  mismatches: series(),
  bgConverged: series(),
  bgWallS: series(),
  bgCpuS: series(),
  bgPagesScanned: series(),
  bgFullScans: series(),
  bgPagesSharing: series(),
  bgCpuUsPerPage: series(),
  bgMismatches: series(),
}

/**
 * Bytes of free pages parked on the per-CPU lists (/proc/zoneinfo pagesets, `count:`), which
 * MemFree and MemAvailable leave out: freeing pages in bulk can park hundreds of MiB there
 * (the kernel tunes the lists' `high` up), so MemAvailable alone understates what was freed.
 */
function perCpuFreeBytes(): number {
  let pages = 0
  for (const match of readFileSync('/proc/zoneinfo', 'utf8').matchAll(/^\s+count:\s+(\d+)$/gm)) pages += Number(match[1])
  return pages * PAGE_SIZE
}

/**
 * `bytes` of clones in `pm`: each 32 MiB blob of seeded random bytes copied into two separate
 * buffers (a1, b1, a2, b2, ...), and every page's hash before merging in `want`.
 */
function clones(pm: PageMerger, bytes: number, seed: number): { buffers: Buffer[]; want: BigUint64Array } {
  const buffers: Buffer[] = []
  for (let i = 0; i < bytes / (2 * BLOB); i++) {
    const a = pm.alloc(BLOB), b = pm.alloc(BLOB)
    fillRandom(a, seed + i)
    b.set(a)
    buffers.push(a, b)
  }
  const want = new BigUint64Array(pagesOf(bytes))
  hashInto(buffers, want)
  return { buffers, want }
}

/** Every page's xxh3 into `out`, buffer after buffer: reads every byte (and faults in remapped pages). */
function hashInto(buffers: Buffer[], out: BigUint64Array): void {
  const per = pagesOf(BLOB)
  buffers.forEach((b, i) => native.hashPages(b, 0, per, out, i * per))
}

/** Waits until V8 has collected every buffer of the closed `pm` (its finalizers untrack them as their memory goes). */
async function collect(pm: PageMerger): Promise<void> {
  if (!(await gcUntil(() => pm.stats().pagesTracked === 0, 'bench:scanner'))) throw new Error('buffers were not collected; refusing to allocate more')
}

/** One run of `clones`: mergeNow() timed, then every buffer read back and checked. Returns the closed PageMerger. */
async function measureClones(bytes: number, seed: number): Promise<PageMerger> {
  const pm = new PageMerger()
  const { buffers, want } = clones(pm, bytes, seed)
  const got = new BigUint64Array(want.length) // allocated before Pss is read
  await sleep(SETTLE_MS) // the worker threads started at the first alloc(): let them finish starting
  await gcRounds(3, 'bench:scanner') // the previous run's PageMerger and this run's filling garbage: not freed while measuring
  const before = smapsRollup()
  const pss = before.Pss, available = meminfo().MemAvailable!, perCpu = perCpuFreeBytes(), maps = native.mappingCount()
  const cpu = process.cpuUsage()
  const start = performance.now()
  const stats = await pm.mergeNow()
  const wall = performance.now() - start
  const used = process.cpuUsage(cpu)
  m.mergeNowMs.push(wall)
  m.mergeNowCpuMs.push((used.user + used.system) / 1e3)
  m.mapsAfter.push(native.mappingCount())
  // A merge remaps pages, and Pss counts a page only once it is mapped again: read every buffer
  // back (which checks every page against its hash before merging) before asking the OS.
  m.readBackMs.push(time(() => hashInto(buffers, got)))
  m.mismatches.push(mismatchedHashes(want, got))
  const after = smapsRollup()
  const pssAfter = after.Pss
  m.pssShmemFreed.push((before.Pss_Shmem ?? 0) - (after.Pss_Shmem ?? 0))
  m.pssAnonGrown.push((after.Pss_Anon ?? 0) - (before.Pss_Anon ?? 0))
  m.memAvailableGained.push(meminfo().MemAvailable! - available)
  m.perCpuListsGained.push(perCpuFreeBytes() - perCpu)
  m.pssBefore.push(pss)
  m.pssAfter.push(pssAfter)
  m.pssFreed.push(pss - pssAfter)
  m.mapsBefore.push(maps)
  m.pagesSharing.push(stats.pagesSharing)
  m.pagesShared.push(stats.pagesShared)
  m.fullScans.push(stats.fullScans)
  m.metadataBytesPerPage.push(stats.metadataBytesPerPage)
  m.pagesSkippedBudget.push(stats.pagesSkippedBudget)
  await pm.close()
  return pm
}

/**
 * One run of the background scanner at ksmd's default knobs: start(), until its onProgress says
 * every copy shares a page (pagesSharing = pages / 2) or 120 s pass. CPU is the whole process's
 * (scanner, workers). Returns the closed PageMerger.
 */
async function measureBackground(bytes: number, seed: number): Promise<PageMerger> {
  const pm = new PageMerger(KSM_DEFAULTS)
  const { buffers, want } = clones(pm, bytes, seed)
  const ideal = pagesOf(bytes) / 2
  await sleep(SETTLE_MS) // the worker threads started at the first alloc(): let them finish starting
  await gcRounds(3, 'bench:scanner')
  const cpu = process.cpuUsage()
  const start = performance.now()
  // No polling: onProgress reports from inside the scanner's own wake-ups (a timer of ours would
  // wake this thread more often than the scanner, and be counted in its CPU)
  const stats = await new Promise<Stats>((resolve) => {
    const deadline = setTimeout(() => resolve(pm.stats()), TIMEOUT_MS)
    pm.start({ onProgress: (p) => void (p.pagesSharing >= ideal && (clearTimeout(deadline), resolve(pm.stats()))) })
  })
  const wall = performance.now() - start
  const used = process.cpuUsage(cpu)
  await pm.stop()
  await pm.close()
  const cpuUs = used.user + used.system
  m.bgConverged.push(stats.pagesSharing >= ideal ? 1 : 0)
  m.bgWallS.push(wall / 1e3)
  m.bgCpuS.push(cpuUs / 1e6)
  m.bgPagesScanned.push(stats.pagesScanned)
  m.bgFullScans.push(stats.fullScans)
  m.bgPagesSharing.push(stats.pagesSharing)
  m.bgCpuUsPerPage.push(cpuUs / stats.pagesScanned)
  const got = new BigUint64Array(want.length)
  hashInto(buffers, got)
  m.bgMismatches.push(mismatchedHashes(want, got))
  return pm
}

async function main(): Promise<void> {
  const opts = options()
  loadBefore = loadavg()[0]!
  const started = process.hrtime.bigint()
  const bytes = opts.sizeMiB * MiB
  const arena = new native.Arena()
  const limit = limitBuffer(arena, bytes)
  for (let run = 0; run < opts.runs; run++) {
    // One untimed pass first, every run: after other buffers were mapped and unmapped, the first
    // read of a range can pay for page-table work (seen on VMs with shadow paging), which is not read cost.
    readHalves(limit, pagesOf(bytes) / 2)
    m.limitMs.push(readHalves(limit, pagesOf(bytes) / 2))
    await collect(await measureClones(bytes, 100 * (run + 1)))
  }
  if (opts.background) for (let run = 0; run < opts.backgroundRuns; run++) await collect(await measureBackground(opts.backgroundSizeMiB * MiB, 100 * (opts.runs + run + 1)))
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  report(opts, seconds)
}

interface Goal {
  goal: string
  pass: boolean | null
  /** The measured value over the goal's bound (or, for counts, the count): what a miss prints. */
  ratio: number | null
  /** The plain line printed when the goal is missed. */
  miss: string
}

function report(opts: Options, seconds: number): void {
  const med = (s: Series) => s.median
  const bytes = opts.sizeMiB * MiB
  const pages = pagesOf(bytes)
  const scale = bytes / GiB
  const limit = med(m.limitMs), wall = med(m.mergeNowMs), cpu = med(m.mergeNowCpuMs)
  const wallGoal = GOAL.wallMsPerGiB * scale, cpuGoal = GOAL.cpuMsPerGiB * scale
  const ideal = bytes / 2
  const freed = med(m.pssFreed)
  const bad = Math.max(...m.mismatches.samples) // every run must read back every byte: the worst run counts
  const scaled = opts.sizeMiB !== 1024
  const goals: Record<string, Goal> = {
    mergeNowWall: {
      goal: `<= ${wallGoal.toFixed(0)} ms${scaled ? ` (${GOAL.wallMsPerGiB} ms per GiB)` : ''}`,
      pass: wall <= wallGoal,
      ratio: wall / wallGoal,
      miss: `mergeNow() wall time ${wall.toFixed(1)} ms is ${(wall / wallGoal).toFixed(2)} x the goal of ${wallGoal.toFixed(0)} ms (${(wall / limit).toFixed(2)} x the limit)`,
    },
    mergeNowCpu: {
      goal: `<= ${cpuGoal.toFixed(0)} ms${scaled ? ` (${GOAL.cpuMsPerGiB} ms per GiB)` : ''}`,
      pass: cpu <= cpuGoal,
      ratio: cpu / cpuGoal,
      miss: `mergeNow() CPU time ${cpu.toFixed(1)} ms is ${(cpu / cpuGoal).toFixed(2)} x the goal of ${cpuGoal.toFixed(0)} ms`,
    },
    freed: {
      goal: `>= ${GOAL.freedOfIdeal * 100}% of ${(ideal / MiB).toFixed(0)} MiB`,
      pass: freed >= GOAL.freedOfIdeal * ideal,
      ratio: freed / ideal,
      miss: `Pss freed ${(freed / MiB).toFixed(0)} MiB is ${((freed / ideal) * 100).toFixed(1)}% of the ideal ${(ideal / MiB).toFixed(0)} MiB (goal ${GOAL.freedOfIdeal * 100}%)`,
    },
    mismatches: {
      goal: '0',
      pass: bad === 0,
      ratio: bad,
      miss: `${bad} of ${pages} pages read back bytes other than before mergeNow() (worst run; goal 0)`,
    },
  }
  if (opts.background) {
    const bgBad = Math.max(...m.bgMismatches.samples)
    goals.backgroundMismatches = {
      goal: '0',
      pass: bgBad === 0,
      ratio: bgBad,
      miss: `${bgBad} of ${pagesOf(opts.backgroundSizeMiB * MiB)} pages read back other bytes after background merging (worst run; goal 0)`,
    }
    goals.backgroundCpuVsKsmd = { goal: '<= ksmd, same knobs', pass: null, ratio: null, miss: '' }
  }
  const ksmd = { measured: false, reason: 'needs the ksmd harness', knobs: KSM_DEFAULTS }
  if (opts.json) {
    console.log(
      JSON.stringify(
        {
          machine: machine(),
          loadAverage: { before: loadBefore, after: loadavg()[0] },
          runs: opts.runs,
          backgroundRuns: opts.background ? opts.backgroundRuns : 0,
          sizeMiB: opts.sizeMiB,
          backgroundSizeMiB: opts.backgroundSizeMiB,
          seconds,
          measurements: seriesJson(opts.background ? m : Object.fromEntries(Object.entries(m).filter(([k]) => !k.startsWith('bg')))),
          derived: { mergeNowWallVsLimit: wall / limit, pssFreedOfIdeal: freed / ideal },
          ksmd,
          goals,
        },
        null,
        2,
      ),
    )
    return
  }
  const ms = (v: number) => `${v.toFixed(1)} ms`
  const mib = (v: number) => `${(v / MiB).toFixed(0)} MiB`
  const list = (s: Series, f: (v: number) => string) => s.samples.map(f).join('  ')
  const num = (v: number) => v.toFixed(1)
  const int = (v: number) => v.toFixed(0)
  const pass = (g: Goal | undefined) => (g ? (g.pass === null ? NOT_MEASURED : g.pass) : undefined)
  const size = `${opts.sizeMiB} MiB`
  const rows: Row[] = [
    { name: `limit: read ${size} once (memcmp of 2 x ${opts.sizeMiB / 2} MiB)`, value: ms(limit) + ` = ${(bytes / 1e9 / (limit / 1e3)).toFixed(1)} GB/s`, samples: list(m.limitMs, num) },
    { name: `clones ${size}: mergeNow() wall`, value: `${ms(wall)} (${(wall / limit).toFixed(2)} x limit)`, samples: list(m.mergeNowMs, num), goal: goals.mergeNowWall!.goal, pass: pass(goals.mergeNowWall) },
    { name: '  CPU time (user + system, all threads)', value: ms(cpu), samples: list(m.mergeNowCpuMs, num), goal: goals.mergeNowCpu!.goal, pass: pass(goals.mergeNowCpu) },
    { name: '  pagesSharing / pagesShared (ideal: half each)', value: `${med(m.pagesSharing)} / ${med(m.pagesShared)} of ${pages}`, samples: m.pagesSharing.samples.map((v, i) => `${v}/${m.pagesShared.samples[i]}`).join('  ') },
    { name: '  fullScans; pagesSkippedBudget', value: `${med(m.fullScans)}; ${med(m.pagesSkippedBudget)}`, samples: m.fullScans.samples.map((v, i) => `${v};${m.pagesSkippedBudget.samples[i]}`).join('  ') },
    { name: '  metadataBytesPerPage', value: med(m.metadataBytesPerPage).toFixed(2), samples: list(m.metadataBytesPerPage, (v) => v.toFixed(2)) },
    { name: '  Pss of the process, before -> after read-back', value: `${mib(med(m.pssBefore))} -> ${mib(med(m.pssAfter))}`, samples: '' },
    { name: '  Pss freed (ideal: half the bytes)', value: `${mib(freed)} (${((freed / ideal) * 100).toFixed(1)}%)`, samples: list(m.pssFreed, mib), goal: goals.freed!.goal, pass: pass(goals.freed) },
    { name: '  Pss_Shmem freed; Pss_Anon grown (metadata, heaps)', value: `${mib(med(m.pssShmemFreed))}; ${mib(med(m.pssAnonGrown))}`, samples: m.pssShmemFreed.samples.map((v, i) => `${mib(v)};${mib(m.pssAnonGrown.samples[i]!)}`).join('  ') },
    { name: '  MemAvailable gained; per-CPU free lists gained', value: `${mib(med(m.memAvailableGained))}; ${mib(med(m.perCpuListsGained))}`, samples: m.memAvailableGained.samples.map((v, i) => `${mib(v)};${mib(m.perCpuListsGained.samples[i]!)}`).join('  ') },
    { name: '  mappings (VMAs), before -> after', value: `${med(m.mapsBefore)} -> ${med(m.mapsAfter)}`, samples: m.mapsBefore.samples.map((v, i) => `${v}->${m.mapsAfter.samples[i]}`).join('  ') },
    { name: '  read-back of every buffer (hash, faults)', value: ms(med(m.readBackMs)), samples: list(m.readBackMs, num) },
    { name: '  pages whose hash changed (worst run)', value: int(bad), samples: list(m.mismatches, int), goal: goals.mismatches!.goal, pass: pass(goals.mismatches) },
  ]
  if (opts.background) {
    const bgPages = pagesOf(opts.backgroundSizeMiB * MiB)
    const converged = m.bgConverged.samples.every((v) => v === 1)
    const bg = `background ${opts.backgroundSizeMiB} MiB, ${KSM_DEFAULTS.pagesToScan} pages / ${KSM_DEFAULTS.sleepMillisecs} ms`
    rows.push(
      { name: `${bg}: wall to converge`, value: `${med(m.bgWallS).toFixed(2)} s${converged ? '' : ` (not converged in ${TIMEOUT_MS / 1e3} s)`}`, samples: list(m.bgWallS, (v) => v.toFixed(2)) },
      { name: '  CPU time (user + system, whole process)', value: `${med(m.bgCpuS).toFixed(2)} s`, samples: list(m.bgCpuS, (v) => v.toFixed(2)) },
      { name: '  pagesScanned (fullScans)', value: `${med(m.bgPagesScanned)} (${med(m.bgFullScans)})`, samples: m.bgPagesScanned.samples.map((v, i) => `${v}(${m.bgFullScans.samples[i]})`).join('  ') },
      { name: '  pagesSharing (ideal: half)', value: `${med(m.bgPagesSharing)} of ${bgPages}`, samples: list(m.bgPagesSharing, int) },
      { name: '  CPU per scanned page', value: `${med(m.bgCpuUsPerPage).toFixed(2)} us`, samples: list(m.bgCpuUsPerPage, (v) => v.toFixed(2)), goal: goals.backgroundCpuVsKsmd!.goal, pass: pass(goals.backgroundCpuVsKsmd) },
      { name: '  pages whose hash changed (worst run)', value: int(Math.max(...m.bgMismatches.samples)), samples: list(m.bgMismatches, int), goal: goals.backgroundMismatches!.goal, pass: pass(goals.backgroundMismatches) },
      { name: '  ksmd, same knobs: wall, CPU, CPU per page', value: NOT_MEASURED, samples: '' },
    )
  }
  console.log(`pagemerge scanner bench: clones ${opts.runs} runs${opts.background ? `, background ${opts.backgroundRuns} run${opts.backgroundRuns > 1 ? 's' : ''}` : ''}, medians; GB = 10^9 bytes`)
  console.log(`${machineLine()}\n`)
  printTable(rows)
  const all = Object.values(goals)
  const measured = all.filter((g) => g.pass !== null)
  const unmeasured = all.length - measured.length
  console.log(
    `\n${measured.filter((g) => g.pass).length} of ${measured.length} goals met${unmeasured ? `, ${unmeasured} not measured (background CPU against ksmd needs the ksmd harness)` : ''}; ` +
      `${seconds.toFixed(1)} s in all; load average ${loadBefore.toFixed(2)} before, ${loadavg()[0]!.toFixed(2)} after`,
  )
  for (const g of measured) if (!g.pass) console.log(`MISS: ${g.miss}`)
  if (opts.background && !m.bgConverged.samples.every((v) => v === 1))
    console.log(`note: the background scanner did not merge every copy within ${TIMEOUT_MS / 1e3} s in ${m.bgConverged.samples.filter((v) => v === 0).length} run(s)`)
}

main().catch((err) => {
  console.error(err)
  process.exitCode = 1
})
