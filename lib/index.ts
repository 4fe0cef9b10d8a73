// The package's entry: re-exports only.
export { PageMerger, type BufferOptions } from './page-merger'
export type { Stats, BufferStats, MergeProgress, MergeNowOptions, StartOptions } from './engine'
export type { PageMergerOptions, ResolvedOptions, Engine } from './options'
export { ErrorCode, type CodedError } from './errors'
export { smapsRollup, meminfo, rangePss, type MemoryRollup } from './procfs'
export { defaultMapBudget } from './budget'
export { KernelKsm, kernelKsmAvailable, type KsmKnobs, type KsmStats, type KernelStatus, type KsmCounters, type ProcessKsm } from './kernel'
export { estimate, type EstimateOptions, type EstimateReport, type EstimateRange, type EstimateProgress, type ProcessEstimate, type ProcessStatus, type EstimateTotal, type EstimateCounts, type DuplicateContent, type EstimateLocation } from './estimate'
