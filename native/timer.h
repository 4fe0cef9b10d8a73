#pragma once
#include <napi.h>

namespace pm {
void InitTimer(Napi::Env env, Napi::Object exports);
}  // namespace pm
