// The addon's entry point: context-aware (one instance per thread that loads it, no mutable
// statics), so worker threads can hash pages while the coordinator merges.
#include <napi.h>

#include "arena.h"
#include "common.h"
#include "kernel.h"
#include "pages.h"
#include "procfs.h"
#include "remote.h"
#include "timer.h"

namespace pm {
namespace {

Napi::Object Constants(Napi::Env env) {
  Napi::Object c = Napi::Object::New(env);
  c.Set("PAGE_SIZE", Napi::Number::New(env, kPage));
  c.Set("NO_POOL", Napi::Number::New(env, kNoPool));
  c.Set("STATUS_OK", Napi::Number::New(env, kOk));
  c.Set("STATUS_MISMATCH", Napi::Number::New(env, kMismatch));
  c.Set("STATUS_GONE", Napi::Number::New(env, kGone));
  c.Set("STATUS_BUDGET", Napi::Number::New(env, kBudget));
  c.Set("STATE_SHARED", Napi::Number::New(env, kShared));
  c.Set("STATE_ANON", Napi::Number::New(env, kAnon));
  c.Set("STATE_MERGED", Napi::Number::New(env, kMerged));
  c.Set("STATE_WRITTEN", Napi::Number::New(env, kWritten));
  Napi::Array codes = Napi::Array::New(env);
  uint32_t n = 0;
#define PM_LIST(name, str) codes.Set(n++, Napi::String::New(env, str));
  PM_ERROR_CODES(PM_LIST)
#undef PM_LIST
  c.Set("ERROR_CODES", codes);
  return c;
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("constants", Constants(env));
  InitPages(env, exports);
  InitProcfs(env, exports);
  InitArena(env, exports);
  InitKernel(env, exports);
  InitRemote(env, exports);
  InitTimer(env, exports);
  return exports;
}

}  // namespace pm

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return pm::Init(env, exports); }

NODE_API_MODULE(pagemerge, InitModule)
