// Hostile and careless input (#7): every public entry point, given wrong types, NaN, negative and
// huge numbers, foreign or detached buffers, calls after close() and re-entrant calls from inside
// callbacks, refuses with a stable code and changes nothing: stats, options, running, every
// buffer's bytes and counters are as before, and no promise is left to reject unhandled.
import t, { type Test } from 'tap'
import { constants as bufferConstants } from 'node:buffer'
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import {
  ErrorCode,
  estimate,
  KernelKsm,
  PageMerger,
  rangePss,
  smapsRollup,
  type BufferStats,
  type EstimateOptions,
  type KsmKnobs,
  type ResolvedOptions,
  type Stats,
} from '../lib/index'
import { digest, fillRandom, PAGE } from './fixtures/util'


// ---- recording what happens ------------------------------------------------------------------

const unhandled: unknown[] = []
process.on('unhandledRejection', (reason) => unhandled.push(reason))

/** Counts calls of valueOf/toString on the "sneaky" values: validation must never coerce. */
let coercions = 0
const sneakyNumber = () => ({ valueOf: () => (coercions++, PAGE), toString: () => (coercions++, String(PAGE)) })
const sneakyString = () => ({ toString: () => (coercions++, 'self'), valueOf: () => (coercions++, 'self') })
const sneakyBoolean = () => ({ valueOf: () => (coercions++, true) })

/** A caller's own error, thrown from a getter or a Proxy trap: it must pass through as it is. */
class CallerError extends Error {}
const throwingGetter = (key: string) =>
  Object.defineProperty({}, key, { enumerable: true, get: () => { throw new CallerError(`getter ${key}`) } })
const throwingKeys = () => new Proxy({}, { ownKeys: () => { throw new CallerError('ownKeys trap') } })

type Expect =
  | { Class: ErrorConstructor; code: string }
  /** The caller's own error (a getter's or a trap's), unchanged. */
  | { caller: true }

const type = (code: string): Expect => ({ Class: TypeError, code })
const range = (code: string): Expect => ({ Class: RangeError, code })
const plain = (code: string): Expect => ({ Class: Error, code })
const CALLER: Expect = { caller: true }

type Outcome = { threw: unknown } | { returned: unknown }

function attempt(fn: () => unknown): Outcome {
  try {
    return { returned: fn() }
  } catch (err) {
    return { threw: err }
  }
}

const isThenable = (v: unknown): v is PromiseLike<unknown> =>
  (typeof v === 'object' || typeof v === 'function') && v !== null && typeof (v as { then?: unknown }).then === 'function'

/** Asserts how `o` failed. A promise returned instead is awaited (so nothing dangles) and fails the check. */
async function judge(t: Test, what: string, o: Outcome, want: Expect): Promise<void> {
  if ('returned' in o) {
    let how = 'returned'
    if (isThenable(o.returned)) {
      try {
        await o.returned
        how = 'returned a promise that resolved'
      } catch (err) {
        how = `returned a promise that rejected (${(err as { code?: string }).code ?? String(err)}) instead of throwing`
      }
    }
    t.fail(`${what}: accepted (${how})`)
    return
  }
  const err = o.threw as Error & { code?: unknown }
  if ('caller' in want) {
    t.ok(err instanceof CallerError, `${what}: the caller's own error, unchanged`)
    return
  }
  t.equal(err?.constructor, want.Class, `${what}: ${want.Class.name}`)
  t.equal(err?.code, want.code, `${what}: ${want.code}`)
}

// ---- what "nothing changed" means -------------------------------------------------------------

interface Snapshot {
  stats: Stats
  options: ResolvedOptions
  running: boolean
  digests: string[]
  buffers: Array<BufferStats | string>
}

function snapshot(pm: PageMerger, bufs: Uint8Array[]): Snapshot {
  return {
    stats: pm.stats(),
    options: pm.options,
    running: pm.running,
    digests: bufs.map(digest),
    buffers: bufs.map((b) => {
      try {
        return pm.bufferStats(b as Buffer)
      } catch (err) {
        return (err as { code: string }).code
      }
    }),
  }
}

/** A PageMerger with merged pages, zero pages, two domains, a unique buffer and an unregistered one. */
async function fixture() {
  const pm = new PageMerger({ workers: 1 })
  const a = pm.alloc(16 * PAGE).fill(7)
  const b = pm.alloc(16 * PAGE).fill(7)
  const c = fillRandom(pm.alloc(8 * PAGE), 7007)
  const z = pm.alloc(4 * PAGE).fill(0) // written zeros: dropped as zero pages
  const d = pm.alloc(5 * PAGE + 100, { domain: 'd' }).fill(7)
  const u = pm.alloc(2 * PAGE).fill(7)
  pm.unregister(u)
  await pm.mergeNow()
  const bufs = [a, b, c, z, d, u]
  const s = pm.stats()
  if (s.pagesShared === 0 || s.pagesSharing === 0 || s.zeroPages === 0) throw new Error(`the fixture did not merge: ${JSON.stringify(s)}`)
  return { pm, a, b, c, z, d, u, bufs }
}

type Fixture = Awaited<ReturnType<typeof fixture>>

/** Runs every case against one fixture: each must fail as expected and leave the snapshot as it was. */
async function table(t: Test, f: Fixture, cases: Array<[string, () => unknown, Expect]>): Promise<void> {
  const before = snapshot(f.pm, f.bufs)
  for (const [what, call, want] of cases) {
    await judge(t, what, attempt(call), want)
    t.strictSame(snapshot(f.pm, f.bufs), before, `${what}: nothing changed`)
  }
  // A scan or unmerge that a bad call queued would show by now.
  await new Promise((r) => setTimeout(r, 50))
  t.strictSame(snapshot(f.pm, f.bufs), before, 'nothing changed later either (nothing was queued)')
}

// ---- bad values, by kind ------------------------------------------------------------------------

/** Values that are not buffers at all: ERR_PAGEMERGE_INVALID_ARG. */
function notBuffers(f: Fixture): Array<[string, () => unknown]> {
  return [
    ['undefined', () => undefined],
    ['null', () => null],
    ['a number', () => 4096],
    ['NaN', () => NaN],
    ['a string', () => 'buffer'],
    ['a symbol', () => Symbol('buffer')],
    ['a bigint', () => 4096n],
    ['true', () => true],
    ['a function', () => () => f.a],
    ['an empty object', () => ({})],
    ['an array of bytes', () => [7, 7, 7]],
    ['an array holding the buffer', () => [f.a]],
    ['a look-alike { buffer, byteOffset, byteLength }', () => ({ buffer: f.a.buffer, byteOffset: 0, byteLength: f.a.byteLength })],
    ['an object with a side-effecting valueOf', sneakyNumber],
    ['a Proxy of a registered Buffer', () => new Proxy(f.a, {})],
    ['a Proxy of its SharedArrayBuffer', () => new Proxy(f.a.buffer, {})],
    ['an object with SharedArrayBuffer.prototype', () => Object.create(SharedArrayBuffer.prototype)],
    ['an object with Buffer.prototype', () => Object.create(Buffer.prototype)],
    ['a frozen object', () => Object.freeze({ byteLength: 4096 })],
  ]
}

/** Buffers that are not this PageMerger's (or not from its byte 0): ERR_PAGEMERGE_FOREIGN_BUFFER. */
function foreignBuffers(f: Fixture, other: Buffer): Array<[string, () => unknown]> {
  /** An ArrayBuffer detached by a transfer (Node 20 has no ArrayBuffer.prototype.transfer), and a view made before. */
  const detached = () => {
    const ab = new ArrayBuffer(PAGE)
    const view = new Uint8Array(ab)
    structuredClone(ab, { transfer: [ab] })
    if (ab.byteLength !== 0 || view.byteLength !== 0) throw new Error('the ArrayBuffer was not detached')
    return { ab, view }
  }
  return [
    ['Buffer.alloc()', () => Buffer.alloc(PAGE)],
    ['a Buffer from the pool (Buffer.from(string))', () => Buffer.from('pooled bytes')],
    ['Buffer.allocUnsafe() (pooled)', () => Buffer.allocUnsafe(100)],
    ['a plain SharedArrayBuffer', () => new SharedArrayBuffer(PAGE)],
    ['a view of a plain SharedArrayBuffer', () => new Uint8Array(new SharedArrayBuffer(PAGE))],
    ['a plain ArrayBuffer', () => new ArrayBuffer(PAGE)],
    ['another PageMerger\'s Buffer', () => other],
    ['another PageMerger\'s SharedArrayBuffer', () => other.buffer],
    ['a view not at byte 0 (subarray)', () => f.a.subarray(PAGE)],
    ['a view one byte in', () => Buffer.from(f.a.buffer, 1, PAGE)],
    ['a DataView not at byte 0', () => new DataView(f.a.buffer, PAGE)],
    ['a DataView of an ArrayBuffer', () => new DataView(new ArrayBuffer(8))],
    ['a detached ArrayBuffer', () => detached().ab],
    ['a view of an ArrayBuffer detached after it was made', () => detached().view],
  ]
}

/** Options objects of alloc()/register() that are wrong. */
const badBufferOptions: Array<[string, () => unknown, Expect]> = [
  ['options null', () => null, type(ErrorCode.INVALID_ARG)],
  ['options a string', () => 'd', type(ErrorCode.INVALID_ARG)],
  ['options a number', () => 5, type(ErrorCode.INVALID_ARG)],
  ['options a symbol', () => Symbol('d'), type(ErrorCode.INVALID_ARG)],
  ['options a bigint', () => 5n, type(ErrorCode.INVALID_ARG)],
  ['options a function', () => () => 'd', type(ErrorCode.INVALID_ARG)],
  ['domain a number', () => ({ domain: 5 }), type(ErrorCode.INVALID_ARG)],
  ['domain null', () => ({ domain: null }), type(ErrorCode.INVALID_ARG)],
  ['domain a symbol', () => ({ domain: Symbol('d') }), type(ErrorCode.INVALID_ARG)],
  ['domain a String object', () => ({ domain: new String('d') }), type(ErrorCode.INVALID_ARG)],
  ['domain with a side-effecting toString', () => ({ domain: sneakyString() }), type(ErrorCode.INVALID_ARG)],
  ['domain an array', () => ({ domain: ['d'] }), type(ErrorCode.INVALID_ARG)],
  ['a misspelt key', () => ({ Domain: 'd' }), type(ErrorCode.UNKNOWN_OPTION)],
  ['an extra key', () => ({ domain: 'd', priority: 1 }), type(ErrorCode.UNKNOWN_OPTION)],
  ['a frozen object with an unknown key', () => Object.freeze({ dom: 'd' }), type(ErrorCode.UNKNOWN_OPTION)],
  ['a Proxy with an unknown key', () => new Proxy({ bogus: 1 }, {}), type(ErrorCode.UNKNOWN_OPTION)],
  ['a Proxy with a bad domain', () => new Proxy({ domain: 1 }, {}), type(ErrorCode.INVALID_ARG)],
  ['a getter that throws', () => throwingGetter('domain'), CALLER],
  ['a Proxy whose ownKeys throws', throwingKeys, CALLER],
]

/** Options objects that are not plain objects but are taken as `{}` today. */
const objectLikeOptions: Array<[string, () => unknown]> = [
  ['an array', () => []],
  ['a Map', () => new Map([['domain', 'd']])],
]

// ---- PageMerger ----------------------------------------------------------------------------------

t.test('alloc(byteLength): wrong types, NaN, ±Infinity, negative, fractional, huge', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  const cases: Array<[string, unknown, Expect]> = [
    ['undefined', undefined, type(ErrorCode.INVALID_ARG)],
    ['null', null, type(ErrorCode.INVALID_ARG)],
    ['a numeric string', '4096', type(ErrorCode.INVALID_ARG)],
    ['an empty string', '', type(ErrorCode.INVALID_ARG)],
    ['a bigint', 4096n, type(ErrorCode.INVALID_ARG)],
    ['a symbol', Symbol('4096'), type(ErrorCode.INVALID_ARG)],
    ['true', true, type(ErrorCode.INVALID_ARG)],
    ['a Number object', new Number(PAGE), type(ErrorCode.INVALID_ARG)],
    ['an array of one number', [PAGE], type(ErrorCode.INVALID_ARG)],
    ['an object with side-effecting valueOf/toString', sneakyNumber(), type(ErrorCode.INVALID_ARG)],
    ['a Proxy', new Proxy({}, {}), type(ErrorCode.INVALID_ARG)],
    ['a frozen object', Object.freeze({}), type(ErrorCode.INVALID_ARG)],
    ['an object whose valueOf getter throws', throwingGetter('valueOf'), type(ErrorCode.INVALID_ARG)],
    ['a function', () => PAGE, type(ErrorCode.INVALID_ARG)],
    ['NaN', NaN, range(ErrorCode.OUT_OF_RANGE)],
    ['Infinity', Infinity, range(ErrorCode.OUT_OF_RANGE)],
    ['-Infinity', -Infinity, range(ErrorCode.OUT_OF_RANGE)],
    ['0', 0, range(ErrorCode.OUT_OF_RANGE)],
    ['-0', -0, range(ErrorCode.OUT_OF_RANGE)],
    ['-1', -1, range(ErrorCode.OUT_OF_RANGE)],
    ['-(2 ** 53)', -(2 ** 53), range(ErrorCode.OUT_OF_RANGE)],
    ['0.5', 0.5, range(ErrorCode.OUT_OF_RANGE)],
    ['4096.5', 4096.5, range(ErrorCode.OUT_OF_RANGE)],
    ['2 ** 53 (past MAX_SAFE_INTEGER)', 2 ** 53, range(ErrorCode.OUT_OF_RANGE)],
    ['Number.MAX_VALUE', Number.MAX_VALUE, range(ErrorCode.OUT_OF_RANGE)],
    ['2 ** 40 (past buffer.constants.MAX_LENGTH)', 2 ** 40, range(ErrorCode.OUT_OF_RANGE)],
    ['2 ** 52 (past buffer.constants.MAX_LENGTH)', 2 ** 52, range(ErrorCode.OUT_OF_RANGE)],
  ]
  await table(t, f, cases.map(([what, v, want]) => [`alloc(${what})`, () => f.pm.alloc(v as number), want]))
  t.equal(coercions, 0, 'no value was coerced (valueOf/toString never called)')
})

t.test('alloc(byteLength) past what a Buffer can hold: a code, nothing registered', async (t) => {
  // Its own PageMerger: the orphaned region would otherwise be scanned (and read, gigabytes) by later tests.
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  const a = pm.alloc(PAGE).fill(1)
  const before = snapshot(pm, [a])
  const bytes = bufferConstants.MAX_LENGTH + 1
  await judge(t, `alloc(${bytes})`, attempt(() => pm.alloc(bytes)), range(ErrorCode.OUT_OF_RANGE))
  t.strictSame(snapshot(pm, [a]), before, 'nothing changed: no region registered')
})

t.test('alloc(byteLength, options): bad options', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  await table(t, f, badBufferOptions.map(([what, v, want]) => [`alloc(4096, ${what})`, () => f.pm.alloc(PAGE, v() as object), want]))
  t.equal(coercions, 0, 'no value was coerced')
})

t.test('alloc()/register()/mergeNow() options that are not plain objects', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  const cases: Array<[string, () => unknown, Expect]> = []
  for (const [what, v] of objectLikeOptions) {
    cases.push([`alloc(4096, ${what})`, () => f.pm.alloc(PAGE, v() as object), type(ErrorCode.INVALID_ARG)])
    cases.push([`register(unregistered, ${what})`, () => f.pm.register(f.u, v() as object), type(ErrorCode.INVALID_ARG)])
    cases.push([`mergeNow(${what})`, () => f.pm.mergeNow(v() as object), type(ErrorCode.INVALID_ARG)])
  }
  await table(t, f, cases)
})

t.test('register(buffer): not a buffer, foreign, detached, not at byte 0', async (t) => {
  const f = await fixture()
  const other = new PageMerger({ workers: 1 })
  t.teardown(() => Promise.all([f.pm.close(), other.close()]))
  const theirs = other.alloc(2 * PAGE).fill(7)
  await table(t, f, [
    ...notBuffers(f).map(([what, v]): [string, () => unknown, Expect] => [`register(${what})`, () => f.pm.register(v() as Buffer), type(ErrorCode.INVALID_ARG)]),
    ...foreignBuffers(f, theirs).map(([what, v]): [string, () => unknown, Expect] => [`register(${what})`, () => f.pm.register(v() as Buffer), type(ErrorCode.FOREIGN_BUFFER)]),
    // options are checked too: on the unregistered buffer, an accepted call would show
    ...badBufferOptions.map(([what, v, want]): [string, () => unknown, Expect] => [`register(unregistered, ${what})`, () => f.pm.register(f.u, v() as object), want]),
  ])
  t.equal(other.stats().pagesTracked, 2, 'the other PageMerger is untouched')
  t.equal(coercions, 0, 'no value was coerced')
})

t.test('unregister(buffer) and bufferStats(buffer): not a buffer, foreign, detached, not at byte 0', async (t) => {
  const f = await fixture()
  const other = new PageMerger({ workers: 1 })
  t.teardown(() => Promise.all([f.pm.close(), other.close()]))
  const theirs = other.alloc(2 * PAGE).fill(7)
  const cases: Array<[string, () => unknown, Expect]> = []
  for (const [name, call] of [['unregister', (v: unknown) => f.pm.unregister(v as Buffer)], ['bufferStats', (v: unknown) => f.pm.bufferStats(v as Buffer)]] as const) {
    for (const [what, v] of notBuffers(f)) cases.push([`${name}(${what})`, () => call(v()), type(ErrorCode.INVALID_ARG)])
    for (const [what, v] of foreignBuffers(f, theirs)) cases.push([`${name}(${what})`, () => call(v()), type(ErrorCode.FOREIGN_BUFFER)])
  }
  cases.push(['bufferStats(an unregistered buffer)', () => f.pm.bufferStats(f.u), type(ErrorCode.FOREIGN_BUFFER)])
  await table(t, f, cases)
  t.equal(f.pm.unregister(f.u), false, 'unregister() of an unregistered buffer of ours: false, no error')
  t.equal(other.stats().pagesTracked, 2, 'the other PageMerger is untouched')
  t.same(other.bufferStats(theirs).pages, 2)
})

t.test('views that do start at byte 0 are the buffer itself (documented), not foreign', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  const sab = f.a.buffer as SharedArrayBuffer
  for (const [what, view] of [['its SharedArrayBuffer', sab], ['a DataView at 0', new DataView(sab)], ['a Float64Array at 0', new Float64Array(sab)], ['a shorter Buffer at 0', Buffer.from(sab, 0, 10)]] as const)
    t.strictSame(f.pm.bufferStats(view as Buffer), f.pm.bufferStats(f.a), `bufferStats(${what})`)
})

/** Bad options objects for mergeNow() and start(), which take the same: { onProgress }. */
function progressOptionCases(): Array<[string, unknown, Expect]> {
  return [
    ['null', null, type(ErrorCode.INVALID_ARG)],
    ['a number', 5, type(ErrorCode.INVALID_ARG)],
    ['a string', 'now', type(ErrorCode.INVALID_ARG)],
    ['a symbol', Symbol('now'), type(ErrorCode.INVALID_ARG)],
    ['a bigint', 5n, type(ErrorCode.INVALID_ARG)],
    ['true', true, type(ErrorCode.INVALID_ARG)],
    ['a function (the callback itself)', () => {}, type(ErrorCode.INVALID_ARG)],
    ['onProgress a number', { onProgress: 5 }, type(ErrorCode.INVALID_ARG)],
    ['onProgress null', { onProgress: null }, type(ErrorCode.INVALID_ARG)],
    ['onProgress a string', { onProgress: 'log' }, type(ErrorCode.INVALID_ARG)],
    ['onProgress an object', { onProgress: {} }, type(ErrorCode.INVALID_ARG)],
    ['onProgress a Proxy of an object', { onProgress: new Proxy({}, {}) }, type(ErrorCode.INVALID_ARG)],
    ['a misspelt key', { onprogress: () => {} }, type(ErrorCode.UNKNOWN_OPTION)],
    ['an extra key', { onProgress: () => {}, batch: 1 }, type(ErrorCode.UNKNOWN_OPTION)],
    ['a frozen object with an unknown key', Object.freeze({ progress: () => {} }), type(ErrorCode.UNKNOWN_OPTION)],
    ['a getter that throws', throwingGetter('onProgress'), CALLER],
    ['a Proxy whose ownKeys throws', throwingKeys(), CALLER],
  ]
}

t.test('mergeNow(options): bad options throw synchronously, nothing is queued', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  await table(t, f, progressOptionCases().map(([what, v, want]) => [`mergeNow(${what})`, () => f.pm.mergeNow(v as object), want]))
})

t.test('start(options): bad options throw synchronously, scanning does not start', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  await table(t, f, progressOptionCases().map(([what, v, want]) => [`start(${what})`, () => f.pm.start(v as object), want]))
  t.equal(f.pm.running, false, 'not scanning')
})

t.test('mergeNow({ onProgress }) whose callback throws: rejects with that error, bytes intact, the next scan works', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  const digests = f.bufs.map(digest)
  const mine = new CallerError('from the callback')
  await t.rejects(f.pm.mergeNow({ onProgress: () => { throw mine } }), mine)
  // A re-entrant call left uncaught in the callback: mergeNow() rejects with its code.
  await t.rejects(f.pm.mergeNow({ onProgress: () => void f.pm.alloc(PAGE) }), { code: ErrorCode.BUSY })
  t.strictSame(f.bufs.map(digest), digests, 'bytes intact')
  t.equal(f.pm.stats().pagesTracked, 16 + 16 + 8 + 4 + 6, 'no buffer added or lost')
  const s = await f.pm.mergeNow()
  t.ok(s.pagesSharing > 0, 'a later mergeNow() merges')
  t.strictSame(f.bufs.map(digest), digests, 'bytes still intact')
})

t.test('setOptions(partial): wrong types, NaN, ±Infinity, -0, huge, Proxy, frozen, throwing getters', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  const cases: Array<[string, unknown, Expect]> = [
    ['null', null, type(ErrorCode.INVALID_OPTION)],
    ['a number', 5, type(ErrorCode.INVALID_OPTION)],
    ['a string', 'fast', type(ErrorCode.INVALID_OPTION)],
    ['a symbol', Symbol('o'), type(ErrorCode.INVALID_OPTION)],
    ['a bigint', 5n, type(ErrorCode.INVALID_OPTION)],
    ['an array', [], type(ErrorCode.INVALID_OPTION)],
    ['a function', () => ({ pagesToScan: 5 }), type(ErrorCode.INVALID_OPTION)],
    ['pagesToScan a numeric string', { pagesToScan: '5' }, type(ErrorCode.INVALID_OPTION)],
    ['pagesToScan a bigint', { pagesToScan: 5n }, type(ErrorCode.INVALID_OPTION)],
    ['pagesToScan a symbol', { pagesToScan: Symbol('5') }, type(ErrorCode.INVALID_OPTION)],
    ['pagesToScan with a side-effecting valueOf', { pagesToScan: sneakyNumber() }, type(ErrorCode.INVALID_OPTION)],
    ['pagesToScan NaN', { pagesToScan: NaN }, type(ErrorCode.INVALID_OPTION)],
    ['pagesToScan null', { pagesToScan: null }, type(ErrorCode.INVALID_OPTION)],
    ['pagesToScan -0', { pagesToScan: -0 }, range(ErrorCode.INVALID_OPTION)],
    ['pagesToScan Infinity', { pagesToScan: Infinity }, range(ErrorCode.INVALID_OPTION)],
    ['pagesToScan 2 ** 32', { pagesToScan: 2 ** 32 }, range(ErrorCode.INVALID_OPTION)],
    ['sleepMillisecs -Infinity', { sleepMillisecs: -Infinity }, range(ErrorCode.INVALID_OPTION)],
    ['sleepMillisecs 2 ** 31', { sleepMillisecs: 2 ** 31 }, range(ErrorCode.INVALID_OPTION)],
    ['workers 2 ** 53', { workers: 2 ** 53 }, range(ErrorCode.INVALID_OPTION)],
    ['workers 0.5', { workers: 0.5 }, range(ErrorCode.INVALID_OPTION)],
    ['mapBudget 2 ** 53', { mapBudget: 2 ** 53 }, range(ErrorCode.INVALID_OPTION)],
    ['mapBudget -1', { mapBudget: -1 }, range(ErrorCode.INVALID_OPTION)],
    ['useZeroPages 1', { useZeroPages: 1 }, type(ErrorCode.INVALID_OPTION)],
    ['useZeroPages with a side-effecting valueOf', { useZeroPages: sneakyBoolean() }, type(ErrorCode.INVALID_OPTION)],
    ['mergeAcrossDomains "true"', { mergeAcrossDomains: 'true' }, type(ErrorCode.INVALID_OPTION)],
    ['engine a number', { engine: 1 }, type(ErrorCode.INVALID_OPTION)],
    ['engine "KERNEL"', { engine: 'KERNEL' }, range(ErrorCode.INVALID_OPTION)],
    ['a good key with a bad one (all or nothing)', { pagesToScan: 7, sleepMillisecs: -1 }, range(ErrorCode.INVALID_OPTION)],
    ['a good key with an unknown one', { pagesToScan: 7, pagesToscan: 7 }, type(ErrorCode.UNKNOWN_OPTION)],
    ['a Proxy with a bad value', new Proxy({ pagesToScan: 0 }, {}), range(ErrorCode.INVALID_OPTION)],
    ['a Proxy with an unknown key', new Proxy({ bogus: 1 }, {}), type(ErrorCode.UNKNOWN_OPTION)],
    ['a frozen object with a bad value', Object.freeze({ workers: 0 }), range(ErrorCode.INVALID_OPTION)],
    ['maxPageSharing while pages are merged', { maxPageSharing: 3 }, plain(ErrorCode.BUSY)],
    ['mergeAcrossDomains while pages are merged', { mergeAcrossDomains: true }, plain(ErrorCode.BUSY)],
    ['engine "kernel"', { engine: 'kernel' }, plain(ErrorCode.BUSY)],
    ['a getter that throws', throwingGetter('pagesToScan'), CALLER],
    ['a getter that throws, after a good key', Object.defineProperty({ sleepMillisecs: 5 }, 'pagesToScan', { enumerable: true, get: () => { throw new CallerError('late getter') } }), CALLER],
    ['a Proxy whose ownKeys throws', throwingKeys(), CALLER],
  ]
  await table(t, f, cases.map(([what, v, want]) => [`setOptions(${what})`, () => f.pm.setOptions(v as object), want]))
  t.equal(coercions, 0, 'no value was coerced')
  // Symbol keys and inherited keys are not options: ignored, and nothing changes.
  const before = snapshot(f.pm, f.bufs)
  f.pm.setOptions({ [Symbol('pagesToScan')]: 0 } as object)
  f.pm.setOptions(Object.create({ pagesToScan: 0 }))
  t.strictSame(snapshot(f.pm, f.bufs), before, 'symbol and inherited keys: ignored, nothing changed')
})

t.test('setOptions(): a Map is refused, not taken as {}', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  await table(t, f, [['setOptions(a Map)', () => f.pm.setOptions(new Map([['pagesToScan', 0]]) as object), type(ErrorCode.INVALID_OPTION)]])
})

t.test('setOptions({ workers, engine }) refused for engine: the worker threads are not replaced', async (t) => {
  const pm = new PageMerger({ workers: 2 })
  t.teardown(() => pm.close())
  pm.alloc(PAGE).fill(1) // starts the two worker threads
  const threads = () => readdirSync('/proc/self/task')
  await new Promise((r) => setTimeout(r, 300))
  const before = threads()
  await judge(t, 'setOptions({ workers: 1, engine: "kernel" })', attempt(() => pm.setOptions({ workers: 1, engine: 'kernel' })), plain(ErrorCode.BUSY))
  await pm.stop() // settles at once; then give ended threads time to go
  await new Promise((r) => setTimeout(r, 500))
  t.equal(pm.options.workers, 2, 'options unchanged')
  const after = new Set(threads())
  t.strictSame(before.filter((tid) => !after.has(tid)), [], 'every thread alive before is alive after (the workers were not ended)')
})

t.test('setOptions() from a getter of its own argument: the outer call is refused (BUSY), the inner one kept', async (t) => {
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  t.throws(
    () =>
      pm.setOptions({
        get pagesToScan() {
          pm.setOptions({ sleepMillisecs: 99 }) // a side effect of reading the argument
          return 5
        },
      }),
    { code: ErrorCode.BUSY },
    'the re-entered outer call',
  )
  t.equal(pm.options.pagesToScan, 100, 'the outer change is not made')
  t.equal(pm.options.sleepMillisecs, 99, 'the inner change, accepted at the time, is not undone')
})

// ---- after close() ------------------------------------------------------------------------------

t.test('after close(): changing calls throw CLOSED synchronously, reads work, close() again is fine', async (t) => {
  const f = await fixture()
  const digests = f.bufs.map(digest)
  const c1 = f.pm.close(), c2 = f.pm.close() // twice at once
  await Promise.all([c1, c2])
  await f.pm.close() // and again
  t.equal(f.pm.running, false)
  const before = snapshot(f.pm, f.bufs)
  await table(t, f, [
    ['alloc(4096)', () => f.pm.alloc(PAGE), plain(ErrorCode.CLOSED)],
    ['alloc(4096, { domain })', () => f.pm.alloc(PAGE, { domain: 'd' }), plain(ErrorCode.CLOSED)],
    ['register(an unregistered buffer)', () => f.pm.register(f.u), plain(ErrorCode.CLOSED)],
    ['register(a registered buffer)', () => f.pm.register(f.a), plain(ErrorCode.CLOSED)],
    ['mergeNow()', () => f.pm.mergeNow(), plain(ErrorCode.CLOSED)],
    ['mergeNow({ onProgress })', () => f.pm.mergeNow({ onProgress: () => {} }), plain(ErrorCode.CLOSED)],
    ['unmergeAll()', () => f.pm.unmergeAll(), plain(ErrorCode.CLOSED)],
    ['start()', () => f.pm.start(), plain(ErrorCode.CLOSED)],
  ])
  t.equal(f.pm.running, false, 'start() did not start anything')
  // What the docs say still works after close().
  t.strictSame(f.pm.stats(), before.stats, 'stats() works')
  t.strictSame(f.pm.bufferStats(f.a), before.buffers[0], 'bufferStats() works')
  await t.resolves(f.pm.stop(), 'stop() resolves')
  f.pm.setOptions({ pagesToScan: 5 })
  t.equal(f.pm.options.pagesToScan, 5, 'setOptions() works')
  t.equal(f.pm.unregister(f.b), true, 'unregister() works')
  t.throws(() => f.pm.bufferStats(f.b), { code: ErrorCode.FOREIGN_BUFFER }, 'and the buffer is no longer registered')
  t.strictSame(f.bufs.map(digest), digests, 'every buffer reads its bytes')
  await t.resolves(f.pm.close(), 'close() once more')
})

// ---- re-entrant calls from inside onProgress ---------------------------------------------------

t.test('inside onProgress: every call that changes the PageMerger throws BUSY and changes nothing; reads work', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  await f.pm.unmergeAll() // so that the scan below has work, and the callback runs mid-merge
  const digests = f.bufs.map(digest)
  const results: Array<[string, Outcome, Snapshot, Snapshot]> = []
  let reads: { stats: Stats; bufferStats: BufferStats; options: ResolvedOptions; running: boolean } | undefined
  const calls: Array<[string, () => unknown]> = [
    ['alloc(4096)', () => f.pm.alloc(PAGE)],
    ['alloc(bad)', () => f.pm.alloc(-1)], // BUSY or OUT_OF_RANGE: either way a code, nothing changed
    ['register(an unregistered buffer)', () => f.pm.register(f.u)],
    ['register(a registered buffer)', () => f.pm.register(f.a)],
    ['unregister(a registered buffer)', () => f.pm.unregister(f.b)],
    ['unregister(an unregistered buffer)', () => f.pm.unregister(f.u)],
    ['setOptions({ pagesToScan: 5 })', () => f.pm.setOptions({ pagesToScan: 5 })],
    ['setOptions({ workers: 2 })', () => f.pm.setOptions({ workers: 2 })],
    ['setOptions({ mergeAcrossDomains: true })', () => f.pm.setOptions({ mergeAcrossDomains: true })],
    ['mergeNow()', () => f.pm.mergeNow()],
    ['unmergeAll()', () => f.pm.unmergeAll()],
    ['start()', () => f.pm.start()],
  ]
  const s = await f.pm.mergeNow({
    onProgress: () => {
      if (reads) return
      for (const [what, call] of calls) {
        const before = snapshot(f.pm, f.bufs)
        const o = attempt(call)
        results.push([what, o, before, snapshot(f.pm, f.bufs)])
      }
      reads = { stats: f.pm.stats(), bufferStats: f.pm.bufferStats(f.a), options: f.pm.options, running: f.pm.running }
    },
  })
  t.ok(reads, 'the callback ran')
  for (const [what, o, before, after] of results) {
    const codes = what === 'alloc(bad)' ? [ErrorCode.BUSY, ErrorCode.OUT_OF_RANGE] : [ErrorCode.BUSY]
    if ('returned' in o) {
      t.fail(`${what}: accepted from inside onProgress`)
      if (isThenable(o.returned)) await Promise.resolve(o.returned).catch(() => {})
    } else t.ok(codes.includes((o.threw as { code?: string }).code as never), `${what}: ${codes.join(' or ')} (got ${(o.threw as { code?: string }).code})`)
    t.strictSame(after, before, `${what}: nothing changed`)
  }
  t.equal(reads?.stats.pagesTracked, s.pagesTracked, 'stats() worked inside')
  t.equal(reads?.bufferStats.pages, 16, 'bufferStats() worked inside')
  t.equal(reads?.options, f.pm.options, 'options worked inside, and are the same object after')
  t.equal(f.pm.running, false, 'start() started nothing')
  t.equal(f.pm.options.pagesToScan, 100, 'options unchanged')
  t.equal(s.pagesTracked, 16 + 16 + 8 + 4 + 6, 'no buffer added or removed')
  t.ok(s.pagesSharing > 0, 'the scan itself merged')
  t.strictSame(f.bufs.map(digest), digests, 'every buffer reads its bytes')
  await new Promise((r) => setTimeout(r, 50))
  t.strictSame(f.pm.stats(), s, 'nothing was queued by the refused calls')
})

t.test('inside onProgress: stop() and close() throw BUSY as documented (not a rejected promise)', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  await f.pm.unmergeAll()
  const digests = f.bufs.map(digest)
  const results: Array<[string, Outcome, Snapshot, Snapshot]> = []
  await f.pm.mergeNow({
    onProgress: () => {
      if (results.length) return
      for (const [what, call] of [['stop()', () => f.pm.stop()], ['close()', () => f.pm.close()]] as const) {
        const before = snapshot(f.pm, f.bufs)
        const o = attempt(call)
        if ('returned' in o && isThenable(o.returned)) Promise.resolve(o.returned).catch(() => {}) // judged below
        results.push([what, o, before, snapshot(f.pm, f.bufs)])
      }
    },
  })
  for (const [what, o, before, after] of results) {
    await judge(t, `${what} inside onProgress`, o, plain(ErrorCode.BUSY))
    t.strictSame(after, before, `${what}: nothing changed`)
  }
  t.doesNotThrow(() => f.pm.alloc(PAGE).fill(0), 'the PageMerger is still open')
  t.strictSame(f.bufs.map(digest), digests, 'every buffer reads its bytes')
})

// ---- KernelKsm -----------------------------------------------------------------------------------

/** A sysfs-like directory of plain files, removed after the test. */
function fakeSysfs(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'pagemerge-hostile-ksm-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const files = { run: '0', pages_to_scan: '100', sleep_millisecs: '20', max_page_sharing: '256', use_zero_pages: '0', stable_node_chains_prune_millisecs: '2000', pages_shared: '0', pages_sharing: '0', full_scans: '0' }
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text + '\n')
  return dir
}

/** Knobs as a caller without types may pass them. */
const knobs = (o: unknown) => o as KsmKnobs

const filesOf = (dir: string) => Object.fromEntries(readdirSync(dir).map((f) => [f, readFileSync(join(dir, f), 'utf8')]))

t.test('KernelKsm: tune(), mergeAny() and the constructor beyond test/kernel.ts', async (t) => {
  const sysfs = fakeSysfs(t)
  const k = new KernelKsm({ sysfs })
  const original = filesOf(sysfs)
  const cases: Array<[string, () => unknown, Expect]> = [
    ['tune(a symbol)', () => k.tune(Symbol('run') as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['tune(a bigint)', () => k.tune(1n as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['tune(a function)', () => k.tune((() => ({ run: 1 })) as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['tune(undefined)', () => k.tune(undefined as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['run a bigint', () => k.tune({ run: 1n } as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['run null', () => k.tune({ run: null } as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['run a symbol', () => k.tune({ run: Symbol('1') } as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['run with a side-effecting valueOf', () => k.tune({ run: sneakyNumber() } as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['run -1', () => k.tune(knobs({ run: -1 })), range(ErrorCode.OUT_OF_RANGE)],
    ['run 1.5', () => k.tune(knobs({ run: 1.5 })), range(ErrorCode.OUT_OF_RANGE)],
    ['pagesToScan 2 ** 53', () => k.tune({ pagesToScan: 2 ** 53 }), range(ErrorCode.OUT_OF_RANGE)],
    ['sleepMillisecs -Infinity', () => k.tune({ sleepMillisecs: -Infinity }), range(ErrorCode.OUT_OF_RANGE)],
    ['maxPageSharing -0', () => k.tune({ maxPageSharing: -0 }), range(ErrorCode.OUT_OF_RANGE)],
    ['advisorMode a symbol', () => k.tune({ advisorMode: Symbol('none') } as unknown as KsmKnobs), type(ErrorCode.INVALID_ARG)],
    ['a good knob, then a bad one', () => k.tune(knobs({ sleepMillisecs: 5, run: 9 })), range(ErrorCode.OUT_OF_RANGE)],
    ['a Proxy with a bad value', () => k.tune(knobs(new Proxy({ run: 5 }, {}))), range(ErrorCode.OUT_OF_RANGE)],
    ['a Proxy with an unknown key', () => k.tune(new Proxy({ pages_to_scan: 5 }, {}) as KsmKnobs), type(ErrorCode.UNKNOWN_OPTION)],
    ['a frozen object with a bad value', () => k.tune(knobs(Object.freeze({ run: 7 }))), range(ErrorCode.OUT_OF_RANGE)],
    ['a getter that throws', () => k.tune(throwingGetter('run') as KsmKnobs), CALLER],
    ['a getter that throws, after a good knob', () => k.tune(Object.defineProperty({ sleepMillisecs: 5 }, 'run', { enumerable: true, get: () => { throw new CallerError('late getter') } }) as KsmKnobs), CALLER],
    ['a Proxy whose ownKeys throws', () => k.tune(throwingKeys() as KsmKnobs), CALLER],
    ['mergeAny(1)', () => k.mergeAny(1 as unknown as boolean), type(ErrorCode.INVALID_ARG)],
    ['mergeAny("true")', () => k.mergeAny('true' as unknown as boolean), type(ErrorCode.INVALID_ARG)],
    ['mergeAny()', () => (k.mergeAny as (on?: boolean) => void)(), type(ErrorCode.INVALID_ARG)],
    ['mergeAny(null)', () => k.mergeAny(null as unknown as boolean), type(ErrorCode.INVALID_ARG)],
    ['mergeAny(a Boolean object)', () => k.mergeAny(new Boolean(true) as unknown as boolean), type(ErrorCode.INVALID_ARG)],
    ['mergeAny(with a side-effecting valueOf)', () => k.mergeAny(sneakyBoolean() as unknown as boolean), type(ErrorCode.INVALID_ARG)],
    ['new KernelKsm(null)', () => new KernelKsm(null as unknown as object), type(ErrorCode.INVALID_ARG)],
    ['new KernelKsm(5)', () => new KernelKsm(5 as unknown as object), type(ErrorCode.INVALID_ARG)],
    ['new KernelKsm({ sysfs: a symbol })', () => new KernelKsm({ sysfs: Symbol('x') } as unknown as object), type(ErrorCode.INVALID_ARG)],
    ['new KernelKsm({ procSelf: null })', () => new KernelKsm({ procSelf: null } as unknown as object), type(ErrorCode.INVALID_ARG)],
    ['new KernelKsm({ proc: with a side-effecting toString })', () => new KernelKsm({ proc: sneakyString() } as unknown as object), type(ErrorCode.INVALID_ARG)],
  ]
  for (const [what, call, want] of cases) {
    await judge(t, what, attempt(call), want)
    t.strictSame(filesOf(sysfs), original, `${what}: no file written`)
    t.strictSame(k.saved(), {}, `${what}: nothing saved`)
  }
  t.equal(coercions, 0, 'no value was coerced')
  // Symbol keys and inherited keys are not knobs: ignored, nothing written.
  k.tune({ [Symbol('run')]: 1 } as KsmKnobs)
  k.tune(Object.create({ run: 1 }))
  t.strictSame(filesOf(sysfs), original, 'symbol and inherited keys: nothing written')
  t.strictSame(k.saved(), {})
})

t.test('KernelKsm.tune(): NaN is a TypeError for every knob, as for sleepMillisecs', async (t) => {
  const sysfs = fakeSysfs(t)
  const k = new KernelKsm({ sysfs })
  await judge(t, 'tune({ sleepMillisecs: NaN })', attempt(() => k.tune({ sleepMillisecs: NaN })), type(ErrorCode.INVALID_ARG))
  await judge(t, 'tune({ run: NaN })', attempt(() => k.tune(knobs({ run: NaN }))), type(ErrorCode.INVALID_ARG))
  await judge(t, 'tune({ useZeroPages: NaN })', attempt(() => k.tune(knobs({ useZeroPages: NaN }))), type(ErrorCode.INVALID_ARG))
})

t.test('KernelKsm.tune(a Map) is refused, not taken as {}', async (t) => {
  const sysfs = fakeSysfs(t)
  const k = new KernelKsm({ sysfs })
  await judge(t, 'tune(a Map)', attempt(() => k.tune(new Map([['run', 1]]) as unknown as KsmKnobs)), type(ErrorCode.INVALID_ARG))
})

// ---- estimate() ------------------------------------------------------------------------------------

t.test('estimate(options): bad pids and ranges reject with a code (never throw), nothing read', async (t) => {
  const me = process.pid
  const one = (r: unknown) => ({ pids: [me], ranges: { [me]: [r] } })
  const cases: Array<[string, unknown, Expect]> = [
    ['pids a number', { pids: me }, type(ErrorCode.INVALID_OPTION)],
    ['pids a string', { pids: String(me) }, type(ErrorCode.INVALID_OPTION)],
    ['pids null', { pids: null }, type(ErrorCode.INVALID_OPTION)],
    ['pids a Set', { pids: new Set([me]) }, type(ErrorCode.INVALID_OPTION)],
    ['pids an array-like', { pids: { 0: me, length: 1 } }, type(ErrorCode.INVALID_OPTION)],
    ['pid a bigint', { pids: [BigInt(me)] }, type(ErrorCode.INVALID_OPTION)],
    ['pid a symbol', { pids: [Symbol('pid')] }, type(ErrorCode.INVALID_OPTION)],
    ['pid null', { pids: [null] }, type(ErrorCode.INVALID_OPTION)],
    ['pid with a side-effecting valueOf', { pids: [sneakyNumber()] }, type(ErrorCode.INVALID_OPTION)],
    ['pid -1', { pids: [-1] }, range(ErrorCode.INVALID_OPTION)],
    ['pid -0', { pids: [-0] }, range(ErrorCode.INVALID_OPTION)],
    ['pid 2 ** 40', { pids: [2 ** 40] }, range(ErrorCode.INVALID_OPTION)],
    ['pid 2 ** 53', { pids: [2 ** 53] }, range(ErrorCode.INVALID_OPTION)],
    ['pid Infinity', { pids: [Infinity] }, range(ErrorCode.INVALID_OPTION)],
    // NaN is a RangeError here, as in alloc(); options of the PageMerger make it a TypeError.
    ['pid NaN', { pids: [NaN] }, range(ErrorCode.INVALID_OPTION)],
    ['a good pid, then a bad one', { pids: [me, -1] }, range(ErrorCode.INVALID_OPTION)],
    ['ranges an array', { pids: [me], ranges: [] }, type(ErrorCode.INVALID_OPTION)],
    ['ranges null', { pids: [me], ranges: null }, type(ErrorCode.INVALID_OPTION)],
    ['ranges keyed by -1', { pids: [me], ranges: { '-1': [] } }, range(ErrorCode.INVALID_OPTION)],
    ['ranges keyed by NaN (a Map)', { pids: [me], ranges: new Map([[NaN, []]]) }, range(ErrorCode.INVALID_OPTION)],
    ['ranges of a pid not an array', { pids: [me], ranges: { [me]: { address: 0, bytes: 1 } } }, type(ErrorCode.INVALID_OPTION)],
    ['a range null', one(null), type(ErrorCode.INVALID_OPTION)],
    ['a range a number', one(4096), type(ErrorCode.INVALID_OPTION)],
    ['address a hex string', one({ address: '0x1000', bytes: PAGE }), type(ErrorCode.INVALID_OPTION)],
    ['address missing', one({ bytes: PAGE }), type(ErrorCode.INVALID_OPTION)],
    ['address with a side-effecting valueOf', one({ address: sneakyNumber(), bytes: PAGE }), type(ErrorCode.INVALID_OPTION)],
    ['address -1', one({ address: -1, bytes: PAGE }), range(ErrorCode.INVALID_OPTION)],
    ['address -1n', one({ address: -1n, bytes: PAGE }), range(ErrorCode.INVALID_OPTION)],
    ['address NaN', one({ address: NaN, bytes: PAGE }), range(ErrorCode.INVALID_OPTION)],
    ['address 2 ** 53', one({ address: 2 ** 53, bytes: PAGE }), range(ErrorCode.INVALID_OPTION)],
    ['address 0.5', one({ address: 0.5, bytes: PAGE }), range(ErrorCode.INVALID_OPTION)],
    ['bytes missing', one({ address: 0 }), type(ErrorCode.INVALID_OPTION)],
    ['bytes a bigint', one({ address: 0, bytes: 4096n }), type(ErrorCode.INVALID_OPTION)],
    ['bytes -1', one({ address: 0, bytes: -1 }), range(ErrorCode.INVALID_OPTION)],
    ['bytes NaN', one({ address: 0, bytes: NaN }), range(ErrorCode.INVALID_OPTION)],
    ['bytes Infinity', one({ address: 0, bytes: Infinity }), range(ErrorCode.INVALID_OPTION)],
    ['bytes 2 ** 53', one({ address: 0, bytes: 2 ** 53 }), range(ErrorCode.INVALID_OPTION)],
    ['top NaN', { pids: [me], top: NaN }, type(ErrorCode.INVALID_OPTION)],
    ['top 2 ** 53', { pids: [me], top: 2 ** 53 }, range(ErrorCode.INVALID_OPTION)],
    ['workers -0.5', { pids: [me], workers: -0.5 }, range(ErrorCode.INVALID_OPTION)],
    ['onProgress a string', { pids: [me], onProgress: 'log' }, type(ErrorCode.INVALID_OPTION)],
    ['domainsByPid a symbol value', { pids: [me], domainsByPid: { [me]: Symbol('d') } }, type(ErrorCode.INVALID_OPTION)],
    ['a Proxy with an unknown key', new Proxy({ pids: [me], pid: me }, {}), type(ErrorCode.UNKNOWN_OPTION)],
    ['a frozen object with a bad pid', Object.freeze({ pids: Object.freeze([0]) }), range(ErrorCode.INVALID_OPTION)],
    ['a getter that throws', throwingGetter('pids'), CALLER],
    ['a Proxy whose ownKeys throws', throwingKeys(), CALLER],
  ]
  for (const [what, options, want] of cases) {
    const o = attempt(() => estimate(options as EstimateOptions))
    if ('threw' in o) {
      t.fail(`${what}: threw synchronously; estimate() rejects`)
      continue
    }
    const outcome: Outcome = await Promise.resolve(o.returned).then((v) => ({ returned: v }), (err) => ({ threw: err }))
    await judge(t, `estimate(${what})`, outcome, want)
  }
  t.equal(coercions, 0, 'no value was coerced')
  // Duplicated pids are one process, not an error.
  const r = await estimate({ pids: [me, me, me] })
  t.same(r.processes.map((p) => [p.pid, p.status]), [[me, 'self']], 'a pid given three times: one entry')
})

t.test('estimate(): an address past 2 ** 64 is refused', async (t) => {
  const me = process.pid
  await t.rejects(estimate({ pids: [me], ranges: { [me]: [{ address: 2n ** 64n + 4096n, bytes: PAGE }] } }), { code: ErrorCode.INVALID_OPTION, constructor: RangeError })
})

// ---- /proc helpers -----------------------------------------------------------------------------

t.test('smapsRollup(), rangePss(): what works', async (t) => {
  t.ok(smapsRollup().Pss > 0, 'no argument: this process')
  t.ok(smapsRollup('self').Pss > 0, "'self'")
  t.ok(smapsRollup(process.pid).Pss > 0, 'its pid')
  // A well-formed pid with no process: Node's own system error, with its code.
  let gone = 4194303
  while (readdirSync('/proc').includes(String(gone))) gone--
  t.throws(() => smapsRollup(gone), { code: 'ENOENT', syscall: 'open' }, 'a pid with no process: ENOENT')
  t.equal(rangePss(0n, 0), 0, 'an empty range')
})

t.test('smapsRollup(pid): paths, negative, NaN and huge pids are refused with a code', async (t) => {
  const cases: Array<[string, unknown, Expect]> = [
    ['"../etc"', '../etc', type(ErrorCode.INVALID_ARG)],
    ['"../proc/self" (a path that exists)', '../proc/self', type(ErrorCode.INVALID_ARG)],
    ['"1/../self" (a path that exists)', '1/../self', type(ErrorCode.INVALID_ARG)],
    ['a numeric string', String(process.pid), type(ErrorCode.INVALID_ARG)],
    ['an object', {}, type(ErrorCode.INVALID_ARG)],
    ['an object with a side-effecting toString', sneakyString(), type(ErrorCode.INVALID_ARG)],
    ['null', null, type(ErrorCode.INVALID_ARG)],
    ['-1', -1, range(ErrorCode.OUT_OF_RANGE)],
    ['0', 0, range(ErrorCode.OUT_OF_RANGE)],
    ['NaN', NaN, range(ErrorCode.OUT_OF_RANGE)],
    ['1.5', 1.5, range(ErrorCode.OUT_OF_RANGE)],
    ['2 ** 40', 2 ** 40, range(ErrorCode.OUT_OF_RANGE)],
  ]
  const before = coercions
  for (const [what, pid, want] of cases) await judge(t, `smapsRollup(${what})`, attempt(() => smapsRollup(pid as number)), want)
  t.equal(coercions, before, 'no value was coerced')
})

t.test('rangePss(address, length): wrong types, negative and NaN are refused with a code', async (t) => {
  const cases: Array<[string, () => unknown, Expect]> = [
    ['a number address', () => rangePss(4096 as unknown as bigint, PAGE), type(ErrorCode.INVALID_ARG)],
    ['a string address', () => rangePss('0x1000' as unknown as bigint, PAGE), type(ErrorCode.INVALID_ARG)],
    ['no arguments', () => (rangePss as () => number)(), type(ErrorCode.INVALID_ARG)],
    ['a bigint length', () => rangePss(0n, 4096n as unknown as number), type(ErrorCode.INVALID_ARG)],
    ['address -1n', () => rangePss(-1n, PAGE), range(ErrorCode.OUT_OF_RANGE)],
    ['length -1', () => rangePss(0n, -1), range(ErrorCode.OUT_OF_RANGE)],
    ['length NaN', () => rangePss(0n, NaN), range(ErrorCode.OUT_OF_RANGE)],
    ['length 0.5', () => rangePss(0n, 0.5), range(ErrorCode.OUT_OF_RANGE)],
    ['length 2 ** 53', () => rangePss(0n, 2 ** 53), range(ErrorCode.OUT_OF_RANGE)],
  ]
  for (const [what, call, want] of cases) await judge(t, `rangePss(${what})`, attempt(call), want)
})

// ---- the codes themselves ------------------------------------------------------------------------

t.test('ErrorCode cannot be changed by a careless caller', async (t) => {
  t.ok(Object.isFrozen(ErrorCode), 'frozen')
  const was = ErrorCode.CLOSED
  try {
    ;(ErrorCode as Record<string, string>).CLOSED = 'oops'
  } catch {
    // frozen: strict mode throws, which is the point
  }
  const pm = new PageMerger({ workers: 1 })
  await pm.close()
  t.throws(() => pm.alloc(PAGE), { code: 'ERR_PAGEMERGE_CLOSED' }, 'errors keep their code')
  if (!Object.isFrozen(ErrorCode)) (ErrorCode as Record<string, string>).CLOSED = was // put back for anything after this test
})

t.test('returned stats and options are copies or frozen: mutating them changes nothing', async (t) => {
  const f = await fixture()
  t.teardown(() => f.pm.close())
  const before = snapshot(f.pm, f.bufs)
  const s = f.pm.stats()
  s.pagesSharing = -1
  const b = f.pm.bufferStats(f.a)
  b.pages = -1
  b.domain = 'changed'
  t.throws(() => ((f.pm.options as { workers: number }).workers = 99), TypeError, 'options are frozen')
  t.strictSame(snapshot(f.pm, f.bufs), before, 'nothing changed')
})

t.test('no promise was left to reject unhandled', async (t) => {
  await new Promise((r) => setTimeout(r, 50))
  t.strictSame(unhandled, [], 'no unhandled rejection during this file')
})
