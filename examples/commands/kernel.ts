/**
 * `pagemerge kernel status` and `pagemerge kernel watch`: the kernel's own KSM (ksmd), as
 * /sys/kernel/mm/ksm, /proc/self/ksm_stat and the ksmd thread report it. A file this kernel does
 * not have is shown as "absent" (null in JSON), never guessed.
 */
import { clearScreenDown, cursorTo, moveCursor } from 'node:readline'
import { existsSync } from 'node:fs'
import { stripVTControlCharacters } from 'node:util'
import { Command, InvalidArgumentError } from 'commander'
import { KernelKsm, type KernelStatus } from '../../lib/index'
import { CliError, colorsFor, fmt, kernelPageSize, sectionTables, type Colors, type Section } from '../terminal'

/** The knobs and counters of /sys/kernel/mm/ksm this version knows, in the order they are shown. */
const KNOBS = [
  'run',
  'pagesToScan',
  'sleepMillisecs',
  'mergeAcrossNodes',
  'maxPageSharing',
  'stableNodeChainsPruneMillisecs',
  'useZeroPages',
  'smartScan',
  'advisorMode',
  'advisorMaxCpu',
  'advisorTargetScanTime',
  'advisorMinPagesToScan',
  'advisorMaxPagesToScan',
] as const
const STATS = [
  'pagesShared',
  'pagesSharing',
  'pagesUnshared',
  'pagesVolatile',
  'pagesScanned',
  'fullScans',
  'stableNodeChains',
  'stableNodeDups',
  'ksmZeroPages',
  'generalProfit',
  'pagesSkipped',
] as const
/** Counters that watch shows as a rate (per second) beside the value. */
const RATES: ReadonlySet<string> = new Set(['pagesSharing', 'pagesScanned', 'fullScans', 'ksmZeroPages', 'pagesShared'])
const RUN_MEANING: Record<number, string> = { 0: 'stopped', 1: 'running', 2: 'stopped, unmerging all' }

/** `pagesToScan` → `pages_to_scan`, the file's name. */
const fileName = (key: string) => key.replace(/[A-Z]/g, (ch) => '_' + ch.toLowerCase())

/** What `kernel status --json` prints (and each line of `kernel watch --json`). */
export interface KernelReport {
  available: boolean
  reason?: string
  /** Bytes per page, the unit of every page count below (AT_PAGESZ). */
  pageSize: number
  knobs: Record<string, number | string | null>
  stats: Record<string, number | null>
  derived: {
    /** pages_sharing x pageSize: what merging saves. */
    memorySavedBytes: number | null
    /** ksm_zero_pages x pageSize: what use_zero_pages saves. */
    zeroPagesBytes: number | null
    ksmdCpuSeconds: number | null
  }
  /** /proc/<pid>/ksm_stat and ksm_merging_pages of the process given by --pid; null without --pid. */
  process: (KernelStatus['process'] & { pid: number }) | null
  ksmd: { pid: number; cpuNs: number } | null
  /** Every file of /sys/kernel/mm/ksm as text, including ones this version does not know. */
  raw: Record<string, string>
}

export function kernelReport(status: KernelStatus, pageSize: number, pid?: number): KernelReport {
  const knobs: KernelReport['knobs'] = {}
  const stats: KernelReport['stats'] = {}
  const known = status.knobs as Record<string, number | string | undefined>
  for (const key of new Set<string>([...KNOBS, ...Object.keys(known)])) knobs[key] = known[key] ?? null
  const counters = status.stats as Record<string, number | undefined>
  for (const key of new Set<string>([...STATS, ...Object.keys(counters)])) stats[key] = counters[key] ?? null
  const times = (pages: number | undefined) => (pages === undefined ? null : pages * pageSize)
  const report: KernelReport = {
    available: status.available,
    pageSize,
    knobs,
    stats,
    derived: {
      memorySavedBytes: times(status.stats.pagesSharing),
      zeroPagesBytes: times(status.stats.ksmZeroPages),
      ksmdCpuSeconds: status.ksmd === undefined ? null : status.ksmd.cpuNs / 1e9,
    },
    process: pid === undefined ? null : { pid, ...status.process },
    ksmd: status.ksmd ?? null,
    raw: status.raw,
  }
  if (status.reason !== undefined) report.reason = status.reason
  return report
}

/** One reading and when it was taken, for rates between readings. */
interface Sample {
  report: KernelReport
  at: number
}

function rateOf(key: string, now: Sample, prev: Sample | undefined): string {
  if (prev === undefined) return ''
  const a = prev.report.stats[key], b = now.report.stats[key]
  if (a == null || b == null) return ''
  const perSecond = Math.round(((b - a) * 1000) / (now.at - prev.at)) || 0 // no "-0"
  return `${perSecond >= 0 ? '+' : ''}${fmt.int(perSecond)}/s`
}

/** The status as tables: knobs, counters, derived figures, this process; with rates when `withRates`. */
export function renderReport(now: Sample, prev: Sample | undefined, c: Colors, withRates: boolean): string {
  const r = now.report
  const sections: Section[] = []
  let rows: string[][] = []
  const section = (title: string) => sections.push({ title: c.bold(c.cyan(title)), rows: (rows = []) })
  const row = (name: string, value: string, rate = '') => rows.push(withRates ? [name, value, rate && c.green(rate)] : [name, value])
  const show = (v: number | string | null, unit: (n: number) => string = fmt.int) =>
    v === null ? c.dim('absent') : typeof v === 'number' ? unit(v) : v

  section('knobs (/sys/kernel/mm/ksm)')
  for (const [key, value] of Object.entries(r.knobs)) {
    const meaning = key === 'run' && typeof value === 'number' && RUN_MEANING[value] ? ` (${RUN_MEANING[value]})` : ''
    row(fileName(key), typeof value === 'number' ? `${value}${meaning}` : show(value))
  }
  section('counters (pages, or bytes)')
  for (const [key, value] of Object.entries(r.stats))
    row(fileName(key), show(value, key === 'generalProfit' ? fmt.mib : fmt.int), RATES.has(key) ? rateOf(key, now, prev) : '')
  const known = new Set([...Object.keys(r.knobs), ...Object.keys(r.stats)].map(fileName))
  const unknown = Object.keys(r.raw).filter((file) => !known.has(file)).sort()
  if (unknown.length > 0) {
    section('other files (unknown to this version)')
    for (const file of unknown) row(file, r.raw[file]!)
  }
  section('derived')
  row(`memory saved (pages_sharing x ${r.pageSize} B)`, show(r.derived.memorySavedBytes, fmt.mib))
  row(`zero pages (ksm_zero_pages x ${r.pageSize} B)`, show(r.derived.zeroPagesBytes, fmt.mib))
  if (r.ksmd === null) row('ksmd CPU time', c.dim('absent (no ksmd thread found)'))
  else {
    let cpu = ''
    if (prev?.report.ksmd) cpu = `${((r.ksmd.cpuNs - prev.report.ksmd.cpuNs) / 1e4 / (now.at - prev.at)).toFixed(1)}% CPU`
    row(`ksmd CPU time (pid ${r.ksmd.pid})`, fmt.secs(r.ksmd.cpuNs / 1e6), cpu)
  }
  if (r.process !== null) {
    const { pid, ksmStat, mergingPages } = r.process
    section(`process ${pid} (/proc/${pid}/ksm_stat)`)
    if (ksmStat !== undefined)
      for (const [key, value] of Object.entries(ksmStat)) row(fileName(key), typeof value === 'number' ? fmt.int(value) : String(value))
    else row('ksm_stat', c.dim('absent'))
    if (ksmStat?.ksmMergingPages === undefined) row('ksm_merging_pages', show(mergingPages ?? null))
  }
  const head = withRates ? ['', c.bold('value'), c.bold('per second')] : ['', c.bold('value')]
  return sectionTables(sections, head, ['left', 'right', 'right'])
}

function headline(r: KernelReport, c: Colors): string {
  const run = r.knobs.run
  const state = run === 1 ? c.green('ksmd running') : run === null ? 'ksmd state absent' : c.yellow(`ksmd ${RUN_MEANING[run as number] ?? `run=${run}`}`)
  return `${c.bold('kernel KSM')}: ${state}, ${fmt.int(Number(r.knobs.pagesToScan ?? 0))} pages every ${r.knobs.sleepMillisecs ?? '?'} ms`
}

/** The kernel's KSM as seen from the process `pid` (its ksm_stat), or from ours when none is given. */
function source(pid: number | undefined): KernelKsm {
  if (pid === undefined) return new KernelKsm()
  const dir = `/proc/${pid}`
  if (!existsSync(dir)) throw new CliError(`--pid ${pid}: no such process`)
  return new KernelKsm({ procSelf: dir })
}

function read(ksm: KernelKsm, pageSize: number, pid: number | undefined): Sample {
  return { report: kernelReport(ksm.status(), pageSize, pid), at: performance.now() }
}

interface StatusOptions {
  json?: boolean
  pid?: number
  color: boolean
}

function pidArg(value: string): number {
  const n = Number(value)
  if (!/^\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError('must be a process id')
  return n
}

interface WatchOptions extends StatusOptions {
  interval: number
}

function intervalArg(value: string): number {
  const n = Number(value)
  if (value.trim() === '' || !Number.isFinite(n) || n < 0.1 || n > 3600) throw new InvalidArgumentError('must be a number of seconds from 0.1 to 3600')
  return n
}

function status(options: StatusOptions): void {
  const sample = read(source(options.pid), kernelPageSize(), options.pid)
  const r = sample.report
  if (options.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n')
  if (!r.available) throw new CliError(`kernel KSM is not available: ${r.reason ?? 'no reason given'}`)
  if (options.json) return
  const c = colorsFor(process.stdout, options.color)
  process.stdout.write(`${headline(r, c)}\n${renderReport(sample, undefined, c, false)}\n`)
}

const HIDE_CURSOR = '\x1b[?25l'
const SHOW_CURSOR = '\x1b[?25h'

/** Rows a block of text takes on a terminal `columns` wide, counting lines that wrap. */
function rowsOf(text: string, columns: number): number {
  return text.split('\n').reduce((rows, line) => rows + Math.max(1, Math.ceil(stripVTControlCharacters(line).length / columns)), 0)
}

/**
 * Prints the status every `interval` seconds until SIGINT or SIGTERM: redrawn in place on a
 * terminal, one block after another into a pipe, one JSON object per line with --json.
 */
function watch(options: WatchOptions): Promise<void> {
  const ksm = source(options.pid)
  const pageSize = kernelPageSize()
  const out = process.stdout
  const tty = out.isTTY === true && !options.json
  const c = colorsFor(out, options.color)
  let prev: Sample | undefined
  let drawnRows = 0

  const first = read(ksm, pageSize, options.pid)
  if (!first.report.available) throw new CliError(`kernel KSM is not available: ${first.report.reason ?? 'no reason given'}`)

  const draw = (now: Sample): void => {
    if (options.json) {
      const rates: Record<string, number> = {}
      if (prev !== undefined)
        for (const key of RATES) {
          const a = prev.report.stats[key], b = now.report.stats[key]
          if (a != null && b != null) rates[key] = ((b - a) * 1000) / (now.at - prev.at)
        }
      out.write(JSON.stringify({ time: new Date().toISOString(), ...now.report, rates }) + '\n')
    } else {
      const clock = new Date().toLocaleTimeString('en-GB')
      const frame =
        `${headline(now.report, c)}  ${c.dim(`${clock}, every ${options.interval} s, Ctrl-C to stop`)}\n` +
        renderReport(now, prev, c, true) + '\n'
      const rows = rowsOf(frame, out.columns || 80) - 1 // the frame ends with a newline
      if (tty && drawnRows > 0) {
        // Over the last frame; a frame taller than the terminal cannot be reached by moving up, so
        // it is drawn again from the top of the screen.
        if (drawnRows < (out.rows || Infinity)) moveCursor(out, 0, -drawnRows)
        else cursorTo(out, 0, 0)
        clearScreenDown(out)
      }
      out.write(tty ? frame : frame + '\n')
      drawnRows = rows
    }
    prev = now
  }

  return new Promise((resolveWatch) => {
    if (tty) out.write(HIDE_CURSOR)
    const showCursor = () => tty && out.write(SHOW_CURSOR)
    process.once('exit', showCursor) // however the process ends, the cursor comes back
    draw(first)
    const timer = setInterval(() => draw(read(ksm, pageSize, options.pid)), options.interval * 1000)
    const stop = () => {
      clearInterval(timer)
      process.removeListener('SIGINT', stop)
      process.removeListener('SIGTERM', stop)
      showCursor()
      process.removeListener('exit', showCursor)
      resolveWatch() // interrupting a watch is how it ends: exit status 0
    }
    process.once('SIGINT', stop)
    process.once('SIGTERM', stop)
  })
}

export function kernelCommand(): Command {
  const kernel = new Command('kernel')
    .summary("the kernel's own KSM (ksmd): knobs, counters, what it saves")
    .description(
      "Shows the kernel's same-page merging as /sys/kernel/mm/ksm, the ksmd thread and (with --pid) " +
        '/proc/<pid>/ksm_stat report it. A file this kernel does not have is shown as "absent" (null in JSON).',
    )
    .addHelpText(
      'after',
      `
Examples:
  $ pagemerge kernel status
  $ pagemerge kernel status --json | jq .knobs.pagesToScan
  $ pagemerge kernel watch`,
    )

  kernel
    .command('status')
    .summary("ksmd's knobs, counters and what they save, once")
    .description(
      "Prints ksmd's knobs and counters, and what they come to: memory saved (pages_sharing x page size) " +
        "and ksmd's CPU time. Exits 1 if this kernel has no KSM (with --json, after printing it).",
    )
    .option('--json', 'print one JSON object instead of a table')
    .option('-p, --pid <pid>', "also show this process's KSM counters (/proc/<pid>/ksm_stat)", pidArg)
    .addHelpText(
      'after',
      `
Examples:
  $ pagemerge kernel status
  $ pagemerge kernel status --json
  $ pagemerge kernel status --json | jq .derived.memorySavedBytes
  $ pagemerge kernel status --pid "$(pgrep -n node)"`,
    )
    .action((_options: unknown, command: Command) => status(command.optsWithGlobals<StatusOptions>()))

  kernel
    .command('watch')
    .summary('the same every second, with rates, until Ctrl-C')
    .description(
      'Shows the same as status every second, with rates (pages merged and scanned per second, ksmd ' +
        'CPU), until interrupted (Ctrl-C exits 0). Redraws in place on a terminal; with --json, prints ' +
        'one JSON object per line.',
    )
    .option('-n, --interval <seconds>', 'seconds between readings (0.1-3600)', intervalArg, 1)
    .option('--json', 'one JSON object per reading, one per line')
    .option('-p, --pid <pid>', "also show this process's KSM counters (/proc/<pid>/ksm_stat)", pidArg)
    .addHelpText(
      'after',
      `
Examples:
  $ pagemerge kernel watch
  $ pagemerge kernel watch --interval 5
  $ pagemerge kernel watch --pid 1234
  $ pagemerge kernel watch --json | jq -c .rates`,
    )
    .action((_options: unknown, command: Command) => watch(command.optsWithGlobals<WatchOptions>()))

  return kernel
}
