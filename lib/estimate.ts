/**
 * The cross-process estimator: how much memory same-page merging would free across running
 * processes, found without changing anything in them. Each process's private anonymous memory is
 * read (resident pages only) with process_vm_readv on worker threads and hashed page by page;
 * only hashes and page numbers are kept. Pages whose hashes repeat are then read again and
 * compared byte for byte before they count. See docs/estimate.md for the exact definitions.
 */
import { existsSync, readFileSync, statSync } from 'node:fs'
import { availableParallelism, constants as osConstants } from 'node:os'
import { join } from 'node:path'
import { Piscina } from 'piscina'
import { ErrorCode, rangeError, typeError } from './errors'
import { loadNative, PAGE_SIZE, RemotePage } from './native'

// ---- the worker protocol (workers/estimate.ts imports these types) ------------------------------

/** Hash the resident pages of `ranges` (page numbers, [firstPage, pages]...) of one process. */
export interface EstimateHashTask {
  kind: 'hash'
  pid: number
  ranges: Float64Array
}

export interface EstimateHashResult {
  /** xxh3-64 of each page read, and its page number (address / 4096), in address order. */
  hashes: BigUint64Array
  pages: Float64Array
  /** Pages that were resident but could not be read (a mapping that vanished or shrank, or the process left). */
  unread: number
  /** Pages in swap: not read (reading would bring them back). */
  swapped: number
  /** Resident pages that map the kernel's zero page (they take no memory): not read. */
  zeroMapped: number
  /** The first errno that stopped a read or a pagemap read (positive), or 0. */
  errno: number
  /** Which system call gave errno. */
  syscall: string
}

/** Compare members with reference pages (see NativeBinding.remoteCompare); u64 words as in the native call. */
export interface EstimateCompareTask {
  kind: 'compare'
  refs: BigUint64Array
  members: BigUint64Array
}

export interface EstimateCompareResult {
  status: Int32Array
  hashes: BigUint64Array
}

// ---- the public types ---------------------------------------------------------------------------

/** A range of another process's addresses to read instead of all its private anonymous memory. */
export interface EstimateRange {
  /** Start address; rounded down to a page boundary. */
  address: bigint | number
  /** Length in bytes; the range is rounded out to whole pages. */
  bytes: number
}

export interface EstimateProgress {
  phase: 'reading' | 'confirming'
  /** Reading: bytes of selected address space walked. Confirming: candidate pages compared. */
  done: number
  total: number
}

export interface EstimateOptions {
  /** Processes to read. Duplicates are read once. */
  pids: readonly number[]
  /**
   * Per pid, the only ranges to read (clipped to that process's readable mappings, of any kind).
   * A pid without an entry has all its private anonymous writable memory read. Naming the
   * estimator's own pid here is the one way to read it.
   */
  ranges?: Readonly<Record<number, readonly EstimateRange[]>> | ReadonlyMap<number, readonly EstimateRange[]>
  /**
   * Whether all-zero pages count as freed in full (pagemerge drops them, as ksmd with
   * use_zero_pages=1). With false they are merged like any other content (n - 1 of n freed).
   * @defaultValue true
   */
  includeZero?: boolean
  /** Per pid, a merge domain: pages merge only with pages of the same domain. Pids not named share one default domain. */
  domainsByPid?: Readonly<Record<number, string | number>> | ReadonlyMap<number, string | number>
  /** How many of the most duplicated contents to list. An integer from 0 to 1000. @defaultValue 10 */
  top?: number
  /** Worker threads that read and hash. An integer from 1 to 256. @defaultValue os.availableParallelism() */
  workers?: number
  /** Called as reading and confirming progress. */
  onProgress?: (progress: EstimateProgress) => void
}

/**
 * How a process went: `ok` read in full; `partial` some resident pages could not be read (a
 * mapping vanished or shrank); `exited` the process ended during the scan (its pages are left out
 * of the totals: that memory is gone); `not-found` no such process; `denied` not permitted;
 * `kernel-thread` no user memory; `self` the estimator itself (read only when `ranges` names it);
 * `error` anything else.
 */
export type ProcessStatus = 'ok' | 'partial' | 'exited' | 'not-found' | 'denied' | 'kernel-thread' | 'self' | 'error'

/** Page counts; every count is of 4 KiB pages. */
export interface EstimateCounts {
  /** Pages read and hashed. */
  pagesScanned: number
  /** Pages whose bytes are all zero (confirmed by reading them again). */
  zeroPages: number
  /** Pages merging would free, not counting zero pages when includeZero: in each group of n identical pages, n - 1. */
  duplicatePages: number
  /** Of duplicatePages, those in groups that lie within one process. */
  withinProcessDuplicatePages: number
  /** Of duplicatePages, those in groups that span more than one process. */
  crossProcessDuplicatePages: number
  /** Candidate pages that changed between their first read and their confirmation. */
  volatilePages: number
  /** (duplicatePages + zeroPages when includeZero) x page size: what merging would free. */
  bytesFreeable: number
}

export interface ProcessEstimate extends EstimateCounts {
  pid: number
  /** The process's name (comm), or '' when it could not be read. */
  name: string
  /** Its command line, truncated to 200 characters. */
  command: string
  status: ProcessStatus
  /** Why the process could not be read in full: the errno name, syscall, message and a hint when one helps. */
  error?: { code: string; errno?: number; syscall?: string; message: string; hint?: string }
  /** Why a process was skipped without an error (a kernel thread, the estimator itself). */
  note?: string
  domain: string
  /** Mappings selected for reading, and their size in bytes (address space, not memory). */
  mappings: number
  bytesMapped: number
  /** Resident pages that could not be read (see status `partial`). */
  pagesUnread: number
  /** Swapped-out pages (not read) and pages mapping the kernel's zero page (no memory, not read). */
  pagesSwapped: number
  pagesZeroMapped: number
}

export interface EstimateLocation {
  pid: number
  pages: number
  /** Up to 4 addresses (hex) where the content lives, and the mapping each is in. */
  addresses: string[]
  mappings: string[]
}

/** One of the most duplicated contents. */
export interface DuplicateContent {
  /** xxh3-64 of the page, hex. */
  hash: string
  /** Identical pages confirmed, and how many of them merging would free (pages - 1). */
  pages: number
  freeablePages: number
  domain: string
  processes: EstimateLocation[]
}

export interface EstimateTotal extends EstimateCounts {
  /** Of the non-zero duplicates, groups of identical pages (each keeps one page). */
  duplicateGroups: number
  /** Pages whose hash matched a group's but whose bytes did not (an xxh3 collision): not counted. */
  hashCollisions: number
  pagesUnread: number
  pagesSwapped: number
  pagesZeroMapped: number
  /** Processes read (status ok or partial), and not read. */
  processesRead: number
  processesNotRead: number
  /** Bytes read from the processes in both passes, and the wall time of the whole estimate. */
  bytesRead: number
  elapsedMs: number
  /** Wall time of each phase, ms: reading /proc and starting workers, reading and hashing, sorting and grouping, confirming. */
  phasesMs: { setup: number; reading: number; grouping: number; confirming: number }
}

export interface EstimateReport {
  pageSize: number
  includeZero: boolean
  processes: ProcessEstimate[]
  total: EstimateTotal
  /** The most duplicated non-zero contents, largest first. */
  top: DuplicateContent[]
}

// ---- options ------------------------------------------------------------------------------------

const MAX_PID = 4194304 // PID_MAX_LIMIT
const MAX_TOP = 1000
const MAX_WORKERS = 256
const OPTION_KEYS = ['pids', 'ranges', 'includeZero', 'domainsByPid', 'top', 'workers', 'onProgress'] as const

interface Resolved {
  pids: number[]
  ranges: Map<number, EstimateRange[]>
  includeZero: boolean
  domains: Map<number, string>
  top: number
  workers: number
  onProgress: ((p: EstimateProgress) => void) | undefined
}

const bad = (key: string, what: string) => typeError(ErrorCode.INVALID_OPTION, `options.${key} must be ${what}`)
const outOfRange = (key: string, what: string) => rangeError(ErrorCode.INVALID_OPTION, `options.${key} must be ${what}`)

function isPid(v: unknown): v is number {
  return typeof v === 'number' && Number.isInteger(v) && v >= 1 && v <= MAX_PID
}

/** A record or Map keyed by pid, as a Map (keys checked as pids). */
function byPid<T>(key: string, input: unknown, value: (v: unknown, where: string) => T): Map<number, T> {
  const out = new Map<number, T>()
  if (input === undefined) return out
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw bad(key, 'an object or Map keyed by pid')
  const entries: [unknown, unknown][] = input instanceof Map ? [...input.entries()] : Object.entries(input)
  for (const [k, v] of entries) {
    const pid = typeof k === 'string' && /^\d+$/.test(k) ? Number(k) : k
    if (!isPid(pid)) throw outOfRange(key, `keyed by pids (integers from 1 to ${MAX_PID}); ${JSON.stringify(String(k))} is not one`)
    out.set(pid, value(v, `${key}[${pid}]`))
  }
  return out
}

function resolveEstimateOptions(input: unknown): Resolved {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) throw typeError(ErrorCode.INVALID_OPTION, 'options must be an object')
  const o = input as Record<string, unknown>
  for (const name of Object.keys(o)) {
    if ((OPTION_KEYS as readonly string[]).includes(name)) continue
    const near = OPTION_KEYS.find((k) => k.toLowerCase() === name.toLowerCase())
    throw typeError(ErrorCode.UNKNOWN_OPTION, `unknown option ${JSON.stringify(name)}; ${near ? `did you mean "${near}"?` : `the known options are ${OPTION_KEYS.join(', ')}`}`)
  }
  if (!Array.isArray(o.pids)) throw bad('pids', 'an array of process ids')
  for (const pid of o.pids) {
    if (typeof pid !== 'number') throw bad('pids', 'an array of process ids')
    if (!isPid(pid)) throw outOfRange('pids', `an array of integers from 1 to ${MAX_PID}`)
  }
  const ranges = byPid('ranges', o.ranges, (v, where) => {
    if (!Array.isArray(v)) throw bad(where, 'an array of { address, bytes }')
    return v.map((r: unknown, i): EstimateRange => {
      const range = r as Partial<EstimateRange> | null
      if (typeof range !== 'object' || range === null) throw bad(`${where}[${i}]`, 'an object { address, bytes }')
      const { address, bytes } = range
      if (typeof address === 'bigint' ? address < 0n || address >= 1n << 64n : typeof address !== 'number' || !Number.isSafeInteger(address) || address < 0)
        throw typeof address === 'bigint' || typeof address === 'number' ? outOfRange(`${where}[${i}].address`, 'a non-negative integer below 2^64') : bad(`${where}[${i}].address`, 'a bigint or a number')
      if (typeof bytes !== 'number') throw bad(`${where}[${i}].bytes`, 'a number')
      if (!Number.isSafeInteger(bytes) || bytes < 0) throw outOfRange(`${where}[${i}].bytes`, 'a non-negative integer')
      return { address: address as bigint | number, bytes }
    })
  })
  const domains = byPid('domainsByPid', o.domainsByPid, (v, where) => {
    if (typeof v !== 'string' && typeof v !== 'number') throw bad(where, 'a string or a number')
    return String(v)
  })
  const integer = (key: string, min: number, max: number, fallback: number): number => {
    const v = o[key]
    if (v === undefined) return fallback
    if (typeof v !== 'number' || Number.isNaN(v)) throw bad(key, `an integer from ${min} to ${max}`)
    if (!Number.isInteger(v) || v < min || v > max) throw outOfRange(key, `an integer from ${min} to ${max}`)
    return v
  }
  if (o.includeZero !== undefined && typeof o.includeZero !== 'boolean') throw bad('includeZero', 'a boolean')
  if (o.onProgress !== undefined && typeof o.onProgress !== 'function') throw bad('onProgress', 'a function')
  return {
    pids: [...new Set(o.pids as number[])],
    ranges,
    includeZero: (o.includeZero as boolean | undefined) ?? true,
    domains,
    top: integer('top', 0, MAX_TOP, 10),
    workers: integer('workers', 1, MAX_WORKERS, Math.min(MAX_WORKERS, availableParallelism())),
    onProgress: o.onProgress as Resolved['onProgress'],
  }
}

// ---- /proc ----------------------------------------------------------------------------------------

/** A mapping of /proc/PID/maps, in page numbers. */
interface Mapping {
  first: number
  end: number
  perms: string
  name: string
  privateAnon: boolean
}

const PF_KTHREAD = 0x00200000
/** Special mappings: not memory process_vm_readv can read (or worth reading). */
const SPECIAL = new Set(['[vvar]', '[vvar_vclock]', '[vdso]', '[vsyscall]'])
const PAGE_SHIFT = 12n

function pageOf(hex: string): number {
  return Number(BigInt('0x' + hex) >> PAGE_SHIFT)
}

/** The address of page number `page`, hex. */
function hexAddress(page: number): string {
  const a = page * PAGE_SIZE
  return '0x' + (Number.isSafeInteger(a) ? a.toString(16) : (BigInt(page) << PAGE_SHIFT).toString(16))
}

export function parseMaps(text: string): Mapping[] {
  const out: Mapping[] = []
  for (const line of text.split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$/.exec(line)
    if (!m) continue
    const [, start, end, perms, inode, path] = m as unknown as [string, string, string, string, string, string]
    const name = path.trim()
    const anonName = name === '' || name === '[heap]' || name.startsWith('[stack') || name.startsWith('[anon:')
    out.push({
      first: pageOf(start),
      end: pageOf(end),
      perms,
      name: name === '' ? '[anon]' : name,
      privateAnon: perms.startsWith('rw') && perms[3] === 'p' && inode === '0' && anonName,
    })
  }
  return out
}

interface Probe {
  name: string
  command: string
  status?: ProcessStatus
  error?: ProcessEstimate['error']
  note?: string
  mappings: Mapping[]
  /** [firstPage, pages] of what to read. */
  ranges: number[]
  bytesMapped: number
}

function errnoOf(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? 'EIO'
}

function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(osConstants.errno)) if (value === errno) return name
  return `E${errno}`
}

function errnoNumber(code: string): number | undefined {
  const v = (osConstants.errno as Record<string, number>)[code]
  return v === undefined ? undefined : -v
}

function readText(file: string): string {
  return readFileSync(file, 'utf8')
}

/** Why reading `pid` was refused, and what would allow it. */
export function deniedHint(pid: number): string {
  let scope: number | undefined
  try {
    scope = Number(readText('/proc/sys/kernel/yama/ptrace_scope').trim())
  } catch {
    scope = undefined
  }
  const uid = process.getuid?.()
  let owner: number | undefined
  try {
    owner = statSync(`/proc/${pid}`).uid
  } catch {
    owner = undefined
  }
  if (scope === 3) return 'kernel.yama.ptrace_scope=3 forbids reading other processes, even as root'
  if (uid === 0) return 'refused even to root: a security module (SELinux, AppArmor, Yama) or a non-dumpable target'
  if (owner !== undefined && owner !== uid) return `the process belongs to uid ${owner}: run as root (CAP_SYS_PTRACE) or as that user`
  if (scope !== undefined && scope >= 1)
    return `kernel.yama.ptrace_scope=${scope} lets only an ancestor read a process: run as root, or sysctl kernel.yama.ptrace_scope=0`
  return 'needs the permission to ptrace the process (same uid and dumpable, or CAP_SYS_PTRACE: run as root)'
}

function failure(status: ProcessStatus, code: string, syscall: string, message: string, hint?: string): { status: ProcessStatus; error: NonNullable<ProcessEstimate['error']> } {
  const errno = errnoNumber(code)
  return { status, error: { code, ...(errno !== undefined ? { errno } : {}), syscall, message, ...(hint ? { hint } : {}) } }
}

/** The process's stat flags and state, name and command line; undefined while it is not there. */
function identify(pid: number): { name: string; command: string; flags: number; state: string } | undefined {
  let stat: string
  try {
    stat = readText(`/proc/${pid}/stat`)
  } catch {
    return undefined
  }
  const close = stat.lastIndexOf(')')
  const name = stat.slice(stat.indexOf('(') + 1, close)
  const fields = stat.slice(close + 2).split(' ')
  let command = ''
  try {
    command = readText(`/proc/${pid}/cmdline`).replace(/\0+$/, '').replace(/\0/g, ' ').slice(0, 200)
  } catch {
    command = ''
  }
  return { name, command, flags: Number(fields[6]), state: fields[0] ?? '' }
}

/** Decides what to read of `pid`: its private anonymous writable mappings, or the given ranges clipped to its mappings. */
function probe(pid: number, ranges: EstimateRange[] | undefined): Probe {
  const p: Probe = { name: '', command: '', mappings: [], ranges: [], bytesMapped: 0 }
  const id = identify(pid)
  if (!id) return { ...p, ...failure('not-found', 'ESRCH', 'open', `no process ${pid}`) }
  p.name = id.name
  p.command = id.command
  if (id.flags & PF_KTHREAD) return { ...p, status: 'kernel-thread', note: 'a kernel thread: no user memory' }
  if (pid === process.pid && !ranges) return { ...p, status: 'self', note: 'the estimator itself (its memory changes as it reads): skipped; name it in options.ranges to read it' }
  if (id.state === 'Z' || id.state === 'X') return { ...p, ...failure('exited', 'ESRCH', 'open', 'a zombie: the process has exited') }
  let text: string
  try {
    text = readText(`/proc/${pid}/maps`)
  } catch (err) {
    const code = errnoOf(err)
    if (code === 'ENOENT' || code === 'ESRCH') return { ...p, ...failure('exited', 'ESRCH', 'open', 'the process exited') }
    if (code === 'EACCES' || code === 'EPERM') return { ...p, ...failure('denied', code, 'open', `cannot read /proc/${pid}/maps`, deniedHint(pid)) }
    return { ...p, ...failure('error', code, 'open', `cannot read /proc/${pid}/maps: ${(err as Error).message}`) }
  }
  p.mappings = parseMaps(text)
  const selected: [number, number][] = []
  if (!ranges) {
    for (const m of p.mappings) if (m.privateAnon) selected.push([m.first, m.end])
  } else {
    const readable = p.mappings.filter((m) => m.perms[0] === 'r' && !SPECIAL.has(m.name))
    const pagesOf = (r: EstimateRange): [number, number] => {
      if (typeof r.address === 'number' && r.address + r.bytes <= Number.MAX_SAFE_INTEGER)
        return [Math.floor(r.address / PAGE_SIZE), Math.ceil((r.address + r.bytes) / PAGE_SIZE)]
      return [Number(BigInt(r.address) >> PAGE_SHIFT), Number((BigInt(r.address) + BigInt(r.bytes) + BigInt(PAGE_SIZE - 1)) >> PAGE_SHIFT)]
    }
    // Ranges by start, swept along the mappings (sorted in maps): no pass over every mapping per range.
    const wanted = ranges.map(pagesOf).sort((x, y) => x[0] - y[0])
    let from = 0
    for (const [first, end] of wanted) {
      while (from < readable.length && readable[from]!.end <= first) from++
      for (let k = from; k < readable.length && readable[k]!.first < end; k++) {
        const m = readable[k]!
        const a = Math.max(first, m.first), b = Math.min(end, m.end)
        if (a < b) selected.push([a, b])
      }
    }
    selected.sort((x, y) => x[0] - y[0])
  }
  let count = 0
  for (const [a, b] of selected) {
    const last = p.ranges.length - 2
    const prevEnd = last >= 0 ? p.ranges[last]! + p.ranges[last + 1]! : -1
    if (a < prevEnd) {
      if (b > prevEnd) p.ranges[last + 1] = b - p.ranges[last]! // overlapping ranges given twice
      continue
    }
    p.ranges.push(a, b - a)
    count++
  }
  for (let i = 1; i < p.ranges.length; i += 2) p.bytesMapped += p.ranges[i]! * PAGE_SIZE
  return p
}

/** Whether the process is gone (or a zombie) now. */
function goneNow(pid: number): boolean {
  const id = identify(pid)
  return !id || id.state === 'Z' || id.state === 'X'
}

// ---- the worker pool ----------------------------------------------------------------------------

/** The compiled worker: beside lib/ in dist/, or in dist/ when lib/ runs from source (tests under a TypeScript loader). */
const WORKER_FILE =
  [join(__dirname, '..', 'workers', 'estimate.js'), join(__dirname, '..', 'dist', 'workers', 'estimate.js')].find((f) => existsSync(f)) ??
  join(__dirname, '..', 'workers', 'estimate.js')
/** Most pages of address space per hash task: enough to amortize a round trip, small enough to spread over workers. */
const TASK_PAGES = 8192
/** Per compare task: distinct reference pages (read into the worker's memory for the call) and members. */
const COMPARE_REFS = 4096
const COMPARE_MEMBERS = 4096
/** Rounds of confirmation for groups whose reference page changed under us. */
const CONFIRM_ROUNDS = 3
/** How long an idle worker of the shared pool waits for the next estimate before it exits, ms. */
const POOL_IDLE_MS = 5000

/**
 * The worker pools, one per thread count, kept between estimate() calls: starting threads and
 * loading the addon in each cost 60-90 ms a call. Threads start on demand and leave after
 * POOL_IDLE_MS idle; piscina unrefs idle threads, so a pool never keeps the process alive.
 */
const pools = new Map<number, Piscina>()
function sharedPool(workers: number): Piscina {
  let pool = pools.get(workers)
  if (!pool) pools.set(workers, (pool = new Piscina({ filename: WORKER_FILE, minThreads: 0, maxThreads: workers, idleTimeout: POOL_IDLE_MS })))
  return pool
}

// ---- counting -----------------------------------------------------------------------------------

/** The (lo, hi) words XORed into the hashes of a domain, so that domains never share a key. */
function domainWords(index: number): [number, number] {
  return index === 0 ? [0, 0] : [Math.imul(index, 0x9e3779b1) >>> 0, Math.imul(index, 0x85ebca6b) >>> 0]
}

/**
 * Groups pages by key: every key held by two pages or more (and the zero key, when `zeroKey` is
 * given, from one page) gets a group number, in the order of the keys' first pages, and
 * groupOf[i] is page i's group or -1. One typed open-addressing table counts each key (no sort,
 * no object per page); a second pass numbers the groups.
 * @returns the number of groups, and for each group whether it is the zero key's
 */
export function groupKeys(keys: Uint32Array, n: number, zeroKey: [number, number] | undefined, groupOf: Int32Array): { groups: number; zero: boolean[] } {
  const zero: boolean[] = []
  groupOf.fill(-1, 0, n)
  if (n === 0) return { groups: 0, zero }
  let bits = 1
  while (1 << bits < 2 * n) bits++
  const mask = (1 << bits) - 1
  const first = new Int32Array(1 << bits) // the first page with the slot's key, + 1; 0: empty
  const count = new Uint8Array(1 << bits) // pages with the key, up to 2
  const group = new Int32Array(1 << bits) // the key's group + 1, once numbered
  const slotOf = (lo: number, hi: number) => {
    for (let p = Math.imul((lo ^ Math.imul(hi, 0x85ebca6b)) >>> 0, 0x9e3779b1) >>> (32 - bits); ; p = (p + 1) & mask) {
      const e = first[p]!
      if (e === 0 || (keys[2 * (e - 1)] === lo && keys[2 * (e - 1) + 1] === hi)) return p
    }
  }
  for (let i = 0; i < n; i++) {
    const p = slotOf(keys[2 * i]!, keys[2 * i + 1]!)
    if (first[p] === 0) first[p] = i + 1
    if (count[p]! < 2) count[p]!++
  }
  let groups = 0
  for (let i = 0; i < n; i++) {
    const lo = keys[2 * i]!, hi = keys[2 * i + 1]!
    const p = slotOf(lo, hi)
    if (group[p] === 0) {
      const isZero = zeroKey !== undefined && lo === zeroKey[0] && hi === zeroKey[1]
      if (count[p]! < 2 && !isZero) continue
      group[p] = ++groups
      zero.push(isZero)
    }
    groupOf[i] = group[p]! - 1
  }
  return { groups, zero }
}

/** Page outcome after confirmation. */
const Outcome = { NONE: 0, CONFIRMED: 1, VOLATILE: 2, COLLISION: 3, LOST: 4 } as const

interface Pages {
  n: number
  hashes: BigUint64Array
  words: Uint32Array
  page: Float64Array
  proc: Uint32Array
}

/** Writes the u64 `page * 4096` at words[at], words[at+1] (exact for every page number below 2^52). */
function putAddress(words: Uint32Array, at: number, page: number): void {
  words[at] = (page % 0x100000) * PAGE_SIZE
  words[at + 1] = Math.floor(page / 0x100000)
}

// ---- the estimate -------------------------------------------------------------------------------

interface ProcState extends Probe {
  pid: number
  domain: string
  domainIndex: number
  chunks: EstimateHashResult[]
  unread: number
  swapped: number
  zeroMapped: number
  readPages: number
  exited: boolean
  readErrno: number
  readSyscall: string
}

const emptyCounts = (): EstimateCounts => ({
  pagesScanned: 0,
  zeroPages: 0,
  duplicatePages: 0,
  withinProcessDuplicatePages: 0,
  crossProcessDuplicatePages: 0,
  volatilePages: 0,
  bytesFreeable: 0,
})

/**
 * Estimates how much memory same-page merging would free across the processes `pids`, changing
 * nothing in them: their resident private anonymous pages (or the `ranges` given) are read with
 * process_vm_readv and hashed on worker threads, and every group of equal hashes is read again
 * and compared byte for byte before it counts.
 *
 * A process that cannot be read (gone, not permitted, exits meanwhile) gets its status and error
 * in the report; the call rejects only for bad options.
 *
 * @example
 * const report = await estimate({ pids: [1234, 5678] })
 * console.log(report.total.bytesFreeable, report.total.crossProcessDuplicatePages)
 * @throws TypeError/RangeError (ERR_PAGEMERGE_INVALID_OPTION, ERR_PAGEMERGE_UNKNOWN_OPTION) for bad options
 */
export async function estimate(options: EstimateOptions): Promise<EstimateReport> {
  const o = resolveEstimateOptions(options)
  const native = loadNative()
  const started = performance.now()
  const domainIndex = new Map<string, number>([['', 0]])
  const procs: ProcState[] = o.pids.map((pid) => {
    const domain = o.domains.get(pid) ?? ''
    if (!domainIndex.has(domain)) domainIndex.set(domain, domainIndex.size)
    return {
      pid,
      domain,
      domainIndex: domainIndex.get(domain)!,
      ...probe(pid, o.ranges.get(pid)),
      chunks: [],
      unread: 0,
      swapped: 0,
      zeroMapped: 0,
      readPages: 0,
      exited: false,
      readErrno: 0,
      readSyscall: '',
    }
  })

  // Tasks of at most TASK_PAGES pages of address space each, small mappings sharing one.
  const tasks: { proc: ProcState; ranges: number[]; pages: number }[] = []
  for (const proc of procs) {
    if (proc.status) continue
    let cur: (typeof tasks)[number] | undefined
    for (let i = 0; i < proc.ranges.length; i += 2) {
      let first = proc.ranges[i]!, left = proc.ranges[i + 1]!
      while (left > 0) {
        if (!cur || cur.pages >= TASK_PAGES) tasks.push((cur = { proc, ranges: [], pages: 0 }))
        const take = Math.min(left, TASK_PAGES - cur.pages)
        cur.ranges.push(first, take)
        cur.pages += take
        first += take
        left -= take
      }
    }
  }
  let bytesRead = 0
  const pool = tasks.length > 0 ? sharedPool(o.workers) : undefined
  // ---- pass 1: read and hash ---------------------------------------------------------------
  const phases = { setup: 0, reading: 0, grouping: 0, confirming: 0 }
  let mark = performance.now()
  const lap = (phase: keyof typeof phases) => {
    const now = performance.now()
    phases[phase] = Math.round((now - mark) * 10) / 10
    mark = now
  }
  phases.setup = Math.round((mark - started) * 10) / 10
  const totalBytes = tasks.reduce((s, t) => s + t.pages * PAGE_SIZE, 0)
  let doneBytes = 0
  o.onProgress?.({ phase: 'reading', done: 0, total: totalBytes })
  const results = await Promise.all(
    tasks.map(async (t) => {
      const r: EstimateHashResult = t.proc.exited
        ? { hashes: new BigUint64Array(0), pages: new Float64Array(0), unread: 0, swapped: 0, zeroMapped: 0, errno: osConstants.errno.ESRCH, syscall: 'process_vm_readv' }
        : await pool!.run({ kind: 'hash', pid: t.proc.pid, ranges: Float64Array.from(t.ranges) } satisfies EstimateHashTask)
      if (r.errno === osConstants.errno.ESRCH) t.proc.exited = true
      doneBytes += t.pages * PAGE_SIZE
      o.onProgress?.({ phase: 'reading', done: doneBytes, total: totalBytes })
      return r
    }),
  )
  results.forEach((r, i) => {
    const proc = tasks[i]!.proc
    proc.chunks.push(r)
    proc.unread += r.unread
    proc.swapped += r.swapped
    proc.zeroMapped += r.zeroMapped
    proc.readPages += r.hashes.length
    if (r.errno && !proc.readErrno) {
      proc.readErrno = r.errno
      proc.readSyscall = r.syscall
    }
  })

  lap('reading')
  // All pages in one set of typed arrays, process by process in address order.
  const n = procs.reduce((s, p) => s + p.readPages, 0)
  bytesRead += n * PAGE_SIZE
  const pg: Pages = { n, hashes: new BigUint64Array(n), words: new Uint32Array(0), page: new Float64Array(n), proc: new Uint32Array(n) }
  pg.words = new Uint32Array(pg.hashes.buffer)
  let at = 0
  procs.forEach((p, pi) => {
    for (const c of p.chunks) {
      pg.hashes.set(c.hashes, at)
      pg.page.set(c.pages, at)
      pg.proc.fill(pi, at, at + c.hashes.length)
      at += c.hashes.length
    }
    p.chunks = []
  })

  // Keys: hash XOR the domain's words; zero pages keep the bare hash when they count in full.
  const zero = native.ZERO_PAGE_HASH
  const zeroLo = Number(zero & 0xffffffffn), zeroHi = Number(zero >> 32n)
  const isZeroHash = (i: number) => pg.words[2 * i] === zeroLo && pg.words[2 * i + 1] === zeroHi
  let keys = pg.words
  if (domainIndex.size > 1) {
    keys = new Uint32Array(pg.words)
    const mixes = procs.map((p) => domainWords(p.domainIndex))
    for (let i = 0; i < n; i++) {
      if (o.includeZero && isZeroHash(i)) continue
      const [lo, hi] = mixes[pg.proc[i]!]!
      keys[2 * i] = (keys[2 * i]! ^ lo) >>> 0
      keys[2 * i + 1] = (keys[2 * i + 1]! ^ hi) >>> 0
    }
  }
  const groupOf = new Int32Array(n)
  const { groups, zero: groupZero } = groupKeys(keys, n, o.includeZero ? [zeroLo, zeroHi] : undefined, groupOf)

  lap('grouping')
  // ---- pass 2: confirm byte for byte ---------------------------------------------------------
  const outcome = new Uint8Array(n)
  const subOf = new Int32Array(n).fill(-1) // confirmed pages: their subgroup (one ref's confirmed set)
  let subgroups = 0
  let collisions = 0
  let pending = groupOf // pages still to confirm: their group, or -1
  let candidates = 0
  for (let i = 0; i < n; i++) if (groupOf[i]! >= 0) candidates++
  let confirmedSoFar = 0
  o.onProgress?.({ phase: 'confirming', done: 0, total: candidates })
  for (let round = 0; round < CONFIRM_ROUNDS && pool; round++) {
    // The reference of each non-zero group: its first pending page.
    const refOf = new Int32Array(groups).fill(-1)
    for (let i = 0; i < n; i++) {
      const g = pending[i]!
      if (g >= 0 && !groupZero[g] && refOf[g] === -1) refOf[g] = i
    }
    const subOfGroup = new Int32Array(groups).fill(-1)
    // Each task goes to the workers as soon as it is built, so they compare while the rest is built.
    const running: Promise<EstimateCompareResult>[] = []
    const chunks = compareChunks(pg, procs, pending, refOf, groupZero, (c) =>
      running.push(
        pool.run({ kind: 'compare', refs: c.refs, members: c.members } satisfies EstimateCompareTask).then((r: EstimateCompareResult) => {
          confirmedSoFar += c.memberIndex.length
          o.onProgress?.({ phase: 'confirming', done: Math.min(confirmedSoFar, candidates), total: candidates })
          return r
        }),
      ),
    )
    const replies = await Promise.all(running)
    if (chunks.length === 0) break
    const next = new Int32Array(n).fill(-1)
    const refBad = new Uint8Array(groups) // a read of the ref showed it changed, or failed
    const refGood = new Uint8Array(groups)
    const refLost = new Uint8Array(groups)
    // What each read of a reference says: unchanged (good), or changed or unreadable (bad).
    chunks.forEach((c, ci) => {
      const r = replies[ci]!
      bytesRead += (c.refIndex.length + c.memberIndex.length) * PAGE_SIZE
      c.refIndex.forEach((ri, s) => {
        if (ri < 0) return // zeros
        const g = pending[ri]!
        const ok = r.status[s] === 0 && r.hashes[s] === pg.hashes[ri]
        if (ok) refGood[g] = 1
        else refBad[g] = 1
        if (r.status[s]! < 0) refLost[g] = 1
        if (r.status[s] === -osConstants.errno.ESRCH) procs[pg.proc[ri]!]!.exited = true
      })
    })
    const settle = (i: number, g: number, what: number) => {
      outcome[i] = what
      if (what === Outcome.CONFIRMED) {
        if (subOfGroup[g] === -1) subOfGroup[g] = subgroups++
        subOf[i] = subOfGroup[g]!
      }
    }
    chunks.forEach((c, ci) => {
      const r = replies[ci]!
      const nr = c.refIndex.length
      c.memberIndex.forEach((i, m) => {
        const g = pending[i]!
        const st = r.status[nr + m]!, now = r.hashes[nr + m]!
        if (st < 0) {
          if (st === -osConstants.errno.ESRCH) procs[pg.proc[i]!]!.exited = true
          outcome[i] = Outcome.LOST
        } else if (now !== pg.hashes[i]) outcome[i] = Outcome.VOLATILE
        else if (groupZero[g] ? st === 0 : st === 0 && !refBad[g] && refGood[g]) settle(i, g, Outcome.CONFIRMED)
        else if (st === 1 && (groupZero[g] || !refBad[g])) {
          outcome[i] = Outcome.COLLISION
          collisions++
        } else next[i] = g // compared with a reference that changed: try again with another one
      })
    })
    // The references: confirmed with their group if every read of them was unchanged.
    for (let g = 0; g < groups; g++) {
      const ri = refOf[g]!
      if (ri < 0) continue
      if (refGood[g] && !refBad[g]) {
        if (subOfGroup[g]! >= 0) settle(ri, g, Outcome.CONFIRMED) // alone, a reference frees nothing
      } else if (refGood[g] || refBad[g]) outcome[ri] = refLost[g] ? Outcome.LOST : Outcome.VOLATILE
    }
    pending = next
  }
  for (let i = 0; i < n; i++) if (pending[i]! >= 0 && outcome[i] === Outcome.NONE) outcome[i] = Outcome.VOLATILE

  lap('confirming')
  // A process gone by now took its memory with it: its pages leave the totals.
  for (const p of procs) if (!p.status && !p.exited && p.readPages > 0 && goneNow(p.pid)) p.exited = true

  // ---- count -------------------------------------------------------------------------------
  const counts = procs.map(emptyCounts)
  procs.forEach((p, pi) => (counts[pi]!.pagesScanned = p.readPages))
  const live = (i: number) => !procs[pg.proc[i]!]!.exited
  const subFirstProc = new Int32Array(subgroups).fill(-1)
  const subKept = new Int32Array(subgroups).fill(-1)
  const subSize = new Uint32Array(subgroups)
  const subMulti = new Uint8Array(subgroups)
  const subZero = new Uint8Array(subgroups)
  for (let i = 0; i < n; i++) {
    const c = counts[pg.proc[i]!]!
    if (outcome[i] === Outcome.VOLATILE) c.volatilePages++
    if (outcome[i] !== Outcome.CONFIRMED) continue
    if (isZeroHash(i)) c.zeroPages++
    const s = subOf[i]!
    if (groupZero[groupOf[i]!]) subZero[s] = 1
    if (!live(i)) continue
    subSize[s]!++
    if (subKept[s] === -1) subKept[s] = i
    if (subFirstProc[s] === -1) subFirstProc[s] = pg.proc[i]!
    else if (subFirstProc[s] !== pg.proc[i]) subMulti[s] = 1
  }
  let duplicateGroups = 0
  for (let s = 0; s < subgroups; s++) if (!subZero[s] && subSize[s]! >= 2) duplicateGroups++
  for (let i = 0; i < n; i++) {
    if (outcome[i] !== Outcome.CONFIRMED || !live(i)) continue
    const s = subOf[i]!
    if (subZero[s] || subKept[s] === i) continue
    const c = counts[pg.proc[i]!]!
    c.duplicatePages++
    if (subMulti[s]) c.crossProcessDuplicatePages++
    else c.withinProcessDuplicatePages++
  }

  const processes: ProcessEstimate[] = procs.map((p, pi) => {
    const c = counts[pi]!
    let status: ProcessStatus = p.status ?? 'ok'
    let error = p.error
    if (!p.status) {
      if (p.exited) {
        status = 'exited'
        error = failure('exited', 'ESRCH', 'process_vm_readv', `the process exited during the scan, after ${p.readPages} pages were read; its memory is gone and is left out of the totals`).error
      } else if (p.readErrno && (p.readErrno === osConstants.errno.EPERM || p.readErrno === osConstants.errno.EACCES) && p.readPages === 0) {
        const code = errnoName(p.readErrno)
        ;({ status, error } = failure('denied', code, p.readSyscall, `cannot read the memory of process ${p.pid}`, deniedHint(p.pid)))
      } else if (p.readErrno || p.unread > 0) {
        const code = errnoName(p.readErrno || osConstants.errno.EFAULT)
        ;({ status, error } = failure('partial', code, p.readSyscall || 'process_vm_readv', `${p.unread} resident pages could not be read (mappings that vanished or shrank while being read)`))
      }
    }
    const read = status === 'ok' || status === 'partial'
    if (!read) Object.assign(c, emptyCounts(), { pagesScanned: p.readPages })
    c.bytesFreeable = (c.duplicatePages + (o.includeZero ? c.zeroPages : 0)) * PAGE_SIZE
    return {
      pid: p.pid,
      name: p.name,
      command: p.command,
      status,
      ...(error ? { error } : {}),
      ...(p.note ? { note: p.note } : {}),
      domain: p.domain,
      mappings: p.ranges.length / 2,
      bytesMapped: p.bytesMapped,
      ...c,
      pagesUnread: p.unread,
      pagesSwapped: p.swapped,
      pagesZeroMapped: p.zeroMapped,
    }
  })

  const total: EstimateTotal = {
    ...emptyCounts(),
    duplicateGroups,
    hashCollisions: collisions,
    pagesUnread: 0,
    pagesSwapped: 0,
    pagesZeroMapped: 0,
    processesRead: 0,
    processesNotRead: 0,
    bytesRead,
    elapsedMs: 0,
    phasesMs: phases,
  }
  for (const p of processes) {
    const read = p.status === 'ok' || p.status === 'partial'
    if (read) total.processesRead++
    else total.processesNotRead++
    if (!read) continue
    for (const k of ['pagesScanned', 'zeroPages', 'duplicatePages', 'withinProcessDuplicatePages', 'crossProcessDuplicatePages', 'volatilePages', 'bytesFreeable', 'pagesUnread', 'pagesSwapped', 'pagesZeroMapped'] as const)
      total[k] += p[k]
  }

  const top = topContents(pg, procs, outcome, subOf, subSize, subZero, subgroups, o.top, live)
  total.elapsedMs = Math.round((performance.now() - started) * 10) / 10
  return { pageSize: PAGE_SIZE, includeZero: o.includeZero, processes, total, top }
}

interface CompareChunk {
  refs: BigUint64Array
  members: BigUint64Array
  /** Page index of each ref (-1: zeros) and of each member. */
  refIndex: Int32Array
  memberIndex: Uint32Array
}

/**
 * The compare tasks of a round. Groups are taken in the order of their reference pages (process
 * by process, by address), up to COMPARE_REFS references and COMPARE_MEMBERS members a task (a
 * larger group is split, its reference read again), so that each reference is read about once
 * and the members of a task, sorted by page, are read together, adjacent ones in one iovec.
 */
function compareChunks(pg: Pages, procs: ProcState[], pending: Int32Array, refOf: Int32Array, groupZero: boolean[], emit: (chunk: CompareChunk) => void): CompareChunk[] {
  const groups = refOf.length
  // Each group's pending members (references excluded), in page order: one array, offsets per group.
  const start = new Uint32Array(groups + 1)
  for (let i = 0; i < pg.n; i++) {
    const g = pending[i]!
    if (g >= 0 && refOf[g] !== i) start[g + 1]!++
  }
  for (let g = 0; g < groups; g++) start[g + 1]! += start[g]!
  const fill = start.slice(0, groups)
  const list = new Uint32Array(start[groups]!)
  const order: number[] = [] // groups by reference page; zero groups (no reference page) first
  for (let g = 0; g < groups; g++) if (groupZero[g] && start[g + 1]! > start[g]!) order.push(g)
  for (let i = 0; i < pg.n; i++) {
    const g = pending[i]!
    if (g < 0) continue
    if (refOf[g] === i) {
      if (start[g + 1]! > start[g]!) order.push(g) // a reference with no member left is not read
    } else list[fill[g]!++] = i
  }

  const out: CompareChunk[] = []
  const slotOf = new Int32Array(groups)
  let refs: number[] = [], parts: Uint32Array[] = [], members = 0
  const flush = () => {
    if (refs.length === 0) return
    const memberIndex = new Uint32Array(members)
    let at = 0
    for (const part of parts) {
      memberIndex.set(part, at)
      at += part.length
    }
    memberIndex.sort()
    const refIndex = Int32Array.from(refs, (g) => (groupZero[g] ? -1 : refOf[g]!))
    refs.forEach((g, k) => (slotOf[g] = k))
    const refWords = new Uint32Array(4 * refs.length)
    refIndex.forEach((ri, k) => {
      if (ri < 0) return // pid 0, address 0: a page of zeros
      refWords[4 * k] = procs[pg.proc[ri]!]!.pid
      putAddress(refWords, 4 * k + 2, pg.page[ri]!)
    })
    const memberWords = new Uint32Array(6 * members)
    for (let m = 0; m < members; m++) {
      const i = memberIndex[m]!
      memberWords[6 * m] = slotOf[pending[i]!]!
      memberWords[6 * m + 2] = procs[pg.proc[i]!]!.pid
      putAddress(memberWords, 6 * m + 4, pg.page[i]!)
    }
    const chunk = { refs: new BigUint64Array(refWords.buffer), members: new BigUint64Array(memberWords.buffer), refIndex, memberIndex }
    out.push(chunk)
    emit(chunk)
    refs = []
    parts = []
    members = 0
  }
  for (const g of order) {
    for (let from = start[g]!; from < start[g + 1]!; ) {
      if (refs.length >= COMPARE_REFS || members >= COMPARE_MEMBERS) flush()
      const take = Math.min(start[g + 1]! - from, COMPARE_MEMBERS - members)
      refs.push(g)
      parts.push(list.subarray(from, from + take))
      members += take
      from += take
    }
  }
  flush()
  return out
}

/** The `top` largest confirmed non-zero groups, with where their pages live. */
function topContents(
  pg: Pages,
  procs: ProcState[],
  outcome: Uint8Array,
  subOf: Int32Array,
  subSize: Uint32Array,
  subZero: Uint8Array,
  subgroups: number,
  top: number,
  live: (i: number) => boolean,
): DuplicateContent[] {
  if (top === 0) return []
  const ids: number[] = []
  for (let s = 0; s < subgroups; s++) if (!subZero[s] && subSize[s]! >= 2) ids.push(s)
  ids.sort((a, b) => subSize[b]! - subSize[a]! || a - b)
  const chosen = new Map<number, DuplicateContent & { where: Map<number, EstimateLocation> }>()
  for (const s of ids.slice(0, top))
    chosen.set(s, { hash: '', pages: subSize[s]!, freeablePages: subSize[s]! - 1, domain: '', processes: [], where: new Map() })
  for (let i = 0; i < pg.n; i++) {
    if (outcome[i] !== Outcome.CONFIRMED || !live(i)) continue
    const entry = chosen.get(subOf[i]!)
    if (!entry) continue
    const proc = procs[pg.proc[i]!]!
    if (entry.hash === '') {
      entry.hash = '0x' + pg.hashes[i]!.toString(16).padStart(16, '0')
      entry.domain = proc.domain
    }
    let loc = entry.where.get(proc.pid)
    if (!loc) entry.where.set(proc.pid, (loc = { pid: proc.pid, pages: 0, addresses: [], mappings: [] }))
    loc.pages++
    if (loc.addresses.length < 4) {
      const page = pg.page[i]!
      loc.addresses.push(hexAddress(page))
      loc.mappings.push(proc.mappings.find((m) => m.first <= page && page < m.end)?.name ?? '?')
    }
  }
  return [...chosen.values()].map(({ where, ...c }) => ({ ...c, processes: [...where.values()] }))
}

export { RemotePage }
