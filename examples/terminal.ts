/**
 * What every command of the CLI shares about the terminal: whether to colour, how to print a
 * table, how numbers read, and how a command fails. Colours come from picocolors, tables from
 * cli-table3; this file only decides when and how they are used.
 */
import { readFileSync } from 'node:fs'
import { endianness } from 'node:os'
import { stripVTControlCharacters } from 'node:util'
import { SingleBar } from 'cli-progress'
import Table from 'cli-table3'
import { createColors } from 'picocolors'

/** The colour functions of picocolors (bold, green, red, ...), on or off as a whole. */
export type Colors = ReturnType<typeof createColors>

/** Exit statuses: 1 when the work failed, 2 when the command line was wrong (as commander's errors). */
export const EXIT_FAILURE = 1
export const EXIT_USAGE = 2

/**
 * Whether to colour what goes to `stream`: never with NO_COLOR (any non-empty value, see
 * no-color.org) or --no-color, always with FORCE_COLOR (other than 0/false), else only on a
 * terminal that is not TERM=dumb. picocolors' own guess also colours pipes when CI is set, which a
 * log file should not get, so the decision is made here and handed to createColors().
 */
export function colorEnabled(stream: NodeJS.WriteStream, flag: boolean = true): boolean {
  const env = process.env
  if (!flag || (env.NO_COLOR !== undefined && env.NO_COLOR !== '')) return false
  if (env.FORCE_COLOR !== undefined && env.FORCE_COLOR !== '') return env.FORCE_COLOR !== '0' && env.FORCE_COLOR !== 'false'
  return stream.isTTY === true && env.TERM !== 'dumb'
}

export function colorsFor(stream: NodeJS.WriteStream, flag: boolean = true): Colors {
  return createColors(colorEnabled(stream, flag))
}

/** A failure to report in one line on stderr and exit with `exitCode` (not a bug: no stack). */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number = EXIT_FAILURE,
  ) {
    super(message)
    this.name = 'CliError'
  }
}

/** The one line an error becomes on stderr: its message with newlines folded, and its code if it has one. */
export function errorLine(err: unknown): string {
  if (!(err instanceof Error)) return String(err)
  const code = (err as { code?: unknown }).code
  const text = err.message.replace(/\s*\n\s*/g, ' ').trim()
  return typeof code === 'string' && !(err instanceof CliError) && !text.includes(code) ? `${text} (${code})` : text
}

/**
 * A table with cli-table3's box drawing. Its own colouring (through @colors/colors, which
 * follows neither NO_COLOR nor our --no-color) is switched off; cells are coloured by the caller.
 */
export function table(head: string[], align: Array<'left' | 'right'> = [], options: { compact?: boolean; widths?: number[] } = {}): Table.Table {
  return new Table({
    head,
    colAligns: align,
    ...(options.widths ? { colWidths: options.widths } : {}),
    style: { head: [], border: [], compact: options.compact ?? false, 'padding-left': 1, 'padding-right': 1 },
  })
}

/** A titled block of rows for {@link sectionTables}. */
export interface Section {
  title: string
  rows: string[][]
}

/**
 * One compact table per section, the section's title heading its first column, all with the same
 * column widths so that they read as one.
 */
export function sectionTables(sections: Section[], head: string[], align: Array<'left' | 'right'>): string {
  const width = (text: string) => stripVTControlCharacters(text).length + 2 // padding
  const widths = head.map((h, i) =>
    Math.max(width(h), ...sections.map((s) => Math.max(i === 0 ? width(s.title) : 0, ...s.rows.map((r) => width(r[i] ?? ''))))),
  )
  return sections
    .map((s) => {
      const t = table([s.title, ...head.slice(1)], align, { compact: true, widths })
      t.push(...s.rows)
      return t.toString()
    })
    .join('\n')
}

const MiB = 1024 * 1024

const int = (n: number): string => n.toLocaleString('en-US')

export const fmt = {
  int,
  mib: (bytes: number): string => `${(bytes / MiB).toFixed(1)} MiB`,
  /** Seconds with two decimals below ten seconds, whole seconds above. */
  secs: (ms: number): string => (ms >= 10_000 ? `${(ms / 1000).toFixed(0)} s` : `${(ms / 1000).toFixed(2)} s`),
}

const AT_PAGESZ = 6n

/**
 * The kernel's page size, from this process's auxiliary vector (AT_PAGESZ): the unit of every
 * page count in /sys/kernel/mm/ksm. Pairs of native-endian 64-bit words on 64-bit Linux.
 */
export function kernelPageSize(): number {
  const auxv = readFileSync('/proc/self/auxv')
  const word = (at: number) => (endianness() === 'LE' ? auxv.readBigUInt64LE(at) : auxv.readBigUInt64BE(at))
  for (let at = 0; at + 16 <= auxv.length; at += 16) if (word(at) === AT_PAGESZ) return Number(word(at + 8))
  throw new CliError('cannot read the page size: no AT_PAGESZ in /proc/self/auxv')
}

/** The progress bar on stderr, one per phase; nothing at all when stderr is not a terminal. */
export class Progress {
  #bar: SingleBar | undefined
  readonly #enabled: boolean
  readonly #c: Colors

  constructor(enabled: boolean, color: boolean) {
    this.#enabled = enabled && process.stderr.isTTY === true
    this.#c = colorsFor(process.stderr, color)
  }

  start(phase: string, total: number, detail = ''): void {
    if (!this.#enabled) return
    this.stop()
    const c = this.#c
    this.#bar = new SingleBar({
      stream: process.stderr,
      format: `${c.bold('{phase}')} ${c.cyan('{bar}')} {percentage}% ${c.dim('|')} {detail}`,
      barCompleteChar: '\u2588',
      barIncompleteChar: '\u2591',
      barsize: 30,
      hideCursor: true,
      clearOnComplete: true,
    })
    this.#bar.start(Math.max(1, total), 0, { phase: phase.padEnd(10), detail })
  }

  update(value: number, total: number, detail: string): void {
    if (this.#bar === undefined) return
    this.#bar.setTotal(Math.max(1, total))
    this.#bar.update(value, { detail })
  }

  /** Removes the bar and gives the cursor back. */
  stop(): void {
    this.#bar?.stop()
    this.#bar = undefined
  }
}
