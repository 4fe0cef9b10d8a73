/**
 * What the benchmarks share: seeded bytes, timing, medians of runs, collecting buffers between
 * measurements, the machine line and the results table (goal and PASS/MISS columns).
 */
import { cpus, release, totalmem } from 'node:os'
import { readFileSync } from 'node:fs'
import { loadNative, PAGE_SIZE, type NativeArena } from '../lib/native'

export const MiB = 1024 * 1024
export const GiB = 1024 * MiB
export const GB = 1e9

export const pagesOf = (bytes: number) => bytes / PAGE_SIZE

/** An integer option (`--name`) from `min` to `max`, or a RangeError that says so. */
export function integerOption(name: string, value: string | undefined, min: number, max: number): number {
  const n = Number(value)
  if (value === undefined || !Number.isInteger(n) || n < min || n > max) throw new RangeError(`--${name} must be an integer from ${min} to ${max}`)
  return n
}

const gc = (globalThis as { gc?: () => void }).gc

/**
 * Runs full GCs, 10 ms apart (backing stores are freed on V8's sweeper), until `done()` holds
 * or 500 tries have passed; returns `done()`. `script` names the npm script for the error
 * without --expose-gc.
 */
export async function gcUntil(done: () => boolean, script: string): Promise<boolean> {
  if (!gc) throw new Error(`run with node --expose-gc (npm run ${script} does)`)
  for (let i = 0; i < 500 && !done(); i++) {
    gc()
    await new Promise((r) => setTimeout(r, 10))
  }
  return done()
}

/** Runs `rounds` full GCs, 10 ms apart: what an earlier measurement left behind is gone before the next one reads the OS's counters. */
export async function gcRounds(rounds: number, script: string): Promise<void> {
  let left = rounds
  await gcUntil(() => left-- <= 0, script)
}

/**
 * Whether page `i`'s hash differs between `a` and `b`, compared as two 32-bit words: reading a
 * BigUint64Array element allocates a BigInt, two per page checked, and that garbage (12 MiB over
 * 1 GiB) grew V8's young generation by 8 MiB in the bench's process, counted against the merge.
 */
export function hashDiffers(a: Uint32Array, b: Uint32Array, i: number): boolean {
  return a[2 * i] !== b[2 * i] || a[2 * i + 1] !== b[2 * i + 1]
}

/** A BigUint64Array of hashes as 32-bit words, for hashDiffers(). */
export function hashWords(h: BigUint64Array): Uint32Array {
  return new Uint32Array(h.buffer, h.byteOffset, 2 * h.length)
}

/** Pages whose hashes differ between `a` and `b` (of the same length). */
export function mismatchedHashes(a: BigUint64Array, b: BigUint64Array): number {
  const wa = hashWords(a), wb = hashWords(b)
  let n = 0
  for (let i = 0; i < a.length; i++) if (hashDiffers(wa, wb, i)) n++
  return n
}

/** Milliseconds `f` takes, by the monotonic clock. */
export function time(f: () => void): number {
  const start = process.hrtime.bigint()
  f()
  return Number(process.hrtime.bigint() - start) / 1e6
}

/** Milliseconds of CPU (user + system, all threads) `f` takes: far below wall time means the machine was busy. */
export function cpuTime(f: () => void): number {
  const start = process.cpuUsage()
  f()
  const d = process.cpuUsage(start)
  return (d.user + d.system) / 1e3
}

/** Seeded xorshift32 words: the same seed gives the same bytes on every run and machine. */
export function fillRandom<T extends Uint8Array>(bytes: T, seed: number): T {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >>> 2)
  let x = seed >>> 0 || 1
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    words[i] = x >>> 0
  }
  return bytes
}

/**
 * The limit's buffer: `bytes` of the arena's shared kind (a memfd window, as pm.alloc gives)
 * whose two halves hold the same seeded random bytes.
 */
export function limitBuffer(arena: NativeArena, bytes: number): Uint8Array {
  const limit = new Uint8Array(arena.alloc(bytes, true))
  fillRandom(limit.subarray(0, bytes / 2), 1)
  limit.copyWithin(bytes / 2, 0, bytes / 2)
  return limit
}

/**
 * Milliseconds to read `pages` pages of each half of a limitBuffer once: memcmp (`comparePages`)
 * reads every byte of both, from two distinct address ranges (nothing to short-circuit), writes
 * nothing and maps nothing: a pure read pass of 2 x `pages` pages on one core.
 */
export function readHalves(limit: Uint8Array, pages: number): number {
  let r = 0
  const ms = time(() => (r = loadNative().comparePages(limit, 0, limit, pagesOf(limit.byteLength) / 2, pages)))
  if (r !== 0) throw new Error('the halves of the limit buffer differ')
  return ms
}

/** Samples of one measurement; `median` is what the table and the goals use. */
export class Series {
  readonly samples: number[] = []
  push(v: number): void {
    this.samples.push(v)
  }
  get median(): number {
    const s = [...this.samples].sort((x, y) => x - y)
    const mid = s.length >> 1
    return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2
  }
  get min(): number {
    return Math.min(...this.samples)
  }
  get max(): number {
    return Math.max(...this.samples)
  }
}

/** The median of plain numbers (NaN for none). */
export function median(values: number[]): number {
  if (values.length === 0) return NaN
  const s = new Series()
  for (const v of values) s.push(v)
  return s.median
}

export const series = () => new Series()

/** Every series as `{ median, samples }`, for --json. */
export function seriesJson(m: Record<string, Series>): Record<string, { median: number; samples: number[] }> {
  return Object.fromEntries(Object.entries(m).map(([k, s]) => [k, { median: s.median, samples: s.samples }]))
}

export function machine() {
  const thp = (f: string) => {
    try {
      return /\[(\w+)\]/.exec(readFileSync(`/sys/kernel/mm/transparent_hugepage/${f}`, 'utf8'))?.[1] ?? '?'
    } catch {
      return '?'
    }
  }
  return {
    cpu: cpus()[0]?.model ?? '?',
    cpus: cpus().length,
    memGiB: Math.round(totalmem() / GiB),
    kernel: release(),
    node: process.version,
    thp: thp('enabled'),
    shmemThp: thp('shmem_enabled'),
    maxMapCount: loadNative().maxMapCount(),
  }
}

/** The line under a bench's title: what the numbers were measured on. */
export function machineLine(): string {
  const mc = machine()
  return `${mc.cpu}, ${mc.cpus} CPUs, ${mc.memGiB} GiB, Linux ${mc.kernel}, Node ${mc.node}, THP ${mc.thp}, shmem THP ${mc.shmemThp}`
}

export interface Row {
  name: string
  value: string
  samples: string
  goal?: string
  /** PASS or MISS; `undefined` leaves the result empty, a string is printed as it is. */
  pass?: boolean | string
}

/** The results table: measurement, median, each run's sample, goal, result. */
export function printTable(rows: Row[]): void {
  const w = [Math.max(...rows.map((r) => r.name.length)), Math.max(...rows.map((r) => r.value.length)), Math.max(...rows.map((r) => r.samples.length)), Math.max(...rows.map((r) => (r.goal ?? '').length))]
  const line = (c: string[]) => c.map((s, i) => (i < w.length ? s.padEnd(w[i]!) : s)).join('  ').trimEnd()
  console.log(line(['measurement', 'median', 'runs', 'goal', 'result']))
  console.log(line(w.map((n) => '-'.repeat(n)).concat('------')))
  for (const r of rows) console.log(line([r.name, r.value, r.samples, r.goal ?? '', r.pass === undefined ? '' : r.pass === true ? 'PASS' : r.pass === false ? 'MISS' : r.pass]))
}

/**
 * A table of columns: a header row, a rule, then rows, each column padded to its widest cell
 * (numbers read best right-aligned: `right[i]`).
 */
export function printGrid(header: string[], rows: string[][], right: boolean[] = [], out: (line: string) => void = console.log): void {
  const w = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)))
  const line = (c: string[]) => c.map((s, i) => (right[i] ? s.padStart(w[i]!) : s.padEnd(w[i]!))).join('  ').trimEnd()
  out(line(header))
  out(line(w.map((n) => '-'.repeat(n))))
  for (const r of rows) out(line(header.map((_, i) => r[i] ?? '')))
}

/** Every `key value` line of /proc/<pid>/ksm_stat (ksm_rmap_items, ksm_merging_pages, ksm_zero_pages, ksm_process_profit, ...) as numbers; `{}` where the kernel has none. */
export function ksmStat(pid: number | 'self' = 'self'): Record<string, number> {
  const out: Record<string, number> = {}
  let text: string
  try {
    text = readFileSync(`/proc/${pid}/ksm_stat`, 'utf8')
  } catch {
    return out
  }
  for (const m of text.matchAll(/^(\w+)\s+(-?\d+)$/gm)) out[m[1]!] = Number(m[2])
  return out
}

/** Nanoseconds the calling thread has run on a CPU (/proc/thread-self/schedstat): one thread's CPU, which process.cpuUsage() cannot give. */
export function threadCpuNs(): number {
  return Number(readFileSync('/proc/thread-self/schedstat', 'utf8').split(' ')[0])
}

/**
 * A status line on stderr: rewritten in place on a terminal; elsewhere only the lines given to
 * `log()` are printed, so that logs stay readable.
 */
export function progressLine(): { update(text: string): void; log(text: string): void; clear(): void } {
  const tty = process.stderr.isTTY === true
  let shown = false
  return {
    update(text) {
      if (!tty) return
      process.stderr.write(`\r${text.slice(0, (process.stderr.columns || 120) - 1)}\x1b[K`)
      shown = true
    },
    log(text) {
      if (tty && shown) process.stderr.write('\r\x1b[K')
      process.stderr.write(`${text}\n`)
      shown = false
    },
    clear() {
      if (tty && shown) process.stderr.write('\r\x1b[K')
      shown = false
    },
  }
}
