/**
 * The one file that loads the addon and gives it types. Policy lives elsewhere: these are the
 * bridge's syscall-sized primitives, exactly as native/ implements them.
 */
import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { error, ErrorCode } from './errors'

/** What a page of an allocation is mapped to (native/common.h PageState). */
export const PageState = { SHARED: 0, ANON: 1, MERGED: 2, WRITTEN: 3 } as const
/**
 * Per-extent results of arena calls (native/common.h Status); negative values are -errno.
 * BUDGET: the extent could take the process's mappings above the budget, so it was left alone.
 */
export const Status = { OK: 0, MISMATCH: 1, GONE: 2, BUDGET: 3 } as const
/** Pool page number meaning "none". */
export const NO_POOL = 0xffffffff
/** Bytes per page: the unit of hashing and merging. */
export const PAGE_SIZE = 4096

/** Buffers the bridge reads: a SharedArrayBuffer, an ArrayBuffer or a view of either. */
export type Bytes = SharedArrayBuffer | ArrayBuffer | ArrayBufferView

/** Counters of one arena, read under its lock. */
export interface ArenaStats {
  allocations: number
  trackedPages: number
  /** Pool pages that at least one page maps. */
  poolPages: number
  /** Pages mapping a pool page, summed over all pool pages. */
  poolMappings: number
  /** Bytes the OS holds for the arena file (st_blocks): own pages of shared windows plus pool pages. */
  arenaBytes: number
  reserveBytes: number
  usedOffsetBytes: number
  metadataBytes: number
  punchFailures: number
  /**
   * How writers are held off pages between their comparison and their remap (userfaultfd):
   * 'full' (threads and system calls wait), 'user' (threads wait; a system call writing into such
   * a page fails with EFAULT), 'none' (no userfaultfd: a write in that window can be lost).
   */
  writeProtection: 'full' | 'user' | 'none'
}

/** The arena: mergeable memory and the stable page pool (native/arena.cc). */
export interface NativeArena {
  /** Page-aligned memory of whole pages: a memfd window (`shared`) or private anonymous memory. */
  alloc(bytes: number, shared: boolean): SharedArrayBuffer
  idOf(buffer: Bytes): number
  /**
   * Records [id, page, count, follow]; makes each run pool pages, writing their first pool page to
   * outPool. `follow` merge extents will map them: their cuts must fit the budget too, and are held
   * for the next merge() call.
   */
  stabilize(extents: Uint32Array, status: Int32Array, budget: number, outPool: Uint32Array): number
  /** Records [id, page, poolPage, count]; verifies bytes, then remaps copy-on-write onto the pool. */
  merge(extents: Uint32Array, status: Int32Array, budget: number): number
  /** Records [id, page, count] of all-zero pages; verified, then given back to the OS. */
  dropZero(extents: Uint32Array, status: Int32Array, budget: number): number
  /** Records [id, page, count]; every page becomes private anonymous memory with the same bytes. */
  unmerge(extents: Uint32Array, status: Int32Array, budget: number): number
  /** Records [id, page, count]; merged pages written since stop counting as pool mappings (per extent in counts). */
  reapWritten(extents: Uint32Array, counts?: Int32Array): number
  comparePool(buffer: Bytes, page: number, poolPage: number, count?: number): -1 | 0 | 1
  pageStates(buffer: Bytes, firstPage: number, count: number, outState: Uint8Array, outPool: Uint32Array): number
  poolRefs(poolFirst: number, count: number, out: Uint32Array): number
  stats(): ArenaStats
  /**
   * madvise(MADV_MERGEABLE or MADV_UNMERGEABLE) over a private buffer (`alloc(bytes, false)`), for
   * the kernel's ksmd. Throws ERR_PAGEMERGE_NOT_PRIVATE for memfd windows, which the kernel ignores.
   */
  advise(buffer: Bytes, mergeable: boolean): void
}

/** See NativeBinding.Timer. */
export interface NativeTimer {
  /** Calls the callback once, `ms` from now; re-arming an armed timer moves it. */
  arm(ms: number): void
  cancel(): void
  /** Stops it for good and lets go of the callback. */
  close(): void
}

export interface NativeBinding {
  constants: {
    PAGE_SIZE: number
    NO_POOL: number
    STATUS_OK: number
    STATUS_MISMATCH: number
    STATUS_GONE: number
    STATUS_BUDGET: number
    STATE_SHARED: number
    STATE_ANON: number
    STATE_MERGED: number
    STATE_WRITTEN: number
    ERROR_CODES: string[]
  }
  /** xxh3-64 of each page of buffer[firstPage, firstPage+count) into out[outIndex...]. */
  hashPages(buffer: Bytes, firstPage: number, count: number, out: BigUint64Array, outIndex: number): number
  /**
   * hashPages for runs of live arena allocations given by address (what workers use: they hold no
   * buffers): `n` records [address, firstPage, count, outIndex] of `runs`, in one call. Returns the pages hashed.
   */
  hashRuns(runs: Float64Array, n: number, out: BigUint64Array): number
  comparePages(a: Bytes, pageA: number, b: Bytes, pageB: number, count?: number): -1 | 0 | 1
  /** The xxh3-64 of a page of zero bytes. */
  ZERO_PAGE_HASH: bigint
  /** VMAs of this process now. */
  mappingCount(): number
  maxMapCount(): number
  /** Raw /proc/self/pagemap entries of the pages. */
  pagemap(buffer: Bytes, firstPage: number, count: number, out: BigUint64Array): number
  /** Zeroed bytes in a private anonymous mapping of their own, unmapped when V8 frees the buffer. */
  mappedBuffer(bytes: number): SharedArrayBuffer
  /** Where the buffer's bytes are mapped (to match /proc/self/smaps ranges). */
  addressOf(buffer: Bytes): bigint
  Arena: new (reserveBytes?: number) => NativeArena
  /** A one-shot libuv timer calling `callback`; it does not keep the process alive (the background scanner's sleep). */
  Timer: new (callback: () => void) => NativeTimer
  /** prctl(PR_GET_MEMORY_MERGE): whether every anonymous region of this process is mergeable by ksmd. */
  memoryMerge(): boolean
  /** prctl(PR_SET_MEMORY_MERGE): needs CAP_SYS_RESOURCE; off unmerges every region of the process. */
  setMemoryMerge(on: boolean): void
  /** Per page of another process, RemotePage bits from /proc/PID/pagemap into out; pages, or -errno (-ESRCH: gone). */
  pagemapPresent(pid: number, address: bigint, pages: number, out: Uint8Array): number
  /** process_vm_readv of [address, pages] ranges, the xxh3 of each page into out (ranges back to back); status [pagesRead, -errno] per range. */
  remoteHash(pid: number, ranges: BigUint64Array, out: BigUint64Array, status: Int32Array): number
  /** Re-reads refs [pid (0: zeros), address] and members [ref, pid, address]; status/hashes (refs, then members): 0 equal, 1 differs, 2 ref unread, -errno; xxh3 now. */
  remoteCompare(refs: BigUint64Array, members: BigUint64Array, status: Int32Array, hashes: BigUint64Array): number
}

/** Bits pagemapPresent writes per page (native/remote.cc PageFlag). */
export const RemotePage = { PRESENT: 1, SWAPPED: 2, ZERO_PFN: 4, PFN_KNOWN: 8 } as const

let binding: NativeBinding | undefined

/** The package root: the nearest folder above this file with our package.json. */
function packageRoot(): string {
  let dir = __dirname
  while (!existsSync(join(dir, 'binding.gyp'))) {
    const up = dirname(dir)
    if (up === dir) return __dirname
    dir = up
  }
  return dir
}

/** Loads the addon once; throws ERR_PAGEMERGE_UNSUPPORTED off Linux, ERR_PAGEMERGE_ADDON_LOAD on failure. */
export function loadNative(): NativeBinding {
  if (binding) return binding
  if (process.platform !== 'linux')
    throw error(ErrorCode.UNSUPPORTED, `pagemerge merges pages on Linux only; this is ${process.platform}`)
  const root = packageRoot()
  const tried: string[] = []
  const override = process.env.PAGEMERGE_ADDON
  const candidates = override
    ? [override]
    : [join(root, 'build', 'Release', 'pagemerge.node'), join(root, 'build', 'Debug', 'pagemerge.node')]
  for (const file of candidates) {
    try {
      binding = require(file) as NativeBinding
      return binding
    } catch (err) {
      tried.push(`  ${file}: ${(err as Error).message.split('\n')[0]}`)
    }
  }
  throw error(
    ErrorCode.ADDON_LOAD,
    `cannot load the pagemerge addon. Tried:\n${tried.join('\n')}\n` +
      `Fix: build it with \`npm rebuild pagemerge\` (or \`npx node-gyp rebuild\` in ${root}); ` +
      `it needs python3, make and g++. PAGEMERGE_ADDON=/path/to/pagemerge.node overrides the search.`,
  )
}
