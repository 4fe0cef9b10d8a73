/**
 * The coordinator behind PageMerger: registered regions and the scan cursor, KSM's stable and
 * unstable indexes, the merge planner and the statistics. It alone writes the indexes and asks
 * the bridge to merge; worker threads only hash pages and search the stable index.
 */
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { Piscina } from 'piscina'
import { constants as bufferConstants } from 'node:buffer'
import { error, ErrorCode, isOptionsObject, rangeError, systemError, typeError } from './errors'
import { loadNative, NO_POOL, PAGE_SIZE, PageState, Status, type NativeArena, type NativeBinding } from './native'
import type { ResolvedOptions } from './options'
import { KernelKsm, type ProcessKsm } from './kernel'
import { Flag, mixHi, mixLo, notHashed, notHashedRun, Shard, SHARD_FIELDS, type HashTask } from './protocol'
import { sharedBytes, StableNodes, U32List, UnstableTable } from './tables'
import hashShards from '../workers/hash'

/** What pm.stats() reports, with the kernel's meanings where the kernel has the counter. */
export interface Stats {
  /** Stable pages in use (pool pages that registered pages map). */
  pagesShared: number
  /** Further pages mapping a stable page: the pages saved. */
  pagesSharing: number
  /** Pages checked in the last full scan that matched nothing yet (the unstable index). */
  pagesUnshared: number
  /** Pages that changed between their last two scans, in the last full scan. */
  pagesVolatile: number
  fullScans: number
  pagesScanned: number
  /** Contents with more than one stable page because of maxPageSharing. */
  stableNodeChains: number
  /** Stable pages in such chains. */
  stableNodeDups: number
  /** All-zero pages given back so that they read the kernel's zero page. */
  zeroPages: number
  /** Bytes saved minus metadata bytes. */
  generalProfit: number
  /** Pages whose merge the mapping budget refused in the last full scan. */
  pagesSkippedBudget: number
  /** Metadata (indexes, per-page state, native bookkeeping) per tracked page, in bytes. */
  metadataBytesPerPage: number
  /** Pages in registered buffers. */
  pagesTracked: number
  /**
   * Memory that unmergeAll() (or unregistering every buffer) would need back: every page that
   * maps another page's stable page gets its own copy again (zero pages stay free).
   */
  unmergeBytes: number
  /**
   * With engine 'kernel' or 'auto': what the kernel's ksmd merged in this whole process
   * (/proc/self/ksm_merging_pages, and ksm_zero_pages of /proc/self/ksm_stat); 0 with 'userspace'.
   */
  kernelMergingPages: number
  kernelZeroPages: number
  /**
   * What a write from another thread meets while its page is being merged: 'full', it waits (and
   * so do system calls such as read(2) into the buffer); 'user', threads wait but such a system
   * call fails with EFAULT (userfaultfd in user mode, what an unprivileged process may get);
   * 'none', no userfaultfd: merge only buffers that nothing writes meanwhile.
   */
  writeProtection: 'full' | 'user' | 'none'
}

/** What mergeNow() and background scanning report to onProgress. */
export interface MergeProgress {
  /** Pages scanned so far in the current full scan (with engine 'kernel': ksmd's pages_scanned since the call). */
  pagesScanned: number
  /** Pages in registered buffers: one full scan. */
  pagesTotal: number
  /** Full scans finished since mergeNow() (or start()) was called. */
  fullScans: number
  /** Pages saved so far, as stats() counts them (with engine 'kernel': the kernel's). */
  pagesSharing: number
  zeroPages: number
}

/** Options of mergeNow(). */
export interface MergeNowOptions {
  /** Called after every batch; keep it quick, it runs on the scanning thread. */
  onProgress?: (progress: MergeProgress) => void
}

/** Options of start(). */
export interface StartOptions {
  /**
   * Called after every batch that changed what is saved (pages merged, dropped as zero pages, or
   * unmerged by a write) and at the end of every full scan: progress without polling stats(),
   * whose own timer would wake the thread more often than the scanner does. Keep it quick; if it
   * throws, scanning stops and stop() rejects with the error.
   */
  onProgress?: (progress: MergeProgress) => void
}

/** What pm.bufferStats(buf) reports for one buffer. */
export interface BufferStats {
  pages: number
  /** Pages whose memory became a stable page. */
  pagesShared: number
  /** Pages mapping a stable page that came from elsewhere. */
  pagesSharing: number
  zeroPages: number
  domain: string
}

/** One batch of pages: the shards, the regions and buffers it holds alive, where its candidates go. */
interface Batch {
  /** Its shards: `n` records of SHARD_FIELDS numbers (protocol's Shard), in the engine's table for `which`. */
  shards: Int32Array
  n: number
  /** Which of the engine's two sets of batch arrays (shards, candidates, task table) it uses. */
  which: number
  /** Per shard, its region, and its buffer, held strongly until the batch is hashed (the engine's arrays for `which`). */
  held: Region[]
  buffers: (SharedArrayBuffer | undefined)[]
  pages: number
  /** This batch ends a full scan. */
  wrapped: boolean
  candidates: Int32Array
  /** Settles when the batch is hashed; absent when it was hashed at once, on this thread. */
  hashed?: Promise<void>
}

interface Region {
  /** The arena's id for the allocation. */
  id: number
  ref: WeakRef<SharedArrayBuffer>
  /** Where its bytes are mapped (fixed for its life), as two 32-bit words: asked once, not as a bigint per shard of every batch. */
  addressLo: number
  addressHi: number
  pages: number
  /** First slot in the page arrays. */
  slot: number
  domainKey: string
  domain: number
}

/**
 * Marks a stable page's pool number as provisional: its run has not been made yet. Bit 30, not
 * 31, so that a marked number is still a small integer (see PageArrays). Pool pages stay below
 * 2^28: the engine's arena reserves at most 1 TiB (native/arena.cc).
 */
const PROVISIONAL = 0x40000000
/** Pages surveyed at once (32 MiB; a power of two): a window's pagemap read costs tens of µs, and divides a mergeNow() batch. */
const SURVEY_PAGES = 8192

/** Actions planned for the pages of one batch. */
const Plan = { NONE: 0, ZERO: 1, STABLE: 2 } as const

/** The compiled worker: beside lib/ in dist/, or in dist/ when lib/ runs from source (tests under a TypeScript loader). */
const WORKER_FILE = [join(__dirname, '..', 'workers', 'hash.js'), join(__dirname, '..', 'dist', 'workers', 'hash.js')].find((f) => existsSync(f)) ?? join(__dirname, '..', 'workers', 'hash.js')
/**
 * Background batches with nothing to do (every page merged, or given back and untouched) taken
 * in one wake-up at most, after their sleeps: 1 s at ksmd's default knobs. It bounds how late a
 * window's survey (and so a write into a merged page) is noticed.
 */
const QUIET_BATCHES = 50
/** Batches smaller than this are hashed on the coordinator thread (see hash()). */
const INLINE_PAGES = 1024
/** Pages per batch in mergeNow(): large enough to amortize a round trip to the workers. */
const MERGE_NOW_BATCH = 1 << 16
/**
 * Pages per extent at most: an extent is write-protected from its comparison to its remap, so
 * this bounds how long a writer on another thread can wait (2 MiB: a fraction of a millisecond).
 */
const MAX_EXTENT_PAGES = 512
/**
 * Full scans one mergeNow() makes at most: an application that keeps rewriting pages gives every
 * scan something new to merge, and mergeNow() must still end (what keeps changing is volatile).
 */
const MERGE_NOW_SCANS = 4
/** How often mergeNow() looks at ksmd's full_scans with engine 'kernel'. */
const KSMD_POLL_MS = 20
/**
 * Full scans of ksmd that mergeNow() waits for with engine 'kernel': the one in progress, then
 * ksmd merges a page only on its second sight with an unchanged checksum.
 */
const KSMD_SCANS = 3
/** Full scans of ksmd after which mergeNow() stops waiting, converged or not (pages that keep changing). */
const KSMD_MAX_SCANS = 12

/**
 * Per-page state, indexed by slot, in SharedArrayBuffers so workers can fill it: 9 bytes a page.
 * `words` holds two 32-bit words per page: its key (hash XOR domain mix) while it is not merged,
 * and (stable node, 0) once it is, since a merged page is not hashed and its key is its node's.
 * Int32, as are the stable nodes' keys and domain mixes: a word read as uint32 is a heap number
 * half the time (2^31 and up) wherever V8 has not optimized the code or passes it to a call, and
 * a first merge of 1 GiB made MiBs of such garbage, which grew the young generation.
 */
class PageArrays {
  words = new Int32Array(new SharedArrayBuffer(8 * 1024))
  flags = new Uint8Array(new SharedArrayBuffer(1024))

  get capacity(): number {
    return this.flags.length
  }

  grow(capacity: number): void {
    const words = new Int32Array(sharedBytes(8 * capacity))
    words.set(this.words)
    const flags = new Uint8Array(sharedBytes(capacity))
    flags.set(this.flags)
    this.words = words
    this.flags = flags
  }

  /**
   * What `slots` slots in use take: the capacity beyond them is mapped but never written (grown
   * by doubling, it would otherwise count up to 18 bytes a page).
   */
  bytes(slots: number): number {
    return slots * 9
  }
}

/**
 * One FinalizationRegistry for every Engine, for the life of the module, holding each Engine
 * weakly: V8 (11.3, Node 20) stops posting cleanup tasks for good, for every registry in the
 * process, once a registry is collected while a cleanup task is pending for it (an Engine dropped
 * in the same job as the GC that found its buffers dead). test/property.ts shows it.
 */
const finalizer = new FinalizationRegistry<{ engine: WeakRef<Engine>; id: number }>(({ engine, id }) => engine.deref()?.forget(id))

export class Engine {
  readonly native: NativeBinding = loadNative()
  readonly arena: NativeArena = new this.native.Arena()
  /** The kernel's ksmd: knobs tuned through it are put back by close(). */
  readonly kernel = new KernelKsm()
  options: ResolvedOptions
  private readonly pages = new PageArrays()
  private readonly stable = new StableNodes()
  private readonly unstable = new UnstableTable()
  /** Live regions in slot order. */
  private regions: Region[] = []
  private readonly byId = new Map<number, Region>()
  private readonly domains = new Map<string, number>([['', 0]])
  private freeSlots: Array<[number, number]> = []
  /** Slots of regions dropped while a batch was being hashed: workers may still write to them. */
  private freedInBatch: Array<[number, number]> = []
  private slotTop = 0
  private readonly finalizer = finalizer
  private readonly self = new WeakRef<Engine>(this)
  private pool: Piscina | undefined
  /** Serializes scans, unmerges and closing: one merge at a time. */
  private queue: Promise<unknown> = Promise.resolve()
  /** Calls waiting in or running through `queue`: the background scanner steps in only when none is. */
  private queued = 0
  private cursor = { region: 0, page: 0 }
  private background: Promise<void> | undefined
  /** start()'s onProgress. */
  private backgroundProgress: StartOptions['onProgress']
  /** Ends the background scanner's sleep early: its timer is unref'd, so stop() must not wait on it. */
  private wake: (() => void) | undefined
  private running = false
  /** The error that stopped background scanning, for stop() to report. */
  private failure: unknown
  private closed = false
  /** The first extent of this batch that the bridge failed with an errno: thrown once the batch is done. */
  private bridgeError: Error | undefined
  /** Inside onProgress: calls that change the PageMerger are refused (BUSY). */
  private inCallback = false
  private readonly zero: { lo: number; hi: number }
  /**
   * Two candidate arrays: in mergeNow() the workers hash one batch while the next is processed.
   * Like plan and planNode, sized for small batches, grown by begin() and given back after mergeNow().
   */
  private candidates = [0, 1].map(() => new Int32Array(sharedBytes(4 * INLINE_PAGES)))
  /** The batches' shard records, one table per candidate array, grown as needed. */
  private batchShards: Int32Array<ArrayBufferLike>[] = [0, 1].map(() => new Int32Array(SHARD_FIELDS * 64))
  /**
   * The batches' arrays of regions and buffers, one pair per candidate array, reused: as fresh
   * arrays per batch, their growth was most of a merge's garbage with many small buffers.
   */
  private holds = [0, 1].map(() => ({ regions: [] as Region[], buffers: [] as (SharedArrayBuffer | undefined)[] }))
  /** The shard tables the hash tasks read: the batch's records cut into each task's share. */
  private shardTables = [0, 1].map(() => new Int32Array(new SharedArrayBuffer(4 * SHARD_FIELDS * 64)))
  private flip = 0
  /** Batches being hashed: slots of buffers dropped meanwhile wait in freedInBatch. */
  private hashing = 0
  private plan = new Uint8Array(sharedBytes(INLINE_PAGES))
  private planNode = new Int32Array(sharedBytes(4 * INLINE_PAGES))
  /** Pages mapping a stable page, planned ones included: the sum of the nodes' sharers. */
  private sharersTotal = 0
  /** Pages in registered buffers (the regions' pages, summed as they come and go). */
  private trackedPages = 0
  /** A batch's lists (owners of new stable pages, and the extents of each bridge call), reused. */
  private readonly lists = { owners: new U32List(), zero: new U32List(), runs: new U32List(), merges: new U32List(), onOld: new U32List(), reap: new U32List(), reapShards: new U32List() }
  /** The bridge calls' record and status arrays, grown and reused: fresh ones per call left the C heap fragmented. */
  private readonly scratch: { extents: Uint32Array<ArrayBufferLike>; status: Int32Array<ArrayBufferLike>; outPool: Uint32Array<ArrayBufferLike> } = { extents: new Uint32Array(1024), status: new Int32Array(256), outPool: new Uint32Array(256) }
  private c = {
    pagesScanned: 0,
    fullScans: 0,
    zeroPages: 0,
    volatile: 0,
    skipped: 0,
    mergedThisScan: 0,
    lastVolatile: 0,
    lastSkipped: 0,
    lastUnshared: 0,
    /** Pages scanned in the current full scan, for onProgress. */
    inScan: 0,
  }

  constructor(options: ResolvedOptions) {
    this.options = options
    this.unstable.words = this.pages.words
    const z = new BigUint64Array([this.native.ZERO_PAGE_HASH])
    const w = new Int32Array(z.buffer)
    this.zero = { lo: w[0]!, hi: w[1]! }
  }

  // ---- registration -------------------------------------------------------------------------

  alloc(bytes: number, domain: string): Buffer {
    this.assertOpen('alloc')
    const { engine } = this.options
    if (typeof bytes === 'number' && bytes > bufferConstants.MAX_LENGTH) // a Buffer cannot be longer: refuse before anything is allocated
      throw rangeError(ErrorCode.OUT_OF_RANGE, `byteLength must be at most ${bufferConstants.MAX_LENGTH} (buffer.constants.MAX_LENGTH)`)
    const sab = this.arena.alloc(bytes, engine === 'userspace')
    this.register(sab, domain)
    return Buffer.from(sab, 0, bytes)
  }

  register(target: unknown, domain: string): void {
    this.assertOpen('register')
    const sab = sharedBufferOf(target)
    const id = this.arena.idOf(sab)
    if (this.byId.has(id)) return
    const pages = sab.byteLength / PAGE_SIZE
    const slot = this.takeSlots(pages)
    const address = this.native.addressOf(sab)
    const region: Region = { id, ref: new WeakRef(sab), addressLo: Number(address & 0xffffffffn) | 0, addressHi: Number(address >> 32n), pages, slot, domainKey: domain, domain: this.domainNumber(domain) }
    this.pages.flags.fill(0, slot, slot + pages)
    const at = this.regionIndex(slot)
    this.regions.splice(at, 0, region)
    this.trackedPages += pages
    if (at <= this.cursor.region && this.regions.length > 1) this.cursor.region++ // the cursor stays on its region
    this.byId.set(id, region)
    this.finalizer.register(sab, { engine: this.self, id }, region)
    this.advise(sab, true)
    if (this.options.engine !== 'kernel') this.workerPool() // start the threads now, while the application fills its buffers
  }

  /**
   * Hands a private buffer to ksmd (engine 'kernel' or 'auto'), or takes it back. With 'auto', a
   * kernel without KSM (EINVAL) only means ksmd takes nothing; with 'kernel' it is an error.
   */
  private advise(sab: SharedArrayBuffer, mergeable: boolean): void {
    const { engine } = this.options
    if (engine === 'userspace') return
    try {
      this.arena.advise(sab, mergeable)
    } catch (err) {
      if (!(engine === 'auto' && (err as { code?: string }).code === 'EINVAL')) throw err
    }
  }

  /** Unmerges the buffer's pages (every page private again), then forgets it. */
  unregister(target: unknown): boolean {
    this.assertNotInCallback('unregister')
    const sab = sharedBufferOf(target)
    const region = this.byId.get(this.arena.idOf(sab))
    if (!region) return false
    this.unmergeRegion(region)
    this.advise(sab, false)
    this.finalizer.unregister(region)
    this.drop(region)
    return true
  }

  bufferStats(target: unknown): BufferStats {
    const sab = sharedBufferOf(target)
    const region = this.byId.get(this.arena.idOf(sab))
    if (!region) throw typeError(ErrorCode.FOREIGN_BUFFER, 'the buffer is not registered with this PageMerger')
    const out: BufferStats = { pages: region.pages, pagesShared: 0, pagesSharing: 0, zeroPages: 0, domain: region.domainKey }
    const { flags } = this.pages
    for (let s = region.slot; s < region.slot + region.pages; s++) {
      const f = flags[s]!
      if (f & Flag.ZERO) out.zeroPages++
      else if (f & Flag.OWNER) out.pagesShared++
      else if (f & Flag.MERGED) out.pagesSharing++
    }
    return out
  }

  private domainNumber(key: string): number {
    let n = this.domains.get(key)
    if (n === undefined) this.domains.set(key, (n = this.domains.size))
    return n
  }

  private takeSlots(pages: number): number {
    const i = this.freeSlots.findIndex(([, len]) => len >= pages)
    if (i >= 0) {
      const [start, len] = this.freeSlots[i]!
      if (len === pages) this.freeSlots.splice(i, 1)
      else this.freeSlots[i] = [start + pages, len - pages]
      return start
    }
    const start = this.slotTop
    this.slotTop += pages
    if (this.slotTop > this.pages.capacity) {
      let cap = this.pages.capacity
      while (cap < this.slotTop) cap *= 2
      this.pages.grow(cap)
      this.unstable.words = this.pages.words
    }
    // The new pages' state is written now, so that the OS counts it from registration on (9 bytes
    // a page, in mappings of their own) rather than as growth in the middle of the first scan.
    this.pages.words.fill(0, 2 * start, 2 * this.slotTop)
    this.pages.flags.fill(0, start, this.slotTop)
    return start
  }

  /** V8 collected a buffer: its memory is gone, so only the bookkeeping is left to undo (called by `finalizer`). */
  forget(id: number): void {
    const region = this.byId.get(id)
    if (region) this.drop(region)
  }

  private drop(region: Region): void {
    const { flags, words } = this.pages
    for (let s = region.slot; s < region.slot + region.pages; s++) {
      const f = flags[s]!
      if (f & Flag.MERGED) this.dropSharer(words[2 * s]!)
      if (f & Flag.ZERO) this.c.zeroPages--
      flags[s] = 0
    }
    this.byId.delete(region.id)
    const at = this.regionIndex(region.slot)
    this.regions.splice(at, 1)
    this.trackedPages -= region.pages
    if (this.cursor.region > at) this.cursor.region-- // the cursor stays on its region
    else if (this.cursor.region === at) this.cursor.page = 0 // its region is gone: on to the next
    ;(this.hashing > 0 ? this.freedInBatch : this.freeSlots).push([region.slot, region.pages])
  }

  /** Index of the first region whose slots start at or after `slot` (regions are in slot order). */
  private regionIndex(slot: number): number {
    let lo = 0, hi = this.regions.length
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      if (this.regions[mid]!.slot < slot) lo = mid + 1
      else hi = mid
    }
    return lo
  }

  private regionOfSlot(slot: number): Region | undefined {
    let lo = 0, hi = this.regions.length - 1
    while (lo <= hi) {
      const mid = (lo + hi) >> 1
      const r = this.regions[mid]!
      const below = slot < r.slot, above = slot >= r.slot + r.pages
      if (!below && !above) return r
      // both bounds worked out every time: a path first taken late would cost a recompile of every caller it was inlined into
      const up = mid + 1, down = mid - 1
      if (below) hi = down
      else lo = up
    }
    return undefined
  }

  // ---- stable pages ---------------------------------------------------------------------------

  /** A node of the chain starting at `head` that can take one more sharer, or -1. */
  private roomIn(head: number): number {
    const st = this.stable
    const max = this.options.maxPageSharing
    for (let n = head; n >= 0; n = st.nextDup(n)) if (st.sharers[n]! < max) return n
    return -1
  }

  /** One page no longer maps (or will not map) the node; the last one takes it away. */
  private dropSharer(node: number): void {
    const st = this.stable
    this.sharersTotal--
    if (st.sharers[node]! > 1) st.sharers[node]!--
    else st.remove(node)
  }

  // ---- scanning -------------------------------------------------------------------------------

  private workerPool(): Piscina {
    if (!this.pool) {
      const n = this.options.workers
      this.pool = new Piscina({ filename: WORKER_FILE, minThreads: n, maxThreads: n, idleTimeout: 60_000 })
    }
    return this.pool
  }

  /** Runs `fn` after everything queued before it: one scan or unmerge at a time. */
  private exclusive<T>(fn: () => Promise<T> | T): Promise<T> {
    this.queued++
    const next = this.queue.then(fn, fn).finally(() => this.queued--)
    this.queue = next.catch(() => undefined)
    return next
  }

  mergeNow(options: MergeNowOptions = {}): Promise<Stats> {
    this.assertOpen('mergeNow')
    const onProgress = progressOption(options, 'mergeNow')
    if (this.options.engine === 'kernel') return this.exclusive(() => this.awaitKsmd(onProgress))
    return this.exclusive(async () => {
      const scansBefore = this.c.fullScans
      const report = onProgress && (() => this.callback(onProgress, this.progress(scansBefore)))
      this.cursor = { region: 0, page: 0 }
      this.endScan(false)
      // A pipeline: the workers hash the next batch while this thread merges the current one.
      let next: Batch | undefined = this.begin(MERGE_NOW_BATCH, true)
      try {
        for (;;) {
          const cur: Batch = next!
          await cur.hashed
          // the next batch of the same full scan: never pages of this one, whose slots process() writes
          next = cur.wrapped ? undefined : this.begin(MERGE_NOW_BATCH, false)
          this.process(cur, true)
          if (!cur.wrapped) {
            report?.()
            continue
          }
          const merged = this.c.mergedThisScan
          this.endScan(true)
          report?.()
          if (merged === 0 || this.regions.length === 0 || this.c.fullScans - scansBefore >= MERGE_NOW_SCANS) break
          next = this.begin(MERGE_NOW_BATCH, true)
        }
      } finally {
        await next?.hashed // a batch begun before an error: let its hashing finish
        this.releaseBatchScratch()
      }
      return this.stats() // without the scratch just given back
    })
  }

  /**
   * Gives back what mergeNow()'s batches of MERGE_NOW_BATCH pages grew, none of which the next
   * scan needs: the batch's per-page arrays, the lists of its extents, the bridge calls' arrays,
   * the shard tables and arrays, and the unstable index (thrown away at the end of every full
   * scan anyway; the next one grows it again). Kept, they held MiBs that the OS counted against
   * what the merge freed (files: 8 MiB; the per-page arrays alone, 0.8 MiB).
   */
  private releaseBatchScratch(): void {
    if (this.plan.length > INLINE_PAGES) this.sizeBatches(INLINE_PAGES)
    this.holds = [0, 1].map(() => ({ regions: [], buffers: [] }))
    for (const list of Object.values(this.lists)) list.release()
    if (this.scratch.extents.length > 1024) this.scratch.extents = new Uint32Array(1024)
    if (this.scratch.status.length > 256) (this.scratch.status = new Int32Array(256)), (this.scratch.outPool = new Uint32Array(256))
    this.shardTables = this.shardTables.map((t) => (t.length > SHARD_FIELDS * 64 ? new Int32Array(new SharedArrayBuffer(4 * SHARD_FIELDS * 64)) : t))
    this.batchShards = this.batchShards.map((t) => (t.length > SHARD_FIELDS * 64 ? new Int32Array(SHARD_FIELDS * 64) : t))
    this.unstable.reset(0)
  }

  /**
   * mergeNow() with engine 'kernel': waits until ksmd has seen every page twice and a whole scan
   * merged nothing more in this process (or 12 scans have passed), or rejects at once if ksmd is
   * not running (run is not 1).
   */
  private async awaitKsmd(onProgress: MergeNowOptions['onProgress']): Promise<Stats> {
    const start = this.kernel.counters()
    let lastScans = 0, lastMerged = -1
    for (;;) {
      const now = this.kernel.counters()
      if (now.run !== 1)
        throw error(ErrorCode.KSMD_STOPPED, `ksmd is not running (run=${now.run ?? 'absent'}), so nothing merges: start it with pm.kernel.tune({ run: 1 }) as root`)
      const fullScans = now.fullScans - start.fullScans
      if (onProgress) {
        const st = this.stats()
        this.callback(onProgress, { pagesScanned: now.pagesScanned - start.pagesScanned, pagesTotal: st.pagesTracked, fullScans, pagesSharing: st.kernelMergingPages, zeroPages: st.kernelZeroPages })
      }
      if (fullScans > lastScans) {
        // Converged: a whole scan after the first few that merged nothing more in this process.
        const merged = this.kernel.processCounters().mergingPages ?? 0
        if ((fullScans >= KSMD_SCANS && merged === lastMerged) || fullScans >= KSMD_MAX_SCANS) return this.stats()
        lastScans = fullScans
        lastMerged = merged
      }
      await new Promise((r) => setTimeout(r, KSMD_POLL_MS))
    }
  }

  /**
   * Background scanning; with engine 'kernel' ksmd scans by itself, so there is nothing to start
   * (and onProgress is not called). While scanning, start() changes nothing but onProgress.
   */
  start(options: StartOptions = {}): void {
    this.assertOpen('start')
    this.backgroundProgress = progressOption(options, 'start')
    if (this.running || this.options.engine === 'kernel') return
    this.running = true
    // A stop() that was not awaited lets its loop finish first: never two loops at once.
    this.background = (this.background ?? Promise.resolve()).then(() => this.scanInBackground())
  }

  /**
   * Background scanning: a batch, then a sleep, until stop(); settles when it ends. An error stops
   * it; stop() rethrows it. At ksmd's default knobs (100 pages every 20 ms) the loop's own cost
   * is much of the CPU, so it is kept small: the sleep is the addon's libuv timer (Node's
   * setTimeout costs 30-55 µs more per wake-up, in its JavaScript timer lists), and a batch small
   * enough to hash on this thread runs synchronously when nothing else is queued (no promise per
   * step).
   */
  private scanInBackground(): Promise<void> {
    return new Promise<void>((done) => {
      const timer = new this.native.Timer(() => step())
      let inBatch = false // a batch through the queue: stop() waits for it, as for a synchronous one
      let quiet = 0 // pages ahead with nothing to do: stepped over at the next wake-up, before its batch
      const scansBefore = this.c.fullScans
      let sharers = this.sharersTotal, zeros = this.c.zeroPages, scans = scansBefore // as last reported
      const finish = (failed: boolean, err?: unknown) => {
        if (failed) this.failure = err
        this.running = false
        this.wake = undefined
        timer.close()
        done()
      }
      const report = () => {
        const onProgress = this.backgroundProgress
        if (!onProgress || (this.sharersTotal === sharers && this.c.zeroPages === zeros && this.c.fullScans === scans)) return
        ;(sharers = this.sharersTotal), (zeros = this.c.zeroPages), (scans = this.c.fullScans)
        this.callback(onProgress, this.progress(scansBefore))
      }
      const sleep = () => {
        inBatch = false
        try {
          report()
        } catch (err) {
          return finish(true, err)
        }
        if (!this.running) return finish(false)
        // A run of batches that would do nothing is one wake-up, after all their sleeps: the same
        // pages a second, without a wake-up of the event loop (~100 µs here) for each.
        const per = this.options.pagesToScan
        quiet = this.quietAhead(per * QUIET_BATCHES, per)
        timer.arm(this.options.sleepMillisecs * (1 + quiet / per))
      }
      const step = () => {
        if (!this.running) return finish(false)
        const skip = quiet
        quiet = 0
        if (this.queued === 0 && this.options.pagesToScan < INLINE_PAGES) {
          try {
            this.scanStep(skip)
          } catch (err) {
            return finish(true, err)
          }
          return sleep()
        }
        inBatch = true
        this.exclusive(() => (this.running ? this.scanStep(skip) : undefined)).then(sleep, (err) => finish(true, err))
      }
      this.wake = () => inBatch || finish(false) // cuts the sleep short; a batch in the queue ends first
      step()
    })
  }

  /**
   * One batch of background scanning, after stepping over up to `skip` pages that need nothing
   * (see quietAhead); a promise only when its hashing went to the workers.
   */
  private scanStep(skip: number): Promise<void> | undefined {
    if (skip > 0) this.skipQuiet(skip)
    const b = this.begin(this.options.pagesToScan, true)
    if (b.hashed) return b.hashed.then(() => this.finishStep(b))
    this.finishStep(b)
    return undefined
  }

  private finishStep(b: Batch): void {
    this.process(b, false)
    if (b.wrapped) this.endScan(true)
  }

  /**
   * Pages from the cursor on, at most `most` and in multiples of `unit`, that a batch would only
   * step over: merged pages, and given-back zero pages nobody touched (neither is hashed). Up to
   * the end of the full scan at most.
   */
  private quietAhead(most: number, unit: number): number {
    const { flags } = this.pages
    let n = 0
    for (let i = this.cursor.region, p = this.cursor.page; i < this.regions.length && n < most; i++, p = 0) {
      const r = this.regions[i]!
      const q = notHashedRun(flags, r.slot + p, Math.min(r.pages - p, most - n))
      n += q
      if (p + q < r.pages) break // a page to hash, or `most`
    }
    return n - (n % unit)
  }

  /**
   * Steps the cursor over the pages ahead that need nothing now, up to `pages` (checked again: a
   * mergeNow() or a write may have come since they were counted), surveying the windows it
   * enters as the batches it stands for would have. A merged page found written there is hashed
   * from the next full scan on, where a batch would have hashed it at once.
   */
  private skipQuiet(pages: number): void {
    const n = this.quietAhead(pages, 1)
    if (n === 0) return
    const b = this.take(n)
    if (b.n > 0) this.survey(b)
    b.buffers.fill(undefined, 0, b.n)
    this.c.pagesScanned += b.pages
    this.c.inScan += b.pages
    if (b.wrapped) this.endScan(true)
  }

  /** Stops background scanning after its current batch; rejects with the error that stopped it, if one did. */
  stop(): Promise<void> {
    this.assertNotInCallback('stop') // thrown, not a rejection a synchronous callback would leave unhandled
    return this.stopScanning()
  }

  private async stopScanning(): Promise<void> {
    this.running = false
    this.wake?.()
    await this.background
    this.background = undefined
    const failure = this.failure
    this.failure = undefined
    if (failure) throw failure
  }

  get isRunning(): boolean {
    return this.running
  }

  private endScan(counted: boolean): void {
    if (counted) {
      this.c.fullScans++
      this.c.lastVolatile = this.c.volatile
      this.c.lastSkipped = this.c.skipped
      this.c.lastUnshared = this.unstable.size
    }
    this.c.volatile = 0
    this.c.skipped = 0
    this.c.mergedThisScan = 0
    this.c.inScan = 0
    this.unstable.reset(this.slotTop - this.sharersTotal - this.c.zeroPages) // only unmerged pages can enter it
  }

  /**
   * Takes up to `max` pages from the cursor, surveys them, and starts hashing them (with a share
   * for this thread when `share`). Holds each buffer strongly until the batch is hashed: workers
   * get addresses, not buffers, so that nothing but a batch in progress keeps memory alive.
   */
  private begin(max: number, share: boolean): Batch {
    if (this.candidates[0]!.length < max) this.sizeBatches(max)
    const b = this.take(max)
    if (b.n === 0) return b
    this.survey(b)
    this.hashing++
    let running: Promise<void> | undefined
    try {
      running = this.hash(b, share)
    } finally {
      if (!running) this.hashDone(b)
    }
    if (running) b.hashed = running.finally(() => this.hashDone(b))
    return b
  }

  /** Takes up to `max` pages from the cursor as a batch's shards (begin()), holding their buffers. */
  private take(max: number): Batch {
    const which = (this.flip ^= 1)
    const { regions: held, buffers } = this.holds[which]!
    const b: Batch = { shards: this.batchShards[which]!, n: 0, which, held, buffers, pages: 0, wrapped: false, candidates: this.candidates[which]! }
    const across = this.options.mergeAcrossDomains // no domain's mix in the keys
    while (b.pages < max && this.regions.length > 0) {
      if (this.cursor.region >= this.regions.length) break
      const r = this.regions[this.cursor.region]!
      const buffer = r.ref.deref()
      if (!buffer) {
        // collected before its FinalizationRegistry callback ran (V8 does not promise it ever will)
        this.finalizer.unregister(r)
        this.drop(r) // the cursor stays where it is: on the region that followed
        continue
      }
      const count = Math.min(max - b.pages, r.pages - this.cursor.page)
      if (count > 0) {
        if ((b.n + 1) * SHARD_FIELDS > b.shards.length) b.shards = this.growShards(which)
        held[b.n] = r
        buffers[b.n] = buffer
        const t = b.shards, o = b.n++ * SHARD_FIELDS, domain = across ? 0 : r.domain
        t[o + Shard.ADDRESS_LO] = r.addressLo
        t[o + Shard.ADDRESS_HI] = r.addressHi
        t[o + Shard.FIRST_PAGE] = this.cursor.page
        t[o + Shard.COUNT] = count
        t[o + Shard.SLOT] = r.slot + this.cursor.page
        t[o + Shard.BATCH_INDEX] = b.pages
        t[o + Shard.MIX_LO] = mixLo(domain)
        t[o + Shard.MIX_HI] = mixHi(domain)
        b.pages += count
      }
      this.cursor.page += count
      if (this.cursor.page >= r.pages) (this.cursor.region++), (this.cursor.page = 0) // no object per buffer
    }
    if (this.cursor.region >= this.regions.length) {
      this.cursor = { region: 0, page: 0 }
      b.wrapped = true
    }
    return b
  }

  /** The per-page arrays of a batch (candidates, plan), for batches of up to `pages` pages. */
  private sizeBatches(pages: number): void {
    this.candidates = [0, 1].map(() => new Int32Array(sharedBytes(4 * pages)))
    this.plan = new Uint8Array(sharedBytes(pages))
    this.planNode = new Int32Array(sharedBytes(4 * pages))
  }

  /** The shard table `which`, doubled; kept for the batches that follow (mergeNow() gives it back). */
  private growShards(which: number): Int32Array {
    const old = this.batchShards[which]!
    const t = new Int32Array(sharedBytes(2 * old.byteLength))
    t.set(old)
    return (this.batchShards[which] = t)
  }

  /**
   * The batch is hashed: its buffers are let go (nothing after reads them by address: a buffer
   * collected from now on only makes its extents' bridge calls report it gone), and slots freed
   * meanwhile can be reused.
   */
  private hashDone(b: Batch): void {
    b.buffers.fill(undefined, 0, b.n)
    if (--this.hashing === 0 && this.freedInBatch.length > 0) this.freeSlots.push(...this.freedInBatch.splice(0))
  }

  /**
   * When the cursor enters a window of SURVEY_PAGES pages of a region, asks the kernel (pagemap,
   * which reads no page) what changed under the window's pages that are not hashed: merged pages
   * written since lose their stable page's count, and dropped zero pages that are present again
   * (read or written) are pages like any other again, to be hashed. A dropped page that nobody touched is
   * not read: reading a hole of a shared memfd window allocates it, taking back the memory we
   * gave back. Once per window and full scan, not per batch: at ksmd's default of 100 pages a
   * batch, a pagemap read per batch was most of a quiet batch's cost; and not per region, whose
   * survey could stall this thread for tens of ms in a buffer of gigabytes. A write is still
   * noticed within the first full scan that starts after it.
   */
  private survey({ shards, n, held, buffers }: Batch): void {
    const { flags } = this.pages
    const reap = this.lists.reap.clear() // [id, first page, pages] of the windows holding merged pages
    const which = this.lists.reapShards.clear() // and their shards' indexes in the batch
    for (let i = 0; i < n; i++) {
      const o = i * SHARD_FIELDS, r = held[i]!
      const firstPage = shards[o + Shard.FIRST_PAGE]!, count = shards[o + Shard.COUNT]!
      // the windows starting in this shard (one before them was surveyed when the cursor entered it)
      const from = roundUp(firstPage, SURVEY_PAGES)
      const to = Math.min(roundUp(firstPage + count, SURVEY_PAGES), r.pages)
      if (from >= to) continue
      const any = flagsOf(flags, r.slot + from, r.slot + to)
      if (any & Flag.MERGED) reap.push3(r.id, from, to - from), which.push(i)
      if (any & Flag.ZERO) {
        const entries = new BigUint64Array(to - from)
        this.native.pagemap(buffers[i]!, from, to - from, entries)
        this.c.zeroPages -= reviveTouched(flags, r.slot + from, entries)
      }
    }
    if (which.length === 0) return
    // the bridge calls' status array, free between them, holds the counts
    const counts = this.scratch.status.length >= which.length ? this.scratch.status.subarray(0, which.length) : new Int32Array(which.length)
    if (this.arena.reapWritten(reap.view(), counts) === 0) return
    for (let j = 0; j < which.length; j++) {
      if (counts[j] === 0) continue
      const i = which.data[j]!, from = reap.data[3 * j + 1]!, count = reap.data[3 * j + 2]!
      const states = new Uint8Array(count), pools = new Uint32Array(count)
      this.arena.pageStates(buffers[i]!, from, count, states, pools)
      this.unmergeWritten(held[i]!.slot + from, states)
    }
  }

  /** Merged pages from `slot` on whose state is WRITTEN (a private copy now) leave their stable page. */
  private unmergeWritten(slot: number, states: Uint8Array): void {
    const { flags, words } = this.pages
    for (let k = 0, s = slot; k < states.length; k++, s++) {
      if (flags[s]! & Flag.MERGED && states[k] === PageState.WRITTEN) {
        this.dropSharer(words[2 * s]!)
        flags[s] = flags[s]! & ~(Flag.MERGED | Flag.OWNER | Flag.HASHED) // hashed afresh, as a new page
      }
    }
  }

  /**
   * Hashes the batch: one share per worker thread and one for the coordinator, which would
   * otherwise wait. A batch smaller than INLINE_PAGES is hashed here alone: a round trip to a
   * worker (task cloned, views made, reply awaited) costs more than hashing it. Returns a promise
   * only when workers have a share: a batch hashed here alone is done when this returns.
   */
  private hash({ shards, n: shardCount, which, pages, candidates }: Batch, share: boolean): Promise<void> | undefined {
    const inline = pages < INLINE_PAGES
    const per = inline ? pages : Math.ceil(pages / (this.options.workers + (share ? 1 : 0)))
    // The shards, cut into one task's share after another, as records of the tasks' shard table.
    let table = this.shardTables[which]!
    const most = (shardCount + this.options.workers + 1) * SHARD_FIELDS
    if (table.length < most) this.shardTables[which] = table = new Int32Array(sharedBytes(4 * 2 * most))
    const ends: number[] = [] // each task's last record + 1
    let n = 0, room = per
    for (let i = 0; i < shardCount; i++) {
      const at = i * SHARD_FIELDS
      let firstPage = shards[at + Shard.FIRST_PAGE]!, count = shards[at + Shard.COUNT]!
      let slot = shards[at + Shard.SLOT]!, batchIndex = shards[at + Shard.BATCH_INDEX]!
      while (count > 0) {
        const take = Math.min(count, room), o = n++ * SHARD_FIELDS
        table[o + Shard.ADDRESS_LO] = shards[at + Shard.ADDRESS_LO]!
        table[o + Shard.ADDRESS_HI] = shards[at + Shard.ADDRESS_HI]!
        table[o + Shard.FIRST_PAGE] = firstPage
        table[o + Shard.COUNT] = take
        table[o + Shard.SLOT] = slot
        table[o + Shard.BATCH_INDEX] = batchIndex
        table[o + Shard.MIX_LO] = shards[at + Shard.MIX_LO]!
        table[o + Shard.MIX_HI] = shards[at + Shard.MIX_HI]!
        firstPage += take, slot += take, batchIndex += take, count -= take, room -= take
        if (room === 0) ends.push(n), (room = per)
      }
    }
    if (ends[ends.length - 1] !== n) ends.push(n)
    const task = (i: number): HashTask => ({
      shards: table.buffer as SharedArrayBuffer,
      from: i > 0 ? ends[i - 1]! : 0,
      to: ends[i]!,
      keys: this.pages.words.buffer as SharedArrayBuffer,
      flags: this.pages.flags.buffer as SharedArrayBuffer,
      candidates: candidates.buffer as SharedArrayBuffer,
      stable: this.stable.view(),
    })
    if (inline) {
      hashShards(task(0))
      return
    }
    const mine = share ? ends.length - 1 : -1 // the coordinator's share: the last
    const pool = this.workerPool()
    const running: Promise<unknown>[] = []
    for (let i = 0; i < ends.length; i++) if (i !== mine) running.push(pool.run(task(i)))
    if (mine >= 0) hashShards(task(mine))
    return Promise.all(running).then(() => undefined)
  }

  /** Decides, page by page, what each page of the batch becomes; then carries it out. */
  private process(b: Batch, mergeNow: boolean): void {
    const { shards, n, held, candidates } = b
    const owners = this.lists.owners.clear()
    let planned = 0
    for (let i = 0; i < n; i++) {
      const o = i * SHARD_FIELDS, r = held[i]!
      const batchIndex = shards[o + Shard.BATCH_INDEX]!, count = shards[o + Shard.COUNT]!
      this.plan.fill(Plan.NONE, batchIndex, batchIndex + count)
      if (this.byId.get(r.id) !== r) continue // unregistered while its pages were being hashed
      this.c.pagesScanned += count
      this.c.inScan += count
      planned += this.planShard(shards, o, candidates, owners, mergeNow)
    }
    // most batches of a background scan plan nothing (merged or unique pages): no bridge work
    if (planned === 0) return
    this.applyZero(b)
    this.applyStable(owners, b)
    const failure = this.bridgeError
    this.bridgeError = undefined
    if (failure) throw failure
  }

  // The loops over a batch's pages or extents are methods of their own with nothing after the
  // loop (see workers/hash.ts: V8 optimizes a long loop while it runs, and code after it that had
  // never run would throw that code away at once, to be compiled again).

  /** Plans each page of a shard (the record at `o`): dropped as zero, onto a stable page, or left as it is. Returns the pages planned. */
  private planShard(shards: Int32Array, o: number, candidates: Int32Array, owners: U32List, mergeNow: boolean): number {
    const slot = shards[o + Shard.SLOT]!, count = shards[o + Shard.COUNT]!, batchIndex = shards[o + Shard.BATCH_INDEX]!
    const { words, flags } = this.pages
    const { plan, planNode, zero } = this
    const st = this.stable
    const useZero = this.options.useZeroPages
    // Unstable entries that can no longer pair: merged (their words hold a node), pending, dropped;
    // and a slot that is not HASHED belongs to no page now (its buffer was collected, the slot freed).
    const busy = Flag.MERGED | Flag.PENDING | Flag.ZERO
    const zeroLo = zero.lo ^ shards[o + Shard.MIX_LO]!, zeroHi = zero.hi ^ shards[o + Shard.MIX_HI]!
    let planned = 0
    for (let k = 0; k < count; k++) {
      const s = slot + k, bi = batchIndex + k
      const f = flags[s]!
      if (notHashed(f)) continue // merged, or given back: not read, not hashed
      const lo = words[2 * s]!, hi = words[2 * s + 1]!
      if (useZero && lo === zeroLo && hi === zeroHi) {
        plan[bi] = Plan.ZERO
        planned++
        continue
      }
      if (!mergeNow && f & (Flag.CHANGED | Flag.NEW)) {
        if (f & Flag.CHANGED) this.c.volatile++
        continue
      }
      // The stable index first (the worker's answer, or this batch's new stable pages) ...
      let head = candidates[bi]!
      // the worker may have searched while this thread changed the table: trust only a live match
      if (head < 0 || st.sharers[head] === 0 || st.keyLo[head] !== lo || st.keyHi[head] !== hi) head = st.find(lo, hi)
      let node = head >= 0 ? this.roomIn(head) : -1
      if (node < 0) {
        // ... then the unstable one: two unmerged pages meet, and the earlier one's memory
        // becomes a new stable page (a dup in its content's chain when the others are full).
        const other = this.unstable.findOrInsert(s, flags, Flag.HASHED, busy)
        if (other < 0) continue
        node = st.create(lo, hi, NO_POOL)
        st.insert(node, head)
        st.sharers[node] = 1
        this.sharersTotal++
        words[2 * other] = node
        words[2 * other + 1] = 0
        flags[other] = flags[other]! | Flag.PENDING
        owners.push(other)
      }
      st.sharers[node]!++ // counted now so that maxPageSharing holds within the batch
      this.sharersTotal++
      plan[bi] = Plan.STABLE
      planned++
      planNode[bi] = node
    }
    return planned
  }

  private applyZero({ shards, n, held }: Batch): void {
    const ext = this.lists.zero.clear() // [id, page, count, first slot]
    for (let i = 0; i < n; i++) this.zeroRuns(shards, i * SHARD_FIELDS, held[i]!.id, ext)
    const status = this.callBridge('dropZero', ext, 4, 3, 2)
    const dropped = this.markZero(status, ext)
    this.c.zeroPages += dropped
    this.c.mergedThisScan += dropped
  }

  /** The runs of pages planned as zero of the shard at `o`, as extents [id, page, count, first slot]. */
  private zeroRuns(shards: Int32Array, o: number, id: number, ext: U32List): void {
    const plan = this.plan
    const firstPage = shards[o + Shard.FIRST_PAGE]!, count = shards[o + Shard.COUNT]!
    const slot = shards[o + Shard.SLOT]!, batchIndex = shards[o + Shard.BATCH_INDEX]!
    for (let k = 0; k < count; ) {
      if (plan[batchIndex + k] !== Plan.ZERO) {
        k++
        continue
      }
      let end = k
      while (end < count && end - k < MAX_EXTENT_PAGES && plan[batchIndex + end] === Plan.ZERO) end++
      ext.push4(id, firstPage + k, end - k, slot + k)
      k = end
    }
  }

  /** Flags the pages of the extents dropped; returns how many. */
  private markZero(status: Int32Array, ext: U32List): number {
    const e = ext.data, flags = this.pages.flags
    let dropped = 0
    for (let i = 0; i < status.length; i++) {
      if (status[i] !== Status.OK) continue
      const first = e[4 * i + 3]!, count = e[4 * i + 2]!
      for (let s = first; s < first + count; s++) flags[s] = (flags[s]! | Flag.ZERO) & ~Flag.OWNER
      dropped += count
    }
    return dropped
  }

  /**
   * Makes the planned stable pages, then maps the planned pages onto them. Each run of owners'
   * pages becomes pool pages in place; until the bridge says where, their nodes hold provisional
   * pool numbers (contiguous within a run, a gap between runs), so that the merge extents can be
   * planned first and each run made only if the merges onto it fit the mapping budget too.
   */
  private applyStable(ownerList: U32List, b: Batch): void {
    const owners = ownerList.view().sort()
    const runList = this.ownerRuns(owners) // [id, page, count, follow, first slot, first provisional number]
    const runs = runList.view()
    const mergeList = this.planMerges(b) // [id, page, pool, count, slot, batch index]
    const merges = mergeList.view()
    countFollowers(runs, merges)
    // A run the budget refuses costs the pages that would have merged onto it, counted below, not its own.
    const status = this.callBridge('stabilize', runList, 6, 4, undefined)
    this.settleRuns(status, runs)
    this.clearPending(owners) // owners whose region went away before the run was made
    // Provisional numbers become pool pages; merges onto a run that was not made are dropped. The
    // merges onto new runs go first: their room in the budget was kept by stabilize().
    // onNew reuses the merges' own list, written behind where it is read (never ahead of it)
    const onNew = mergeList, onOld = this.lists.onOld.clear()
    onNew.length = this.placeMerges(merges, runs, status, onOld)
    onNew.append(onOld)
    this.dropRunsNotMade(status, runs) // before the merges' call reuses the status array
    this.applyMerges(onNew)
    this.dropOrphans(owners)
  }

  /**
   * The owners' runs of consecutive pages (at most MAX_EXTENT_PAGES, within a region), as
   * records [id, page, count, follow, first slot, first provisional number]; each owner's node
   * gets its provisional pool number.
   */
  private ownerRuns(owners: Uint32Array): U32List {
    const { words } = this.pages
    const pool = this.stable.pool
    const runList = this.lists.runs.clear()
    let next = 0
    for (let i = 0; i < owners.length; ) {
      const r = this.regionOfSlot(owners[i]!)
      let j = i + 1
      if (r) while (j < owners.length && j - i < MAX_EXTENT_PAGES && owners[j] === owners[j - 1]! + 1 && owners[j]! < r.slot + r.pages) j++
      if (r) {
        runList.push6(r.id, owners[i]! - r.slot, j - i, 0, owners[i]!, next)
        for (let k = 0; k < j - i; k++) pool[words[2 * (owners[i]! + k)]!] = PROVISIONAL | (next + k)
        next += j - i + 1
      }
      i = j
    }
    return runList
  }

  /** Each run's pages: made stable (their nodes get pool pages) or, if the run was not made, hashed afresh next time. */
  private settleRuns(status: Int32Array, runs: Uint32Array): void {
    const { flags, words } = this.pages
    const pool = this.stable.pool
    const outPool = this.scratch.outPool // first pool page of each run made
    for (let n = 0; n < status.length; n++) {
      const ok = status[n] === Status.OK, first = runs[6 * n + 4]!, count = runs[6 * n + 2]!
      for (let s = first; s < first + count; s++) {
        const node = words[2 * s]!
        flags[s] = flags[s]! & ~Flag.PENDING
        if (ok) {
          pool[node] = outPool[n]! + (s - first)
          flags[s] = flags[s]! | Flag.MERGED | Flag.OWNER
        } else {
          pool[node] = NO_POOL
          flags[s] = flags[s]! & ~Flag.HASHED // its words hold the node now: hashed afresh next time
        }
      }
    }
  }

  private clearPending(owners: Uint32Array): void {
    const flags = this.pages.flags
    for (let i = 0; i < owners.length; i++) {
      const s = owners[i]!
      if (flags[s]! & Flag.PENDING) flags[s] = flags[s]! & ~(Flag.PENDING | Flag.HASHED)
    }
  }

  /**
   * Rewrites the merges onto new runs in place, at the front, with their pool pages; moves the
   * merges onto older stable pages to `onOld`; drops the merges onto runs not made. Returns the
   * length the front now has.
   */
  private placeMerges(merges: Uint32Array, runs: Uint32Array, status: Int32Array, onOld: U32List): number {
    const outPool = this.scratch.outPool
    let written = 0
    for (let m = 0; m < merges.length; m += 6) {
      const first = merges[m + 2]!, count = merges[m + 3]!
      if (!(first & PROVISIONAL)) {
        onOld.push6(merges[m]!, merges[m + 1]!, first, count, merges[m + 4]!, merges[m + 5]!)
        continue
      }
      const n = runOf(runs, first)
      if (status[n] !== Status.OK) {
        if (status[n] === Status.BUDGET) this.c.skipped += count // the budget refused the run: its merges are skipped too
        for (let k = 0; k < count; k++) this.dropSharer(this.planNode[merges[m + 5]! + k]!)
        continue
      }
      if (written !== m) merges.copyWithin(written, m, m + 6)
      merges[written + 2] = outPool[n]! + ((first & ~PROVISIONAL) - runs[n * 6 + 5]!)
      written += 6
    }
    return written
  }

  /** The owners of runs that were not made no longer share their node. */
  private dropRunsNotMade(status: Int32Array, runs: Uint32Array): void {
    const words = this.pages.words
    for (let n = 0; n < status.length; n++) if (status[n] !== Status.OK) for (let k = 0; k < runs[6 * n + 2]!; k++) this.dropSharer(words[2 * (runs[6 * n + 4]! + k)]!)
  }

  /** Owners whose region went away meanwhile no longer share their node. */
  private dropOrphans(owners: Uint32Array): void {
    const words = this.pages.words
    for (let i = 0; i < owners.length; i++) if (!this.regionOfSlot(owners[i]!)) this.dropSharer(words[2 * owners[i]!]!)
  }

  /** The merge extents of the batch's planned pages: runs of pages planned onto consecutive pool pages. */
  private planMerges({ shards, n, held }: Batch): U32List {
    const ext = this.lists.merges.clear()
    for (let i = 0; i < n; i++) this.mergeRuns(shards, i * SHARD_FIELDS, held[i]!.id, ext)
    return ext
  }

  /** The part of planMerges() of the shard at `o`: extents [id, page, pool, count, slot, batch index]. */
  private mergeRuns(shards: Int32Array, o: number, id: number, ext: U32List): void {
    const { plan, planNode } = this
    const pool = this.stable.pool
    const firstPage = shards[o + Shard.FIRST_PAGE]!, count = shards[o + Shard.COUNT]!
    const slot = shards[o + Shard.SLOT]!, batchIndex = shards[o + Shard.BATCH_INDEX]!
    for (let k = 0; k < count; ) {
      const bi = batchIndex + k
      if (plan[bi] !== Plan.STABLE) {
        k++
        continue
      }
      const first = pool[planNode[bi]!]!
      if (first === NO_POOL) {
        this.dropSharer(planNode[bi]!) // its stable page could not be made
        k++
        continue
      }
      let end = k + 1
      while (end < count && end - k < MAX_EXTENT_PAGES && plan[batchIndex + end] === Plan.STABLE && pool[planNode[batchIndex + end]!] === first + (end - k)) end++
      ext.push6(id, firstPage + k, first, end - k, slot + k, bi)
      k = end
    }
  }

  private applyMerges(ext: U32List): void {
    const status = this.callBridge('merge', ext, 6, 4, 3) // records [id, page, pool, count, slot, batch index]
    this.c.mergedThisScan += this.markMerged(status, ext.data)
  }

  /** Maps the pages of the extents merged onto their nodes; the others no longer share them. Returns the pages merged. */
  private markMerged(status: Int32Array, e: Uint32Array): number {
    const { planNode } = this
    const { flags, words } = this.pages
    let merged = 0
    for (let i = 0; i < status.length; i++) {
      const ok = status[i] === Status.OK, count = e[6 * i + 3]!, slot = e[6 * i + 4]!, at = e[6 * i + 5]!
      for (let k = 0; k < count; k++) {
        const node = planNode[at + k]!, s = slot + k
        if (!ok) {
          this.dropSharer(node)
          continue
        }
        flags[s] = (flags[s]! | Flag.MERGED) & ~Flag.OWNER
        words[2 * s] = node
        words[2 * s + 1] = 0
      }
      if (ok) merged += count
    }
    return merged
  }

  /**
   * Carries out extents in one bridge call and returns each one's status (a view of a reused
   * array: read it before the next call). `list` holds `stride` numbers per extent, of which the
   * first `nativeStride` are the bridge's record and the one at `countAt` its page count. The
   * bridge leaves alone (and reports) extents that would pass the mapping budget; their pages (at
   * `countAt`, if given) are counted as skipped. A failure is kept for process() to throw once the
   * batch's bookkeeping follows what was done. stabilize() writes each run's first pool page into
   * scratch.outPool.
   */
  private callBridge(op: 'dropZero' | 'stabilize' | 'merge', list: U32List, stride: number, nativeStride: number, countAt: number | undefined): Int32Array {
    const records = list.data
    const n = list.length / stride
    const scratch = this.scratch
    if (scratch.extents.length < n * nativeStride) scratch.extents = new Uint32Array(sharedBytes(4 * 2 * n * nativeStride))
    if (scratch.status.length < n) (scratch.status = new Int32Array(sharedBytes(4 * 2 * n))), (scratch.outPool = new Uint32Array(sharedBytes(4 * 2 * n)))
    const status = scratch.status.subarray(0, n)
    if (n === 0) return status
    const extents = scratch.extents.subarray(0, n * nativeStride)
    pack(records, extents, n, stride, nativeStride)
    status.fill(0)
    const budget = this.options.mapBudget
    if (op === 'dropZero') this.arena.dropZero(extents, status, budget)
    else if (op === 'stabilize') this.arena.stabilize(extents, status, budget, scratch.outPool.subarray(0, n))
    else this.arena.merge(extents, status, budget)
    if (countAt !== undefined) this.c.skipped += skippedPages(status, records, stride, countAt)
    // -errno: the batch is finished (its bookkeeping follows what was done), then process() throws
    const failed = firstFailure(status)
    if (failed < 0) this.bridgeError ??= systemError(failed, op, `the bridge could not ${op === 'dropZero' ? 'drop zero pages' : op === 'stabilize' ? 'make stable pages' : 'merge pages'}; what was merged before stays merged`)
    return status
  }

  // ---- unmerging ------------------------------------------------------------------------------

  /**
   * Makes every page of the region private again (unmapping no budget: giving pages back must not
   * be refused). If the kernel refuses part of it (ENOMEM near vm.max_map_count), the rest stays
   * merged and readable, the bookkeeping follows what the bridge says was done, and the error is
   * thrown.
   */
  private unmergeRegion(region: Region): void {
    const status = new Int32Array(1)
    this.arena.unmerge(new Uint32Array([region.id, 0, region.pages]), status, Number.MAX_SAFE_INTEGER)
    const { flags, words } = this.pages
    const states = new Uint8Array(region.pages), pools = new Uint32Array(region.pages)
    const buffer = region.ref.deref()
    if (buffer) this.arena.pageStates(buffer, 0, region.pages, states, pools)
    for (let k = 0; k < region.pages; k++) {
      const s = region.slot + k, f = flags[s]!
      if (buffer && states[k] === PageState.MERGED) continue // left merged by a failed unmerge
      if (f & Flag.MERGED) this.dropSharer(words[2 * s]!)
      if (f & Flag.ZERO) this.c.zeroPages--
      flags[s] = f & ~(Flag.MERGED | Flag.OWNER | Flag.ZERO | (f & Flag.MERGED ? Flag.HASHED : 0))
    }
    if (status[0]! < 0) throw systemError(status[0]!, 'mremap', 'cannot make every page private again (the others stay merged, and every page reads its bytes)')
  }

  unmergeAll(): Promise<void> {
    this.assertOpen('unmergeAll')
    return this.exclusive(() => {
      for (const r of this.regions) {
        this.unmergeRegion(r)
        const sab = r.ref.deref()
        if (sab) this.advise(sab, false), this.advise(sab, true) // ksmd's merges undone too; it may merge again, as we may
      }
      this.unstable.reset(this.slotTop)
    })
  }

  // ---- options, stats, closing ----------------------------------------------------------------

  setOptions(next: ResolvedOptions): void {
    this.assertNotInCallback('setOptions')
    if (next.engine !== this.options.engine)
      throw error(ErrorCode.BUSY, 'options.engine is fixed when the PageMerger is made (its buffers are allocated for it)')
    const sharing = this.stable.live > 0
    if (sharing && next.maxPageSharing !== this.options.maxPageSharing)
      throw error(ErrorCode.BUSY, 'options.maxPageSharing cannot change while pages are shared (unmergeAll() first), like the kernel\'s EBUSY')
    if (sharing && next.mergeAcrossDomains !== this.options.mergeAcrossDomains)
      throw error(ErrorCode.BUSY, 'options.mergeAcrossDomains cannot change while pages are shared (unmergeAll() first)')
    if (next.workers !== this.options.workers && this.pool) {
      // A scan in progress may still have tasks on the old pool: end it after what is queued.
      const old = this.pool
      this.pool = undefined
      void this.exclusive(() => old.destroy())
    }
    if (next.mergeAcrossDomains !== this.options.mergeAcrossDomains) this.unstable.reset(this.slotTop) // keys change
    this.options = next
  }

  /**
   * What onProgress reports, from the counters alone: stats() also asks the bridge and the kernel
   * (a system call or a procfs read), which at a report per batch was a tenth of a background
   * scan's CPU while it merged.
   */
  private progress(scansBefore: number): MergeProgress {
    return { pagesScanned: this.c.inScan, pagesTotal: this.trackedPages, fullScans: this.c.fullScans - scansBefore, pagesSharing: this.sharersTotal - this.stable.live, zeroPages: this.c.zeroPages }
  }

  stats(): Stats {
    const st = this.stable
    const { chains, dups } = st.chains()
    const shared = st.live
    const tracked = this.trackedPages
    const bridge = this.arena.stats()
    const metadata = this.pages.bytes(this.slotTop) + st.bytes() + this.unstable.bytes() + bridge.metadataBytes
    const sharing = this.sharersTotal - shared
    const kernel: ProcessKsm = this.options.engine === 'userspace' ? {} : this.kernel.processCounters()
    return {
      pagesShared: shared,
      pagesSharing: sharing,
      pagesUnshared: this.c.fullScans > 0 ? this.c.lastUnshared : this.unstable.size,
      pagesVolatile: this.c.lastVolatile,
      fullScans: this.c.fullScans,
      pagesScanned: this.c.pagesScanned,
      stableNodeChains: chains,
      stableNodeDups: dups,
      zeroPages: this.c.zeroPages,
      generalProfit: (sharing + this.c.zeroPages) * PAGE_SIZE - metadata,
      pagesSkippedBudget: this.c.lastSkipped,
      metadataBytesPerPage: tracked ? metadata / tracked : 0,
      pagesTracked: tracked,
      unmergeBytes: sharing * PAGE_SIZE,
      kernelMergingPages: kernel.mergingPages ?? 0,
      kernelZeroPages: kernel.zeroPages ?? 0,
      writeProtection: bridge.writeProtection,
    }
  }

  close(): Promise<void> {
    this.assertNotInCallback('close')
    return this.closeAll()
  }

  private async closeAll(): Promise<void> {
    if (this.closed) return
    await this.stop()
    this.closed = true
    this.kernel.restore()
    await this.exclusive(async () => {
      await this.pool?.destroy()
      this.pool = undefined
    })
  }

  /** Throws CLOSED after close(), and BUSY from inside onProgress (see assertNotInCallback). */
  private assertOpen(method: string): void {
    if (this.closed) throw error(ErrorCode.CLOSED, 'this PageMerger was closed')
    this.assertNotInCallback(method)
  }

  /** Throws BUSY from inside onProgress, which runs in the middle of a scan. */
  private assertNotInCallback(method: string): void {
    if (this.inCallback) throw error(ErrorCode.BUSY, `pm.${method}() cannot be called from inside mergeNow()'s onProgress, which runs in the middle of a scan`)
  }

  /** Runs a user callback; the PageMerger refuses every call that changes it meanwhile. */
  private callback<T>(fn: (arg: T) => void, arg: T): void {
    this.inCallback = true
    try {
      fn(arg)
    } finally {
      this.inCallback = false
    }
  }
}

/** `n` rounded up to a multiple of `power` (a power of two), in integers: a division would make a heap number. */
function roundUp(n: number, power: number): number {
  return (n + power - 1) & -power
}

/** The flags of slots [from, to), ORed. */
function flagsOf(flags: Uint8Array, from: number, to: number): number {
  let any = 0
  for (let s = from; s < to; s++) any |= flags[s]!
  return any
}

/**
 * Dropped zero pages from `slot` on that pagemap shows present again (read or written since) are
 * pages like any other again: no longer ZERO, hashed from now on. Returns how many. The entries
 * are read as 32-bit words (bits 62 and 63, present and swapped, are the top two of each entry's
 * high word): a BigUint64Array element read is a BigInt allocated per page.
 */
function reviveTouched(flags: Uint8Array, slot: number, entries: BigUint64Array): number {
  const words = new Uint32Array(entries.buffer, entries.byteOffset, 2 * entries.length)
  let revived = 0
  for (let k = 0, s = slot; k < entries.length; k++, s++)
    if (flags[s]! & Flag.ZERO && words[2 * k + 1]! >>> 30 !== 0) (flags[s] = flags[s]! & ~Flag.ZERO), revived++
  return revived
}

/** Copies the first `nativeStride` numbers of each of `n` records of `stride` numbers into `extents`. */
function pack(records: Uint32Array, extents: Uint32Array, n: number, stride: number, nativeStride: number): void {
  for (let i = 0; i < n; i++) for (let k = 0; k < nativeStride; k++) extents[i * nativeStride + k] = records[i * stride + k]!
}

/** The pages of the extents that the mapping budget refused. */
function skippedPages(status: Int32Array, records: Uint32Array, stride: number, countAt: number): number {
  let pages = 0
  for (let i = 0; i < status.length; i++) if (status[i] === Status.BUDGET) pages += records[i * stride + countAt]!
  return pages
}

/** The first -errno among the statuses, or 0. */
function firstFailure(status: Int32Array): number {
  for (let i = 0; i < status.length; i++) if (status[i]! < 0) return status[i]!
  return 0
}

/** Counts, in each run's record, the merges planned onto it (its `follow`). */
function countFollowers(runs: Uint32Array, merges: Uint32Array): void {
  for (let m = 0; m < merges.length; m += 6) if (merges[m + 2]! & PROVISIONAL) runs[runOf(runs, merges[m + 2]!) * 6 + 3]!++
}

/** The run (records of 6: [..., first provisional number]) holding a provisional pool number: a binary search. */
function runOf(runs: Uint32Array, provisional: number): number {
  const at = provisional & ~PROVISIONAL
  let lo = 0, hi = runs.length / 6 - 1
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1
    if (runs[mid * 6 + 5]! <= at) lo = mid
    else hi = mid - 1
  }
  return lo
}

/** Checks the options of mergeNow() or start(); returns their onProgress. */
function progressOption(options: unknown, method: 'mergeNow' | 'start'): MergeNowOptions['onProgress'] {
  if (!isOptionsObject(options)) throw typeError(ErrorCode.INVALID_ARG, `${method}() options must be an object`)
  for (const key of Object.keys(options))
    if (key !== 'onProgress') throw typeError(ErrorCode.UNKNOWN_OPTION, `unknown option "${key}" of ${method}(); the only option is "onProgress"`)
  const { onProgress } = options as MergeNowOptions
  if (onProgress !== undefined && typeof onProgress !== 'function') throw typeError(ErrorCode.INVALID_ARG, `${method}() options.onProgress must be a function`)
  return onProgress
}

/** The SharedArrayBuffer behind a buffer from alloc(), or the SharedArrayBuffer itself. */
function sharedBufferOf(target: unknown): SharedArrayBuffer {
  if (target instanceof SharedArrayBuffer) return target
  if (ArrayBuffer.isView(target) && target.buffer instanceof SharedArrayBuffer && target.byteOffset === 0) return target.buffer
  if (ArrayBuffer.isView(target) || target instanceof ArrayBuffer)
    throw typeError(ErrorCode.FOREIGN_BUFFER, 'buffer must come from pm.alloc() (a view of the whole SharedArrayBuffer it returned)')
  throw typeError(ErrorCode.INVALID_ARG, 'buffer must be a Buffer from pm.alloc() or its SharedArrayBuffer')
}

