/**
 * `pagemerge demo`: a service that loads the same data set once per tenant, as multi-tenant
 * services do, merges, and shows what the OS says it gave back (Pss from
 * /proc/self/smaps_rollup), after checking that every buffer still holds its file's bytes.
 */
import { setImmediate as nextTurn } from 'node:timers/promises'
import { statSync } from 'node:fs'
import { resolve } from 'node:path'
import { Command, InvalidArgumentError } from 'commander'
import { PageMerger, smapsRollup, type Stats } from '../../lib/index'
import { defaultDataDir, listFiles, readInto } from '../dataset'
import { CliError, colorsFor, fmt, Progress, table, type Colors } from '../terminal'

const MiB = 1024 * 1024
const PAGE = 4096
/** ksmd's defaults (/sys/kernel/mm/ksm/pages_to_scan, sleep_millisecs), and the full scans it needs to merge. */
const KSMD_PAGES_TO_SCAN = 100
const KSMD_SLEEP_MS = 20
/** A page must look the same in two full scans before ksmd merges it through its unstable tree. */
const KSMD_FULL_SCANS = 2
const MAX_TENANTS = 1000

interface DemoOptions {
  tenants: number
  size: number
  data?: string
  json: boolean
  progress: boolean
  color: boolean
}

/** What mergeNow() reports after each batch. */
interface MergeProgress {
  pagesScanned: number
  pagesTotal: number
  fullScans: number
  pagesSharing: number
  zeroPages: number
}

/** The demo's result, as `--json` prints it. Byte counts are bytes, times milliseconds. */
export interface DemoReport {
  tenants: number
  data: string
  files: number
  dataBytes: number
  dataPages: number
  buffers: number
  workers: number
  memory: {
    source: string
    pss: { before: number; after: number; freed: number }
    /** Pss_Shmem: the part of Pss in shared memory, which here is the buffers' memfd pages. */
    pssShmem: { before: number; after: number; freed: number }
    rss: { before: number; after: number; freed: number }
  }
  merge: {
    pagesTracked: number
    pagesShared: number
    pagesSharing: number
    zeroPages: number
    pagesSkippedBudget: number
    fullScans: number
    wallMs: number
    cpuMs: number
  }
  verify: { buffersDiffering: number; bytesDiffering: number }
  ksmdAtDefaults: { pagesToScan: number; sleepMillisecs: number; fullScans: number; estimatedMs: number }
}

function tenantsArg(value: string): number {
  const n = Number(value)
  if (!/^\d+$/.test(value.trim()) || !Number.isInteger(n) || n < 1 || n > MAX_TENANTS)
    throw new InvalidArgumentError(`must be an integer from 1 to ${MAX_TENANTS}`)
  return n
}

function sizeArg(value: string): number {
  const n = Number(value)
  if (value.trim() === '' || !Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('must be a positive number of MiB')
  return n
}

export function demoCommand(): Command {
  return new Command('demo')
    .summary('load one data set per tenant, merge, and show what the OS gives back')
    .description(
      'Plays a service that loads the same data set once per tenant, one pm.alloc() buffer per file, then ' +
        'merges with pm.mergeNow(). Prints Pss and Rss before and after (from /proc/self/smaps_rollup, ' +
        'after reading every buffer back and checking it against its file), pages merged, zero pages, ' +
        "the time taken, and an estimate of how long the kernel's ksmd would need at its default knobs. " +
        'Exits 1 if any byte read back differs from its file.',
    )
    .option('-t, --tenants <n>', `tenants that each load the data set (1-${MAX_TENANTS})`, tenantsArg, 4)
    .option('-s, --size <MiB>', 'load at most this many MiB of files per tenant', sizeArg, 64)
    .option('-d, --data <dir>', "the data set: the files under <dir> (default: this package's node_modules)")
    .option('--json', 'print one JSON object (the report) instead of text')
    .option('--no-progress', 'no progress bar (it is drawn on stderr, and only when stderr is a terminal)')
    .addHelpText(
      'after',
      `
Examples:
  $ pagemerge demo
  $ pagemerge demo --tenants 8 --size 16
  $ pagemerge demo --data /usr/share/doc --tenants 2
  $ pagemerge demo --json | jq .memory.pss.freed`,
    )
    .action(async (_options: unknown, command: Command) => {
      const options = command.optsWithGlobals<DemoOptions>()
      const report = await runDemo(options)
      if (report.verify.bytesDiffering > 0) {
        throw new CliError(
          `${fmt.int(report.verify.bytesDiffering)} bytes in ${fmt.int(report.verify.buffersDiffering)} buffers ` +
            "differ from their files' bytes after merging",
        )
      }
    })
}

/** Bytes at which `a` and `b` (of equal length) differ. */
function differingBytes(a: Buffer, b: Buffer): number {
  let n = Math.abs(a.length - b.length)
  for (let i = Math.min(a.length, b.length) - 1; i >= 0; i--) if (a[i] !== b[i]) n++
  return n
}

export async function runDemo(options: DemoOptions): Promise<DemoReport> {
  const dataDir = resolve(options.data ?? defaultDataDir())
  if (!statSync(dataDir, { throwIfNoEntry: false })?.isDirectory()) throw new CliError(`--data ${dataDir} is not a directory`)
  const files = listFiles(dataDir, Math.floor(options.size * MiB))
  if (files.length === 0) throw new CliError(`no readable non-empty file of at most ${options.size} MiB under ${dataDir}`)
  const dataBytes = files.reduce((sum, f) => sum + f.size, 0)
  const dataPages = files.reduce((sum, f) => sum + Math.ceil(f.size / PAGE), 0)
  const buffers = options.tenants * files.length
  const scratch = Buffer.allocUnsafeSlow(files.reduce((max, f) => Math.max(max, f.size), 0))

  const c = colorsFor(process.stdout, options.color)
  const say = options.json ? (_: string) => {} : (line: string) => process.stdout.write(line + '\n')
  const progress = new Progress(options.progress, options.color)
  // Ctrl-C: take the bar away and give the cursor back before the process ends (130 = 128 + SIGINT).
  const onSigint = () => {
    progress.stop()
    process.exit(130)
  }
  process.once('SIGINT', onSigint)

  const pm = new PageMerger()
  try {
    say(
      `${c.bold('pagemerge demo')}: ${options.tenants} tenants each load ${fmt.int(files.length)} files ` +
        `(${fmt.mib(dataBytes)}, ${fmt.int(dataPages)} pages) from ${dataDir}`,
    )
    say(c.dim(`hashing on ${pm.options.workers} worker thread(s) and the main thread`))

    // Each tenant loads the data set on its own, one buffer per file, as it would from disk.
    let t0 = performance.now()
    progress.start('loading', buffers)
    const tenants: Buffer[][] = []
    for (let t = 0; t < options.tenants; t++) {
      tenants.push(
        files.map((file, i) => {
          const bytes = readInto(file, scratch)
          const buf = pm.alloc(bytes.length)
          bytes.copy(buf)
          progress.update(t * files.length + i + 1, buffers, `tenant ${t + 1} of ${options.tenants}`)
          return buf
        }),
      )
      await nextTurn() // lets a Ctrl-C in
    }
    progress.stop()
    say(`loaded ${fmt.int(buffers)} buffers in ${fmt.secs(performance.now() - t0)}`)
    const before = smapsRollup()

    const cpu0 = process.cpuUsage()
    t0 = performance.now()
    progress.start('merging', 1)
    const onProgress = (p: MergeProgress): void => {
      // pagesScanned counts within the current full scan: 0 after the first means one just ended.
      const ended = p.pagesScanned === 0 && p.fullScans > 0
      const scan = ended ? `full scan ${p.fullScans} done` : `full scan ${p.fullScans + 1}`
      progress.update(ended ? p.pagesTotal : p.pagesScanned, p.pagesTotal, `${scan}, ${fmt.int(p.pagesSharing)} pages merged, ${fmt.int(p.zeroPages)} zero`)
    }
    const stats: Stats = await pm.mergeNow({ onProgress })
    const mergeMs = performance.now() - t0
    const cpu = process.cpuUsage(cpu0)
    progress.stop()
    say(`merged in ${fmt.secs(mergeMs)} (${stats.fullScans} full scans)`)

    // Bytes are sacred: every buffer of every tenant must still read its file's bytes. Reading them
    // all also maps every merged page in again, so that Pss counts each of them.
    progress.start('verifying', files.length)
    let buffersDiffering = 0
    let bytesDiffering = 0
    for (const [i, file] of files.entries()) {
      const bytes = readInto(file, scratch)
      for (const tenant of tenants) {
        const buf = tenant[i]!
        if (buf.equals(bytes)) continue
        buffersDiffering++
        bytesDiffering += differingBytes(buf, bytes)
      }
      progress.update(i + 1, files.length, `${fmt.int((i + 1) * options.tenants)} of ${fmt.int(buffers)} buffers`)
    }
    progress.stop()
    const after = smapsRollup()

    const report: DemoReport = {
      tenants: options.tenants,
      data: dataDir,
      files: files.length,
      dataBytes,
      dataPages,
      buffers,
      workers: pm.options.workers,
      memory: {
        source: '/proc/self/smaps_rollup',
        pss: { before: before.Pss, after: after.Pss, freed: before.Pss - after.Pss },
        pssShmem: { before: shmem(before), after: shmem(after), freed: shmem(before) - shmem(after) },
        rss: { before: before.Rss, after: after.Rss, freed: before.Rss - after.Rss },
      },
      merge: {
        pagesTracked: stats.pagesTracked,
        pagesShared: stats.pagesShared,
        pagesSharing: stats.pagesSharing,
        zeroPages: stats.zeroPages,
        pagesSkippedBudget: stats.pagesSkippedBudget,
        fullScans: stats.fullScans,
        wallMs: round(mergeMs),
        cpuMs: round((cpu.user + cpu.system) / 1000),
      },
      verify: { buffersDiffering, bytesDiffering },
      ksmdAtDefaults: {
        pagesToScan: KSMD_PAGES_TO_SCAN,
        sleepMillisecs: KSMD_SLEEP_MS,
        fullScans: KSMD_FULL_SCANS,
        estimatedMs: Math.round((stats.pagesTracked / KSMD_PAGES_TO_SCAN) * KSMD_SLEEP_MS * KSMD_FULL_SCANS),
      },
    }
    if (options.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n')
    else printReport(report, c)
    return report
  } finally {
    progress.stop()
    process.removeListener('SIGINT', onSigint)
    await pm.close()
  }
}

const round = (ms: number) => Math.round(ms * 10) / 10
/** Pss_Shmem, which kernels before 5.14 do not report in smaps_rollup. */
const shmem = (m: Record<string, number>) => m.Pss_Shmem ?? NaN

function printReport(r: DemoReport, c: Colors): void {
  const say = (line = '') => process.stdout.write(line + '\n')
  const { pss, pssShmem, rss } = r.memory
  const freed = (bytes: number) => (bytes > 0 ? c.green(fmt.mib(bytes)) : fmt.mib(bytes))
  if (r.verify.bytesDiffering === 0) say(`verified: all ${fmt.int(r.buffers)} buffers read back their files' bytes ${c.green('OK')}`)
  else say(`verified: ${fmt.int(r.verify.buffersDiffering)} of ${fmt.int(r.buffers)} buffers differ from their files ${c.red('FAIL')}`)
  say()

  const t = table(['', c.bold('before'), c.bold('after'), c.bold('freed')], ['left', 'right', 'right', 'right'], { compact: true })
  t.push(
    ['Pss (as the OS reports it)', fmt.mib(pss.before), fmt.mib(pss.after), freed(pss.freed)],
    ['  of it in the buffers (Pss_Shmem)', fmt.mib(pssShmem.before), fmt.mib(pssShmem.after), freed(pssShmem.freed)],
    ['Rss', fmt.mib(rss.before), fmt.mib(rss.after), fmt.mib(rss.freed)],
    ['pages merged (pagesSharing)', '', fmt.int(r.merge.pagesSharing), fmt.mib(r.merge.pagesSharing * PAGE)],
    ['stable pages (pagesShared)', '', fmt.int(r.merge.pagesShared), ''],
    ['zero pages dropped', '', fmt.int(r.merge.zeroPages), fmt.mib(r.merge.zeroPages * PAGE)],
    ['skipped for mapping budget', '', fmt.int(r.merge.pagesSkippedBudget), ''],
    ['time taken (mergeNow)', '', fmt.secs(r.merge.wallMs), ''],
    ['CPU, all threads', '', fmt.secs(r.merge.cpuMs), ''],
    [`ksmd at its defaults (estimate)`, '', c.yellow(fmt.secs(r.ksmdAtDefaults.estimatedMs)), ''],
  )
  say(t.toString())
  say(
    c.dim(
      `Pss and Rss are the whole process's (buffers, V8, ${r.workers} hashing worker thread(s)), ` +
        'measured after every buffer was read back; the buffers are memfd pages, so Pss_Shmem is theirs alone.\n' +
        'Rss counts a merged page once per buffer that maps it, so it does not fall: Pss shares it out.',
    ),
  )
  say(
    c.dim(
      `ksmd estimate: ${fmt.int(r.merge.pagesTracked)} pages / (${r.ksmdAtDefaults.pagesToScan} pages per ` +
        `${r.ksmdAtDefaults.sleepMillisecs} ms) x ${r.ksmdAtDefaults.fullScans} full scans; worked out from the knobs, not measured.`,
    ),
  )
  if (r.merge.pagesSkippedBudget > 0)
    say(
      c.yellow('note: ') +
        `${fmt.int(r.merge.pagesSkippedBudget)} pages were not merged for lack of mapping budget ` +
        '(each merged run can cut the buffers\' shared mappings apart); fewer, larger files or a smaller --size stay within it.',
    )
}
