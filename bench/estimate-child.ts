/**
 * A target process for the estimator's benchmark (bench/estimator.ts): it holds `MiB` of private
 * anonymous memory, half of it the same bytes in every child, an eighth zero bytes (written, so
 * resident), the rest unique, then prints one JSON line { pid, address, bytes } and waits until
 * stdin closes.
 *
 *   node dist/bench/estimate-child.js <MiB> <index>
 */
import { randomFillSync } from 'node:crypto'
import { loadNative } from '../lib/native'
import { fillRandom, MiB } from './common'

const mib = Number(process.argv[2] ?? 256)
const bytes = mib * MiB
const arena = new (loadNative().Arena)()
const sab = arena.alloc(bytes, false) // page-aligned, private anonymous
const buf = new Uint8Array(sab)
const shared = bytes / 2, zero = bytes / 8
fillRandom(buf.subarray(0, shared), 0x5eed) // the same in every child
buf.fill(1, shared, shared + zero) // touched, so resident pages and not the kernel's zero page
buf.fill(0, shared, shared + zero)
randomFillSync(buf, shared + zero)

process.stdout.write(JSON.stringify({ pid: process.pid, address: '0x' + loadNative().addressOf(sab).toString(16), bytes }) + '\n')
process.stdin.resume()
process.stdin.on('end', () => process.exit(0))
setInterval(() => buf[0], 1 << 30) // keeps the buffer referenced
