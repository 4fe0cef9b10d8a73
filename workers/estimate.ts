// Worker thread of the estimator: reads another process's resident pages and hashes them, or
// reads candidate pages again and compares them with their reference pages. Stateless but for
// scratch arrays reused between tasks; nothing of the target's memory outlives a native call.
import { constants as osConstants } from 'node:os'
import type { EstimateCompareResult, EstimateCompareTask, EstimateHashResult, EstimateHashTask } from '../lib/estimate'
import { loadNative, RemotePage } from '../lib/native'

const native = loadNative()
const { PRESENT, ZERO_PFN } = RemotePage
const ESRCH = osConstants.errno.ESRCH

let flags = new Uint8Array(8192)
/** Most pages between two ranges that still share a pagemap read (8 bytes of pagemap a page). */
const PAGEMAP_GAP = 256

/** Errors after which nothing more of the process can be read. */
const processWide = (errno: number) => errno === ESRCH || errno === osConstants.errno.EPERM || errno === osConstants.errno.EACCES

function hash(task: EstimateHashTask): EstimateHashResult {
  const { pid, ranges } = task
  const result: EstimateHashResult = { hashes: new BigUint64Array(0), pages: new Float64Array(0), unread: 0, swapped: 0, zeroMapped: 0, errno: 0, syscall: '' }
  const fail = (errno: number, syscall: string) => {
    if (!result.errno) Object.assign(result, { errno, syscall })
  }
  // Runs of resident pages (that are not the kernel's zero page), as page numbers. Ranges close
  // together share one pagemap read (with many small ranges, a read per range dominated).
  const runs: number[] = []
  for (let r = 0; r < ranges.length && !processWide(result.errno); ) {
    const spanFirst = ranges[r]!
    let end = r + 2
    while (end < ranges.length && ranges[end]! - (ranges[end - 2]! + ranges[end - 1]!) <= PAGEMAP_GAP) end += 2
    const span = ranges[end - 2]! + ranges[end - 1]! - spanFirst
    if (flags.length < span) flags = new Uint8Array(span)
    const got = native.pagemapPresent(pid, BigInt(spanFirst) << 12n, span, flags)
    if (got < 0) {
      fail(-got, 'read /proc/pid/pagemap')
      r = end
      continue
    }
    for (; r < end; r += 2) {
      const first = ranges[r]!, pages = ranges[r + 1]!, at = first - spanFirst
      let start = -1
      for (let k = 0; k <= pages; k++) {
        const f = k < pages ? flags[at + k]! : 0
        const take = (f & PRESENT) !== 0 && (f & ZERO_PFN) === 0
        if (take && start < 0) start = k
        else if (!take && start >= 0) {
          runs.push(first + start, k - start)
          start = -1
        }
        if (k < pages) {
          if (f & RemotePage.SWAPPED) result.swapped++
          if (f & ZERO_PFN) result.zeroMapped++
        }
      }
    }
  }
  const nruns = runs.length / 2
  let total = 0
  for (let i = 1; i < runs.length; i += 2) total += runs[i]!
  if (total === 0) return result
  const rangeWords = new BigUint64Array(runs.length)
  for (let i = 0; i < nruns; i++) {
    rangeWords[2 * i] = BigInt(runs[2 * i]!) << 12n
    rangeWords[2 * i + 1] = BigInt(runs[2 * i + 1]!)
  }
  const out = new BigUint64Array(total)
  const status = new Int32Array(2 * nruns)
  const hashed = native.remoteHash(pid, rangeWords, out, status)
  // Compact: each run's pages read are its first status[2i] pages.
  const hashes = hashed === total ? out : new BigUint64Array(hashed)
  const pages = new Float64Array(hashed)
  let from = 0, to = 0
  for (let i = 0; i < nruns; i++) {
    const first = runs[2 * i]!, len = runs[2 * i + 1]!, read = status[2 * i]!, err = -status[2 * i + 1]!
    if (hashes !== out) hashes.set(out.subarray(from, from + read), to)
    for (let k = 0; k < read; k++) pages[to + k] = first + k
    to += read
    from += len
    if (err) {
      result.unread += len - read
      fail(err, 'process_vm_readv')
    }
  }
  result.hashes = hashes
  result.pages = pages
  return result
}

function compare(task: EstimateCompareTask): EstimateCompareResult {
  const n = task.refs.length / 2 + task.members.length / 3
  const status = new Int32Array(n)
  const hashes = new BigUint64Array(n)
  native.remoteCompare(task.refs, task.members, status, hashes)
  return { status, hashes }
}

export default function estimateTask(task: EstimateHashTask | EstimateCompareTask): EstimateHashResult | EstimateCompareResult {
  return task.kind === 'hash' ? hash(task) : compare(task)
}
