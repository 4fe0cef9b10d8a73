/**
 * Issue #6's own case for the estimator: four processes of 256 MiB each (bench/estimate-child.ts:
 * half the pages the same in all four, an eighth zero, the rest unique), estimated from this
 * process over their buffers (`ranges`), and once over the whole processes. Wall time is taken
 * around the estimate() call, so starting workers counts; CPU is every thread of this process.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { estimate, type EstimateReport } from '../lib/estimate'
import { PAGE_SIZE } from '../lib/native'
import { median, MiB } from './common'

export interface EstimatorRun {
  wallS: number
  cpuS: number
  /** Target memory read and hashed (pagesScanned x page size) per second of wall time. */
  gbs: number
  pagesScanned: number
  freeablePages: number
  phasesMs: EstimateReport['total']['phasesMs']
}

export interface EstimatorMeasured {
  processes: number
  bytesEach: number
  /** Pages a perfect merge frees in the buffers: the shared half n - 1 times, and every zero page. */
  expectedFreeablePages: number
  ranges: EstimatorRun[]
  whole?: EstimatorRun
  /** Seconds to start the children and fill their memory (not measured against the goal). */
  fillS: number
}

interface Child {
  proc: ChildProcess
  pid: number
  address: bigint
  bytes: number
}

async function startChild(mib: number): Promise<Child> {
  const proc = spawn(process.execPath, [join(__dirname, 'estimate-child.js'), String(mib)], { stdio: ['pipe', 'pipe', 'inherit'] })
  const line = await new Promise<string>((resolve, reject) => {
    const rl = createInterface({ input: proc.stdout! })
    rl.once('line', (l) => (rl.close(), resolve(l)))
    proc.once('exit', (code) => reject(new Error(`estimate-child exited (code ${code}) before it was ready`)))
  })
  const { pid, address, bytes } = JSON.parse(line) as { pid: number; address: string; bytes: number }
  return { proc, pid, address: BigInt(address), bytes }
}

async function once(opts: Parameters<typeof estimate>[0]): Promise<EstimatorRun> {
  const cpu0 = process.cpuUsage()
  const t0 = performance.now()
  const r = await estimate(opts)
  const wallS = (performance.now() - t0) / 1e3
  const cpu = process.cpuUsage(cpu0)
  return {
    wallS,
    cpuS: (cpu.user + cpu.system) / 1e6,
    gbs: (r.total.pagesScanned * PAGE_SIZE) / wallS / 1e9,
    pagesScanned: r.total.pagesScanned,
    freeablePages: r.total.bytesFreeable / PAGE_SIZE,
    phasesMs: r.total.phasesMs,
  }
}

/** Starts `processes` children of `mib` MiB, estimates their buffers `runs` times and the whole processes once, stops them. */
export async function estimatorBench(processes = 4, mib = 256, runs = 3, whole = true): Promise<EstimatorMeasured> {
  const t0 = performance.now()
  const children: Child[] = []
  try {
    for (let i = 0; i < processes; i++) children.push(await startChild(mib)) // one at a time: two fills at once would just share the cores
    const fillS = (performance.now() - t0) / 1e3
    const pids = children.map((c) => c.pid)
    const ranges = Object.fromEntries(children.map((c) => [c.pid, [{ address: c.address, bytes: c.bytes }]]))
    const out: EstimatorMeasured = {
      processes,
      bytesEach: mib * MiB,
      expectedFreeablePages: ((mib * MiB) / PAGE_SIZE) * ((processes - 1) / 2 + processes / 8),
      ranges: [],
      fillS,
    }
    for (let i = 0; i < runs; i++) out.ranges.push(await once({ pids, ranges, top: 0 }))
    if (whole) out.whole = await once({ pids, top: 0 })
    return out
  } finally {
    for (const c of children) c.proc.stdin?.end()
    await Promise.all(children.map((c) => (c.proc.exitCode === null ? new Promise((r) => c.proc.once('exit', r)) : undefined)))
  }
}

/** One line per measurement, for the table and for docs/estimate.md. */
export function estimatorLines(m: EstimatorMeasured): string[] {
  const line = (what: string, r: EstimatorRun) =>
    `${what}: ${r.wallS.toFixed(3)} s wall, ${r.cpuS.toFixed(2)} s CPU, ${((r.pagesScanned * PAGE_SIZE) / MiB).toFixed(0)} MiB read = ${r.gbs.toFixed(2)} GB/s; freeable ${r.freeablePages} pages; phases ms ${JSON.stringify(r.phasesMs)}`
  const lines = m.ranges.map((r, i) => line(`ranges, run ${i + 1}`, r))
  if (m.whole) lines.push(line('whole processes', m.whole))
  lines.push(`expected freeable in the ranges: ${m.expectedFreeablePages} pages; median over the ranges runs ${median(m.ranges.map((r) => r.gbs)).toFixed(2)} GB/s`)
  return lines
}
