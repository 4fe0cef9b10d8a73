// Merges under concurrent writers: threads that write into registered buffers while the scanner
// merges them flat out lose no write (pages are write-protected from their comparison to their
// remap), and a read(2) into a page being merged waits rather than failing.
import t from 'tap'
import { once } from 'node:events'
import { readFileSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { Worker } from 'node:worker_threads'
import { PageMerger } from '../lib/index'
import { loadNative, Status } from '../lib/native'
import { fillRandom, MiB } from './fixtures/util'

const WRITER = resolve(__dirname, 'fixtures/stress-writer.js')
const SECONDS = Number(process.env.PAGEMERGE_STRESS_SECONDS ?? 20)
const native = loadNative()
const protection = new native.Arena().stats().writeProtection

/** The duration under which `share` of the writes finished, in ms, from a microsecond histogram. */
function percentile(hist: Float64Array, share: number): number {
  const total = hist.reduce((a, b) => a + b, 0)
  let seen = 0
  for (let us = 0; us < hist.length; us++) if ((seen += hist[us]!) >= share * total) return us / 1000
  return Infinity
}

/**
 * A race writer thread's script: until `stop` is set, it writes a byte at `at` of `buffer`, checks
 * for 2 ms that it stays (counting the rounds where it did not in `lost`) and puts the old byte
 * back, pausing 0 to 1.5 ms before each write so that writes land at different moments of the
 * merges. `eachRound` runs first in every round (`b` is the buffer, `workerData` what was given).
 * It says 'ready' before its first round, and posts { writes, lost } when stopped.
 */
function byteRacer(eachRound = ''): string {
  return `const { parentPort, workerData } = require('node:worker_threads')
    const { buffer, at, stop } = workerData
    const b = new Uint8Array(buffer), flag = new Int32Array(stop), pause = new Int32Array(new SharedArrayBuffer(4))
    const orig = b[at]
    let writes = 0, lost = 0
    parentPort.postMessage('ready')
    while (Atomics.load(flag, 0) === 0) {
      ${eachRound}
      Atomics.wait(pause, 0, 0, (writes % 4) / 2)
      const v = (orig + 1 + (writes % 250)) & 0xff
      b[at] = v
      const until = performance.now() + 2
      while (performance.now() < until) if (b[at] !== v) { lost++; break }
      b[at] = orig
      writes++
    }
    parentPort.postMessage({ writes, lost })`
}

/**
 * Starts a byteRacer (with `eachRound`) on `workerData`, runs `step` over and over for 3 s
 * (yielding to the event loop every 8 runs), stops the racer, and returns its counts and the runs.
 */
async function racing(workerData: object, eachRound: string, step: () => unknown): Promise<{ writes: number; lost: number; runs: number }> {
  const stop = new SharedArrayBuffer(4)
  const writer = new Worker(byteRacer(eachRound), { eval: true, workerData: { ...workerData, stop } })
  await once(writer, 'message') // 'ready'
  const result = once(writer, 'message') as Promise<[{ writes: number; lost: number }]>
  let runs = 0
  const end = Date.now() + 3000
  while (Date.now() < end) {
    await step()
    if (++runs % 8 === 0) await new Promise(setImmediate)
  }
  Atomics.store(new Int32Array(stop), 0, 1)
  const [{ writes, lost }] = await result
  return { writes, lost, runs }
}

t.test(`4 writer threads, 256 MiB of duplicates, ${SECONDS} s of merging flat out: every byte equals its shadow`, async (t) => {
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  // 64 buffers of 4 MiB: 8 contents, each in 8 buffers
  const originals = Array.from({ length: 8 }, (_, i) => fillRandom(new Uint8Array(new SharedArrayBuffer(4 * MiB)), 500 + i))
  const bufs = Array.from({ length: 64 }, (_, i) => pm.alloc(4 * MiB).fill(0))
  bufs.forEach((b, i) => b.set(originals[i % 8]!))
  const stop = new SharedArrayBuffer(4)
  const writers = Array.from(
    { length: 4 },
    (_, id) => new Worker(WRITER, { workerData: { buffers: bufs.map((b) => b.buffer), originals, id, writers: 4, stop } }),
  )
  const exits = writers.map((w) => once(w, 'exit'))
  await Promise.all(writers.map((w) => once(w, 'message'))) // 'ready': shadows taken, writing starts
  const results = writers.map((w) => once(w, 'message') as Promise<[{ writes: number; restores: number; wrong: number; hist: Float64Array }]>)
  const saved: number[] = [] // pages saved after each run: writes unmerge pages, restores let them merge again
  const end = Date.now() + SECONDS * 1000
  while (Date.now() < end) saved.push((await pm.mergeNow()).pagesSharing)
  Atomics.store(new Int32Array(stop), 0, 1)
  const out = (await Promise.all(results)).map(([r]) => r)
  await Promise.all(exits)
  const hist = new Float64Array(out[0]!.hist.length)
  for (const r of out) r.hist.forEach((n, i) => (hist[i]! += n))
  const writes = out.reduce((a, r) => a + r.writes, 0)
  t.comment(`write protection: ${protection}; ${saved.length} mergeNow() runs; pages saved after the first ${saved[0]}, lowest ${Math.min(...saved)}, last ${saved.at(-1)}; ${writes} writes (${out.reduce((a, r) => a + r.restores, 0)} restoring a page)`)
  t.comment(`writer stalls: p99 ${percentile(hist, 0.99).toFixed(3)} ms, p99.9 ${percentile(hist, 0.999).toFixed(3)} ms, max ${percentile(hist, 1).toFixed(3)} ms (goal p99 < 1 ms)`)
  t.ok(saved.length > 1 && Math.min(...saved) > 0, 'pages stayed merged while the writers wrote')
  t.ok(writes > 10_000, `${writes} writes`)
  t.equal(out.reduce((a, r) => a + r.wrong, 0), 0, 'every page equals its writer\'s shadow')
})

t.test('a write that races the merge of its page is never lost', async (t) => {
  // Two identical 2 MiB buffers merged over and over. Another thread rewrites pages 2.. of b with
  // the same bytes (private copies again, so the next scan merges them again as one extent), then
  // writes a byte of page 2 and checks for 2 ms that it stays, and puts it back. The merge of that
  // extent compares page 2 first and remaps last: a write landing on page 2 in between would be
  // undone by the remap without write protection.
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  const a = fillRandom(pm.alloc(2 * MiB), 90), b = pm.alloc(2 * MiB)
  b.set(a)
  // each round makes pages 2.. private again (the same bytes), so the next scan merges them again
  const { writes, lost, runs } = await racing(
    { buffer: b.buffer, original: new Uint8Array(a).buffer, at: 2 * 4096 + 100 },
    'b.set(new Uint8Array(workerData.original).subarray(2 * 4096), 2 * 4096)',
    () => pm.mergeNow(),
  )
  t.comment(`write protection: ${protection}; ${writes} writes during ${runs} mergeNow() runs; ${lost} undone`)
  t.ok(writes > 100 && runs > 100, 'writes and merges interleaved')
  t.equal(lost, 0, 'no write was undone by a merge')
  t.equal(Buffer.compare(a, b), 0, 'and the buffers end as they began')
})

t.test('a write that races the merge of a span, into a gap page or a merged page, is never lost', async (t) => {
  // Like the test above, with duplicates in 3-page runs (every 4th page of b differs from a's), so
  // that b's runs merge as one span (one mapping) whose gap pages get private copies. Another
  // thread makes b's pages private again (the same bytes), writes a byte of merged page 9 and
  // checks for 2 ms that it stays, meanwhile writing a counter into gap page 8 as fast as it can
  // and reading each value back. A write landing between a gap page's copy (or a merged page's
  // comparison) and the remap would be undone without write protection.
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  const a = fillRandom(pm.alloc(2 * MiB), 91), b = pm.alloc(2 * MiB)
  b.set(a)
  const other = fillRandom(new Uint8Array(2 * MiB), 92)
  for (let p = 0; p < 512; p += 4) b.set(other.subarray(p * 4096, (p + 1) * 4096), p * 4096)
  const original = new Uint8Array(b)
  const stop = new SharedArrayBuffer(4)
  const writer = new Worker(
    `const { parentPort, workerData: { buffer, original, stop } } = require('node:worker_threads')
    const b = new Uint8Array(buffer), o = new Uint8Array(original), flag = new Int32Array(stop), pause = new Int32Array(new SharedArrayBuffer(4))
    const gap = new Uint32Array(buffer, 8 * 4096, 1), merged = 9 * 4096 + 200
    let writes = 0, lostGap = 0, lostMerged = 0, counter = gap[0], first = counter
    while (Atomics.load(flag, 0) === 0) {
      b.set(o.subarray(4096), 4096)
      gap[0] = counter // which b.set() put back
      Atomics.wait(pause, 0, 0, (writes % 4) / 2) // 0 to 1.5 ms: land at different moments of the merges
      const w = (o[merged] + 1 + (writes % 250)) & 0xff
      b[merged] = w
      const until = performance.now() + 2
      let lm = 0
      while (performance.now() < until) {
        for (let k = 0; k < 64; k++) {
          if (gap[0] !== counter) lostGap++ // the last value written went back to an older one
          gap[0] = ++counter
        }
        if (b[merged] !== w) lm = 1
      }
      lostMerged += lm
      b[merged] = o[merged]
      writes++
    }
    parentPort.postMessage({ writes, gapWrites: counter - first, lostGap, lostMerged })`,
    { eval: true, workerData: { buffer: b.buffer, original: original.buffer, stop } },
  )
  const result = once(writer, 'message') as Promise<[{ writes: number; gapWrites: number; lostGap: number; lostMerged: number }]>
  let runs = 0, merged = 0
  const end = Date.now() + 3000
  while (Date.now() < end) (merged += (await pm.mergeNow()).pagesSharing, runs++)
  Atomics.store(new Int32Array(stop), 0, 1)
  const [{ writes, gapWrites, lostGap, lostMerged }] = await result
  t.comment(`write protection: ${protection}; ${runs} mergeNow() runs; undone: ${lostGap} of ${gapWrites} writes into the gap page, ${lostMerged} of ${writes} into the merged page`)
  t.ok(writes > 100 && runs > 100, 'writes and merges interleaved')
  t.ok(merged > 0, 'pages were merged')
  t.equal(lostGap, 0, 'no write into a gap page was undone by a merge')
  t.equal(lostMerged, 0, 'no write into a merged page was undone by a merge')
  b.set(original.subarray(8 * 4096, 8 * 4096 + 4), 8 * 4096) // the counter
  t.equal(Buffer.compare(original, b), 0, 'and the buffers end as they began')
  // b's runs map as one span: once all of them are private again and merge in one call, its
  // pages 1-511 are a single mapping
  b.set(original.subarray(4096), 4096)
  await pm.mergeNow()
  const lo = native.addressOf(b) + 4096n, hi = native.addressOf(b) + BigInt(2 * MiB)
  const inside = readFileSync('/proc/self/maps', 'utf8').split('\n').filter((l) => {
    const [s, e] = l.split(' ')[0]!.split('-').map((x) => BigInt('0x' + (x || '0')))
    return s! < hi && e! > lo
  })
  t.equal(inside.length, 1, `b's pages 1-511 are one mapping: ${inside.join(' | ')}`)
})

t.test('a write that races a merge of many extents in one call, the earlier ones reclaimed meanwhile, is never lost', async (t) => {
  // The arena's own calls: b (16 MiB) is merged onto a's pool pages as 8 extents of 512 pages (as
  // the coordinator sends them) in one call, then made private again (unmerge), over and over.
  // Another thread writes a byte of a page in b's last extent and checks for 2 ms that it stays,
  // then puts it back. The earlier extents are remapped (and their pages punched on the helper
  // thread) before the last one is compared; a write landing between its comparison and its
  // remap would be undone without write protection.
  const arena = new native.Arena()
  const size = 16 * MiB, pages = size / 4096, per = 512, n = pages / per
  const a = fillRandom(new Uint8Array(arena.alloc(size, true)), 93), b = new Uint8Array(arena.alloc(size, true))
  b.set(a)
  const st = new Uint32Array(n * 4), pool = new Uint32Array(n)
  for (let k = 0; k < n; k++) st.set([arena.idOf(a), k * per, per, 1], 4 * k)
  arena.stabilize(st, new Int32Array(n), 1e9, pool)
  const mg = new Uint32Array(n * 4)
  for (let k = 0; k < n; k++) mg.set([arena.idOf(b), k * per, pool[k]!, per], 4 * k)
  const id = arena.idOf(b), status = new Int32Array(n), other = new Int32Array(1)
  let whole = 0, partial = 0
  const { writes, lost, runs } = await racing({ buffer: b.buffer, at: (pages - 100) * 4096 + 100 }, '', () => {
    const merged = arena.merge(mg, status, 1e9)
    for (let k = 0; k < n - 1; k++) if (status[k] !== Status.OK) throw new Error(`merge: extent ${k} status ${status[k]}`)
    if (status[n - 1] === Status.OK && merged === pages) whole++
    else if (status[n - 1] === Status.MISMATCH && merged === pages - per) partial++
    else throw new Error(`merge: last extent status ${status[n - 1]}, ${merged} pages`)
    arena.unmerge(new Uint32Array([id, 0, pages]), other, 1e9)
  })
  t.comment(`write protection: ${protection}; ${writes} writes during ${runs} merges (${whole} whole, ${partial} with the written extent left alone); ${lost} undone`)
  t.ok(writes > 50 && runs > 20, 'writes and merges interleaved')
  t.ok(whole > 0 && partial > 0, 'merges found the page both as before and as written')
  t.equal(lost, 0, 'no write was undone by a merge')
  t.equal(Buffer.compare(a, b), 0, 'and the buffers end as they began')
  t.equal(arena.stats().punchFailures, 0)
})

t.test('a write that races a zero drop of private memory in many extents in one call, the drops overlapping the next checks, is never lost', async (t) => {
  // The arena's own calls: a private 16 MiB buffer of written zero pages is dropped as 8 extents
  // of 512 pages (as the coordinator sends them) in one call, over and over, its pages written
  // again in between. The helper thread drops each checked extent while the next one is checked;
  // the extent stays write-protected until then. Another thread writes a byte of a page in the
  // third extent and checks for 2 ms that it stays, then puts the zero back: a write landing
  // between its extent's check and its drop would be wiped without write protection.
  const arena = new native.Arena()
  const size = 16 * MiB, pages = size / 4096, per = 512, n = pages / per
  const z = new Uint8Array(arena.alloc(size, false))
  const racePage = 2 * per + 300
  const list = new Uint32Array(n * 3)
  for (let k = 0; k < n; k++) list.set([arena.idOf(z), k * per, per], 3 * k)
  const status = new Int32Array(n)
  let whole = 0, partial = 0
  const { writes, lost, runs } = await racing({ buffer: z.buffer, at: racePage * 4096 + 100 }, '', () => {
    for (let p = 0; p < pages; p++) if (p !== racePage) z[p * 4096] = 0 // allocates the page again
    const dropped = arena.dropZero(list, status, 1e9)
    for (let k = 0; k < n; k++) if (k !== 2 && status[k] !== Status.OK) throw new Error(`dropZero: extent ${k} status ${status[k]}`)
    if (status[2] === Status.OK && dropped === pages) whole++
    else if (status[2] === Status.MISMATCH && dropped === pages - per) partial++
    else throw new Error(`dropZero: the raced extent's status ${status[2]}, ${dropped} pages`)
  })
  t.comment(`write protection: ${protection}; ${writes} writes during ${runs} drops (${whole} whole, ${partial} with the written extent left alone); ${lost} undone`)
  t.ok(writes > 50 && runs > 20, 'writes and drops interleaved')
  t.ok(whole > 0 && partial > 0, 'drops found the page both zero and written')
  t.equal(lost, 0, 'no write was undone by a drop')
  t.ok(z.every((x) => x === 0), 'and the buffer ends as it began')
})

t.test('read(2) into a buffer while its pages are merged: the system call waits, never fails or is lost', { skip: protection !== 'full' && `write protection is '${protection}' here: a system call into a page being merged would fail with EFAULT` }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'pagemerge-read-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const file = join(dir, 'data')
  const data = fillRandom(new Uint8Array(64 * 1024), 77)
  writeFileSync(file, data)
  const pm = new PageMerger({ workers: 1 })
  t.teardown(() => pm.close())
  const bufs = Array.from({ length: 32 }, () => pm.alloc(2 * MiB).fill(3))
  // Another thread reads the file into the buffers again and again (the same bytes every time, and
  // the pages around them stay duplicates), while this one merges them.
  const stop = new SharedArrayBuffer(4)
  const reader = new Worker(
    `const { parentPort, workerData: { buffers, file, length, stop } } = require('node:worker_threads')
    const { openSync, readSync, readFileSync } = require('node:fs')
    const fd = openSync(file, 'r'), data = readFileSync(file), flag = new Int32Array(stop)
    let reads = 0, failures = 0, wrong = 0
    while (Atomics.load(flag, 0) === 0) {
      const b = Buffer.from(buffers[reads % buffers.length]), at = (reads * 4096 * 7) % (b.length - length)
      try {
        readSync(fd, b, at, length, 0)
        if (Buffer.compare(b.subarray(at, at + length), data) !== 0) wrong++
        b.fill(3, at, at + length) // duplicates again, for the next merge
      } catch (err) {
        failures++
      }
      reads++
    }
    parentPort.postMessage({ reads, failures, wrong })`,
    { eval: true, workerData: { buffers: bufs.map((b) => b.buffer), file, length: data.length, stop } },
  )
  const result = once(reader, 'message') as Promise<[{ reads: number; failures: number; wrong: number }]>
  let runs = 0
  const end = Date.now() + 3000
  while (Date.now() < end) (await pm.mergeNow(), runs++)
  Atomics.store(new Int32Array(stop), 0, 1)
  const [{ reads, failures, wrong }] = await result
  t.ok(reads > 0, `${reads} reads`)
  t.equal(failures, 0, 'no read failed')
  t.equal(wrong, 0, 'every read left its bytes')
  t.comment(`${reads} reads of ${data.length} bytes while ${runs} mergeNow() runs merged the buffers`)
})
