// `pagemerge estimate`, driven as a user drives it: the built bin against child processes with a
// designed layout, judged by its output and its exit status (0 when a process was read, 1 when
// none could be, 2 for bad usage).
import t from 'tap'
import { execFile, spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import type { EstimateReport } from '../lib/estimate'
import { isRoot, MiB, PAGE } from './fixtures/util'
import { expectUsageErrors, lines, type Run } from './fixtures/cli'

const ROOT = resolve(__dirname, '..')
const CLI = join(ROOT, 'dist/examples/cli.js')
const CHILD = join(__dirname, 'fixtures', 'estimate-child.js')
const SCRIPT = '/usr/bin/script'
const ESC = '\x1b'

if (!existsSync(CLI) || !existsSync(join(ROOT, 'dist/examples/commands/estimate.js'))) {
  const build = spawnSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'ignore' })
  if (!existsSync(CLI)) throw new Error(`npm run build did not produce ${CLI} (exit ${build.status})`)
}


function env(): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = { ...process.env }
  for (const key of ['NO_COLOR', 'FORCE_COLOR', 'CI']) delete out[key]
  return out
}

function cli(args: string[], options: { uid?: number } = {}): Promise<Run> {
  const ids = options.uid === undefined ? {} : { uid: options.uid, gid: options.uid }
  return new Promise((done) => {
    execFile(process.execPath, [CLI, ...args], { env: env(), timeout: 60_000, maxBuffer: 16 << 20, ...ids }, (err, stdout, stderr) => {
      done({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr })
    })
  })
}

interface Child {
  proc: ChildProcess
  pid: number
}

async function child(): Promise<Child> {
  const proc = spawn(process.execPath, [CHILD, '64'], { stdio: ['pipe', 'pipe', 'inherit'] })
  const line = await new Promise<string>((done) => createInterface({ input: proc.stdout! }).once('line', done))
  return { proc, pid: (JSON.parse(line) as { pid: number }).pid }
}

/** A pid that was just used and is now free. */
function deadPid(): number {
  const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' })
  return Number(r.stdout)
}

const SHARED = (32 * MiB) / PAGE

t.test('estimate --help: exit 0, with examples', async (t) => {
  for (const args of [['estimate', '--help'], ['help', 'estimate']]) {
    const r = await cli(args)
    t.equal(r.code, 0)
    t.match(r.stdout, /^Usage: pagemerge estimate/)
    t.match(r.stdout, /Examples:\n\s+\$ pagemerge estimate --pid/)
  }
  t.match((await cli(['--help'])).stdout, /estimate/, 'listed in the top help')
})

t.test('bad usage: exit 2 and one plain line on stderr', async (t) => {
  const cases: Array<[string[], RegExp]> = [
    [['estimate'], /--pid N.*--name REGEX or --all/],
    [['estimate', '--pid', '1', '--all'], /one of them/],
    [['estimate', '--pid', 'x'], /--pid.*'x' is invalid/],
    [['estimate', '--pid', '0'], /--pid.*'0' is invalid/],
    [['estimate', '--name', '('], /--name.*not a regular expression/],
    [['estimate', '--all', '--top', '-1'], /--top|unknown option '-1'/],
    [['estimate', '--all', '--top', '1001'], /--top.*0 to 1000/],
    [['estimate', '--bogus'], /unknown option '--bogus'/],
  ]
  await expectUsageErrors(t, cli, cases)
})

t.test('three children: the table, the JSON, the bar only on a terminal', async (t) => {
  const kids = await Promise.all([child(), child(), child()])
  t.teardown(() => kids.forEach((k) => k.proc.kill('SIGKILL')))
  const args = ['estimate', ...kids.flatMap((k) => ['--pid', String(k.pid)])]

  const json = await cli([...args, '--json', '--top', '2'])
  t.equal(json.code, 0, json.stderr)
  t.equal(json.stderr, '', 'nothing on stderr (no bar into a pipe)')
  const r = JSON.parse(json.stdout) as EstimateReport
  t.same(r.processes.map((p) => [p.pid, p.status]), kids.map((k) => [k.pid, 'ok']), 'one entry per --pid, in order')
  t.ok(r.total.crossProcessDuplicatePages >= 2 * SHARED, `the shared pages are found (${r.total.crossProcessDuplicatePages})`)
  t.ok(r.total.zeroPages >= 3 * 2048, 'and the zero pages')
  t.equal(r.top.length, 2, '--top 2')
  t.type(r.total.bytesFreeable, 'number')

  const text = await cli([...args, '--top', '3'])
  t.equal(text.code, 0)
  t.notOk(text.stdout.includes(ESC), 'no colours into a pipe')
  for (const k of kids) t.match(text.stdout, new RegExp(`│ +${k.pid} │ node +│ ok `), `a row for ${k.pid}`)
  t.match(text.stdout, /│ +│ total +│ 3 read /, 'a total row')
  t.match(text.stdout, /merging would free [\d.]+ MiB/)
  t.match(text.stdout, /most duplicated contents/)

  const tty = spawnSync(SCRIPT, ['-qfec', [process.execPath, CLI, ...args].join(' '), '/dev/null'], { env: { ...env(), TERM: 'xterm-256color' }, encoding: 'utf8', timeout: 60_000 })
  t.equal(tty.status, 0)
  t.match(tty.stdout, /reading.*% .* MiB mapped/, 'a bar while reading')
  t.match(tty.stdout, /confirming.*candidate pages/, 'and while confirming')
})

t.test('processes that cannot be read: a line each; exit 1 only when none could be', async (t) => {
  const kid = await child()
  t.teardown(() => kid.proc.kill('SIGKILL'))
  const dead = deadPid()
  const some = await cli(['estimate', '--pid', String(kid.pid), '--pid', String(dead), '--pid', '2'])
  t.equal(some.code, 0, 'one process read: exit 0')
  t.match(some.stdout, new RegExp(`│ +${dead} │ +│ not-found`), 'a row for the pid that does not exist')
  t.match(some.stdout, new RegExp(`pid ${dead}: not-found: no process ${dead} \\(ESRCH`), 'and why')
  t.match(some.stdout, /pid 2 \(kthreadd\): a kernel thread/, 'a kernel thread')

  const none = await cli(['estimate', '--pid', String(dead), '--pid', '2'])
  t.equal(none.code, 1, 'nothing read: exit 1')
  t.match(none.stdout, /not-found/, 'the table is still printed')
  t.same(lines(none.stderr), [`pagemerge: no process could be read: ${dead} not-found (ESRCH), 2 kernel-thread`])

  const json = await cli(['estimate', '--pid', String(dead), '--json'])
  t.equal(json.code, 1)
  t.equal((JSON.parse(json.stdout) as EstimateReport).processes[0]!.status, 'not-found', 'JSON first, then the failure')

  const nameless = await cli(['estimate', '--name', '^no-such-process-name-[0-9]{9}$'])
  t.equal(nameless.code, 1)
  t.match(nameless.stderr, /no process matches --name/)
})

t.test('a process the caller may not read: denied, with the hint', { skip: isRoot ? false : 'needs root: runs the CLI as uid 65534 against a root process' }, async (t) => {
  const kid = await child()
  t.teardown(() => kid.proc.kill('SIGKILL'))
  const r = await cli(['estimate', '--pid', String(kid.pid)], { uid: 65534 })
  t.equal(r.code, 1, 'nothing read: exit 1')
  t.match(r.stdout, new RegExp(`pid ${kid.pid} \\(node\\): denied: cannot read /proc/${kid.pid}/maps \\(EACCES, open\\); the process belongs to uid 0`))
  t.match(r.stderr, new RegExp(`no process could be read: ${kid.pid} denied \\(EACCES\\)`))
})
