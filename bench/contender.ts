/**
 * One contender of `npm run bench` in a process of its own (forked by bench/run.ts with
 * --expose-gc), so that no contender's memory flatters another's. argv[2] is the Spec as JSON;
 * the child fills its workload, says `ready` (with Pss before), waits for `go`, runs, verifies every
 * byte against the seeded generator, and sends one `result`.
 *
 * - `limit`: one core reading the same number of bytes once.
 * - `pm-now`: pagemerge mergeNow().
 * - `pm-bg`: pagemerge background scanning at the given knobs, until converged.
 * - `ksmd`: private anonymous memory, marked MADV_MERGEABLE at `go` (the parent has tuned ksmd by
 *   then); the parent watches ksmd's counters and says `stop` when ksmd has converged.
 *
 * In `volatile`, a worker thread of this file rewrites one page in four while the scan runs.
 */
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads'
import { setTimeout as sleep } from 'node:timers/promises'
import { loadNative, PAGE_SIZE } from '../lib/native'
import { PageMerger } from '../lib/page-merger'
import { meminfo, smapsRollup } from '../lib/procfs'
import type { Stats } from '../lib/engine'
import { gcRounds, hashDiffers, hashWords, limitBuffer, median, readHalves, threadCpuNs } from './common'
import { hashBuffers, loadWorkload, pageSeed, roundUp, VOLATILE_EVERY, writePage, type Ideal, type Loaded, type WorkloadName } from './workloads'
import { sharedBytes } from '../lib/tables'

export type ContenderKind = 'limit' | 'pm-now' | 'pm-bg' | 'ksmd'

export interface Spec {
  kind: ContenderKind
  workload: WorkloadName
  bytes: number
  filesRoot?: string
  /** pm-bg: the knobs. */
  pagesToScan?: number
  sleepMillisecs?: number
  /** pm-bg: give up after this long. */
  timeoutMs?: number
}

/** What the OS says about the child, before or after. */
export interface Snapshot {
  pss: number
  /** Pss_Anon + Pss_Shmem: the process's own memory, without file pages (the binary's code, which is faulted in as new paths run). */
  pssOwn: number
  /** Pss of private anonymous memory, and of shared memory (memfd windows and pool pages). */
  pssAnon: number
  pssShmem: number
  rss: number
  memAvailable: number
  vmas: number
}

export interface ChildResult {
  pages: number
  ideal: Ideal
  files?: Loaded['files']
  before: Snapshot
  after: Snapshot
  /** pm-*: wall and CPU (this process's threads, less the volatile writer's) until converged. */
  wallS?: number
  cpuS?: number
  converged?: boolean
  stats?: Stats
  /** Pages whose bytes differ from the generator's after the run (bytes lost), and those bytes exactly. */
  mismatchedPages: number
  bytesLost: number
  verifyS: number
  writer?: WriterReport
  /** limit: milliseconds for one read of `bytes` (median of 3 after an untimed pass). */
  limitMs?: number
  fillS: number
  /** ksmd: seconds to mark every buffer MADV_MERGEABLE, which starts its clock (part of its wall time). */
  adviseS?: number
}

export interface WriterReport {
  volatilePages: number
  rewrites: number
  cpuS: number
}

export type ChildMessage =
  | { type: 'ranges'; ranges: Array<[string, number]> }
  | { type: 'ready'; pid: number; pages: number; ideal: Ideal; before: Snapshot }
  | { type: 'progress'; freedPages: number; fullScans: number }
  | { type: 'advised' }
  | { type: 'result'; result: ChildResult }
  | { type: 'error'; message: string }

export type ParentMessage = { type: 'go' } | { type: 'stop' }

const SETTLE_MS = 300 // worker threads start at a PageMerger's first alloc(): let them finish starting
const PROGRESS_MS = 250
const WRITER_BATCH = 256 // pages the writer rewrites between 1 ms pauses: it leaves the scanner some CPU on 2 cores

// ---- the volatile writer (a worker thread of this same file) ----

interface WriterData {
  buffers: SharedArrayBuffer[]
  /** Int32 [stop flag, a word to sleep on], then Float64 [the writer thread's CPU ns so far] */
  control: SharedArrayBuffer
  /** The last version written of each volatile page (0: as loaded). */
  versions: SharedArrayBuffer
}

function writerMain(data: WriterData): void {
  const control = new Int32Array(data.control, 0, 2)
  const cpu = new Float64Array(data.control, 8, 1)
  const versions = new Uint32Array(data.versions)
  const words = data.buffers.map((b) => new Uint32Array(b))
  const cpu0 = threadCpuNs()
  let rewrites = 0
  outer: for (;;) {
    let j = 0
    for (let b = 0; b < words.length; b++) {
      const pages = words[b]!.length / (PAGE_SIZE / 4)
      for (let p = VOLATILE_EVERY - 1; p < pages; p += VOLATILE_EVERY, j++) {
        const v = versions[j]! + 1
        writePage(words[b]!, p * (PAGE_SIZE / 4), pageSeed(b, p, v))
        Atomics.store(versions, j, v) // after the bytes: the verifier expects this version's bytes
        if (++rewrites % WRITER_BATCH === 0) {
          cpu[0] = threadCpuNs() - cpu0 // read by the scanner's thread, to leave the writer's CPU out of its own
          if (Atomics.load(control, 0)) break outer
          Atomics.wait(control, 1, 0, 1)
        }
      }
    }
  }
  parentPort!.postMessage({ rewrites, cpuNs: threadCpuNs() - cpu0 })
}

class Writer {
  readonly #control = new SharedArrayBuffer(16)
  readonly #versions: SharedArrayBuffer
  readonly #worker: Worker
  readonly #done: Promise<{ rewrites: number; cpuNs: number }>
  readonly volatilePages: number

  constructor(buffers: Uint8Array[]) {
    this.volatilePages = buffers.reduce((n, b) => n + Math.floor(b.byteLength / PAGE_SIZE / VOLATILE_EVERY), 0)
    this.#versions = new SharedArrayBuffer(4 * this.volatilePages)
    const data: WriterData = { buffers: buffers.map((b) => b.buffer as SharedArrayBuffer), control: this.#control, versions: this.#versions }
    this.#worker = new Worker(__filename, { workerData: data })
    this.#done = new Promise((resolve, reject) => {
      this.#worker.once('message', resolve)
      this.#worker.once('error', reject)
    })
  }

  /** Stops rewriting and waits for the thread: from here on, versions() is final. */
  async stop(): Promise<WriterReport> {
    Atomics.store(new Int32Array(this.#control), 0, 1)
    const r = await this.#done
    await this.#worker.terminate()
    return { volatilePages: this.volatilePages, rewrites: r.rewrites, cpuS: r.cpuNs / 1e9 }
  }

  /** Seconds of CPU the writer thread has used (updated every WRITER_BATCH pages). */
  cpuS(): number {
    return new Float64Array(this.#control, 8, 1)[0]! / 1e9
  }

  versions(): Uint32Array {
    return new Uint32Array(this.#versions)
  }
}

// ---- measuring and verifying ----

function snapshot(): Snapshot {
  const r = smapsRollup()
  return { pss: r.Pss, pssOwn: (r.Pss_Anon ?? NaN) + (r.Pss_Shmem ?? NaN), pssAnon: r.Pss_Anon ?? NaN, pssShmem: r.Pss_Shmem ?? NaN, rss: r.Rss, memAvailable: meminfo().MemAvailable ?? NaN, vmas: loadNative().mappingCount() }
}

/**
 * Reads every page back (which also maps in what a merge left unmapped, so that Pss counts it)
 * and compares it with what the generator wrote; for pages the writer rewrote, with the last
 * version it wrote. Returns pages that differ and the bytes that differ in them.
 */
function verify(w: Loaded, versions?: Uint32Array): { mismatchedPages: number; bytesLost: number } {
  const got = new BigUint64Array(sharedBytes(8 * w.pages))
  hashBuffers(w.buffers, got)
  const gotWords = hashWords(got), expectedHashes = hashWords(w.expected)
  const expectedPage = Buffer.alloc(PAGE_SIZE)
  const expectedWords = new Uint32Array(expectedPage.buffer, expectedPage.byteOffset, PAGE_SIZE / 4)
  let mismatchedPages = 0, bytesLost = 0
  let at = 0, j = 0
  for (let b = 0; b < w.buffers.length; b++) {
    const buf = w.buffers[b]!
    const pages = buf.byteLength / PAGE_SIZE
    for (let p = 0; p < pages; p++) {
      const rewritten = versions !== undefined && p % VOLATILE_EVERY === VOLATILE_EVERY - 1
      const v = rewritten ? versions[j++]! : 0
      if (v === 0) {
        if (hashDiffers(gotWords, expectedHashes, at + p)) (mismatchedPages++), (bytesLost += PAGE_SIZE) // the generator's bytes are not kept: count the whole page
        continue
      }
      // a rewritten page: against the last version the writer wrote, byte by byte
      writePage(expectedWords, 0, pageSeed(b, p, v))
      const page = Buffer.from(buf.buffer, buf.byteOffset + p * PAGE_SIZE, PAGE_SIZE)
      if (page.equals(expectedPage)) continue
      mismatchedPages++
      for (let i = 0; i < PAGE_SIZE; i++) if (page[i] !== expectedPage[i]) bytesLost++
    }
    at += pages
  }
  return { mismatchedPages, bytesLost }
}

// ---- the child's side of the conversation ----

function send(m: ChildMessage): Promise<void> {
  return new Promise((resolve) => process.send!(m, undefined, {}, () => resolve()))
}

let pending: ((m: ParentMessage) => void)[] = []
const inbox: ParentMessage[] = []
function onParent(m: ParentMessage): void {
  const waiter = pending.shift()
  if (waiter) waiter(m)
  else inbox.push(m)
}
function next(type: ParentMessage['type']): Promise<void> {
  const queued = inbox.findIndex((m) => m.type === type)
  if (queued >= 0) {
    inbox.splice(queued, 1)
    return Promise.resolve()
  }
  return new Promise((resolve) => {
    const wait = (m: ParentMessage) => (m.type === type ? resolve() : (inbox.push(m), pending.push(wait)))
    pending.push(wait)
  })
}

const seconds = (start: bigint) => Number(process.hrtime.bigint() - start) / 1e9
const cpuSeconds = (since: NodeJS.CpuUsage) => {
  const d = process.cpuUsage(since)
  return (d.user + d.system) / 1e6
}

async function runLimit(spec: Spec): Promise<ChildResult> {
  const arena = new (loadNative().Arena)()
  const bytes = roundUp(spec.bytes / 2) * 2 // two equal halves of whole pages
  const t = process.hrtime.bigint()
  const limit = limitBuffer(arena, bytes)
  const fillS = seconds(t)
  const pages = bytes / PAGE_SIZE
  const before = snapshot()
  send({ type: 'ready', pid: process.pid, pages, ideal: { freedPages: 0, mergingPages: 0 }, before })
  await next('go')
  readHalves(limit, pages / 2) // untimed: the first read after filling can pay for page-table work
  const limitMs = median([0, 1, 2].map(() => readHalves(limit, pages / 2)))
  return { pages, ideal: { freedPages: 0, mergingPages: 0 }, before, after: snapshot(), mismatchedPages: 0, bytesLost: 0, verifyS: 0, limitMs, fillS }
}

/**
 * Fills the workload through `alloc`, starts the volatile writer, lets the process settle, then
 * reports ready and waits for the parent's go: what every contender but the limit does first.
 */
async function prepare(spec: Spec, alloc: (bytes: number) => Uint8Array) {
  const t = process.hrtime.bigint()
  const w = loadWorkload(spec.workload, spec.bytes, alloc, spec.filesRoot ? { filesRoot: spec.filesRoot } : {})
  const fillS = seconds(t)
  const writer = spec.workload === 'volatile' ? new Writer(w.buffers) : undefined
  // files, before mergeNow(): where its buffers are, for the parent's estimator to read first;
  // sent before the baseline, so that the message's garbage (51k records) is not counted against the merge
  if (spec.workload === 'files' && spec.kind === 'pm-now') await send({ type: 'ranges', ranges: w.buffers.map((b): [string, number] => [String(loadNative().addressOf(b)), b.byteLength]) })
  await sleep(SETTLE_MS)
  await gcRounds(3, 'bench')
  const before = snapshot()
  send({ type: 'ready', pid: process.pid, pages: w.pages, ideal: w.ideal, before })
  await next('go')
  return { w, fillS, writer, before }
}

async function runPageMerger(spec: Spec): Promise<ChildResult> {
  const background = spec.kind === 'pm-bg'
  const pm = new PageMerger(background ? { pagesToScan: spec.pagesToScan ?? 100, sleepMillisecs: spec.sleepMillisecs ?? 20 } : {})
  const { w, fillS, writer, before } = await prepare(spec, (n) => {
    const b = pm.alloc(n)
    return new Uint8Array(b.buffer, 0, b.buffer.byteLength)
  })
  // CPU: every thread of this process (the coordinator, the pool) less the volatile writer, which is the application's
  const writer0 = writer?.cpuS() ?? 0
  const cpu0 = process.cpuUsage()
  const ownCpu = () => cpuSeconds(cpu0) - ((writer?.cpuS() ?? 0) - writer0)
  const start = process.hrtime.bigint()
  let wallS: number, cpuS: number, converged = true, stats: Stats
  if (!background) {
    // progress for the parent's chart, after each batch: a few messages in all
    stats = await pm.mergeNow({ onProgress: (p) => send({ type: 'progress', freedPages: p.pagesSharing + p.zeroPages, fullScans: p.fullScans }) })
    wallS = seconds(start)
    cpuS = ownCpu()
  } else {
    const freed = (p: { pagesSharing: number; zeroPages: number }) => p.pagesSharing + p.zeroPages
    let best = freed(pm.stats()), riseScans = 0, riseWall = 0, riseCpu = 0, lastProgress = 0
    // No polling: onProgress reports from inside the scanner's own wake-ups. A timer of ours would
    // wake this thread more often than the scanner does, and its CPU would be counted as the scanner's.
    converged = await new Promise<boolean>((resolve) => {
      const deadline = setTimeout(() => ((riseWall = seconds(start)), (riseCpu = ownCpu()), resolve(false)), spec.timeoutMs ?? 300_000)
      pm.start({
        onProgress: (p) => {
          const wall = seconds(start)
          if (freed(p) > best) (best = freed(p)), (riseScans = p.fullScans), (riseWall = wall), (riseCpu = ownCpu())
          if (wall * 1e3 - lastProgress >= PROGRESS_MS) (lastProgress = wall * 1e3), void send({ type: 'progress', freedPages: best, fullScans: p.fullScans })
          // converged: nothing left to merge, or a whole full scan merged nothing new (and merging had its chance: it starts in the second scan)
          if (best >= w.ideal.freedPages || (p.fullScans >= riseScans + 2 && p.fullScans >= 3)) clearTimeout(deadline), resolve(true)
        },
      })
    })
    stats = pm.stats()
    wallS = riseWall
    cpuS = riseCpu
    await pm.stop()
  }
  const report = writer ? await writer.stop() : undefined
  const v = process.hrtime.bigint()
  const lost = verify(w, writer?.versions())
  const verifyS = seconds(v)
  await gcRounds(3, 'bench') // the garbage of merging and of the check: what stays is what merging costs
  const after = snapshot()
  await pm.close()
  return { pages: w.pages, ideal: w.ideal, ...(w.files ? { files: w.files } : {}), before, after, wallS, cpuS, converged, stats, ...lost, verifyS, ...(report ? { writer: report } : {}), fillS }
}

async function runKsmd(spec: Spec): Promise<ChildResult> {
  const native = loadNative()
  const arena = new native.Arena()
  const blocks: SharedArrayBuffer[] = []
  const { w, fillS, writer, before } = await prepare(spec, (n) => {
    const sab = arena.alloc(n, false) // private anonymous: what ksmd merges
    blocks.push(sab)
    return new Uint8Array(sab)
  })
  // MADV_MERGEABLE only now, after the parent has tuned ksmd: if another process already runs
  // ksmd, marking the memory earlier would let it merge before the clock starts
  const a = process.hrtime.bigint()
  for (const sab of blocks) arena.advise(sab, true)
  const adviseS = seconds(a)
  await send({ type: 'advised' })
  await next('stop') // the parent watches ksmd's counters and this process's ksm_stat
  const report = writer ? await writer.stop() : undefined
  const v = process.hrtime.bigint()
  const lost = verify(w, writer?.versions())
  const verifyS = seconds(v)
  await gcRounds(3, 'bench')
  const after = snapshot()
  return { pages: w.pages, ideal: w.ideal, ...(w.files ? { files: w.files } : {}), before, after, ...lost, verifyS, ...(report ? { writer: report } : {}), fillS, adviseS }
}

async function child(): Promise<void> {
  process.on('message', onParent)
  const spec = JSON.parse(process.argv[2] ?? '{}') as Spec
  try {
    const result = spec.kind === 'limit' ? await runLimit(spec) : spec.kind === 'ksmd' ? await runKsmd(spec) : await runPageMerger(spec)
    await send({ type: 'result', result })
  } catch (err) {
    await send({ type: 'error', message: (err as Error).stack ?? String(err) })
  }
  process.off('message', onParent)
  process.disconnect()
}

if (!isMainThread) writerMain(workerData as WriterData)
else if (process.send) void child()
else {
  console.error('bench/contender.js is run by bench/run.js (npm run bench)')
  process.exitCode = 2
}
