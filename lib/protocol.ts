/**
 * The one definition of what the coordinator sends its worker threads and what comes back.
 * Both sides import it; workers are stateless functions of a task.
 */

/** Bits of the per-page flags array (PageArrays.flags). */
export const Flag = {
  /** hashes[slot] holds the hash this page had at its previous scan. */
  HASHED: 1,
  /** Set by the worker: the page's hash differs from the one it had at its previous scan. */
  CHANGED: 2,
  /** The page maps a stable page (stableNode[slot]). */
  MERGED: 4,
  /** The page was all zero bytes and was given back: it reads the kernel's zero page. */
  ZERO: 8,
  /** The page's own memory became its stable page's pool page (counted as `shared`). */
  OWNER: 16,
  /** Set by the worker: the page was hashed for the first time. */
  NEW: 32,
  /** The page is the owner of a stable page planned in this batch (its pool page is not made yet). */
  PENDING: 64,
} as const

/**
 * Not hashed: merged pages (their bytes are the pool's), and dropped zero pages (reading one
 * could allocate it again; the survey takes the ZERO flag off one that is present again).
 */
export function notHashed(flags: number): boolean {
  return (flags & (Flag.MERGED | Flag.ZERO)) !== 0
}

/** How many pages from `slot` on, at most `most`, are not hashed (notHashed) before one that is. */
export function notHashedRun(flags: Uint8Array, slot: number, most: number): number {
  let n = 0
  while (n < most && notHashed(flags[slot + n]!)) n++
  return n
}

/**
 * A shard: a run of pages of one registered buffer, and where its per-page state lives, as a
 * record of SHARD_FIELDS numbers in an Int32Array (a shard table), at these offsets. Records,
 * not objects: a batch of many small buffers has tens of thousands of shards, which as objects
 * cost a structured clone per task and young-generation growth in the worker, and on the
 * coordinator a few hundred bytes of garbage per buffer and batch (files: 18 MiB a mergeNow()).
 * Int32, not Float64: reading a Float64Array element makes a heap number wherever V8 has not
 * optimized the code.
 */
export const Shard = {
  /** Where the buffer is mapped, low and high 32 bits (see shardAddress): workers hash by address so as not to keep buffers alive. */
  ADDRESS_LO: 0,
  ADDRESS_HI: 1,
  FIRST_PAGE: 2,
  COUNT: 3,
  /** First slot of this run in the page arrays. */
  SLOT: 4,
  /** Where this run's candidates go in the batch's candidate array. */
  BATCH_INDEX: 5,
  /** The domain's mix (mixLo, mixHi): pages are keyed by hash XOR mix, so domains never share keys. */
  MIX_LO: 6,
  MIX_HI: 7,
} as const

/** Numbers per shard record. */
export const SHARD_FIELDS = 8

/** The address of the shard at `o` (below 2^47: exact as a number). */
export function shardAddress(shards: Int32Array, o: number): number {
  return shards[o + Shard.ADDRESS_HI]! * 2 ** 32 + (shards[o + Shard.ADDRESS_LO]! >>> 0)
}

/** Read-only snapshot of the stable table that workers search. */
export interface StableView {
  table: SharedArrayBuffer // Int32Array: node + 1, or 0 for empty
  keyLo: SharedArrayBuffer // Int32Array per node
  keyHi: SharedArrayBuffer
  secret: number
}

/** Hash the shards' pages (records [from, to) of the shard table) and look each one up in the stable table. */
export interface HashTask {
  shards: SharedArrayBuffer // Int32Array of shard records
  from: number
  to: number
  /** Per slot, the page's key: its xxh3-64 XOR its domain's mix, as (lo, hi) 32-bit words (Int32Array). */
  keys: SharedArrayBuffer
  flags: SharedArrayBuffer // Uint8Array per slot
  candidates: SharedArrayBuffer // Int32Array per batch page: stable node or -1
  stable: StableView
}

export interface HashResult {
  /** Pages hashed (merged pages and untouched dropped zero pages are skipped). */
  hashed: number
}

/**
 * What a domain XORs into the low word of its pages' hashes (mixHi: the high word). Each half is an odd multiple of the domain number,
 * so two domains never give the same content the same key; and a key that matches across
 * domains by chance is still refused by the byte comparison before any merge. Int32, like
 * every key word (see PageArrays in lib/engine.ts).
 */
export function mixLo(domain: number): number {
  return Math.imul(domain, 0x9e3779b1)
}

/** The high word's mix: see mixLo(). */
export function mixHi(domain: number): number {
  return Math.imul(domain, 0x85ebca6b)
}

/**
 * Where a key's probe run starts in a table of 2^bits entries: the top bits of the key mixed
 * with a per-engine secret, so that pages crafted to share low hash bits do not pile up.
 */
export function probeStart(keyLo: number, secret: number, bits: number): number {
  return Math.imul(keyLo ^ secret, 0x9e3779b1) >>> (32 - bits)
}
