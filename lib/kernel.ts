/**
 * The kernel's own same-page merging (ksmd), seen from Node: read /sys/kernel/mm/ksm and this
 * process's KSM counters, tune ksmd's knobs and put them back, and opt the whole process in with
 * prctl(PR_SET_MEMORY_MERGE). Reads are synchronous: every file here is a few bytes.
 */
import { accessSync, constants as fsConstants, readdirSync, readFileSync, statSync, writeFileSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { error, ErrorCode, isOptionsObject, rangeError, systemError, typeError, type CodedError } from './errors'
import { loadNative, type NativeBinding } from './native'

/** Where the kernel keeps ksmd's knobs and counters. */
export const KSM_SYSFS = '/sys/kernel/mm/ksm'

/** camelCase names of the writable knobs of /sys/kernel/mm/ksm (present ones only on older kernels). */
export interface KsmKnobs {
  /** 0 stops ksmd, 1 runs it, 2 stops it and unmerges every merged page. */
  run?: 0 | 1 | 2
  pagesToScan?: number
  sleepMillisecs?: number
  mergeAcrossNodes?: 0 | 1
  maxPageSharing?: number
  stableNodeChainsPruneMillisecs?: number
  useZeroPages?: 0 | 1
  smartScan?: 0 | 1
  advisorMode?: 'none' | 'scan-time'
  advisorMaxCpu?: number
  advisorTargetScanTime?: number
  advisorMinPagesToScan?: number
  advisorMaxPagesToScan?: number
}

/** The read-only counters of /sys/kernel/mm/ksm; a file missing on this kernel is absent. */
export interface KsmStats {
  pagesShared?: number
  pagesSharing?: number
  pagesUnshared?: number
  pagesVolatile?: number
  pagesScanned?: number
  fullScans?: number
  stableNodeChains?: number
  stableNodeDups?: number
  ksmZeroPages?: number
  generalProfit?: number
  pagesSkipped?: number
}

export interface KernelStatus {
  /** false when /sys/kernel/mm/ksm is missing (no CONFIG_KSM); reason says why. */
  available: boolean
  reason?: string
  /** Values read now; a file missing on this kernel is absent (undefined), never guessed. */
  knobs: KsmKnobs
  /** The read-only files, same rule for absent ones. */
  stats: KsmStats
  /** Every file of the directory as raw text (trimmed), including ones this version does not know. */
  raw: Record<string, string>
  /** This process: /proc/self/ksm_stat and /proc/self/ksm_merging_pages; undefined where the file is missing. */
  process: { ksmStat?: Record<string, number | string | boolean>; mergingPages?: number }
  /** The ksmd kernel thread: its pid and the CPU time it has used, in ns; undefined if not found. */
  ksmd?: { pid: number; cpuNs: number }
}

/**
 * ksmd's progress, cheap enough to poll (three small files). `run` is absent without KSM; the
 * counters read 0 where the kernel has no such file (pages_scanned is Linux 6.7+).
 */
export interface KsmCounters {
  run?: 0 | 1 | 2
  fullScans: number
  pagesScanned: number
}

/**
 * This process's share of KSM, from /proc/self/ksm_stat (Linux 6.1+; ksm_merging_pages alone on
 * 5.19+). Absent where the kernel does not say.
 */
export interface ProcessKsm {
  /** Pages of this process that ksmd has merged (ksm_merging_pages). */
  mergingPages?: number
  /** All-zero pages ksmd mapped to the zero page, with use_zero_pages (ksm_zero_pages). */
  zeroPages?: number
  /** ksmd's metadata entries for this process (ksm_rmap_items). */
  rmapItems?: number
  /** Bytes saved minus metadata spent (ksm_process_profit); may be negative. */
  profit?: number
  /** Whether prctl(PR_SET_MEMORY_MERGE) is on (ksm_merge_any). */
  mergeAny?: boolean
  /** Whether any region of the process is mergeable now (ksm_mergeable). */
  mergeable?: boolean
}

/** Test hooks: directories to read instead of the real ones. */
export interface KernelKsmOptions {
  /** Instead of /sys/kernel/mm/ksm. */
  sysfs?: string
  /** Instead of /proc/self (ksm_stat, ksm_merging_pages). */
  procSelf?: string
  /** Instead of /proc, where the ksmd thread is looked for. */
  proc?: string
}

type KnobKey = keyof KsmKnobs

type KnobRule =
  | { readonly kind: 'integer'; readonly min: number; readonly max: number }
  | { readonly kind: 'enum'; readonly values: readonly (string | number)[] }

interface KnobSpec {
  readonly file: string
  readonly rule: KnobRule
}

const UINT32_MAX = 2 ** 32 - 1
const INT32_MAX = 2 ** 31 - 1
/** The kernel's unsigned long is wider; a JS number is exact up to here. */
const ULONG_SAFE = Number.MAX_SAFE_INTEGER

/**
 * What each store function of mm/ksm.c (Linux 6.x) accepts. Values the kernel would take but
 * silently truncate (advisor_max_cpu is parsed as unsigned long into an unsigned int) are kept
 * to what it stores faithfully.
 */
const KNOBS: { readonly [K in KnobKey]-?: KnobSpec } = {
  run: { file: 'run', rule: { kind: 'enum', values: [0, 1, 2] } },
  pagesToScan: { file: 'pages_to_scan', rule: { kind: 'integer', min: 0, max: UINT32_MAX } },
  sleepMillisecs: { file: 'sleep_millisecs', rule: { kind: 'integer', min: 0, max: UINT32_MAX } },
  mergeAcrossNodes: { file: 'merge_across_nodes', rule: { kind: 'enum', values: [0, 1] } },
  maxPageSharing: { file: 'max_page_sharing', rule: { kind: 'integer', min: 2, max: INT32_MAX } },
  stableNodeChainsPruneMillisecs: {
    file: 'stable_node_chains_prune_millisecs',
    rule: { kind: 'integer', min: 0, max: UINT32_MAX },
  },
  useZeroPages: { file: 'use_zero_pages', rule: { kind: 'enum', values: [0, 1] } },
  smartScan: { file: 'smart_scan', rule: { kind: 'enum', values: [0, 1] } },
  advisorMode: { file: 'advisor_mode', rule: { kind: 'enum', values: ['none', 'scan-time'] } },
  advisorMaxCpu: { file: 'advisor_max_cpu', rule: { kind: 'integer', min: 0, max: UINT32_MAX } },
  advisorTargetScanTime: { file: 'advisor_target_scan_time', rule: { kind: 'integer', min: 1, max: ULONG_SAFE } },
  advisorMinPagesToScan: { file: 'advisor_min_pages_to_scan', rule: { kind: 'integer', min: 0, max: ULONG_SAFE } },
  advisorMaxPagesToScan: { file: 'advisor_max_pages_to_scan', rule: { kind: 'integer', min: 0, max: ULONG_SAFE } },
}

const KNOB_KEYS = Object.keys(KNOBS) as KnobKey[]

/**
 * The order tune() writes in. The advisor's limits go before advisor_mode (switching to scan-time
 * sets pages_to_scan to advisor_min_pages_to_scan), advisor_mode before pages_to_scan (the kernel
 * refuses pages_to_scan while the advisor runs), and run last so ksmd starts with the new values.
 * run=2 is the exception: it goes first, so that its unmerge frees the knobs that need no shared pages.
 */
const WRITE_ORDER: readonly KnobKey[] = [
  'advisorMaxCpu',
  'advisorTargetScanTime',
  'advisorMinPagesToScan',
  'advisorMaxPagesToScan',
  'advisorMode',
  'pagesToScan',
  'sleepMillisecs',
  'useZeroPages',
  'smartScan',
  'stableNodeChainsPruneMillisecs',
  'mergeAcrossNodes',
  'maxPageSharing',
  'run',
]

/** The read-only counters, by file. */
const STAT_FILES: { readonly [K in keyof KsmStats]-?: string } = {
  pagesShared: 'pages_shared',
  pagesSharing: 'pages_sharing',
  pagesUnshared: 'pages_unshared',
  pagesVolatile: 'pages_volatile',
  pagesScanned: 'pages_scanned',
  fullScans: 'full_scans',
  stableNodeChains: 'stable_node_chains',
  stableNodeDups: 'stable_node_dups',
  ksmZeroPages: 'ksm_zero_pages',
  generalProfit: 'general_profit',
  pagesSkipped: 'pages_skipped',
}

// ---------------------------------------------------------------------------------------------
// Pure parsing: text in, values out.

/** `ksm_merge_any` → `ksmMergeAny`. */
export function camelCase(name: string): string {
  return name.replace(/[_-]([a-z0-9])/g, (_, c: string) => c.toUpperCase())
}

/** A decimal integer as the kernel prints it, else undefined. */
export function parseKernelInt(text: string | undefined): number | undefined {
  if (text === undefined || !/^-?\d+$/.test(text)) return undefined
  return Number(text)
}

/** advisor_mode prints every mode with the current one in brackets: `[none] scan-time`. */
export function parseSelected(text: string | undefined): string | undefined {
  if (text === undefined) return undefined
  const m = /\[([^\]]+)\]/.exec(text)
  return m ? m[1] : text.includes(' ') ? undefined : text
}

/**
 * /proc/<pid>/ksm_stat: lines of `key value` (counters) or `key: value` (yes/no flags) into
 * camelCase keys; integers become numbers, yes/no booleans, anything else stays a string.
 */
export function parseKsmStat(text: string): Record<string, number | string | boolean> {
  const out: Record<string, number | string | boolean> = {}
  for (const line of text.split('\n')) {
    const m = /^\s*([A-Za-z0-9_]+):?\s+(.*?)\s*$/.exec(line)
    if (!m) continue
    const value = m[2]!
    const number = parseKernelInt(value)
    out[camelCase(m[1]!)] =
      number !== undefined ? number : value === 'yes' ? true : value === 'no' ? false : value
  }
  return out
}

/** ProcessKsm from the text of ksm_stat and ksm_merging_pages (either may be missing). */
export function parseProcessKsm(ksmStat: string | undefined, mergingPages: string | undefined): ProcessKsm {
  const stat = ksmStat === undefined ? {} : parseKsmStat(ksmStat)
  const out: ProcessKsm = {}
  const num = (v: unknown) => (typeof v === 'number' ? v : undefined)
  const bool = (v: unknown) => (typeof v === 'boolean' ? v : undefined)
  const fields: [keyof ProcessKsm, number | boolean | undefined][] = [
    ['mergingPages', num(stat.ksmMergingPages) ?? parseKernelInt(mergingPages)],
    ['zeroPages', num(stat.ksmZeroPages)],
    ['rmapItems', num(stat.ksmRmapItems)],
    ['profit', num(stat.ksmProcessProfit)],
    ['mergeAny', bool(stat.ksmMergeAny)],
    ['mergeable', bool(stat.ksmMergeable)],
  ]
  for (const [key, value] of fields) if (value !== undefined) (out as Record<string, unknown>)[key] = value
  return out
}

/** The knob values in raw sysfs text; absent or unparsable files stay absent. */
export function parseKnobs(raw: Readonly<Record<string, string>>): KsmKnobs {
  const knobs: Record<string, unknown> = {}
  for (const key of KNOB_KEYS) {
    const { file, rule } = KNOBS[key]
    const text = raw[file]
    const value = rule.kind === 'enum' && typeof rule.values[0] === 'string' ? parseSelected(text) : parseKernelInt(text)
    if (value === undefined) continue
    if (rule.kind === 'enum' && !rule.values.includes(value)) continue // a value this version does not know: raw has it
    knobs[key] = value
  }
  return knobs as KsmKnobs
}

/** The counters in raw sysfs text; absent or unparsable files stay absent. */
export function parseStats(raw: Readonly<Record<string, string>>): KsmStats {
  const stats: Record<string, number> = {}
  for (const [key, file] of Object.entries(STAT_FILES)) {
    const value = parseKernelInt(raw[file])
    if (value !== undefined) stats[key] = value
  }
  return stats as KsmStats
}

/** Every readable regular file of `dir`, trimmed. A missing directory gives undefined. */
export function readSysfsDir(dir: string): Record<string, string> | undefined {
  let names: string[]
  try {
    names = readdirSync(dir).sort()
  } catch {
    return undefined
  }
  const raw: Record<string, string> = {}
  for (const name of names) {
    const text = readText(join(dir, name))
    if (text !== undefined) raw[name] = text
  }
  return raw
}

/** A small file's trimmed text, or undefined if it is missing, unreadable or not a file. */
function readText(file: string): string | undefined {
  try {
    return readFileSync(file, 'utf8').trim()
  } catch {
    return undefined
  }
}

/** The ksmd thread: the first /proc/<pid> whose comm is `ksmd`. */
function findKsmd(proc: string): number | undefined {
  let names: string[]
  try {
    names = readdirSync(proc)
  } catch {
    return undefined
  }
  // Kernel threads start early, so the lowest pids are looked at first.
  const pids = names.filter((n) => /^\d+$/.test(n)).map(Number).sort((a, b) => a - b)
  for (const pid of pids) if (readText(join(proc, String(pid), 'comm')) === 'ksmd') return pid
  return undefined
}

/** CPU time of a task in ns: schedstat's first field, else utime + stime from stat. */
function taskCpuNs(proc: string, pid: number): number | undefined {
  const schedstat = readText(join(proc, String(pid), 'schedstat'))
  const first = parseKernelInt(schedstat?.split(/\s+/)[0])
  if (first !== undefined) return first
  const stat = readText(join(proc, String(pid), 'stat'))
  if (stat === undefined) return undefined
  // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  const utime = parseKernelInt(fields[11]), stime = parseKernelInt(fields[12])
  if (utime === undefined || stime === undefined) return undefined
  return (utime + stime) * (1e9 / 100) // /proc reports clock ticks in USER_HZ, which is 100
}

// ---------------------------------------------------------------------------------------------
// Validation.

/**
 * Checks a tune() argument: an object of known knobs with values the kernel accepts.
 * @returns the given knobs, in write order, with values as the kernel is to be sent them
 * @throws TypeError (ERR_PAGEMERGE_INVALID_ARG) if `knobs` is not an object or a value has the wrong type
 * @throws TypeError (ERR_PAGEMERGE_UNKNOWN_OPTION) for a key that is not a knob, with a hint
 * @throws RangeError (ERR_PAGEMERGE_OUT_OF_RANGE) for a value outside the kernel's range
 */
export function validateKnobs(knobs: unknown): [KnobKey, string][] {
  if (!isOptionsObject(knobs)) {
    throw typeError(ErrorCode.INVALID_ARG, 'knobs must be an object')
  }
  const record = knobs as Record<string, unknown>
  for (const name of Object.keys(record)) {
    if (!Object.hasOwn(KNOBS, name)) throw typeError(ErrorCode.UNKNOWN_OPTION, unknownKnobMessage(name))
  }
  const out: [KnobKey, string][] = []
  const given = (key: KnobKey) => (Object.hasOwn(record, key) ? record[key] : undefined)
  if (given('run') === 2) out.push(['run', '2'])
  for (const key of WRITE_ORDER) {
    const value = given(key)
    if (value === undefined) continue
    const text = checkKnob(key, value)
    if (key !== 'run' || text !== '2') out.push([key, text])
  }
  return out
}

function checkKnob(key: KnobKey, value: unknown): string {
  const rule = KNOBS[key].rule
  const what = `knobs.${key} must be ${describeRule(rule)}`
  if (rule.kind === 'enum') {
    if (typeof value !== typeof rule.values[0] || Number.isNaN(value)) throw typeError(ErrorCode.INVALID_ARG, what) // NaN: a TypeError, as for every knob
    if (!rule.values.includes(value as string | number)) throw rangeError(ErrorCode.OUT_OF_RANGE, what)
    return String(Object.is(value, -0) ? 0 : value)
  }
  if (typeof value !== 'number' || Number.isNaN(value)) throw typeError(ErrorCode.INVALID_ARG, what)
  if (!Number.isInteger(value) || value < rule.min || value > rule.max) throw rangeError(ErrorCode.OUT_OF_RANGE, what)
  return String(value === 0 ? 0 : value)
}

function describeRule(rule: KnobRule): string {
  if (rule.kind === 'enum') return `one of ${rule.values.map((v) => JSON.stringify(v)).join(', ')}`
  if (rule.max === ULONG_SAFE) return rule.min === 0 ? 'a non-negative integer' : `an integer of at least ${rule.min}`
  return `an integer from ${rule.min} to ${rule.max}`
}

function unknownKnobMessage(name: string): string {
  const quoted = JSON.stringify(name)
  const hint = nearestKnob(name)
  if (hint !== undefined) return `unknown knob ${quoted}; did you mean "${hint}"?`
  return `unknown knob ${quoted}; the knobs are ${KNOB_KEYS.join(', ')}`
}

/** The knob that `name` most likely meant: same letters ignoring case and `_`/`-`, else within 2 edits. */
function nearestKnob(name: string): KnobKey | undefined {
  const squash = (s: string) => s.toLowerCase().replace(/[_-]/g, '')
  const exact = KNOB_KEYS.find((k) => squash(k) === squash(name))
  if (exact !== undefined) return exact
  let best: KnobKey | undefined
  let bestDistance = 3
  for (const key of KNOB_KEYS) {
    const d = levenshtein(name, key)
    if (d < bestDistance) [best, bestDistance] = [key, d]
  }
  return best
}

function levenshtein(a: string, b: string): number {
  let row = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const next = [i]
    for (let j = 1; j <= b.length; j++) {
      next.push(Math.min(row[j]! + 1, next[j - 1]! + 1, row[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1)))
    }
    row = next
  }
  return row[b.length]!
}

// ---------------------------------------------------------------------------------------------
// Restoring on exit: one listener for every instance with saved knobs.

const withSaved: KernelKsm[] = []

function restoreAllOnExit(): void {
  // Last saver first: if two instances changed one knob, the first one saved the original.
  for (const kernel of [...withSaved].reverse()) {
    try {
      kernel.restore()
    } catch (err) {
      // Nothing can be thrown from here any more; say it on stderr synchronously.
      writeSync(2, `pagemerge: could not restore a KSM knob at exit: ${(err as Error).message}\n`)
    }
  }
}

function trackSaved(kernel: KernelKsm, saving: boolean): void {
  const at = withSaved.indexOf(kernel)
  if (saving && at < 0) {
    if (withSaved.length === 0) process.on('exit', restoreAllOnExit)
    withSaved.push(kernel)
  } else if (!saving && at >= 0) {
    withSaved.splice(at, 1)
    if (withSaved.length === 0) process.removeListener('exit', restoreAllOnExit)
  }
}

// ---------------------------------------------------------------------------------------------
// The native calls for prctl(PR_SET_MEMORY_MERGE / PR_GET_MEMORY_MERGE).

interface MemoryMergeBinding {
  memoryMerge(): boolean
  setMemoryMerge(on: boolean): void
}

function memoryMergeBinding(): MemoryMergeBinding {
  const native = loadNative() as NativeBinding & Partial<MemoryMergeBinding>
  if (typeof native.setMemoryMerge !== 'function' || typeof native.memoryMerge !== 'function') {
    throw error(
      ErrorCode.ADDON_LOAD,
      'the loaded pagemerge addon has no memoryMerge/setMemoryMerge: rebuild it (npx node-gyp rebuild)',
    )
  }
  return native as MemoryMergeBinding
}

// ---------------------------------------------------------------------------------------------

/**
 * Reads and tunes the kernel's ksmd, and remembers what it changed so that it can put it back.
 * Writing needs root (or a sysfs writable by the caller); reading does not.
 */
export class KernelKsm {
  readonly #sysfs: string
  readonly #procSelf: string
  readonly #proc: string
  /** sysfs file → the value it had before this instance first wrote it, in order of first change. */
  readonly #saved = new Map<string, string>()
  #ksmdPid: number | undefined

  constructor(options: KernelKsmOptions = {}) {
    if (typeof options !== 'object' || options === null) throw typeError(ErrorCode.INVALID_ARG, 'options must be an object')
    for (const key of ['sysfs', 'procSelf', 'proc'] as const) {
      const value = options[key]
      if (value !== undefined && typeof value !== 'string') {
        throw typeError(ErrorCode.INVALID_ARG, `options.${key} must be a string`)
      }
    }
    this.#sysfs = options.sysfs ?? KSM_SYSFS
    this.#procSelf = options.procSelf ?? '/proc/self'
    this.#proc = options.proc ?? '/proc'
  }

  /** Everything the kernel says about KSM now: knobs, counters, this process, ksmd. */
  status(): KernelStatus {
    const raw = readSysfsDir(this.#sysfs)
    const ksmStatText = readText(join(this.#procSelf, 'ksm_stat'))
    const mergingPages = parseKernelInt(readText(join(this.#procSelf, 'ksm_merging_pages')))
    const proc: KernelStatus['process'] = {}
    if (ksmStatText !== undefined) proc.ksmStat = parseKsmStat(ksmStatText)
    if (mergingPages !== undefined) proc.mergingPages = mergingPages
    const status: KernelStatus = raw
      ? { available: true, knobs: parseKnobs(raw), stats: parseStats(raw), raw, process: proc }
      : {
          available: false,
          reason: `${this.#sysfs} does not exist: this kernel was built without CONFIG_KSM`,
          knobs: {},
          stats: {},
          raw: {},
          process: proc,
        }
    const ksmd = this.#ksmd()
    if (ksmd) status.ksmd = ksmd
    return status
  }

  /** ksmd's run state and progress counters, read from three files: cheap enough to poll. */
  counters(): KsmCounters {
    const read = (file: string) => parseKernelInt(readText(join(this.#sysfs, file)))
    const run = read('run')
    const out: KsmCounters = { fullScans: read('full_scans') ?? 0, pagesScanned: read('pages_scanned') ?? 0 }
    if (run === 0 || run === 1 || run === 2) out.run = run
    return out
  }

  /** This process's KSM counters (/proc/self/ksm_stat): one small file, cheap enough to poll. */
  processCounters(): ProcessKsm {
    const stat = readText(join(this.#procSelf, 'ksm_stat'))
    return parseProcessKsm(stat, stat === undefined ? readText(join(this.#procSelf, 'ksm_merging_pages')) : undefined)
  }

  /**
   * Sets ksmd's knobs. Every value is checked first, against the ranges the kernel itself
   * enforces, and nothing is written if any is wrong. The first time this instance writes a knob
   * it saves the previous value for {@link restore}. If the kernel refuses a write, the knobs
   * this call already wrote are put back and the kernel's error is thrown.
   * @throws TypeError / RangeError (ERR_PAGEMERGE_INVALID_ARG, ERR_PAGEMERGE_UNKNOWN_OPTION,
   *   ERR_PAGEMERGE_OUT_OF_RANGE) for bad input
   * @throws Error (ERR_PAGEMERGE_UNSUPPORTED) if this kernel lacks KSM or one of the knobs
   * @throws Error (ERR_PAGEMERGE_BUSY) for pagesToScan while advisorMode is 'scan-time'
   * @throws a system error (code 'EACCES', 'EPERM', 'EROFS', 'EINVAL', 'EBUSY', ...) if the kernel refuses
   */
  tune(knobs: KsmKnobs): void {
    const writes = validateKnobs(knobs)
    if (writes.length === 0) return
    for (const [key] of writes) {
      const file = join(this.#sysfs, KNOBS[key].file)
      if (!isFile(file)) {
        throw error(
          ErrorCode.UNSUPPORTED,
          isDir(this.#sysfs)
            ? `this kernel has no ${file}, so knobs.${key} cannot be set`
            : `${this.#sysfs} does not exist: this kernel was built without CONFIG_KSM`,
        )
      }
    }
    const advisor = writes.find(([key]) => key === 'advisorMode')?.[1] ?? this.#currentAdvisor()
    if (advisor === 'scan-time' && writes.some(([key]) => key === 'pagesToScan')) {
      throw error(
        ErrorCode.BUSY,
        "knobs.pagesToScan cannot be set while advisorMode is 'scan-time': the advisor sets it (set advisorMode 'none' too)",
      )
    }

    const before = new Map(this.#saved) // to forget what this call saved if it is rolled back
    const done: [file: string, previous: string][] = []
    try {
      for (const [key, value] of writes) {
        const file = KNOBS[key].file
        // Changing advisor_mode resets pages_to_scan, so that counts as changing it too.
        const touched = key === 'advisorMode' ? ['pages_to_scan', file] : [file]
        const previous = touched.map((name) => [name, this.#readWritable(name)] as const)
        this.#write(file, value) // a refused write changed nothing, so only now is anything recorded
        for (const [name, was] of previous) {
          if (was === undefined) continue
          if (!this.#saved.has(name)) this.#saved.set(name, was)
          done.push([name, was])
        }
      }
    } catch (err) {
      for (const [file, previous] of done.reverse()) {
        try {
          this.#writeBack(file, previous)
        } catch {
          // The first error is the one to report; restore() will try again from #saved.
          continue
        }
        if (!before.has(file)) this.#saved.delete(file)
      }
      trackSaved(this, this.#saved.size > 0)
      throw err
    }
    trackSaved(this, this.#saved.size > 0)
  }

  /**
   * Writes back every knob this instance changed, most recent first change first, to the value it
   * had before. A second call does nothing. Also runs on process 'exit' while anything is saved;
   * it does not run on signals, so call it from your own SIGINT/SIGTERM handler if you want that.
   * A knob the kernel refuses (EBUSY while pages are shared) stays saved for a later call, and the
   * first such error is thrown after every other knob has been restored.
   */
  restore(): void {
    let first: unknown
    for (const [file, previous] of [...this.#saved].reverse()) {
      try {
        this.#writeBack(file, previous)
        this.#saved.delete(file)
      } catch (err) {
        first ??= err
      }
    }
    trackSaved(this, this.#saved.size > 0)
    if (first !== undefined) throw first
  }

  /** The values restore() would write back, by knob: what the kernel had before this instance changed it. */
  saved(): KsmKnobs {
    const raw: Record<string, string> = {}
    for (const [file, value] of this.#saved) raw[file] = value
    return parseKnobs(raw)
  }

  /**
   * prctl(PR_SET_MEMORY_MERGE): with `on`, every anonymous mapping of this process, now and
   * later, becomes mergeable by ksmd (which must be running: `tune({ run: 1 })`). Off unmerges every
   * page of the process. The setting is inherited across fork and exec. Needs CAP_SYS_RESOURCE
   * (EPERM otherwise) and Linux 6.4 (EINVAL before).
   */
  mergeAny(on: boolean): void {
    if (typeof on !== 'boolean') throw typeError(ErrorCode.INVALID_ARG, 'on must be a boolean')
    memoryMergeBinding().setMemoryMerge(on)
  }

  /** prctl(PR_GET_MEMORY_MERGE): whether mergeAny is on. false on kernels without it (EINVAL). */
  mergeAnyEnabled(): boolean {
    try {
      return memoryMergeBinding().memoryMerge()
    } catch (err) {
      if ((err as CodedError).code === 'EINVAL') return false
      throw err
    }
  }

  #ksmd(): { pid: number; cpuNs: number } | undefined {
    if (this.#ksmdPid === undefined || readText(join(this.#proc, String(this.#ksmdPid), 'comm')) !== 'ksmd') {
      this.#ksmdPid = findKsmd(this.#proc)
    }
    if (this.#ksmdPid === undefined) return undefined
    const cpuNs = taskCpuNs(this.#proc, this.#ksmdPid)
    return cpuNs === undefined ? undefined : { pid: this.#ksmdPid, cpuNs }
  }

  #currentAdvisor(): string | undefined {
    return parseSelected(readText(join(this.#sysfs, 'advisor_mode')))
  }

  /** A knob's current value in the form it is written back in, or undefined if it has no such file. */
  #readWritable(file: string): string | undefined {
    const text = readText(join(this.#sysfs, file))
    return file === 'advisor_mode' ? parseSelected(text) : text
  }

  /** Like #write, but a saved pages_to_scan is left to the advisor if it is running again. */
  #writeBack(file: string, value: string): void {
    if (file === 'pages_to_scan' && this.#currentAdvisor() === 'scan-time') return
    this.#write(file, value)
  }

  #write(file: string, value: string): void {
    const path = join(this.#sysfs, file)
    try {
      writeFileSync(path, value)
    } catch (err) {
      const e = err as NodeJS.ErrnoException
      if (typeof e.errno !== 'number') throw err
      throw Object.assign(systemError(e.errno, e.syscall ?? 'write', `cannot write ${value} to ${path}`), { path })
    }
  }
}

function isFile(path: string): boolean {
  try {
    return statSync(path).isFile()
  } catch {
    return false
  }
}

function isDir(path: string): boolean {
  try {
    return statSync(path).isDirectory()
  } catch {
    return false
  }
}

/**
 * Whether the kernel's ksmd can be used here. `ok` is false only without KSM in the kernel;
 * `canTune` says whether this process may write the knobs; `reason` says what stands in the way
 * (no KSM, no permission to tune, or ksmd not running).
 */
export function kernelKsmAvailable(options: { sysfs?: string } = {}): { ok: boolean; reason?: string; canTune: boolean } {
  const dir = options.sysfs ?? KSM_SYSFS
  if (!isDir(dir)) {
    return { ok: false, canTune: false, reason: `${dir} does not exist: this kernel was built without CONFIG_KSM` }
  }
  const reasons: string[] = []
  let canTune = true
  try {
    accessSync(join(dir, 'run'), fsConstants.W_OK)
  } catch (err) {
    canTune = false
    const code = (err as NodeJS.ErrnoException).code
    reasons.push(
      code === 'EROFS'
        ? `${dir} is mounted read-only (EROFS): the knobs cannot be tuned`
        : `writing ${dir} needs root (${code ?? 'denied'}): the knobs cannot be tuned`,
    )
  }
  const run = parseKernelInt(readText(join(dir, 'run')))
  if (run !== 1) {
    reasons.push(
      run === undefined
        ? `${dir}/run cannot be read`
        : `ksmd is not running (run=${run}); tune({ run: 1 }) starts it`,
    )
  }
  const out: { ok: boolean; reason?: string; canTune: boolean } = { ok: true, canTune }
  if (reasons.length > 0) out.reason = reasons.join('; ')
  return out
}
