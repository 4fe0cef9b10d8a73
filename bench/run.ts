/**
 * `npm run bench`: the workloads of WORKLOADS.md through pagemerge, through the kernel's ksmd and
 * through a plain read of the same bytes, on the same machine in the same run, and the ratios.
 *
 *   npm run bench -- [--only clones,sparse] [--size MiB (1024)] [--background-size MiB (128)]
 *                    [--runs N (1)] [--json] [--quick] [--scale] [--no-background] [--files DIR]
 *
 * Every contender runs in a process of its own (bench/contender.ts), forked once per workload, run
 * and contender, so that one's memory cannot flatter another's:
 *
 * - `limit`: one core reading the same number of bytes once;
 * - `pagemerge mergeNow()` and `ksmd tuned` (pages_to_scan 100000, sleep_millisecs 0) at --size;
 * - `pagemerge background` and `ksmd defaults` (100 pages / 20 ms each) at --background-size.
 *
 * The ksmd knobs this touches (run, pages_to_scan, sleep_millisecs, advisor_mode if it was not
 * `none`) are saved before each ksmd contender and restored right after it converges, in finally
 * blocks, and on SIGINT/SIGTERM (exit 130). Results: a table on stdout (JSON with --json), and
 * always bench/results/<timestamp>.json, latest.json and clones.svg (Pss freed over time on clones).
 */
import { fork, type ChildProcess } from 'node:child_process'
import { mkdirSync, writeFileSync } from 'node:fs'
import { loadavg } from 'node:os'
import { join, relative, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { parseArgs } from 'node:util'
import { estimate } from '../lib/estimate'
import { KernelKsm, kernelKsmAvailable, type KsmKnobs } from '../lib/kernel'
import { PAGE_SIZE } from '../lib/native'
import type { Stats } from '../lib/engine'
import { integerOption, ksmStat, machine, machineLine, median, MiB, printGrid, printTable, progressLine, type Row } from './common'
import type { ChildMessage, ChildResult, ContenderKind, ParentMessage, Spec } from './contender'
import { lineChart, type ChartSeries } from './svg'
import { estimatorBench, estimatorLines, type EstimatorMeasured } from './estimator'
import { defaultFilesRoot, filesPagesBytes, WORKLOAD_NAMES, type Ideal, type WorkloadName } from './workloads'

// ---- what is measured against what ----

const KSMD_DEFAULTS = { pagesToScan: 100, sleepMillisecs: 20 } // the kernel's pages_to_scan and sleep_millisecs
const KSMD_TUNED = { pagesToScan: 100_000, sleepMillisecs: 0 }
const GOAL = {
  wallVsKsmd: 0.5, // clones and sparse: pagemerge mergeNow wall <= 0.5 x tuned ksmd
  cpuVsKsmd: 1, // clones: CPU <= 1 x tuned ksmd
  wallVsLimit: 4, // clones: wall <= 4 x the limit
  scatteredVsKsmd: 1, // scattered: wall <= 1 x tuned ksmd
  freedOfIdeal: 0.95, // memory freed as the OS counts it, against the ideal
  perDoubling: 2.3, // --scale: wall and CPU grow linearly (2 per doubling; some slack for a shared machine)
  metaPerDoubling: 1.1, // --scale: metadata bytes per page stay flat
  estimatorGBs: 2, // files: the estimator reads and hashes target memory at >= 2 GB/s (issue #6)
}
/** Issue #6's own case for the estimator: processes x MiB each, estimated over their buffers ESTIMATOR_RUNS times (bench/estimator.ts). */
const ESTIMATOR = { processes: 4, mib: 256, runs: 3 }
const POLL_MS = 10 // Pss samples for the chart, and ksmd's counters
const READY_TIMEOUT_MS = 600_000 // filling 4 GiB on a busy machine
const RUN_TIMEOUT_MS = { tuned: 120_000, background: 300_000 }
const SCALE_SIZES_MIB = [256, 1024, 4096]
/**
 * Full scans to wait before "nothing new merged" can mean converged: the first one ksmd counts
 * may be the end of a pass begun before the contender, the next only records checksums, and only
 * the one after it merges (pagemerge's background scanner likewise merges from its second scan).
 */
const MIN_FULL_SCANS = 3

type ContenderId = 'limit' | 'pm-now' | 'ksmd-tuned' | 'pm-bg' | 'ksmd-default'
const CONTENDERS: Record<ContenderId, { label: string; kind: ContenderKind; ksmd?: { pagesToScan: number; sleepMillisecs: number } }> = {
  limit: { label: 'the limit: one read', kind: 'limit' },
  'pm-now': { label: 'pagemerge mergeNow()', kind: 'pm-now' },
  'ksmd-tuned': { label: 'ksmd tuned (100000 / 0 ms)', kind: 'ksmd', ksmd: KSMD_TUNED },
  'pm-bg': { label: 'pagemerge background (100 / 20 ms)', kind: 'pm-bg' },
  'ksmd-default': { label: 'ksmd defaults (100 / 20 ms)', kind: 'ksmd', ksmd: KSMD_DEFAULTS },
}

interface Options {
  only: WorkloadName[]
  /** Run the estimator on its own case (4 x 256 MiB): with --only files or estimate, and by default. */
  estimator: boolean
  sizeMiB: number
  backgroundSizeMiB: number
  runs: number
  json: boolean
  quick: boolean
  scale: boolean
  background: boolean
  ksmdDefaults: boolean
  filesRoot: string
  contenders: ContenderId[]
  outDir: string
}

const USAGE = `usage: npm run bench -- [options]

  --only LIST             workloads, comma-separated (${WORKLOAD_NAMES.join(',')}), and estimate
                          (the estimator over ${ESTIMATOR.processes} processes of ${ESTIMATOR.mib} MiB, also run with files); default all
  --size MiB              each workload's size for mergeNow, ksmd tuned and the limit (1024; a multiple of 64)
  --background-size MiB   size for pagemerge background and ksmd at its defaults (128; a multiple of 64)
  --runs N                run everything N times; tables show medians and [min..max] (1)
  --json                  print the results as JSON instead of the table
  --quick                 smoke test: --size 64 --background-size 64, no ksmd at its defaults
  --scale                 only clones at 256 MiB, 1 GiB and 4 GiB: does time grow linearly?
  --no-background         skip pagemerge background and ksmd at its defaults
  --files DIR             the tree the files workload loads (default: this package's node_modules)
  --out DIR               where the results go (default: bench/results)
  --contenders LIST       only these (${Object.keys(CONTENDERS).join(',')}); default all

Results are also written to bench/results/<timestamp>.json, latest.json and clones.svg.`

function options(): Options {
  const { values } = parseArgs({
    options: {
      only: { type: 'string' },
      size: { type: 'string' },
      'background-size': { type: 'string' },
      runs: { type: 'string', default: '1' },
      json: { type: 'boolean', default: false },
      quick: { type: 'boolean', default: false },
      scale: { type: 'boolean', default: false },
      'no-background': { type: 'boolean', default: false },
      files: { type: 'string' },
      contenders: { type: 'string' },
      out: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  })
  if (values.help) {
    console.log(USAGE)
    process.exit(0)
  }
  const quick = values.quick === true
  const size = (name: string, value: string | undefined, fallback: number) => {
    const mib = integerOption(name, value ?? String(fallback), 64, 65536)
    if (mib % 64) throw new RangeError(`--${name} must be a multiple of 64 (MiB): every 32 MiB clones blob is in two buffers`)
    return mib
  }
  const listed = values.only === undefined ? [...WORKLOAD_NAMES] : values.only.split(',').map((s) => s.trim())
  const only = listed.filter((w) => w !== 'estimate')
  for (const w of only) if (!(WORKLOAD_NAMES as readonly string[]).includes(w)) throw new RangeError(`--only: unknown workload "${w}"; the workloads are ${WORKLOAD_NAMES.join(', ')}, and estimate`)
  const contenders = values.contenders === undefined ? (Object.keys(CONTENDERS) as ContenderId[]) : values.contenders.split(',').map((s) => s.trim())
  for (const c of contenders) if (!Object.hasOwn(CONTENDERS, c)) throw new RangeError(`--contenders: unknown contender "${c}"; the contenders are ${Object.keys(CONTENDERS).join(', ')}`)
  return {
    contenders: contenders as ContenderId[],
    outDir: resolve(values.out ?? join(__dirname, '..', '..', 'bench', 'results')),
    only: only as WorkloadName[],
    estimator: !values.scale && (listed.includes('estimate') || listed.includes('files')),
    sizeMiB: size('size', values.size, quick ? 64 : 1024),
    backgroundSizeMiB: size('background-size', values['background-size'], quick ? 64 : 128),
    runs: integerOption('runs', values.runs, 1, 50),
    json: values.json === true,
    quick,
    scale: values.scale === true,
    background: values['no-background'] !== true,
    ksmdDefaults: !quick,
    filesRoot: resolve(values.files ?? defaultFilesRoot()),
  }
}

// ---- the kernel's ksmd: saved, tuned, restored ----

const kernel = new KernelKsm()
let ksmdSkip: string | undefined // why the ksmd rows are skipped, if they are
let knobsBefore: KsmKnobs = {}

function ksmdCheck(): void {
  const a = kernelKsmAvailable()
  knobsBefore = kernel.status().knobs
  if (!a.ok) ksmdSkip = a.reason ?? 'no KSM in this kernel'
  else if (!a.canTune) ksmdSkip = a.reason?.split('; ').filter((r) => !r.includes('not running') && !r.startsWith('tune(')).join('; ') || 'cannot write /sys/kernel/mm/ksm (needs root)'
}

/** Puts back every knob the bench changed; says so on stderr if the kernel refuses. */
const restoreErrors: string[] = []
function restoreKnobs(): void {
  try {
    kernel.restore()
  } catch (err) {
    restoreErrors.push((err as Error).message)
    process.stderr.write(`bench: could not restore a ksmd knob: ${(err as Error).message}\n`)
  }
}

let current: ChildProcess | undefined
function onSignal(signal: NodeJS.Signals): void {
  current?.kill('SIGKILL')
  restoreKnobs()
  process.stderr.write(`\nbench: ${signal}: ksmd's knobs restored; stopped\n`)
  process.exit(130)
}

// ---- one contender, one child ----

/** One contender's measurements in one run (the JSON's `runs` entries). */
export interface Measured {
  workload: WorkloadName
  contender: ContenderId
  run: number
  bytes: number
  pages: number
  ideal: Ideal
  wallS: number
  cpuS: number
  converged: boolean
  /** pagemerge: pagesSharing + zeroPages; ksmd: the change of pages_sharing + ksm_zero_pages (system-wide). */
  freedPagesCounted: number
  /** Pss_Anon + Pss_Shmem before and after, and the drop: the process's own memory (Pss_File, the binary's code pages, left out). */
  pssBefore: number
  pssAfter: number
  pssFreed: number
  /** The drop of the whole Pss, file pages included. */
  pssTotalFreed: number
  /** What the OS said before and after (Pss, Pss_Anon, Pss_Shmem, Rss, MemAvailable, VMAs). */
  before: ChildResult['before']
  after: ChildResult['after']
  freedOfIdeal: number
  memAvailableGained: number
  vmasBefore: number
  vmasAfter: number
  metadataBytesPerPage: number
  pagesScanned: number
  fullScans: number
  cpuUsPerScannedPage: number
  pagesSkippedBudget: number
  pagesVolatile: number
  mismatchedPages: number
  bytesLost: number
  fillS: number
  verifyS: number
  /** ksmd: seconds the child took to mark its memory MADV_MERGEABLE, within wallS. */
  adviseS?: number
  limitMs?: number
  stats?: Stats
  ksmd?: {
    knobs: { pagesToScan: number; sleepMillisecs: number }
    processStat: Record<string, number>
    systemSharedBefore: number
    useZeroPages?: number
    /** The knobs as another process set them while this contender ran (the machine is shared): its numbers are not ksmd's at these knobs. */
    disturbed?: string
  }
  writer?: ChildResult['writer']
  files?: ChildResult['files']
  /** files, pagemerge mergeNow(): what the estimator predicted merging would free, in pages, read before the merge. */
  estimatedFreedPages?: number
  /** ...and how fast: the target's bytes scanned per second of the whole estimate (reading, hashing, confirming), in GB/s. */
  estimateGBs?: number
  /** Memory freed over time as counted (clones, first run): [seconds since go, bytes]. */
  freedOverTime?: [number, number][]
}

interface Failure {
  workload: WorkloadName
  contender: ContenderId
  run: number
  skipped?: string
  error?: string
}

interface Task {
  workload: WorkloadName
  contender: ContenderId
  bytes: number
  run: number
  sample: boolean
}

const progress = progressLine()
let taskIndex = 0, taskCount = 0
const mibs = (bytes: number) => `${(bytes / MiB).toFixed(bytes % MiB ? 1 : 0)} MiB`

async function runTask(task: Task, opts: Options): Promise<Measured | Failure> {
  const c = CONTENDERS[task.contender]
  const what = `[${++taskIndex}/${taskCount}] ${task.workload} ${mibs(task.bytes)}: ${c.label}${opts.runs > 1 ? `, run ${task.run + 1}` : ''}`
  if (c.ksmd && ksmdSkip) return { workload: task.workload, contender: task.contender, run: task.run, skipped: ksmdSkip }
  progress.log(`bench ${what}`)
  const spec: Spec = { kind: c.kind, workload: task.workload, bytes: task.bytes, filesRoot: opts.filesRoot }
  if (c.kind === 'pm-bg') Object.assign(spec, KSMD_DEFAULTS, { timeoutMs: RUN_TIMEOUT_MS.background })
  const child = fork(join(__dirname, 'contender.js'), [JSON.stringify(spec)], { execArgv: ['--expose-gc'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  current = child
  const messages: ChildMessage[] = []
  let wake: (() => void) | undefined
  // Pages freed over time for the chart, as each contender counts them: the child's own reports
  // (pagemerge), or ksmd's counters. Not Pss: reading /proc/<pid>/smaps_rollup walks the child's
  // page tables under its mmap lock, which every remap must wait for (every 10 ms, that made a
  // 0.43 s mergeNow() take 4 s).
  const freedOverTime: [number, number][] = []
  let goAt = 0n
  const sinceGo = () => Number(process.hrtime.bigint() - goAt) / 1e9
  child.on('message', (m: ChildMessage) => {
    if (m.type === 'progress') {
      if (task.sample && goAt !== 0n) freedOverTime.push([sinceGo(), m.freedPages * PAGE_SIZE])
      return
    }
    messages.push(m)
    wake?.()
  })
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => (r(code), wake?.())))
  let exitCode: number | null | undefined
  void exited.then((code) => (exitCode = code))
  /** The next message of `type`, or an error if the child fails or dies first. */
  const next = async <T extends ChildMessage['type']>(type: T, timeoutMs: number, tick?: () => void): Promise<Extract<ChildMessage, { type: T }>> => {
    const end = Date.now() + timeoutMs
    for (;;) {
      const i = messages.findIndex((m) => m.type === type || m.type === 'error')
      if (i >= 0) {
        const m = messages.splice(i, 1)[0]!
        if (m.type === 'error') throw new Error(`the child failed: ${m.message}`)
        return m as Extract<ChildMessage, { type: T }>
      }
      if (exitCode !== undefined) throw new Error(`the child exited (code ${exitCode}) before '${type}'`)
      if (Date.now() > end) throw new Error(`no '${type}' from the child in ${timeoutMs / 1e3} s`)
      await new Promise<void>((r) => {
        wake = r
        setTimeout(r, tick ? POLL_MS : 100)
      })
      wake = undefined
      tick?.()
    }
  }
  const tell = (m: ParentMessage) => child.send(m)
  const started = Date.now()
  let status = ''
  const show = () => progress.update(`bench ${what} · ${((Date.now() - started) / 1e3).toFixed(1)} s${status}`)
  let tuned = false
  let baseline: number | undefined // system-wide KSM pages before a ksmd contender
  try {
    const ready = await next('ready', READY_TIMEOUT_MS, show)
    const pid = ready.pid
    const tick = show
    // files: what the estimator predicts merging would free in the child's buffers, read before it starts
    let estimated: number | undefined, estimateGBs: number | undefined
    const ranges = task.workload === 'files' && task.contender === 'pm-now' ? (await next('ranges', READY_TIMEOUT_MS, show)).ranges : undefined // sent before 'ready'
    if (ranges) {
      const r = await estimate({ pids: [pid], ranges: { [pid]: ranges.map(([address, bytes]) => ({ address: BigInt(address), bytes })) } })
      estimated = r.total.bytesFreeable / r.pageSize
      estimateGBs = (r.total.pagesScanned * r.pageSize) / (r.total.elapsedMs * 1e6) // target memory per second, confirming included
    }
    let ksmd: { wallS: number; cpuS: number; converged: boolean; scanned: number; fullScans: number; freedCounted: number; processStat: Record<string, number>; sharedBefore: number; useZeroPages?: number; disturbed?: string } | undefined
    if (c.ksmd) {
      const s0 = kernel.status()
      baseline = ksmPages(s0)
      const knobs: KsmKnobs = { ...c.ksmd, run: 1 }
      if (s0.knobs.advisorMode !== undefined && s0.knobs.advisorMode !== 'none') knobs.advisorMode = 'none' // the advisor would set pages_to_scan itself
      const cpu0 = s0.ksmd?.cpuNs ?? NaN, scanned0 = s0.stats.pagesScanned ?? 0, scans0 = s0.stats.fullScans ?? 0
      const counted = (s: typeof s0) => (s.stats.pagesSharing ?? 0) + (s.stats.ksmZeroPages ?? 0)
      tuned = true
      kernel.tune(knobs)
      goAt = process.hrtime.bigint()
      tell({ type: 'go' })
      let best = 0, rise = { wall: 0, cpuNs: cpu0, scanned: scanned0, scans: scans0 }
      let converged = false, s = s0, stat: Record<string, number> = {}
      let disturbed: string | undefined
      let advisedScans: number | undefined // full_scans when the child had marked all its memory mergeable
      const deadline = c.ksmd === KSMD_TUNED ? RUN_TIMEOUT_MS.tuned : RUN_TIMEOUT_MS.background
      for (;;) {
        await sleep(POLL_MS)
        if (exitCode !== undefined || messages.some((m) => m.type === 'error')) break
        s = kernel.status()
        stat = ksmStat(pid)
        const merged = (stat.ksm_merging_pages ?? 0) + (stat.ksm_zero_pages ?? 0)
        const scans = s.stats.fullScans ?? 0
        if (s.knobs.run !== 1 || s.knobs.pagesToScan !== c.ksmd.pagesToScan || s.knobs.sleepMillisecs !== c.ksmd.sleepMillisecs)
          disturbed ??= `run=${s.knobs.run}, pages_to_scan=${s.knobs.pagesToScan}, sleep_millisecs=${s.knobs.sleepMillisecs} at ${sinceGo().toFixed(2)} s` // another process on this machine tunes ksmd too
        if (merged > best) (best = merged), (rise = { wall: sinceGo(), cpuNs: s.ksmd?.cpuNs ?? NaN, scanned: s.stats.pagesScanned ?? 0, scans })
        if (task.sample) freedOverTime.push([sinceGo(), (counted(s) - counted(s0)) * PAGE_SIZE])
        status = ` · ${mibs(best * PAGE_SIZE)} merging, ${scans - scans0} full scans`
        show()
        if (advisedScans === undefined && messages.some((m) => m.type === 'advised')) advisedScans = scans // all the memory is mergeable from here
        if (best >= ready.ideal.mergingPages) converged = true // everything that can merge has
        else if (advisedScans !== undefined && scans >= rise.scans + 2 && scans >= advisedScans + MIN_FULL_SCANS) converged = true // a whole full scan merged nothing new
        if (converged || sinceGo() * 1e3 > deadline) break
      }
      restoreKnobs() // ksmd stops (run as it was); what it merged stays merged
      tuned = false
      ksmd = {
        wallS: converged ? rise.wall : sinceGo(),
        cpuS: (rise.cpuNs - cpu0) / 1e9,
        converged,
        scanned: rise.scanned - scanned0,
        fullScans: rise.scans - scans0,
        freedCounted: counted(s) - counted(s0),
        processStat: stat,
        sharedBefore: (s0.stats.pagesShared ?? 0) + (s0.stats.pagesSharing ?? 0),
        ...(disturbed ? { disturbed } : {}),
        ...(s0.knobs.useZeroPages !== undefined ? { useZeroPages: s0.knobs.useZeroPages } : {}),
      }
      tell({ type: 'stop' })
    } else {
      goAt = process.hrtime.bigint()
      tell({ type: 'go' })
    }
    const { result: r } = await next('result', RUN_TIMEOUT_MS.background + 60_000, tick)
    await exited
    const stats = r.stats
    const m: Measured = {
      workload: task.workload,
      contender: task.contender,
      run: task.run,
      bytes: task.bytes,
      pages: r.pages,
      ideal: r.ideal,
      wallS: r.limitMs !== undefined ? r.limitMs / 1e3 : (ksmd?.wallS ?? r.wallS ?? NaN),
      cpuS: r.limitMs !== undefined ? r.limitMs / 1e3 : (ksmd?.cpuS ?? r.cpuS ?? NaN),
      converged: ksmd?.converged ?? r.converged ?? true,
      freedPagesCounted: ksmd ? ksmd.freedCounted : stats ? stats.pagesSharing + stats.zeroPages : 0,
      pssBefore: r.before.pssOwn,
      pssAfter: r.after.pssOwn,
      pssFreed: r.before.pssOwn - r.after.pssOwn,
      pssTotalFreed: r.before.pss - r.after.pss,
      before: r.before,
      after: r.after,
      freedOfIdeal: r.ideal.freedPages ? (r.before.pssOwn - r.after.pssOwn) / (r.ideal.freedPages * PAGE_SIZE) : NaN,
      memAvailableGained: r.after.memAvailable - r.before.memAvailable,
      vmasBefore: r.before.vmas,
      vmasAfter: r.after.vmas,
      metadataBytesPerPage: ksmd ? ksmdMetadata(ksmd.processStat) / r.pages : (stats?.metadataBytesPerPage ?? NaN),
      pagesScanned: ksmd ? ksmd.scanned : (stats?.pagesScanned ?? NaN),
      fullScans: ksmd ? ksmd.fullScans : (stats?.fullScans ?? NaN),
      cpuUsPerScannedPage: NaN,
      pagesSkippedBudget: stats?.pagesSkippedBudget ?? 0,
      pagesVolatile: stats?.pagesVolatile ?? 0,
      mismatchedPages: r.mismatchedPages,
      bytesLost: r.bytesLost,
      fillS: r.fillS,
      verifyS: r.verifyS,
    }
    m.cpuUsPerScannedPage = (m.cpuS * 1e6) / m.pagesScanned
    if (r.limitMs !== undefined) m.limitMs = r.limitMs
    if (r.adviseS !== undefined) m.adviseS = r.adviseS
    if (stats) m.stats = stats
    if (ksmd && c.ksmd) m.ksmd = { knobs: c.ksmd, processStat: ksmd.processStat, systemSharedBefore: ksmd.sharedBefore, ...(ksmd.useZeroPages !== undefined ? { useZeroPages: ksmd.useZeroPages } : {}), ...(ksmd.disturbed ? { disturbed: ksmd.disturbed } : {}) }
    if (r.writer) m.writer = r.writer
    if (r.files) m.files = r.files
    if (estimated !== undefined) m.estimatedFreedPages = estimated
    if (estimateGBs !== undefined) m.estimateGBs = estimateGBs
    if (task.sample) m.freedOverTime = freedOverTime
    status = ''
    progress.log(`bench ${what}: ${oneLine(m)}`)
    return m
  } catch (err) {
    child.kill('SIGKILL')
    progress.log(`bench ${what}: FAILED: ${(err as Error).message}`)
    return { workload: task.workload, contender: task.contender, run: task.run, error: (err as Error).message }
  } finally {
    if (tuned) restoreKnobs()
    await exited
    current = undefined
    if (c.ksmd && baseline !== undefined) await settleKsmd(baseline)
  }
}

/** KSM pages the kernel counts system-wide: shared, sharing and zero pages. */
const ksmPages = (s: ReturnType<KernelKsm['status']>) => (s.stats.pagesShared ?? 0) + (s.stats.pagesSharing ?? 0) + (s.stats.ksmZeroPages ?? 0)

/**
 * The kernel drops an exited process's KSM pages from its counters only when ksmd next scans,
 * so a contender's pages would still be counted (and cleaned up on the next contender's CPU
 * time): run ksmd, tuned, until the counters are back to what they were before the contender
 * (at most 3 s), then put the knobs back.
 */
async function settleKsmd(baseline: number): Promise<void> {
  try {
    kernel.tune({ ...KSMD_TUNED, run: 1 })
    for (let end = Date.now() + 3000; Date.now() < end && ksmPages(kernel.status()) > baseline; ) await sleep(POLL_MS)
  } catch (err) {
    progress.log(`bench: could not let ksmd drop the finished contender's pages: ${(err as Error).message}`)
  } finally {
    restoreKnobs()
  }
}

/** ksmd's metadata for the process: ksm_process_profit = (merging + zero pages) x 4096 - rmap_items x sizeof(ksm_rmap_item). */
function ksmdMetadata(stat: Record<string, number>): number {
  const merged = (stat.ksm_merging_pages ?? 0) + (stat.ksm_zero_pages ?? 0)
  return stat.ksm_process_profit === undefined ? NaN : merged * PAGE_SIZE - stat.ksm_process_profit
}

function oneLine(m: Measured): string {
  if (m.limitMs !== undefined) return `${m.limitMs.toFixed(1)} ms`
  return `${m.wallS.toFixed(2)} s wall, ${m.cpuS.toFixed(2)} s CPU, Pss -${mibs(m.pssFreed)} (${pct(m.freedOfIdeal)} of ideal)${m.converged ? '' : ', NOT converged'}${m.mismatchedPages ? `, ${m.mismatchedPages} pages LOST` : ''}`
}

const pct = (v: number) => (Number.isFinite(v) ? `${(v * 100).toFixed(1)}%` : '-')

// ---- the plan ----

function workloadBytes(w: WorkloadName, mib: number, opts: Options): number {
  return w === 'files' ? filesPagesBytes(mib * MiB, opts.filesRoot) : mib * MiB
}

function plan(opts: Options): Task[] {
  const tasks: Task[] = []
  for (let run = 0; run < opts.runs; run++) {
    if (opts.scale) {
      for (const mib of SCALE_SIZES_MIB) for (const c of ['limit', 'pm-now', 'ksmd-tuned'] as const) tasks.push({ workload: 'clones', contender: c, bytes: mib * MiB, run, sample: false })
      continue
    }
    for (const w of opts.only) {
      const bytes = workloadBytes(w, opts.sizeMiB, opts)
      const sample = run === 0 && w === 'clones'
      for (const c of ['limit', 'pm-now', 'ksmd-tuned'] as const) tasks.push({ workload: w, contender: c, bytes, run, sample })
      if (!opts.background) continue
      const bg = workloadBytes(w, opts.backgroundSizeMiB, opts)
      tasks.push({ workload: w, contender: 'pm-bg', bytes: bg, run, sample })
      if (opts.ksmdDefaults) tasks.push({ workload: w, contender: 'ksmd-default', bytes: bg, run, sample })
    }
  }
  return tasks.filter((t) => opts.contenders.includes(t.contender))
}

// ---- goals ----

interface Goal {
  name: string
  /** The median over runs of the per-run value. */
  value: number
  samples: number[]
  unit: (v: number) => string
  goal: string
  pass: boolean | null
  /** Why not measured, when pass is null. */
  why?: string
}

type Results = Measured[]

const find = (res: Results, w: WorkloadName, c: ContenderId, run: number) => res.find((m) => m.workload === w && m.contender === c && m.run === run)

/** Per run, `f` of the two contenders' measurements of that run; the goal is held to the median. */
function ratioGoal(res: Results, runs: number, w: WorkloadName, a: ContenderId, b: ContenderId, f: (x: Measured, y: Measured) => number, name: string, max: number, failures: Failure[]): Goal {
  const samples: number[] = []
  for (let run = 0; run < runs; run++) {
    const x = find(res, w, a, run), y = find(res, w, b, run)
    if (x && y) samples.push(f(x, y))
  }
  const value = median(samples)
  const base: Omit<Goal, 'pass'> = { name, value, samples, unit: (v) => `${v.toFixed(2)} x`, goal: `<= ${max} x` }
  if (!samples.length) return { ...base, pass: null, why: whyMissing(failures, w, [a, b]) }
  return { ...base, pass: value <= max }
}

function whyMissing(failures: Failure[], w: WorkloadName, cs: ContenderId[]): string {
  const f = failures.find((x) => x.workload === w && cs.includes(x.contender))
  if (!f) return `not run (--only or --contenders)`
  return `${CONTENDERS[f.contender].label} ${f.skipped ? `skipped: ${f.skipped}` : `failed: ${f.error?.split('\n')[0]}`}`
}

function goals(res: Results, failures: Failure[], opts: Options, est: EstimatorMeasured | { error: string } | undefined): Goal[] {
  const out: Goal[] = []
  const runs = opts.runs
  const has = (w: WorkloadName) => opts.only.includes(w)
  if (has('clones')) {
    out.push(ratioGoal(res, runs, 'clones', 'pm-now', 'ksmd-tuned', (x, y) => x.wallS / y.wallS, 'clones: mergeNow wall / tuned ksmd wall', GOAL.wallVsKsmd, failures))
    out.push(ratioGoal(res, runs, 'clones', 'pm-now', 'ksmd-tuned', (x, y) => x.cpuS / y.cpuS, 'clones: mergeNow CPU / tuned ksmd CPU', GOAL.cpuVsKsmd, failures))
    out.push(ratioGoal(res, runs, 'clones', 'pm-now', 'limit', (x, y) => x.wallS / y.wallS, 'clones: mergeNow wall / the limit', GOAL.wallVsLimit, failures))
  }
  if (has('sparse')) out.push(ratioGoal(res, runs, 'sparse', 'pm-now', 'ksmd-tuned', (x, y) => x.wallS / y.wallS, 'sparse: mergeNow wall / tuned ksmd wall', GOAL.wallVsKsmd, failures))
  if (has('scattered')) {
    // every page the budget allows: freed + left for lack of budget covers the ideal, and the OS agrees with what was freed
    const s = res.filter((m) => m.workload === 'scattered' && m.contender === 'pm-now')
    const covered = s.map((m) => (m.freedPagesCounted + m.pagesSkippedBudget) / m.ideal.freedPages)
    const osAgrees = s.every((m) => m.pssFreed >= GOAL.freedOfIdeal * m.freedPagesCounted * PAGE_SIZE)
    const left = median(s.map((m) => m.pagesSkippedBudget))
    out.push({
      name: `scattered: pages freed + left by the budget (${Number.isFinite(left) ? left : '?'} left) / ideal`,
      value: median(covered),
      samples: covered,
      unit: (v) => pct(v),
      goal: `>= 99.9%, OS >= ${GOAL.freedOfIdeal * 100}% of counted`,
      pass: s.length ? median(covered) >= 0.999 && osAgrees : null,
      ...(s.length ? {} : { why: whyMissing(failures, 'scattered', ['pm-now']) }),
    })
    out.push(ratioGoal(res, runs, 'scattered', 'pm-now', 'ksmd-tuned', (x, y) => x.wallS / y.wallS, 'scattered: mergeNow wall / tuned ksmd wall', GOAL.scatteredVsKsmd, failures))
  }
  if (opts.background && has('clones')) {
    const g = ratioGoal(res, runs, 'clones', 'pm-bg', 'ksmd-default', (x, y) => x.cpuUsPerScannedPage / y.cpuUsPerScannedPage, 'clones, background at 100 / 20 ms: CPU per scanned page / ksmd defaults', 1, failures)
    if (!opts.ksmdDefaults) g.why = 'ksmd at its defaults is skipped by --quick'
    out.push(g)
  }
  for (const w of ['clones', 'sparse', 'files', 'volatile'] as const) {
    if (!has(w)) continue
    const s = res.filter((m) => m.workload === w && m.contender === 'pm-now').map((m) => m.freedOfIdeal)
    out.push({
      name: `${w}: mergeNow memory freed (Pss) / ideal`,
      value: median(s),
      samples: s,
      unit: pct,
      goal: `>= ${GOAL.freedOfIdeal * 100}%`,
      pass: s.length ? median(s) >= GOAL.freedOfIdeal : null,
      ...(s.length ? {} : { why: whyMissing(failures, w, ['pm-now']) }),
    })
  }
  if (has('files')) {
    // issue #6: the estimator reads and hashes other processes' memory at >= 2 GB/s on this machine
    const s = res.filter((m) => m.workload === 'files' && m.estimateGBs !== undefined).map((m) => m.estimateGBs!)
    out.push({
      name: 'files: estimator, target memory read, hashed and confirmed per second',
      value: median(s),
      samples: s,
      unit: (v) => `${v.toFixed(2)} GB/s`,
      goal: `>= ${GOAL.estimatorGBs} GB/s`,
      pass: s.length ? median(s) >= GOAL.estimatorGBs : null,
      ...(s.length ? {} : { why: whyMissing(failures, 'files', ['pm-now']) }),
    })
  }
  if (opts.estimator) {
    // issue #6's own case: four processes of 256 MiB in under 0.5 s
    const s = est && 'ranges' in est ? est.ranges.map((r) => r.gbs) : []
    out.push({
      name: `estimator: ${ESTIMATOR.processes} processes x ${ESTIMATOR.mib} MiB, target memory read, hashed and confirmed per second`,
      value: median(s),
      samples: s,
      unit: (v) => `${v.toFixed(2)} GB/s`,
      goal: `>= ${GOAL.estimatorGBs} GB/s`,
      pass: s.length ? median(s) >= GOAL.estimatorGBs : null,
      ...(s.length ? {} : { why: est && 'error' in est ? `failed: ${est.error}` : 'not run' }),
    })
  }
  const pm = res.filter((m) => m.contender === 'pm-now' || m.contender === 'pm-bg')
  const lost = pm.reduce((n, m) => n + m.mismatchedPages, 0)
  out.push({ name: 'pagemerge: pages whose bytes changed, all workloads and runs', value: lost, samples: pm.filter((m) => m.mismatchedPages).map((m) => m.mismatchedPages), unit: (v) => String(v), goal: '0', pass: pm.length ? lost === 0 : null, ...(pm.length ? {} : { why: 'no pagemerge run' }) })
  return out
}

function scaleGoals(res: Results, failures: Failure[], opts: Options): Goal[] {
  const out: Goal[] = []
  const per = (c: ContenderId, f: (m: Measured) => number, what: string, max: number, unit: string) => {
    for (let i = 1; i < SCALE_SIZES_MIB.length; i++) {
      const lo = SCALE_SIZES_MIB[i - 1]!, hi = SCALE_SIZES_MIB[i]!
      const samples: number[] = []
      for (let run = 0; run < opts.runs; run++) {
        const a = res.find((m) => m.contender === c && m.bytes === lo * MiB && m.run === run)
        const b = res.find((m) => m.contender === c && m.bytes === hi * MiB && m.run === run)
        if (a && b) samples.push((f(b) / f(a)) ** (1 / Math.log2(hi / lo)))
      }
      const value = median(samples)
      out.push({
        name: `${CONTENDERS[c].label}: ${what} per doubling, ${mibs(lo * MiB)} -> ${mibs(hi * MiB)}`,
        value,
        samples,
        unit: (v) => `${v.toFixed(2)} x`,
        goal: c === 'pm-now' ? `<= ${max} x (${unit})` : '',
        pass: c !== 'pm-now' ? null : samples.length ? value <= max : null,
        ...(samples.length ? {} : { why: whyMissing(failures, 'clones', [c]) }),
      })
    }
  }
  per('pm-now', (m) => m.wallS, 'wall', GOAL.perDoubling, 'linear')
  per('pm-now', (m) => m.cpuS, 'CPU', GOAL.perDoubling, 'linear')
  per('pm-now', (m) => m.metadataBytesPerPage, 'metadata bytes per page', GOAL.metaPerDoubling, 'flat: total metadata linear')
  per('ksmd-tuned', (m) => m.wallS, 'wall', GOAL.perDoubling, '')
  per('ksmd-tuned', (m) => m.cpuS, 'CPU', GOAL.perDoubling, '')
  per('limit', (m) => m.wallS, 'wall', GOAL.perDoubling, '')
  return out.filter((g) => g.goal !== '' || Number.isFinite(g.value))
}

// ---- output ----

function spread(values: number[], f: (v: number) => string): string {
  if (values.length === 0) return '-'
  const med = f(median(values))
  if (values.length === 1) return med
  return `${med} [${f(Math.min(...values))}..${f(Math.max(...values))}]`
}

function tables(res: Results, failures: Failure[], opts: Options, out: (line: string) => void): void {
  const f2 = (v: number) => (Number.isFinite(v) ? v.toFixed(2) : '-')
  const ids: ContenderId[] = opts.scale ? ['limit', 'pm-now', 'ksmd-tuned'] : ['limit', 'pm-now', 'ksmd-tuned', 'pm-bg', 'ksmd-default']
  const groups: { title: string; rows: Measured[][]; failed: Failure[] }[] = []
  const workloads = opts.scale ? ['clones' as const] : opts.only
  for (const w of workloads) {
    const sizes = opts.scale ? SCALE_SIZES_MIB.map((m) => m * MiB) : [undefined]
    for (const size of sizes) {
      const rows = ids.map((c) => res.filter((m) => m.workload === w && m.contender === c && (size === undefined || m.bytes === size))).filter((r) => r.length)
      const first = rows.find((r) => r[0]!.contender === 'pm-now')?.[0] ?? rows[0]?.[0]
      const ideal = first ? `${first.pages} pages, ideal ${first.ideal.freedPages} freed = ${mibs(first.ideal.freedPages * PAGE_SIZE)}` : 'nothing measured'
      const pmNow = rows.find((r) => r[0]!.contender === 'pm-now')?.[0]
      const predicted = pmNow?.estimatedFreedPages
      const estimator = predicted === undefined ? 'estimator: not run' : `estimator predicted ${predicted} pages freeable, pagemerge mergeNow() counted ${pmNow!.freedPagesCounted} (${((100 * pmNow!.freedPagesCounted) / predicted).toFixed(1)}%)`
      const extra = w === 'files' ? `; ${first?.files ? `${first.files.files} files, ${mibs(first.files.bytes)} per tenant x ${first.files.tenants} tenants from ${first.files.root}` : ''}; ${estimator}` : ''
      groups.push({ title: `${w}${size ? ` ${mibs(size)}` : ''} (${ideal}${extra})`, rows, failed: failures.filter((x) => x.workload === w) })
    }
  }
  const header = ['contender', 'size', 'wall s', 'x ksmd', 'x limit', 'CPU s', 'x ksmd', 'CPU/page', 'Pss freed', 'of ideal', 'counted', 'MemAvail', 'VMAs', 'meta B/pg', 'lost', 'notes']
  const right = [false, true, true, true, true, true, true, true, true, true, true, true, false, true, true, false]
  for (const g of groups) {
    out(`\n${g.title}`)
    const rows: string[][] = []
    for (const ms of g.rows) {
      const m0 = ms[0]!
      const c = m0.contender
      const vs = (other: ContenderId, f: (m: Measured) => number) => {
        const r = ms.map((m) => {
          const o = res.find((x) => x.workload === m.workload && x.contender === other && x.run === m.run && (opts.scale ? x.bytes === m.bytes : true))
          return o ? f(m) / f(o) : NaN
        }).filter(Number.isFinite)
        return r.length ? spread(r, f2) : ''
      }
      const ksmdOf: ContenderId | undefined = c === 'pm-now' ? 'ksmd-tuned' : c === 'pm-bg' ? 'ksmd-default' : undefined
      const notes: string[] = []
      const skipped = median(ms.map((m) => m.pagesSkippedBudget))
      if (skipped) notes.push(`${skipped} pages left by the mapping budget`)
      const vol = median(ms.map((m) => m.pagesVolatile))
      if (vol) notes.push(`${vol} pages volatile`)
      if (ms.some((m) => !m.converged)) notes.push('NOT converged')
      if (m0.writer) notes.push(`writer: ${median(ms.map((m) => m.writer!.rewrites))} rewrites`)
      if (m0.ksmd && m0.ksmd.systemSharedBefore) notes.push(`${m0.ksmd.systemSharedBefore} KSM pages of other processes before`)
      for (const m of ms) if (m.ksmd?.disturbed) notes.push(`KNOBS CHANGED by another process${ms.length > 1 ? ` in run ${m.run + 1}` : ''}: ${m.ksmd.disturbed}`)
      if (c === 'limit') {
        rows.push([CONTENDERS[c].label, mibs(m0.bytes), spread(ms.map((m) => m.wallS), (v) => v.toFixed(3)), '', '1.00', '', '', '', '', '', '', '', '', '', '', ''])
        continue
      }
      const ms0 = ms.map((m) => m)
      rows.push([
        CONTENDERS[c].label,
        mibs(m0.bytes),
        spread(ms0.map((m) => m.wallS), f2),
        ksmdOf ? vs(ksmdOf, (m) => m.wallS) : '',
        c === 'pm-now' || c === 'ksmd-tuned' ? vs('limit', (m) => m.wallS) : '',
        spread(ms0.map((m) => m.cpuS), f2),
        ksmdOf ? vs(ksmdOf, (m) => m.cpuS) : '',
        `${spread(ms0.map((m) => m.cpuUsPerScannedPage), f2)} us`,
        spread(ms0.map((m) => m.pssFreed / MiB), (v) => v.toFixed(0)) + ' MiB',
        spread(ms0.map((m) => m.freedOfIdeal), pct),
        String(median(ms0.map((m) => m.freedPagesCounted))),
        spread(ms0.map((m) => m.memAvailableGained / MiB), (v) => (v >= 0 ? '+' : '') + v.toFixed(0)) + ' MiB',
        `${median(ms0.map((m) => m.vmasBefore))}->${median(ms0.map((m) => m.vmasAfter))}`,
        spread(ms0.map((m) => m.metadataBytesPerPage), (v) => v.toFixed(1)),
        String(ms0.reduce((n, m) => n + m.mismatchedPages, 0)),
        notes.join('; '),
      ])
    }
    for (const f of g.failed) if (!rows.some((r) => r[0] === CONTENDERS[f.contender].label)) rows.push([CONTENDERS[f.contender].label, '', '', '', '', '', '', '', '', '', '', '', '', '', '', f.skipped ? `skipped: ${f.skipped}` : `FAILED: ${f.error?.split('\n')[0]}`])
    printGrid(header, rows, right, out)
  }
}

function summaryLine(gs: Goal[], seconds: number, loadBefore: number, disturbed: number): string {
  const measured = gs.filter((g) => g.pass !== null && g.goal !== '')
  const unmeasured = gs.filter((g) => g.pass === null && g.goal !== '')
  const missed = measured.filter((g) => !g.pass)
  let s = `bench: ${measured.length - missed.length} of ${measured.length} goals met`
  if (unmeasured.length) {
    const why = new Map<string, string[]>()
    for (const g of unmeasured) why.set(g.why ?? '?', [...(why.get(g.why ?? '?') ?? []), g.name])
    s += `, ${unmeasured.length} not measured (${[...why].map(([reason, names]) => `${names.join(', ')}: ${reason}`).join('; ')})`
  }
  if (missed.length) s += `; MISS: ${missed.map((g) => `${g.name} = ${g.unit(g.value)} (goal ${g.goal})`).join('; ')}`
  if (disturbed) s += `; ksmd's knobs were changed by another process during ${disturbed} contender run${disturbed > 1 ? 's' : ''}: those ksmd numbers are not ksmd at the stated knobs`
  return `${s}; ${seconds.toFixed(0)} s in all; load average ${loadBefore.toFixed(2)} before, ${loadavg()[0]!.toFixed(2)} after`
}

function chart(res: Results, opts: Options): string {
  const series = (c: ContenderId, color: string): ChartSeries[] => {
    const m = res.find((x) => x.workload === 'clones' && x.contender === c && x.freedOverTime)
    if (!m) return []
    return [{ name: `${CONTENDERS[c].label}: ${m.wallS.toFixed(2)} s`, color, points: [[0, 0], ...m.freedOverTime!.map(([t, b]) => [t, b / MiB] as [number, number])] }]
  }
  const idealLine = (...cs: ContenderId[]): ChartSeries[] => {
    const ms = res.filter((x) => x.workload === 'clones' && x.freedOverTime && cs.includes(x.contender))
    const m = ms[0]
    if (!m) return []
    const end = Math.max(...ms.flatMap((x) => x.freedOverTime!.map(([t]) => t)), 0.001)
    const y = (m.ideal.freedPages * PAGE_SIZE) / MiB
    return [{ name: `ideal: ${y.toFixed(0)} MiB`, color: '#999', dashed: true, points: [[0, y], [end, y]] }]
  }
  return lineChart(
    [
      { title: `clones ${opts.sizeMiB} MiB: memory freed while merging, as counted`, xLabel: 'seconds since start', yLabel: 'MiB freed, as counted', series: [...series('pm-now', '#d62728'), ...series('ksmd-tuned', '#1f77b4'), ...idealLine('pm-now', 'ksmd-tuned')] },
      { title: `clones ${opts.backgroundSizeMiB} MiB, background at 100 pages / 20 ms`, xLabel: 'seconds since start', yLabel: 'MiB freed, as counted', series: [...series('pm-bg', '#d62728'), ...series('ksmd-default', '#1f77b4'), ...idealLine('pm-bg', 'ksmd-default')] },
    ],
    [
      'Pages freed as each counts them: pagemerge from onProgress (pagesSharing + zeroPages), ksmd from pages_sharing + ksm_zero_pages every ' + POLL_MS + ' ms.',
      "Not Pss: reading a process's smaps walks its page tables under the lock its remaps wait for. The tables give Pss before and after.",
      machineLine(),
    ],
  )
}

async function main(): Promise<void> {
  const opts = options()
  const mc = machine() // loads the addon: without it nothing can run, so say so first
  const mcLine = machineLine()
  const startedAt = new Date()
  const loadBefore = loadavg()[0]!
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  ksmdCheck()
  const tasks = plan(opts)
  // pages of processes that exited while ksmd was stopped are still counted (and would be cleaned up on a contender's time)
  if (!ksmdSkip && tasks.some((t) => CONTENDERS[t.contender].ksmd) && ksmPages(kernel.status()) > 0) await settleKsmd(0)
  taskCount = tasks.length
  const t0 = process.hrtime.bigint()
  const res: Results = []
  const failures: Failure[] = []
  try {
    for (const t of tasks) {
      const r = await runTask(t, opts)
      if ('wallS' in r) res.push(r)
      else failures.push(r)
    }
  } finally {
    restoreKnobs()
  }
  let est: EstimatorMeasured | { error: string } | undefined
  if (opts.estimator) {
    progress.log(`bench estimator: ${ESTIMATOR.processes} processes x ${ESTIMATOR.mib} MiB, ${ESTIMATOR.runs} estimates of their buffers and one of the whole processes`)
    try {
      est = await estimatorBench(ESTIMATOR.processes, ESTIMATOR.mib, ESTIMATOR.runs)
      for (const line of estimatorLines(est)) progress.log(`bench estimator: ${line}`)
    } catch (err) {
      est = { error: (err as Error).message }
      progress.log(`bench estimator: FAILED: ${est.error}`)
    }
  }
  progress.clear()
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9
  const gs = opts.scale ? scaleGoals(res, failures, opts) : goals(res, failures, opts, est)
  const summary = summaryLine(gs, seconds, loadBefore, res.filter((m) => m.ksmd?.disturbed).length)
  const knobsAfter = kernel.status().knobs
  const knobsDiffer = (['run', 'pagesToScan', 'sleepMillisecs', 'advisorMode'] as const).some((k) => knobsBefore[k] !== knobsAfter[k])
  const command = `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`
  const json = {
    command,
    startedAt: startedAt.toISOString(),
    seconds,
    machine: mc,
    loadAverage: { before: loadBefore, after: loadavg()[0] },
    options: opts,
    ksmd: {
      skipped: ksmdSkip ?? null,
      knobsBefore,
      knobsAfter,
      /** Every knob the bench changed was written back (kernel.restore() never failed). */
      restored: restoreErrors.length === 0,
      restoreErrors,
      /** The knobs differ from before the bench although every restore succeeded: another process on this machine tuned ksmd meanwhile. */
      changedElsewhere: restoreErrors.length === 0 && knobsDiffer,
    },
    estimator: 'files: estimatedFreedPages of the pagemerge mergeNow() rows, read from the child before it merged',
    /** The estimator on issue #6's case (bench/estimator.ts); wall time around each estimate() call, CPU of every thread of the bench. */
    estimatorProcesses: est ?? null,
    goals: gs.map((g) => ({ name: g.name, value: g.value, samples: g.samples, goal: g.goal, pass: g.pass, ...(g.why ? { why: g.why } : {}) })),
    summary,
    results: res,
    failures,
  }
  const dir = opts.outDir
  mkdirSync(dir, { recursive: true })
  const stamp = startedAt.toISOString().replace(/[:.]/g, '-')
  const text = JSON.stringify(json, null, 2) + '\n'
  writeFileSync(join(dir, `${stamp}${opts.scale ? '-scale' : ''}.json`), text)
  writeFileSync(join(dir, opts.scale ? 'latest-scale.json' : 'latest.json'), text)
  if (!opts.scale && opts.only.includes('clones')) writeFileSync(join(dir, 'clones.svg'), chart(res, opts))
  if (opts.json) {
    process.stdout.write(text)
    return
  }
  const out = (line: string) => console.log(line)
  out(`pagemerge bench: ${opts.scale ? `clones at ${SCALE_SIZES_MIB.map((m) => mibs(m * MiB)).join(', ')}` : `${[...opts.only, ...(opts.estimator ? ['estimate'] : [])].join(', ')} at ${mibs(opts.sizeMiB * MiB)}${opts.background ? `, background at ${mibs(opts.backgroundSizeMiB * MiB)}` : ''}`}; ${opts.runs} run${opts.runs > 1 ? 's, medians [min..max]' : ''}`)
  out(mcLine)
  out(`ksmd: ${ksmdSkip ? `skipped: ${ksmdSkip}` : `use_zero_pages=${knobsBefore.useZeroPages ?? '?'}, smart_scan=${knobsBefore.smartScan ?? '?'}, max_page_sharing=${knobsBefore.maxPageSharing ?? '?'}; knobs ${json.ksmd.restored ? 'restored' : `NOT restored (${restoreErrors.join('; ')})`}, now run=${knobsAfter.run}, pages_to_scan=${knobsAfter.pagesToScan}, sleep_millisecs=${knobsAfter.sleepMillisecs}${json.ksmd.changedElsewhere ? ` (before the bench: run=${knobsBefore.run}, pages_to_scan=${knobsBefore.pagesToScan}, sleep_millisecs=${knobsBefore.sleepMillisecs}: another process tuned ksmd meanwhile)` : ''}`}`)
  out(`command: ${command}`)
  tables(res, failures, opts, out)
  if (est) {
    out(`\nestimator: ${ESTIMATOR.processes} processes x ${ESTIMATOR.mib} MiB (half the pages the same in all, an eighth zero, the rest unique; bench/estimate-child.ts)`)
    for (const line of 'error' in est ? [`FAILED: ${est.error}`] : estimatorLines(est)) out(`  ${line}`)
  }
  out('')
  const rows: Row[] = gs.map((g) => ({ name: g.name, value: Number.isFinite(g.value) ? g.unit(g.value) : '-', samples: g.samples.map(g.unit).join('  '), goal: g.goal, pass: g.pass === null ? (g.goal ? 'not measured' : undefined) : g.pass }))
  printTable(rows)
  out(`\nresults: ${relative(process.cwd(), join(dir, `${stamp}${opts.scale ? '-scale' : ''}.json`))}${!opts.scale && opts.only.includes('clones') ? `, ${relative(process.cwd(), join(dir, 'clones.svg'))}` : ''}`)
  out(summary)
}

main().catch((err) => {
  restoreKnobs()
  progress.clear()
  if (err instanceof RangeError || (err as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
    console.error(`bench: ${(err as Error).message}\n\n${USAGE}`) // a wrong argument: the message and the usage, no stack
    process.exitCode = 2
    return
  }
  console.error(err)
  process.exitCode = 1
})
