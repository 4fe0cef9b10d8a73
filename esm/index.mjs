// ESM entry: re-exports the one CommonJS build, so `import` and `require` share one
// addon instance, one arena and one set of classes (no dual-package hazard).
export * from '../dist/lib/index.js'
