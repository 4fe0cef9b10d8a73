/**
 * Background scanning once converged: CPU per scanned page of pagemerge's scanner and of ksmd,
 * both at ksmd's default knobs (100 pages every 20 ms), after every duplicate has merged.
 *
 *   npm run bench:steady -- [--workload clones|scattered|sparse|files|volatile] [--size MiB (128)] [--settle N (4)] [--seconds S (10)]
 *
 * `npm run bench`'s background rows stop at convergence, where each merge's remap dominates; a
 * scanner spends most of its life after it, rescanning memory that is merged or unique, where
 * the cost of each wake-up decides. Each contender runs in a child process of its own: the
 * workload is loaded, the scanner runs `--settle` full scans, then its CPU and pages scanned are
 * taken over `--seconds`. ksmd needs root and CONFIG_KSM (skipped with the reason otherwise); its
 * knobs are saved and restored, on SIGINT and SIGTERM too.
 */
import { fork } from 'node:child_process'
import { setTimeout as sleep } from 'node:timers/promises'
import { parseArgs } from 'node:util'
import { kernelKsmAvailable, KernelKsm } from '../lib/kernel'
import { PageMerger } from '../lib/page-merger'
import { integerOption, machineLine, MiB } from './common'
import { loadWorkload, WORKLOAD_NAMES, type WorkloadName } from './workloads'

const KNOBS = { pagesToScan: 100, sleepMillisecs: 20 } // ksmd's defaults, for both
const USAGE = `usage: npm run bench:steady -- [--workload ${WORKLOAD_NAMES.join('|')}] [--size MiB (128)] [--settle N (4)] [--seconds S (10)]`

interface Options {
  workload: WorkloadName
  sizeMiB: number
  settle: number
  seconds: number
}

interface Measured {
  who: 'pagemerge' | 'ksmd'
  pages: number
  cpuMs: number
  /** What was merged when the window began (pagemerge: pagesSharing + zeroPages; ksmd: the system's pages_sharing). */
  merged: number
}

function options(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      workload: { type: 'string', default: 'clones' },
      size: { type: 'string', default: '128' },
      settle: { type: 'string', default: '4' },
      seconds: { type: 'string', default: '10' },
      as: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  })
  if (values.help) {
    console.log(USAGE)
    process.exit(0)
  }
  const workload = values.workload as WorkloadName
  if (!WORKLOAD_NAMES.includes(workload)) throw new RangeError(`--workload must be one of ${WORKLOAD_NAMES.join(', ')}\n${USAGE}`)
  return {
    workload,
    sizeMiB: integerOption('size', values.size, 64, 4096),
    settle: integerOption('settle', values.settle, 2, 100),
    seconds: integerOption('seconds', values.seconds, 1, 600),
  }
}

/** pagemerge's background scanner, in this (child) process. */
async function measurePageMerger(o: Options): Promise<Measured> {
  const pm = new PageMerger(KNOBS)
  const w = loadWorkload(o.workload, o.sizeMiB * MiB, (n) => {
    const b = pm.alloc(n)
    return new Uint8Array(b.buffer, 0, b.buffer.byteLength)
  })
  const keep = setTimeout(() => {}, 1e9) // the scanner's timer does not hold the event loop
  let scans = 0
  pm.start({ onProgress: (p) => void (scans = p.fullScans) })
  while (scans < o.settle) await sleep(100)
  const st = pm.stats()
  const cpu0 = process.cpuUsage()
  await sleep(o.seconds * 1000)
  const cpu = process.cpuUsage(cpu0)
  const pages = pm.stats().pagesScanned - st.pagesScanned
  await pm.stop()
  await pm.close()
  clearTimeout(keep)
  void w // the buffers stay registered and alive to here: a registration does not hold them
  return { who: 'pagemerge', pages, cpuMs: (cpu.user + cpu.system) / 1e3, merged: st.pagesSharing + st.zeroPages }
}

/** ksmd, over this (child) process's memory marked MADV_MERGEABLE. */
async function measureKsmd(o: Options): Promise<Measured> {
  const kernel = new KernelKsm()
  const restore = () => kernel.restore()
  const onSignal = (signal: NodeJS.Signals) => {
    restore()
    process.kill(process.pid, signal)
  }
  process.once('SIGINT', onSignal).once('SIGTERM', onSignal)
  try {
    const pm = new PageMerger({ engine: 'kernel' })
    const w = loadWorkload(o.workload, o.sizeMiB * MiB, (n) => {
      const b = pm.alloc(n)
      return new Uint8Array(b.buffer, 0, b.buffer.byteLength)
    })
    kernel.tune({ ...KNOBS, run: 1 })
    const scans0 = kernel.counters().fullScans
    while (kernel.counters().fullScans < scans0 + o.settle) await sleep(100)
    const c0 = kernel.counters(), cpu0 = kernel.status().ksmd?.cpuNs ?? NaN
    const merged = Number(kernel.status().stats.pagesSharing ?? NaN)
    await sleep(o.seconds * 1000)
    const c1 = kernel.counters(), cpu1 = kernel.status().ksmd?.cpuNs ?? NaN
    await pm.close()
    void w // as in measurePageMerger
    return { who: 'ksmd', pages: c1.pagesScanned - c0.pagesScanned, cpuMs: (cpu1 - cpu0) / 1e6, merged }
  } finally {
    restore()
  }
}

function child(who: string, argv: string[]): Promise<Measured> {
  return new Promise((resolve, reject) => {
    const c = fork(__filename, [...argv, '--as', who], { execArgv: [] })
    let got: Measured | undefined
    c.on('message', (m: Measured) => (got = m))
    c.on('exit', (code) => (got ? resolve(got) : reject(new Error(`the ${who} child exited with ${code}`))))
  })
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2)
  const o = options(argv)
  const as = argv.indexOf('--as')
  if (as >= 0) {
    const m = argv[as + 1] === 'ksmd' ? await measureKsmd(o) : await measurePageMerger(o)
    process.send!(m)
    return
  }
  console.log(`pagemerge bench:steady: ${o.workload} at ${o.sizeMiB} MiB, ${KNOBS.pagesToScan} pages every ${KNOBS.sleepMillisecs} ms, after ${o.settle} full scans, over ${o.seconds} s`)
  console.log(machineLine())
  const rows: Measured[] = [await child('pagemerge', argv)]
  const ksm = kernelKsmAvailable()
  if (!ksm.ok || !ksm.canTune) console.log(`ksmd: skipped (${ksm.reason ?? 'its knobs cannot be written: needs root'})`)
  else if (new KernelKsm().counters().run === 1) console.log('ksmd: skipped (it is running already: its CPU would include other processes\' pages)')
  else rows.push(await child('ksmd', argv))
  const perPage = (m: Measured) => (m.cpuMs * 1e3) / m.pages
  for (const m of rows)
    console.log(`${m.who.padEnd(10)} ${String(m.pages).padStart(8)} pages scanned  ${m.cpuMs.toFixed(1).padStart(7)} ms CPU  ${perPage(m).toFixed(2).padStart(6)} us/page  (merged when the window began: ${m.merged} pages)`)
  if (rows.length === 2) console.log(`pagemerge / ksmd, CPU per scanned page: ${(perPage(rows[0]!) / perPage(rows[1]!)).toFixed(2)} x`)
}

main().catch((err: unknown) => {
  console.error((err as Error).message ?? err)
  process.exitCode = 1
})
