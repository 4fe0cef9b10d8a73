/**
 * PageMerger options: typed, defaulted in one place, and checked up front. Wrong types throw a
 * TypeError, out-of-range values a RangeError, both with code ERR_PAGEMERGE_INVALID_OPTION and the
 * message form `options.<key> must be <what>`; unknown keys throw ERR_PAGEMERGE_UNKNOWN_OPTION.
 */
import { availableParallelism } from 'node:os'
import { defaultMapBudget } from './budget'
import { ErrorCode, isOptionsObject, rangeError, typeError } from './errors'

/** Options for a PageMerger. Every field is optional; `undefined` means the default. */
export interface PageMergerOptions {
  /**
   * Worker threads that hash and compare pages.
   * An integer from 1 to 256.
   * @defaultValue `Math.max(1, os.availableParallelism() - 1)`, at most 256
   */
  workers?: number
  /**
   * Pages scanned per batch, like `/sys/kernel/mm/ksm/pages_to_scan`.
   * An integer from 1 to 4294967295 (the kernel's unsigned int).
   * @defaultValue 100
   */
  pagesToScan?: number
  /**
   * Milliseconds to sleep between batches in background mode, like `/sys/kernel/mm/ksm/sleep_millisecs`.
   * An integer from 0 to 2147483647 (the longest delay `setTimeout` honours).
   * @defaultValue 20
   */
  sleepMillisecs?: number
  /**
   * Most buffers' pages that may share one physical page, like `/sys/kernel/mm/ksm/max_page_sharing`.
   * An integer from 2 to 65535 (the kernel allows more; sharer counts are kept in 16 bits, and
   * a stable page shared 65535 times is already far past the default).
   * @defaultValue 256
   */
  maxPageSharing?: number
  /**
   * Whether all-zero pages are dropped so that reads see the kernel's zero page, rather than
   * merged like other pages, like `/sys/kernel/mm/ksm/use_zero_pages`.
   * @defaultValue true
   */
  useZeroPages?: boolean
  /**
   * Ceiling on the process's kernel mappings (VMAs); a merge that could exceed it is refused.
   * A positive integer.
   * @defaultValue `defaultMapBudget()`: half the headroom under `vm.max_map_count` at start-up
   */
  mapBudget?: number
  /**
   * Whether pages may merge with pages of other domains (the per-buffer key given to `alloc`).
   * Off by default because a copy-on-write fault tells a writer its content existed elsewhere.
   * @defaultValue false
   */
  mergeAcrossDomains?: boolean
  /**
   * Who merges: `'userspace'` (pagemerge's own scanner, no root, no knobs), `'kernel'` (buffers
   * are private memory marked `MADV_MERGEABLE` for the kernel's ksmd, tuned with `pm.kernel`), or
   * `'auto'` (private memory that pagemerge merges itself, also marked `MADV_MERGEABLE` so that
   * ksmd, where it runs, takes what the mapping budget leaves). Fixed at construction.
   * @defaultValue `'userspace'`
   */
  engine?: Engine
}

/** Who merges the pages: see {@link PageMergerOptions.engine}. */
export type Engine = 'userspace' | 'kernel' | 'auto'


/** Options with every default filled in, as `resolveOptions` returns them (frozen). */
export type ResolvedOptions = Required<PageMergerOptions>

/** The largest maxPageSharing: sharer counts are kept in 16 bits (lib/tables.ts). */
export const MAX_PAGE_SHARING = 0xffff

type Key = keyof ResolvedOptions

type Rule =
  | { readonly kind: 'integer'; readonly min: number; readonly max: number }
  | { readonly kind: 'boolean' }
  | { readonly kind: 'oneOf'; readonly values: readonly string[] }

const INT32_MAX = 2 ** 31 - 1
const UINT32_MAX = 2 ** 32 - 1
const MAX_WORKERS = 256

/** What each option must be. The order here is the order of keys in resolved options. */
const RULES: { readonly [K in Key]: Rule } = {
  workers: { kind: 'integer', min: 1, max: MAX_WORKERS },
  pagesToScan: { kind: 'integer', min: 1, max: UINT32_MAX },
  sleepMillisecs: { kind: 'integer', min: 0, max: INT32_MAX },
  maxPageSharing: { kind: 'integer', min: 2, max: MAX_PAGE_SHARING },
  useZeroPages: { kind: 'boolean' },
  mapBudget: { kind: 'integer', min: 1, max: Number.MAX_SAFE_INTEGER },
  mergeAcrossDomains: { kind: 'boolean' },
  engine: { kind: 'oneOf', values: ['userspace', 'kernel', 'auto'] },
}

/** The defaults, as thunks: some are computed, and mapBudget's loads the addon only when needed. */
const DEFAULTS: { readonly [K in Key]: () => ResolvedOptions[K] } = {
  workers: () => Math.min(MAX_WORKERS, Math.max(1, availableParallelism() - 1)),
  pagesToScan: () => 100,
  sleepMillisecs: () => 20,
  maxPageSharing: () => 256,
  useZeroPages: () => true,
  mapBudget: () => defaultMapBudget(),
  mergeAcrossDomains: () => false,
  engine: () => 'userspace',
}

const KEYS = Object.keys(RULES) as Key[]

/**
 * Checks options and fills in the defaults.
 * @param input - a PageMergerOptions object, or `undefined` for all defaults
 * @returns a new frozen object with every option set
 * @throws TypeError (ERR_PAGEMERGE_INVALID_OPTION) if `input` is not an object or a value has the wrong type
 * @throws TypeError (ERR_PAGEMERGE_UNKNOWN_OPTION) if a key is not an option
 * @throws RangeError (ERR_PAGEMERGE_INVALID_OPTION) if a value is out of range
 */
export function resolveOptions(input?: unknown): ResolvedOptions {
  return merge(input, (key) => DEFAULTS[key]())
}

/**
 * Checks the options given to `setOptions` and merges them over `current`. Keys left out or
 * `undefined` keep their current value. State-dependent rules are the caller's to apply.
 * @returns a new frozen object; `current` is not changed
 * @throws as {@link resolveOptions}
 */
export function validatePartial(current: ResolvedOptions, partial: unknown): ResolvedOptions {
  return merge(partial, (key) => current[key])
}

function merge(input: unknown, fallback: (key: Key) => unknown): ResolvedOptions {
  const given = ownOptions(input)
  const out: Record<string, unknown> = {}
  for (const key of KEYS) {
    const value = given[key]
    out[key] = value === undefined ? fallback(key) : check(key, value)
  }
  return Object.freeze(out) as ResolvedOptions
}

/** Reads the own keys of `input`, rejecting non-objects and unknown keys before any value is judged. */
function ownOptions(input: unknown): Partial<Record<Key, unknown>> {
  if (input === undefined) return {}
  if (!isOptionsObject(input)) {
    throw typeError(ErrorCode.INVALID_OPTION, 'options must be an object')
  }
  const record = input as Record<string, unknown>
  for (const name of Object.keys(record)) {
    if (!Object.hasOwn(RULES, name)) throw typeError(ErrorCode.UNKNOWN_OPTION, unknownMessage(name))
  }
  const given: Partial<Record<Key, unknown>> = {}
  // Own properties only, so nothing set on Object.prototype leaks in as an option.
  for (const key of KEYS) if (Object.hasOwn(record, key)) given[key] = record[key]
  return given
}

function check(key: Key, value: unknown): unknown {
  const rule = RULES[key]
  const message = () => `options.${key} must be ${describe(rule)}`
  if (rule.kind === 'boolean') {
    if (typeof value !== 'boolean') throw typeError(ErrorCode.INVALID_OPTION, message())
    return value
  }
  if (rule.kind === 'oneOf') {
    if (typeof value !== 'string') throw typeError(ErrorCode.INVALID_OPTION, message())
    if (!rule.values.includes(value)) throw rangeError(ErrorCode.INVALID_OPTION, message())
    return value
  }
  if (typeof value !== 'number' || Number.isNaN(value)) throw typeError(ErrorCode.INVALID_OPTION, message())
  if (!Number.isInteger(value) || value < rule.min || value > rule.max) {
    throw rangeError(ErrorCode.INVALID_OPTION, message())
  }
  return value === 0 ? 0 : value // -0 becomes 0
}

function describe(rule: Rule): string {
  if (rule.kind === 'boolean') return 'a boolean'
  if (rule.kind === 'oneOf') return `one of ${rule.values.map((v) => `'${v}'`).join(', ')}`
  if (rule.max === Number.MAX_SAFE_INTEGER) {
    if (rule.min === 0) return 'a non-negative integer'
    if (rule.min === 1) return 'a positive integer'
    return `an integer of at least ${rule.min}`
  }
  return `an integer from ${rule.min} to ${rule.max}`
}

function unknownMessage(name: string): string {
  const hint = closestKey(name)
  const quoted = JSON.stringify(name)
  if (hint !== undefined) return `unknown option ${quoted}; did you mean "${hint}"?`
  return `unknown option ${quoted}; the known options are ${KEYS.join(', ')}`
}

/** The known key matching `name` case-insensitively, else the nearest within edit distance 2. */
function closestKey(name: string): Key | undefined {
  const lower = name.toLowerCase()
  const exact = KEYS.find((key) => key.toLowerCase() === lower)
  if (exact !== undefined) return exact
  let best: Key | undefined
  let bestDistance = 3
  for (const key of KEYS) {
    const distance = editDistance(name, key, bestDistance)
    if (distance < bestDistance) {
      best = key
      bestDistance = distance
    }
  }
  return best
}

/** Levenshtein distance, or `limit` when it is at least `limit`. */
function editDistance(a: string, b: string, limit: number): number {
  if (Math.abs(a.length - b.length) >= limit) return limit
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const row = [i]
    let rowMin = i
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1
      const d = Math.min(previous[j]! + 1, row[j - 1]! + 1, previous[j - 1]! + cost)
      row.push(d)
      rowMin = Math.min(rowMin, d)
    }
    if (rowMin >= limit) return limit
    previous = row
  }
  return Math.min(previous[b.length]!, limit)
}
