/**
 * `pagemerge estimate`: how much memory same-page merging would free across running processes,
 * read without changing them (lib/estimate.ts). A table on a terminal, with a progress bar while
 * it reads; the report as JSON with --json. Exit 0 when at least one process was read, 1 when
 * none could be, 2 for bad usage.
 */
import { readdirSync, readFileSync } from 'node:fs'
import { Command, InvalidArgumentError } from 'commander'
import { estimate, type EstimateProgress, type EstimateReport, type ProcessEstimate, type ProcessStatus } from '../../lib/index'
import { CliError, colorsFor, EXIT_USAGE, fmt, Progress, table, type Colors } from '../terminal'

interface EstimateCliOptions {
  pid?: number[]
  name?: string
  all?: boolean
  json?: boolean
  top: number
  zero: boolean
  progress: boolean
  color: boolean
}

const MAX_TOP = 1000
/** Rows of processes shown with --all or --name (those freeing the most); the rest are summed in one row. */
const MANY_ROWS = 20

function pidArg(value: string, previous: number[] = []): number[] {
  const n = Number(value)
  if (!/^\d+$/.test(value.trim()) || !Number.isSafeInteger(n) || n < 1 || n > 4194304) throw new InvalidArgumentError('must be a process id')
  return [...previous, n]
}

function topArg(value: string): number {
  const n = Number(value)
  if (!/^\d+$/.test(value.trim()) || n > MAX_TOP) throw new InvalidArgumentError(`must be an integer from 0 to ${MAX_TOP}`)
  return n
}

function regexArg(value: string): string {
  try {
    new RegExp(value)
  } catch (err) {
    throw new InvalidArgumentError(`is not a regular expression (${(err as Error).message})`)
  }
  return value
}

/** Every process now but this one, in pid order. */
function allPids(): number[] {
  return readdirSync('/proc')
    .filter((e) => /^\d+$/.test(e))
    .map(Number)
    .filter((pid) => pid !== process.pid)
    .sort((a, b) => a - b)
}

/** Processes whose name (comm) or command line matches `pattern`. */
function pidsByName(pattern: string): number[] {
  const re = new RegExp(pattern)
  const read = (file: string) => {
    try {
      return readFileSync(file, 'utf8')
    } catch {
      return undefined
    }
  }
  return allPids().filter((pid) => {
    const comm = read(`/proc/${pid}/comm`)?.trim()
    const cmdline = read(`/proc/${pid}/cmdline`)?.replace(/\0+$/, '').replace(/\0/g, ' ')
    return (comm !== undefined && re.test(comm)) || (cmdline !== undefined && cmdline !== '' && re.test(cmdline))
  })
}

/** The bar on stderr while reading and confirming; nothing when stderr is not a terminal. */
function progressBar(enabled: boolean, color: boolean): { update(p: EstimateProgress): void; stop(): void } {
  const bar = new Progress(enabled, color)
  let phase = ''
  return {
    update(p) {
      if (p.phase !== phase) bar.start((phase = p.phase), p.total)
      bar.update(p.done, p.total, p.phase === 'reading' ? `${fmt.mib(p.done)} of ${fmt.mib(p.total)} mapped` : `${fmt.int(p.done)} of ${fmt.int(p.total)} candidate pages`)
    },
    stop: () => bar.stop(),
  }
}

const READ: ReadonlySet<ProcessStatus> = new Set(['ok', 'partial'])

function statusText(p: ProcessEstimate, c: Colors): string {
  switch (p.status) {
    case 'ok':
      return c.green('ok')
    case 'partial':
      return c.yellow('partial')
    case 'exited':
      return c.yellow('exited')
    case 'kernel-thread':
    case 'self':
      return c.dim(p.status)
    default:
      return c.red(p.status)
  }
}

/** One line saying why a process was not read in full. */
function reasonLine(p: ProcessEstimate): string | undefined {
  if (p.note) return `pid ${p.pid} (${p.name}): ${p.note}`
  if (!p.error) return undefined
  const e = p.error
  return `pid ${p.pid}${p.name ? ` (${p.name})` : ''}: ${p.status}: ${e.message} (${e.code}${e.syscall ? `, ${e.syscall}` : ''})${e.hint ? `; ${e.hint}` : ''}`
}

const pagesMiB = (pages: number, pageSize: number) => fmt.mib(pages * pageSize)

export function renderEstimate(r: EstimateReport, c: Colors, mode: 'pids' | 'many'): string {
  const out: string[] = []
  const ps = r.pageSize
  // With --all or --name, processes skipped for a plain reason are counted, not listed.
  const shown = mode === 'pids' ? r.processes : r.processes.filter((p) => READ.has(p.status) || p.status === 'exited' || p.status === 'error')
  const sorted = mode === 'pids' ? shown : [...shown].sort((a, b) => b.bytesFreeable - a.bytesFreeable || a.pid - b.pid)
  const rows = mode === 'pids' ? sorted : sorted.slice(0, MANY_ROWS)
  const rest = sorted.slice(rows.length)
  const t = table(
    ['pid', 'name', 'status', 'scanned', 'zero', 'dup within', 'dup across', 'volatile', 'freeable'].map((h) => c.bold(h)),
    ['right', 'left', 'left', 'right', 'right', 'right', 'right', 'right', 'right'],
    { compact: true },
  )
  for (const p of rows) {
    const read = READ.has(p.status)
    const cell = (pages: number) => (read ? pagesMiB(pages, ps) : c.dim('-'))
    t.push([
      String(p.pid),
      p.name.slice(0, 16),
      statusText(p, c),
      read || p.pagesScanned > 0 ? pagesMiB(p.pagesScanned, ps) : c.dim('-'),
      cell(p.zeroPages),
      cell(p.withinProcessDuplicatePages),
      cell(p.crossProcessDuplicatePages),
      cell(p.volatilePages),
      read ? c.green(fmt.mib(p.bytesFreeable)) : c.dim('-'),
    ])
  }
  if (rest.length > 0) {
    const sum = (k: 'pagesScanned' | 'zeroPages' | 'withinProcessDuplicatePages' | 'crossProcessDuplicatePages' | 'volatilePages') =>
      pagesMiB(rest.reduce((s, p) => s + (READ.has(p.status) ? p[k] : 0), 0), ps)
    t.push(['', c.dim(`${rest.length} more`), '', sum('pagesScanned'), sum('zeroPages'), sum('withinProcessDuplicatePages'), sum('crossProcessDuplicatePages'), sum('volatilePages'), fmt.mib(rest.reduce((s, p) => s + p.bytesFreeable, 0))])
  }
  const tt = r.total
  t.push([
    '',
    c.bold('total'),
    `${tt.processesRead} read`,
    pagesMiB(tt.pagesScanned, ps),
    pagesMiB(tt.zeroPages, ps),
    pagesMiB(tt.withinProcessDuplicatePages, ps),
    pagesMiB(tt.crossProcessDuplicatePages, ps),
    pagesMiB(tt.volatilePages, ps),
    c.bold(c.green(fmt.mib(tt.bytesFreeable))),
  ])
  out.push(t.toString())
  const share = tt.pagesScanned > 0 ? ` (${((100 * tt.bytesFreeable) / (tt.pagesScanned * ps)).toFixed(1)}% of what was read)` : ''
  out.push(
    `merging would free ${c.bold(fmt.mib(tt.bytesFreeable))}${share}: ${fmt.int(tt.duplicatePages)} duplicate pages in ` +
      `${fmt.int(tt.duplicateGroups)} groups` +
      (r.includeZero ? ` and ${fmt.int(tt.zeroPages)} zero pages` : ' (zero pages merged like any content)') +
      `; read ${fmt.mib(tt.bytesRead)} in ${fmt.secs(tt.elapsedMs)}.`,
  )
  if (tt.hashCollisions > 0) out.push(c.yellow(`${fmt.int(tt.hashCollisions)} pages had a group's hash but other bytes (not counted).`))

  if (r.top.length > 0) {
    const top = table(['#', 'pages', 'freeable', 'hash', 'where (pid: pages, first address, mapping)'].map((h) => c.bold(h)), ['right', 'right', 'right', 'left', 'left'], { compact: true })
    r.top.forEach((d, i) => {
      const where = d.processes
        .slice(0, 3)
        .map((l) => `${l.pid}: ${fmt.int(l.pages)} at ${l.addresses[0]} ${l.mappings[0]}`)
        .join(', ')
      const more = d.processes.length > 3 ? `, +${d.processes.length - 3} processes` : ''
      top.push([String(i + 1), fmt.int(d.pages), pagesMiB(d.freeablePages, ps), d.hash, where + more])
    })
    out.push('', c.bold('most duplicated contents'), top.toString())
  }

  const reasons: string[] = []
  const counted = new Map<string, number>()
  for (const p of r.processes) {
    if (mode === 'many' && !shown.includes(p)) {
      const key = p.status === 'denied' ? `denied (${p.error?.hint ?? p.error?.code ?? ''})` : p.status
      counted.set(key, (counted.get(key) ?? 0) + 1)
      continue
    }
    const line = reasonLine(p)
    if (line) reasons.push(line)
  }
  if (reasons.length > 0 || counted.size > 0) out.push('')
  for (const line of reasons) out.push(c.dim(line))
  for (const [what, n] of counted) out.push(c.dim(`not read: ${fmt.int(n)} ${n === 1 ? 'process' : 'processes'}: ${what}`))
  out.push(c.dim(`sizes in MiB of ${ps}-byte pages; "freeable" is duplicates (n - 1 of each group of n identical pages) plus zero pages; see docs/estimate.md.`))
  return out.join('\n')
}

async function run(options: EstimateCliOptions): Promise<void> {
  const modes = [options.pid !== undefined, options.name !== undefined, options.all === true].filter(Boolean).length
  if (modes !== 1) throw new CliError('say which processes: --pid N (repeatable), --name REGEX or --all, one of them (see \'pagemerge estimate --help\')', EXIT_USAGE)
  const pids = options.pid ?? (options.name !== undefined ? pidsByName(options.name) : allPids())
  if (pids.length === 0) throw new CliError(`no process matches --name ${options.name}`)
  const bar = progressBar(options.progress && !options.json, options.color)
  let report: EstimateReport
  try {
    report = await estimate({ pids, top: options.top, includeZero: options.zero, onProgress: (p) => bar.update(p) })
  } finally {
    bar.stop()
  }
  if (options.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n')
  else process.stdout.write(renderEstimate(report, colorsFor(process.stdout, options.color), options.pid ? 'pids' : 'many') + '\n')
  if (report.total.processesRead === 0) {
    const why = report.processes.map((p) => `${p.pid} ${p.status}${p.error ? ` (${p.error.code})` : ''}`).slice(0, 5).join(', ')
    throw new CliError(`no process could be read: ${why}${report.processes.length > 5 ? ', ...' : ''}`)
  }
}

export function estimateCommand(): Command {
  return new Command('estimate')
    .summary('what same-page merging would free across running processes, changing nothing')
    .description(
      'Reads the resident private anonymous memory (heap, anonymous mmaps, stacks) of the processes named, with ' +
        'process_vm_readv, hashes every 4 KiB page on worker threads, confirms each group of identical pages byte ' +
        'for byte, and prints what merging them would free: per process and in total, zero pages, duplicates within ' +
        'a process and across processes, pages that changed while being read, and the most duplicated contents. ' +
        'Nothing in the processes changes, and pages they have not touched are not read. Needs root, or the same uid ' +
        'as the processes (and kernel.yama.ptrace_scope permitting). Exits 1 if no process could be read.',
    )
    .option('-p, --pid <pid>', 'a process to read (repeat for more)', pidArg)
    .option('-n, --name <regex>', 'every process whose name or command line matches <regex>', regexArg)
    .option('-a, --all', 'every process (kernel threads and this one are skipped)')
    .option('-k, --top <k>', `list the <k> most duplicated contents (0-${MAX_TOP})`, topArg, 10)
    .option('--no-zero', 'merge zero pages like any other content (n - 1 of n freed), as ksmd with use_zero_pages=0')
    .option('--json', 'print the report as one JSON object instead of tables')
    .option('--no-progress', 'no progress bar (it is drawn on stderr, and only when stderr is a terminal)')
    .addHelpText(
      'after',
      `
Examples:
  $ pagemerge estimate --pid 1234 --pid 5678
  $ pagemerge estimate --name '^node' --top 5
  $ sudo pagemerge estimate --all
  $ pagemerge estimate --all --json | jq .total.bytesFreeable`,
    )
    .action((_options: unknown, command: Command) => run(command.optsWithGlobals<EstimateCliOptions>()))
}
