// Faults and limits (issue #7): WebAssembly traps, a null dereference in native code (an addon
// compiled by this test) and SIGSEGV behave as without pagemerge, the
// mapping budget near vm.max_map_count, unmerging without memory, a memfd that cannot grow, and
// an exception or SIGTERM in the middle of mergeNow(). The risky cases run in child processes
// (test/fixtures/faults-*.js) under per-process limits set with prlimit: nothing system-wide
// changes, and every child runs with RLIMIT_CORE 0, so a deliberate crash leaves no core file.
import t, { type Test } from 'tap'
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { homedir, tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { createInterface } from 'node:readline'
import { ErrorCode, PageMerger } from '../lib/index'
import { fillRandom, MiB, PAGE } from './fixtures/util'

const TS_NODE = require.resolve('@isaacs/ts-node-temp-fork-for-pr-2009/register/transpile-only')
const FIXTURES = join(__dirname, 'fixtures')
const PRLIMIT = ['/usr/bin/prlimit', '/bin/prlimit'].find((p) => existsSync(p))
const needsPrlimit = PRLIMIT ? false : 'needs prlimit (util-linux) to set limits on a child process'
const MAX_MAP_COUNT = Number(readFileSync('/proc/sys/vm/max_map_count', 'utf8'))
/** Bits of SIGBUS (7) and SIGSEGV (11) in /proc/<pid>/status's SigCgt: whose handlers catch faults. */
const FAULT_SIGNALS = (1n << 6n) | (1n << 10n)

// JSON lines from a fixture; anything else the child prints is kept for the failure message.
type Line = Record<string, any>

interface Child {
  proc: ChildProcess
  /** The next JSON line the child prints. */
  next(): Promise<Line>
  /** Writes a line to the child's stdin. */
  send(line: string): void
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>
}

/**
 * Starts a fixture under prlimit (RLIMIT_CORE 0 and `limits`, e.g. `--fsize=1048576`), through
 * the ts-node hook, without tap's loader in NODE_OPTIONS; killed if it outlives `ms`.
 */
function child(t: Test, fixture: string, args: string[], limits: string[] = [], ms = 30_000): Child {
  const node = [process.execPath, '-r', TS_NODE, join(FIXTURES, fixture), ...args]
  // Through env -u: tap puts its loader back into the NODE_OPTIONS of every process it sees
  // spawned, and the loader's signal-exit catches SIGTERM and SIGXFSZ (which Node ignores).
  const argv = ['-u', 'NODE_OPTIONS', ...(PRLIMIT ? [PRLIMIT, '--core=0', ...limits] : []), ...node]
  const proc = spawn('env', argv, { stdio: ['pipe', 'pipe', 'pipe'] })
  const timer = setTimeout(() => proc.kill('SIGKILL'), ms)
  t.teardown(() => {
    clearTimeout(timer)
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL')
  })
  let stderr = ''
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const lines: Line[] = [], waiting: ((l: Line) => void)[] = []
  let ended = false
  createInterface({ input: proc.stdout! }).on('line', (text) => {
    let line: Line
    try {
      line = JSON.parse(text) as Line
    } catch {
      return
    }
    const w = waiting.shift()
    if (w) w(line)
    else lines.push(line)
  })
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((done) =>
    proc.once('close', (code, signal) => {
      clearTimeout(timer)
      ended = true
      for (const w of waiting.splice(0)) w({ exited: { code, signal, stderr } })
      done({ code, signal, stderr })
    }),
  )
  return {
    proc,
    exited,
    next: () =>
      lines.length ? Promise.resolve(lines.shift()!) : ended ? Promise.resolve({ exited: true, stderr }) : new Promise((r) => waiting.push(r)),
    send: (line) => proc.stdin!.write(line + '\n'),
  }
}

/** Runs a fixture to its end; returns its JSON lines and how it ended. */
async function run(t: Test, fixture: string, args: string[], limits: string[] = []) {
  const c = child(t, fixture, args, limits)
  const lines: Line[] = []
  const collect = async () => {
    for (;;) {
      const l = await c.next()
      if (l.exited) return
      lines.push(l)
    }
  }
  const [end] = await Promise.all([c.exited, collect()])
  return { ...end, lines }
}

/** Sets a soft limit of a running process (the hard limit stays, so it can be lifted unprivileged). */
function prlimit(pid: number, resource: string, soft: number | 'unlimited'): void {
  const r = spawnSync(PRLIMIT!, [`--pid=${pid}`, `--${resource}=${soft}:`], { encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`prlimit --${resource} failed: ${r.stderr}`)
}

// ---- WebAssembly traps and SIGSEGV ---------------------------------------------------------------

t.test('a WebAssembly out-of-bounds trap is caught the same way with pagemerge merging or not', async (t) => {
  const results: Record<string, Line> = {}
  for (const mode of ['none', 'merged', 'inflight']) {
    const r = await run(t, 'faults-wasm.js', [mode, 'wasm'])
    t.same([r.code, r.signal], [0, null], `${mode}: exits 0 ${r.stderr}`)
    results[mode] = r.lines[0] ?? {}
  }
  const none = results.none!
  t.same(none.after, { rounds: 1000, caught: 1000, errors: ['RuntimeError: memory access out of bounds'], inBounds: 0 }, 'without pagemerge: every trap a RuntimeError')
  for (const mode of ['merged', 'inflight']) {
    const r = results[mode]!
    t.same(r.after, none.after, `${mode}: traps after merging caught as without pagemerge`)
    t.ok(r.pagesSharing > 0, `${mode}: pages merged`)
    t.same(r.damaged, [], `${mode}: every buffer reads its bytes`)
    const segvBits = (mask: string) => BigInt('0x' + mask) & FAULT_SIGNALS
    t.equal(segvBits(r.sigCgtAfter), segvBits(none.sigCgtAfter), `${mode}: no SIGSEGV/SIGBUS handler added or removed (SigCgt ${r.sigCgtBefore} -> ${r.sigCgtAfter})`)
  }
  const inflight = results.inflight!
  t.same(inflight.duringMerge, { ...none.after, rounds: 100, caught: 100 }, 'traps inside mergeNow() (in onProgress) caught')
  t.ok(inflight.workerTraps?.caught > 0 && inflight.workerTraps?.other === 0, `a worker thread trapping throughout the merge caught every one (${inflight.workerTraps?.caught})`)
})

/**
 * The Node-API addon of test/fixtures/native-crash/null-deref.c, compiled into a temporary
 * directory once per run of this file (test-only: nothing is added to the package or its
 * install); or why it cannot be: no C/C++ compiler or no node_api.h for this Node.
 */
function nullDerefAddon(): { path: string } | { skip: string } {
  const headers = [
    join(dirname(process.execPath), '..', 'include', 'node'), // Node's own install
    join(process.env.npm_config_devdir ?? join(homedir(), '.cache', 'node-gyp'), process.versions.node, 'include', 'node'), // node-gyp's cache
    join(homedir(), '.node-gyp', process.versions.node, 'include', 'node'), // older node-gyp
    '/usr/include/node', // distribution packages
  ].find((dir) => existsSync(join(dir, 'node_api.h')))
  if (!headers) return { skip: `no node_api.h for Node ${process.versions.node} (looked next to ${process.execPath} and in node-gyp's cache)` }
  const compiler = [process.env.CXX, 'g++', 'c++', 'cc'].find((cc) => cc && spawnSync(cc, ['--version'], { stdio: 'ignore' }).status === 0)
  if (!compiler) return { skip: 'no C/C++ compiler (g++, c++ or cc) to build the null-dereferencing addon' }
  const dir = mkdtempSync(join(tmpdir(), 'pagemerge-null-deref-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const path = join(dir, 'null-deref.node')
  const cc = spawnSync(compiler, ['-shared', '-fPIC', '-O2', '-I', headers, '-o', path, join(FIXTURES, 'native-crash', 'null-deref.c')], { encoding: 'utf8' })
  if (cc.status !== 0) return { skip: `${compiler} could not build the null-dereferencing addon: ${cc.stderr || cc.error}` }
  return { path }
}

const nullDeref = PRLIMIT ? nullDerefAddon() : { skip: 'needs prlimit (util-linux): a deliberate crash must not dump core' }

t.test('a null dereference in native code ends the process as without pagemerge; WebAssembly traps before it are caught', {
  skip: 'skip' in nullDeref ? nullDeref.skip : false,
}, async (t) => {
  const addon = nullDeref as { path: string }
  const results: Record<string, Awaited<ReturnType<typeof run>>> = {}
  for (const mode of ['none', 'merged', 'inflight']) results[mode] = await run(t, 'faults-wasm.js', [mode, 'nullderef', addon.path])
  const none = results.none!
  const noneLine = none.lines[0]?.nullderef
  t.same(none.lines.length, 1, 'without pagemerge: one line, then the crash', { lines: none.lines, stderr: none.stderr })
  t.same([none.code, none.signal], [null, 'SIGSEGV'], 'without pagemerge: killed by SIGSEGV')
  t.same(noneLine?.traps, { rounds: 100, caught: 100, errors: ['RuntimeError: memory access out of bounds'], inBounds: 0 }, 'without pagemerge: traps caught first')
  for (const mode of ['merged', 'inflight']) {
    const r = results[mode]!
    const line = r.lines[0]?.nullderef
    t.ok(line, `${mode}: the child got as far as the null dereference`, { lines: r.lines, stderr: r.stderr })
    t.same(r.lines.slice(1), [], `${mode}: and did not live on`)
    t.same(line?.traps, noneLine?.traps, `${mode}: WebAssembly traps just before it still thrown as catchable RuntimeErrors`)
    t.ok(line?.pagesSharing > 0, `${mode}: pages merged at the time (${line?.pagesSharing})`)
    t.same(line?.damaged, [], `${mode}: every buffer read its bytes just before`)
    t.ok(['full', 'user'].includes(line?.writeProtection), `${mode}: userfaultfd write protection in place (${line?.writeProtection})`)
    t.equal(BigInt('0x' + line?.sigCgt) & FAULT_SIGNALS, BigInt('0x' + noneLine?.sigCgt) & FAULT_SIGNALS, `${mode}: the same SIGSEGV/SIGBUS handlers as without pagemerge (SigCgt ${line?.sigCgt})`)
    t.same([r.code, r.signal], [none.code, none.signal], `${mode}: ends as without pagemerge: killed by ${r.signal}`)
    t.equal(r.stderr, none.stderr, `${mode}: prints what Node prints without pagemerge (${JSON.stringify(none.stderr)})`)
  }
})

t.test('a raised SIGSEGV (kill(2)) ends the process as without pagemerge', {
  skip: PRLIMIT ? false : 'needs prlimit (util-linux): a deliberate crash must not dump core',
}, async (t) => {
  for (const mode of ['none', 'merged', 'inflight']) {
    const r = await run(t, 'faults-wasm.js', [mode, 'segv'])
    t.same(r.lines, [{ raising: true }], `${mode}: raised it, and did not live on`)
    t.equal(r.signal, 'SIGSEGV', `${mode}: killed by SIGSEGV`)
  }
})

// ---- the mapping budget near vm.max_map_count ------------------------------------------------------

t.test('more isolated duplicates than the mapping budget: merges what it permits, and the application can still allocate', async (t) => {
  // 160 MiB, every other page one fixed page: 20,480 duplicates, each costing two mappings, where
  // the default budget has room for about half the headroom under vm.max_map_count.
  const r = await run(t, 'faults-budget.js', ['160'])
  t.same([r.code, r.signal], [0, null], `exits 0 ${r.stderr}`)
  const s = r.lines[0] ?? {}
  t.ok(s.pagesSharing > 0, `merged what the budget permits (${s.pagesSharing} pages)`)
  t.ok(s.pagesSkippedBudget > 0, `reported the rest (${s.pagesSkippedBudget} pages skipped)`)
  t.equal(s.intact, true, 'every byte reads back')
  t.ok(s.afterMerge <= s.mapBudget, `mappings after merging (${s.afterMerge}) within the budget (${s.mapBudget})`)
  t.ok(s.afterMerge <= MAX_MAP_COUNT - 1000, `at least 1000 mappings of headroom kept (vm.max_map_count ${MAX_MAP_COUNT})`)
  t.same([s.arrayBuffers, s.slowBuffers, s.error], [1000, 1000, null], '1000 ArrayBuffers and 1000 Buffer.allocUnsafeSlow() of 1 MiB allocated afterwards')
  t.equal(s.kept, true, 'and each holds what was written to it')
  t.ok(s.afterAllocs <= MAX_MAP_COUNT - 1000, `mappings after those allocations: ${s.afterAllocs}`)
})

// ---- memory pressure: unmerging -----------------------------------------------------------------

t.test('stats().unmergeBytes is the memory unmergeAll() needs back', async (t) => {
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  const seeded = fillRandom(Buffer.allocUnsafe(2 * MiB), 21)
  const bufs = [0, 1, 2].map(() => pm.alloc(2 * MiB))
  for (const b of bufs) seeded.copy(b)
  const zeros = pm.alloc(MiB).fill(0) // zero pages stay free when unmerged: not counted
  t.equal(pm.stats().unmergeBytes, 0, 'nothing merged: nothing needed')
  const s = await pm.mergeNow()
  t.equal(s.pagesSharing, 2 * (2 * MiB) / PAGE, 'two of three clones saved')
  t.ok(s.zeroPages > 0, 'zero pages dropped')
  t.equal(s.unmergeBytes, s.pagesSharing * PAGE, 'unmergeBytes = pagesSharing × 4096')
  t.equal(pm.stats().unmergeBytes, s.unmergeBytes, 'stats() says the same')
  await pm.unmergeAll()
  t.equal(pm.stats().unmergeBytes, 0, 'nothing left to unmerge')
  t.ok(bufs.every((b) => b.equals(seeded)), 'bytes intact')
  t.ok(zeros.every((x) => x === 0), 'and the zero pages read zeros') // (and the buffer stays alive until here)
})

t.test('an unmergeAll() refused memory leaves every page readable and says how far it got', { skip: needsPrlimit }, async (t) => {
  const c = child(t, 'faults-unmerge.js', [])
  const merged = await c.next()
  t.equal(merged.intact, true, 'merged 64 MiB of clones, bytes intact')
  t.ok(merged.merged?.pagesSharing > 0, `pages merged (${merged.merged?.pagesSharing})`)
  t.equal(merged.merged?.unmergeBytes, merged.merged?.pagesSharing * PAGE, 'unmergeBytes = pagesSharing × 4096')
  // Room for the copy of one 1 MiB buffer at a time, not of an 8 MiB one.
  const vmSize = Number(/^VmSize:\s*(\d+) kB/m.exec(readFileSync(`/proc/${c.proc.pid}/status`, 'utf8'))![1]) * 1024
  prlimit(c.proc.pid!, 'as', vmSize + 4 * MiB)
  c.send('go')
  const { unmerge } = await c.next()
  t.ok(unmerge, 'the child lived through it')
  t.ok([ErrorCode.BUSY, 'ENOMEM'].includes(unmerge?.error?.code), `rejected with a code (${unmerge?.error?.code}, ${unmerge?.error?.syscall})`)
  t.equal(unmerge?.error?.errno, -12, 'errno -ENOMEM')
  t.equal(unmerge?.intact, true, 'every page still reads its bytes')
  t.ok(unmerge?.stats.pagesSharing > 0 && unmerge?.stats.pagesSharing < merged.merged?.pagesSharing,
    `stats() says how far it got: pagesSharing ${merged.merged?.pagesSharing} -> ${unmerge?.stats.pagesSharing}`)
  t.equal(unmerge?.stats.unmergeBytes, unmerge?.stats.pagesSharing * PAGE, 'and what the rest still needs')
  prlimit(c.proc.pid!, 'as', 'unlimited')
  c.send('go')
  const { retry } = await c.next()
  t.same(retry, { error: null, stats: { pagesSharing: 0, pagesShared: 0, unmergeBytes: 0 }, intact: true }, 'with memory back, unmergeAll() finishes')
  const end = await c.exited
  t.same([end.code, end.signal], [0, null], `exits 0 ${end.stderr}`)
})

// ---- a memfd that cannot be created or grown --------------------------------------------------------

t.test('new PageMerger() under a small RLIMIT_FSIZE throws EFBIG instead of dying by SIGXFSZ', { skip: needsPrlimit }, async (t) => {
  const r = await run(t, 'faults-fsize.js', ['construct'], ['--fsize=1048576'])
  t.same([r.code, r.signal], [0, null], `exits 0, not killed ${r.stderr}`)
  for (const engine of ['userspace', 'auto']) {
    const err = r.lines[0]?.[engine]
    t.match(err, { name: 'Error', code: 'EFBIG', errno: -27, syscall: 'ftruncate' }, `${engine}: a system error EFBIG`)
  }
})

t.test('RLIMIT_FSIZE lowered under a running PageMerger: merging fails with a code, nothing merged is harmed', { skip: needsPrlimit }, async (t) => {
  const c = child(t, 'faults-fsize.js', ['running'])
  const { merged } = await c.next()
  t.equal(merged?.error, null, 'engine auto merged 16 MiB of clones')
  t.ok(merged?.stats.pagesSharing > 0, `pages merged (${merged?.stats.pagesSharing})`)
  t.same(merged?.damaged, [], 'bytes intact')
  prlimit(c.proc.pid!, 'fsize', 1 << 20)
  c.send('go')
  const { limited } = await c.next()
  t.ok(limited, 'the child lived through it')
  t.ok(limited?.stats.pagesSharing >= merged?.stats.pagesSharing, `what was merged stays merged (${merged?.stats.pagesSharing} -> ${limited?.stats.pagesSharing})`)
  t.same([limited?.damagedFirst, limited?.damagedSecond], [[], []], 'every buffer reads its bytes, merged before or not')
  if (limited?.error) t.match(limited.error, { code: 'EFBIG', errno: -27 }, `under the limit, mergeNow() rejected with ${limited.error.code} (${limited.error.syscall})`)
  else t.ok(limited?.stats.pagesSharing > merged?.stats.pagesSharing, `under the limit, mergeNow() resolved, so it merged the new clones (pagesSharing ${merged?.stats.pagesSharing} -> ${limited?.stats.pagesSharing})`)
  prlimit(c.proc.pid!, 'fsize', 'unlimited')
  c.send('go')
  const { lifted } = await c.next()
  t.equal(lifted?.error, null, 'with the limit lifted, mergeNow() works again')
  t.ok(lifted?.stats.pagesSharing >= 2 * merged?.stats.pagesSharing, `and merges the new clones too (${lifted?.stats.pagesSharing} pages sharing)`)
  t.same([lifted?.damagedFirst, lifted?.damagedSecond], [[], []], 'bytes intact')
  const end = await c.exited
  t.same([end.code, end.signal], [0, null], `exits 0, not killed by SIGXFSZ ${end.stderr}`)
})

// ---- an exception or SIGTERM in the middle of mergeNow() -------------------------------------------

t.test('an exception from onProgress rejects mergeNow() with it; every buffer keeps its bytes', async (t) => {
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  const clone = fillRandom(Buffer.allocUnsafe(4 * MiB), 31)
  const bufs = [0, 1, 2, 3].map(() => pm.alloc(4 * MiB))
  for (const b of bufs) clone.copy(b)
  const unique = fillRandom(pm.alloc(4 * MiB), 32)
  const uniqueBytes = Buffer.from(unique)
  const boom = new Error('onProgress fails on purpose')
  let calls = 0
  await t.rejects(pm.mergeNow({ onProgress: () => { if (++calls === 2) throw boom } }), boom, 'rejects with the thrown error')
  t.equal(calls, 2, 'stopped at the second report')
  t.ok(bufs.every((b) => b.equals(clone)) && unique.equals(uniqueBytes), 'every buffer reads what was written')
  const written = bufs[1]!
  written[5] = written[5]! ^ 1 // a write after the failed merge: copy-on-write as ever
  const s = await pm.mergeNow()
  t.equal(s.pagesSharing, 3 * (4 * MiB) / PAGE - 1, `a later mergeNow() works (${s.pagesSharing} pages sharing: all but the written page)`)
  written[5] = written[5]! ^ 1
  t.ok(bufs.every((b) => b.equals(clone)) && unique.equals(uniqueBytes), 'bytes intact after it')
})

t.test('an exception in the middle of a full scan leaves the rest to the next mergeNow()', async (t) => {
  // 280 MiB: more than one batch of 65,536 pages, so the first report comes mid-scan.
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  const clone = fillRandom(Buffer.allocUnsafe(56 * MiB), 33)
  const bufs = [0, 1, 2, 3, 4].map(() => pm.alloc(56 * MiB))
  for (const b of bufs) clone.copy(b)
  const boom = new Error('onProgress fails on purpose')
  let first: { pagesScanned: number; pagesTotal: number } | undefined
  await t.rejects(pm.mergeNow({ onProgress: (p) => { first = p; throw boom } }), boom, 'rejects with the thrown error')
  t.ok(first && first.pagesScanned < first.pagesTotal, `thrown mid-scan (${first?.pagesScanned} of ${first?.pagesTotal} pages)`)
  const part = pm.stats().pagesSharing
  t.ok(part > 0 && part < 4 * (56 * MiB) / PAGE, `part merged (${part} pages sharing)`)
  t.ok(bufs.every((b) => b.equals(clone)), 'every buffer reads what was written')
  const s = await pm.mergeNow()
  t.equal(s.pagesSharing, 4 * (56 * MiB) / PAGE, 'the next mergeNow() merges the rest')
  t.ok(bufs.every((b) => b.equals(clone)), 'bytes intact after it')
})

t.test('SIGTERM in the middle of mergeNow(): a handler finds every buffer intact', async (t) => {
  const c = child(t, 'faults-sigterm.js', ['handler'])
  const started = await c.next()
  t.equal(started.merging, true, 'the child is merging')
  c.proc.kill('SIGTERM')
  c.send('go') // the signal is pending before mergeNow() goes on
  const { signal } = await c.next()
  t.equal(signal?.inMerge, true, 'the handler ran while mergeNow() was in flight')
  t.same(signal?.damaged, [], 'every buffer reads what was written')
  t.ok(signal?.pagesSharing > 0, `pages were merged by then (${signal?.pagesSharing})`)
  const end = await c.exited
  t.same([end.code, end.signal], [0, null], `exits 0 ${end.stderr}`)
})

t.test('SIGTERM in the middle of mergeNow(), no handler: the process ends by SIGTERM', async (t) => {
  const c = child(t, 'faults-sigterm.js', ['default'])
  t.equal((await c.next()).merging, true, 'the child is merging')
  c.proc.kill('SIGTERM')
  c.send('go')
  const end = await c.exited
  t.same([end.code, end.signal], [null, 'SIGTERM'], 'killed by SIGTERM, no hang')
})
