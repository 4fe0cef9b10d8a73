// The addon's edges: its loader, the tables it shares with TypeScript, bad input (each with its
// code, nothing changed), and several worker threads using it at once.
import t from 'tap'
import { execFileSync } from 'node:child_process'
import { once } from 'node:events'
import { resolve } from 'node:path'
import { Worker } from 'node:worker_threads'
import { ErrorCode } from '../lib/errors'
import { loadNative, PageState, Status, NO_POOL, PAGE_SIZE } from '../lib/native'
import { digest, fillRandom, MiB, PAGE } from './fixtures/util'

const native = loadNative()
const ROOT = resolve(__dirname, '..')

t.test('the constants C++ and TypeScript share agree', async (t) => {
  const c = native.constants
  t.equal(c.PAGE_SIZE, PAGE_SIZE)
  t.equal(c.NO_POOL, NO_POOL)
  t.same(
    { OK: c.STATUS_OK, MISMATCH: c.STATUS_MISMATCH, GONE: c.STATUS_GONE, BUDGET: c.STATUS_BUDGET },
    Status,
  )
  t.same({ SHARED: c.STATE_SHARED, ANON: c.STATE_ANON, MERGED: c.STATE_MERGED, WRITTEN: c.STATE_WRITTEN }, PageState)
  const known = new Set<string>(Object.values(ErrorCode))
  for (const code of c.ERROR_CODES) t.ok(known.has(code), `${code} is in lib/errors.ts`)
})

t.test('a failed load says what was tried, why, and how to fix it', async (t) => {
  const script = `try { require(${JSON.stringify(resolve(ROOT, 'lib/native'))}).loadNative() } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })) }`
  const out = execFileSync(process.execPath, ['-r', require.resolve('@isaacs/ts-node-temp-fork-for-pr-2009/register/transpile-only'), '-e', script], {
    env: { ...process.env, PAGEMERGE_ADDON: '/nonexistent/pagemerge.node', NODE_OPTIONS: '' },
    encoding: 'utf8',
  })
  const err = JSON.parse(out) as { code: string; message: string }
  t.equal(err.code, ErrorCode.ADDON_LOAD)
  t.match(err.message, '/nonexistent/pagemerge.node', 'names the path tried')
  t.match(err.message, /Cannot find module/, 'says why it failed')
  t.match(err.message, /npm rebuild pagemerge/, 'says how to fix it')
})

t.test('bad input: a code, and nothing changed', async (t) => {
  const arena = new native.Arena()
  const a = new Uint8Array(arena.alloc(1 * MiB, true))
  const b = new Uint8Array(arena.alloc(1 * MiB, true))
  fillRandom(a, 1)
  b.set(a)
  const da = digest(a), db = digest(b)
  const out = new BigUint64Array(256)
  const status = new Int32Array(1), pool = new Uint32Array(1)
  const id = arena.idOf(b)
  const hashRun = (address: number, first: number, count: number, outIndex: number) => native.hashRuns(new Float64Array([address, first, count, outIndex]), 1, out)
  const cases: Array<[string, () => unknown, string, ErrorConstructor]> = [
    ['misaligned view', () => native.hashPages(Buffer.from(a.buffer, 1, PAGE), 0, 1, out, 0), ErrorCode.MISALIGNED, RangeError],
    ['pages outside the buffer', () => native.hashPages(a, 250, 10, out, 0), ErrorCode.OUT_OF_RANGE, RangeError],
    ['negative page', () => native.hashPages(a, -1, 1, out, 0), ErrorCode.OUT_OF_RANGE, RangeError],
    ['NaN count', () => native.hashPages(a, 0, NaN, out, 0), ErrorCode.OUT_OF_RANGE, RangeError],
    ['count as a string', () => native.hashPages(a, 0, '1' as unknown as number, out, 0), ErrorCode.INVALID_ARG, TypeError],
    ['output too short', () => native.hashPages(a, 0, 256, new BigUint64Array(10), 0), ErrorCode.OUT_OF_RANGE, RangeError],
    ['output of the wrong type', () => native.hashPages(a, 0, 1, new Uint32Array(2) as unknown as BigUint64Array, 0), ErrorCode.INVALID_ARG, TypeError],
    ['not a buffer', () => native.hashPages({} as Uint8Array, 0, 1, out, 0), ErrorCode.INVALID_ARG, TypeError],
    ['a SharedArrayBuffer this library did not allocate', () => arena.idOf(new SharedArrayBuffer(PAGE)), ErrorCode.FOREIGN_BUFFER, TypeError],
    ['a view that does not start at the allocation', () => arena.idOf(a.subarray(PAGE)), ErrorCode.FOREIGN_BUFFER, TypeError],
    ['an allocation of 0 bytes', () => arena.alloc(0, true), ErrorCode.OUT_OF_RANGE, RangeError],
    ['more bytes than the arena reserves', () => arena.alloc(2 ** 52, true), ErrorCode.ARENA_FULL, Error],
    ['more bytes than a number can hold exactly', () => arena.alloc(2 ** 60, true), ErrorCode.OUT_OF_RANGE, RangeError],
    ['a merge extent outside its buffer', () => arena.merge(new Uint32Array([id, 200, 0, 100]), status, 1e9), ErrorCode.OUT_OF_RANGE, RangeError],
    ['an empty extent', () => arena.merge(new Uint32Array([id, 0, 0, 0]), status, 1e9), ErrorCode.OUT_OF_RANGE, RangeError],
    ['a merge onto pages that are not pool pages', () => arena.merge(new Uint32Array([id, 0, arena.idOf(a), 1]), status, 1e9), ErrorCode.NOT_POOL_PAGE, RangeError],
    ['extents of the wrong length', () => arena.merge(new Uint32Array([id, 0, 0]), status, 1e9), ErrorCode.INVALID_ARG, TypeError],
    ['no status array', () => arena.merge(new Uint32Array([id, 0, 0, 1]), undefined as unknown as Int32Array, 1e9), ErrorCode.INVALID_ARG, TypeError],
    ['a negative budget', () => arena.dropZero(new Uint32Array([id, 0, 1]), status, -1), ErrorCode.INVALID_ARG, TypeError],
    ['a stabilize without an output array', () => arena.stabilize(new Uint32Array([id, 0, 1, 0]), status, 1e9, undefined as unknown as Uint32Array), ErrorCode.INVALID_ARG, TypeError],
    ['an address outside any allocation', () => hashRun(4096, 0, 1, 0), ErrorCode.FOREIGN_BUFFER, TypeError],
    ['a run past its allocation', () => hashRun(Number(native.addressOf(a)), 250, 10, 0), ErrorCode.FOREIGN_BUFFER, TypeError],
    ['a misaligned address', () => hashRun(Number(native.addressOf(a)) + 1, 0, 1, 0), ErrorCode.MISALIGNED, RangeError],
    ['an address as a fraction', () => hashRun(Number(native.addressOf(a)) + 0.5, 0, 1, 0), ErrorCode.MISALIGNED, RangeError],
    ['a negative address', () => hashRun(-4096, 0, 1, 0), ErrorCode.MISALIGNED, RangeError],
    ['an address past 2^53', () => hashRun(2 ** 60, 0, 1, 0), ErrorCode.MISALIGNED, RangeError],
    ['NaN as an address', () => hashRun(NaN, 0, 1, 0), ErrorCode.MISALIGNED, RangeError],
    ['a run count as a fraction', () => hashRun(Number(native.addressOf(a)), 0, 1.5, 0), ErrorCode.OUT_OF_RANGE, RangeError],
    ['hashes past the output', () => hashRun(Number(native.addressOf(a)), 0, 2, out.length - 1), ErrorCode.OUT_OF_RANGE, RangeError],
    ['more runs than the records hold', () => native.hashRuns(new Float64Array(4), 2, out), ErrorCode.OUT_OF_RANGE, RangeError],
    ['runs that are not a Float64Array', () => native.hashRuns(new Uint32Array(4) as unknown as Float64Array, 1, out), ErrorCode.INVALID_ARG, TypeError],
  ]
  for (const [what, call, code, cls] of cases) {
    const err = (() => {
      try {
        call()
      } catch (e) {
        return e as Error & { code?: string }
      }
      return undefined
    })()
    t.ok(err instanceof cls, `${what}: a ${cls.name}`)
    t.equal(err?.code, code, `${what}: ${code}`)
  }
  t.equal(digest(a), da, 'the first buffer is unchanged')
  t.equal(digest(b), db, 'the second buffer is unchanged')
  const states = new Uint8Array(256), pools = new Uint32Array(256)
  arena.pageStates(b, 0, 256, states, pools)
  t.ok(states.every((s) => s === PageState.SHARED), 'no page was remapped')
  t.equal(arena.stats().poolPages, 0, 'no pool page was made')
  t.throws(() => arena.alloc(2 ** 40, false), { code: ErrorCode.ARENA_FULL }, 'a private allocation beyond the reserve is refused too')
})

t.test('hashes are xxh3-64 of each page, as xxhash-addon computes them', async (t) => {
  const { XXHash3 } = require('xxhash-addon') as { XXHash3: { hash(b: Buffer): Buffer } }
  const arena = new native.Arena()
  const a = new Uint8Array(arena.alloc(64 * PAGE, true))
  fillRandom(a, 2)
  a.fill(0, 5 * PAGE, 6 * PAGE)
  const out = new BigUint64Array(64)
  native.hashPages(a, 0, 64, out, 0)
  for (let i = 0; i < 64; i++) {
    const want = XXHash3.hash(Buffer.from(a.buffer, i * PAGE, PAGE)).readBigUInt64BE()
    if (out[i] !== want) t.fail(`page ${i}: ${out[i]} != ${want}`)
  }
  t.equal(out[5], native.ZERO_PAGE_HASH, 'the zero page hash')
  // hashRuns, by address, in runs of a call: [address, firstPage, count, outIndex] each
  const at = new BigUint64Array(66)
  const address = Number(native.addressOf(a))
  t.equal(native.hashRuns(new Float64Array([address, 0, 5, 0, address, 5, 1, 5, address + 6 * PAGE, 0, 58, 8]), 3, at), 64, 'pages hashed')
  t.same([...at.subarray(0, 6)], [...out.subarray(0, 6)], 'hashRuns agrees with hashPages')
  t.same([...at.subarray(8)], [...out.subarray(6)], 'run after run, each at its outIndex')
  t.same([...at.subarray(6, 8)], [0n, 0n], 'and writes nothing else')
})

t.test('the addon loads and works in several worker threads at once', async (t) => {
  const arena = new native.Arena()
  const shared = new Uint8Array(arena.alloc(4 * MiB, true))
  fillRandom(shared, 3)
  const want = new BigUint64Array(1024)
  native.hashPages(shared, 0, 1024, want, 0)
  const code = `
    const { parentPort, workerData } = require('node:worker_threads')
    const native = require(${JSON.stringify(resolve(ROOT, 'build/Release/pagemerge.node'))})
    const out = new BigUint64Array(1024)
    native.hashPages(workerData.sab, 0, 1024, out, 0)
    // and an arena of its own: merge two identical buffers in this thread
    const arena = new native.Arena()
    const a = new Uint8Array(arena.alloc(1 << 20, true)), b = new Uint8Array(arena.alloc(1 << 20, true))
    for (let i = 0; i < a.length; i++) a[i] = (i * 7 + workerData.n) & 255
    b.set(a)
    const status = new Int32Array(1), pool = new Uint32Array(1)
    arena.stabilize(new Uint32Array([arena.idOf(a), 0, 256, 1]), status, 1e9, pool)
    const merged = arena.merge(new Uint32Array([arena.idOf(b), 0, pool[0], 256]), status, 1e9)
    parentPort.postMessage({ hashes: out, merged, same: Buffer.compare(Buffer.from(a.buffer), Buffer.from(b.buffer)) === 0 })`
  const workers = Array.from({ length: 4 }, (_, n) => new Worker(code, { eval: true, workerData: { sab: shared.buffer, n } }))
  const results = await Promise.all(workers.map(async (w) => (await once(w, 'message'))[0] as { hashes: BigUint64Array; merged: number; same: boolean }))
  for (const [i, r] of results.entries()) {
    t.same([...r.hashes], [...want], `worker ${i} hashed the shared buffer like the main thread`)
    t.equal(r.merged, 256, `worker ${i} merged in its own arena`)
    t.ok(r.same, `worker ${i}'s buffers read back equal`)
  }
  await Promise.all(workers.map((w) => w.terminate()))
})

t.test('Timer: one call per arm(), moved by re-arming, stopped by close(); it keeps no process alive', async (t) => {
  const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))
  let calls = 0
  const timer = new native.Timer(() => calls++)
  timer.arm(5)
  await sleep(60)
  t.equal(calls, 1, 'one call per arm()')
  timer.arm(40)
  timer.arm(5) // re-arming moves it
  await sleep(25)
  t.equal(calls, 2, 'the last arm() wins')
  timer.arm(10)
  timer.cancel()
  await sleep(30)
  t.equal(calls, 2, 'cancel() before it fires: no call')
  // At 0 ms it still lets the loop turn: libuv would run a timer re-armed at 0 from its own callback
  // again in the same pass, forever, so arm() waits at least 1 ms, as setTimeout does.
  let spins = 0
  const spinner = new native.Timer(() => spins++ < 1e6 && spinner.arm(0))
  spinner.arm(0)
  await sleep(20)
  t.ok(spins > 0 && spins < 1e6, `a timer re-armed at 0 from its callback leaves the loop turning (${spins} calls in 20 ms)`)
  spinner.close()
  timer.close()
  timer.close() // twice: nothing
  t.throws(() => timer.arm(5), { code: ErrorCode.INVALID_ARG }, 'arm() after close()')
  t.throws(() => new native.Timer(5 as unknown as () => void), { code: ErrorCode.INVALID_ARG }, 'a callback that is not a function')
  const armed = new native.Timer(() => {})
  t.throws(() => armed.arm(-1), { code: ErrorCode.OUT_OF_RANGE }, 'a negative ms')
  t.throws(() => armed.arm(NaN), { code: ErrorCode.OUT_OF_RANGE }, 'NaN')
  armed.close()
  // A child with only an armed timer exits at once; an exception from the callback is uncaught, as from setTimeout's.
  const addon = resolve(__dirname, '..', 'build', 'Release', 'pagemerge.node')
  const started = Date.now()
  execFileSync(process.execPath, ['-e', `globalThis.kept = new (require(${JSON.stringify(addon)}).Timer)(() => {}); kept.arm(60000)`])
  t.ok(Date.now() - started < 10_000, `a process whose only work is an armed timer exits (${Date.now() - started} ms)`)
  const out = execFileSync(process.execPath, ['-e', `process.on('uncaughtException', (e) => console.log('caught', e.message)); globalThis.kept = new (require(${JSON.stringify(addon)}).Timer)(() => { throw new Error('boom') }); kept.arm(1); setTimeout(() => {}, 50)`], { encoding: 'utf8' })
  t.equal(out.trim(), 'caught boom', "the callback's exception reaches uncaughtException")
})
