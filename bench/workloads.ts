/**
 * The workloads of WORKLOADS.md, filled from seeded generators so that every contender (each in
 * its own process) sees the same bytes. A contender passes in how it allocates (pm.alloc, or
 * private anonymous memory for ksmd); the workload fills the buffers, hashes every page as
 * written, and works out its ideal from those hashes.
 */
import { closeSync, existsSync, openSync, readdirSync, readSync, statSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { loadNative, PAGE_SIZE } from '../lib/native'
import { sharedBytes } from '../lib/tables'
import { fillRandom, MiB } from './common'

export const WORKLOAD_NAMES = ['clones', 'scattered', 'sparse', 'files', 'volatile'] as const
export type WorkloadName = (typeof WORKLOAD_NAMES)[number]

/** Each clones blob: 32 MiB of random bytes, present in two buffers. */
export const BLOB = 32 * MiB
/** `scattered`: the even pages are drawn from this many fixed contents. */
export const SCATTERED_CONTENTS = 1000
/** `files`: tenants that each load the tree. */
export const TENANTS = 4
/** `volatile`: page p of a buffer is rewritten by the application when p % VOLATILE_EVERY === VOLATILE_EVERY - 1. */
export const VOLATILE_EVERY = 4
/** Buffers of `sparse`. */
const SPARSE_BUFFER = 32 * MiB

/** Seeds: one per workload, so that two workloads never share contents by accident. */
const SEED = { clones: 0x1000, scatteredFixed: 0x200000, scatteredUnique: 0x300001, sparse: 0x400001, volatile: 0x5eed } as const

/** Allocates `bytes` of page-aligned memory and returns a view of all its pages (from byte 0). */
export type Allocate = (bytes: number) => Uint8Array

export interface Ideal {
  /** Pages that can be given back: per content, every copy after the first; every all-zero page. */
  freedPages: number
  /** Pages that end up mapping a shared page or the zero page (what ksmd's ksm_merging_pages + ksm_zero_pages reach). */
  mergingPages: number
  /** Pages whose ideal the workload designed (WORKLOADS.md), to check the generator against; absent for `files`. */
  designedFreedPages?: number
}

export interface Loaded {
  name: WorkloadName
  /** Every buffer, as views of whole pages from byte 0. */
  buffers: Uint8Array[]
  pages: number
  /** xxh3-64 of every page as written, buffer after buffer. */
  expected: BigUint64Array
  ideal: Ideal
  /** `files`: what was loaded. */
  files?: { root: string; files: number; bytes: number; tenants: number }
}

export interface WorkloadOptions {
  /** `files`: the tree to load (default: this package's node_modules). */
  filesRoot?: string
}

const native = () => loadNative()

/** Bytes of whole pages. */
export const roundUp = (bytes: number) => Math.ceil(bytes / PAGE_SIZE) * PAGE_SIZE

/**
 * Fills buffers for `name` with about `bytes` (for `files`: at most `bytes`, the tree's size
 * otherwise). `bytes` must be a multiple of 64 MiB except for `files`.
 */
export function loadWorkload(name: WorkloadName, bytes: number, allocate: Allocate, options: WorkloadOptions = {}): Loaded {
  const buffers: Uint8Array[] = []
  let designed: number | undefined
  let files: Loaded['files']
  const pages = bytes / PAGE_SIZE
  switch (name) {
    case 'clones':
    case 'volatile':
      fillClones(buffers, bytes, allocate)
      designed = name === 'clones' ? pages / 2 : (pages - pages / VOLATILE_EVERY) / 2
      break
    case 'scattered':
      buffers.push(fillScattered(allocate(bytes)))
      designed = pages / 2 - SCATTERED_CONTENTS
      break
    case 'sparse':
      for (let i = 0; i < bytes / SPARSE_BUFFER; i++) buffers.push(fillSparse(allocate(SPARSE_BUFFER), SEED.sparse + i))
      designed = (pages * 3) / 4
      break
    case 'files':
      files = loadFiles(buffers, bytes, allocate, options.filesRoot ?? defaultFilesRoot())
      break
  }
  const total = buffers.reduce((n, b) => n + b.byteLength / PAGE_SIZE, 0)
  const expected = new BigUint64Array(sharedBytes(8 * total))
  hashBuffers(buffers, expected)
  const ideal = idealOf(expected, name === 'volatile' ? volatileMask(buffers) : undefined)
  if (designed !== undefined) {
    ideal.designedFreedPages = designed
    if (ideal.freedPages !== designed) throw new Error(`${name}: the generator gives ${ideal.freedPages} duplicate pages, the design ${designed}`)
  }
  return { name, buffers, pages: total, expected, ideal, ...(files ? { files } : {}) }
}

/** Every page's xxh3-64 into `out`, buffer after buffer: reads every byte (and maps in pages a merge left unmapped). */
export function hashBuffers(buffers: Uint8Array[], out: BigUint64Array): void {
  let at = 0
  for (const b of buffers) {
    const n = b.byteLength / PAGE_SIZE
    native().hashPages(b, 0, n, out, at)
    at += n
  }
}

/**
 * The ideal from the pages' hashes (a 64-bit hash collision among a few million pages is not a
 * concern here): per content, every copy after the first can go; every zero page can go.
 * Pages outside `mask` (rewritten by the application) count as unique.
 */
function idealOf(hashes: BigUint64Array, mask?: Uint8Array): Ideal {
  const zero = native().ZERO_PAGE_HASH
  const counts = new Map<bigint, number>()
  let zeroPages = 0
  for (let i = 0; i < hashes.length; i++) {
    if (mask && !mask[i]) continue
    const h = hashes[i]!
    if (h === zero) zeroPages++
    else counts.set(h, (counts.get(h) ?? 0) + 1)
  }
  let freed = zeroPages, merging = zeroPages
  for (const c of counts.values()) if (c > 1) (freed += c - 1), (merging += c)
  return { freedPages: freed, mergingPages: merging }
}

// ---- clones and volatile ----

function fillClones(buffers: Uint8Array[], bytes: number, allocate: Allocate): void {
  if (bytes % (2 * BLOB)) throw new RangeError(`clones needs a multiple of ${(2 * BLOB) / MiB} MiB`)
  for (let i = 0; i < bytes / (2 * BLOB); i++) {
    const a = fillRandom(allocate(BLOB), SEED.clones + i)
    const b = allocate(BLOB)
    b.set(a)
    buffers.push(a, b)
  }
}

/** 1 for the pages that keep their contents in `volatile`, 0 for those the application rewrites. */
export function volatileMask(buffers: Uint8Array[]): Uint8Array {
  const total = buffers.reduce((n, b) => n + b.byteLength / PAGE_SIZE, 0)
  const mask = new Uint8Array(sharedBytes(total)).fill(1)
  let at = 0
  for (const b of buffers) {
    const n = b.byteLength / PAGE_SIZE
    for (let p = VOLATILE_EVERY - 1; p < n; p += VOLATILE_EVERY) mask[at + p] = 0
    at += n
  }
  return mask
}

/** A nonzero 32-bit seed for version `version` of page `page` of buffer `buffer` (murmur3's finalizer over the three). */
export function pageSeed(buffer: number, page: number, version: number): number {
  let h = (SEED.volatile ^ Math.imul(buffer + 1, 0x9e3779b1) ^ Math.imul(page + 1, 0x85ebca6b) ^ Math.imul(version + 1, 0xc2b2ae35)) >>> 0
  h ^= h >>> 16
  h = Math.imul(h, 0x85ebca6b)
  h ^= h >>> 13
  h = Math.imul(h, 0xc2b2ae35)
  h ^= h >>> 16
  return h >>> 0 || 1
}

/** Writes one page of seeded xorshift32 words at `words[first .. first + 1024)`. */
export function writePage(words: Uint32Array, first: number, seed: number): void {
  let x = seed >>> 0 || 1
  for (let i = first, end = first + PAGE_SIZE / 4; i < end; i++) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    words[i] = x >>> 0
  }
}

// ---- scattered ----

/** Even pages: one of SCATTERED_CONTENTS fixed contents, chosen by a hash of the page number; odd pages unique. */
function fillScattered(buf: Uint8Array): Uint8Array {
  fillRandom(buf, SEED.scatteredUnique) // one xorshift stream: every page unique (its period is 2^32 - 1 words)
  const fixed = fillRandom(new Uint8Array(sharedBytes(SCATTERED_CONTENTS * PAGE_SIZE)), SEED.scatteredFixed)
  const pages = buf.byteLength / PAGE_SIZE
  for (let p = 0, k = 0; p < pages; p += 2, k++) {
    // the first SCATTERED_CONTENTS even pages take each content once, so that all are present
    const c = k < SCATTERED_CONTENTS ? k : pageSeed(0, p, 0) % SCATTERED_CONTENTS
    buf.set(fixed.subarray(c * PAGE_SIZE, (c + 1) * PAGE_SIZE), p * PAGE_SIZE)
  }
  return buf
}

// ---- sparse ----

/** Three pages in four zero (written first, so that the memory is really there), the fourth unique random. */
function fillSparse(buf: Uint8Array, seed: number): Uint8Array {
  fillRandom(buf, seed)
  const pages = buf.byteLength / PAGE_SIZE
  for (let p = 0; p < pages; p++) if (p % 4 !== 3) buf.fill(0, p * PAGE_SIZE, (p + 1) * PAGE_SIZE)
  return buf
}

// ---- files ----

/** This package's node_modules (the folder above bench/ that holds binding.gyp). */
export function defaultFilesRoot(): string {
  let dir = __dirname
  while (!existsSync(join(dir, 'binding.gyp'))) {
    const up = dirname(dir)
    if (up === dir) return resolve('node_modules')
    dir = up
  }
  return join(dir, 'node_modules')
}

interface TreeFile {
  path: string
  size: number
}

/** Regular non-empty files under `root`, in a stable (sorted) order, as long as their pages fit in `capBytes`; symlinks are not followed. */
export function listTree(root: string, capBytes: number): TreeFile[] {
  const out: TreeFile[] = []
  let total = 0
  const walk = (dir: string): void => {
    let names: string[]
    try {
      names = readdirSync(dir).sort()
    } catch {
      return
    }
    for (const name of names) {
      const path = join(dir, name)
      const st = statSync(path, { throwIfNoEntry: false, bigint: false })
      if (!st) continue
      if (st.isDirectory()) walk(path)
      else if (st.isFile() && st.size > 0 && total + roundUp(st.size) <= capBytes) {
        out.push({ path, size: st.size })
        total += roundUp(st.size)
      }
    }
  }
  if (!statSync(root, { throwIfNoEntry: false })?.isDirectory()) throw new Error(`files: ${root} is not a directory`)
  walk(root)
  return out
}

/**
 * Loads the tree once per tenant, one buffer per file per tenant, each tenant taking at most
 * `bytes / TENANTS` of pages. Every file is read again for every tenant, as separate tenants would.
 */
function loadFiles(buffers: Uint8Array[], bytes: number, allocate: Allocate, root: string): Loaded['files'] {
  const files = listTree(root, Math.floor(bytes / TENANTS))
  if (files.length === 0) throw new Error(`files: no files under ${root}`)
  let loaded = 0
  for (let t = 0; t < TENANTS; t++) {
    for (const f of files) {
      const buf = allocate(f.size)
      const fd = openSync(f.path, 'r')
      try {
        let done = 0
        while (done < f.size) {
          const n = readSync(fd, buf, done, f.size - done, done)
          if (n === 0) throw new Error(`files: ${f.path} got shorter while loading`)
          done += n
        }
      } finally {
        closeSync(fd)
      }
      buffers.push(buf)
      loaded += f.size
    }
  }
  return { root, files: files.length, bytes: loaded / TENANTS, tenants: TENANTS }
}

/** Bytes of pages `files` will take at a cap of `bytes` (for sizing the limit without loading). */
export function filesPagesBytes(bytes: number, root = defaultFilesRoot()): number {
  return listTree(root, Math.floor(bytes / TENANTS)).reduce((n, f) => n + roundUp(f.size), 0) * TENANTS
}
