// The kernel KSM bridge: reading /sys/kernel/mm/ksm and /proc, tuning ksmd and putting it back
// (also when a process ends without asking), and prctl(PR_SET_MEMORY_MERGE).
import t, { type Test } from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { ErrorCode } from '../lib/errors'
import { KernelKsm, kernelKsmAvailable, KSM_SYSFS, parseKsmStat, type KsmKnobs } from '../lib/kernel'
import { loadNative } from '../lib/native'
import { isRoot } from './fixtures/util'

const hasKsm = existsSync(KSM_SYSFS)
const noKsm = hasKsm ? false : `needs ${KSM_SYSFS} (CONFIG_KSM)`
const needsRootKsm = noKsm || (isRoot ? false : 'needs root: writes /sys/kernel/mm/ksm')
const TS_NODE = require.resolve('@isaacs/ts-node-temp-fork-for-pr-2009/register/transpile-only')
const CHILD = resolve(__dirname, 'fixtures/ksm-tune-child.ts')

const readKnob = (file: string, dir = KSM_SYSFS) => readFileSync(join(dir, file), 'utf8').trim()

/** Asserts that `fn` throws exactly `Class` with `code`. */
function throwsCode(t: Test, fn: () => unknown, Class: ErrorConstructor, code: string, what: string): void {
  try {
    fn()
  } catch (err) {
    t.equal((err as Error).constructor, Class, `${what}: ${Class.name}`)
    t.equal((err as { code?: unknown }).code, code, `${what}: code ${code}`)
    return
  }
  t.fail(`${what}: did not throw`)
}

/** A sysfs-like directory of plain files (a kernel of our choosing), removed after the test. */
function fakeSysfs(t: Test, files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), 'pagemerge-ksm-sysfs-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text + '\n')
  return dir
}

/** Files as a 6.x kernel without NUMA and without the advisor and smart scanning has them. */
const OLDER_KERNEL = {
  run: '0',
  pages_to_scan: '100',
  sleep_millisecs: '20',
  max_page_sharing: '256',
  stable_node_chains_prune_millisecs: '2000',
  use_zero_pages: '0',
  pages_shared: '12',
  pages_sharing: '345',
  pages_unshared: '6',
  pages_volatile: '7',
  full_scans: '8',
  stable_node_chains: '0',
  stable_node_dups: '0',
  general_profit: '-4096',
  a_future_file: 'some text  with spaces',
}

/** Runs the child fixture: it tunes, prints the knobs it sees, and ends `how`. */
function runChild(sysfs: string, knobs: KsmKnobs, how: 'return' | 'exit' | 'throw' | 'reject') {
  // Required from -e, not run as a file: under tap, a .ts main module would go to the ESM loader.
  const child = spawnSync(process.execPath, ['-r', TS_NODE, '-e', `require(${JSON.stringify(CHILD)})`, sysfs, JSON.stringify(knobs), how], {
    env: { ...process.env, NODE_OPTIONS: '' },
    encoding: 'utf8',
    timeout: 60_000,
  })
  const line = child.stdout.split('\n')[0] ?? ''
  return { status: child.status, stderr: child.stderr, seen: (line ? JSON.parse(line) : {}) as KsmKnobs }
}

t.test('status() of this kernel agrees with the files themselves', { skip: noKsm }, async (t) => {
  const s = new KernelKsm().status()
  t.equal(s.available, true)
  t.equal(s.reason, undefined)
  t.same(Object.keys(s.raw).sort(), readdirSync(KSM_SYSFS).sort(), 'raw has every file of the directory')
  t.equal(s.knobs.pagesToScan, Number(readKnob('pages_to_scan')))
  t.equal(s.knobs.sleepMillisecs, Number(readKnob('sleep_millisecs')))
  t.equal(s.knobs.run, Number(readKnob('run')))
  t.equal(s.knobs.maxPageSharing, Number(readKnob('max_page_sharing')))
  if (existsSync(join(KSM_SYSFS, 'advisor_mode'))) {
    t.equal(s.knobs.advisorMode, /\[([^\]]+)\]/.exec(readKnob('advisor_mode'))![1], 'advisor_mode: the bracketed one')
  }
  const present = new Set(readdirSync(KSM_SYSFS))
  for (const [key, file] of [['pagesShared', 'pages_shared'], ['fullScans', 'full_scans'], ['generalProfit', 'general_profit'], ['pagesSkipped', 'pages_skipped'], ['ksmZeroPages', 'ksm_zero_pages']] as const) {
    if (present.has(file)) t.type(s.stats[key], 'number', `stats.${key} read from ${file}`)
    else t.notOk(key in s.stats, `stats.${key} absent like ${file}`)
  }
  for (const key of ['smartScan', 'mergeAcrossNodes', 'advisorMaxCpu'] as const) {
    const file = key.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase())
    t.equal(key in s.knobs, present.has(file), `knobs.${key} present exactly when ${file} is`)
  }

  if (existsSync('/proc/self/ksm_stat')) {
    t.type(s.process.ksmStat?.ksmRmapItems, 'number', 'ksm_stat counters are numbers')
    t.type(s.process.ksmStat?.ksmMergeAny, 'boolean', 'ksm_stat yes/no flags are booleans')
  }
  if (existsSync('/proc/self/ksm_merging_pages')) {
    t.equal(s.process.mergingPages, Number(readFileSync('/proc/self/ksm_merging_pages', 'utf8')))
  }

  t.ok(s.ksmd, 'ksmd found')
  t.equal(readFileSync(`/proc/${s.ksmd!.pid}/comm`, 'utf8').trim(), 'ksmd', 'its pid is the ksmd thread')
  t.ok(Number.isInteger(s.ksmd!.cpuNs) && s.ksmd!.cpuNs >= 0, 'cpuNs is a count of nanoseconds')
  const schedstat = Number(readFileSync(`/proc/${s.ksmd!.pid}/schedstat`, 'utf8').split(' ')[0])
  t.ok(schedstat >= s.ksmd!.cpuNs, 'cpuNs is schedstat\'s first field (which only grows)')
})

t.test('status() of an older kernel: absent files stay absent, unknown ones land in raw', async (t) => {
  const sysfs = fakeSysfs(t, OLDER_KERNEL)
  const procSelf = fakeSysfs(t, {
    ksm_stat: 'ksm_rmap_items 1536\nksm_zero_pages 3\nksm_merging_pages 1200\nksm_process_profit -12\nksm_merge_any: yes\nksm_mergeable: no\nksm_future_thing: maybe',
    ksm_merging_pages: '1200',
  })
  const s = new KernelKsm({ sysfs, procSelf, proc: sysfs }).status()
  t.equal(s.available, true)
  t.same(s.knobs, {
    run: 0,
    pagesToScan: 100,
    sleepMillisecs: 20,
    maxPageSharing: 256,
    stableNodeChainsPruneMillisecs: 2000,
    useZeroPages: 0,
  }, 'only the knobs whose files exist')
  for (const key of ['smartScan', 'advisorMode', 'mergeAcrossNodes', 'advisorMaxCpu']) t.notOk(key in s.knobs, `${key} absent`)
  t.same(s.stats, {
    pagesShared: 12,
    pagesSharing: 345,
    pagesUnshared: 6,
    pagesVolatile: 7,
    fullScans: 8,
    stableNodeChains: 0,
    stableNodeDups: 0,
    generalProfit: -4096,
  }, 'counters, a negative profit included; no pagesScanned, pagesSkipped, ksmZeroPages')
  t.equal(s.raw.a_future_file, 'some text  with spaces', 'a file this version does not know, trimmed')
  t.equal(s.raw.run, '0')
  t.same(s.process, {
    ksmStat: {
      ksmRmapItems: 1536,
      ksmZeroPages: 3,
      ksmMergingPages: 1200,
      ksmProcessProfit: -12,
      ksmMergeAny: true,
      ksmMergeable: false,
      ksmFutureThing: 'maybe',
    },
    mergingPages: 1200,
  }, 'ksm_stat: both line shapes')
  t.equal(s.ksmd, undefined, 'no ksmd in a directory without one')

  const bare = new KernelKsm({ sysfs, procSelf: sysfs }).status()
  t.equal(bare.process.ksmStat, undefined, 'no ksm_stat file: undefined')
  t.equal(bare.process.mergingPages, undefined, 'no ksm_merging_pages file: undefined')
})

t.test('counters() and processCounters(): the cheap reads for polling', async (t) => {
  const sysfs = fakeSysfs(t, OLDER_KERNEL)
  const procSelf = fakeSysfs(t, { ksm_stat: 'ksm_rmap_items 10\nksm_zero_pages 2\nksm_merging_pages 7\nksm_process_profit 100\nksm_merge_any: no\nksm_mergeable: yes' })
  const k = new KernelKsm({ sysfs, procSelf })
  t.same(k.counters(), { run: 0, fullScans: 8, pagesScanned: 0 }, 'pages_scanned absent (before 6.7): 0')
  t.same(k.processCounters(), { mergingPages: 7, zeroPages: 2, rmapItems: 10, profit: 100, mergeAny: false, mergeable: true })
  const only = fakeSysfs(t, { ksm_merging_pages: '5' })
  t.same(new KernelKsm({ sysfs, procSelf: only }).processCounters(), { mergingPages: 5 }, 'ksm_merging_pages alone (5.19 to 6.0)')
  const missing = join(tmpdir(), 'pagemerge-no-such-ksm-dir')
  t.same(new KernelKsm({ sysfs: missing, procSelf: missing }).counters(), { fullScans: 0, pagesScanned: 0 }, 'no KSM: no run')
  t.same(new KernelKsm({ procSelf: missing }).processCounters(), {})
  if (hasKsm) {
    const real = new KernelKsm().counters()
    t.equal(real.run, Number(readKnob('run')), 'this kernel: run')
    t.ok(real.fullScans <= Number(readKnob('full_scans')), 'this kernel: full_scans (which only grows)')
  }
  if (existsSync('/proc/self/ksm_stat')) t.type(new KernelKsm().processCounters().mergeAny, 'boolean', 'this process')
})

t.test('parseKsmStat', async (t) => {
  t.same(parseKsmStat(''), {})
  t.same(parseKsmStat('ksm_rmap_items 0\nksm_merge_any: no\n\n'), { ksmRmapItems: 0, ksmMergeAny: false })
  t.same(parseKsmStat('ksm_mergeable: yes'), { ksmMergeable: true })
})

t.test('a kernel without KSM', async (t) => {
  const missing = join(tmpdir(), 'pagemerge-no-such-ksm-dir')
  const s = new KernelKsm({ sysfs: missing, procSelf: missing, proc: missing }).status()
  t.equal(s.available, false)
  t.type(s.reason, 'string')
  t.same([s.knobs, s.stats, s.raw, s.process], [{}, {}, {}, {}])
  throwsCode(t, () => new KernelKsm({ sysfs: missing }).tune({ sleepMillisecs: 5 }), Error, ErrorCode.UNSUPPORTED, 'tune')
  const a = kernelKsmAvailable({ sysfs: missing })
  t.equal(a.ok, false)
  t.equal(a.canTune, false)
  t.type(a.reason, 'string')
})

t.test('kernelKsmAvailable() here', { skip: noKsm }, async (t) => {
  const a = kernelKsmAvailable()
  t.equal(a.ok, true)
  t.equal(a.canTune, isRoot)
  const run = readKnob('run')
  if (run === '1' && isRoot) t.equal(a.reason, undefined, 'nothing in the way')
  else t.match(a.reason, run === '1' ? /root/ : new RegExp(`run=${run}`), 'says what is in the way')
})

t.test('tune() rejects bad knobs with a code and writes nothing', async (t) => {
  const sysfs = fakeSysfs(t, { ...OLDER_KERNEL, advisor_mode: '[none] scan-time', smart_scan: '1', advisor_max_cpu: '70', advisor_target_scan_time: '200', merge_across_nodes: '1' })
  const before = () => Object.fromEntries(readdirSync(sysfs).map((f) => [f, readKnob(f, sysfs)]))
  const original = before()
  const k = new KernelKsm({ sysfs })
  const bad: Array<[string, unknown, ErrorConstructor, string]> = [
    ['not an object', 5, TypeError, ErrorCode.INVALID_ARG],
    ['null', null, TypeError, ErrorCode.INVALID_ARG],
    ['an array', [], TypeError, ErrorCode.INVALID_ARG],
    ['a misspelt knob', { sleepMillisecs: 1, pagesToScann: 5 }, TypeError, ErrorCode.UNKNOWN_OPTION],
    ['a sysfs file name', { sleep_millisecs: 5 }, TypeError, ErrorCode.UNKNOWN_OPTION],
    ['run 3', { sleepMillisecs: 1, run: 3 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['run as a string', { run: '1' }, TypeError, ErrorCode.INVALID_ARG],
    ['negative pagesToScan', { sleepMillisecs: 1, pagesToScan: -1 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['pagesToScan past unsigned int', { pagesToScan: 2 ** 32 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['fractional sleepMillisecs', { pagesToScan: 5, sleepMillisecs: 1.5 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['NaN sleepMillisecs', { sleepMillisecs: NaN }, TypeError, ErrorCode.INVALID_ARG],
    ['Infinity sleepMillisecs', { sleepMillisecs: Infinity }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['maxPageSharing 1', { maxPageSharing: 1 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['maxPageSharing past int', { maxPageSharing: 2 ** 31 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['useZeroPages true', { useZeroPages: true }, TypeError, ErrorCode.INVALID_ARG],
    ['smartScan 2', { smartScan: 2 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['mergeAcrossNodes 2', { mergeAcrossNodes: 2 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['an unknown advisor', { advisorMode: 'fast' }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['advisorTargetScanTime 0', { advisorTargetScanTime: 0 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['advisorMaxCpu past unsigned int', { advisorMaxCpu: 2 ** 32 }, RangeError, ErrorCode.OUT_OF_RANGE],
    ['a knob this kernel lacks', { sleepMillisecs: 1, advisorMinPagesToScan: 10 }, Error, ErrorCode.UNSUPPORTED],
    ['pagesToScan while the advisor runs', { pagesToScan: 10, advisorMode: 'scan-time' }, Error, ErrorCode.BUSY],
  ]
  for (const [what, knobs, Class, code] of bad) throwsCode(t, () => k.tune(knobs as KsmKnobs), Class, code, what)
  t.same(before(), original, 'no file changed')
  t.same(k.saved(), {}, 'nothing saved')

  try {
    k.tune({ pagesToScann: 5 } as KsmKnobs)
  } catch (err) {
    t.match((err as Error).message, /"pagesToScan"/, 'the hint names the knob meant')
  }
  t.doesNotThrow(() => k.tune({}), 'no knobs: nothing to do')
  t.doesNotThrow(() => k.tune({ sleepMillisecs: undefined }), 'undefined means leave alone')
  t.same(before(), original, 'still no file changed')
})

t.test('tune() and restore() on plain files: saved once, written back once', async (t) => {
  const sysfs = fakeSysfs(t, { ...OLDER_KERNEL, advisor_mode: '[none] scan-time' })
  const k = new KernelKsm({ sysfs })
  t.teardown(() => k.restore())
  k.tune({ sleepMillisecs: 0, pagesToScan: 5000 })
  t.equal(readKnob('sleep_millisecs', sysfs), '0')
  t.equal(readKnob('pages_to_scan', sysfs), '5000')
  k.tune({ sleepMillisecs: 7, run: 1 })
  t.same(k.saved(), { sleepMillisecs: 20, pagesToScan: 100, run: 0 }, 'the values from before the first change')
  t.equal(process.listeners('exit').length > 0, true, 'an exit listener while knobs are saved')
  const exitListeners = process.listeners('exit').length

  k.tune({ advisorMode: 'scan-time' })
  t.equal(readKnob('advisor_mode', sysfs), 'scan-time')
  t.same(k.saved().advisorMode, 'none', 'advisor_mode saved in its written form')
  t.equal(process.listeners('exit').length, exitListeners, 'one exit listener, however many tunes')

  writeFileSync(join(sysfs, 'advisor_mode'), '[scan-time] none\n') // what the kernel would print now
  k.restore()
  t.same(
    [readKnob('sleep_millisecs', sysfs), readKnob('run', sysfs), readKnob('advisor_mode', sysfs)],
    ['20', '0', 'none'],
    'every knob back',
  )
  t.same(k.saved(), {}, 'nothing saved any more')
  t.equal(process.listeners('exit').length, exitListeners - 1, 'the exit listener is gone')
  writeFileSync(join(sysfs, 'sleep_millisecs'), '33\n')
  k.restore()
  t.equal(readKnob('sleep_millisecs', sysfs), '33', 'a second restore() writes nothing')

  k.tune({ run: 2, maxPageSharing: 512 })
  t.same(k.saved(), { run: 0, maxPageSharing: 256 }, 'run=2 goes first, and is saved first')
  k.restore()
  t.equal(readKnob('max_page_sharing', sysfs), '256')
})

t.test('a knob the kernel refuses: its error code, and this call\'s writes undone', { skip: noKsm || !existsSync(join(KSM_SYSFS, 'pages_shared')) }, async (t) => {
  const sysfs = fakeSysfs(t, OLDER_KERNEL)
  // A read-only sysfs file in place of a knob: the kernel refuses writes to it, even from root.
  rmSync(join(sysfs, 'use_zero_pages'))
  symlinkSync(join(KSM_SYSFS, 'pages_shared'), join(sysfs, 'use_zero_pages'))
  const k = new KernelKsm({ sysfs })
  t.teardown(() => k.restore())
  k.tune({ stableNodeChainsPruneMillisecs: 1000 })
  let caught: (Error & { code?: string; syscall?: string }) | undefined
  try {
    k.tune({ sleepMillisecs: 1, pagesToScan: 2, useZeroPages: 1 })
  } catch (err) {
    caught = err as typeof caught
  }
  t.equal(caught?.code, 'EACCES', 'the errno name is the code')
  t.type(caught?.syscall, 'string', 'and the syscall is named')
  t.equal(readKnob('sleep_millisecs', sysfs), '20', 'sleep_millisecs written back')
  t.equal(readKnob('pages_to_scan', sysfs), '100', 'pages_to_scan written back')
  t.same(k.saved(), { stableNodeChainsPruneMillisecs: 2000 }, 'what earlier calls saved is kept, nothing else')
})

t.test('tune() on this kernel, then restore(): the exact previous values', { skip: needsRootKsm }, async (t) => {
  const original = { pages_to_scan: readKnob('pages_to_scan'), sleep_millisecs: readKnob('sleep_millisecs') }
  const k = new KernelKsm()
  t.teardown(() => {
    k.restore()
    // Even if restore() itself were broken, leave the machine as it was.
    for (const [file, value] of Object.entries(original)) if (readKnob(file) !== value) writeFileSync(join(KSM_SYSFS, file), value)
  })
  if (new KernelKsm().status().knobs.advisorMode === 'scan-time') return t.skip('the advisor sets pages_to_scan here')
  // One step away from what is there: other processes on this machine may be using ksmd.
  const pages = Number(original.pages_to_scan) + 1, sleep = Number(original.sleep_millisecs) + 1
  k.tune({ pagesToScan: pages, sleepMillisecs: sleep })
  t.equal(readKnob('pages_to_scan'), String(pages))
  t.equal(readKnob('sleep_millisecs'), String(sleep))
  t.same(new KernelKsm().status().knobs.pagesToScan, pages, 'status() sees it')
  k.restore()
  t.equal(readKnob('pages_to_scan'), original.pages_to_scan)
  t.equal(readKnob('sleep_millisecs'), original.sleep_millisecs)
})

t.test('a process that tunes and ends without restore() gives the knobs back', async (t) => {
  const cases = [['return', 0], ['exit', 3], ['throw', 1], ['reject', 1]] as const
  t.test('plain files', async (t) => {
    const sysfs = fakeSysfs(t, OLDER_KERNEL)
    for (const [how, code] of cases) {
      const child = runChild(sysfs, { sleepMillisecs: 3, run: 1 }, how)
      t.equal(child.status, code, `${how}: exit code ${code}`)
      t.same([child.seen.sleepMillisecs, child.seen.run], [3, 1], `${how}: the child saw its values`)
      t.same([readKnob('sleep_millisecs', sysfs), readKnob('run', sysfs)], ['20', '0'], `${how}: back after it ended`)
    }
  })
  t.test('this kernel', { skip: needsRootKsm }, async (t) => {
    const original = readKnob('sleep_millisecs')
    t.teardown(() => {
      if (readKnob('sleep_millisecs') !== original) writeFileSync(join(KSM_SYSFS, 'sleep_millisecs'), original)
    })
    const sleep = Number(original) + 1
    for (const [how, code] of cases) {
      const child = runChild('-', { sleepMillisecs: sleep }, how)
      t.equal(child.status, code, `${how}: exit code ${code}`)
      t.equal(child.seen.sleepMillisecs, sleep, `${how}: the child saw its value`)
      t.equal(readKnob('sleep_millisecs'), original, `${how}: back after it ended`)
    }
  })
})

t.test('a process that is not root cannot tune, and changes nothing', { skip: needsRootKsm }, async (t) => {
  const original = readKnob('sleep_millisecs')
  t.teardown(() => {
    if (readKnob('sleep_millisecs') !== original) writeFileSync(join(KSM_SYSFS, 'sleep_millisecs'), original)
  })
  const script = `const { KernelKsm, kernelKsmAvailable } = require(${JSON.stringify(resolve(__dirname, '../lib/kernel'))})
    let code
    try { new KernelKsm().tune({ sleepMillisecs: ${Number(original) + 1} }) } catch (e) { code = e.code }
    console.log(JSON.stringify({ code, available: kernelKsmAvailable() }))`
  const child = spawnSync(process.execPath, ['-r', TS_NODE, '-e', script], {
    env: { ...process.env, NODE_OPTIONS: '' },
    encoding: 'utf8',
    uid: 65534,
    gid: 65534,
    cwd: tmpdir(),
  })
  if (child.status !== 0) return t.skip(`cannot run node as nobody here: ${child.stderr.split('\n').slice(0, 3).join(' ')}`)
  const out = JSON.parse(child.stdout) as { code: string; available: ReturnType<typeof kernelKsmAvailable> }
  t.equal(out.code, 'EACCES', 'tune: EACCES')
  t.equal(out.available.canTune, false, 'kernelKsmAvailable().canTune is false')
  t.match(out.available.reason, /root/, 'and says why')
  t.equal(readKnob('sleep_millisecs'), original, 'nothing changed')
})

t.test('the kernel\'s EBUSY (max_page_sharing while pages are shared) reaches the caller', { skip: needsRootKsm }, async (t) => {
  if (typeof (loadNative() as { setMemoryMerge?: unknown }).setMemoryMerge !== 'function') return t.skip('the built addon has no setMemoryMerge yet')
  if (readKnob('run') !== '0') return t.skip('ksmd is running for someone else here (run is not 0): not disturbing it')
  if (readKnob('pages_shared') !== '0') return t.skip('pages are already shared by someone else: not disturbing them')
  const k = new KernelKsm()
  if (k.status().knobs.advisorMode === 'scan-time') return t.skip('the advisor sets pages_to_scan here')
  const maxPageSharing = readKnob('max_page_sharing')
  // A child with merge-any on and 1 MiB of one repeated page: something for ksmd to merge.
  const script = `const { KernelKsm } = require(${JSON.stringify(resolve(__dirname, '../lib/kernel'))})
    new KernelKsm().mergeAny(true)
    globalThis.keep = new Uint8Array(256 * 4096).fill(7)
    console.log('ready')
    setInterval(() => {}, 1000)`
  const child = spawn(process.execPath, ['-r', TS_NODE, '-e', script], { env: { ...process.env, NODE_OPTIONS: '' }, stdio: ['ignore', 'pipe', 'inherit'] })
  const sharedNow = () => Number(readKnob('pages_shared'))
  const until = async (done: () => boolean, ms: number) => {
    for (const end = Date.now() + ms; !done() && Date.now() < end; ) await new Promise((r) => setTimeout(r, 50))
    return done()
  }
  t.teardown(async () => {
    if (child.exitCode === null) {
      child.kill('SIGKILL')
      await once(child, 'exit')
    }
    // ksmd, still running, drops the dead child's stable pages; then ksmd goes back to how it was.
    await until(() => sharedNow() === 0, 10_000)
    k.restore()
    if (readKnob('max_page_sharing') !== maxPageSharing) writeFileSync(join(KSM_SYSFS, 'max_page_sharing'), maxPageSharing)
  })
  const [first] = (await once(child.stdout!, 'data')) as [Buffer]
  t.equal(first.toString().trim(), 'ready', 'the child has its mergeable pages')
  k.tune({ run: 1, pagesToScan: 2000, sleepMillisecs: 0 })
  if (!(await until(() => sharedNow() > 0, 30_000))) return t.fail('ksmd merged nothing in 30 s')
  let code: string | undefined
  try {
    k.tune({ sleepMillisecs: 1, maxPageSharing: Number(maxPageSharing) + 1 })
  } catch (err) {
    code = (err as { code?: string }).code
  }
  t.equal(code, 'EBUSY', 'tune({ maxPageSharing }) while pages are shared: EBUSY')
  t.equal(readKnob('max_page_sharing'), maxPageSharing, 'max_page_sharing unchanged')
  t.equal(readKnob('sleep_millisecs'), '0', 'the sleep_millisecs written before it was put back')
})

t.test('mergeAny: prctl(PR_SET_MEMORY_MERGE) on and off', { skip: noKsm }, async (t) => {
  const native = loadNative() as { setMemoryMerge?: unknown }
  if (typeof native.setMemoryMerge !== 'function') return t.skip('the built addon has no setMemoryMerge yet (rebuild it)')
  const k = new KernelKsm()
  const wasOn = k.mergeAnyEnabled()
  t.teardown(() => {
    try {
      k.mergeAny(wasOn)
    } catch {
      // nothing was turned on if turning it on failed
    }
  })
  try {
    k.mergeAny(true)
  } catch (err) {
    const code = (err as { code?: string }).code
    if (code === 'EINVAL') return t.skip('this kernel has no PR_SET_MEMORY_MERGE (Linux 6.4+)')
    if (code === 'EPERM') return t.skip('needs root (CAP_SYS_RESOURCE): prctl(PR_SET_MEMORY_MERGE)')
    throw err
  }
  t.equal(k.mergeAnyEnabled(), true, 'on')
  const stat = k.status().process.ksmStat
  if (stat && 'ksmMergeAny' in stat) t.equal(stat.ksmMergeAny, true, '/proc/self/ksm_stat agrees')

  const child = spawnSync('cat', ['/proc/self/ksm_stat'], { encoding: 'utf8' })
  if (child.status === 0) t.match(child.stdout, /ksm_merge_any: yes/, 'a child (fork + exec) inherits it')

  k.mergeAny(false)
  t.equal(k.mergeAnyEnabled(), false, 'off')
  const after = k.status().process.ksmStat
  if (after && 'ksmMergeAny' in after) t.equal(after.ksmMergeAny, false, '/proc/self/ksm_stat agrees')
  throwsCode(t, () => k.mergeAny(1 as unknown as boolean), TypeError, ErrorCode.INVALID_ARG, 'mergeAny(1)')
})
