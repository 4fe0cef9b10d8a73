/**
 * What the OS says about this process's memory, read from /proc as text. These are the numbers
 * that tests and the benchmark hold pagemerge to.
 */
import { readFileSync } from 'node:fs'
import { ErrorCode, rangeError, typeError } from './errors'

/** The largest pid Linux can hand out (PID_MAX_LIMIT on 64-bit). */
const PID_MAX_LIMIT = 4194304

/** Fields of /proc/self/smaps_rollup, in bytes (Rss, Pss, Pss_Anon, Pss_Shmem, Anonymous, ...). */
export type MemoryRollup = Record<string, number> & { Rss: number; Pss: number }

function parseKb(text: string): Record<string, number> {
  const out: Record<string, number> = {}
  for (const line of text.split('\n')) {
    const m = /^(\w+):\s+(\d+) kB$/.exec(line)
    if (m) out[m[1]!] = Number(m[2]) * 1024
  }
  return out
}

/**
 * /proc/<pid>/smaps_rollup in bytes.
 * @throws TypeError (ERR_PAGEMERGE_INVALID_ARG) unless pid is a number or 'self'; RangeError
 *   (ERR_PAGEMERGE_OUT_OF_RANGE) for a number that is not a pid; a system error (ENOENT) for a pid
 *   with no process
 */
export function smapsRollup(pid: number | 'self' = 'self'): MemoryRollup {
  if (pid !== 'self') {
    if (typeof pid !== 'number') throw typeError(ErrorCode.INVALID_ARG, "pid must be a number or 'self'")
    if (!Number.isInteger(pid) || pid < 1 || pid > PID_MAX_LIMIT) throw rangeError(ErrorCode.OUT_OF_RANGE, `pid must be an integer from 1 to ${PID_MAX_LIMIT}`)
  }
  return parseKb(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8')) as MemoryRollup
}

/** /proc/meminfo in bytes (MemAvailable, MemFree, Shmem, ...). */
export function meminfo(): Record<string, number> {
  return parseKb(readFileSync('/proc/meminfo', 'utf8'))
}

/**
 * Pss of the mappings that overlap [address, address + length), each counted once, from
 * /proc/self/smaps: what a span of buffers costs, without the noise of the rest of the process.
 * A mapping is counted whole, so give a span whose neighbours are not part of its mappings.
 */
export function rangePss(address: bigint, length: number): number {
  if (typeof address !== 'bigint') throw typeError(ErrorCode.INVALID_ARG, 'address must be a bigint')
  if (address < 0n || address >= 1n << 64n) throw rangeError(ErrorCode.OUT_OF_RANGE, 'address must be from 0 to 2^64 - 1')
  if (typeof length !== 'number') throw typeError(ErrorCode.INVALID_ARG, 'length must be a number')
  if (!Number.isSafeInteger(length) || length < 0) throw rangeError(ErrorCode.OUT_OF_RANGE, 'length must be a non-negative integer')
  const end = address + BigInt(length)
  let inside = false
  let pss = 0
  for (const line of readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const range = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line)
    if (range) {
      const lo = BigInt('0x' + range[1]), hi = BigInt('0x' + range[2])
      inside = lo < end && hi > address
      continue
    }
    if (inside && line.startsWith('Pss:')) pss += Number(/(\d+) kB/.exec(line)![1]) * 1024
  }
  return pss
}
