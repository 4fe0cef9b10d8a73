#pragma once
#include <napi.h>

namespace pm {
void InitKernel(Napi::Env env, Napi::Object exports);
}  // namespace pm
