// Option checking: defaults, TypeError for type, RangeError for range, unknown keys with a hint.
import t, { type Test } from 'tap'
import { availableParallelism } from 'node:os'
import { defaultMapBudget } from '../lib/budget'
import { ErrorCode } from '../lib/errors'
import { resolveOptions, validatePartial, type ResolvedOptions } from '../lib/options'

/** Asserts that `fn` throws exactly `Class` (not a subclass or sibling) with `code`; returns the error. */
function throwsCoded(
  t: Test,
  fn: () => unknown,
  Class: TypeErrorConstructor | RangeErrorConstructor,
  code: string,
  what: string,
): Error | undefined {
  try {
    fn()
  } catch (err) {
    t.equal((err as Error).constructor, Class, `${what}: ${Class.name}`)
    t.equal((err as { code?: unknown }).code, code, `${what}: ${code}`)
    return err as Error
  }
  t.fail(`${what}: did not throw`)
  return undefined
}

const expectedDefaults = (): ResolvedOptions => ({
  workers: Math.min(256, Math.max(1, availableParallelism() - 1)),
  pagesToScan: 100,
  sleepMillisecs: 20,
  maxPageSharing: 256,
  useZeroPages: true,
  mapBudget: defaultMapBudget(),
  mergeAcrossDomains: false,
  engine: 'userspace',
})

const INTEGERS = {
  workers: { min: 1, max: 256 },
  pagesToScan: { min: 1, max: 2 ** 32 - 1 },
  sleepMillisecs: { min: 0, max: 2 ** 31 - 1 },
  maxPageSharing: { min: 2, max: 65535 },
  mapBudget: { min: 1, max: Number.MAX_SAFE_INTEGER },
} as const
const BOOLEANS = ['useZeroPages', 'mergeAcrossDomains'] as const

t.test('defaults', async (t) => {
  const want = expectedDefaults()
  t.strictSame(resolveOptions(), want, 'no argument')
  t.strictSame(resolveOptions(undefined), want, 'undefined')
  t.strictSame(resolveOptions({}), want, 'empty object')
  t.strictSame(resolveOptions(Object.create(null)), want, 'null-prototype object')
  const allUndefined = Object.fromEntries(Object.keys(want).map((k) => [k, undefined]))
  t.strictSame(resolveOptions(allUndefined), want, 'undefined values mean the default')
  t.ok(want.mapBudget >= 1, 'default mapBudget is itself valid')
})

t.test('given values are kept, others defaulted', async (t) => {
  const got = resolveOptions({ pagesToScan: 5, useZeroPages: false, mapBudget: 1000 })
  t.strictSame(got, { ...expectedDefaults(), pagesToScan: 5, useZeroPages: false, mapBudget: 1000 })
  t.ok(Object.is(resolveOptions({ sleepMillisecs: -0 }).sleepMillisecs, 0), '-0 becomes 0')
})

t.test('inherited properties are not options', async (t) => {
  t.strictSame(resolveOptions(Object.create({ workers: 0, bogus: 1 })), expectedDefaults())
})

t.test('integer options: bounds accepted, wrong types TypeError, out of range RangeError', async (t) => {
  for (const [key, { min, max }] of Object.entries(INTEGERS)) {
    t.test(key, async (t) => {
      t.equal(resolveOptions({ [key]: min })[key as keyof ResolvedOptions], min, 'min accepted')
      t.equal(resolveOptions({ [key]: max })[key as keyof ResolvedOptions], max, 'max accepted')
      const wrongType: unknown[] = ['1', '', NaN, true, false, null, 1n, {}, [1], new Number(1), Symbol('x'), () => 1]
      for (const value of wrongType) {
        throwsCoded(t, () => resolveOptions({ [key]: value }), TypeError, ErrorCode.INVALID_OPTION, `${key}=${String(value)}`)
      }
      const outOfRange = [min - 1, max + 1, -1, min + 0.5, Infinity, -Infinity, 2 ** 53, Number.MAX_VALUE]
      for (const value of outOfRange) {
        throwsCoded(t, () => resolveOptions({ [key]: value }), RangeError, ErrorCode.INVALID_OPTION, `${key}=${value}`)
      }
    })
  }
  t.end()
})

t.test('boolean options: booleans accepted, anything else TypeError', async (t) => {
  for (const key of BOOLEANS) {
    t.equal(resolveOptions({ [key]: true })[key], true, `${key}=true`)
    t.equal(resolveOptions({ [key]: false })[key], false, `${key}=false`)
    for (const value of [0, 1, NaN, 'true', 'false', '', null, {}, [], new Boolean(true)]) {
      throwsCoded(t, () => resolveOptions({ [key]: value }), TypeError, ErrorCode.INVALID_OPTION, `${key}=${String(value)}`)
    }
  }
})

t.test('engine: one of three names; anything else is refused with a code', async (t) => {
  for (const name of ['userspace', 'kernel', 'auto'] as const) t.equal(resolveOptions({ engine: name }).engine, name, name)
  for (const value of ['Kernel', 'ksm', '', ' auto'])
    throwsCoded(t, () => resolveOptions({ engine: value }), RangeError, ErrorCode.INVALID_OPTION, `engine=${JSON.stringify(value)}`)
  for (const value of [0, true, null, {}, ['auto'], new String('auto')])
    throwsCoded(t, () => resolveOptions({ engine: value }), TypeError, ErrorCode.INVALID_OPTION, `engine=${String(value)}`)
})

t.test('the first bad value throws even when others are good', async (t) => {
  throwsCoded(t, () => resolveOptions({ workers: 2, maxPageSharing: 1 }), RangeError, ErrorCode.INVALID_OPTION, 'maxPageSharing=1')
})

t.test('unknown keys', async (t) => {
  for (const name of ['pageToScan', 'PAGESTOSCAN', 'worker', 'foo', '', 'constructor', '__proto__x', 'toString']) {
    throwsCoded(t, () => resolveOptions({ [name]: 1 }), TypeError, ErrorCode.UNKNOWN_OPTION, `unknown ${JSON.stringify(name)}`)
  }
  throwsCoded(t, () => resolveOptions({ foo: undefined }), TypeError, ErrorCode.UNKNOWN_OPTION, 'unknown key with undefined value')
  throwsCoded(t, () => resolveOptions({ workers: 2, bogus: true }), TypeError, ErrorCode.UNKNOWN_OPTION, 'unknown key beside a good one')
  throwsCoded(t, () => resolveOptions({ workers: 'x', bogus: true }), TypeError, ErrorCode.UNKNOWN_OPTION, 'unknown keys are reported before bad values')
})

t.test('the unknown-key hint names the closest option', async (t) => {
  const err = throwsCoded(t, () => resolveOptions({ pageToScan: 10 }), TypeError, ErrorCode.UNKNOWN_OPTION, 'pageToScan')
  t.match(err?.message, /did you mean "pagesToScan"\?/)
  const caseOnly = throwsCoded(t, () => resolveOptions({ pagestoscan: 10 }), TypeError, ErrorCode.UNKNOWN_OPTION, 'pagestoscan')
  t.match(caseOnly?.message, /did you mean "pagesToScan"\?/)
  const far = throwsCoded(t, () => resolveOptions({ frobnicate: 1 }), TypeError, ErrorCode.UNKNOWN_OPTION, 'frobnicate')
  t.notMatch(far?.message, /did you mean/)
  t.match(far?.message, /pagesToScan/, 'lists the known options instead')
})

t.test('non-object inputs', async (t) => {
  for (const value of [null, 0, 1, NaN, '', 'workers', true, false, 1n, Symbol('x'), [], [1], () => ({})]) {
    throwsCoded(t, () => resolveOptions(value), TypeError, ErrorCode.INVALID_OPTION, `options=${String(value)}`)
  }
})

t.test('validatePartial merges given keys over current', async (t) => {
  const current = resolveOptions({ pagesToScan: 7, useZeroPages: false })
  const next = validatePartial(current, { sleepMillisecs: 0, mergeAcrossDomains: true })
  t.strictSame(next, { ...current, sleepMillisecs: 0, mergeAcrossDomains: true })
  t.not(next, current, 'a new object')
  t.equal(current.sleepMillisecs, 20, 'current unchanged')
  t.strictSame(validatePartial(current, { pagesToScan: undefined }), current, 'undefined keeps the current value, not the default')
  t.strictSame(validatePartial(current, {}), current, 'empty partial')
  t.strictSame(validatePartial(current, undefined), current, 'undefined partial')
  t.ok(Object.isFrozen(validatePartial(current, undefined)), 'undefined partial still gives a frozen object')
})

t.test('validatePartial validates', async (t) => {
  const current = resolveOptions()
  throwsCoded(t, () => validatePartial(current, { pagesToScan: '5' }), TypeError, ErrorCode.INVALID_OPTION, 'wrong type')
  throwsCoded(t, () => validatePartial(current, { pagesToScan: 0 }), RangeError, ErrorCode.INVALID_OPTION, 'out of range')
  throwsCoded(t, () => validatePartial(current, { workers: 257 }), RangeError, ErrorCode.INVALID_OPTION, 'workers too many')
  throwsCoded(t, () => validatePartial(current, { useZeroPages: 1 }), TypeError, ErrorCode.INVALID_OPTION, 'boolean wrong type')
  throwsCoded(t, () => validatePartial(current, { pageToScan: 5 }), TypeError, ErrorCode.UNKNOWN_OPTION, 'unknown key')
  throwsCoded(t, () => validatePartial(current, null), TypeError, ErrorCode.INVALID_OPTION, 'null partial')
  throwsCoded(t, () => validatePartial(current, 5), TypeError, ErrorCode.INVALID_OPTION, 'number partial')
  // No state-dependent rules here: maxPageSharing may change as far as validatePartial knows.
  t.equal(validatePartial(current, { maxPageSharing: 2 }).maxPageSharing, 2)
})

t.test('returned objects are frozen', async (t) => {
  const resolved = resolveOptions({ workers: 1 })
  t.ok(Object.isFrozen(resolved), 'resolveOptions')
  t.ok(Object.isFrozen(resolveOptions()), 'resolveOptions defaults')
  t.ok(Object.isFrozen(validatePartial(resolved, { workers: 2 })), 'validatePartial')
  t.throws(() => {
    'use strict'
    ;(resolved as { workers: number }).workers = 3
  }, TypeError)
  t.equal(resolved.workers, 1)
})
