/**
 * Where does the Pss go? Runs one workload through mergeNow() in a child process and, at each
 * checkpoint (before, right after mergeNow(), after reading every page back, after the GCs that
 * the bench runs before its "after"), reads the child's /proc/<pid>/smaps from this (the parent)
 * process, so that the reading allocates nothing in the process being measured. Pss_Anon and
 * Pss_Shmem are summed by kind of mapping:
 *
 * - `arena memfd`: the arena's windows and merged views of its file (buffers and pool pages)
 * - `arena anon`: anonymous memory inside the arena's reserved range (dropped zero pages, copies)
 * - `[heap]`: the main thread's C heap (brk)
 * - `malloc arenas`: other threads' glibc heaps (64 MiB-aligned, HEAP_MAX_SIZE reservations)
 * - `other anon`: the rest: V8's heaps (every isolate, the workers' too), thread stacks, ...
 *
 * The child also says what it knows from inside: process.memoryUsage(), V8's heap spaces (main
 * isolate), the arena's counters. Usage:
 *
 *   npm run bench:pss-gap -- [--workload files|scattered|clones|sparse|volatile] [--size MiB] [--json] [--malloc] [--progress] [--warm]
 *
 * --progress: mergeNow()'s onProgress sends the parent a message after each batch, as the bench does.
 * --warm: a first mergeNow() of the same workload at 64 MiB, unregistered and collected before the
 *   baseline: what is left of the gap is what this merge costs, not the runtime's first use of
 *   the code (the JIT's compiles, the heaps of the threads that run them).
 * --malloc: also glibc's malloc_info() per arena at each checkpoint (called in the child through gdb).
 */
import { fork, spawnSync } from 'node:child_process'
import { existsSync, readFileSync, unlinkSync } from 'node:fs'
import { getHeapSpaceStatistics } from 'node:v8'
import { setTimeout as sleep } from 'node:timers/promises'
import { Engine } from '../lib/engine'
import { resolveOptions } from '../lib/options'
import { loadNative, PAGE_SIZE } from '../lib/native'
import { smapsRollup } from '../lib/procfs'
import { gcRounds, MiB } from './common'
import { hashBuffers, loadWorkload, WORKLOAD_NAMES, type WorkloadName } from './workloads'
import { sharedBytes } from '../lib/tables'

const CHECKPOINTS = ['before', 'merged', 'read', 'after'] as const
type Checkpoint = (typeof CHECKPOINTS)[number]

interface Inside {
  checkpoint: Checkpoint
  memoryUsage: NodeJS.MemoryUsage
  heapSpaces: Record<string, number>
  arena: { poolPages: number; poolMappings: number; arenaBytes: number; metadataBytes: number }
  counted?: { pagesSharing: number; zeroPages: number; pagesShared: number; pagesSkippedBudget: number; metadataBytesPerPage: number; pagesTracked: number }
  arenaBase: string
  arenaBytes: number
}

type Groups = Record<string, { pssAnon: number; pssShmem: number; vmas: number }>

// ---- the child: one workload, paused at each checkpoint until the parent has read its smaps ----

async function child(workload: WorkloadName, bytes: number): Promise<void> {
  const engine = new Engine(resolveOptions({}))
  if (process.env.PSS_GAP_WARM) {
    const warm = loadWorkload(workload, 64 * MiB, (n) => engine.alloc(n, ''))
    await engine.mergeNow()
    for (const b of warm.buffers) engine.unregister(b)
    warm.buffers.length = 0
  }
  const w = loadWorkload(workload, bytes, (n) => {
    const b = engine.alloc(n, '')
    return new Uint8Array(b.buffer, 0, b.buffer.byteLength)
  })
  let base = -1n
  for (const b of w.buffers) {
    const a = loadNative().addressOf(b)
    if (base < 0n || a < base) base = a
  }
  await sleep(300) // worker threads start at the first alloc(): as bench/contender.ts waits
  await gcRounds(3, 'bench')
  let counted: Inside['counted']
  const say = async (checkpoint: Checkpoint) => {
    const spaces: Record<string, number> = {}
    for (const s of getHeapSpaceStatistics()) spaces[s.space_name] = s.physical_space_size
    const a = engine.arena.stats()
    const m: Inside = {
      checkpoint,
      memoryUsage: process.memoryUsage(),
      heapSpaces: spaces,
      arena: { poolPages: a.poolPages, poolMappings: a.poolMappings, arenaBytes: a.arenaBytes, metadataBytes: a.metadataBytes },
      ...(counted ? { counted } : {}),
      arenaBase: String(base),
      arenaBytes: a.reserveBytes,
    }
    await new Promise<void>((resolve) => process.send!(m, undefined, {}, () => resolve()))
    await new Promise<void>((resolve) => process.once('message', () => resolve()))
  }
  await say('before')
  // --progress: a message to the parent after each batch, as bench/contender.ts sends for its chart
  const s = await engine.mergeNow(process.env.PSS_GAP_PROGRESS ? { onProgress: (p) => process.send!({ progress: p.pagesSharing }) } : {})
  counted = { pagesSharing: s.pagesSharing, zeroPages: s.zeroPages, pagesShared: s.pagesShared, pagesSkippedBudget: s.pagesSkippedBudget, metadataBytesPerPage: s.metadataBytesPerPage, pagesTracked: s.pagesTracked }
  await say('merged')
  hashBuffers(w.buffers, new BigUint64Array(sharedBytes(8 * w.pages))) // what the bench's verify() reads
  await say('read')
  await gcRounds(3, 'bench')
  await say('after')
  await engine.close()
  process.disconnect()
}

// ---- the parent: smaps by kind of mapping ----

interface Vma {
  lo: bigint
  hi: bigint
  perms: string
  name: string
  pssAnon: number
  pssShmem: number
}

function readSmaps(pid: number): Vma[] {
  const out: Vma[] = []
  let cur: Vma | undefined
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line)
    if (head) {
      cur = { lo: BigInt('0x' + head[1]), hi: BigInt('0x' + head[2]), perms: head[3]!, name: head[4]!, pssAnon: 0, pssShmem: 0 }
      out.push(cur)
      continue
    }
    // per mapping, smaps has no Pss_Anon/Pss_Shmem (smaps_rollup has): Anonymous is the private
    // copies (not shared: no fork, no ksmd here), the rest of Pss is the file's pages
    const f = /^(Pss|Anonymous):\s+(\d+) kB/.exec(line)
    if (f && cur) (cur as unknown as Record<string, number>)[f[1] === 'Pss' ? 'pss' : 'anon'] = Number(f[2]) * 1024
  }
  for (const v of out) {
    const { pss = 0, anon = 0 } = v as unknown as Record<string, number>
    v.pssAnon = anon
    v.pssShmem = v.name === '' || v.name.startsWith('[') || v.name.includes('memfd:') || v.name.startsWith('/dev/shm') || v.name.startsWith('/SYSV') ? pss - anon : 0
  }
  return out
}

const HEAP_MAX = 64n * BigInt(MiB) // glibc's per-thread heap reservation on 64-bit

function group(vmas: Vma[], base: bigint, bytes: bigint): Groups {
  const g: Groups = {}
  const add = (k: string, v: Vma) => {
    const e = (g[k] ??= { pssAnon: 0, pssShmem: 0, vmas: 0 })
    e.pssAnon += v.pssAnon
    e.pssShmem += v.pssShmem
    e.vmas++
  }
  for (let i = 0; i < vmas.length; i++) {
    const v = vmas[i]!
    if (v.lo >= base && v.hi <= base + bytes) add(v.name.includes('memfd:') ? 'arena memfd' : 'arena anon', v)
    else if (v.name === '[heap]') add('[heap]', v)
    else if (v.name === '' && v.lo % HEAP_MAX === 0n && (v.hi - v.lo === HEAP_MAX || (vmas[i + 1]?.lo === v.hi && vmas[i + 1]!.hi - v.lo === HEAP_MAX && vmas[i + 1]!.perms.startsWith('---')))) add('malloc arenas', v)
    else if (v.name === '' || v.name.startsWith('[anon') || v.name === '[stack]') add('other anon', v)
    else if (v.pssAnon + v.pssShmem > 0) add('file (private copies)', v)
  }
  return g
}

const mib = (b: number) => (b / MiB).toFixed(2)

/** glibc's heaps as malloc_info(3) reports them: per arena, bytes taken from the OS and bytes free in them. */
interface MallocInfo {
  heaps: Array<{ system: number; free: number }>
  mmapped: number
}

/**
 * malloc_info() of the child, called in it through gdb (the child is waiting at a checkpoint):
 * whether its heaps grew with memory in use or with memory freed and kept.
 */
function mallocInfo(pid: number): MallocInfo | undefined {
  const file = `/tmp/pss-gap-${pid}.xml`
  const r = spawnSync('gdb', ['-p', String(pid), '-batch', '-nx', '-ex', `call (int)malloc_info(0, (void*)fopen("${file}", "w"))`, '-ex', 'call (int)fflush(0)'], { encoding: 'utf8', timeout: 60_000 })
  if (r.status !== 0 || !existsSync(file)) return undefined
  const xml = readFileSync(file, 'utf8')
  unlinkSync(file)
  const heaps: MallocInfo['heaps'] = []
  for (const h of xml.split('<heap nr=').slice(1)) {
    const num = (re: RegExp) => Number(re.exec(h)?.[1] ?? 0)
    heaps.push({ system: num(/<system type="current" size="(\d+)"/), free: num(/<total type="fast" count="\d+" size="(\d+)"/) + num(/<total type="rest" count="\d+" size="(\d+)"/) })
  }
  const tail = xml.slice(xml.lastIndexOf('</heap>'))
  return { heaps, mmapped: Number(/<total type="mmap" count="\d+" size="(\d+)"/.exec(tail)?.[1] ?? 0) }
}

async function parent(workload: WorkloadName, sizeMiB: number, json: boolean, withMalloc: boolean, progress: boolean, warm: boolean): Promise<void> {
  // node flags given to this script apply to the child too (--v8-pool-size=1, --single-threaded: whose heaps grow)
  const env = { ...process.env, ...(progress ? { PSS_GAP_PROGRESS: '1' } : {}), ...(warm ? { PSS_GAP_WARM: '1' } : {}) }
  const c = fork(__filename, ['--child', workload, String(sizeMiB)], { env, execArgv: [...new Set([...process.execArgv, '--expose-gc'])] })
  const seen: Array<{ inside: Inside; groups: Groups; malloc?: MallocInfo }> = []
  await new Promise<void>((resolve, reject) => {
    c.on('message', (m: Inside) => {
      if (!('checkpoint' in m)) return // --progress
      const groups = group(readSmaps(c.pid!), BigInt(m.arenaBase), BigInt(m.arenaBytes))
      // smaps prints each mapping's Pss rounded down to a kB: a pool page shared by 17 one-page
      // mappings shows 0 kB in each. smaps_rollup sums before rounding, so the arena's mappings
      // (the many small ones) get what the rollup says less the other kinds (few, large mappings).
      const r = smapsRollup(c.pid!)
      const others = Object.entries(groups).filter(([k]) => k !== 'arena memfd').reduce((n, [, e]) => n + e.pssAnon + e.pssShmem, 0)
      const arena = groups['arena memfd']
      if (arena) (arena.pssShmem = (r.Pss_Anon ?? 0) + (r.Pss_Shmem ?? 0) - others - arena.pssAnon)
      seen.push({ inside: m, groups, ...(withMalloc ? { malloc: mallocInfo(c.pid!) } : {}) })
      c.send('next')
    })
    c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`child exited ${code}`))))
  })
  if (json) {
    console.log(JSON.stringify(seen, null, 1))
    return
  }
  const kinds = [...new Set(seen.flatMap((s) => Object.keys(s.groups)))].sort()
  const b = seen[0]!
  const counted = seen[seen.length - 1]!.inside.counted!
  const countedBytes = (counted.pagesSharing + counted.zeroPages) * PAGE_SIZE
  console.log(`${workload} at ${sizeMiB} MiB: counted ${counted.pagesSharing} + ${counted.zeroPages} zero = ${mib(countedBytes)} MiB; ${counted.pagesShared} stable pages; ${counted.pagesSkippedBudget} skipped for budget`)
  console.log('\nPss_Anon + Pss_Shmem by kind of mapping, change from before (MiB; VMAs now)')
  console.log(['kind'.padEnd(22), ...CHECKPOINTS.slice(1).map((k) => k.padStart(16))].join(''))
  const total = (s: (typeof seen)[number]) => Object.values(s.groups).reduce((n, e) => n + e.pssAnon + e.pssShmem, 0)
  for (const k of kinds) {
    const at = (s: (typeof seen)[number]) => (s.groups[k] ? s.groups[k]!.pssAnon + s.groups[k]!.pssShmem : 0)
    console.log([k.padEnd(22), ...seen.slice(1).map((s) => `${mib(at(s) - at(b))} (${s.groups[k]?.vmas ?? 0})`.padStart(16))].join(''))
  }
  console.log(['all'.padEnd(22), ...seen.slice(1).map((s) => mib(total(s) - total(b)).padStart(16))].join(''))
  const freed = total(b) - total(seen[seen.length - 1]!)
  console.log(`\nfreed ${mib(freed)} MiB of ${mib(countedBytes)} counted (${((100 * freed) / countedBytes).toFixed(1)}%); gap ${mib(countedBytes - freed)} MiB`)
  console.log('\ninside the child (main isolate and arena), change from before (MiB)')
  const rows: Array<[string, (i: Inside) => number]> = [
    ['rss', (i) => i.memoryUsage.rss],
    ['heapTotal', (i) => i.memoryUsage.heapTotal],
    ['heapUsed', (i) => i.memoryUsage.heapUsed],
    ['external', (i) => i.memoryUsage.external],
    ['arrayBuffers', (i) => i.memoryUsage.arrayBuffers],
    ...Object.keys(b.inside.heapSpaces).map((k): [string, (i: Inside) => number] => [`  ${k}`, (i) => i.heapSpaces[k] ?? 0]),
    ['arena file (st_blocks)', (i) => i.arena.arenaBytes],
    ['pool pages', (i) => i.arena.poolPages * PAGE_SIZE],
    ['arena metadata', (i) => i.arena.metadataBytes],
  ]
  for (const [name, f] of rows) console.log([name.padEnd(28), ...seen.slice(1).map((s) => mib(f(s.inside) - f(b.inside)).padStart(12))].join(''))
  if (!seen.every((s) => s.malloc)) return
  console.log('\nglibc malloc_info (MiB): per arena, system (taken from the OS) / free in it; arena 0 is [heap]')
  console.log(['checkpoint'.padEnd(12), 'mmapped'.padStart(10), ...seen[seen.length - 1]!.malloc!.heaps.map((_, i) => `arena ${i}`.padStart(16))].join(''))
  for (const s of seen) console.log([s.inside.checkpoint.padEnd(12), mib(s.malloc!.mmapped).padStart(10), ...s.malloc!.heaps.map((h) => `${mib(h.system)}/${mib(h.free)}`.padStart(16))].join(''))
}

const args = process.argv.slice(2)
if (args[0] === '--child') void child(args[1] as WorkloadName, Number(args[2]) * MiB)
else {
  const opt = (name: string, dflt: string) => {
    const i = args.indexOf(`--${name}`)
    return i >= 0 ? args[i + 1]! : dflt
  }
  const workload = opt('workload', 'files') as WorkloadName
  if (!WORKLOAD_NAMES.includes(workload)) throw new RangeError(`--workload must be one of ${WORKLOAD_NAMES.join(', ')}`)
  void parent(workload, Number(opt('size', '1024')), args.includes('--json'), args.includes('--malloc'), args.includes('--progress'), args.includes('--warm'))
}
