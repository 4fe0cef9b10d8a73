// The `pagemerge` CLI, driven as a user drives it: the built bin as a child process (and through a
// pseudo-terminal for the progress bar), judged by its output and its exit status.
import t from 'tap'
import { execFile, spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { expectUsageErrors, lines, type Run } from './fixtures/cli'

const ROOT = resolve(__dirname, '..')
const CLI = join(ROOT, 'dist/examples/cli.js')
const KSM = '/sys/kernel/mm/ksm'
const SCRIPT = '/usr/bin/script'
const noKsm = existsSync(KSM) ? false : `needs ${KSM} (CONFIG_KSM)`
const ESC = '\x1b'
/** SGR sequences: colours and bold/dim. The bar's cursor movements are not colours. */
const SGR = /\x1b\[[0-9;]*m/

if (!existsSync(CLI)) {
  // CI's `npm ci` builds; a fresh checkout may not have.
  const build = spawnSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'ignore' })
  if (!existsSync(CLI)) throw new Error(`npm run build did not produce ${CLI} (exit ${build.status})`)
}

/** The environment of a user who asked for nothing about colour. */
function env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = { ...process.env, ...extra }
  for (const key of ['NO_COLOR', 'FORCE_COLOR', 'CI']) if (!(key in extra)) delete out[key]
  return out
}


/** Runs the CLI with `args` to completion. */
function cli(args: string[], extraEnv: Record<string, string> = {}): Promise<Run> {
  return new Promise((done) => {
    execFile(process.execPath, [CLI, ...args], { env: env(extraEnv), timeout: 30_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : null) : 0
      done({ code, stdout, stderr })
    })
  })
}

/** Runs `args` on a pseudo-terminal (util-linux script), returning all it wrote there. */
function onTerminal(args: string[], extraEnv: Record<string, string> = {}): Run {
  const quote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`
  const command = [process.execPath, CLI, ...args].map(quote).join(' ')
  const r = spawnSync(SCRIPT, ['-qfec', command, '/dev/null'], {
    env: env({ TERM: 'xterm-256color', ...extraEnv }),
    encoding: 'utf8',
    timeout: 30_000,
  })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}


t.test('--version prints the version of package.json', async (t) => {
  const { version } = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'))
  for (const flag of ['--version', '-V']) {
    const r = await cli([flag])
    t.equal(r.code, 0, `${flag}: exit 0`)
    t.equal(r.stdout.trim(), version, `${flag}: prints ${version}`)
    t.equal(r.stderr, '', `${flag}: nothing on stderr`)
  }
})

t.test('--help on every command: exit 0, with examples', async (t) => {
  for (const args of [['--help'], ['demo', '--help'], ['kernel', '--help'], ['kernel', 'status', '--help'], ['kernel', 'watch', '--help'], ['help', 'demo']]) {
    const what = args.join(' ')
    const r = await cli(args)
    t.equal(r.code, 0, `${what}: exit 0`)
    t.match(r.stdout, /^Usage: pagemerge/, `${what}: usage first`)
    t.match(r.stdout, /Examples:\n\s+\$ pagemerge /, `${what}: has examples`)
    t.equal(r.stderr, '', `${what}: nothing on stderr`)
  }
  const top = await cli(['--help'])
  t.match(top.stdout, /demo/, 'lists demo')
  t.match(top.stdout, /kernel/, 'lists kernel')
  t.match(top.stdout, /Exit status: 0 done, 1 failed, 2 bad usage/, 'says what exit statuses mean')
})

t.test('bad usage: exit 2 and one plain line on stderr', async (t) => {
  const cases: Array<[string[], RegExp]> = [
    [['frob'], /unknown command 'frob'/],
    [['demp'], /unknown command 'demp' \(Did you mean demo\?\)/],
    [['demo', '--bogus'], /unknown option '--bogus'/],
    [['demo', '--tenants', '0'], /--tenants.*'0' is invalid.*1 to 1000/],
    [['demo', '--tenants', '2.5'], /--tenants.*invalid/],
    [['demo', '--size', 'lots'], /--size.*invalid/],
    [['demo', 'extra'], /too many arguments/],
    [['kernel', 'frob'], /unknown command 'frob'.*pagemerge kernel --help/],
    [['kernel', 'watch', '--interval', '0'], /--interval.*invalid/],
  ]
  await expectUsageErrors(t, cli, cases)
  const bare = await cli([])
  t.equal(bare.code, 2, 'no command: exit 2')
  t.match(bare.stderr, /^Usage: pagemerge/, 'no command: usage on stderr')
  t.equal(bare.stdout, '', 'no command: nothing on stdout')
})

t.test('a failure: exit 1 and one line on stderr', async (t) => {
  const missing = join(tmpdir(), `pagemerge-no-such-dir-${process.pid}`)
  const r = await cli(['demo', '--data', missing])
  t.equal(r.code, 1, 'exit 1')
  t.equal(r.stdout, '', 'nothing on stdout')
  t.same(lines(r.stderr), [`pagemerge: --data ${missing} is not a directory`], 'one line saying why')
})

t.test('demo --json: memory freed as the OS measures it, every byte read back', async (t) => {
  const r = await cli(['demo', '--tenants', '2', '--size', '4', '--json'])
  t.equal(r.code, 0, 'exit 0')
  t.equal(r.stderr, '', 'nothing on stderr (no bar off a terminal)')
  const report = JSON.parse(r.stdout)
  t.equal(report.tenants, 2)
  t.ok(report.files > 0 && report.dataBytes <= 4 << 20, 'at most 4 MiB of files')
  t.equal(report.buffers, 2 * report.files)
  t.equal(report.verify.bytesDiffering, 0, '0 bytes differ from the files')
  t.equal(report.verify.buffersDiffering, 0)
  t.ok(report.merge.pagesSharing >= report.dataPages, `pages merged (${report.merge.pagesSharing}): at least one tenant's copy`)
  t.type(report.memory.pss.freed, 'number', 'Pss of the whole process before and after')
  // Pss of the buffers' memfd pages is theirs alone; the whole process's Pss also moves with other
  // processes sharing its libraries, so on a busy host it is reported but not held to a sign.
  t.ok(report.memory.pssShmem.freed > 0, `Pss freed (${report.memory.pssShmem.freed} bytes of the buffers' Pss_Shmem)`)
  t.ok(
    report.memory.pssShmem.freed >= report.merge.pagesSharing * 4096 * 0.9,
    'Pss freed is what pagesSharing says it should be',
  )
  t.equal(
    report.ksmdAtDefaults.estimatedMs,
    Math.round((report.merge.pagesTracked / 100) * 20 * 2),
    'ksmd estimate: pages / (100 pages per 20 ms) x 2 full scans',
  )
})

t.test('demo on a data set of our own: zero pages, text table, NO_COLOR', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'pagemerge-cli-data-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  writeFileSync(join(dir, 'zeros.bin'), Buffer.alloc(32 * 4096))
  writeFileSync(join(dir, 'text.txt'), 'the same line in every tenant\n'.repeat(4000))

  const json = JSON.parse((await cli(['demo', '--data', dir, '--tenants', '3', '--json'])).stdout)
  t.equal(json.files, 2)
  t.equal(json.merge.zeroPages, 3 * 32, 'every page of zeros.bin is dropped as a zero page')
  t.equal(json.verify.bytesDiffering, 0)

  for (const extra of [{ NO_COLOR: '1' }, {}] as Record<string, string>[]) {
    const what = 'NO_COLOR' in extra ? 'NO_COLOR=1' : 'not a terminal'
    const r = await cli(['demo', '--data', dir, '--tenants', '3'], extra)
    t.equal(r.code, 0, `${what}: exit 0`)
    t.match(r.stdout, /verified: all 6 buffers read back their files' bytes OK/, `${what}: verified`)
    t.match(r.stdout, /Pss \(as the OS reports it\)/, `${what}: the table has Pss`)
    t.match(r.stdout, /zero pages dropped\s+│\s+│\s+96 │/, `${what}: and zero pages`)
    t.match(r.stdout, /ksmd at its defaults \(estimate\)/, `${what}: and the ksmd estimate`)
    t.notOk((r.stdout + r.stderr).includes(ESC), `${what}: no escape bytes at all`)
  }
  const forced = await cli(['demo', '--data', dir, '--tenants', '2'], { FORCE_COLOR: '1' })
  t.match(forced.stdout, SGR, 'FORCE_COLOR=1 colours even a pipe')
  const both = await cli(['--no-color', 'demo', '--data', dir, '--tenants', '2'], { FORCE_COLOR: '1' })
  t.notOk(both.stdout.includes(ESC), '--no-color wins over FORCE_COLOR')
})

t.test('kernel status', { skip: noKsm }, async (t) => {
  const before = readFileSync(join(KSM, 'pages_to_scan'), 'utf8').trim()
  const r = await cli(['kernel', 'status', '--json'])
  const after = readFileSync(join(KSM, 'pages_to_scan'), 'utf8').trim()
  t.equal(r.code, 0, '--json: exit 0')
  const status = JSON.parse(r.stdout)
  t.equal(status.available, true)
  // Other tests may tune ksmd meanwhile: the value must be one the file held around the run.
  t.ok([Number(before), Number(after)].includes(status.knobs.pagesToScan), `knobs.pagesToScan ${status.knobs.pagesToScan} is ${KSM}/pages_to_scan`)
  t.equal(status.raw.pages_to_scan, String(status.knobs.pagesToScan), 'raw text of the file too')
  t.equal(typeof status.stats.pagesSharing, 'number')
  t.equal(status.derived.memorySavedBytes, status.stats.pagesSharing * status.pageSize, 'memory saved = pages_sharing x page size')
  t.equal(status.pageSize, 4096, 'page size from AT_PAGESZ (4 KiB on this machine)')
  for (const [key, value] of Object.entries({ ...status.knobs, ...status.stats }))
    t.ok(value === null || typeof value === 'number' || typeof value === 'string', `${key}: a value or null (absent)`)

  t.equal(status.process, null, 'no process without --pid')
  const mine = JSON.parse((await cli(['kernel', 'status', '--json', '--pid', String(process.pid)])).stdout)
  t.equal(mine.process.pid, process.pid, '--pid: that process')
  t.type(mine.process.ksmStat?.ksmMergingPages ?? mine.process.mergingPages, 'number', "--pid: its ksm_stat or ksm_merging_pages")
  const gone = await cli(['kernel', 'status', '--pid', '999999999'])
  t.equal(gone.code, 1, '--pid of no process: exit 1')
  t.same(lines(gone.stderr), ['pagemerge: --pid 999999999: no such process'])

  const text = await cli(['kernel', 'status'], { NO_COLOR: '1' })
  t.equal(text.code, 0, 'text: exit 0')
  t.match(text.stdout, /pages_to_scan\s+│\s+[\d,]+ │/, 'text: pages_to_scan in the knobs')
  t.match(text.stdout, /memory saved \(pages_sharing x 4096 B\)/, 'text: memory saved')
  t.match(text.stdout, /ksmd CPU time/, 'text: ksmd CPU')
  t.notOk(text.stdout.includes(ESC), 'NO_COLOR: no escape bytes')
})

t.test('the progress bar, on a terminal only', { skip: existsSync(SCRIPT) ? false : `needs ${SCRIPT} (util-linux)` }, async (t) => {
  const args = ['demo', '--tenants', '2', '--size', '4']
  const tty = onTerminal(args)
  t.equal(tty.code, 0, 'exit 0 on a terminal')
  const uncoloured = tty.stdout.replace(new RegExp(SGR.source, 'g'), '')
  t.match(uncoloured, /merging\s+[\u2588\u2591]{30} \d+% \| full scan \d/, 'the merging bar is drawn')
  t.match(tty.stdout, SGR, 'in colour')
  t.match(tty.stdout, /\x1b\[\?25l[^]*\x1b\[\?25h/, 'the cursor is hidden while it runs, then shown again')

  const plain = onTerminal(args, { NO_COLOR: '1' })
  t.equal(plain.code, 0, 'NO_COLOR: exit 0')
  t.match(plain.stdout, /merging\s+[\u2588\u2591]+/, 'NO_COLOR: the bar is still drawn')
  t.notMatch(plain.stdout, SGR, 'NO_COLOR: no colour codes')

  const quiet = onTerminal([...args, '--no-progress'])
  t.notMatch(quiet.stdout, /[\u2588\u2591]/, '--no-progress: no bar')
})

t.test('kernel watch: refreshes until SIGINT, then exits 0', { skip: noKsm }, async (t) => {
  const child = spawn(process.execPath, [CLI, 'kernel', 'watch'], { env: env() })
  let stdout = ''
  let stderr = ''
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s))
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s))
  const exited = new Promise<[number | null, NodeJS.Signals | null]>((done) => child.on('exit', (code, signal) => done([code, signal])))
  await new Promise((r) => setTimeout(r, 2500))
  child.kill('SIGINT')
  const [code, signal] = await exited
  t.equal(signal, null, 'ends by itself, not killed by the signal')
  t.equal(code, 0, 'exit 0')
  t.equal(stderr, '', 'nothing on stderr')
  const frames = stdout.split('knobs (/sys/kernel/mm/ksm)').length - 1
  t.ok(frames >= 2, `${frames} refreshes in 2.5 s`)
  t.match(stdout, /pages_sharing\s+│\s+[\d,]+ │\s+[+-][\d,]+\/s │/, 'a later refresh shows pages_sharing per second')

  const json = spawn(process.execPath, [CLI, 'kernel', 'watch', '--json', '--interval', '0.2'], { env: env() })
  let out = ''
  json.stdout.setEncoding('utf8').on('data', (s: string) => (out += s))
  const jsonExited = new Promise<number | null>((done) => json.on('exit', (c) => done(c)))
  await new Promise((r) => setTimeout(r, 1000))
  json.kill('SIGINT')
  t.equal(await jsonExited, 0, '--json: exit 0')
  const readings = lines(out).map((line) => JSON.parse(line))
  t.ok(readings.length >= 3, `--json: ${readings.length} readings, one JSON object per line`)
  t.same(readings[0].rates, {}, '--json: no rates in the first reading')
  t.type(readings[1].rates.pagesSharing, 'number', '--json: pagesSharing per second from the second on')
})
