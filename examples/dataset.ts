/**
 * The demo's data set: the regular files of a folder, read as a service would read them from disk.
 * By default it is this package's own installed tree, which nobody shaped to merge well.
 */
import { closeSync, existsSync, fstatSync, openSync, readdirSync, readFileSync, readSync, statSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'

/** One file of the data set, with what it looked like when listed (to notice it changing). */
export interface DataFile {
  path: string
  size: number
  mtimeMs: number
}

/** The folder holding pagemerge's package.json, found by walking up from this file. */
export function packageRoot(): string | undefined {
  for (let dir = __dirname; ; dir = dirname(dir)) {
    const manifest = join(dir, 'package.json')
    if (existsSync(manifest)) {
      try {
        if (JSON.parse(readFileSync(manifest, 'utf8')).name === 'pagemerge') return dir
      } catch {
        // an unreadable manifest on the way up is not ours
      }
    }
    if (dirname(dir) === dir) return undefined
  }
}

/** pagemerge's package.json, parsed. */
export function packageManifest(): { name: string; version: string } {
  const root = packageRoot()
  if (root === undefined) throw new Error(`cannot find pagemerge's package.json above ${__dirname}`)
  return JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
}

/**
 * The default data set: the package's node_modules, or the package folder itself when an
 * installer hoisted its dependencies elsewhere (npx, a workspace).
 */
export function defaultDataDir(): string {
  const root = packageRoot() ?? process.cwd()
  const modules = join(root, 'node_modules')
  return existsSync(modules) ? modules : root
}

const byName = (a: { name: string }, b: { name: string }): number => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)

/**
 * Regular non-empty files under `root`, depth first in name order (so two runs load the same
 * set), taking each file that still fits in `capBytes`. Symbolic links are not followed and
 * unreadable folders are skipped: they are not part of the data set.
 */
export function listFiles(root: string, capBytes: number): DataFile[] {
  const files: DataFile[] = []
  let total = 0
  const walk = (dir: string): void => {
    let entries
    try {
      entries = readdirSync(dir, { withFileTypes: true }).sort(byName)
    } catch {
      return
    }
    for (const entry of entries) {
      if (total >= capBytes) return
      const path = join(dir, entry.name)
      if (entry.isDirectory()) walk(path)
      else if (entry.isFile()) {
        const st = statSync(path, { throwIfNoEntry: false })
        if (st === undefined || st.size === 0 || total + st.size > capBytes) continue
        files.push({ path, size: st.size, mtimeMs: st.mtimeMs })
        total += st.size
      }
    }
  }
  walk(resolve(root))
  return files
}

/**
 * Reads `file` whole into the front of `scratch`, one buffer reused for every file so that loading
 * leaves no garbage, and returns the part that holds it. Throws if the file changed since it was
 * listed, since the demo compares buffers with the files again at the end.
 */
export function readInto(file: DataFile, scratch: Buffer): Buffer {
  const fd = openSync(file.path, 'r')
  try {
    const st = fstatSync(fd)
    if (st.size !== file.size || st.mtimeMs !== file.mtimeMs) throw new Error(`${file.path} changed on disk during the demo`)
    for (let done = 0; done < file.size; ) {
      const n = readSync(fd, scratch, done, file.size - done, done)
      if (n === 0) throw new Error(`${file.path} became shorter while it was read`)
      done += n
    }
    return scratch.subarray(0, file.size)
  } finally {
    closeSync(fd)
  }
}
