// The kernel's own KSM, for this process: prctl(PR_SET_MEMORY_MERGE) makes every anonymous
// region mergeable by ksmd (the per-buffer madvise lives in arena.cc, which knows each buffer's
// kind: the kernel ignores shared mappings, so only private anonymous ones may be handed to it).
#include <sys/prctl.h>

#include <cerrno>

#include "common.h"
#include "kernel.h"

// Linux 6.4+; older headers lack them, and older kernels answer EINVAL.
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif
#ifndef PR_GET_MEMORY_MERGE
#define PR_GET_MEMORY_MERGE 68
#endif

namespace pm {
namespace {

// memoryMerge() -> boolean: whether PR_SET_MEMORY_MERGE is on for this process.
Napi::Value MemoryMerge(const Napi::CallbackInfo& info) {
  int r = prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0);
  if (r < 0) return ThrowErrno(info.Env(), errno, "prctl", "cannot read PR_GET_MEMORY_MERGE");
  return Napi::Boolean::New(info.Env(), r != 0);
}

// setMemoryMerge(on): needs CAP_SYS_RESOURCE; turning it off unmerges every region of the process.
Napi::Value SetMemoryMerge(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsBoolean())
    return ThrowType(info.Env(), code::INVALID_ARG, "on must be a boolean");
  bool on = info[0].As<Napi::Boolean>().Value();
  if (prctl(PR_SET_MEMORY_MERGE, on ? 1 : 0, 0, 0, 0) != 0)
    return ThrowErrno(info.Env(), errno, "prctl", on ? "cannot set PR_SET_MEMORY_MERGE" : "cannot clear PR_SET_MEMORY_MERGE");
  return info.Env().Undefined();
}

}  // namespace

void InitKernel(Napi::Env env, Napi::Object exports) {
  exports.Set("memoryMerge", Napi::Function::New(env, MemoryMerge, "memoryMerge"));
  exports.Set("setMemoryMerge", Napi::Function::New(env, SetMemoryMerge, "setMemoryMerge"));
}

}  // namespace pm
