/**
 * Every error pagemerge throws carries a stable `code`. Failed system calls keep Node's shape
 * instead: `code` is the errno name (`'EPERM'`), with `errno` and `syscall`.
 */
import { constants as osConstants } from 'node:os'

export const ErrorCode = Object.freeze({
  /** An argument has the wrong type. */
  INVALID_ARG: 'ERR_PAGEMERGE_INVALID_ARG',
  /** A number or a page range is outside what is allowed. */
  OUT_OF_RANGE: 'ERR_PAGEMERGE_OUT_OF_RANGE',
  /** A buffer or view does not start on a page boundary. */
  MISALIGNED: 'ERR_PAGEMERGE_MISALIGNED',
  /** The buffer was not allocated by this library (or by this PageMerger's arena). */
  FOREIGN_BUFFER: 'ERR_PAGEMERGE_FOREIGN_BUFFER',
  /** A merge named pool pages that are not live. */
  NOT_POOL_PAGE: 'ERR_PAGEMERGE_NOT_POOL_PAGE',
  /** The arena's file offsets are used up. */
  ARENA_FULL: 'ERR_PAGEMERGE_ARENA_FULL',
  /** Only private anonymous memory can be handed to the kernel's KSM (it ignores shared mappings). */
  NOT_PRIVATE: 'ERR_PAGEMERGE_NOT_PRIVATE',
  /** The native addon could not be loaded. */
  ADDON_LOAD: 'ERR_PAGEMERGE_ADDON_LOAD',
  /** Merging needs Linux. */
  UNSUPPORTED: 'ERR_PAGEMERGE_UNSUPPORTED',
  /** An option has a wrong type or value. */
  INVALID_OPTION: 'ERR_PAGEMERGE_INVALID_OPTION',
  /** An option name is not known. */
  UNKNOWN_OPTION: 'ERR_PAGEMERGE_UNKNOWN_OPTION',
  /** The change is not allowed in the current state (like the kernel's EBUSY). */
  BUSY: 'ERR_PAGEMERGE_BUSY',
  /** ksmd is not running, so waiting for it to merge would never end. */
  KSMD_STOPPED: 'ERR_PAGEMERGE_KSMD_STOPPED',
  /** The PageMerger was closed. */
  CLOSED: 'ERR_PAGEMERGE_CLOSED',
} as const)

export type ErrorCodeName = (typeof ErrorCode)[keyof typeof ErrorCode]

/**
 * Whether `value` can be an options object: an object, but not an array or a collection, whose
 * entries would otherwise be silently taken for no options at all.
 */
export function isOptionsObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return false
  return !(value instanceof Map || value instanceof Set || value instanceof WeakMap || value instanceof WeakSet)
}

/** An Error with a stable `code`. */
export interface CodedError extends Error {
  code: string
}

function withCode<E extends Error>(err: E, code: ErrorCodeName): E & CodedError {
  return Object.assign(err, { code })
}

export function typeError(code: ErrorCodeName, message: string): TypeError & CodedError {
  return withCode(new TypeError(message), code)
}

export function rangeError(code: ErrorCodeName, message: string): RangeError & CodedError {
  return withCode(new RangeError(message), code)
}

export function error(code: ErrorCodeName, message: string): Error & CodedError {
  return withCode(new Error(message), code)
}

/** A Node-style system error from a negative errno reported by the bridge. */
export function systemError(negErrno: number, syscall: string, what: string): Error & CodedError {
  const name = errnoName(-negErrno)
  return Object.assign(new Error(`${what}: ${syscall} failed with ${name}`), {
    code: name,
    errno: negErrno,
    syscall,
  })
}

function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(osConstants.errno)) if (value === errno) return name
  return `E${errno}`
}
