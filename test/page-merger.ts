// PageMerger as its users see it: the kernel's KSM selftests (tools/testing/selftests/mm/ksm_tests.c)
// translated, and the scanner issue's list. Judged by stats counters, bytes read back, Pss and
// page frames from the OS, and error codes.
import t, { type Test } from 'tap'
import { execFileSync } from 'node:child_process'
import { once } from 'node:events'
import { closeSync, fstatSync, mkdtempSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { Worker } from 'node:worker_threads'
import { ErrorCode, PageMerger, rangePss, smapsRollup, type Stats } from '../lib/index'
import { loadNative } from '../lib/native'
import { digest, fillRandom, gcUntil, isRoot, MiB, PAGE } from './fixtures/util'

const native = loadNative()
const ROOT = resolve(__dirname, '..')
const PFN_MASK = (1n << 55n) - 1n
/** /proc/kpageflags bit of the kernel's shared zero page. */
const KPF_ZERO_PAGE = 1n << 24n

/** Reads one byte of every page (no allocation), so that merged pages are mapped and counted in Pss. */
function touch(...bufs: Uint8Array[]): number {
  let sum = 0
  for (const b of bufs) for (let i = 0; i < b.length; i += PAGE) sum += b[i]!
  return sum
}

/**
 * Pss of exactly the buffers' pages, as smaps counts it: each present page's bytes divided by the
 * number of mappings of it (/proc/kpagecount), the kernel's zero page not counted. Adjacent
 * buffers of one arena share a kernel mapping, so smaps' per-mapping figures cannot tell them
 * apart; without root (no page frame numbers), the Pss of the mappings over their span.
 */
function pssOf(...bufs: Uint8Array[]): number {
  if (!isRoot) {
    const lo = bufs.map((b) => native.addressOf(b)).reduce((m, x) => (x < m ? x : m))
    const hi = bufs.map((b) => native.addressOf(b) + BigInt(b.byteLength)).reduce((m, x) => (x > m ? x : m))
    return rangePss(lo, Number(hi - lo))
  }
  const counts = openSync('/proc/kpagecount', 'r'), kflags = openSync('/proc/kpageflags', 'r')
  const word = new BigUint64Array(1)
  const read = (fd: number, pfn: bigint) => (readSync(fd, word, 0, 8, Number(pfn) * 8), word[0]!)
  let pss = 0
  try {
    for (const b of bufs) {
      const entries = new BigUint64Array(b.byteLength / PAGE)
      native.pagemap(b, 0, entries.length, entries)
      for (const e of entries) {
        if (!(e >> 63n)) continue // not present
        const pfn = e & PFN_MASK
        if (read(kflags, pfn) & KPF_ZERO_PAGE) continue
        pss += PAGE / Number(read(counts, pfn))
      }
    }
  } finally {
    closeSync(counts)
    closeSync(kflags)
  }
  return Math.round(pss)
}

const gc = (globalThis as { gc?: () => void }).gc!

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

/**
 * The process's Pss of memory (anonymous and shmem: buffers, heaps, the arena), once it holds
 * still: earlier tests' buffers and threads are given back asynchronously (V8's sweeper, thread
 * exits). File-backed Pss is left out because it moves whenever another process maps the same
 * files (the node binary, shared libraries), which says nothing about this process.
 */
async function settledPss(): Promise<number> {
  const memory = () => {
    const r = smapsRollup()
    return r.Pss_Anon! + r.Pss_Shmem!
  }
  let last = -1
  for (let i = 0; i < 100; i++) {
    gc()
    await sleep(20)
    const now = memory()
    if (last >= 0 && Math.abs(now - last) <= 16 * PAGE) return now
    last = now
  }
  return last
}

/**
 * Whether a read of never-written private anonymous memory maps the kernel's shared zero page
 * (costing nothing) rather than a fresh page. Some kernels, like this test VM's, allocate.
 */
function kernelMapsZeroPage(): boolean {
  const probe = new Uint8Array(new native.Arena().alloc(64 * PAGE, false))
  touch(probe)
  return pssOf(probe) === 0
}

/** Page frame numbers (bits 0-54 of /proc/self/pagemap) of the buffer's pages. */
function pfns(buf: Uint8Array): bigint[] {
  const pages = buf.byteLength / PAGE
  const out = new BigUint64Array(pages)
  native.pagemap(buf, 0, pages, out)
  return [...out].map((e) => e & PFN_MASK)
}

/**
 * The fd of the memfd that backs a buffer fresh from pm.alloc(), found by the inode of its
 * mapping: that file holds the PageMerger's arena, and its st_blocks is what the OS keeps for it.
 */
function arenaFdOf(buf: Uint8Array): number {
  const at = native.addressOf(buf)
  for (const line of readFileSync('/proc/self/maps', 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)\s+\/memfd:pagemerge-arena/.exec(line)
    if (!m || at < BigInt('0x' + m[1]) || at >= BigInt('0x' + m[2])) continue
    for (const name of readdirSync('/proc/self/fd')) {
      try {
        if (statSync(`/proc/self/fd/${name}`).ino === Number(m[3]) && readlinkSync(`/proc/self/fd/${name}`).startsWith('/memfd:')) return Number(name)
      } catch {
        // the directory's own fd, closed by now
      }
    }
  }
  throw new Error('found no arena memfd behind the buffer')
}

const counts = (s: Stats) => ({ pagesShared: s.pagesShared, pagesSharing: s.pagesSharing })

// ---- 1. merging of identical pages (ksm_tests.c check_ksm_merge) -----------------------------

t.test('10 separate pages of the same byte: 1 shared, 9 sharing, bytes intact', async (t) => {
  const pm = new PageMerger()
  const bufs = Array.from({ length: 10 }, () => pm.alloc(PAGE).fill(0x5a))
  const s = await pm.mergeNow()
  t.same(counts(s), { pagesShared: 1, pagesSharing: 9 })
  t.ok(bufs.every((b) => b.every((x) => x === 0x5a)), 'every page reads its bytes')
  await pm.close()
})

t.test('one 40 KiB buffer of the same byte: 1 shared, 9 sharing, bytes intact', async (t) => {
  const pm = new PageMerger()
  const buf = pm.alloc(10 * PAGE).fill(0x5a)
  const s = await pm.mergeNow()
  t.same(counts(s), { pagesShared: 1, pagesSharing: 9 })
  t.same(pm.bufferStats(buf), { pages: 10, pagesShared: 1, pagesSharing: 9, zeroPages: 0, domain: '' })
  t.ok(buf.every((x) => x === 0x5a), 'every page reads its bytes')
  await pm.close()
})

// ---- 2. max_page_sharing (ksm_tests.c assert_ksm_pages_count) --------------------------------

for (const [n, want] of [
  [11, { pagesShared: 1, pagesSharing: 9, stableNodeChains: 0, stableNodeDups: 0 }],
  [12, { pagesShared: 2, pagesSharing: 10, stableNodeChains: 1, stableNodeDups: 2 }],
] as const) {
  t.test(`maxPageSharing 10, ${n} identical pages: ${want.pagesShared} shared, ${want.pagesSharing} sharing`, async (t) => {
    const pm = new PageMerger({ maxPageSharing: 10 })
    const buf = pm.alloc(n * PAGE).fill(0x33)
    const s = await pm.mergeNow()
    t.same({ ...counts(s), stableNodeChains: s.stableNodeChains, stableNodeDups: s.stableNodeDups }, want)
    const b = pm.bufferStats(buf)
    t.equal(b.pagesShared + b.pagesSharing, want.pagesShared + want.pagesSharing, 'pages merged')
    t.ok(buf.every((x) => x === 0x33), 'bytes intact')
    await pm.close()
  })
}

// ---- 3. copy-on-write breaks sharing (ksm_tests.c check_ksm_unmerge / ksm_cow_time) ----------

t.test('two merged pages written with different bytes: 0 shared, 0 sharing after the next full scan', async (t) => {
  const pm = new PageMerger()
  const a = pm.alloc(PAGE).fill(7), b = pm.alloc(PAGE).fill(7)
  t.same(counts(await pm.mergeNow()), { pagesShared: 1, pagesSharing: 1 }, 'merged first')
  a.fill(1)
  b.fill(2)
  t.ok(a.every((x) => x === 1), 'a reads what was written into it')
  t.ok(b.every((x) => x === 2), 'b reads what was written into it')
  const s = await pm.mergeNow()
  t.same(counts(s), { pagesShared: 0, pagesSharing: 0 })
  t.ok(a.every((x) => x === 1) && b.every((x) => x === 2), 'still reads what was written')
  await pm.close()
})

// ---- 4. zero pages (ksm_tests.c check_ksm_zero_page_merge) -----------------------------------

t.test('10 written zero pages, useZeroPages false: merged like any page', async (t) => {
  const pm = new PageMerger({ useZeroPages: false })
  const buf = pm.alloc(10 * PAGE).fill(1).fill(0)
  const s = await pm.mergeNow()
  t.same({ ...counts(s), zeroPages: s.zeroPages }, { pagesShared: 1, pagesSharing: 9, zeroPages: 0 })
  t.ok(buf.every((x) => x === 0), 'reads return zeros')
  await pm.close()
})

t.test('10 written zero pages, useZeroPages true (default): dropped, Pss lower', async (t) => {
  const pm = new PageMerger()
  t.equal(pm.options.useZeroPages, true, 'the default')
  const buf = pm.alloc(10 * PAGE).fill(1).fill(0)
  const before = { buffer: pssOf(buf), process: smapsRollup() }
  const s = await pm.mergeNow()
  const after = { buffer: pssOf(buf), process: smapsRollup() } // before the test reads a byte
  t.same({ ...counts(s), zeroPages: s.zeroPages }, { pagesShared: 0, pagesSharing: 0, zeroPages: 10 })
  t.equal(pm.bufferStats(buf).zeroPages, 10)
  t.equal(before.buffer, 10 * PAGE, 'the buffer cost 10 pages of Pss before')
  t.ok(before.process.Pss_Shmem! - after.process.Pss_Shmem! >= 10 * PAGE, `process Pss_Shmem fell by ${(before.process.Pss_Shmem! - after.process.Pss_Shmem!) / 1024} KiB`)
  t.equal(after.buffer, 0, 'and the buffer costs no Pss after mergeNow()')
  t.ok(buf.every((x) => x === 0), 'reads return zeros')
  if (kernelMapsZeroPage()) t.equal(pssOf(buf), 0, 'nor after reading it: reads see the kernel zero page')
  else t.pass('nor after reading it', { skip: 'needs a kernel that maps its zero page on read faults: this one allocates a page per read' })
  await pm.close()
})

// ---- 5. unmerging (ksm_tests.c check_ksm_unmerge, run=2) -------------------------------------

for (const how of ['unregister', 'unmergeAll'] as const) {
  t.test(`${how}: counters to 0, bytes intact, private page frames, Pss and pool back`, async (t) => {
    const pm = new PageMerger()
    const a = pm.alloc(1 * MiB), b = pm.alloc(1 * MiB)
    const arenaFd = arenaFdOf(a)
    fillRandom(a, 5)
    b.set(a)
    const d = digest(a)
    touch(a, b)
    const unmerged = pssOf(a, b)
    const s = await pm.mergeNow()
    t.same(counts(s), { pagesShared: 256, pagesSharing: 256 }, 'merged')
    touch(a, b)
    t.ok(pssOf(a, b) <= unmerged / 2 + 4 * PAGE, `merged Pss ${pssOf(a, b)} vs ${unmerged}`)
    if (isRoot) {
      const pa = pfns(a), pb = pfns(b)
      t.ok(pa.every((f, i) => f !== 0n && f === pb[i]), 'merged pages share page frames')
    } else t.pass('merged pages share page frames', { skip: 'needs root: reads page frame numbers from /proc/self/pagemap' })

    if (how === 'unregister') {
      t.equal(pm.unregister(a), true)
      t.equal(pm.unregister(b), true)
      t.equal(pm.unregister(b), false, 'a second unregister says it was not registered')
    } else {
      await pm.unmergeAll()
      t.equal(pm.stats().pagesTracked, 512, 'registrations are kept')
    }
    const after = pm.stats()
    t.same({ ...counts(after), zeroPages: after.zeroPages }, { pagesShared: 0, pagesSharing: 0, zeroPages: 0 })
    t.equal(digest(a), d, 'a reads back its bytes')
    t.equal(digest(b), d, 'b reads back its bytes')

    if (isRoot) {
      touch(a, b)
      const frames = [...pfns(a), ...pfns(b)]
      t.ok(frames.every((f) => f !== 0n), 'every page is present')
      t.equal(new Set(frames).size, frames.length, 'no two pages share a page frame')
    } else t.pass('no two pages share a page frame', { skip: 'needs root: reads page frame numbers from /proc/self/pagemap' })

    touch(a, b)
    const now = pssOf(a, b)
    t.ok(Math.abs(now - unmerged) <= unmerged * 0.02, `Pss ${now} vs ${unmerged} before merging`)
    t.equal(fstatSync(arenaFd).blocks, 0, "the arena's file holds no pool pages")
    b[0] = b[0]! ^ 1
    t.not(a[0], b[0], 'pages are private again')
    if (how === 'unmergeAll') t.same(counts(await pm.mergeNow()), { pagesShared: 255, pagesSharing: 255 }, 'and merge again')
    await pm.close()
  })
}

// ---- 6. zero pages through unregister and writes ---------------------------------------------

t.test('two 1 MiB zero buffers: 512 zero pages, 256 after unregistering one, 0 after writing the other', async (t) => {
  const pm = new PageMerger()
  const a = pm.alloc(1 * MiB).fill(1).fill(0), b = pm.alloc(1 * MiB).fill(1).fill(0)
  const s = await pm.mergeNow()
  t.same({ ...counts(s), zeroPages: s.zeroPages }, { pagesShared: 0, pagesSharing: 0, zeroPages: 512 })
  t.equal(pm.unregister(a), true)
  t.equal(pm.stats().zeroPages, 256, 'after unregistering the first')
  t.ok(a.every((x) => x === 0), 'the unregistered buffer reads zeros')
  for (let p = 0; p < 256; p++) b[p * PAGE + (p % PAGE)] = 1 + (p % 255)
  const s2 = await pm.mergeNow()
  t.equal(s2.zeroPages, 0, 'after writing a nonzero byte into every page of the second')
  let ok = true
  for (let p = 0; p < 256; p++) for (let i = 0; i < PAGE; i++) ok &&= b[p * PAGE + i] === (i === p % PAGE ? 1 + (p % 255) : 0)
  t.ok(ok, 'the second buffer reads what was written')
  await pm.close()
})

// ---- 7. writes that bypass JS views ----------------------------------------------------------

/** Two 4-page buffers of the same seeded bytes, merged: 4 shared, 4 sharing. */
async function mergedPair(t: Test, seed: number) {
  const pm = new PageMerger()
  const a = pm.alloc(4 * PAGE), b = pm.alloc(4 * PAGE)
  fillRandom(a, seed)
  b.set(a)
  const d = digest(a) // taken before merging, as the bytes the application wrote
  t.same(counts(await pm.mergeNow()), { pagesShared: 4, pagesSharing: 4 })
  return { pm, a, b, d }
}

t.test('stats().writeProtection says what the bridge has: full as root', async (t) => {
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  const mode = pm.stats().writeProtection
  t.equal(mode, new (loadNative().Arena)().stats().writeProtection, 'the same mode as a bridge arena of this process')
  if (isRoot) t.equal(mode, 'full', 'as root, every writer waits, system calls included')
  else t.ok(['full', 'user', 'none'].includes(mode), `not root: ${mode}`)
})

t.test('fs.readSync into a merged buffer changes only that buffer', async (t) => {
  const { pm, a, b, d } = await mergedPair(t, 7)
  const dir = mkdtempSync(join(tmpdir(), 'pagemerge-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const file = join(dir, 'bytes')
  const written = Buffer.alloc(PAGE + 100, 0xee)
  writeFileSync(file, written)
  const fd = openSync(file, 'r')
  try {
    t.equal(readSync(fd, a, PAGE + 10, written.length, 0), written.length, 'the kernel wrote into the buffer')
  } finally {
    closeSync(fd)
  }
  t.ok(a.subarray(PAGE + 10, PAGE + 10 + written.length).every((x) => x === 0xee), 'a reads the file')
  t.equal(digest(b), d, 'b keeps its bytes')
  const want = Buffer.from(b)
  want.fill(0xee, PAGE + 10, PAGE + 10 + written.length)
  t.ok(a.equals(want), 'a changed nowhere else')
  const s = await pm.mergeNow()
  // as in the kernel, a stable page with one mapper left still counts in pagesShared
  t.same(counts(s), { pagesShared: 4, pagesSharing: 2 }, 'the two written pages left the sharing')
  t.equal(digest(b), d, 'b still keeps its bytes')
  t.ok(a.equals(want), 'a still reads the file')
  await pm.close()
})

t.test('Atomics.store from a worker thread into a merged buffer changes only that buffer', async (t) => {
  const { pm, a, b, d } = await mergedPair(t, 8)
  const index = (2 * PAGE + 64) / 4
  const value = 0x12345678
  const w = new Worker(
    `const { workerData, parentPort } = require('node:worker_threads')
     Atomics.store(new Int32Array(workerData.sab), workerData.index, workerData.value)
     parentPort.postMessage(Atomics.load(new Int32Array(workerData.sab), workerData.index))`,
    { eval: true, workerData: { sab: a.buffer, index, value } },
  )
  const [seen] = (await once(w, 'message')) as [number]
  await once(w, 'exit')
  t.equal(seen, value, 'the worker reads its store')
  t.equal(new Int32Array(a.buffer)[index], value, 'the main thread sees the store in a')
  t.equal(digest(b), d, 'b keeps its bytes')
  const want = Buffer.from(b)
  want.writeInt32LE(value, index * 4)
  t.ok(a.equals(want), 'a changed nowhere else')
  t.same(counts(await pm.mergeNow()), { pagesShared: 4, pagesSharing: 3 }, 'the written page left the sharing')
  t.equal(digest(b), d, 'b still keeps its bytes')
  await pm.close()
})

// ---- 8. background scanning and volatile pages -----------------------------------------------

t.test('background: a page rewritten between every scan never merges; it merges two scans after it stops', async (t) => {
  const pm = new PageMerger({ pagesToScan: 1000, sleepMillisecs: 5 })
  const a = pm.alloc(4 * PAGE), b = pm.alloc(4 * PAGE)
  fillRandom(a, 9)
  b.set(a)
  const x = Buffer.from(b.subarray(PAGE, 2 * PAGE)) // what a's page 1 holds every other round, like b's page 1
  const v = a.subarray(PAGE, 2 * PAGE)
  const immediate = () => new Promise<void>((r) => setImmediate(r))
  /**
   * Waits for the scan after `seen` to end. A scan ends inside a worker reply's callback and the
   * scanner then sleeps on a timer, so a check-phase poll runs before the next scan begins.
   */
  async function nextScan(seen: number): Promise<Stats> {
    const end = Date.now() + 10_000
    for (;;) {
      const s = pm.stats()
      if (s.fullScans !== seen) {
        t.equal(s.fullScans, seen + 1, `scan ${seen + 1} observed before the next began`)
        return s
      }
      if (Date.now() > end) throw new Error(`no full scan after ${seen} within 10 s`)
      await immediate()
    }
  }
  pm.start()
  t.equal(pm.running, true)
  let s = await nextScan(0)
  let round = 0
  const rewrite = () => (++round % 2 ? v.fill(round) : v.set(x)) // alternately other bytes and b's page
  rewrite()
  while (round < 8) {
    s = await nextScan(s.fullScans)
    t.same({ ...counts(s), pagesVolatile: s.pagesVolatile }, { pagesShared: 3, pagesSharing: 3, pagesVolatile: 1 }, `scan ${s.fullScans}: the rewritten page is volatile, the rest merged`)
    rewrite()
  }
  // the last rewrite made it equal to b's page 1; now it stops changing
  t.ok(v.equals(x), 'a page 1 holds b page 1 bytes')
  s = await nextScan(s.fullScans)
  t.same({ ...counts(s), pagesVolatile: s.pagesVolatile }, { pagesShared: 3, pagesSharing: 3, pagesVolatile: 1 }, 'one scan later: changed since the scan before, still volatile')
  s = await nextScan(s.fullScans)
  t.same({ ...counts(s), pagesVolatile: s.pagesVolatile }, { pagesShared: 4, pagesSharing: 4, pagesVolatile: 0 }, 'two scans later: merged')
  await pm.stop()
  t.equal(pm.running, false)
  t.ok(a.equals(b), 'a reads the same bytes as b')
  t.ok(b.subarray(PAGE, 2 * PAGE).equals(x), 'b page 1 unchanged')
  await pm.close()
})

t.test('start({ onProgress }): called when what is saved changes and after every full scan, never on a quiet batch', async (t) => {
  const pm = new PageMerger({ pagesToScan: 16, sleepMillisecs: 1 })
  const a = pm.alloc(64 * PAGE), b = pm.alloc(64 * PAGE)
  fillRandom(a, 21)
  b.set(a)
  const seen: Array<{ pagesScanned: number; pagesTotal: number; fullScans: number; pagesSharing: number; zeroPages: number }> = []
  let settled!: () => void
  const done = new Promise<void>((r) => (settled = r))
  pm.start({ onProgress: (p) => (seen.push({ ...p }), p.pagesSharing === 64 && p.fullScans >= 4 && settled()) })
  await done
  await pm.stop()
  // 8 batches a scan: a call per batch would be 32 calls by now; changes and scan ends are far fewer
  t.ok(seen.length < 24, `${seen.length} calls in ${seen.at(-1)!.fullScans} full scans`)
  t.ok(seen.every((p, i) => i === 0 || p.fullScans > seen[i - 1]!.fullScans || p.pagesSharing !== seen[i - 1]!.pagesSharing || p.zeroPages !== seen[i - 1]!.zeroPages), 'each call reports a change or a scan ended')
  const scans = seen.map((p) => p.fullScans).filter((n, i, all) => i === 0 || n !== all[i - 1])
  t.same(scans, Array.from({ length: scans.at(-1)! - scans[0]! + 1 }, (_, i) => scans[0]! + i), 'every full scan is reported, in order')
  t.ok(seen.every((p) => p.pagesTotal === 128 && p.pagesScanned <= 128), 'pagesTotal and pagesScanned')
  t.ok(seen.some((p) => p.pagesSharing > 0 && p.pagesSharing < 64), 'merges reported as they happen, batch by batch')
  t.equal(pm.stats().pagesSharing, 64, 'stats() agrees')
  t.ok(a.equals(b), 'bytes intact')
  // A throwing callback stops scanning; stop() rejects with its error, and bytes stay.
  a[0] = a[0]! ^ 1 // a change, so that the next scan reports (a merged page written: one sharer fewer)
  const mine = Object.assign(new Error('from the callback'), { code: 'MINE' })
  pm.start({ onProgress: () => { throw mine } })
  await gcUntil(() => !pm.running)
  t.equal(pm.running, false, 'scanning stopped')
  await t.rejects(pm.stop(), { code: 'MINE' }, 'stop() rejects with the error')
  t.equal(b[0], a[0]! ^ 1, 'the write stayed private')
  throwsCoded(t, () => pm.start({ onProgress: 5 as unknown as () => void }), TypeError, ErrorCode.INVALID_ARG, 'onProgress not a function')
  throwsCoded(t, () => pm.start({ onProgres: () => {} } as object), TypeError, ErrorCode.UNKNOWN_OPTION, 'misspelt option')
  t.equal(pm.running, false, 'bad options start nothing')
  await pm.close()
})

t.test('background over merged memory: quiet batches taken in one wake-up, writes and touched zero pages still noticed', async (t) => {
  // every page merged or given back: runs of batches with nothing to do are stepped over (engine.ts, skipQuiet)
  const pm = new PageMerger({ pagesToScan: 16, sleepMillisecs: 2 })
  const a = pm.alloc(256 * PAGE), b = pm.alloc(256 * PAGE), z = pm.alloc(256 * PAGE).fill(1).fill(0)
  fillRandom(a, 31)
  b.set(a)
  const s0 = await pm.mergeNow()
  t.same({ ...counts(s0), zeroPages: s0.zeroPages }, { pagesShared: 256, pagesSharing: 256, zeroPages: 256 }, 'merged and dropped first')
  /** Waits until `done()` holds at the end of a full scan (at most 10 s: a progress check, not a speed one). */
  const until = (done: (s: Stats) => boolean) => new Promise<Stats>((resolve, reject) => {
    const end = Date.now() + 10_000
    const poll = () => {
      const s = pm.stats()
      if (done(s)) return resolve(s)
      if (Date.now() > end) return reject(new Error(`not within 10 s: ${JSON.stringify(counts(s))}, ${s.zeroPages} zero pages, ${s.fullScans} scans`))
      setTimeout(poll, 5)
    }
    poll()
  })
  pm.start()
  const scans = pm.stats().fullScans
  let s = await until((x) => x.fullScans >= scans + 3)
  t.ok(s.pagesScanned - s0.pagesScanned >= 3 * 768, `full scans go on: ${s.fullScans - scans} scans, ${s.pagesScanned - s0.pagesScanned} pages`)
  t.same({ ...counts(s), zeroPages: s.zeroPages }, { pagesShared: 256, pagesSharing: 256, zeroPages: 256 }, 'nothing changed, nothing counted differently')
  b[100 * PAGE] = b[100 * PAGE]! ^ 1 // a merged page written: a private copy now
  z[7 * PAGE] = 9 // a given-back zero page written
  s = await until((x) => x.pagesSharing === 255 && x.zeroPages === 255)
  t.pass(`both noticed by scan ${s.fullScans - scans} of the background`)
  t.equal(b[100 * PAGE], a[100 * PAGE]! ^ 1, 'the write stayed in b')
  t.equal(z[7 * PAGE], 9, 'z reads what was written')
  // the written merged page has a copy of its old self in a: merged again in later scans, once unchanged
  b[100 * PAGE] = a[100 * PAGE]!
  s = await until((x) => x.pagesSharing === 256)
  t.ok(a.equals(b), 'a and b read the same bytes again, merged')
  await pm.stop()
  await pm.close()
})

// ---- 9. domains ------------------------------------------------------------------------------

t.test('different domains never share a page', async (t) => {
  const pm = new PageMerger()
  const a = pm.alloc(8 * PAGE, { domain: 'a' }), b = pm.alloc(8 * PAGE, { domain: 'b' })
  fillRandom(a, 10)
  b.set(a)
  t.same(counts(await pm.mergeNow()), { pagesShared: 0, pagesSharing: 0 }, 'a and b do not merge')
  t.equal(pm.bufferStats(b).domain, 'b')
  const a2 = pm.alloc(8 * PAGE, { domain: 'a' })
  a2.set(a)
  t.same(counts(await pm.mergeNow()), { pagesShared: 8, pagesSharing: 8 }, 'two buffers of domain a merge')
  t.same(pm.bufferStats(b), { pages: 8, pagesShared: 0, pagesSharing: 0, zeroPages: 0, domain: 'b' }, 'b still merged with nothing')
  if (isRoot) {
    touch(a, a2, b)
    const fb = new Set(pfns(b))
    t.ok([...pfns(a), ...pfns(a2)].every((f) => !fb.has(f)), 'no page frame of b is shared with domain a')
  } else t.pass('no page frame of b is shared with domain a', { skip: 'needs root: reads page frame numbers from /proc/self/pagemap' })
  await pm.close()
})

t.test('different domains share pages with mergeAcrossDomains', async (t) => {
  const pm = new PageMerger({ mergeAcrossDomains: true })
  const a = pm.alloc(8 * PAGE, { domain: 'a' }), b = pm.alloc(8 * PAGE, { domain: 'b' })
  fillRandom(a, 10)
  b.set(a)
  t.same(counts(await pm.mergeNow()), { pagesShared: 8, pagesSharing: 8 })
  t.ok(a.equals(b), 'bytes intact')
  await pm.close()
})

// ---- 10. options -----------------------------------------------------------------------------

function throwsCoded(t: Test, fn: () => unknown, Class: ErrorConstructor | TypeErrorConstructor | RangeErrorConstructor, code: string, what: string) {
  try {
    fn()
  } catch (err) {
    t.equal((err as Error).constructor, Class, `${what}: ${Class.name}`)
    t.equal((err as { code?: unknown }).code, code, `${what}: ${code}`)
    return
  }
  t.fail(`${what}: did not throw`)
}

t.test('bad options: TypeError/RangeError with codes, nothing changed', async (t) => {
  throwsCoded(t, () => new PageMerger({ pagesToScan: 0 }), RangeError, ErrorCode.INVALID_OPTION, 'pagesToScan 0')
  throwsCoded(t, () => new PageMerger({ useZeroPages: 'yes' as unknown as boolean }), TypeError, ErrorCode.INVALID_OPTION, 'useZeroPages "yes"')
  throwsCoded(t, () => new PageMerger({ pagesToscan: 5 } as object), TypeError, ErrorCode.UNKNOWN_OPTION, 'pagesToscan')
  const pm = new PageMerger({ pagesToScan: 50 })
  const before = pm.options
  throwsCoded(t, () => pm.setOptions({ sleepMillisecs: -1 }), RangeError, ErrorCode.INVALID_OPTION, 'setOptions sleepMillisecs -1')
  throwsCoded(t, () => pm.setOptions({ maxPageSharing: 1.5 }), RangeError, ErrorCode.INVALID_OPTION, 'setOptions maxPageSharing 1.5')
  throwsCoded(t, () => pm.setOptions({ workers: '2' as unknown as number }), TypeError, ErrorCode.INVALID_OPTION, 'setOptions workers "2"')
  throwsCoded(t, () => pm.setOptions({ pagesToScan: 10, bogus: 1 } as object), TypeError, ErrorCode.UNKNOWN_OPTION, 'setOptions bogus')
  t.strictSame(pm.options, before, 'options unchanged by failed calls')
  pm.setOptions({ pagesToScan: 10 })
  t.equal(pm.options.pagesToScan, 10, 'a good value is taken')
  await pm.close()
})

t.test('maxPageSharing cannot change while pages are shared (EBUSY), can after unmergeAll', async (t) => {
  const pm = new PageMerger()
  const a = pm.alloc(3 * PAGE).fill(9), b = pm.alloc(3 * PAGE).fill(9)
  t.same(counts(await pm.mergeNow()), { pagesShared: 1, pagesSharing: 5 })
  throwsCoded(t, () => pm.setOptions({ maxPageSharing: 3 }), Error, ErrorCode.BUSY, 'while shared')
  t.equal(pm.options.maxPageSharing, 256, 'unchanged')
  pm.setOptions({ maxPageSharing: 256 }) // the same value is no change
  await pm.unmergeAll()
  pm.setOptions({ maxPageSharing: 3 })
  t.equal(pm.options.maxPageSharing, 3, 'taken after unmergeAll')
  const s = await pm.mergeNow()
  t.same({ ...counts(s), stableNodeChains: s.stableNodeChains, stableNodeDups: s.stableNodeDups }, { pagesShared: 2, pagesSharing: 4, stableNodeChains: 1, stableNodeDups: 2 }, 'and obeyed: 6 pages, at most 3 per stable page')
  t.ok(a.every((x) => x === 9) && b.every((x) => x === 9), 'bytes intact')
  await pm.close()
})

t.test('the engine is fixed at construction (BUSY), like the other options checked up front', async (t) => {
  const pm = new PageMerger()
  throwsCoded(t, () => pm.setOptions({ engine: 'kernel' }), Error, ErrorCode.BUSY, 'engine change')
  throwsCoded(t, () => new PageMerger({ engine: 'ksm' as 'kernel' }), RangeError, ErrorCode.INVALID_OPTION, 'unknown engine')
  pm.setOptions({ engine: 'userspace' }) // the same value is no change
  t.equal(pm.options.engine, 'userspace')
  await pm.close()
})

t.test('mergeNow({ onProgress }): called per batch, pages counted up to a full scan, at least two scans', async (t) => {
  const pm = new PageMerger()
  const pages = 3 * 65536 // three mergeNow() batches a scan
  const a = pm.alloc(pages * PAGE), b = pm.alloc(pages * PAGE)
  fillRandom(a, 11)
  b.set(a)
  const seen: Array<{ pagesScanned: number; pagesTotal: number; fullScans: number; pagesSharing: number }> = []
  const s = await pm.mergeNow({ onProgress: (p) => seen.push({ ...p }) })
  t.ok(seen.length >= 6, `called ${seen.length} times: after each batch of each full scan`)
  t.ok(seen.every((p) => p.pagesTotal === 2 * pages), 'pagesTotal is the tracked pages')
  t.ok(seen.every((p) => p.pagesScanned >= 0 && p.pagesScanned <= p.pagesTotal), 'pagesScanned stays within a full scan')
  t.ok(seen.some((p) => p.pagesScanned > 0 && p.pagesScanned < p.pagesTotal), 'and is seen part way through one')
  t.ok(seen.every((p, i) => i === 0 || p.fullScans >= seen[i - 1]!.fullScans), 'fullScans never goes back')
  t.equal(seen.at(-1)!.fullScans, s.fullScans, 'the last call saw every full scan')
  t.equal(seen.at(-1)!.pagesSharing, pages, 'and the pages saved')
  t.equal(s.unmergeBytes, pages * PAGE, 'unmergeAll() would need a copy of every page saved')
  throwsCoded(t, () => pm.mergeNow({ onProgress: 5 as unknown as () => void }), TypeError, ErrorCode.INVALID_ARG, 'onProgress not a function')
  throwsCoded(t, () => pm.mergeNow({ onProgres: () => {} } as object), TypeError, ErrorCode.UNKNOWN_OPTION, 'misspelt option')
  await t.rejects(pm.mergeNow({ onProgress: () => { throw Object.assign(new Error('from the callback'), { code: 'MINE' }) } }), { code: 'MINE' }, "a throwing callback rejects mergeNow() with its error")
  // Inside the callback the scan is half done: calls that change the PageMerger are refused, reads work.
  const inside: Record<string, unknown> = {}
  await pm.mergeNow({
    onProgress: () => {
      if (Object.keys(inside).length) return
      for (const [name, call] of Object.entries({
        alloc: () => pm.alloc(PAGE),
        register: () => pm.register(a),
        unregister: () => pm.unregister(b),
        setOptions: () => pm.setOptions({ pagesToScan: 5 }),
        mergeNow: () => pm.mergeNow(),
        unmergeAll: () => pm.unmergeAll(),
        start: () => pm.start(),
      }))
        try {
          call()
          inside[name] = 'accepted'
        } catch (err) {
          inside[name] = (err as { code?: string }).code
        }
      inside.stats = typeof pm.stats().pagesTracked
    },
  })
  t.same(inside, { alloc: ErrorCode.BUSY, register: ErrorCode.BUSY, unregister: ErrorCode.BUSY, setOptions: ErrorCode.BUSY, mergeNow: ErrorCode.BUSY, unmergeAll: ErrorCode.BUSY, start: ErrorCode.BUSY, stats: 'number' }, 're-entrant calls from onProgress: BUSY, stats() works')
  t.equal(pm.options.pagesToScan, 100, 'nothing changed')
  t.equal(pm.running, false)
  t.equal(digest(a), digest(b), 'bytes intact')
  await pm.close()
})

// ---- 11. counters agree with the OS ----------------------------------------------------------

t.test('Pss falls by (pagesSharing + zeroPages) pages, within 5%', async (t) => {
  const pm = new PageMerger()
  const warm = pm.alloc(1 * MiB)
  fillRandom(warm, 11)
  await pm.mergeNow() // starts the worker threads first: their memory is not the merge's doing
  pm.unregister(warm)
  // Large enough that the heap's ups and downs under tap (several MiB) stay well under 5%.
  const a = pm.alloc(256 * MiB), b = pm.alloc(256 * MiB), z = pm.alloc(32 * MiB)
  fillRandom(a, 12)
  b.set(a)
  z.fill(0) // written zeros: really allocated
  touch(a, b, z)
  const before = { process: await settledPss(), dup: pssOf(a, b) }
  const s = await pm.mergeNow()
  touch(a, b) // map every merged page again, as the application reading them would
  const after = { process: await settledPss(), dup: pssOf(a, b) }
  t.same({ ...counts(s), zeroPages: s.zeroPages }, { pagesShared: 65536, pagesSharing: 65536, zeroPages: 8192 })
  const mib = (n: number) => (n / MiB).toFixed(2)
  const sharing = s.pagesSharing * PAGE
  t.ok(Math.abs(before.dup - after.dup - sharing) <= sharing * 0.05, `the duplicated buffers' Pss fell by ${mib(before.dup - after.dup)} MiB; pagesSharing says ${mib(sharing)} MiB`)
  const want = (s.pagesSharing + s.zeroPages) * PAGE
  t.ok(Math.abs(before.process - after.process - want) <= want * 0.05, `process Pss fell by ${mib(before.process - after.process)} MiB; (pagesSharing + zeroPages) says ${mib(want)} MiB`)
  t.ok(a.equals(b), 'bytes intact')
  t.ok(z.every((x) => x === 0), 'zeros intact')
  await pm.close()
})

// ---- 12. the clones workload at 1 GiB --------------------------------------------------------

/** The clones workload: `blobs` blobs of seeded random bytes, each in two buffers. */
function clones(pm: PageMerger, blobs: number, blobBytes: number): Buffer[] {
  const bufs: Buffer[] = []
  for (let i = 0; i < blobs; i++) {
    const first = pm.alloc(blobBytes), second = pm.alloc(blobBytes)
    fillRandom(first, 1000 + i)
    second.set(first)
    bufs.push(first, second)
  }
  return bufs
}

t.test('clones, 1 GiB: half the pages freed, every byte intact', async (t) => {
  const BLOB = 32 * MiB, BLOBS = 16
  const pm = new PageMerger()
  const warm = pm.alloc(1 * MiB)
  fillRandom(warm, 15)
  await pm.mergeNow() // starts the worker threads, so that their memory is not counted against the merge
  pm.unregister(warm)
  const bufs = clones(pm, BLOBS, BLOB)
  const digests = bufs.map((b) => digest(b)) // reads every page, so all are mapped
  const before = { process: await settledPss(), buffers: pssOf(...bufs) }
  const started = Date.now()
  const s = await pm.mergeNow()
  const seconds = (Date.now() - started) / 1000
  const after = bufs.map((b) => digest(b)) // reads every page again: merged pages mapped, counted in Pss
  const pss = { process: await settledPss(), buffers: pssOf(...bufs) }
  const half = (BLOBS * BLOB) / PAGE // pages of one copy of each blob
  t.same(counts(s), { pagesShared: half, pagesSharing: half }, `merged in ${seconds.toFixed(2)} s`)
  const mib = (n: number) => (n / MiB).toFixed(1)
  t.ok(before.buffers - pss.buffers >= 0.99 * 512 * MiB, `the buffers' Pss fell by ${mib(before.buffers - pss.buffers)} MiB of 512`)
  // the whole process too, within the 5% (507 MiB measured: what its heaps grew is small now)
  t.ok(before.process - pss.process >= 0.95 * 512 * MiB, `the process's Pss fell by ${mib(before.process - pss.process)} MiB`)
  t.ok(s.metadataBytesPerPage <= 24, `metadata: ${s.metadataBytesPerPage.toFixed(2)} bytes per page (at most 24)`)
  t.strictSame(after, digests, 'every buffer reads back its bytes')
  bufs.length = 0
  t.ok(await gcUntil(() => pm.stats().pagesTracked === 0), 'memory released once dropped')
  await pm.close()
})

// ---- 13. registration keeps nothing alive ----------------------------------------------------

t.test('a registration does not keep a buffer alive', async (t) => {
  const pm = new PageMerger()
  let a: Buffer | undefined = pm.alloc(4 * MiB), b: Buffer | undefined = pm.alloc(4 * MiB)
  const arenaFd = arenaFdOf(a)
  fillRandom(a, 14)
  b.set(a)
  t.same(counts(await pm.mergeNow()), { pagesShared: 1024, pagesSharing: 1024 })
  t.equal(pm.stats().pagesTracked, 2048)
  t.equal(fstatSync(arenaFd).blocks * 512, 4 * MiB, 'the arena file holds one copy')
  a = b = undefined
  t.ok(await gcUntil(() => pm.stats().pagesTracked === 0), 'pagesTracked 0 after the GC')
  t.same(counts(pm.stats()), { pagesShared: 0, pagesSharing: 0 }, 'no stable pages left')
  // The memory itself must go back to the OS too, while the PageMerger goes on working.
  const blocks = () => fstatSync(arenaFd).blocks * 512
  t.ok(await gcUntil(() => blocks() === 0, 3000), `the arena file is empty while the PageMerger is open (holds ${blocks() / MiB} MiB)`)
  await pm.close()
  t.ok(await gcUntil(() => blocks() === 0), `and after close() (holds ${blocks() / MiB} MiB)`)
})

// ---- 14. CommonJS and ESM ----------------------------------------------------------------------

const childBody = `
  const pm = new PageMerger()
  const a = pm.alloc(4 * 4096), b = pm.alloc(4 * 4096)
  a.fill(3); b.fill(3)
  const s = await pm.mergeNow()
  await pm.close()
  console.log(JSON.stringify({ pagesSharing: s.pagesSharing, ok: a.every((x) => x === 3) && b.every((x) => x === 3) }))`

t.test('CommonJS and ESM callers get the same API', async (t) => {
  // Plain node processes, as users run them: tap puts its loader into every child's NODE_OPTIONS,
  // and Node 20 refuses --input-type beside an --import. Run from the package folder, so that
  // the package's own name resolves through its "exports" (ESM cannot import a bare directory).
  const run = (args: string[]) =>
    JSON.parse(
      execFileSync('env', ['-u', 'NODE_OPTIONS', process.execPath, ...args], { encoding: 'utf8', cwd: ROOT, timeout: 30_000 })
        .trim()
        .split('\n')
        .pop()!,
    )
  const cjs = run(['-e', `const { PageMerger } = require(${JSON.stringify(ROOT)});\n(async () => {${childBody}\n})()`])
  const cjsByName = run(['-e', `const { PageMerger } = require('pagemerge');\n(async () => {${childBody}\n})()`])
  const esm = run(['--input-type=module', '-e', `import { PageMerger } from 'pagemerge';\n${childBody}`])
  t.same(cjs, { pagesSharing: 7, ok: true }, 'require(path)')
  t.same(cjsByName, { pagesSharing: 7, ok: true }, "require('pagemerge')")
  t.same(esm, { pagesSharing: 7, ok: true }, "import from 'pagemerge'")
  const same = run([
    '--input-type=module',
    '-e',
    `import * as esm from 'pagemerge'; import { createRequire } from 'node:module'
     const cjs = createRequire(import.meta.url)('pagemerge')
     console.log(JSON.stringify({ names: Object.keys(esm).filter((k) => k !== 'default' && k !== '__esModule').sort(), cjs: Object.keys(cjs).sort(), one: esm.PageMerger === cjs.PageMerger }))`,
  ])
  t.same(same.names, same.cjs, 'the same exports')
  t.equal(same.one, true, 'one PageMerger class for both')
})

t.test('changing the number of workers while mergeNow() runs lets it finish', async (t) => {
  const pm = new PageMerger({ workers: 1 })
  const bufs: Buffer[] = []
  for (let i = 0; i < 4; i++) {
    const a = pm.alloc(8 * MiB), b = pm.alloc(8 * MiB)
    fillRandom(a, 40 + i)
    b.set(a)
    bufs.push(a, b)
  }
  const running = pm.mergeNow()
  pm.setOptions({ workers: 2 })
  const s = await running
  t.equal(s.pagesSharing, 4 * 2048, 'every duplicate merged')
  t.equal(pm.options.workers, 2)
  const c = pm.alloc(8 * MiB), d = pm.alloc(8 * MiB)
  fillRandom(c, 50)
  d.set(c)
  t.equal((await pm.mergeNow()).pagesSharing, 5 * 2048, 'and the new pool merges the next ones')
  t.ok(bufs.every((b, i) => b.equals(bufs[i ^ 1]!)), 'bytes intact')
  await pm.close()
})
