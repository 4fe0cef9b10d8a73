/**
 * The demo: a service that loads the same data set once per tenant, as multi-tenant services do,
 * and what pagemerge gives back, measured by the OS (/proc/self/smaps_rollup), not by counters.
 *
 *   npm run demo [-- --tenants N] [-- --size MiB] [-- --data DIR]
 *
 * By default the data set is the package's own installed tree (its node_modules folder), up to
 * 64 MiB of it. Every file of every tenant gets its own pm.alloc() buffer.
 */
import { closeSync, existsSync, fstatSync, openSync, readdirSync, readFileSync, readSync, statSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { PageMerger, smapsRollup, type Stats } from '../lib/index'

const MiB = 1024 * 1024
const PAGE = 4096
/** ksmd's defaults: /sys/kernel/mm/ksm/pages_to_scan and sleep_millisecs. */
const KSMD_PAGES_TO_SCAN = 100
const KSMD_SLEEP_MS = 20

const USAGE = `usage: npm run demo [-- --tenants N] [-- --size MiB] [-- --data DIR]

  --tenants N   tenants that each load the data set (default 4)
  --size MiB    at most this many MiB of files per tenant (default 64)
  --data DIR    the data set: the files under DIR (default: this package's node_modules)`

interface Args {
  tenants: number
  sizeMiB: number
  data: string
}

function fail(message: string, code = 1): never {
  process.stderr.write(`demo: ${message}\n`)
  process.exit(code)
}

function parseArgs(argv: string[]): Args {
  const args: Args = { tenants: 4, sizeMiB: 64, data: defaultData() }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(USAGE + '\n')
      process.exit(0)
    }
    const eq = arg.indexOf('=')
    const name = eq >= 0 ? arg.slice(0, eq) : arg
    if (name !== '--tenants' && name !== '--size' && name !== '--data') fail(`unknown argument "${arg}"\n${USAGE}`, 2)
    const value = eq >= 0 ? arg.slice(eq + 1) : argv[++i]
    if (value === undefined || value === '') fail(`${name} needs a value\n${USAGE}`, 2)
    if (name === '--data') args.data = resolve(value)
    else {
      const n = Number(value)
      if (name === '--tenants' && !(Number.isInteger(n) && n >= 1 && n <= 1000)) fail('--tenants must be an integer from 1 to 1000', 2)
      if (name === '--size' && !(Number.isFinite(n) && n > 0)) fail('--size must be a positive number of MiB', 2)
      if (name === '--tenants') args.tenants = n
      else args.sizeMiB = n
    }
  }
  return args
}

/** The package's own node_modules (or the package itself when its dependencies were hoisted). */
function defaultData(): string {
  let dir = __dirname
  for (;;) {
    const manifest = join(dir, 'package.json')
    if (existsSync(manifest) && JSON.parse(readFileSync(manifest, 'utf8')).name === 'pagemerge') break
    const up = dirname(dir)
    if (up === dir) return resolve('node_modules')
    dir = up
  }
  const modules = join(dir, 'node_modules')
  return existsSync(modules) ? modules : dir
}

interface DataFile {
  path: string
  size: number
  mtimeMs: number
}

/** Regular, non-empty files under `root` in a stable order, until `capBytes` of them (symlinks not followed). */
function listFiles(root: string, capBytes: number): DataFile[] {
  const files: DataFile[] = []
  let total = 0
  const walk = (dir: string): void => {
    let entries
    try {
      entries = readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    } catch {
      return // unreadable folder: not part of the data set
    }
    for (const e of entries) {
      if (total >= capBytes) return
      const path = join(dir, e.name)
      if (e.isDirectory()) walk(path)
      else if (e.isFile()) {
        const st = statSync(path, { throwIfNoEntry: false })
        if (!st || st.size === 0 || total + st.size > capBytes) continue
        files.push({ path, size: st.size, mtimeMs: st.mtimeMs })
        total += st.size
      }
    }
  }
  walk(root)
  return files
}

/** Reads a whole file into `scratch` (one reused buffer, so loading leaves no garbage behind). */
function readInto(file: DataFile, scratch: Buffer): Buffer {
  const fd = openSync(file.path, 'r')
  try {
    const st = fstatSync(fd)
    if (st.size !== file.size || st.mtimeMs !== file.mtimeMs) throw new Error(`${file.path} changed on disk during the demo`)
    let done = 0
    while (done < file.size) {
      const n = readSync(fd, scratch, done, file.size - done, done)
      if (n === 0) throw new Error(`${file.path} is shorter than it was`)
      done += n
    }
    return scratch.subarray(0, file.size)
  } finally {
    closeSync(fd)
  }
}

const mib = (bytes: number) => `${(bytes / MiB).toFixed(1)} MiB`
const int = (n: number) => n.toLocaleString('en-US')
const secs = (ms: number) => (ms >= 10_000 ? `${(ms / 1000).toFixed(0)} s` : `${(ms / 1000).toFixed(2)} s`)

/** One status line: rewritten in place on a terminal, else printed at most once a second. */
function progressLine(): { update(text: string): void; done(text: string): void } {
  const tty = process.stdout.isTTY === true
  let last = performance.now()
  return {
    update(text) {
      if (tty) process.stdout.write(`\r${text}\x1b[K`)
      else if (performance.now() - last >= 1000) (last = performance.now()), console.log(text)
    },
    done(text) {
      process.stdout.write(tty ? `\r${text}\x1b[K\n` : `${text}\n`)
    },
  }
}

/** Kernel mappings (VMAs) of this process: each line of /proc/self/maps is one. */
function mappingCount(): number {
  return readFileSync('/proc/self/maps', 'utf8').split('\n').filter(Boolean).length
}

function memoryLine(label: string): { Pss: number; Rss: number } {
  const m = smapsRollup()
  console.log(`${label.padEnd(22)} Pss ${mib(m.Pss).padStart(10)}   Rss ${mib(m.Rss).padStart(10)}   (/proc/self/smaps_rollup)`)
  return m
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2))
  if (!existsSync(args.data) || !statSync(args.data).isDirectory()) fail(`--data ${args.data} is not a directory`)
  const files = listFiles(args.data, Math.floor(args.sizeMiB * MiB))
  if (files.length === 0) fail(`no readable non-empty files under ${args.data}`)
  const dataBytes = files.reduce((s, f) => s + f.size, 0)
  const dataPages = files.reduce((s, f) => s + Math.ceil(f.size / PAGE), 0)
  const scratch = Buffer.allocUnsafeSlow(files.reduce((m, f) => Math.max(m, f.size), 0))

  const pm = new PageMerger()
  console.log(`pagemerge demo: ${args.tenants} tenants, each loading ${int(files.length)} files (${mib(dataBytes)}, ${int(dataPages)} pages)`)
  console.log(`data set: ${args.data}`)
  console.log(`workers: ${pm.options.workers} + the main thread`)

  // Each tenant loads the data set on its own, as it would from disk: one buffer per file.
  let t0 = performance.now()
  let status = progressLine()
  const tenants: Buffer[][] = []
  for (let t = 0; t < args.tenants; t++) {
    status.update(`loading: tenant ${t + 1} of ${args.tenants}, ${secs(performance.now() - t0)}`)
    tenants.push(
      files.map((file) => {
        const bytes = readInto(file, scratch)
        const buf = pm.alloc(bytes.length)
        bytes.copy(buf)
        return buf
      }),
    )
  }
  status.done(`loaded ${int(args.tenants * files.length)} buffers in ${secs(performance.now() - t0)}`)
  console.log()

  const before = memoryLine('before mergeNow():')

  // mergeNow() has no progress callback; the stats it keeps are read while its batches run.
  const progress = (s: Stats, ms: number) =>
    `merging: ${int(s.pagesScanned)} pages scanned, ${s.fullScans} full scans done, ` +
    `${int(s.pagesSharing)} sharing, ${secs(ms)}`
  status = progressLine()
  const cpu0 = process.cpuUsage()
  t0 = performance.now()
  const ticker = setInterval(() => status.update(progress(pm.stats(), performance.now() - t0)), 100)
  let stats: Stats
  try {
    stats = await pm.mergeNow()
  } finally {
    clearInterval(ticker)
  }
  const mergeMs = performance.now() - t0
  const cpu = process.cpuUsage(cpu0)
  status.done(progress(stats, mergeMs))

  // Bytes are sacred: every tenant's every buffer must still read exactly its file's bytes. Reading
  // them first also maps every page again (a merge remaps pages), so that Pss counts them all.
  let bad = 0
  for (const [i, file] of files.entries()) {
    const bytes = readInto(file, scratch)
    for (const buffers of tenants) if (!buffers[i]!.equals(bytes)) bad++
  }
  const buffers = args.tenants * files.length
  if (bad === 0) console.log(`verify: all ${int(buffers)} buffers equal their files' bytes: OK`)
  else console.log(`verify: ${int(bad)} of ${int(buffers)} buffers differ from their files' bytes: FAIL`)

  const after = memoryLine('after mergeNow() and reading every buffer back:')
  console.log()

  const rows: Array<[string, string, string?, string?]> = [
    ['', 'before', 'after', 'freed'],
    ['Pss', mib(before.Pss), mib(after.Pss), mib(before.Pss - after.Pss)],
    ['Rss', mib(before.Rss), mib(after.Rss), mib(before.Rss - after.Rss)],
    ['pagesShared', '', int(stats.pagesShared)],
    ['pagesSharing', '', int(stats.pagesSharing), mib(stats.pagesSharing * PAGE)],
    ['zeroPages', '', int(stats.zeroPages), mib(stats.zeroPages * PAGE)],
    ['pagesSkippedBudget', '', int(stats.pagesSkippedBudget)],
    ['time (mergeNow)', '', secs(mergeMs)],
    ['CPU (all threads)', '', secs((cpu.user + cpu.system) / 1000)],
  ]
  for (const [name, a, b = '', c = ''] of rows) console.log(`${name.padEnd(20)}${a.padStart(12)}${b.padStart(12)}${c.padStart(12)}`)
  console.log(`(after includes the ${pm.options.workers} hashing worker thread(s) that mergeNow() started;`)
  console.log(' Rss counts a merged page once per buffer that maps it, so it does not fall: Pss shares it out)')
  console.log()
  if (stats.pagesSkippedBudget > 0) {
    // Each merged run of pages can cut the buffers' shared mappings, and merges stay under options.mapBudget.
    console.log(
      `note: ${int(stats.pagesSkippedBudget)} pages were not merged for lack of mapping budget: the process has ` +
        `${int(mappingCount())} kernel mappings (merging ${int(args.tenants * files.length)} small buffers cuts their shared mappings apart) ` +
        `and options.mapBudget is ${int(pm.options.mapBudget)}. Fewer, larger buffers (or a smaller --size) stay within it.`,
    )
    console.log()
  }

  const pages = stats.pagesTracked
  const ksmdMs = (pages / KSMD_PAGES_TO_SCAN) * KSMD_SLEEP_MS
  console.log(
    `ksmd at its defaults (${KSMD_PAGES_TO_SCAN} pages per ${KSMD_SLEEP_MS} ms) would need about ${secs(ksmdMs)} ` +
      `just to scan these ${int(pages)} pages once (an estimate from the knobs, not a measurement).`,
  )

  await pm.close()
  if (bad > 0) process.exitCode = 1
}

main().catch((err: unknown) => {
  console.error(err)
  process.exitCode = 1
})
