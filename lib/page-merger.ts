/**
 * The public face of pagemerge: a thin class over the private engine (lib/engine.ts), so that
 * what users can touch is exactly what is documented.
 */
import { Engine, type BufferStats, type MergeNowOptions, type StartOptions, type Stats } from './engine'
import type { KernelKsm } from './kernel'
import { error, ErrorCode, isOptionsObject, typeError } from './errors'
import { resolveOptions, validatePartial, type PageMergerOptions, type ResolvedOptions } from './options'

/** Options of alloc() and register(). */
export interface BufferOptions {
  /** Pages merge only with pages of the same domain (unless mergeAcrossDomains). Default: ''. */
  domain?: string
}

function domainOf(options: BufferOptions | undefined): string {
  if (options === undefined) return ''
  if (!isOptionsObject(options)) throw typeError(ErrorCode.INVALID_ARG, 'options must be an object')
  for (const key of Object.keys(options))
    if (key !== 'domain') throw typeError(ErrorCode.UNKNOWN_OPTION, `unknown option "${key}"; the only option is "domain"`)
  const { domain = '' } = options
  if (typeof domain !== 'string') throw typeError(ErrorCode.INVALID_ARG, 'options.domain must be a string')
  return domain
}

/**
 * Same-page merging for the buffers of this process: identical 4 KiB pages of registered
 * buffers come to share one physical page, copy-on-write, as Linux KSM does for virtual machines.
 *
 * @example
 * ```ts
 * import { PageMerger } from 'pagemerge'
 * const pm = new PageMerger()
 * const a = pm.alloc(32 << 20), b = pm.alloc(32 << 20)
 * a.fill(7); b.fill(7)
 * const stats = await pm.mergeNow()   // stats.pagesSharing: pages saved
 * await pm.close()                    // a and b stay valid
 * ```
 */
export class PageMerger {
  readonly #engine: Engine

  constructor(options?: PageMergerOptions) {
    this.#engine = new Engine(resolveOptions(options))
  }

  /** The options in force, defaults filled in. */
  get options(): ResolvedOptions {
    return this.#engine.options
  }

  /**
   * The kernel's own KSM: its knobs and counters, tuning (put back by close()), and prctl's
   * merge-any for the whole process. See docs/kernel.md.
   */
  get kernel(): KernelKsm {
    return this.#engine.kernel
  }

  /** Whether background scanning is on (start() called, stop() not yet). */
  get running(): boolean {
    return this.#engine.isRunning
  }

  /**
   * Allocates `byteLength` bytes of page-aligned, mergeable memory and registers it.
   * The Buffer is a view of a SharedArrayBuffer that worker threads can share.
   */
  alloc(byteLength: number, options?: BufferOptions): Buffer {
    return this.#engine.alloc(byteLength, domainOf(options))
  }

  /** Registers a buffer from alloc() again after unregister(). Registering twice is a no-op. */
  register(buffer: Buffer | SharedArrayBuffer, options?: BufferOptions): void {
    this.#engine.register(buffer, domainOf(options))
  }

  /** Makes the buffer's pages private again, then stops tracking it. Returns false if it was not registered. */
  unregister(buffer: Buffer | SharedArrayBuffer): boolean {
    return this.#engine.unregister(buffer)
  }

  /**
   * Scans at full speed, merging pages on first sight, until a full scan merges nothing new.
   * With engine 'kernel', waits for ksmd instead (see docs/kernel.md). `onProgress` is called
   * after every batch.
   */
  mergeNow(options?: MergeNowOptions): Promise<Stats> {
    return this.#engine.mergeNow(options)
  }

  /**
   * Starts background scanning: pagesToScan pages every sleepMillisecs ms (like run=1).
   * `onProgress` is called after every batch that changed what is saved and after every full scan.
   */
  start(options?: StartOptions): void {
    this.#engine.start(options)
  }

  /** Stops background scanning after the batch in progress (like run=0). */
  stop(): Promise<void> {
    return this.#engine.stop()
  }

  /** Makes every page private again; registrations are kept (like run=2). */
  unmergeAll(): Promise<void> {
    return this.#engine.unmergeAll()
  }

  /** Counters with the kernel's meanings (see docs/api.md). */
  stats(): Stats {
    return this.#engine.stats()
  }

  /** The counters of one registered buffer. */
  bufferStats(buffer: Buffer | SharedArrayBuffer): BufferStats {
    return this.#engine.bufferStats(buffer)
  }

  /** Changes options at run time, validated like sysfs writes. */
  setOptions(partial: PageMergerOptions): void {
    const current = this.#engine.options
    const next = validatePartial(current, partial)
    // a getter of `partial` that called setOptions() itself: merging over `current` would undo it
    if (this.#engine.options !== current) throw error(ErrorCode.BUSY, 'setOptions() was called again while its options were being read')
    this.#engine.setOptions(next)
  }

  /** Ends background scanning and the worker threads, and puts back ksmd knobs tuned through `kernel`. Buffers stay valid and readable. */
  close(): Promise<void> {
    return this.#engine.close()
  }
}
