// The cross-process estimator against child processes with a designed memory layout: exact
// numbers, domains, zero pages, pages that change while being read, ksmd's own result (as root),
// and the processes that cannot be read (gone, exiting mid-scan, not permitted, itself).
import t from 'tap'
import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { ErrorCode } from '../lib/errors'
import { estimate, groupKeys, type EstimateOptions, type EstimateReport } from '../lib/estimate'
import { KernelKsm } from '../lib/kernel'
import { loadNative, PAGE_SIZE, RemotePage } from '../lib/native'
import { isRoot, MiB } from './fixtures/util'

const ROOT = resolve(__dirname, '..')
const CHILD = join(__dirname, 'fixtures', 'estimate-child.js')
const KSM = '/sys/kernel/mm/ksm'
const native = loadNative()

if (!existsSync(join(ROOT, 'dist', 'workers', 'estimate.js'))) {
  // The worker runs compiled; a fresh checkout may not have built yet.
  spawnSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'ignore' })
}

interface Child {
  proc: ChildProcess
  pid: number
  address: bigint
  bytes: number
}

/** Starts the fixture and waits for the line that says where its buffer is. */
async function child(args: string[], env: Record<string, string> = {}): Promise<Child> {
  const proc = spawn(process.execPath, ['--expose-gc', CHILD, ...args], { stdio: ['pipe', 'pipe', 'inherit'], env: { ...process.env, ...env } })
  const line = await new Promise<string>((done, fail) => {
    createInterface({ input: proc.stdout! }).once('line', done)
    proc.once('exit', (code) => fail(new Error(`estimate-child exited with ${code} before it was ready`)))
  })
  const info = JSON.parse(line) as { pid: number; address: string; bytes: number }
  return { proc, pid: info.pid, address: BigInt(info.address), bytes: info.bytes }
}

function stop(children: Child[]): void {
  for (const c of children) if (c.proc.exitCode === null) c.proc.kill('SIGKILL')
}

const rangesOf = (children: Child[]): EstimateOptions['ranges'] =>
  Object.fromEntries(children.map((c) => [c.pid, [{ address: c.address, bytes: c.bytes }]]))

/** Waits (blocking: onProgress is synchronous) for a child to say it has done what a signal asked. */
function waitForFile(file: string, ms = 10_000): void {
  const end = Date.now() + ms
  const nap = new Int32Array(new SharedArrayBuffer(4))
  while (!existsSync(file)) {
    if (Date.now() > end) throw new Error(`${file} did not appear`)
    Atomics.wait(nap, 0, 0, 5)
  }
}

// The designed layout, per 64 MiB child (see the fixture): 32 MiB the same in every child, 8 MiB of
// zero bytes, 4 MiB of one page repeated (per child), 20 MiB unique.
const PAGES = (64 * MiB) / PAGE_SIZE
const SHARED = (32 * MiB) / PAGE_SIZE
const ZERO = (8 * MiB) / PAGE_SIZE
const REPEATED = (4 * MiB) / PAGE_SIZE

t.test('three children with a designed layout: the estimate equals the designed numbers', async (t) => {
  const kids = await Promise.all([0, 1, 2].map(() => child(['64'])))
  t.teardown(() => stop(kids))
  const pids = kids.map((k) => k.pid)
  const r = await estimate({ pids, ranges: rangesOf(kids) })

  const within = 3 * (REPEATED - 1), cross = 2 * SHARED
  t.match(r.total, {
    pagesScanned: 3 * PAGES,
    zeroPages: 3 * ZERO,
    duplicatePages: within + cross,
    withinProcessDuplicatePages: within,
    crossProcessDuplicatePages: cross,
    volatilePages: 0,
    hashCollisions: 0,
    duplicateGroups: SHARED + 3,
    bytesFreeable: (within + cross + 3 * ZERO) * PAGE_SIZE,
    processesRead: 3,
    processesNotRead: 0,
  })
  // The first child keeps the shared pages; the other two would free theirs.
  t.same(
    r.processes.map((p) => [p.pid, p.status, p.pagesScanned, p.zeroPages, p.withinProcessDuplicatePages, p.crossProcessDuplicatePages]),
    [
      [pids[0], 'ok', PAGES, ZERO, REPEATED - 1, 0],
      [pids[1], 'ok', PAGES, ZERO, REPEATED - 1, SHARED],
      [pids[2], 'ok', PAGES, ZERO, REPEATED - 1, SHARED],
    ],
  )
  for (const p of r.processes) t.equal(p.bytesFreeable, (p.duplicatePages + p.zeroPages) * PAGE_SIZE, `pid ${p.pid}: bytesFreeable`)
  t.equal(r.processes.reduce((s, p) => s + p.bytesFreeable, 0), r.total.bytesFreeable, 'processes add up to the total')

  // The most duplicated contents: each child's repeated page, 1024 times, where it was put.
  t.equal(r.top.length, 10, 'ten contents by default')
  t.same(r.top.slice(0, 3).map((c) => [c.pages, c.freeablePages, c.processes.length]), [[REPEATED, REPEATED - 1, 1], [REPEATED, REPEATED - 1, 1], [REPEATED, REPEATED - 1, 1]])
  const first = r.top[0]!.processes[0]!
  const kid = kids.find((k) => k.pid === first.pid)!
  t.equal(first.addresses[0], '0x' + (kid.address + BigInt(40 * MiB)).toString(16), 'the first address of the repeated page')
  t.equal(first.mappings[0], '[anon]', 'in an anonymous mapping')
  t.same(r.top[3]!.processes.map((p) => [p.pid, p.pages]), pids.map((pid) => [pid, 1]), 'then shared pages, one in each child')
  t.match(r.top[3]!.hash, /^0x[0-9a-f]{16}$/)

  await t.test('domains: pages merge only within one', async (t) => {
    const d = await estimate({ pids, ranges: rangesOf(kids), domainsByPid: { [pids[2]!]: 'other' }, top: 0 })
    t.match(d.total, { crossProcessDuplicatePages: SHARED, withinProcessDuplicatePages: within, zeroPages: 3 * ZERO })
    t.equal(d.total.bytesFreeable, (SHARED + within + 3 * ZERO) * PAGE_SIZE, 'zero pages are freed in any domain')
    t.same(d.processes.map((p) => p.domain), ['', '', 'other'])
    t.same(d.top, [], 'top: 0 lists nothing')
  })

  await t.test('includeZero: false merges zero pages like any content (n - 1 of n)', async (t) => {
    const z = await estimate({ pids, ranges: rangesOf(kids), includeZero: false, top: 1 })
    t.equal(z.total.zeroPages, 3 * ZERO, 'zero pages are still counted')
    t.equal(z.total.duplicatePages, within + cross + 3 * ZERO - 1)
    t.equal(z.total.bytesFreeable, z.total.duplicatePages * PAGE_SIZE)
    t.equal(z.top[0]!.pages, 3 * ZERO, 'the zero page is the most duplicated content')
    t.equal(z.includeZero, false)
  })

  await t.test('without ranges: all private anonymous memory, the buffers included', async (t) => {
    const all = await estimate({ pids: pids.slice(0, 2), top: 0 })
    for (const p of all.processes) {
      t.equal(p.status, 'ok')
      t.ok(p.mappings > 1, `pid ${p.pid}: several mappings (${p.mappings})`)
      t.ok(p.pagesScanned > PAGES, `pid ${p.pid}: more pages than the buffer (${p.pagesScanned})`)
    }
    t.ok(all.total.crossProcessDuplicatePages >= SHARED, 'the shared pages are found among the rest')
  })
})

t.test('pages that change between reading and confirming are volatile, not duplicates', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'pagemerge-estimate-'))
  const marker = join(dir, 'done')
  const kids = await Promise.all([child(['64']), child(['64'], { ESTIMATE_CHILD_DONE: marker }), child(['64'])])
  t.teardown(() => {
    stop(kids)
    rmSync(dir, { recursive: true, force: true })
  })
  let signalled = false
  const r = await estimate({
    pids: kids.map((k) => k.pid),
    ranges: rangesOf(kids),
    onProgress: (p) => {
      if (p.phase === 'confirming' && !signalled) {
        signalled = true
        kids[1]!.proc.kill('SIGUSR1') // rewrites its shared 32 MiB
        waitForFile(marker)
      }
    },
  })
  t.ok(signalled)
  t.equal(r.processes[1]!.volatilePages, SHARED, 'the second child: its shared pages changed')
  t.equal(r.processes[1]!.crossProcessDuplicatePages, 0)
  t.equal(r.processes[2]!.crossProcessDuplicatePages, SHARED, 'the third still matches the first')
  t.equal(r.total.volatilePages, SHARED)
  t.equal(r.total.duplicatePages, SHARED + 3 * (REPEATED - 1))
  t.equal(r.total.hashCollisions, 0)
})

t.test('processes that cannot be read: each has its line, and the rest is counted', async (t) => {
  const kids = await Promise.all([child(['64']), child(['256', 'unique'])])
  t.teardown(() => stop(kids))
  const gone = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' })
  const deadPid = Number(gone.stdout)
  t.notOk(existsSync(`/proc/${deadPid}`), 'a pid that no longer exists')
  let killed = false
  const r = await estimate({
    pids: [kids[0]!.pid, kids[1]!.pid, deadPid, process.pid, 2],
    ranges: { [kids[0]!.pid]: [{ address: kids[0]!.address, bytes: kids[0]!.bytes }] },
    workers: 1,
    onProgress: (p) => {
      if (p.phase === 'reading' && p.done > 0 && !killed) {
        killed = true
        kids[1]!.proc.kill('SIGKILL') // exits mid-scan
      }
    },
  })
  const [ok, exited, dead, self, kthread] = r.processes
  t.match(ok, { status: 'ok', pagesScanned: PAGES })
  t.match(exited, { status: 'exited', error: { code: 'ESRCH' } }, 'the child killed mid-scan')
  t.ok(exited!.pagesScanned < (256 * MiB) / PAGE_SIZE, `it was read in part (${exited!.pagesScanned} pages) before it went`)
  t.equal(exited!.bytesFreeable, 0, 'its memory is gone: nothing to free')
  t.match(dead, { pid: deadPid, status: 'not-found', error: { code: 'ESRCH' } })
  t.match(self, { pid: process.pid, status: 'self', note: /estimator itself/ })
  t.match(kthread, { pid: 2, status: 'kernel-thread', pagesScanned: 0 })
  t.match(r.total, { processesRead: 1, processesNotRead: 4, pagesScanned: PAGES, zeroPages: ZERO })
})

t.test('a process the caller may not read: denied, with a hint', { skip: isRoot ? false : 'needs root: reads a root process as uid 65534' }, async (t) => {
  const kid = await child(['64'])
  t.teardown(() => stop([kid]))
  const script = `require(${JSON.stringify(join(ROOT, 'dist/lib/estimate.js'))}).estimate({ pids: [${kid.pid}] }).then((r) => console.log(JSON.stringify(r)))`
  const run = spawnSync(process.execPath, ['-e', script], { uid: 65534, gid: 65534, encoding: 'utf8', timeout: 30_000 })
  t.equal(run.status, 0, run.stderr)
  const r = JSON.parse(run.stdout) as EstimateReport
  t.match(r.processes[0], { pid: kid.pid, status: 'denied', error: { code: 'EACCES', hint: /uid 0/ } })
  t.equal(r.total.processesRead, 0)
})

t.test('as root: within 2% of what ksmd merged', { skip: !existsSync(KSM) ? `needs ${KSM}` : isRoot ? false : 'needs root: tunes ksmd' }, async (t) => {
  const kids = await Promise.all([0, 1, 2].map(() => child(['64', 'designed', '--mergeable'])))
  t.teardown(() => stop(kids))
  const r = await estimate({ pids: kids.map((k) => k.pid), ranges: rangesOf(kids), top: 0 })
  const ksm = new KernelKsm()
  t.teardown(() => ksm.restore())
  // Zero pages go to the kernel's zero page (as includeZero counts them); a short sleep between
  // batches, not none, because the machine is shared.
  ksm.tune({ run: 1, pagesToScan: 10000, sleepMillisecs: 10, useZeroPages: 1 })
  const merged = () =>
    kids.reduce((sum, k) => {
      const c = new KernelKsm({ procSelf: `/proc/${k.pid}` }).processCounters()
      return { merging: sum.merging + (c.mergingPages ?? 0), zero: sum.zero + (c.zeroPages ?? 0) }
    }, { merging: 0, zero: 0 })
  // Converged: the counts held still over two full scans.
  let last = -1, lastScan = ksm.counters().fullScans, steady = 0
  const deadline = Date.now() + 40_000
  while (Date.now() < deadline && steady < 2) {
    await new Promise((done) => setTimeout(done, 200))
    const scans = ksm.counters().fullScans
    if (scans === lastScan) continue
    lastScan = scans
    const m = merged()
    steady = m.merging + m.zero === last && last > 0 ? steady + 1 : 0
    last = m.merging + m.zero
  }
  const kernel = merged()
  // ksm_merging_pages counts every page mapping a KSM page, the one kept included; the estimate's
  // pages taking part in merges are its freeable duplicates plus one kept page per group.
  const predicted = r.total.duplicatePages + r.total.duplicateGroups
  t.comment(`ksmd: ${kernel.merging} merging pages, ${kernel.zero} zero pages; estimate: ${predicted} and ${r.total.zeroPages}`)
  t.ok(Math.abs(kernel.merging - predicted) <= 0.02 * predicted, `merging pages within 2% (${kernel.merging} vs ${predicted})`)
  t.ok(Math.abs(kernel.zero - r.total.zeroPages) <= 0.02 * r.total.zeroPages, `zero pages within 2% (${kernel.zero} vs ${r.total.zeroPages})`)
  const freedByKernel = kernel.merging - r.total.duplicateGroups + kernel.zero
  const freeable = r.total.bytesFreeable / PAGE_SIZE
  t.ok(Math.abs(freedByKernel - freeable) <= 0.02 * freeable, `pages freed within 2% (${freedByKernel} vs ${freeable})`)
})

t.test('the bridge: partial reads report how far they got, bad processes a -errno', async (t) => {
  const arena = new native.Arena()
  const buf = new Uint8Array(arena.alloc(4 * PAGE_SIZE, false))
  buf.fill(7)
  const at = native.addressOf(buf)
  // The arena reserves the addresses after the buffer PROT_NONE: the read stops there.
  const out = new BigUint64Array(8)
  const status = new Int32Array(2)
  t.equal(native.remoteHash(process.pid, BigUint64Array.of(at, 8n), out, status), 4)
  t.same([...status], [4, -14], '4 pages read, then EFAULT')
  const one = new BigUint64Array(1)
  native.hashPages(buf, 0, 1, one, 0)
  t.equal(out[0], one[0], 'the same hash as hashing in place')
  const flags = new Uint8Array(8)
  t.equal(native.pagemapPresent(process.pid, at, 8, flags), 8)
  t.same([...flags].map((f) => f & RemotePage.PRESENT), [1, 1, 1, 1, 0, 0, 0, 0], 'present: the written pages only')
  t.equal(native.pagemapPresent(4194303, at, 1, flags) < 0, true, 'no such process: -errno')
  const st = new Int32Array(4)
  native.remoteHash(4194303, BigUint64Array.of(at, 1n), out, st)
  t.same([...st.subarray(0, 2)], [0, -3], 'no such process: ESRCH per range')
  // Compare: the buffer's pages against zeros and against its first page.
  const cmpStatus = new Int32Array(2 + 3), cmpHashes = new BigUint64Array(5)
  native.remoteCompare(BigUint64Array.of(0n, 0n, BigInt(process.pid), at), BigUint64Array.of(0n, BigInt(process.pid), at, 1n, BigInt(process.pid), at + 4096n, 1n, BigInt(process.pid), at + 4n * 4096n), cmpStatus, cmpHashes)
  t.same([...cmpStatus], [0, 0, 1, 0, -14], 'refs read; differs from zeros, equals page 0, unreadable')
  t.equal(cmpHashes[3], one[0], 'hashes as read now')
  t.throws(() => native.remoteHash(process.pid, BigUint64Array.of(at + 1n, 1n), out, status), { code: ErrorCode.MISALIGNED })
  t.throws(() => native.remoteHash(0, BigUint64Array.of(at, 1n), out, status), { code: ErrorCode.OUT_OF_RANGE })
  t.throws(() => native.remoteCompare(BigUint64Array.of(0n, 0n), BigUint64Array.of(1n, 1n, at), new Int32Array(2), new BigUint64Array(2)), { code: ErrorCode.OUT_OF_RANGE }, 'a member naming a ref that is not there')
})

t.test('remoteHash: small ranges read together, each with its own status', async (t) => {
  const arena = new native.Arena()
  const sab = arena.alloc(64 * PAGE_SIZE, false)
  const u = new Uint8Array(sab)
  for (let i = 0; i < 64; i++) u.fill(i + 1, i * PAGE_SIZE, (i + 1) * PAGE_SIZE)
  const at = native.addressOf(sab)
  const want = new BigUint64Array(64)
  native.hashPages(u, 0, 64, want, 0)
  const page = BigInt(PAGE_SIZE)
  // pages 0-2, two unmapped pages, page 5, an empty range, pages 10-63
  const ranges = BigUint64Array.of(at, 3n, 1n << 40n, 2n, at + 5n * page, 1n, at + 20n * page, 0n, at + 10n * page, 54n)
  const out = new BigUint64Array(60)
  const status = new Int32Array(10)
  t.equal(native.remoteHash(process.pid, ranges, out, status), 58)
  t.same([...status], [3, 0, 0, -14, 1, 0, 0, 0, 54, 0], 'the unmapped range alone fails (EFAULT)')
  t.same([out[0], out[2], out[5], out[6], out[59]], [want[0], want[2], want[5], want[10], want[63]], 'each hash in its range\'s place')
})

t.test('grouping keys: repeated keys only, and the zero key from one page', async (t) => {
  const keys = new Uint32Array([1, 0, 2, 0, 1, 0, 3, 9, 2, 0, 5, 5])
  const groupOf = new Int32Array(6)
  const { groups, zero } = groupKeys(keys, 6, [5, 5], groupOf)
  t.equal(groups, 3)
  t.same(zero, [false, false, true])
  t.same([...groupOf], [0, 1, 0, -1, 1, 2])
})

t.test('bad options: a code, and nothing read', async (t) => {
  const cases: Array<[unknown, string, ErrorConstructor]> = [
    [undefined, ErrorCode.INVALID_OPTION, TypeError],
    [{}, ErrorCode.INVALID_OPTION, TypeError],
    [{ pids: [0] }, ErrorCode.INVALID_OPTION, RangeError],
    [{ pids: ['1'] }, ErrorCode.INVALID_OPTION, TypeError],
    [{ pids: [1.5] }, ErrorCode.INVALID_OPTION, RangeError],
    [{ pids: [1], top: -1 }, ErrorCode.INVALID_OPTION, RangeError],
    [{ pids: [1], workers: 0 }, ErrorCode.INVALID_OPTION, RangeError],
    [{ pids: [1], includeZero: 'yes' }, ErrorCode.INVALID_OPTION, TypeError],
    [{ pids: [1], ranges: { x: [] } }, ErrorCode.INVALID_OPTION, RangeError],
    [{ pids: [1], ranges: { 1: [{ address: 'here', bytes: 1 }] } }, ErrorCode.INVALID_OPTION, TypeError],
    [{ pids: [1], domainsByPid: { 1: {} } }, ErrorCode.INVALID_OPTION, TypeError],
    [{ pids: [1], pid: 1 }, ErrorCode.UNKNOWN_OPTION, TypeError],
    [{ pids: [1], IncludeZero: true }, ErrorCode.UNKNOWN_OPTION, TypeError],
  ]
  for (const [options, code, type] of cases) {
    await t.rejects(estimate(options as EstimateOptions), { code, constructor: type }, JSON.stringify(options) ?? 'undefined')
  }
  await t.rejects(estimate({ pids: [1], IncludeZero: true } as unknown as EstimateOptions), { message: /did you mean "includeZero"/ })
})

t.test('a report is plain JSON', async (t) => {
  const r = await estimate({ pids: [process.pid], ranges: new Map([[process.pid, [{ address: 0, bytes: 0 }]]]) })
  t.same(JSON.parse(JSON.stringify(r)), r, 'no bigint, no class instances')
  t.equal(r.processes[0]!.status, 'ok', 'itself, when ranges name it')
  t.equal(readFileSync('/proc/self/stat', 'utf8').length > 0, true)
})
