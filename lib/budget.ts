/**
 * The mapping budget: every remapped extent can cost the process kernel mappings (VMAs), and
 * V8 and the application need headroom under vm.max_map_count to keep mapping memory.
 */
import { loadNative } from './native'

let startup: { mappings: number; max: number } | undefined

/** Mappings and vm.max_map_count when pagemerge first looked (the headroom it started with). */
export function startupMappings(): { mappings: number; max: number } {
  if (!startup) {
    const native = loadNative()
    startup = { mappings: native.mappingCount(), max: native.maxMapCount() }
  }
  return startup
}

/** The default ceiling on the process's mappings: leaves half the start-up headroom to the application. */
export function defaultMapBudget(): number {
  const { mappings, max } = startupMappings()
  return mappings + Math.floor(Math.max(0, max - mappings) / 2)
}
